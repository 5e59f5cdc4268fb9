"""The dtype conventions of the forward: how a low-precision matmul is asked for, and how params are cast once
for inference. One place, so the model's projections, its LM head and the inference entry points agree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tidar_jax.config import ModelConfig

Array = jax.Array


def matmul(equation: str, x: Array, weight: Array, out_dtype=None) -> Array:
    """`einsum(equation, x, weight)` for x [batch, seq, ...] and a weight cast to x's dtype, accumulated and
    returned by the dot in float32, then cast to `out_dtype` (default: x's dtype).

    Asking the dot for a float32 result is what accelerators do internally anyway. On CPUs (AVX-512 bf16 / AMX) it
    selects XLA's fast low-precision kernels, which a bf16-result dot does not use (2-4x slower); and a low-precision
    dot of a single row (batch 1, one query token) is there upcast weight by weight to float32, so on the CPU
    backend such a dot is computed on that row twice (2 rows take the fast kernel; measured in docs/RESULTS.md)."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    w = weight.astype(x.dtype)
    single_row = x.shape[0] * x.shape[1] == 1 and x.dtype != jnp.float32 and jax.default_backend() == "cpu"
    if single_row:
        x = jnp.concatenate([x, x], axis=1)
    out = jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)
    return (out[:, :1] if single_row else out).astype(out_dtype)


def inference_dtype(dtype, ndim: int, cfg: ModelConfig):
    """The dtype `inference_params` gives a param of `dtype` and rank `ndim`: `cfg.compute_dtype` for floating
    params of rank >= 2, which every forward casts to that dtype before use; otherwise `dtype` unchanged."""
    return jnp.dtype(cfg.compute_dtype) if jnp.issubdtype(dtype, jnp.floating) and ndim >= 2 else jnp.dtype(dtype)


def inference_params(params: nnx.State, cfg: ModelConfig) -> nnx.State:
    """`params` with every floating param of rank >= 2 (weight matrices, embeddings, biases [heads, head_dim],
    adapters) in `cfg.compute_dtype` (`inference_dtype`); rank-1 params (norm scales, read in float32) are kept.
    A forward gives the same numbers on either, and on the cast params a low-precision step reads half the weight
    bytes instead of converting float32 weights on every call. Returns new arrays (placed like the old ones);
    `params` is unchanged."""
    return jax.tree.map(lambda x: x.astype(inference_dtype(x.dtype, x.ndim, cfg)), params)
