"""Hugging Face checkpoints (Qwen2 / Qwen2.5 / Qwen3 / Llama / Ministral-3, and Mistral-3 / Nemotron-Labs-Diffusion
through mistral3.py / nemotron_diffusion.py; config.json + safetensors) <-> tidar_jax params.

Import: `import_hf_checkpoint(dir)` reads config.json, the (possibly sharded) safetensors and tokenizer.json, maps
every weight to our layout and places the diffusion mask token (below). `load_hf_checkpoint` returns just
(ModelConfig, params). Export: `export_hf_checkpoint(out_dir, model_cfg, params)` writes config.json +
model.safetensors that `transformers.AutoModelForCausalLM.from_pretrained` loads; it records the mask token id and
block size in config.json (`tidar_mask_token_id`, `tidar_block_size`) so that re-importing does not move the mask.

Layouts (HF `nn.Linear.weight` is [out, in]):
    q_proj.weight [heads*head_dim, d]      -> attn.q_proj [d, heads, head_dim]     (k_proj / v_proj: kv heads)
    o_proj.weight [d, heads*head_dim]      -> attn.o_proj [heads, head_dim, d]
    q_proj.bias   [heads*head_dim]         -> attn.q_bias [heads, head_dim]         (Qwen2 only)
    q_norm.weight [head_dim]               -> attn.q_norm.scale                     (Qwen3 only)
    gate/up_proj.weight [ff, d]            -> mlp.gate_proj / up_proj [d, ff];  down_proj [d, ff] -> [ff, d]
    embed_tokens.weight [V, d]             -> embed [V, d];  lm_head.weight [V, d] -> lm_head [d, V] (untied)

Mask token: with a tokenizer.json whose ids stop below the embedding's row count (Qwen: 151665 ids, 151936 rows),
the first unused row becomes `<|mask|>`; otherwise the embedding (and an untied lm_head) grows to the next multiple
of 64 and the first new row is the mask. New rows start at the mean embedding (and mean lm_head column), whose logit
is the mean of the original logits, so greedy decoding of the imported model never picks one over a real token.
The tokenizer gains the special tokens `<|mask|>` (and `<|pad|>` if missing) that `tidar_jax.data.tokenizer` requires.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.interop import mistral3, nemotron_diffusion
from tidar_jax.interop.hf_config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CONTEXT,
    ConversionError,
    hf_config_from_model_config,
    model_config_from_hf,
)
from tidar_jax.model.adapters import is_trainable
from tidar_jax.model.layer_stacking import to_layout
from tidar_jax.model.transformer import Transformer

MASK_TOKEN, PAD_TOKEN = "<|mask|>", "<|pad|>"
VOCAB_MULTIPLE = 64
# Mask-gated adapters (adapters.py) of an exported TiDAR model: a file transformers ignores, so the exported model
# loads as the exact base model there, while re-importing it restores the adapters.
ADAPTERS_FILE = "tidar_adapters.safetensors"
# model_type -> the module that reads such a directory as a Ministral-3 one (`as_ministral3(config, tensors)`).
_WRAPPERS = {m.MODEL_TYPE: m for m in (nemotron_diffusion, mistral3)}
# Tensors that carry no weights of ours: rotary caches some old checkpoints saved.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass
class ImportedModel:
    """config: our ModelConfig (mask token placed); params: nnx.State of `Transformer(config)` (jax arrays);
    tokenizer_json: serialised tokenizer.json with `<|mask|>` (and `<|pad|>`) added, or None without a tokenizer."""

    config: ModelConfig
    params: nnx.State
    tokenizer_json: str | None


# --------------------------------------------------------------------------------------------- weight layout


Fn = Callable[[np.ndarray], np.ndarray]


def _weight_rules(cfg: ModelConfig) -> Iterator[tuple[tuple, str, Fn, Fn]]:
    """(our param path, HF tensor name, HF -> ours, ours -> HF) for every parameter of `Transformer(cfg)` in the
    unstacked layer layout (HF's; layer_stacking.py converts to and from `model.scan_layers`)."""
    d, hd = cfg.d_model, cfg.head_dim
    ident: Fn = lambda w: w  # noqa: E731
    transpose: Fn = lambda w: w.T  # noqa: E731

    def heads_in(n: int) -> tuple[Fn, Fn]:  # [n*hd, d] <-> [d, n, hd]
        return (lambda w: w.reshape(n, hd, d).transpose(2, 0, 1),
                lambda w: w.transpose(1, 2, 0).reshape(n * hd, d))

    def bias(n: int) -> tuple[Fn, Fn]:  # [n*hd] <-> [n, hd]
        return lambda w: w.reshape(n, hd), lambda w: w.reshape(n * hd)

    heads_out = (lambda w: w.reshape(d, cfg.n_heads, hd).transpose(1, 2, 0),  # [d, h*hd] <-> [h, hd, d]
                 lambda w: w.transpose(2, 0, 1).reshape(d, cfg.n_heads * hd))
    yield ("embed",), "model.embed_tokens.weight", ident, ident
    yield ("final_norm", "scale"), "model.norm.weight", ident, ident
    if not cfg.tie_embeddings:
        yield ("lm_head",), "lm_head.weight", transpose, transpose
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        yield ours + ("input_norm", "scale"), hf + "input_layernorm.weight", ident, ident
        yield ours + ("post_attn_norm", "scale"), hf + "post_attention_layernorm.weight", ident, ident
        for name, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads), ("v", cfg.n_kv_heads)):
            yield ours + ("attn", f"{name}_proj"), hf + f"self_attn.{name}_proj.weight", *heads_in(n)
            if cfg.qkv_bias:
                yield ours + ("attn", f"{name}_bias"), hf + f"self_attn.{name}_proj.bias", *bias(n)
        yield ours + ("attn", "o_proj"), hf + "self_attn.o_proj.weight", *heads_out
        if cfg.qk_norm:
            yield ours + ("attn", "q_norm", "scale"), hf + "self_attn.q_norm.weight", ident, ident
            yield ours + ("attn", "k_norm", "scale"), hf + "self_attn.k_norm.weight", ident, ident
        for name in ("gate", "up", "down"):
            yield ours + ("mlp", f"{name}_proj"), hf + f"mlp.{name}_proj.weight", transpose, transpose


