"""Shared inputs and checks of the attention-op tests (test_ops_blockwise.py, test_ops_hybrid.py): random q / k / v,
the structured layout masks, and outputs + gradients compared against a reference."""

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.layout import masks


def layout_mask(valid, block_size):
    """masks.LayoutMask of clean key_valid [batch, S]: plain causal when block_size is None, else TiDAR."""
    valid = jnp.asarray(valid)
    return masks.causal_layout_mask(valid) if block_size is None else masks.tidar_layout_mask(valid, block_size)


def inputs(seed, batch, n_tokens, heads, kv, head_dim=8, dtype=jnp.float32):
    """(q [b, n, h, d], k, v [b, n, kv, d], w [b, n, h, d]): standard normal; w weights the output's gradient."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    return (normal(batch, n_tokens, heads, head_dim), normal(batch, n_tokens, kv, head_dim),
            normal(batch, n_tokens, kv, head_dim), normal(batch, n_tokens, heads, head_dim))


def outputs_and_grads(fn, q, k, v, w):
    """fn(q, k, v) and the gradient of the linear functional sum(fn * w) wrt q, k, v, jitted."""
    return jax.jit(lambda *a: (fn(*a), jax.grad(lambda *b: jnp.sum(fn(*b) * w), argnums=(0, 1, 2))(*a)))(q, k, v)


def assert_outputs_and_grads_close(got, want, out_atol=2e-6, grad_atol=1e-5):
    """got / want: (output, (dq, dk, dv)) from `outputs_and_grads`; same shape and dtype, finite, close."""
    (out, grads), (ref, ref_grads) = got, want
    assert out.shape == ref.shape and out.dtype == ref.dtype
    np.testing.assert_allclose(out, ref, atol=out_atol, rtol=1e-5)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert np.isfinite(np.asarray(g)).all(), name
        np.testing.assert_allclose(g, r, atol=grad_atol, rtol=1e-5, err_msg=name)
