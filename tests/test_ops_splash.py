"""ops.splash_attention (TPU Pallas Splash with the TiDAR computable mask, in interpret mode on CPU) equals the dense
masked `jax.nn.dot_product_attention` on every valid query row, in outputs and gradients, alone and under a mesh
(`shard_map` over batch and heads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.layout import masks
from tidar_jax.layout.masks import TrainingLayout
from tidar_jax.ops.splash import LayoutSplashMask, splash_attention

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def layout_inputs(seed, batch, seq_len, block_size):
    """q / k / v for the layout, key_valid with the second row right-padded, and the dense reference mask."""
    rng = np.random.default_rng(seed)
    length = seq_len if block_size is None else 2 * seq_len
    q = jnp.asarray(rng.standard_normal((batch, length, HEADS, HEAD_DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((batch, length, KV_HEADS, HEAD_DIM)), jnp.float32) for _ in range(2))
    real = np.arange(seq_len)[None] < np.array([seq_len] + [seq_len - 37] * (batch - 1))[:, None]
    key_valid = jnp.asarray(real if block_size is None else np.concatenate([real, real], axis=1))
    base = masks.causal_mask(seq_len) if block_size is None else masks.training_mask(seq_len, block_size)
    return q, k, v, key_valid, masks.with_key_padding(base, key_valid)


@pytest.mark.parametrize("seq_len, block_size, block",
                         [(128, 4, 128), (256, None, 128), (192, 16, 128), (96, 4, 128), (128, 4, 64)])
def test_equals_dense_on_valid_rows_with_gradients(seq_len, block_size, block):
    q, k, v, key_valid, dense_mask = layout_inputs(seq_len + (block_size or 0), 2, seq_len, block_size)
    length = 2 * seq_len if block_size else seq_len
    if length % min(block, length) or block % 128:
        with pytest.raises(ValueError, match="multiple of its block"):
            splash_attention(q, k, v, TrainingLayout(seq_len, block_size), key_valid, block=block)
        return
    # Weights zero on padded query rows: the loss never reads them (see ops/splash.py).
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    weights = weights * key_valid[:, :, None, None]

    def dense_loss(q, k, v):
        return jnp.sum(jax.nn.dot_product_attention(q, k, v, mask=dense_mask[:, None]) * weights)

    def splash_loss(q, k, v):
        out = splash_attention(q, k, v, TrainingLayout(seq_len, block_size), key_valid, block=block)
        return jnp.sum(out * weights)

    ref_loss, ref_grads = jax.value_and_grad(dense_loss, argnums=(0, 1, 2))(q, k, v)
    loss, grads = jax.jit(jax.value_and_grad(splash_loss, argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name, got, want in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"d{name}")


def test_sharded_over_batch_and_heads_equals_unsharded():
    q, k, v, key_valid, dense_mask = layout_inputs(3, 2, 128, 8)
    fn = jax.jit(lambda q, k, v: splash_attention(q, k, v, TrainingLayout(128, 8), key_valid, block=128))
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        sharded = fn(q, k, v)
    ref = jax.nn.dot_product_attention(q, k, v, mask=dense_mask[:, None])
    valid = key_valid[:, :, None, None]
    np.testing.assert_allclose(sharded * valid, ref * valid, atol=2e-6)


def test_mask_matches_the_dense_masks_and_hashes_by_layout():
    mask = LayoutSplashMask(TrainingLayout(12, 3))
    np.testing.assert_array_equal(mask[0:24, 0:24], np.asarray(masks.training_mask(12, 3)))
    np.testing.assert_array_equal(mask[6:18, 3:21], np.asarray(masks.training_mask(12, 3))[6:18, 3:21])
    np.testing.assert_array_equal(LayoutSplashMask(TrainingLayout(10))[0:10, 0:10], np.asarray(masks.causal_mask(10)))
    same = LayoutSplashMask(TrainingLayout(12, 3))
    assert mask == same and hash(mask) == hash(same)
    assert mask != LayoutSplashMask(TrainingLayout(12, 4))
