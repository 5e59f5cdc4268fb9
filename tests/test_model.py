"""Model behaviour: the hybrid layout never leaks mask tokens into the AR half, the cache path equals a full
recompute, and remat / bf16 / logical axes behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax.config import replace
from tidar_jax.layout import masks
from tidar_jax.model.kv_cache import init_cache
from tidar_jax.model.precision import inference_params, matmul
from tidar_jax.model.transformer import Transformer, count_params, create_model, forward

VARIANTS = {
    "llama": {},
    "qwen2": {"qkv_bias": True},
    "qwen3-untied": {"qk_norm": True, "tie_embeddings": False},
}


def build(tiny_config, **model_overrides):
    """Tiny model with every parameter perturbed, so biases and norm scales are not at their trivial init."""
    cfg = replace(tiny_config, model=model_overrides).model
    graphdef, params = nnx.split(create_model(cfg, seed=0))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(42), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return cfg, graphdef, jax.tree.unflatten(treedef, leaves)


def causal_logits(graphdef, params, tokens):
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    return forward(graphdef, params, tokens, positions, masks.causal_mask(seq)[None])[0]


def training_logits(graphdef, params, tokens, cfg):
    seq = tokens.shape[1]
    inputs = masks.training_inputs(tokens, cfg.mask_token_id)
    positions = jnp.broadcast_to(masks.training_positions(seq), inputs.shape)
    return forward(graphdef, params, inputs, positions, masks.training_mask(seq, cfg.block_size)[None])[0]


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v == "llama" else v
                                     for v in sorted(VARIANTS)])
def test_clean_half_equals_plain_causal_forward(tiny_config, variant):
    cfg, graphdef, params = build(tiny_config, **VARIANTS[variant])
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 3, cfg.vocab_size)
    hybrid = training_logits(graphdef, params, tokens, cfg)
    assert hybrid.shape == (2, 32, cfg.vocab_size) and hybrid.dtype == jnp.float32
    np.testing.assert_allclose(hybrid[:, :16], causal_logits(graphdef, params, tokens), atol=1e-5, rtol=1e-5)


def test_mask_block_sees_only_the_prefix_before_it(tiny_config):
    cfg, graphdef, params = build(tiny_config)
    seq, block = 16, cfg.block_size
    tokens = jax.random.randint(jax.random.key(2), (1, seq), 3, cfg.vocab_size)
    base = training_logits(graphdef, params, tokens, cfg)
    target_block = 2  # mask positions 8..11 may see clean 0..7 only
    later = tokens.at[0, target_block * block].set((tokens[0, target_block * block] + 1) % cfg.vocab_size)
    earlier = tokens.at[0, target_block * block - 1].set((tokens[0, target_block * block - 1] + 1) % cfg.vocab_size)
    cols = slice(seq + target_block * block, seq + (target_block + 1) * block)
    np.testing.assert_allclose(training_logits(graphdef, params, later, cfg)[:, cols], base[:, cols], atol=1e-6)
    assert np.abs(training_logits(graphdef, params, earlier, cfg)[:, cols] - base[:, cols]).max() > 1e-4


@pytest.mark.parametrize("variant", [pytest.param("llama", marks=pytest.mark.slow), "qwen3-untied"])
def test_cached_prefill_and_step_equal_full_recompute(tiny_config, variant):
    cfg, graphdef, params = build(tiny_config, **VARIANTS[variant])
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 3, cfg.vocab_size)
    full = causal_logits(graphdef, params, tokens)
    cache = init_cache(cfg, batch_size=2, max_len=24)
    lengths = jnp.array([9, 6])  # ragged: row 1's prompt is shorter, its padded slots are never attended
    prompt = jnp.where(jnp.arange(9)[None] < lengths[:, None], tokens[:, :9], 0)
    pre_mask = masks.with_cache(cache.valid_slots(), masks.causal_mask(9))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    pre_logits, cache = forward(graphdef, params, prompt, positions, pre_mask, cache, jnp.zeros(2, jnp.int32), 9)
    np.testing.assert_allclose(pre_logits[0], full[0, :9], atol=1e-5)
    np.testing.assert_allclose(pre_logits[1, :6], full[1, :6], atol=1e-5)
    cache = cache.rewind_to(lengths)
    step_tokens = jnp.stack([tokens[0, 9:12], tokens[1, 6:9]])
    step_mask = masks.with_cache(cache.valid_slots(), masks.step_mask(3, with_proposals=False))
    step_logits, cache = forward(graphdef, params, step_tokens, masks.step_positions(cache.cursor, 3, False),
                                 step_mask, cache, cache.cursor, 3)
    np.testing.assert_allclose(step_logits[0], full[0, 9:12], atol=1e-5)
    np.testing.assert_allclose(step_logits[1], full[1, 6:9], atol=1e-5)


@pytest.mark.slow  # ~17 s (default suite under 10 min on 2 cores)
def test_remat_changes_neither_logits_nor_gradients(tiny_config):
    cfg, graphdef, params = build(tiny_config)
    remat_graphdef, _ = nnx.split(create_model(replace(tiny_config, model={"remat": True}).model))
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 3, cfg.vocab_size)

    def loss(p, g):
        return jnp.mean(jax.nn.log_softmax(causal_logits(g, p, tokens))[..., 5])

    (v0, g0), (v1, g1) = (jax.value_and_grad(loss)(params, g) for g in (graphdef, remat_graphdef))
    np.testing.assert_allclose(v0, v1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_stays_close_to_fp32(tiny_config):
    cfg, graphdef, params = build(tiny_config)
    bf16_graphdef, _ = nnx.split(create_model(replace(tiny_config, model={"compute_dtype": "bfloat16"}).model))
    tokens = jax.random.randint(jax.random.key(5), (1, 8), 3, cfg.vocab_size)
    ref, low = causal_logits(graphdef, params, tokens), causal_logits(bf16_graphdef, params, tokens)
    assert low.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(ref - low))) < 0.1 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_inference_params_cast_once_give_the_same_bf16_forward(tiny_config):
    cfg, _, params = build(tiny_config, qkv_bias=True, qk_norm=True, compute_dtype="bfloat16")
    graphdef, _ = nnx.split(create_model(cfg))
    cast = inference_params(params, cfg)
    kinds = {jax.tree_util.keystr(path): (leaf.ndim, leaf.dtype) for path, leaf in jax.tree.leaves_with_path(cast)}
    assert all(dt == (jnp.bfloat16 if ndim >= 2 else jnp.float32) for ndim, dt in kinds.values()), kinds
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))  # the input is left alone
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 3, cfg.vocab_size)
    np.testing.assert_array_equal(causal_logits(graphdef, cast, tokens), causal_logits(graphdef, params, tokens))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_projection_matmul_of_one_row_equals_that_row_of_a_batch(dtype):
    """The single-row low-precision dot takes another code path on CPU (computed on a duplicated row); each row's
    result must not depend on which path or how many rows it came with, and must match a float32 reference."""
    x = jax.random.normal(jax.random.key(0), (1, 5, 64)).astype(dtype)
    w = jax.random.normal(jax.random.key(1), (64, 96)) / 8.0
    batched = matmul("bsd,df->bsf", x, w)
    one = matmul("bsd,df->bsf", x[:, 2:3], w)
    assert one.dtype == batched.dtype == dtype and one.shape == (1, 1, 96)
    np.testing.assert_allclose(np.asarray(one, np.float32), np.asarray(batched[:, 2:3], np.float32), rtol=1e-2,
                               atol=1e-2)
    ref = x.astype(jnp.float32)[:, 2:3] @ w.astype(dtype).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(one, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)
    logits = matmul("bsd,df->bsf", x[:, 2:3], w, out_dtype=jnp.float32)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_param_has_logical_axes_of_its_rank(tiny_config, variant):
    cfg = replace(tiny_config, model=VARIANTS[variant]).model
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    allowed = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab"}
    for var in variables:
        axes = var.get_metadata()["out_sharding"]
        assert len(axes) == len(var.get_value().shape) and set(axes) <= allowed
    d, ff, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    per_layer = 2 * d + d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * ff
    per_layer += cfg.qkv_bias * cfg.head_dim * (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.qk_norm * 2 * cfg.head_dim
    expected = V * d * (1 if cfg.tie_embeddings else 2) + d + cfg.n_layers * per_layer
    assert count_params(state) == expected


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_cache_rows_written_at_each_rows_own_slot(dtype, batch):
    """_write_rows: every batch row's new K/V rows land at its own start slot and nothing else changes, whichever
    form the write takes (one update at batch 1; on the CPU a select for 16-bit caches, which XLA:CPU would
    otherwise scatter in float32 over the whole buffer; a scatter elsewhere)."""
    from tidar_jax.model.layers import _write_rows

    rng = np.random.default_rng(batch)
    buffer = jnp.asarray(rng.standard_normal((batch, 12, 2, 4)), dtype)
    new = jnp.asarray(rng.standard_normal((batch, 3, 2, 4)), jnp.float32).astype(dtype)
    start = jnp.asarray([5, 0, 9][:batch], jnp.int32)
    out = jax.jit(_write_rows)(buffer, new, start)
    expected = np.asarray(buffer).copy()
    for b, s in enumerate(np.asarray(start)):
        expected[b, s:s + 3] = np.asarray(new[b])
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out), expected)
    hlo = jax.jit(_write_rows).lower(buffer, new, start).compile().as_text()
    assert "scatter" not in hlo or dtype == jnp.float32