def _path_key(path: tuple) -> tuple:
    """jax tree path of an nnx.State leaf -> our param path, e.g. ('layers', 0, 'attn', 'q_proj')."""
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def _unstacked_cfg(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, scan_layers=False)


def _unstacked_leaves(params: nnx.State | dict) -> dict[tuple, jax.Array]:
    """Our param path (unstacked layout, e.g. ('layers', 0, 'attn', 'q_proj')) -> leaf, of params in either
    layout."""
    pure = to_layout(nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params, False)
    return {_path_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}


def _adapter_name(key: tuple) -> str:
    """Tensor name of an adapter leaf in ADAPTERS_FILE, e.g. `tidar_adapters.layers.0.attn.q_adapter.a`."""
    return ".".join(["tidar_adapters", *map(str, key)])


def _adapter_keys(cfg: ModelConfig) -> list[tuple]:
    """Param paths of the mask-gated adapter leaves of `Transformer(cfg)` (none without adapters)."""
    if cfg.adapter_rank <= 0:
        return []
    _, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(_unstacked_cfg(cfg), rngs=nnx.Rngs(0))))
    return [_path_key(path) for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]
            if is_trainable(_path_key(path))]


def _tensor_name(tensors: Mapping[str, np.ndarray], name: str) -> str:
    """`tensor 'NAME'`, plus ` in FILE` when `tensors` knows the file it comes from (SafetensorsCheckpoint)."""
    where = getattr(tensors, "file_of", None)
    return f"tensor {name!r}" + (f" in {where(name)}" if where is not None else "")


