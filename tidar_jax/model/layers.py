"""The transformer's layers in Flax NNX: RMSNorm, attention (rotary embedding and query scale from model/rope.py) with
a KV cache write, the MLP and the decoder layer (model/transformer.py stacks them).

With a KV cache, keys are `[cache slots | current tokens]` and the first `n_write` current tokens' K/V are written
into the cache at a per-row slot after attention, so mask tokens (placed after them) never enter the cache. With
`adapter_rank > 0` the projections carry mask-gated low-rank adapters (adapters.py) whose gate is
`tokens == mask_token_id`: real-token rows compute exactly the model without adapters.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.layout.masks import LayoutMask
from tidar_jax.model.adapters import LowRankAdapter, gated
from tidar_jax.model.precision import matmul
from tidar_jax.model.rope import rotary_embedding, scale_queries
from tidar_jax.ops import blockwise_attention, cached_attention, hybrid_attention, splash_attention
from tidar_jax.sharding import BATCH_AXES

Array = jax.Array

# model.attention_impl -> jax.nn.dot_product_attention's implementation ("xla_reference" differs from "xla" only
# with a KV cache, where "xla" uses ops.cached_attention; "blockwise" differs from "xla" only on a structured
# `masks.LayoutMask` without a cache, where it uses ops.blockwise_attention; "splash" and "cudnn_hybrid" use
# ops.splash_attention / ops.hybrid_attention there, and ops.blockwise_attention on a LayoutMask with a cache).
_JAX_ATTENTION_IMPL = {"xla": "xla", "xla_reference": "xla", "cudnn": "cudnn", "blockwise": "xla", "splash": "xla",
                       "cudnn_hybrid": "xla"}
# "auto" never reaches here: Transformer resolves it (`resolved_config`) before building the layers.


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], axes: tuple[str | None, ...],
           dtype: jnp.dtype) -> nnx.Param:
    # eager_sharding=False: logical names are not mesh axes; sharding.py places params under jit instead.
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """`x * rsqrt(mean(x^2) + eps) * scale` computed in float32 (HF Llama/Qwen convention, scale starts at 1)."""

    def __init__(self, dim: int, eps: float, axis_name: str | None, param_dtype, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis_name,), param_dtype)

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def _adapter(cfg: ModelConfig, rngs: nnx.Rngs, in_shape, out_shape, in_axes, out_axes) -> LowRankAdapter | None:
    if cfg.adapter_rank <= 0:
        return None
    return LowRankAdapter(in_shape, out_shape, in_axes, out_axes, cfg.adapter_rank, cfg.adapter_alpha,
                          jnp.dtype(cfg.param_dtype), rngs=rngs)


def _write_rows(buffer: Array, new: Array, start: Array) -> Array:
    """buffer: [batch, max_len, kv_heads, head_dim]; new: [batch, n, kv_heads, head_dim]; start: [batch] slot.

    The caller guarantees start + n <= max_len (dynamic_update_slice would otherwise clamp the start).
    """
    zero = jnp.zeros((), jnp.int32)
    if buffer.shape[0] == 1:
        # One plain update: XLA turns the batch-1 vmap (a scatter) into a select that also reads the old rows,
        # and a read before the in-place write makes it copy the whole buffer.
        return jax.lax.dynamic_update_slice(buffer, new, (zero, start[0].astype(jnp.int32), zero, zero))
    if jax.default_backend() == "cpu" and jnp.issubdtype(buffer.dtype, jnp.floating) and buffer.dtype.itemsize < 4:
        # The batched write below is a scatter, and XLA:CPU computes a 16-bit float scatter in float32: it converts
        # the whole cache to float32 and back in every layer of every step (batch 16 x 640 slots of SmolLM2 in
        # bfloat16: 410 of the forward's 490 ms). A select over the buffer reads and writes it once instead.
        offset = jnp.arange(buffer.shape[1], dtype=jnp.int32)[None, :] - start[:, None].astype(jnp.int32)
        inside = (offset >= 0) & (offset < new.shape[1])  # [batch, max_len]
        rows = jnp.take_along_axis(new, jnp.clip(offset, 0, new.shape[1] - 1)[:, :, None, None], axis=1)
        return jnp.where(inside[:, :, None, None], rows.astype(buffer.dtype), buffer)
    return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice(b, n, (s, zero, zero)))(buffer, new, start)


class Attention(nnx.Module):
    """Grouped-query attention over an explicit boolean mask (dense, or a structured `masks.LayoutMask` that
    attention_impl=blockwise attends with tile by tile), with optional QKV bias (Qwen2) and QK-norm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(cfg.init_std)
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = param(rngs, init, (d, h, hd), ("embed", "heads", "head_dim"), pd)
        self.k_proj = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = param(rngs, init, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = param(rngs, init, (h, hd, d), ("heads", "head_dim", "embed"), pd)
        self.q_adapter = _adapter(cfg, rngs, (d,), (h, hd), ("embed",), ("heads", "head_dim"))
        self.k_adapter = _adapter(cfg, rngs, (d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"))
        self.v_adapter = _adapter(cfg, rngs, (d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"))
        self.o_adapter = _adapter(cfg, rngs, (h, hd), (d,), ("heads", "head_dim"), ("embed",))
        if cfg.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = param(rngs, zeros, (h, hd), ("heads", "head_dim"), pd)
            self.k_bias = param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"), pd)
            self.v_bias = param(rngs, zeros, (kv, hd), ("kv_heads", "head_dim"), pd)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", pd, rngs=rngs)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, "head_dim", pd, rngs=rngs)

    def _project(self, x: Array, kernel: nnx.Param, bias_name: str, adapter: LowRankAdapter | None,
                 gate: Array | None) -> Array:
        dt = x.dtype
        out = matmul("bsd,dhk->bshk", x, kernel[...])
        if self.cfg.qkv_bias:
            out = out + getattr(self, bias_name)[...].astype(dt)
        return gated(out, x, adapter, gate)

    def __call__(self, x: Array, positions: Array, mask: Array | LayoutMask, cache_kv: tuple[Array, Array] | None,
                 write_start: Array | None, n_write: int,
                 gate: Array | None = None) -> tuple[Array, tuple[Array, Array] | None]:
        """x: [batch, q, d_model]; positions: [batch, q]; mask: [batch or 1, q, keys] bool where keys is
        `max_len + q` with a cache (cache slots first) and `q` without, or a `masks.LayoutMask` (the q tokens are
        its layout's last q rows; with a cache its first T - q keys are cache slots 0..T-q-1): "blockwise",
        "splash" and "cudnn_hybrid" attend with its structure (ops.blockwise_attention / ops.splash_attention /
        ops.hybrid_attention without a cache, ops.blockwise_attention with one), the others with its
        `dense(max_len, q)` form; cache_kv: ([batch, max_len, kv_heads, head_dim],) * 2 or None; write_start:
        [batch] slot where the first `n_write` tokens' K/V go; gate: [batch, q] bool rows that get the adapters
        (None: no adapters).

        Returns ([batch, q, d_model], updated cache_kv or None).
        """
        cfg = self.cfg
        q = self._project(x, self.q_proj, "q_bias", self.q_adapter, gate)
        k = self._project(x, self.k_proj, "k_bias", self.k_adapter, gate)
        v = self._project(x, self.v_proj, "v_bias", self.v_adapter, gate)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = scale_queries(rotary_embedding(q, positions, cfg), positions, cfg)
        k = rotary_embedding(k, positions, cfg)
        out, new_cache = self._attend(q, k, v, mask, cache_kv, write_start, n_write)
        projected = matmul("bshk,hkd->bsd", out, self.o_proj[...])
        return gated(projected, out, self.o_adapter, gate), new_cache

    def _attend(self, q: Array, k: Array, v: Array, mask: Array | LayoutMask, cache_kv: tuple[Array, Array] | None,
                write_start: Array | None, n_write: int) -> tuple[Array, tuple[Array, Array] | None]:
        """Attention of the roped q [batch, q, heads, head_dim] over k / v [batch, q, kv_heads, head_dim] (and the
        cache) under `cfg.attention_impl`, writing the first `n_write` tokens' K/V (see `__call__`).
        Returns ([batch, q, heads, head_dim], updated cache_kv or None)."""
        cfg = self.cfg
        if isinstance(mask, LayoutMask):
            if cfg.attention_impl == "splash" and cache_kv is None:
                return splash_attention(q, k, v, mask.layout, mask.key_valid), None
            if cfg.attention_impl == "cudnn_hybrid" and cache_kv is None and mask.layout.window is None:
                # Its cuDNN clean half is plainly causal: a windowed layout runs blockwise instead (exact).
                return hybrid_attention(q, k, v, mask.layout, mask.key_valid), None
            if cfg.attention_impl in ("blockwise", "splash", "cudnn_hybrid"):
                return self._blockwise(q, k, v, mask, cache_kv, write_start, n_write)
            mask = mask.dense(None if cache_kv is None else cache_kv[0].shape[1], q.shape[1])
        if cache_kv is None:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :],
                                               implementation=_JAX_ATTENTION_IMPL[cfg.attention_impl])
            return out, None
        if cfg.attention_impl in ("xla", "blockwise", "splash", "cudnn_hybrid"):
            # Write first, then attend to the written cache and the current block separately (ops/attention.py).
            # The mask hides the written slots' cache columns (they lie at or past every reading row's cursor), so
            # this equals attending to the old cache; reading the old buffers before an in-place write instead makes
            # XLA copy every cache buffer (twice on CPU) on each step.
            cache_k, cache_v = cache_kv
            if n_write > 0:
                cache_k = _write_rows(cache_k, k[:, :n_write].astype(cache_k.dtype), write_start)
                cache_v = _write_rows(cache_v, v[:, :n_write].astype(cache_v.dtype), write_start)
            return cached_attention(q, k, v, cache_k, cache_v, mask), (cache_k, cache_v)
        # The reference: attend to [old cache | current] concatenated, then write.
        cache_k, cache_v = cache_kv
        keys = jnp.concatenate([cache_k.astype(k.dtype), k], axis=1)
        values = jnp.concatenate([cache_v.astype(v.dtype), v], axis=1)
        new_cache = cache_kv
        if n_write > 0:
            new_cache = (_write_rows(cache_k, k[:, :n_write].astype(cache_k.dtype), write_start),
                         _write_rows(cache_v, v[:, :n_write].astype(cache_v.dtype), write_start))
        out = jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None, :, :],
                                           implementation=_JAX_ATTENTION_IMPL[cfg.attention_impl])
        return out, new_cache

    @staticmethod
    def _blockwise(q: Array, k: Array, v: Array, mask: LayoutMask, cache_kv: tuple[Array, Array] | None,
                   write_start: Array | None, n_write: int) -> tuple[Array, tuple[Array, Array] | None]:
        """ops.blockwise_attention of the layout's last q rows; its first `T - q` keys are cache slots (see
        `masks.LayoutMask`), read before the first `n_write` tokens' K/V are written at `write_start`."""
        n_cached = mask.layout.length - q.shape[1]
        if cache_kv is None:
            return blockwise_attention(q, k, v, mask.layout, mask.key_valid), None
        cache_k, cache_v = cache_kv
        keys = jnp.concatenate([cache_k[:, :n_cached].astype(k.dtype), k], axis=1)
        values = jnp.concatenate([cache_v[:, :n_cached].astype(v.dtype), v], axis=1)
        out = blockwise_attention(q, keys, values, mask.layout, mask.key_valid, q_offset=n_cached)
        if n_write > 0:
            cache_kv = (_write_rows(cache_k, k[:, :n_write].astype(cache_k.dtype), write_start),
                        _write_rows(cache_v, v[:, :n_write].astype(cache_v.dtype), write_start))
        return out, cache_kv


def _batch_sharded(x: Array) -> Array:
    """x: [batch, ...] pinned to the batch mesh axes when traced under a mesh (`jax.set_mesh`), else unchanged.

    Without it the SPMD partitioner gathered the whole global batch's MLP activations on every fsdp device instead
    of gathering the fsdp-sharded weights (the CPU plan of qwen2.5-1.5b: [8, 8192, 8960] float32 buffers in every
    layer, 2x the temp memory; docs/RESULTS.md section 3)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); input and output batch-sharded under a mesh (`_batch_sharded`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        init = nnx.initializers.normal(cfg.init_std)
        self.gate_proj = param(rngs, init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), pd)
        self.up_proj = param(rngs, init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), pd)
        self.down_proj = param(rngs, init, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), pd)
        d, ff = cfg.d_model, cfg.d_ff
        self.gate_adapter = _adapter(cfg, rngs, (d,), (ff,), ("embed",), ("mlp",))
        self.up_adapter = _adapter(cfg, rngs, (d,), (ff,), ("embed",), ("mlp",))
        self.down_adapter = _adapter(cfg, rngs, (ff,), (d,), ("mlp",), ("embed",))

    def __call__(self, x: Array, rows: Array | None = None) -> Array:
        """x: [batch, seq, d_model]; rows: [batch, seq] bool adapter gate (None: no adapters)."""
        x = _batch_sharded(x)
        gate = gated(matmul("bsd,df->bsf", x, self.gate_proj[...]), x, self.gate_adapter, rows)
        up = gated(matmul("bsd,df->bsf", x, self.up_proj[...]), x, self.up_adapter, rows)
        hidden = jax.nn.silu(gate) * up
        return _batch_sharded(gated(matmul("bsf,fd->bsd", hidden, self.down_proj[...]), hidden, self.down_adapter,
                                    rows))


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, "embed", pd, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, "embed", pd, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, positions, mask, cache_kv, write_start, n_write, gate=None):
        attn_out, cache_kv = self.attn(self.input_norm(x), positions, mask, cache_kv, write_start, n_write, gate)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x), gate)
        return x, cache_kv
