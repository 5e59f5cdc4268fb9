"""Sparse proposal sets (proposals.py): a TiDAR step that computes proposal blocks only for the acceptance lengths in
a set A, against independent references.

References: AR greedy decoding (the lossless anchor), a step re-implemented here from design.md's rules (mask built
by a Python loop, logits on every row, the next block chosen by a per-row Python loop), the exact AR distribution of
the first five sampled tokens from full recomputes, and hand-worked acceptance histograms.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from markov import CHAIN_STATES, SUCCESSORS
from test_decode import MAX_NEW, RAGGED, _full_logits, _generator, _pad, _tv_noise_bound, cfg, trained_params  # noqa: F401  (module fixtures shared with the decode tests)
from test_masks import reference_step

from tidar_jax import config as config_lib
from tidar_jax.decoding import decode, generation, sampling
from tidar_jax.decoding.spec import DecodeSpec
from tidar_jax.decoding.generation import Generator
from tidar_jax.layout import proposals
from tidar_jax.model.kv_cache import init_cache
from tidar_jax.model.transformer import forward

BATCH1 = [[3, 4, 5, 6, 7]]
SLOW = pytest.mark.slow


@pytest.mark.parametrize("block_size,lengths,prompts", [
    (4, (1,), RAGGED), (4, (1,), BATCH1), (4, (1, 4), RAGGED), (3, (1, 3), RAGGED), (2, (1,), BATCH1),
    pytest.param(4, (1, 4), BATCH1, marks=SLOW), pytest.param(4, (1, 2, 4), RAGGED, marks=SLOW),
    pytest.param(4, (1, 2), BATCH1, marks=SLOW), pytest.param(3, (1,), RAGGED, marks=SLOW),
    pytest.param(3, (1, 3), BATCH1, marks=SLOW), pytest.param(2, (1,), RAGGED, marks=SLOW)],
    ids=["K4-{1}-ragged3", "K4-{1}-batch1", "K4-{1,4}-ragged3", "K3-{1,3}-ragged3", "K2-{1}-batch1",
         "K4-{1,4}-batch1", "K4-{1,2,4}-ragged3", "K4-{1,2}-batch1", "K3-{1}-ragged3", "K3-{1,3}-batch1",
         "K2-{1}-ragged3"])
def test_sparse_greedy_is_lossless(cfg, trained_params, block_size, lengths, prompts):
    """beta = 1 greedy TiDAR with a sparse set emits exactly AR greedy's tokens, row by row, and multi-token steps
    happen (the full set: test_decode.test_greedy_tidar_is_lossless, the same program as the default)."""
    ar = _generator(cfg, trained_params).generate(prompts, "ar", MAX_NEW)
    sparse = _generator(cfg, trained_params, block_size, proposal_lengths=lengths)
    tidar = sparse.generate(prompts, "tidar", MAX_NEW)
    assert tidar.tokens == ar.tokens
    assert tidar.finish_reasons == ["length"] * len(prompts)
    assert len(tidar.acceptance_histogram) == block_size + 1 and sum(tidar.acceptance_histogram[2:]) > 0


# ----- one step against a reference built from design.md's rules -------------------------------------------------

@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _reference_logits(graphdef, params, cache, drafts, k, lengths, mask_id):
    """The step's forward with logits on EVERY row; the mask among current tokens from test_masks' Python loop."""
    batch = drafts.shape[0]
    local, offsets = reference_step(k, 0, lengths)
    tokens = jnp.concatenate([drafts, jnp.full((batch, len(lengths) * k), mask_id, drafts.dtype)], axis=1)
    positions = cache.cursor[:, None] + jnp.asarray(offsets, jnp.int32)[None]
    mask = jnp.concatenate([jnp.broadcast_to(cache.valid_slots()[:, None], (batch, len(offsets), cache.max_len)),
                            jnp.broadcast_to(jnp.asarray(local), (batch,) + local.shape)], axis=2)
    logits, cache = forward(graphdef, params, tokens, positions, mask, cache,
                            jnp.minimum(cache.cursor, cache.max_len - k), k)
    return logits.at[..., mask_id].set(-1e30), cache


def _reference_next(logits, drafts, k, lengths, mask_id):
    """Verification and the next block, row by row in Python: a = 1 + matches of v_{i+1} with t_i, j* = the largest
    j in A with j <= a, guess i (2..K) = argmax of proposal j*'s slot i + a - j* or the mask token past its K slots."""
    logits, drafts = np.asarray(logits), np.asarray(drafts)
    out, accepted = [], []
    for row, v in zip(logits, drafts):
        t = row[:k].argmax(-1)
        a = 1
        while a < k and v[a] == t[a - 1]:
            a += 1
        j = max(x for x in lengths if x <= a)
        block = row[k + lengths.index(j) * k: k + (lengths.index(j) + 1) * k]  # slot r at row r - 1
        guesses = [int(block[i + a - j - 1].argmax()) if i + a - j <= k else mask_id for i in range(2, k + 1)]
        out.append([int(t[a - 1])] + guesses)
        accepted.append(a)
    return np.array(out, np.int32), np.array(accepted)


