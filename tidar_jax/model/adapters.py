"""Mask-gated low-rank adapters: train TiDAR's drafting on top of a frozen AR model without touching its AR path.

With `model.adapter_rank = r > 0` every projection of every layer (q, k, v, o, gate, up, down) gets a low-rank
update `x -> (x @ A) @ B * alpha / r` that is applied ONLY on rows whose input token is the mask token (the gate),
and mask tokens enter with their own trainable embedding `mask_embed` instead of an embedding-table row. Rows of
real tokens select the base projection's output unchanged (`where(gate, base + delta, base)`), so their hidden
states, K/V and logits are bit-identical to the base model's; since mask tokens never attend into real-token rows
(design.md section 2), AR-mode output and likelihood equal the base model's exactly, and TiDAR with beta = 1
reproduces the base model's greedy output. The tied LM head and the embedding table stay frozen too (the mask
embedding is separate because, tied, the table's mask row is also a column of every AR softmax).

This is the gated-LoRA design of Apple's multi-token prediction work (arXiv 2507.11851) applied to TiDAR's mask
blocks. B starts at zero, so an adapted model starts as the base model with untrained drafts.

Params: adapter leaves live under names containing `_adapter` (`attn.q_adapter.a`, ...) plus `mask_embed`;
`split_trainable` / `merge_trainable` separate them from the frozen base for `train.adaptation=adapters`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
ADAPTER_MARK = "_adapter"
MASK_EMBED = "mask_embed"


class LowRankAdapter(nnx.Module):
    """Low-rank update of a projection from `in_shape` to `out_shape` trailing dims.

    a: [*in_shape, rank] (normal, std 1/sqrt(fan_in)); b: [rank, *out_shape] (zeros); logical axes as given (the
    rank axis is unsharded).
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], in_axes: tuple[str | None, ...],
                 out_axes: tuple[str | None, ...], rank: int, alpha: float, param_dtype, *, rngs: nnx.Rngs):
        fan_in = int(np.prod(in_shape))
        init_a = nnx.initializers.normal(1.0 / np.sqrt(fan_in))
        self.n_in = len(in_shape)
        self.scale = alpha / rank
        self.a = nnx.Param(init_a(rngs.params(), (*in_shape, rank), param_dtype), out_sharding=(*in_axes, None),
                           eager_sharding=False)
        self.b = nnx.Param(jnp.zeros((rank, *out_shape), param_dtype), out_sharding=(None, *out_axes),
                           eager_sharding=False)

    def __call__(self, x: Array) -> Array:
        """x: [..., *in_shape] -> [..., *out_shape] in x's dtype."""
        dt = x.dtype
        in_dims = tuple(range(x.ndim - self.n_in, x.ndim))
        low = jnp.tensordot(x, self.a[...].astype(dt), axes=(in_dims, tuple(range(self.n_in))))
        return jnp.tensordot(low, self.b[...].astype(dt), axes=((low.ndim - 1,), (0,))) * jnp.asarray(self.scale, dt)


def gated(base_out: Array, x: Array, adapter: LowRankAdapter | None, gate: Array | None) -> Array:
    """`base_out` with `adapter(x)` added on gated rows only. base_out: [batch, seq, *out]; x: [batch, seq, *in];
    gate: [batch, seq] bool. Ungated rows are `base_out` itself, bit for bit (a select, not an add of zero)."""
    if adapter is None or gate is None:
        return base_out
    delta = adapter(x)
    row = gate.reshape(gate.shape + (1,) * (base_out.ndim - gate.ndim))
    return jnp.where(row, base_out + delta.astype(base_out.dtype), base_out)


def _keys(path: tuple) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_trainable(path: tuple) -> bool:
    """Whether a pure-dict param path belongs to the adapters (trained in adapter mode)."""
    return any(ADAPTER_MARK in k or k == MASK_EMBED for k in _keys(path))


def split_trainable(params: dict) -> tuple[dict, dict]:
    """(adapter params, frozen base params) of a pure param dict; both keep the full nesting, with the other
    part's leaves replaced by None so that `merge_trainable` can put them back together."""
    trainable = jax.tree_util.tree_map_with_path(lambda p, x: x if is_trainable(p) else None, params)
    frozen = jax.tree_util.tree_map_with_path(lambda p, x: None if is_trainable(p) else x, params)
    return trainable, frozen


def merge_trainable(trainable: dict, frozen: dict) -> dict:
    """Inverse of `split_trainable`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def attach_to_base(base: dict, fresh: dict, mask_token_id: int) -> dict:
    """Params of an adapted model: `fresh` (a freshly initialised adapted model, pure dict) with every base leaf
    taken from `base` (the pure params of the model without adapters) and `mask_embed` starting at the base
    embedding's mask row. Raises ValueError if `base` lacks a base leaf of `fresh` or has other shapes."""
    def pick(path, leaf):
        keys = _keys(path)
        if keys == [MASK_EMBED]:
            return jnp.asarray(base["embed"][mask_token_id], leaf.dtype)
        if is_trainable(path):
            return leaf
        node: Any = base
        for k in path:
            key = getattr(k, "key", getattr(k, "idx", None))
            if not isinstance(node, dict) or key not in node:
                raise ValueError(f"base params lack {'/'.join(keys)}")
            node = node[key]
        if tuple(node.shape) != tuple(leaf.shape):
            raise ValueError(f"base param {'/'.join(keys)} has shape {tuple(node.shape)}, the adapted model needs "
                             f"{tuple(leaf.shape)}")
        return node

    return jax.tree_util.tree_map_with_path(pick, fresh)
