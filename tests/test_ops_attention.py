"""ops.cached_attention equals jax.nn.dot_product_attention over `[cache | current]` (outputs and gradients), also
when it reads only the filled cache chunks (any fill, ragged across rows, all-masked rows, sharded caches, one
compiled program for every fill), the cached model forward with it equals the concatenating reference path, and the
compiled cached step writes the donated cache in place (no copy of a cache buffer)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax.config import ATTENTION_IMPLS, MeshConfig, replace
from tidar_jax.layout import masks
from tidar_jax.model.kv_cache import init_cache
from tidar_jax.model.transformer import create_model, forward
from tidar_jax.ops import cached_attention
from tidar_jax.ops.attention import CHUNK, DENSE_MAX_COLUMNS, filled_slots, windows
from tidar_jax.sharding import make_mesh

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

    chunked = lambda *b: cached_attention(*b, formulation=formulation, chunk=2)  # noqa: E731  (windows 2, 4, 7)
    ours = jax.jit(jax.grad(lambda *a: loss(chunked, *a),
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


SMALL_CHUNK = 8


def ragged_inputs(seed, fills, t, s, group=2, dtype=jnp.float32):
    """`inputs` with a [b, t, s + t] mask in which row r sees no cache slot >= fills[r] (a random subset below)."""
    q, k, v, ck, cv, mask = inputs(seed, len(fills), t, s, group)
    mask = np.array(mask)
    mask[:, :, :s] |= np.random.default_rng(seed).random((len(fills), t, s)) < 0.3
    for row, fill in enumerate(fills):
        mask[row, :, fill:s] = False
        if fill:
            mask[row, 0, fill - 1] = True  # slot fill - 1 is really the last one a row sees
    return (*(x.astype(dtype) for x in (q, k, v, ck, cv)), jnp.asarray(mask))


@jax.jit
def chunked_and_reference(q, k, v, ck, cv, mask):
    """jax.nn.dot_product_attention in float32, cached_attention over the whole cache and over the fill's window
    in both formulations (windows of SMALL_CHUNK, 2 SMALL_CHUNK, ... slots)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ck, cv)]
    return (reference(*f32, mask), cached_attention(q, k, v, ck, cv, mask, chunk=0),
            [cached_attention(q, k, v, ck, cv, mask, formulation=f, chunk=SMALL_CHUNK) for f in ("grouped", "dense")])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("s", [3 * SMALL_CHUNK + 3, 4 * SMALL_CHUNK])
@pytest.mark.parametrize("fill", [0, 1, SMALL_CHUNK - 1, SMALL_CHUNK, SMALL_CHUNK + 1, 2 * SMALL_CHUNK,
                                  2 * SMALL_CHUNK + 1, "S"])
def test_filled_window_equals_dot_product_attention(dtype, s, fill):
    """Fills 0, 1, C-1, C, C+1, 2C, 2C+1 and S on both sides of each window's end (windows C, 2C, 4C or 3C + 3),
    ragged over the batch (rows filled to fill, fill - 5 and fill // 3)."""
    assert windows(s, SMALL_CHUNK) == (SMALL_CHUNK, 2 * SMALL_CHUNK, s)
    fill = s if fill == "S" else fill
    fills = [fill, max(fill - 5, 0), fill // 3]
    q, k, v, ck, cv, mask = ragged_inputs(fill + s, fills, 5, s, dtype=dtype)
    assert int(filled_slots(mask[..., :s])) == fill
    ref, unchunked, outs = chunked_and_reference(q, k, v, ck, cv, mask)
    f32 = dtype == jnp.float32
    for name, out in zip(("grouped", "dense"), outs):
        assert out.shape == ref.shape and out.dtype == dtype
        np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=2e-6 if f32 else 0.05, rtol=1e-5 if f32 else 0,
                                   err_msg=name)
        np.testing.assert_allclose(out.astype(jnp.float32), unchunked.astype(jnp.float32),
                                   atol=2e-6 if f32 else 0.02, rtol=1e-5 if f32 else 0, err_msg=name)


@pytest.mark.parametrize("fill", [0, SMALL_CHUNK + 1])
def test_filled_window_rows_with_every_key_masked(fill):
    """A row that sees nothing averages every value, the unfilled cache slots' too (as the reference does), so the
    op must then read the whole cache although the other rows' fill is small."""
    s = 4 * SMALL_CHUNK + 3
    q, k, v, ck, cv, mask = ragged_inputs(9, [fill, 1, 0], 5, s)
    mask = mask.at[1, 2].set(False).at[2].set(False)  # row 1's query 2 and all of row 2 see no key
    ref, _, outs = chunked_and_reference(q, k, v, ck, cv, mask)
    for out in outs:
        np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(outs[0][2], jnp.broadcast_to(
        jnp.repeat(jnp.concatenate([cv[2], v[2]]).mean(0), 2, axis=0), outs[0][2].shape), atol=1e-5)