@pytest.mark.parametrize("block_size,lengths,split_head", [
    (4, (1,), True), (4, (1, 3), True), (4, (1, 2, 4), False), (3, (1, 3), False), (4, (1, 2, 3, 4), True)],
    ids=["K4-{1}", "K4-{1,3}", "K4-{1,2,4}-one-pass", "K3-{1,3}-one-pass", "K4-full"])
def test_sparse_step_equals_reference(cfg, trained_params, block_size, lengths, split_head):
    """From the same prefill, 6 greedy steps on a ragged batch: the next drafts (fillers included), accepted lengths
    and cursors equal the reference step, both LM-head paths (split / one pass); the step feeds K + |A|*K tokens."""
    graphdef, params = trained_params
    k, mask_id = block_size, cfg.model.mask_token_id
    spec = DecodeSpec.create("tidar", k, True, 32, cfg.model, split_head_min_rows=0 if split_head else 10**9,
                                    proposal_lengths=lengths)
    assert spec.lengths == lengths and spec.sparse == (lengths != tuple(range(1, k + 1)))
    step = jax.jit(functools.partial(decode.decode_step, graphdef, spec=spec))
    sp = sampling.SamplingParams.create()
    state = jax.jit(functools.partial(decode.prefill, graphdef, spec=spec))(
        params, init_cache(cfg.model, len(RAGGED), 48), _pad(RAGGED, 16),
        np.array([len(p) for p in RAGGED], np.int32), np.int32(32), jax.random.key(0), sp)
    cache, drafts = state.cache, state.drafts
    shifted = 0
    for _ in range(6):
        cursor = np.asarray(state.cache.cursor)
        state = step(params, state, sp)
        logits, cache = _reference_logits(graphdef, params, cache, drafts, k, lengths, mask_id)
        assert logits.shape[1] == k + len(lengths) * k
        drafts, accepted = _reference_next(logits, drafts, k, lengths, mask_id)
        cache = cache.advance(jnp.asarray(accepted, jnp.int32))
        np.testing.assert_array_equal(state.drafts, drafts)
        np.testing.assert_array_equal(np.asarray(state.cache.cursor) - cursor, accepted)
        shifted += int(np.sum([a not in lengths for a in accepted]))
    if spec.sparse:
        assert shifted > 0  # some step accepted a length outside A: its next block came from a shorter proposal


def test_full_set_is_the_default_program(cfg, trained_params):
    """decode.proposal_lengths = all of 1..K is the default spec (one compiled program, today's step, which
    test_decode checks against its own reference), also when sampling with beta < 1."""
    model_cfg = cfg.model
    specs = {DecodeSpec.create("tidar", 4, False, 20, model_cfg, proposal_lengths=x)
             for x in (None, (), (1, 2, 3, 4), [1, 2, 3, 4])}
    assert len(specs) == 1
    knobs = dict(seed=3, temperature=1.0, beta=0.5)
    default = _generator(cfg, trained_params, 4).generate(RAGGED, "tidar", MAX_NEW, **knobs)
    before = dict(generation.TRACE_COUNTS)
    full = _generator(cfg, trained_params, 4, proposal_lengths=(1, 2, 3, 4)).generate(RAGGED, "tidar", MAX_NEW,
                                                                                     **knobs)
    assert dict(generation.TRACE_COUNTS) == before
    assert full.tokens == default.tokens and full.acceptance_histogram == default.acceptance_histogram


