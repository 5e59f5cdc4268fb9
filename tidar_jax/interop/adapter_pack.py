"""Mask-gated adapters as a small file set shipped apart from the base model, and attached back onto it.

An adapter pack is a directory:
    tidar_adapters.safetensors   every adapter leaf and `mask_embed` (bfloat16 by default), named by their param
                                 path in the unstacked layer layout (`layers.0.attn.q_adapter.a`, `mask_embed`)
    adapters.json                {"format", "rank", "alpha", "block_size", "dtype", "base": {...}}
`base` pins the model the adapters were trained on: its architecture and token ids (`ARCHITECTURE_FIELDS`, the
fields a run from `train.init_from` may not change) and the sha256 of its tokenizer. `attach_adapter_pack`
refuses a base that differs in any of them, naming the field, so a pack never lands on a model it does not fit.

Attaching changes only mask-gated rows (model/adapters.py): the AR path of the adapted model stays the base
model's bit for bit, whatever the pack holds.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from tidar_jax.checkpoint.inference import InferenceBundle
from tidar_jax.config import ARCHITECTURE_FIELDS, ModelConfig, to_dict
from tidar_jax.interop.hf_config import ConversionError
from tidar_jax.model.adapters import is_trainable
from tidar_jax.model.init import abstract_model
from tidar_jax.model.layer_stacking import to_layout

PACK_FORMAT = "tidar_jax-adapters/1"
TENSORS_FILE = "tidar_adapters.safetensors"
META_FILE = "adapters.json"
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def _name(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _base_pin(model: ModelConfig, tokenizer_sha256: str | None) -> dict:
    fields = to_dict(model)
    return {**{k: fields[k] for k in ARCHITECTURE_FIELDS}, "tokenizer_sha256": tokenizer_sha256}


def export_adapter_pack(bundle: InferenceBundle, out_dir: str | Path, dtype: str = "bfloat16") -> Path:
    """Writes the adapters of an adapted model (`bundle`: e.g. `load_for_inference(WORKDIR)` of an adapter run) as a
    pack in `out_dir` (created; an existing pack there is refused). Returns `out_dir`."""
    from safetensors.numpy import save_file

    model = bundle.config.model
    if model.adapter_rank <= 0:
        raise ConversionError("the checkpoint has no adapters (model.adapter_rank = 0): nothing to export")
    if dtype not in _DTYPES:
        raise ConversionError(f"adapter pack dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if (out / TENSORS_FILE).exists() or (out / META_FILE).exists():
        raise FileExistsError(f"{out} already holds an adapter pack; refusing to overwrite it")
    pure = to_layout(nnx.to_pure_dict(bundle.params), False)
    tensors = {_name(path): np.asarray(leaf, np.float32).astype(_DTYPES[dtype])
               for path, leaf in jax.tree_util.tree_flatten_with_path(pure)[0] if is_trainable(path)}
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / TENSORS_FILE), metadata={"format": PACK_FORMAT})
    tokenizer = bundle.tokenizer.fingerprint if bundle.tokenizer is not None else None
    meta = {"format": PACK_FORMAT, "rank": model.adapter_rank, "alpha": model.adapter_alpha,
            "block_size": model.block_size, "dtype": dtype, "base": _base_pin(model, tokenizer)}
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def read_pack_meta(pack_dir: str | Path) -> dict:
    """adapters.json of a pack, checked for its format. Raises ConversionError naming what is missing."""
    pack = Path(pack_dir)
    for name in (META_FILE, TENSORS_FILE):
        if not (pack / name).is_file():
            raise ConversionError(f"{pack} is not an adapter pack: {name} is missing")
    try:
        meta = json.loads((pack / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"cannot read {pack / META_FILE}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != PACK_FORMAT:
        raise ConversionError(f"{pack / META_FILE}: format must be {PACK_FORMAT!r}")
    return meta


def attach_adapter_pack(base: InferenceBundle, pack_dir: str | Path) -> InferenceBundle:
    """The base model `base` (no adapters) with the pack's adapters, as a bundle ready for a Generator or
    `save_inference_checkpoint`: config.model gains the pack's rank, alpha and block size; every base leaf is
    `base`'s own, every adapter leaf the pack's (cast to the base's param dtype), in the base's layer layout. Raises ConversionError when the pack was trained on another base (naming the field), or when a tensor is
    missing, unexpected, misshapen or not finite."""
    from safetensors.numpy import load_file

    meta = read_pack_meta(pack_dir)
    model = base.config.model
    if model.adapter_rank > 0:
        raise ConversionError("the base checkpoint already has adapters; attach a pack to the imported base model")
    tokenizer = base.tokenizer.fingerprint if base.tokenizer is not None else None
    # A pack written before a field joined ARCHITECTURE_FIELDS was trained on a base with that field's default.
    want, have = {**_base_pin(ModelConfig(), None), **meta["base"]}, _base_pin(model, tokenizer)
    diffs = [f"{k}: pack {want.get(k)!r}, base {have[k]!r}" for k in have
             if not (want.get(k) == have[k] or (isinstance(have[k], float) and isinstance(want.get(k), (int, float))
                                                 and math.isclose(want[k], have[k], rel_tol=1e-6)))]
    if diffs:
        raise ConversionError(f"the adapter pack {pack_dir} was trained on another base model: {'; '.join(diffs)}")
    adapted = dataclasses.replace(model, adapter_rank=int(meta["rank"]), adapter_alpha=float(meta["alpha"]),
                                  block_size=int(meta["block_size"]), scan_layers=False)
    tensors = load_file(str(Path(pack_dir) / TENSORS_FILE))
    base_pure = to_layout(nnx.to_pure_dict(base.params), False)
    _, abstract = abstract_model(adapted)
    used = set()

    def pick(path, spec):
        if not is_trainable(path):
            node = base_pure
            for k in path:
                node = node[getattr(k, "key", getattr(k, "idx", k))]
            return node
        name = _name(path)
        if name not in tensors:
            raise ConversionError(f"the adapter pack lacks tensor {name!r} ({TENSORS_FILE})")
        value = np.asarray(tensors[name], np.float32)
        if value.shape != tuple(spec.shape):
            raise ConversionError(f"adapter tensor {name!r} has shape {value.shape}, the model needs "
                                  f"{tuple(spec.shape)}")
        if not np.isfinite(value).all():
            raise ConversionError(f"adapter tensor {name!r} holds NaN or infinite values")
        used.add(name)
        return jax.numpy.asarray(value, spec.dtype)

    params = jax.tree_util.tree_map_with_path(pick, nnx.to_pure_dict(abstract))
    extra = sorted(set(tensors) - used)
    if extra:
        raise ConversionError(f"the adapter pack has tensors this model does not: {extra[:3]}")
    adapted = dataclasses.replace(adapted, scan_layers=model.scan_layers)
    graphdef, state = abstract_model(adapted)
    nnx.replace_by_pure_dict(state, to_layout(params, model.scan_layers))
    return dataclasses.replace(base, config=dataclasses.replace(base.config, model=adapted), graphdef=graphdef,
                               params=state)
