"""config.json <-> `ModelConfig` for the Hugging Face architectures our model computes exactly (Llama, Qwen2 / Qwen2.5,
Qwen3, Ministral-3; Nemotron-Labs-Diffusion through nemotron_diffusion.py); anything else is refused, naming the
field."""

from __future__ import annotations

from tidar_jax.config import ModelConfig, validate_model
from tidar_jax.interop.hf_positions import positional_fields

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "ministral3")
DEFAULT_BLOCK_SIZE = 4
# max_position_embeddings of a config.json without one: transformers' Qwen default, the largest of the families.
DEFAULT_CONTEXT = 32768


class ConversionError(ValueError):
    """A checkpoint cannot be converted (unsupported architecture, missing or unexpected tensors, bad shapes)."""


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def model_config_from_hf(hf: dict, vocab_size: int, *, block_size: int = DEFAULT_BLOCK_SIZE,
                         param_dtype: str = "float32", compute_dtype: str | None = None,
                         mask_token_id: int | None = None, eos_token_id: int | None = None,
                         pad_token_id: int | None = None) -> ModelConfig:
    """ModelConfig from a config.json dict. `vocab_size` is our (possibly grown) embedding row count.

    Raises ConversionError for an architecture our model does not compute exactly: another model_type, rope
    scaling other than YaRN, sliding-window layers (except Ministral-3's one window for every layer), partial
    rotary, a non-SiLU MLP, output-projection or MLP biases.
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"unsupported model_type {model_type!r} (architectures {hf.get('architectures')}); "
                              f"supported: {SUPPORTED_MODEL_TYPES}, mistral3 and nemotron_labs_diffusion")
    positional, problems = positional_fields(hf, model_type)
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only SwiGLU with silu)")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or ()):
        problems.append("sliding-window attention layers")
    if model_type != "qwen2" and hf.get("attention_bias"):
        problems.append("attention_bias (this family also biases o_proj, which our model lacks)")
    if hf.get("mlp_bias"):
        problems.append("mlp_bias")
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else None
        problems.append(f"quantization_config ({method or 'quantized'} weights; import a bfloat16 / float32 release)")
    if problems:
        raise ConversionError(f"unsupported {model_type} checkpoint: " + "; ".join(problems))
    n_heads = hf["num_attention_heads"]
    eos = eos_token_id if eos_token_id is not None else _first(hf.get("eos_token_id"))
    if eos is None:
        raise ConversionError("config.json has no eos_token_id; pass one explicitly (--eos-token-id)")
    pad = pad_token_id if pad_token_id is not None else _first(hf.get("pad_token_id"))
    cfg = ModelConfig(
        vocab_size=vocab_size, d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, d_ff=hf["intermediate_size"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3", tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        mask_token_id=vocab_size if mask_token_id is None else mask_token_id, eos_token_id=int(eos),
        pad_token_id=int(eos if pad is None else pad), block_size=block_size, param_dtype=param_dtype,
        compute_dtype=compute_dtype or param_dtype, **positional)
    try:
        validate_model(cfg)
    except ValueError as e:
        raise ConversionError(f"config.json gives an invalid model: {e}") from None
    return cfg


def hf_config_from_model_config(cfg: ModelConfig, dtype: str = "float32", base: dict | None = None) -> dict:
    """config.json for `cfg` (Qwen2 if qkv_bias, Qwen3 if qk_norm, Ministral-3 with YaRN, a query scale or a sliding
    window, else Llama); `base` keys not set here are kept (e.g. max_position_embeddings, bos_token_id of the
    imported model; not a Nemotron-Labs-Diffusion `auto_map`, which would load its remote code instead)."""
    if cfg.qkv_bias and cfg.qk_norm:
        raise ConversionError("no Hugging Face architecture has both QKV bias without o_proj bias and QK-norm")
    ministral = cfg.rope_scaling != "none" or cfg.query_scale_beta > 0 or cfg.sliding_window > 0
    if ministral and (cfg.qkv_bias or cfg.qk_norm):
        raise ConversionError("YaRN, a query scale or a sliding window exports as Ministral-3, which has no QKV bias "
                              "or QK-norm")
    model_type = "ministral3" if ministral else "qwen2" if cfg.qkv_bias else "qwen3" if cfg.qk_norm else "llama"
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
            "ministral3": "Ministral3ForCausalLM"}[model_type]
    out = {k: v for k, v in (base or {}).items()
           if k not in ("rope_scaling", "quantization_config", "torch_dtype", "auto_map")}
    out.update({
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": (_ministral_rope(cfg) if ministral
                            else {"rope_type": "default", "rope_theta": cfg.rope_theta}),
        "tie_word_embeddings": cfg.tie_embeddings, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "dtype": dtype, "attention_bias": False, "mlp_bias": False,
        "use_sliding_window": False, "tidar_mask_token_id": cfg.mask_token_id, "tidar_block_size": cfg.block_size,
    })
    if ministral:
        out["sliding_window"] = cfg.sliding_window or None
    if cfg.adapter_rank > 0:
        out.update(tidar_adapter_rank=cfg.adapter_rank, tidar_adapter_alpha=cfg.adapter_alpha)
    out.setdefault("max_position_embeddings", DEFAULT_CONTEXT)
    out.pop("layer_types", None)  # rebuilt by transformers from num_hidden_layers
    return out


def _ministral_rope(cfg: ModelConfig) -> dict:
    """Ministral-3's rope_parameters for `cfg`. It reads its query scale's length from the same
    original_max_position_embeddings as YaRN, and always applies the scale (beta 0 = none)."""
    lengths = {n for n in (cfg.rope_original_max_len if cfg.rope_scaling == "yarn" else 0,
                           cfg.query_scale_len if cfg.query_scale_beta > 0 else 0) if n}
    if len(lengths) > 1:
        raise ConversionError(f"Ministral-3 has one original_max_position_embeddings for YaRN and the query scale; "
                              f"model.rope_original_max_len ({cfg.rope_original_max_len}) != model.query_scale_len "
                              f"({cfg.query_scale_len})")
    rope = {"rope_type": cfg.rope_scaling if cfg.rope_scaling == "yarn" else "default", "rope_theta": cfg.rope_theta,
            "original_max_position_embeddings": lengths.pop() if lengths else 1,
            "llama_4_scaling_beta": cfg.query_scale_beta}
    if cfg.rope_scaling == "yarn":
        rope.update(factor=cfg.rope_factor, beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
                    truncate=cfg.rope_truncate, attention_factor=cfg.rope_attention_factor)
    return rope