@pytest.mark.slow  # ~20 s; dense sampling exactness stays fast in test_decode (default suite under 10 min on 2 cores)
def test_sparse_sampling_follows_the_exact_ar_distribution(cfg, trained_params):
    """Speculative sampling with A = {1} at K = 4 (after a step accepting a >= 2 the next block has a - 1
    fillers): the joint histogram of the first five new tokens over 2048 rows matches the exact AR joint (top-k 2, so
    32 sequences, from full recomputes of every prefix) within the 99.99% quantile of exact sampling's TV."""
    graphdef, params = trained_params
    rows, new, knobs = 2048, 5, dict(temperature=1.0, top_k=2)
    prompt = [3]
    while len(prompt) < 4:
        prompt.append(int(SUCCESSORS[prompt[-1] - CHAIN_STATES[0], 0]))
    sp = sampling.SamplingParams.create(**knobs)
    probs = {(): None}
    level = [()]
    for depth in range(new):  # exact conditionals p(x_{d+1} | prompt, x_1..x_d) on the top-2 support
        padded = _pad([prompt + list(x) for x in level] + [prompt] * (2 ** (new - 1) - len(level)), 16)  # 1 shape
        logits = _full_logits(graphdef, params, padded, cfg.model.mask_token_id)
        dist = np.asarray(sampling.distribution(logits[:len(level), len(prompt) + depth - 1], sp), np.float64)
        nxt = []
        for x, d in zip(level, dist):
            probs[x] = d
            nxt += [x + (int(t),) for t in np.flatnonzero(d > 0)]
        level = nxt
    joint = np.array([np.prod([probs[x[:i]][x[i]] for i in range(new)]) for x in level])
    assert len(level) == 2 ** new and abs(joint.sum() - 1) < 1e-6
    bound = _tv_noise_bound(joint, rows, np.random.default_rng(0))
    result = _generator(cfg, trained_params, 4, proposal_lengths=(1,)).generate([prompt] * rows, "tidar", new, seed=5,
                                                                                **knobs)
    index = {x: i for i, x in enumerate(level)}
    counts = np.zeros(len(level) + 1)
    for row in result.tokens:
        counts[index.get(tuple(row), len(level))] += 1  # the last cell: a sequence outside the support
    tv = 0.5 * (np.abs(counts[:-1] / rows - joint).sum() + counts[-1] / rows)
    assert tv < bound, (tv, bound)
    assert sum(result.acceptance_histogram[2:]) > rows // 4  # drafts were accepted, so fillers were offered


def test_invalid_sets_and_beta_raise_clear_errors(cfg, trained_params):
    for lengths, message in [((2, 3), "must include 1"), ((1, 3, 2), "strictly increasing"),
                             ((1, 1, 2), "strictly increasing"), ((1, 5), r"\[1, K=4\]"),
                             ((1, 2.5), "integers")]:
        with pytest.raises(ValueError, match=message):
            proposals.resolve_proposal_lengths(lengths, 4)
        with pytest.raises(ValueError, match="decode.proposal_lengths"):
            DecodeSpec.create("tidar", 4, True, 8, cfg.model, proposal_lengths=lengths)
    with pytest.raises(config_lib.ConfigError, match="decode.proposal_lengths must include 1"):
        config_lib.load_config(None, ["decode.proposal_lengths=[2,3]"])
    with pytest.raises(config_lib.ConfigError, match=r"decode.beta must be 1 with a sparse proposal set \[1, 2\]"):
        config_lib.load_config(None, ["decode.proposal_lengths=[1,2]", "decode.beta=0.5"])
    assert config_lib.load_config(None, ["decode.proposal_lengths=[1,2]"]).decode.proposal_lengths == (1, 2)
    assert config_lib.load_config(None, ["decode.proposal_lengths=[1,2,3,4]", "decode.beta=0.5"])  # full: any beta
    with pytest.raises(ValueError, match="beta must be 1 with a sparse proposal set"):
        _generator(cfg, trained_params, 4, proposal_lengths=(1, 2)).generate([[3, 4]], "tidar", 4, beta=0.5)
    sparse = _generator(cfg, trained_params, 4, proposal_lengths=(1, 2))
    assert sparse.generate([[3, 4]], "ar", 4, beta=0.5).tokens  # AR mode has no proposal set: any beta


def test_suggested_set_from_a_histogram():
    """Hand-worked: h = [-, 5, 0, 0, 3] (a = 1 five times, a = 4 three times) at K = 4, mean 17/8 tokens per step.
    {1} replaces 3 guesses after each a = 4 step (9/8 per step); the next block then holds 1 real token, so a next
    a' = 4 (probability 3/8) loses 3 tokens: 3/8 * 3/8 * 3 = 27/64 per step. {1, 4} loses nothing."""
    h = [0, 5, 0, 0, 3]
    assert proposals.lost_drafts(h, (1,)) == pytest.approx(9 / 8)
    assert proposals.lost_drafts(h, (1, 2)) == pytest.approx(3 * 2 / 8)
    assert proposals.lost_tokens(h, (1,)) == pytest.approx(27 / 64)
    assert proposals.lost_tokens(h, (1, 3)) == pytest.approx(9 / 64)
    assert proposals.lost_tokens(h, (1, 4)) == 0 == proposals.lost_tokens(h, (1, 2, 3, 4))
    best = proposals.best_sets(h)
    assert [b["proposal_lengths"] for b in best] == [[1], [1, 4], [1, 2, 4], [1, 2, 3, 4]]
    assert [b["query_tokens"] for b in best] == [8, 12, 16, 20]
    assert best[0]["lost_token_fraction"] == pytest.approx(27 / 64 / (17 / 8))
    assert proposals.suggest_set(h)["proposal_lengths"] == [1, 4]
    assert proposals.suggest_set(h, max_loss=0.25)["proposal_lengths"] == [1]
