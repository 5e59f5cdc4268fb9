"""The two layouts of the decoder layers' params, and the one conversion between them.

- unstacked (`model.scan_layers=false`): `params["layers"] = {0: layer_tree, 1: layer_tree, ...}` (an `nnx.List`),
  each leaf of its own shape, e.g. `layers/0/attn/q_proj` [d_model, heads, head_dim];
- stacked (`model.scan_layers=true`): `params["layers"] = layer_tree` whose every leaf has a leading layer axis,
  e.g. `layers/attn/q_proj` [n_layers, d_model, heads, head_dim], logical axis name `layers` (sharding.py).

Everything else (embedding, final norm, head, mask embedding) is the same in both. `to_layout` converts any tree
of that shape (pure param dicts of arrays, numpy arrays or `ShapeDtypeStruct`s under `jax.eval_shape`, and every
params-shaped subtree of an optimizer state), so checkpoint restore, the HF / GGUF converters and the trainer
share it. Layer i of the stacked layout is exactly layer i of the unstacked one: converting there and back is the
identity, bit for bit.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import spmd

LAYERS = "layers"  # the params key of the decoder layers, and the logical name of the stacked axis


def is_stacked(params: dict) -> bool:
    """Whether `params` (a pure param dict, or any tree with a `layers` entry) holds the stacked layout.

    The unstacked `layers` entry is keyed by layer index (ints, or their strings in Orbax metadata)."""
    return not all(str(k).isdigit() for k in params[LAYERS])


def layer_axes(path: tuple) -> int:
    """1 if the pure-dict tree path (jax key path) is a leaf of the stacked layers (its first axis is the layer
    axis), else 0: `leaf.ndim - layer_axes(path)` is the rank one layer's param has in either layout."""
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return int(len(keys) > 1 and keys[0] == LAYERS and not keys[1].isdigit())


def _is_params(node: Any) -> bool:
    return isinstance(node, dict) and LAYERS in node and isinstance(node[LAYERS], dict)


def _stack(layers: dict) -> dict:
    ordered = [layers[i] for i in sorted(layers, key=int)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)


def _unstack(layers: dict) -> dict:
    n = jax.tree.leaves(layers)[0].shape[0]
    return {i: jax.tree.map(lambda x, i=i: x[i], layers) for i in range(n)}


def to_layout(tree: Any, scan_layers: bool) -> Any:
    """`tree` with every params-shaped subtree (a dict holding `layers`) in the stacked layout if `scan_layers`,
    else the unstacked one; subtrees already in that layout, and all other leaves, are returned as they are."""
    def convert(node: Any) -> Any:
        if not _is_params(node) or is_stacked(node) == scan_layers:
            return node
        return {**node, LAYERS: (_stack if scan_layers else _unstack)(node[LAYERS])}

    return jax.tree.map(convert, tree, is_leaf=_is_params)


def stack_modules(layers: list[nnx.Module]) -> nnx.Module:
    """One module of the type of `layers[0]` whose params stack the given modules' params ([len(layers), ...]), the
    `layers` logical axis name prepended to each param's `out_sharding`. All modules must share one graph (the same
    class and config)."""
    graphdef = nnx.graphdef(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.state(layer) for layer in layers))
    return nnx.merge(graphdef, spmd.add_axis(stacked, 0, {nnx.PARTITION_NAME: LAYERS}))
