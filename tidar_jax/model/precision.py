"""The dtype conventions of the forward: how a low-precision matmul is asked for, and how params are cast once
for inference. One place, so the model's projections, its LM head and the inference entry points agree."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.ops import cpu_kernels

Array = jax.Array


def matmul(equation: str, x: Array, weight: Array, out_dtype=None) -> Array:
    """`einsum(equation, x, weight)` for x [batch, seq, ...] and a weight cast to x's dtype, accumulated and
    returned by the dot in float32, then cast to `out_dtype` (default: x's dtype).

    Asking the dot for a float32 result is what accelerators do internally anyway. On CPUs (AVX-512 bf16 / AMX) it
    selects XLA's fast low-precision kernels, which a bf16-result dot does not use (2-4x slower). A product of at
    most `cpu_kernels.GEMM_MAX_ROWS` rows (a decode step) in the form "x's trailing dims times the weight's leading
    dims" (every projection) runs on the CPU as `cpu_kernels.gemv` (1-2 rows: it streams the weights faster than
    XLA's matrix-vector kernels) or `cpu_kernels.gemm` (more rows: nearer the FMA peak than XLA's dot) when the
    kernels are available (`cpu_kernels.product_kernel`; docs/RESULTS.md section 5); a tied LM head's product
    with the embedding as it lies ("bsd,vd->bsv") on at most `cpu_kernels.MATMUL_NT_MAX_ROWS` rows runs as
    `cpu_kernels.matmul_nt`, which reads the embedding at the bandwidth a plain read reaches. Without the kernels, a
    low-precision dot of a single row is computed on that row twice: XLA upcasts a 1-row bf16 dot weight by weight
    to float32, while 2 rows take its fast kernel."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    w = weight.astype(x.dtype)
    cpu = jax.default_backend() == "cpu"
    if cpu:
        out = _kernel_product(equation, x, w)
        if out is not None:
            return out.astype(out_dtype)
    single_row = x.shape[0] * x.shape[1] == 1 and x.dtype != jnp.float32 and cpu
    if single_row:
        x = jnp.concatenate([x, x], axis=1)
    out = jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)
    return (out[:, :1] if single_row else out).astype(out_dtype)


def _kernel_product(equation: str, x: Array, w: Array) -> Array | None:
    """`einsum(equation, x, w)` in float32 by the CPU product kernel that takes its form and shape (`gemv` /
    `gemm` for "x's trailing dims times w's leading dims", `matmul_nt` for a 2-D weight used transposed), or None
    when none does or the kernels are unavailable."""
    contracted = _contracted_dims(equation)
    if contracted is not None:
        lead, out_shape = x.shape[:x.ndim - contracted], w.shape[contracted:]
        rows, inner, columns = math.prod(lead), math.prod(w.shape[:contracted]), math.prod(out_shape)
        kernel = cpu_kernels.product_kernel(rows, inner, columns, x.dtype, w.dtype)
        operands = (x.reshape(rows, inner), w.reshape(inner, columns))
    elif _transposed_weight(equation):
        lead, out_shape = x.shape[:-1], w.shape[:1]
        kernel = cpu_kernels.transposed_product_kernel(math.prod(lead), x.shape[-1], w.shape[0], x.dtype,
                                                       w.dtype)
        operands = (x.reshape(-1, x.shape[-1]), w)
    else:
        return None
    if kernel is None:
        return None
    return kernel(*operands).reshape(lead + out_shape)


@functools.cache
def _contracted_dims(equation: str) -> int | None:
    """c when `equation` contracts x's last c dims with the weight's first c dims and lists the rest in order
    ("bsd,dhk->bshk": 1, "bshk,hkd->bsd": 2), i.e. it is x.reshape(rows, inner) @ w.reshape(inner, columns);
    else None."""
    inputs, out = equation.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    for c in range(1, min(len(xs), len(ws)) + 1):
        if xs[-c:] == ws[:c] and out == xs[:-c] + ws[c:] and len(set(xs + ws)) == len(xs) + len(ws) - c:
            return c
    return None


@functools.cache
def _transposed_weight(equation: str) -> bool:
    """Whether `equation` contracts x's last dim with the last dim of a 2-D weight and lists the rest in order
    ("bsd,vd->bsv": a tied LM head), i.e. it is x.reshape(rows, d) @ w.T."""
    inputs, out = equation.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    return (len(ws) == 2 and xs[-1] == ws[1] and out == xs[:-1] + ws[0]
            and len(set(xs + ws)) == len(xs) + 1)


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
