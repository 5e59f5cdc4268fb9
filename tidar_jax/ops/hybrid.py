"""GPU training attention for the TiDAR layouts: a fused causal kernel (cuDNN) for the clean half, blockwise for the
mask half (`model.attention_impl = "cudnn_hybrid"`).

`hybrid_attention(q, k, v, layout, key_valid)` computes what `jax.nn.dot_product_attention(q, k, v,
mask=LayoutMask(key_valid, layout).dense()[:, None])` computes (the arguments of `ops.blockwise_attention`), split
by query rows of the `[clean S | mask S]` layout (masks.TrainingLayout):
- Clean rows 0..S-1 see only clean keys, causally: that is a complete causal attention over `q, k, v[:, :S]`, run
  by `jax.nn.dot_product_attention(..., is_causal=True, key_value_seq_lengths=n, implementation=...)`: cuDNN flash
  attention on a GPU (`FUSED_IMPLEMENTATION`), the XLA path of the same call in the CPU tests. cuDNN only knows
  suffix padding (per-row valid lengths n), so the key padding is checked at run time: if every row's clean
  `key_valid` is a prefix of Trues (the trainer's packed batches are all valid; held-out batches are padded at the
  end), the fused kernel runs; otherwise (`lax.cond`) the clean rows go through `ops.blockwise_attention` too. A row
  with no valid key (n = 0) takes the mean of all T values, as in the dense reference (ops/blockwise.py). Both
  branches are compiled; on a GPU an XLA conditional may read its predicate back to the host once per layer and
  pass (the train-step timing of scripts/gpu_bench.sh shows whether that costs anything).
- Mask rows S..2S-1 (clean keys < b*K plus their own block) go through `ops.blockwise_attention(q_offset=S)` over all
  2S keys: only the staircase tiles and the diagonal blocks are computed. A plain causal layout (block_size None) has
  no mask half: it is one fused causal call.
Both halves are complete attentions (no row needs keys of both calls merged), so the outputs are concatenated and
gradients compose by autodiff: the clean K/V get gradient from both calls, through cuDNN's VJP and the blockwise
custom VJP.

Why this split (jax 0.10.2, jax/_src/cudnn/fused_attention_stablehlo.py, jax/_src/nn/functions.py):
- cuDNN's masks are NO_MASK / PADDING / CAUSAL / PADDING_CAUSAL (+ a left sliding window); any other boolean mask is
  turned into a dense [T, S] additive bias (`combine_bias_and_mask`), the O(S^2) memory this path avoids. The mask
  half's pattern (a block staircase plus block-diagonal) has no such form, and its packed-segment layout
  (q_offsets / kv_offsets, private API, Hopper only) needs each segment's keys contiguous, which the clean prefix +
  own block are not.
- Merging cuDNN partial results by log-sum-exp would need a differentiable LSE: `return_residual=True` returns it
  cast to the output dtype, and the cuDNN VJP drops its cotangent (`_dot_product_attention_bwd_rule` keeps
  `grad_output[0]`), so merged gradients would be wrong.
- `jax.experimental.pallas.ops.gpu.attention.mha` (Triton) has causal and segment-id masks only, no GQA (k/v heads
  = q heads) and one segment-id array for q and kv; `attention_mgpu` (Mosaic GPU: Hopper, head_dim % 64) has a
  causal flag only and takes no mask or key padding. Neither expresses the mask half better than ops.blockwise.
So cuDNN takes the part it runs natively (the causal clean half, ~half the attention FLOPs of the layout), blockwise
the rest. With a KV cache (decoding, the adapter loss's mask pass) model.py uses the same paths as "blockwise".

Under a mesh (`jax.set_mesh`) the per-device body runs inside `jax.shard_map` like ops/splash.py: batch over the
batch mesh axes, query and kv heads over `tensor` (each only where it divides the sizes, else replicated), so the
fused kernel and the run-time padding check see one device's rows. In a fully manual region the cuDNN primitive's
`custom_partitioning` lowers its per-device implementation directly (jax/_src/custom_partitioning.py), so cuDNN's
own partitioner (whose backward mishandled sharded inputs: jax-ml/jax#25986) is not involved. Not yet run on a GPU
in this project.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from tidar_jax.layout.masks import TrainingLayout
from tidar_jax.ops.blockwise import BLOCK_K, BLOCK_Q, blockwise_attention
from tidar_jax.sharding import BATCH_AXES

Array = jax.Array

# `jax.nn.dot_product_attention`'s implementation for the clean half when hybrid_attention gets none: "cudnn" for
# real runs; tests set "xla" to run the identical code on CPU (cuDNN has no CPU or float32 kernel).
FUSED_IMPLEMENTATION = "cudnn"


def suffix_lengths(valid: Array) -> tuple[Array, Array]:
    """valid: [b, n] bool -> (int32 [b] valid count per row, bool scalar: every row is `count` Trues then Falses,
    i.e. the padding is a suffix that `key_value_seq_lengths` expresses exactly)."""
    lengths = jnp.sum(valid, axis=1, dtype=jnp.int32)
    prefix = jnp.arange(valid.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]
    return lengths, jnp.all(valid == prefix)


def fused_causal(q: Array, k: Array, v: Array, lengths: Array, v_all: Array, implementation: str | None) -> Array:
    """Causal attention of q [b, n, h, d] over k, v [b, n, kv, d] whose keys >= lengths[b] (int32 [b]) are padding,
    through `jax.nn.dot_product_attention(implementation=...)`. A row with no valid key (lengths 0) gets the mean of
    v_all [b, T, kv, d] (all T keys of the layout), like the dense reference; the kernel then sees one key, so it
    stays finite, and that row's output cotangent never reaches it. Returns [b, n, h, d] in q's dtype."""
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=jnp.maximum(lengths, 1),
                                       implementation=implementation)
    group = q.shape[2] // k.shape[2]
    mean_v = jnp.repeat(jnp.mean(v_all.astype(jnp.float32), axis=1), group, axis=1)[:, None]  # [b, 1, h, d]
    return jnp.where((lengths == 0)[:, None, None, None], mean_v.astype(out.dtype), out)


def _local_attention(q: Array, k: Array, v: Array, key_valid: Array, *, layout: TrainingLayout,
                     implementation: str | None, block_q: int, block_k: int) -> Array:
    """Per-device body: q [b, T, h, d]; k, v [b, T, kv, d]; key_valid [b, T] -> [b, T, h, d]."""
    s = layout.seq_len
    qc, kc, vc = q[:, :s], k[:, :s], v[:, :s]  # sliced outside the cond: both branches share them
    lengths, is_suffix = suffix_lengths(key_valid[:, :s])
    blockwise = functools.partial(blockwise_attention, layout=layout, key_valid=key_valid, block_q=block_q,
                                  block_k=block_k)
    clean = jax.lax.cond(is_suffix,
                         lambda: fused_causal(qc, kc, vc, lengths, v, implementation),
                         lambda: blockwise(qc, k, v, q_offset=0))
    if layout.block_size is None:
        return clean
    return jnp.concatenate([clean, blockwise(q[:, s:], k, v, q_offset=s)], axis=1)


def _axis_if_divides(mesh, axes: tuple[str, ...], *sizes: int):
    """`axes` (those in the mesh) as one PartitionSpec entry if their product divides every size, else None."""
    axes = tuple(a for a in axes if a in mesh.axis_names)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return axes if axes and all(size % n == 0 for size in sizes) else None


def hybrid_attention(q: Array, k: Array, v: Array, layout: TrainingLayout, key_valid: Array, *,
                     implementation: str | None = None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> Array:
    """Attention of every row of a training layout: fused causal clean half, blockwise mask half (module docstring).

    q: [b, T, h, d]; k, v: [b, T, kv, d] (T = layout.length, h % kv == 0, one dtype); key_valid: [b, T] bool
    (False = padded key, seen by nobody). Scale d ** -0.5. implementation: the clean half's
    `jax.nn.dot_product_attention` implementation (None: FUSED_IMPLEMENTATION, "cudnn"); block_q / block_k: the
    blockwise tiles. Returns [b, T, h, d] in q's dtype, equal to the dense reference (outputs and gradients).
    """
    t = layout.length
    if q.shape[1] != t or k.shape[1] != t or key_valid.shape != (q.shape[0], t):
        raise ValueError(f"q, k and key_valid must span the layout's {t} tokens, got q {q.shape}, k {k.shape}, "
                         f"key_valid {key_valid.shape}")
    body = functools.partial(_local_attention, layout=layout, block_q=block_q, block_k=block_k,
                             implementation=FUSED_IMPLEMENTATION if implementation is None else implementation)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return body(q, k, v, key_valid)

    batch = _axis_if_divides(mesh, BATCH_AXES, q.shape[0])
    heads = _axis_if_divides(mesh, ("tensor",), q.shape[2], k.shape[2])
    qkv_spec = P(batch, None, heads, None)
    return jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch, None)),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, key_valid)
