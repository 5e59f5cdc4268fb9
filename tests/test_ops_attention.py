"""ops.cached_attention equals jax.nn.dot_product_attention over `[cache | current]` (outputs and gradients), the
cached model forward with it equals the concatenating reference path, and the compiled cached step writes the
donated cache in place (no copy of a cache buffer)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax import masks
from tidar_jax.config import ATTENTION_IMPLS, replace
from tidar_jax.kv_cache import init_cache
from tidar_jax.model import create_model, forward
from tidar_jax.ops import cached_attention
from tidar_jax.ops.attention import DENSE_MAX_COLUMNS

HEAD_DIM, KV_HEADS = 8, 2


def inputs(seed, batch, t, s, group, kv=KV_HEADS):
    """Random q [b, t, kv*group, d], k / v [b, t, kv, d], caches [b, s, kv, d] and a random boolean mask
    [b, t, s + t] in which every row sees itself and cache slots 0 and s-1 are masked for every query."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q = normal(batch, t, kv * group, HEAD_DIM)
    k, v = normal(batch, t, kv, HEAD_DIM), normal(batch, t, kv, HEAD_DIM)
    ck, cv = normal(batch, s, kv, HEAD_DIM), normal(batch, s, kv, HEAD_DIM)
    mask = rng.random((batch, t, s + t)) < 0.5
    mask[:, :, s:] |= np.eye(t, dtype=bool)
    if s:
        mask[:, :, [0, s - 1]] = False
    return q, k, v, ck, cv, jnp.asarray(mask)


def reference(q, k, v, ck, cv, mask):
    keys, values = jnp.concatenate([ck, k], axis=1), jnp.concatenate([cv, v], axis=1)
    return jax.nn.dot_product_attention(q, keys, values, mask=mask[:, None], implementation="xla")


@jax.jit
def both_formulations(q, k, v, ck, cv, mask):
    """The reference and the "grouped" and "dense" forms ("auto" picks one of them, see below)."""
    return reference(q, k, v, ck, cv, mask), [cached_attention(q, k, v, ck, cv, mask, formulation=f)
                                              for f in ("grouped", "dense")]


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("t", [1, 5, 20])
@pytest.mark.parametrize("s", [0, 7, 33])
def test_equals_dot_product_attention(group, t, s):
    batch = 1 + 2 * ((group + t + s) % 2)  # batch 1 and 3 alternate over the grid (each shape compiles once)
    ref, outs = both_formulations(*inputs(100 * group + 10 * t + s, batch, t, s, group))
    for name, out in zip(("grouped", "dense"), outs):
        assert out.shape == ref.shape and out.dtype == ref.dtype
        np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5, err_msg=f"{name}, batch {batch}")


def test_auto_uses_dense_for_few_query_columns():
    q, k, v, ck, cv, mask = inputs(6, 1, 1, 7, 2)
    for f in ("dense", "grouped"):
        q_cols = q if f == "dense" else jnp.tile(q, (1, 1, 1 + DENSE_MAX_COLUMNS // q.shape[2], 1))
        auto = jax.make_jaxpr(lambda *a: cached_attention(*a, formulation="auto"))(q_cols, k, v, ck, cv, mask)
        forced = jax.make_jaxpr(lambda *a: cached_attention(*a, formulation=f))(q_cols, k, v, ck, cv, mask)
        assert str(auto) == str(forced)


def test_mask_broadcast_over_batch_and_fully_masked_row():
    q, k, v, ck, cv, mask = inputs(7, 3, 5, 7, 2)
    shared = mask[:1].at[0, 2].set(False)  # one mask for every row; query 2 sees nothing (uniform, as the ref)
    ref, outs = both_formulations(q, k, v, ck, cv, shared)
    for out in outs:
        np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("formulation", ["grouped", "dense"])
def test_gradients_equal_dot_product_attention(formulation):
    q, k, v, ck, cv, mask = inputs(3, 2, 5, 7, 2)
    weights = jax.random.normal(jax.random.key(0), q.shape)

    def loss(fn, *args):
        return jnp.sum(fn(*args, mask) * weights)

    ours = jax.jit(jax.grad(lambda *a: loss(lambda *b: cached_attention(*b, formulation=formulation), *a),
                            argnums=(0, 1, 2, 3, 4)))(q, k, v, ck, cv)
    ref = jax.jit(jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2, 3, 4)))(q, k, v, ck, cv)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_bfloat16_stays_close_and_keeps_dtype():
    q, k, v, ck, cv, mask = inputs(4, 2, 5, 33, 2)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v, ck, cv)]
    out = jax.jit(cached_attention)(*low, mask)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), reference(q, k, v, ck, cv, mask), atol=0.05)


