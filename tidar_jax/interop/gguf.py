"""GGUF (llama.cpp) checkpoints of the llama architecture -> the Hugging Face layout `interop/hf.py` imports.

`read_gguf(path)` returns a config.json-style dict built from the file's metadata and HF-named float32 tensors:
every tensor is dequantised with `gguf.quants.dequantize`, and the Q / K projections are un-permuted from
llama.cpp's RoPE row order (its converter applied `w.reshape(n, 2, hd // 2, d).swapaxes(1, 2)` with n = the head
count for Q and the KV head count for K). `write_gguf_tokenizer` saves the tokenizer that transformers builds from
the GGUF metadata (tokenizer.json, tokenizer_config.json, chat_template.jinja when the file has a chat template).
Needs the `gguf` package (and transformers for the tokenizer).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from tidar_jax.interop.hf import ConversionError, ImportedModel, convert_hf

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation. w: [n_heads * head_dim, d] in GGUF row order -> HF order."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.split(".")[-1] in ("tokens", "merges", "token_type", "scores"):
            continue  # large arrays the model config does not need
        try:
            out[key] = field.contents()
        except Exception:  # noqa: BLE001  fields of exotic types are not needed here
            continue
    return out


def hf_config_from_gguf_metadata(meta: dict, has_output: bool) -> dict:
    """config.json-style dict for a llama-architecture GGUF; unsupported features are passed on so that
    `convert.model_config_from_hf` rejects them with its usual message."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConversionError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported "
                              "(Llama / SmolLM2 / Mistral-style files)")

    def get(name, default=None):
        return meta.get(f"llama.{name}", default)

    n_heads = int(get("attention.head_count"))
    d = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", d // n_heads))
    hf = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d,
        "num_hidden_layers": int(get("block_count")), "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads, "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim, "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(get("context_length", 4096)), "tie_word_embeddings": not has_output,
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"), "hidden_act": "silu",
    }
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        hf["rope_scaling"] = {"rope_type": scaling}
    rotary_dims = get("rope.dimension_count", head_dim)
    if rotary_dims != head_dim:
        hf["partial_rotary_factor"] = rotary_dims / head_dim
    if get("expert_count"):
        raise ConversionError(f"mixture-of-experts GGUF ({get('expert_count')} experts) is not supported")
    return hf


def read_gguf(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json-style dict, HF-named float32 tensors) of a llama-architecture GGUF file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} is a directory, not a GGUF file (a Hugging Face model directory is imported "
                              "with --from hf)" if path.is_dir() else f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError / struct errors for non-GGUF bytes
        raise ConversionError(f"cannot read {path} as GGUF: {e}") from None
    names = {t.name for t in reader.tensors}
    hf = hf_config_from_gguf_metadata(_metadata(reader), has_output="output.weight" in names)
    if "rope_freqs.weight" in names:  # Llama 3.1-style frequency factors
        hf["rope_scaling"] = {"rope_type": "llama3"}
    tensors = {}
    for t in reader.tensors:
        if t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        elif (m := _LAYER_RE.fullmatch(t.name)) and m.group(2) in _LAYER_NAMES:
            name = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        else:
            name = t.name  # left for convert's "unexpected tensor" check to name
        try:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:
            raise ConversionError(f"{path}: tensor {t.name}: {e}") from None
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, hf["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, hf["num_key_value_heads"])
        tensors[name] = w
    hf["vocab_size"] = tensors["model.embed_tokens.weight"].shape[0] if "model.embed_tokens.weight" in tensors else 0
    return hf, tensors


def write_gguf_tokenizer(path: str | Path, out_dir: str | Path) -> Path:
    """Saves the tokenizer transformers builds from the GGUF metadata (tokenizer.json, tokenizer_config.json,
    chat_template.jinja) into `out_dir`; returns out_dir/tokenizer.json."""
    from transformers import AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(str(out_dir))
    tokenizer_file = Path(out_dir) / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ConversionError(f"transformers built no fast tokenizer (tokenizer.json) from {path}")
    return tokenizer_file


def import_gguf_checkpoint(path: str | Path, tokenizer_dir: str | Path, *, block_size: int | None = None,
                           param_dtype: str = "float32", compute_dtype: str | None = None,
                           eos_token_id: int | None = None) -> tuple[ImportedModel, dict]:
    """Imports a GGUF file; its tokenizer files are written to `tokenizer_dir`. Returns (model, config.json dict)."""
    hf, tensors = read_gguf(path)
    tokenizer_file = write_gguf_tokenizer(path, tokenizer_dir)
    imported = convert_hf(hf, tensors, tokenizer_file, block_size=block_size, param_dtype=param_dtype,
                          compute_dtype=compute_dtype, eos_token_id=eos_token_id)
    return imported, hf
