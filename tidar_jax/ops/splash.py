"""TPU Pallas Splash attention for the training layouts, with the TiDAR hybrid mask as a computable mask.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`, `model.attention_impl = "splash"`) evaluates
a mask function inside the kernel and skips every `[block_q, block_kv]` tile whose mask is all False, so neither the `[2S, 2S]` mask nor the scores exist
in memory and the fully masked ~3/4 of the TiDAR layout is never computed. The mask here is `LayoutSplashMask`, a
`masks.TrainingLayout` (the TiDAR layout of design.md section 2, or plain causal) through the same predicate that
builds the dense mask.

Key padding enters as segment ids: valid tokens are segment 1 and padded ones segment 0, so a valid query never sees
a padded key (as in the dense path) and every row keeps at least itself (Splash requires no empty rows). Padded
query rows therefore attend among padded keys instead of to nothing; they are excluded from the loss and no valid row
reads them, so the loss and its gradients equal the dense path's.

Off TPU the kernel runs in Pallas interpret mode (slow; for tests on CPU only). Under a mesh (`jax.set_mesh`) the
kernel runs inside `jax.shard_map`: batch over the batch mesh axes, query and kv heads over `tensor` (the sharding
rules of `sharding.py`), the sequence unsharded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from tidar_jax.layout.masks import TrainingLayout
from tidar_jax.sharding import BATCH_AXES

Array = jax.Array

DEFAULT_BLOCK = 512
LANES = splash_kernel.NUM_LANES


class LayoutSplashMask(splash_mask._ComputableMask):
    """A `masks.TrainingLayout` as a Splash computable mask (hashable: Splash caches per mask).

    Splash evaluates the mask function on numpy index arrays when it builds its tile tables and on jax arrays
    inside the kernel; both go through `TrainingLayout.allowed`, the predicate the dense mask is built from."""

    def __init__(self, layout: TrainingLayout):
        self.layout = layout
        super().__init__((layout.length, layout.length), self._allowed)

    def _allowed(self, q_ids, kv_ids):
        return self.layout.allowed(q_ids, kv_ids, np if isinstance(q_ids, np.ndarray) else jnp)

    def __eq__(self, other: object):
        if not isinstance(other, LayoutSplashMask):
            return NotImplemented
        return self.layout == other.layout

    def __hash__(self):
        return hash((LayoutSplashMask, self.layout))


def _block(length: int, requested: int) -> int:
    """The tile size: `requested` capped at the layout length; Splash needs a multiple of its 128 lanes."""
    block = min(requested, length)
    if length % block or block % LANES:
        raise ValueError(f"splash attention needs the layout length ({length} tokens) to be a multiple of its block "
                         f"size ({block}), itself a multiple of {LANES}; pick train.seq_len accordingly")
    return block


@functools.lru_cache(maxsize=32)
def _kernel(layout: TrainingLayout, group: int, block: int, interpret: bool):
    """The Splash MQA kernel for one kv head's `group` query heads: q [group, T, d], k / v [T, d]."""
    head_mask = LayoutSplashMask(layout)
    b = _block(layout.length, block)
    sizes = splash_kernel.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                                     block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    # The kernel holds its tile tables as arrays: make them concrete even when first built inside a trace, so
    # the cached kernel never captures a tracer.
    with jax.ensure_compile_time_eval():
        return splash_kernel.make_splash_mqa_single_device(splash_mask.MultiHeadMask([head_mask] * group),
                                                           block_sizes=sizes, interpret=interpret)


def _local_attention(q: Array, k: Array, v: Array, key_valid: Array, *, layout: TrainingLayout, block: int,
                     interpret: bool) -> Array:
    """Per-device body: q [b, T, h, d]; k, v [b, T, kv, d]; key_valid [b, T] -> [b, T, h, d]."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    kernel = _kernel(layout, h // kv, block, interpret)
    qg = jnp.transpose((q * d ** -0.5).reshape(b, t, kv, h // kv, d), (0, 2, 3, 1, 4))  # [b, kv, g, T, d]
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))  # [b, kv, T, d]
    segments = key_valid.astype(jnp.int32)

    def one_row(qr, kr, vr, seg):
        ids = splash_kernel.SegmentIds(q=seg, kv=seg)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=ids))(qr, kr, vr)

    out = jax.vmap(one_row)(qg, kt, vt, segments)  # [b, kv, g, T, d]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, h, d).astype(q.dtype)


def splash_attention(q: Array, k: Array, v: Array, layout: TrainingLayout, key_valid: Array, *,
                     block: int = DEFAULT_BLOCK, interpret: bool | None = None) -> Array:
    """Attention of every row of a training layout with Splash (the arguments of `ops.blockwise_attention`).

    q: [b, T, h, d]; k, v: [b, T, kv, d] (T = layout.length, h % kv == 0); key_valid: [b, T] bool. Scale
    d ** -0.5; tiles of `block` x `block` (T must be a multiple of min(block, T)). Returns [b, T, h, d] in q's
    dtype, equal to the dense masked attention on every valid query row (padded rows: see the module docstring).
    `interpret` defaults to True off TPU.
    """
    if q.shape[1] != layout.length or k.shape[1] != layout.length:
        raise ValueError(f"q and k must span the layout's {layout.length} tokens, got q {q.shape}, k {k.shape}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    body = functools.partial(_local_attention, layout=layout, block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return body(q, k, v, key_valid)

    batch = tuple(a for a in BATCH_AXES if a in mesh.axis_names) or None
    heads = "tensor" if "tensor" in mesh.axis_names else None
    qkv_spec = P(batch, None, heads, None)
    return jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, None)),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, key_valid)