def test_rejects_bad_shapes():
    q, k, v, ck, cv, mask = inputs(5, 1, 5, 7, 2)
    with pytest.raises(ValueError, match="mask"):
        cached_attention(q, k, v, ck, cv, mask[..., 1:])
    with pytest.raises(ValueError, match="formulation"):
        cached_attention(q, k, v, ck, cv, mask, formulation="flash")


def models(tiny_config, **overrides):
    """(cfg, graphdef of the default "xla" path, graphdef of "xla_reference", shared perturbed params)."""
    cfg = replace(tiny_config, model=overrides).model
    graphdef, params = nnx.split(create_model(cfg, seed=0))
    ref_graphdef, _ = nnx.split(create_model(replace(tiny_config, model={**overrides,
                                                                        "attention_impl": "xla_reference"}).model))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return cfg, graphdef, ref_graphdef, params


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1, "qk_norm": True}])
def test_cached_forward_equals_reference_path(tiny_config, overrides):
    """Prefill into an empty cache, then a TiDAR step (K drafts + K*K mask tokens) at ragged cursors."""
    assert "xla_reference" in ATTENTION_IMPLS
    cfg, graphdef, ref_graphdef, params = models(tiny_config, **overrides)
    k, batch, prompt_len, max_len = cfg.block_size, 2, 9, 32
    tokens = jax.random.randint(jax.random.key(2), (batch, prompt_len), 3, cfg.vocab_size)
    lengths = jnp.array([9, 6])

    def run(gd):
        cache = init_cache(cfg, batch, max_len)
        pre_mask = masks.with_cache(cache.valid_slots(), masks.causal_mask(prompt_len))
        positions = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
        pre, cache = forward(gd, params, tokens, positions, pre_mask, cache, jnp.zeros(batch, jnp.int32),
                             prompt_len)
        cache = cache.rewind_to(lengths)
        step_tokens = jnp.concatenate([tokens[:, :k], jnp.full((batch, k * k), cfg.mask_token_id)], axis=1)
        mask = masks.with_cache(cache.valid_slots(), masks.step_mask(k, True))
        step, cache = forward(gd, params, step_tokens, masks.step_positions(cache.cursor, k, True), mask, cache,
                              cache.cursor, k)
        return pre, step, cache

    ours, ref = jax.jit(run, static_argnums=0)(graphdef), jax.jit(run, static_argnums=0)(ref_graphdef)
    np.testing.assert_allclose(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours[1], ref[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ours[2]), jax.tree.leaves(ref[2])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _cache_copies(hlo: str, cache_shape: str) -> list[str]:
    """Top-level instructions of the compiled entry computation that copy a whole cache-shaped buffer."""
    entry = hlo[hlo.index("\nENTRY"):]
    return [line.strip() for line in entry.split("\n")
            if re.match(rf"\s*%\S+ = f32\[{cache_shape}\]\S* copy\(", line)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("queries", [1, 20])
def test_donated_cache_is_written_in_place(tiny_config, batch, queries):
    """XLA CPU copies a buffer that is read and then updated in place (twice per layer per step): the "xla" path
    writes first and reads after, so the compiled step holds no copy of a cache buffer."""
    cfg, graphdef, _, params = models(tiny_config)
    k = 1 if queries == 1 else cfg.block_size
    max_len = 40

    def step(params, cache, tokens):
        mask = masks.with_cache(cache.valid_slots(), masks.step_mask(k, queries > 1))
        logits, cache = forward(graphdef, params, tokens, masks.step_positions(cache.cursor, k, queries > 1), mask,
                                cache, cache.cursor, k)
        return logits, cache

    cache = init_cache(cfg, batch, max_len)
    hlo = jax.jit(step, donate_argnums=1).lower(params, cache, jnp.ones((batch, queries), jnp.int32)).compile()
    shape = f"{batch},{max_len},{cfg.n_kv_heads},{cfg.head_dim}"
    assert _cache_copies(hlo.as_text(), shape) == []