def test_filled_window_does_not_read_slots_past_the_window():
    """Slots past the fill's window hold NaN (the whole-cache pass would give NaN: 0 * NaN in the value matmul);
    the window's result is finite and equals the reference on a cache with those slots zeroed."""
    s = 4 * SMALL_CHUNK
    q, k, v, ck, cv, mask = ragged_inputs(12, [SMALL_CHUNK - 1, 2, 0], 5, s)
    past = (jnp.arange(s) >= SMALL_CHUNK)[None, :, None, None]
    out = jax.jit(lambda *a: cached_attention(*a, chunk=SMALL_CHUNK))(
        q, k, v, jnp.where(past, jnp.nan, ck), jnp.where(past, jnp.nan, cv), mask)
    np.testing.assert_allclose(out, reference(q, k, v, jnp.where(past, 0, ck), jnp.where(past, 0, cv), mask),
                               atol=2e-6, rtol=1e-5)


def test_filled_window_compiles_once_for_every_fill():
    traces = []

    @jax.jit
    def attend(*args):
        traces.append(1)
        return cached_attention(*args, chunk=SMALL_CHUNK)

    s = 4 * SMALL_CHUNK
    for fill in (1, s, 2 * SMALL_CHUNK + 3):
        q, k, v, ck, cv, mask = ragged_inputs(fill, [fill, fill // 2, 0], 5, s)
        np.testing.assert_allclose(attend(q, k, v, ck, cv, mask), reference(q, k, v, ck, cv, mask), atol=2e-6,
                                   rtol=1e-5)
    assert len(traces) == 1 and attend._cache_size() == 1


@pytest.mark.parametrize("formulation", ["grouped", "dense"])
def test_filled_window_with_sharded_cache(formulation):
    """Rows over `data`, KV heads over `tensor` (as sharding.py lays out a decode cache): equals one device."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    s = 4 * SMALL_CHUNK + 3
    args = ragged_inputs(11, [SMALL_CHUNK + 1, 3, 2 * SMALL_CHUNK, 0], 5, s)
    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, "tensor", None))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None, None))
    sharded = [jax.device_put(x, heads) for x in args[:5]] + [jax.device_put(args[5], rows)]
    attend = jax.jit(lambda *a: cached_attention(*a, formulation=formulation, chunk=SMALL_CHUNK))
    out = attend(*sharded)
    assert out.sharding.shard_shape(out.shape)[2] == out.shape[2] // 2  # heads stay split: no gather of the cache
    np.testing.assert_allclose(out, reference(*args), atol=2e-6, rtol=1e-5)


def test_rejects_bad_shapes():
    q, k, v, ck, cv, mask = inputs(5, 1, 5, 7, 2)
    with pytest.raises(ValueError, match="mask"):
        cached_attention(q, k, v, ck, cv, mask[..., 1:])
    with pytest.raises(ValueError, match="formulation"):
        cached_attention(q, k, v, ck, cv, mask, formulation="flash")
    with pytest.raises(ValueError, match="chunk"):
        cached_attention(q, k, v, ck, cv, mask, chunk=-1)


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


@pytest.mark.parametrize("max_len", [40, 2 * CHUNK + 40])  # the second switches over cache windows
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("queries", [1, 20])
def test_donated_cache_is_written_in_place(tiny_config, batch, queries, max_len):
    """XLA CPU copies a buffer that is read and then updated in place (twice per layer per step): the "xla" path
    writes first and reads after, so the compiled step holds no copy of a cache buffer."""
    cfg, graphdef, _, params = models(tiny_config)
    k = 1 if queries == 1 else cfg.block_size

    def step(params, cache, tokens):
        mask = masks.with_cache(cache.valid_slots(), masks.step_mask(k, queries > 1))
        logits, cache = forward(graphdef, params, tokens, masks.step_positions(cache.cursor, k, queries > 1), mask,
                                cache, cache.cursor, k)
        return logits, cache

    cache = init_cache(cfg, batch, max_len)
    hlo = jax.jit(step, donate_argnums=1).lower(params, cache, jnp.ones((batch, queries), jnp.int32)).compile()
    shape = f"{batch},{max_len},{cfg.n_kv_heads},{cfg.head_dim}"
    assert _cache_copies(hlo.as_text(), shape) == []