def params_from_hf_tensors(cfg: ModelConfig, tensors: Mapping[str, np.ndarray]) -> nnx.State:
    """nnx.State of `Transformer(cfg)` (with its sharding metadata) from HF-named tensors; `cfg.vocab_size` must
    equal the tensors' vocabulary. Every tensor must be used (except a tied lm_head and rotary caches). With
    `cfg.adapter_rank` > 0 the adapter leaves come from `tidar_adapters.*` tensors (see `export_hf_checkpoint`).
    Raises ConversionError naming the tensor (and its file) for a missing, unexpected or wrongly shaped tensor, and
    for one holding NaN or infinite values (a model that would only ever output NaN)."""
    arrays, used, names = {}, set(), {}
    rules = [(key, name, to_ours) for key, name, to_ours, _ in _weight_rules(cfg)]
    rules += [(key, _adapter_name(key), lambda w: w) for key in _adapter_keys(cfg)]
    for key, name, to_ours in rules:
        if name not in tensors:
            raise ConversionError(f"checkpoint lacks tensor {name!r} needed by a {cfg.n_layers}-layer model")
        w = tensors[name]
        try:
            arrays[key] = np.asarray(to_ours(w)).astype(jnp.dtype(cfg.param_dtype))
        except ValueError:  # a reshape that cannot hold the tensor: its shape is not the config's
            raise ConversionError(f"{_tensor_name(tensors, name)} has shape {tuple(w.shape)}, which does not fit "
                                  f"the model config.json describes (d_model {cfg.d_model}, {cfg.n_heads} heads, "
                                  f"{cfg.n_kv_heads} kv heads of {cfg.head_dim})") from None
        if not np.isfinite(arrays[key]).all():
            raise ConversionError(f"{_tensor_name(tensors, name)} holds NaN or infinite values")
        used.add(name)
        names[key] = name
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in tensors.keys()
                        if n not in used and n not in ignorable and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise ConversionError(f"checkpoint has tensors this architecture does not use (unsupported variant?): "
                              f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    _, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(_unstacked_cfg(cfg), rngs=nnx.Rngs(0))))

    def fill(path, leaf):
        array = arrays[_path_key(path)]
        if array.shape != leaf.shape:
            raise ConversionError(f"{_tensor_name(tensors, names[_path_key(path)])} (our "
                                  f"{'.'.join(map(str, _path_key(path)))}): shape {array.shape} after conversion does "
                                  f"not match the config's {leaf.shape}")
        return jnp.asarray(array)

    params = jax.tree_util.tree_map_with_path(fill, abstract)
    if not cfg.scan_layers:
        return params
    _, stacked = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(stacked, to_layout(nnx.to_pure_dict(params), True))
    return stacked


def hf_tensors_from_params(cfg: ModelConfig, params: nnx.State, dtype: str = "float32") -> dict[str, np.ndarray]:
    """HF-named host arrays of `dtype` from our params, either layer layout (inverse of `params_from_hf_tensors`)."""
    flat = _unstacked_leaves(params)
    return {name: np.ascontiguousarray(to_hf(np.asarray(jax.device_get(flat[key])))).astype(dtype)
            for key, name, _, to_hf in _weight_rules(cfg)}


# ------------------------------------------------------------------------------------------ files on disk


