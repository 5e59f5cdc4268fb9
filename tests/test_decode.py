"""Jitted TiDAR / AR decoding against independent references.

Two tiny models share one architecture (so compiled programs are shared): random weights (drafts almost never
accepted) and a model trained for a few seconds on a Markov chain with the joint TiDAR loss (drafts often accepted,
so multi-token steps happen). References: AR greedy decoding (the lossless anchor), full causal recomputes without
a cache, a plain Python loop over single steps, a prefill over the committed tokens, and exact distributions.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from markov import CHAIN_STATES, SUCCESSORS, scaled_random_model, trained_model

from tidar_jax import config as config_lib
from tidar_jax.decoding import decode, generation, sampling
from tidar_jax.decoding.spec import DecodeSpec
from tidar_jax.decoding.generation import Generator
from tidar_jax.layout import masks
from tidar_jax.model.kv_cache import init_cache
from tidar_jax.model.transformer import create_model, forward

RAGGED = [[3, 4, 5], [7, 3, 9, 4, 10, 5, 6, 8, 3, 9, 4, 7, 5], [9, 8, 7, 6, 5, 4, 3]]  # bucket 16
MAX_NEW = 12


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return config_lib.replace(tiny_config, decode={"prompt_buckets": (8, 16), "max_cache_len": 32,
                                                   "max_new_tokens": 20, "block_size": 0})


@pytest.fixture(scope="module")
def random_params(cfg):
    return scaled_random_model(cfg.model, seed=1)


@pytest.fixture(scope="module")
def trained_params(cfg):
    """100 Adam steps of the TiDAR loss on a Markov chain (a few seconds); drafts then often match the AR."""
    return trained_model(cfg.model, "tidar", seed=0, steps=100)


def _generator(cfg, model, block_size=0, **decode_overrides):
    graphdef, params = model
    dec = dataclasses.replace(cfg.decode, block_size=block_size, **decode_overrides)
    return Generator(graphdef, params, cfg.model, dec, allow_block_size_mismatch=True)


@pytest.fixture(scope="module", params=["random", "trained"])
def named_model(request, random_params, trained_params):
    return request.param, {"random": random_params, "trained": trained_params}[request.param]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _full_logits(graphdef, params, tokens, mask_token_id):
    """Causal forward without a cache: tokens [b, T] -> logits [b, T, V], the mask token suppressed as in decode."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    logits, _ = forward(graphdef, params, tokens, positions, masks.causal_mask(length)[None])
    return logits.at[..., mask_token_id].set(-1e30)