class SafetensorsCheckpoint(Mapping):
    """Read-only name -> host array view of a directory's safetensors (sharded via model.safetensors.index.json or
    not); each tensor is read from disk when asked for, so a large checkpoint never sits in memory twice."""

    def __init__(self, directory: str | Path):
        from safetensors import SafetensorError, safe_open

        self._open, self._error = safe_open, (SafetensorError, OSError)
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index} has no weight_map object")
            self._where = {name: directory / f for name, f in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                other = sorted(p.name for pattern in ("*.bin", "*.pt*") for p in directory.glob(pattern))
                hint = f" (found {other}: re-save with save_pretrained(safe_serialization=True))" if other else ""
                raise ConversionError(f"no *.safetensors weights in {directory}{hint}")
            self._where = {}
            for f in files:
                with self._opened(f) as handle:
                    self._where.update({name: f for name in handle.keys()})
        missing = sorted({str(f) for f in self._where.values() if not f.is_file()})
        if missing:
            raise ConversionError(f"safetensors shards listed in the index are missing: {missing}")

    def _opened(self, file: Path):
        """safe_open of `file`; ConversionError naming it when it is truncated or not safetensors."""
        try:
            # framework="flax" reads bfloat16, which safetensors' numpy backend rejects.
            return self._open(file, framework="flax")
        except self._error as e:
            raise ConversionError(f"cannot read {file} as safetensors (truncated or damaged?): {e}") from None

    def file_of(self, name: str) -> Path:
        """The file that holds tensor `name`."""
        return self._where[name]

    def __getitem__(self, name: str) -> np.ndarray:
        with self._opened(self._where[name]) as handle:
            try:
                tensor = handle.get_tensor(name)
            except self._error as e:  # the data cut off after an intact header
                raise ConversionError(f"cannot read tensor {name!r} from {self._where[name]}: {e}") from None
        return np.asarray(jax.device_get(tensor))  # device_get gives host numpy

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None


def _prepare_tokenizer(tokenizer_file: Path | None, rows: int) -> tuple[str | None, int, int | None, int]:
    """Adds `<|mask|>` (and `<|pad|>` when absent) to the tokenizer right after its last id.

    Returns (tokenizer json or None, mask id, pad id or None, rows needed). Without a tokenizer the mask goes to
    row `rows` (no way to know which rows are unused).
    """
    if tokenizer_file is None:
        return None, rows, None, rows + 1
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    if tok.token_to_id(MASK_TOKEN) is not None:
        raise ConversionError(f"{tokenizer_file} already defines {MASK_TOKEN!r}; it cannot be the diffusion mask "
                              "of a model that never trained on it (re-import the original checkpoint)")
    first_free = max(tok.get_vocab(with_added_tokens=True).values()) + 1
    new = [MASK_TOKEN] + ([PAD_TOKEN] if tok.token_to_id(PAD_TOKEN) is None else [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    ids = [tok.token_to_id(t) for t in new]
    if ids != list(range(first_free, first_free + len(new))):  # tokenizers appends at the current size
        raise ConversionError(f"{tokenizer_file} has holes in its ids; new special tokens landed at {ids}")
    return tok.to_str(), first_free, tok.token_to_id(PAD_TOKEN), first_free + len(new)


class _Grown(Mapping):
    """`tensors` with embed_tokens (and an untied lm_head) grown to `rows` rows of the mean of the original rows."""

    def __init__(self, tensors: Mapping[str, np.ndarray], rows: int):
        self._tensors, self._rows = tensors, rows
        self.file_of = getattr(tensors, "file_of", None)  # error messages still name the file of a tensor

    def __getitem__(self, name: str) -> np.ndarray:
        w = self._tensors[name]
        if name in ("model.embed_tokens.weight", "lm_head.weight") and w.shape[0] < self._rows:
            mean = w.astype(np.float32).mean(axis=0, keepdims=True).astype(w.dtype)
            w = np.concatenate([w, np.repeat(mean, self._rows - w.shape[0], axis=0)])
        return w

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def convert_hf(hf_config: dict, tensors: Mapping[str, np.ndarray], tokenizer_file: Path | None = None, *,
               block_size: int | None = None, param_dtype: str = "float32", compute_dtype: str | None = None,
               eos_token_id: int | None = None) -> ImportedModel:
    """HF config dict + HF-named tensors (+ tokenizer.json) -> ImportedModel, placing the mask token (module doc).

    block_size None: the `tidar_block_size` of a checkpoint we exported, else 4."""
    if "model.embed_tokens.weight" not in tensors:
        raise ConversionError("checkpoint has no model.embed_tokens.weight (not a causal LM of a supported family)")
    rows = tensors["model.embed_tokens.weight"].shape[0]
    if hf_config.get("vocab_size", rows) != rows:
        raise ConversionError(f"config.json vocab_size {hf_config['vocab_size']} != embedding rows {rows}")
    tokenizer_json, pad = None, None
    if "tidar_mask_token_id" in hf_config:  # exported by us: the mask row is already trained / placed
        mask, needed = int(hf_config["tidar_mask_token_id"]), rows
        if tokenizer_file is not None:
            tokenizer_json = Path(tokenizer_file).read_text()
    else:
        tokenizer_json, mask, pad, needed = _prepare_tokenizer(tokenizer_file, rows)
    if needed > rows:
        rows = -(-needed // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        tensors = _Grown(tensors, rows)
    if block_size is None:
        block_size = int(hf_config.get("tidar_block_size", DEFAULT_BLOCK_SIZE))
    # A TiDAR step feeds K drafts + K*K proposal tokens at positions the model must know: past its trained context
    # no decode could run (and K = 100000 would ask for 10^10 tokens per step).
    context = int(hf_config.get("max_position_embeddings") or DEFAULT_CONTEXT)
    if block_size * (block_size + 1) > context:
        largest = int(((4 * context + 1) ** 0.5 - 1) / 2)
        raise ConversionError(f"block size {block_size}: a TiDAR step of K + K*K = {block_size * (block_size + 1)} "
                              f"tokens exceeds the model's context of {context} positions (max_position_embeddings); "
                              f"choose K <= {largest}")
    cfg = model_config_from_hf(hf_config, rows, block_size=block_size, param_dtype=param_dtype,
                               compute_dtype=compute_dtype, mask_token_id=mask, eos_token_id=eos_token_id,
                               pad_token_id=pad)
    if "tidar_adapter_rank" in hf_config:  # exported by us with mask-gated adapters (ADAPTERS_FILE)
        cfg = dataclasses.replace(cfg, adapter_rank=int(hf_config["tidar_adapter_rank"]),
                                  adapter_alpha=float(hf_config["tidar_adapter_alpha"]))
    return ImportedModel(cfg, params_from_hf_tensors(cfg, tensors), tokenizer_json)


def import_hf_checkpoint(path: str | Path, *, block_size: int | None = None, param_dtype: str = "float32",
                         compute_dtype: str | None = None, eos_token_id: int | None = None) -> ImportedModel:
    """Reads a Hugging Face model directory (config.json, safetensors, optional tokenizer.json)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConversionError(f"{path} is not a Hugging Face model directory (no config.json)")
    tokenizer_file = path / "tokenizer.json"
    hf_config, tensors = _read_json(path / "config.json"), SafetensorsCheckpoint(path)
    wrapper = _WRAPPERS.get(hf_config.get("model_type"))
    if wrapper is not None:  # a Ministral-3 decoder under other names
        hf_config, tensors = wrapper.as_ministral3(hf_config, tensors)
    return convert_hf(hf_config, tensors, tokenizer_file if tokenizer_file.is_file() else None, block_size=block_size,
                      param_dtype=param_dtype, compute_dtype=compute_dtype, eos_token_id=eos_token_id)


def load_hf_checkpoint(path: str | Path, **kwargs) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params) of a Hugging Face model directory; keyword arguments as `import_hf_checkpoint`."""
    imported = import_hf_checkpoint(path, **kwargs)
    return imported.config, imported.params


def export_hf_checkpoint(out_dir: str | Path, cfg: ModelConfig, params: nnx.State, dtype: str = "float32",
                         base_config: dict | None = None) -> Path:
    """Writes out_dir/config.json + out_dir/model.safetensors (all `cfg.vocab_size` rows, mask row included).

    `dtype` is the stored dtype (float32 / bfloat16 / float16). Refuses a non-empty `out_dir`.
    """
    from safetensors.flax import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ConversionError(f"{out_dir} exists and is not empty; refusing to overwrite it")
    hf_config = hf_config_from_model_config(cfg, dtype, base_config)
    tensors = hf_tensors_from_params(cfg, params, "float32")
    out_dir.mkdir(parents=True, exist_ok=True)
    # safetensors' flax backend writes bfloat16; "format": "pt" is what transformers expects in the header.
    save_file({k: jnp.asarray(v, dtype) for k, v in tensors.items()}, str(out_dir / "model.safetensors"),
              metadata={"format": "pt"})
    adapter_keys = _adapter_keys(cfg)
    if adapter_keys:
        flat = _unstacked_leaves(params)
        save_file({_adapter_name(k): jnp.asarray(flat[k], jnp.float32) for k in adapter_keys},
                  str(out_dir / ADAPTERS_FILE), metadata={"format": "tidar_jax"})
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    return out_dir