def _pad(rows, length, pad_id=2):
    out = np.full((len(rows), length), pad_id, np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def _assert_greedy_continuations(cfg, model, prompts, outputs):
    """Every output token is the argmax of a full causal recompute over prompt + the tokens before it."""
    graphdef, params = model
    sequences = [p + t for p, t in zip(prompts, outputs)]
    logits = np.asarray(_full_logits(graphdef, params, _pad(sequences, 40), cfg.model.mask_token_id))
    for row, prompt, out in zip(logits, prompts, outputs):
        assert row[len(prompt) - 1:len(prompt) - 1 + len(out)].argmax(-1).tolist() == out


def test_cached_ar_equals_full_recompute(cfg, named_model):
    _, model = named_model
    result = _generator(cfg, model).generate(RAGGED, "ar", MAX_NEW)
    assert [len(t) for t in result.tokens] == [MAX_NEW] * len(RAGGED)
    _assert_greedy_continuations(cfg, model, RAGGED, result.tokens)
    assert result.forwards == MAX_NEW and result.tokens_per_forward == 1.0
    assert result.finish_reasons == ["length"] * len(RAGGED)


@pytest.mark.parametrize("prompts,block_size", [([[3, 4, 5, 6, 7]], 4), (RAGGED, 4), (RAGGED, 2)],
                         ids=["batch1-K4", "ragged3-K4", "ragged3-K2"])
def test_greedy_tidar_is_lossless(cfg, named_model, prompts, block_size):
    """beta = 1 greedy TiDAR emits exactly AR greedy's tokens, row by row."""
    name, model = named_model
    tidar = _generator(cfg, model, block_size).generate(prompts, "tidar", MAX_NEW)
    ar = _generator(cfg, model).generate(prompts, "ar", MAX_NEW)
    assert tidar.tokens == ar.tokens
    assert tidar.finish_reasons == ["length"] * len(prompts)
    assert tidar.block_size == block_size and len(tidar.acceptance_histogram) == block_size + 1
    # Counters: each row-step accepts a tokens and emits up to a (the last step may be cut at MAX_NEW); each row
    # is active for its prefill plus its steps.
    rows, total = len(prompts), len(prompts) * MAX_NEW
    row_steps = sum(tidar.acceptance_histogram)
    assert rows + sum(a * n for a, n in enumerate(tidar.acceptance_histogram)) >= total
    assert tidar.tokens_per_forward == pytest.approx(total / (rows + row_steps))
    if name == "trained":  # the multi-token path must actually run
        assert sum(tidar.acceptance_histogram[2:]) > 0
        assert tidar.forwards < MAX_NEW and tidar.tokens_per_forward > 1.2


@pytest.mark.parametrize("impl", ["auto", "blockwise", "splash"])
def test_greedy_tidar_is_lossless_with_training_attention_impls(cfg, trained_params, impl):
    """attention_impl=auto (the default; blockwise on a CPU) / blockwise / splash (cached forwards, prefill
    included, take the "xla" cached path): TiDAR greedy still equals AR greedy, and both equal the "xla" model's
    AR tokens."""
    block_cfg = config_lib.replace(cfg, model={"attention_impl": impl})
    model = (nnx.graphdef(create_model(block_cfg.model)), trained_params[1])
    xla_cfg = config_lib.replace(cfg, model={"attention_impl": "xla"})
    reference = (nnx.graphdef(create_model(xla_cfg.model)), trained_params[1])
    tidar = _generator(block_cfg, model, 4).generate(RAGGED, "tidar", MAX_NEW)
    ar = _generator(block_cfg, model).generate(RAGGED, "ar", MAX_NEW)
    assert tidar.tokens == ar.tokens == _generator(xla_cfg, reference).generate(RAGGED, "ar", MAX_NEW).tokens
    assert sum(tidar.acceptance_histogram[2:]) > 0  # multi-token steps ran


def test_while_loop_equals_python_loop_and_finished_rows_freeze(cfg, trained_params):
    graphdef, params = trained_params
    gen = _generator(cfg, trained_params)
    state, spec, sp = gen.prefill(RAGGED, "tidar", MAX_NEW)
    looped = jax.device_get(gen.advance(state, spec, sp))
    step = jax.jit(functools.partial(decode.decode_step, graphdef, spec=spec))
    state, _, _ = gen.prefill(RAGGED, "tidar", MAX_NEW)
    frozen_checks = 0
    while np.any(np.asarray(state.finish) == decode.RUNNING):
        before = jax.device_get(state)
        state = step(params, state, sp)
        after = jax.device_get(state)
        done = before.finish != decode.RUNNING
        for field in ("tokens", "num_tokens", "finish", "drafts", "row_forwards"):
            np.testing.assert_array_equal(getattr(after, field)[done], getattr(before, field)[done])
        np.testing.assert_array_equal(after.cache.cursor[done], before.cache.cursor[done])
        frozen_checks += int(done.sum())
    assert frozen_checks > 0  # rows with different prompts and acceptance finish at different steps
    state = jax.device_get(state)
    for field in ("tokens", "num_tokens", "finish", "drafts", "row_forwards", "forwards", "accept_hist"):
        np.testing.assert_array_equal(getattr(state, field), getattr(looped, field), err_msg=field)
    np.testing.assert_array_equal(state.cache.cursor, looped.cache.cursor)


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _prefill_cache(graphdef, model_cfg, params, tokens, max_len):
    """K/V of a causal prefill over tokens [b, T] (the reference for what the cache should hold)."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    mask = masks.with_cache(jnp.zeros((batch, max_len), bool), masks.causal_mask(length))
    _, cache = forward(graphdef, params, tokens, positions, mask, init_cache(model_cfg, batch, max_len),
                       jnp.zeros((batch,), jnp.int32), length)
    return cache


def test_cache_holds_committed_tokens_and_no_mask_tokens(cfg, trained_params):
    """Mid-generation, cache slots [0, cursor) equal a plain prefill over the committed tokens (prompt + emitted
    tokens but the last, which is decided and not yet committed), and slots no draft could reach are untouched."""
    graphdef, params = trained_params
    gen = _generator(cfg, trained_params)
    max_len, k, sentinel = cfg.decode.max_cache_len, cfg.model.block_size, 7.0
    cache = init_cache(cfg.model, gen.batch_bucket(len(RAGGED)), max_len)  # rows of the padded batch
    cache = cache.replace(keys=tuple(jnp.full_like(x, sentinel) for x in cache.keys),
                          values=tuple(jnp.full_like(x, sentinel) for x in cache.values))
    state, spec, sp = gen.prefill(RAGGED, "tidar", MAX_NEW, cache=cache)
    state = jax.device_get(gen.advance(state, spec, sp, max_forwards=3))
    assert np.all(state.finish[:len(RAGGED)] == decode.RUNNING) and state.accept_hist[2:].sum() > 0
    lengths = np.array([len(p) for p in RAGGED])
    cursor = state.cache.cursor[:len(RAGGED)]
    np.testing.assert_array_equal(cursor, lengths + state.num_tokens[:len(RAGGED)] - 1)
    committed = [p + state.tokens[b, :state.num_tokens[b] - 1].tolist() for b, p in enumerate(RAGGED)]
    reference = _prefill_cache(graphdef, cfg.model, params, _pad(committed, 24), max_len)
    for layer in range(cfg.model.n_layers):
        for got, want in ((state.cache.keys[layer], reference.keys[layer]),
                          (state.cache.values[layer], reference.values[layer])):
            want = np.asarray(want)
            for b in range(len(RAGGED)):
                np.testing.assert_allclose(got[b, :cursor[b]], want[b, :cursor[b]], atol=2e-5, rtol=1e-5)
                # Prefill writes the padded bucket (16), each step the K drafts at the old cursor (< cursor).
                untouched = max(16, cursor[b] + k - 1)
                assert np.all(got[b, untouched:] == sentinel)


def test_rejected_drafts_never_influence_later_tokens(cfg, trained_params):
    """Overwrite every cache slot at or past the cursor with noise before each step: outputs must not change."""
    gen = _generator(cfg, trained_params)
    clean = gen.generate(RAGGED, "tidar", MAX_NEW)
    assert sum(clean.acceptance_histogram[1:-1]) > 0  # some drafts were rejected
    state, spec, sp = gen.prefill(RAGGED, "tidar", MAX_NEW)
    key = jax.random.key(5)
    slots = jnp.arange(cfg.decode.max_cache_len)[None, :, None, None]
    while np.any(np.asarray(state.finish) == decode.RUNNING):
        free = slots >= state.cache.cursor[:, None, None, None]
        noisy = []
        for buffers in (state.cache.keys, state.cache.values):
            key, *subkeys = jax.random.split(key, len(buffers) + 1)
            noisy.append(tuple(jnp.where(free, 10 * jax.random.normal(sk, x.shape, x.dtype), x)
                               for sk, x in zip(subkeys, buffers)))
        state = state.replace(cache=state.cache.replace(keys=noisy[0], values=noisy[1]))
        state = gen.advance(state, spec, sp, max_forwards=int(state.forwards) + 1)
    tokens, counts = np.asarray(state.tokens), np.asarray(state.num_tokens)
    assert [tokens[b, :counts[b]].tolist() for b in range(len(RAGGED))] == clean.tokens


def test_programs_trace_once_per_bucket(cfg, trained_params):
    # A capacity no other test uses, so these programs are compiled here.
    gen = _generator(cfg, trained_params, max_new_tokens=17)
    before = dict(generation.TRACE_COUNTS)

    def traced(name):
        return generation.TRACE_COUNTS[name] - before.get(name, 0)

    for prompt, new, beta in (([3, 4, 5], 5, 1.0), ([5, 6, 7, 8, 9, 10], 9, 1.0), ([4], 3, 0.5), ([3, 4, 5], 5, 1.0)):
        gen.generate([prompt], "tidar", new, beta=beta)
    assert traced("prefill") == 1 and traced("decode_loop") == 1
    gen.generate([[3] * 12], "tidar", 5)  # bucket 16: a new prefill, the same loop (the cache length is fixed)
    assert traced("prefill") == 2 and traced("decode_loop") == 1


def test_streaming_yields_the_same_tokens(cfg, trained_params):
    gen = _generator(cfg, trained_params)
    chunks = []
    streamed = gen.generate(RAGGED, "tidar", MAX_NEW, on_tokens=chunks.append, chunk_forwards=2)
    assert len(chunks) > 2
    joined = [sum((chunk[b] for chunk in chunks), []) for b in range(len(RAGGED))]
    assert joined == streamed.tokens == gen.generate(RAGGED, "tidar", MAX_NEW).tokens


def test_eos_ends_rows_independently(cfg, trained_params):
    graphdef, params = trained_params
    ar = _generator(cfg, trained_params).generate(RAGGED, "ar", MAX_NEW).tokens
    eos = ar[0][3]
    gen = Generator(graphdef, params, dataclasses.replace(cfg.model, eos_token_id=eos), cfg.decode)
    result = gen.generate(RAGGED, "tidar", MAX_NEW)
    for row, got, reason in zip(ar, result.tokens, result.finish_reasons):
        expected = row[:row.index(eos) + 1] if eos in row else row
        assert got == expected and reason == ("eos" if eos in row else "length")
    assert result.finish_reasons[0] == "eos"


def test_full_cache_stops_a_row(cfg, random_params):
    """Row 1 (13 prompt tokens, cache 32, K 4) must stop once cursor + K > 32: after 17..20 tokens."""
    gen = _generator(cfg, random_params)
    tidar = gen.generate(RAGGED, "tidar", 20)
    ar = gen.generate(RAGGED, "ar", 20)
    n = len(tidar.tokens[1])
    assert 17 <= n <= 20 and tidar.finish_reasons[1] == ("length" if n == 20 else "cache")
    assert tidar.tokens[1] == ar.tokens[1][:n]
    assert tidar.tokens[0] == ar.tokens[0] and tidar.tokens[2] == ar.tokens[2]


def _tv_noise_bound(probs, draws, rng, repeats=20000, quantile=0.9999):
    """The `quantile` of the TV distance between `probs` and the histogram of `draws` exact samples from it."""
    support = probs[probs > 0]
    counts = rng.multinomial(draws, support / support.sum(), size=repeats)
    tvs = 0.5 * (np.abs(counts / draws - support).sum(1) + (1 - support.sum()))
    return np.quantile(tvs, quantile)


@pytest.mark.parametrize("knobs", [dict(temperature=1.0, top_k=3), dict(temperature=1.5, top_p=0.9)])
def test_sampling_follows_the_exact_ar_distribution(cfg, trained_params, knobs):
    """Joint histogram of the first two new tokens over many rows vs the exact AR joint p(x1) p(x2 | x1) from full
    recomputes (after temperature / top-k / top-p). Pass: TV distance below the 99.99% quantile of the TV that exact
    sampling of the same size gives. Power: a sampler that ignored the x1 -> x2 dependence (e.g. trusting the
    diffusion drafts, which do not see x1) would be off by the product-of-marginals TV, asserted to be far larger."""
    graphdef, params = trained_params
    vocab, rows, prompt = cfg.model.vocab_size, 1024, [3]
    while len(prompt) < 5:  # the chain's most likely path: the next token is 90/10 between two successors
        prompt.append(int(SUCCESSORS[prompt[-1] - CHAIN_STATES[0], 0]))
    sp = sampling.SamplingParams.create(**knobs)
    candidates = [prompt + [x] for x in range(vocab)]
    logits = _full_logits(graphdef, params, _pad(candidates, 8), cfg.model.mask_token_id)
    p1 = np.asarray(sampling.distribution(logits[0, len(prompt) - 1], sp), np.float64)
    p2 = np.asarray(sampling.distribution(logits[:, len(prompt)], sp), np.float64)
    joint = p1[:, None] * p2
    independent = np.outer(p1, joint.sum(0))
    joint, independent = joint.reshape(-1), independent.reshape(-1)
    bound = _tv_noise_bound(joint, rows, np.random.default_rng(0))
    assert 0.5 * np.abs(joint - independent).sum() > 3 * bound
    gen = _generator(cfg, trained_params)
    for mode, seed in (("tidar", 11), ("ar", 12)):
        result = gen.generate([prompt] * rows, mode, max_new_tokens=2, seed=seed, **knobs)
        pairs = np.array(result.tokens)
        counts = np.bincount(pairs[:, 0] * vocab + pairs[:, 1], minlength=vocab * vocab)
        tv = 0.5 * np.abs(counts / rows - joint).sum()
        assert tv < bound, (mode, tv, bound)
        if mode == "tidar":
            assert sum(result.acceptance_histogram[2:]) > rows // 4  # drafts were accepted, not just resampled


def test_bad_inputs_raise_clear_errors(cfg, random_params):
    gen = _generator(cfg, random_params)
    cases = [([], "empty"), ([[]], "empty"), ([[3] * 17], "largest prompt bucket"), ([[3, 512]], "outside"),
             ([[-1]], "outside"), ([[3, cfg.model.mask_token_id]], "mask token")]
    for prompts, message in cases:
        with pytest.raises(ValueError, match=message):
            gen.generate(prompts, "tidar")
    with pytest.raises(ValueError, match="mode"):
        gen.generate([[3]], "beam")
    with pytest.raises(ValueError, match="temperature"):
        gen.generate([[3]], "tidar", temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate([[3]], "tidar", top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen.generate([[3]], "tidar", max_new_tokens=0)


def test_block_size_must_match_training_unless_allowed(cfg, random_params):
    graphdef, params = random_params
    dec = dataclasses.replace(cfg.decode, block_size=2)
    with pytest.raises(ValueError, match="trained block size 4"):
        Generator(graphdef, params, cfg.model, dec)
    assert Generator(graphdef, params, cfg.model, dec, allow_block_size_mismatch=True).block_size == 2
    assert Generator(graphdef, params, cfg.model, cfg.decode).block_size == cfg.model.block_size


# ----- the LM head on read rows only, and a prefill that does not attend to the empty cache -----------------------
#
# Reference: the previous decoder, re-implemented here with the head on EVERY query row (model.forward) and the
# prefill attending over [max_len empty cache slots | P + K tokens]. Greedy, so every step's outcome is a function of
# the logits it reads; the decoder under test must reproduce it token for token and write the same K/V.

_ROWS_MAX_LEN, _ROWS_STEPS = 48, 5


@functools.partial(jax.jit, static_argnums=(0, 5, 6))
def _reference_prefill(graphdef, params, cache, prompts, lengths, k, mask_id, beta):
    batch, prompt_len = prompts.shape
    tokens = jnp.concatenate([prompts, jnp.full((batch, k), mask_id, prompts.dtype)], axis=1)
    positions = masks.prefill_positions(prompt_len, lengths, k)
    mask = masks.with_cache(jnp.zeros((batch, cache.max_len), bool), masks.prefill_mask(prompt_len, lengths, k))
    logits, cache = forward(graphdef, params, tokens, positions, mask, cache, jnp.zeros((batch,), jnp.int32),
                            prompt_len)
    logits = logits.at[..., mask_id].set(-1e30)  # [b, P + K, V]: every row
    last = logits[jnp.arange(batch), lengths - 1]
    target = beta * last + (1 - beta) * logits[:, prompt_len]
    drafts = jnp.concatenate([jnp.argmax(target, -1)[:, None], jnp.argmax(logits[:, prompt_len + 1:], -1)], 1)
    return cache.rewind_to(lengths), drafts.astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _reference_step(graphdef, params, cache, drafts, k, mask_id, beta):
    batch = drafts.shape[0]
    tokens = jnp.concatenate([drafts, jnp.full((batch, k * k), mask_id, drafts.dtype)], axis=1)
    positions = masks.step_positions(cache.cursor, k, True)
    mask = masks.with_cache(cache.valid_slots(), masks.step_mask(k, True))
    logits, cache = forward(graphdef, params, tokens, positions, mask, cache,
                            jnp.minimum(cache.cursor, cache.max_len - k), k)
    logits = logits.at[..., mask_id].set(-1e30)  # [b, K + K*K, V]: every row
    blocks = logits[:, k:].reshape(batch, k, k, -1)
    t = jnp.argmax(beta * logits[:, :k] + (1 - beta) * blocks[:, :, 0], -1).astype(jnp.int32)
    accepted = 1 + jnp.sum(jnp.cumprod((drafts[:, 1:] == t[:, :-1]).astype(jnp.int32), -1), -1)
    rows = jnp.arange(batch)
    guesses = jnp.argmax(blocks[rows, accepted - 1, 1:], -1).astype(jnp.int32)
    drafts = jnp.concatenate([t[rows, accepted - 1][:, None], guesses], 1)
    return cache.advance(accepted), drafts, accepted


def _assert_cache_close(got, want, cursor):
    for layer in range(len(got.keys)):
        for g, w in ((got.keys[layer], want.keys[layer]), (got.values[layer], want.values[layer])):
            g, w = np.asarray(g), np.asarray(w)
            for b, c in enumerate(cursor):
                np.testing.assert_allclose(g[b, :c], w[b, :c], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prompts,block_size,split_head", [
    (RAGGED, 1, True), (RAGGED, 2, True), (RAGGED, 3, True), (RAGGED, 4, True), ([[3, 4, 5, 6, 7]], 2, True),
    ([[9, 8, 7]], 4, True), (RAGGED, 4, False), ([[3, 4, 5, 6, 7]], 3, False)],
    ids=["ragged3-K1", "ragged3-K2", "ragged3-K3", "ragged3-K4", "batch1-K2", "batch1-K4", "ragged3-K4-one-pass",
         "batch1-K3-one-pass"])
def test_head_on_read_rows_equals_full_logits_reference(cfg, trained_params, prompts, block_size, split_head):
    """Greedy TiDAR at beta 1 and 0.5: after the prefill and after each of 5 steps the drafts (t_a and the next
    guesses), accepted lengths and cursors equal the full-logits reference, and the cache holds the same K/V (the
    prefill's included, written without attending to the empty cache). Both step heads: split (two passes on the
    3K-1 read rows) and one pass on every row (small steps)."""
    graphdef, params = trained_params
    k, mask_id = block_size, cfg.model.mask_token_id
    spec = DecodeSpec.create("tidar", k, True, 32, cfg.model, split_head_min_rows=0 if split_head else 10**9)
    prefill = jax.jit(functools.partial(decode.prefill, graphdef, spec=spec))
    step = jax.jit(functools.partial(decode.decode_step, graphdef, spec=spec))
    bucket = 16 if max(map(len, prompts)) > 8 else 8
    padded, lengths = _pad(prompts, bucket), np.array([len(p) for p in prompts], np.int32)
    multi_token_steps = 0
    for beta in (1.0, 0.5):
        sp = sampling.SamplingParams.create(beta=beta)
        sentinel = init_cache(cfg.model, len(prompts), _ROWS_MAX_LEN)
        sentinel = sentinel.replace(keys=tuple(x + 7.0 for x in sentinel.keys),
                                    values=tuple(x + 7.0 for x in sentinel.values))
        state = prefill(params, sentinel, padded, lengths, np.int32(32), jax.random.key(0), sp)
        ref_cache, ref_drafts = _reference_prefill(graphdef, params, init_cache(cfg.model, len(prompts),
                                                                                _ROWS_MAX_LEN),
                                                   padded, lengths, k, mask_id, jnp.float32(beta))
        np.testing.assert_array_equal(state.drafts, ref_drafts)
        _assert_cache_close(state.cache, ref_cache, [bucket] * len(prompts))  # the whole padded bucket is written
        assert all(np.all(np.asarray(x)[:, bucket:] == 7.0) for x in state.cache.keys)  # nothing past it
        for _ in range(_ROWS_STEPS):
            cursor = np.asarray(state.cache.cursor)
            state = step(params, state, sp)
            ref_cache, ref_drafts, accepted = _reference_step(graphdef, params, ref_cache, ref_drafts, k, mask_id,
                                                              jnp.float32(beta))
            assert np.all(np.asarray(state.finish) == decode.RUNNING)
            np.testing.assert_array_equal(state.drafts, ref_drafts)
            np.testing.assert_array_equal(np.asarray(state.cache.cursor) - cursor, accepted)
            multi_token_steps += int(np.sum(np.asarray(accepted) > 1))
        _assert_cache_close(state.cache, ref_cache, np.asarray(state.cache.cursor))
    if k > 1:
        assert multi_token_steps > 0  # the proposal-a gather ran for a > 1
