"""Pure sampling / verification functions against NumPy and Python-loop references, and the exactness of
speculative rejection sampling as a statistical test on synthetic distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.decoding import sampling
from tidar_jax.decoding.sampling import SamplingParams

# With >= 100k draws per distribution over 5 tokens, sampling noise gives a TV distance around 0.002-0.003; a
# wrong sampler (e.g. accepting every draft, or resampling from p instead of the residual) is off by > 0.05 here.
TV_THRESHOLD = 0.01


def _numpy_process(logits, temperature, top_k, top_p):
    """Reference: temperature, keep the top_k largest, then the smallest prefix (by probability) of mass >= top_p.
    The logits are shifted by their max first, as `process_logits` documents (softmax is shift-invariant)."""
    x = (logits - logits.max()) / temperature
    order = np.argsort(-x, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    probs = np.exp(x[order] - x[order].max())
    probs /= probs.sum()
    kept, mass = [], 0.0
    for index, prob in zip(order, probs):
        kept.append(index)
        mass += prob
        if mass >= top_p:
            break
    out = np.full_like(x, -np.inf)
    out[kept] = x[kept]
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8),
                                                     (0.5, 7, 0.6), (2.0, 1, 1.0), (1.0, 0, 1e-6)])
def test_process_logits_matches_numpy_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(6, 32)).astype(np.float32) * 3
    params = SamplingParams.create(temperature=temperature, top_k=top_k, top_p=top_p)
    got = np.asarray(jax.jit(sampling.process_logits)(jnp.asarray(logits), params))
    for row, got_row in zip(logits, got):
        want = _numpy_process(row.astype(np.float64), temperature, top_k, top_p)
        np.testing.assert_array_equal(np.isfinite(got_row), np.isfinite(want))
        np.testing.assert_allclose(got_row[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)


def test_mix_logits_at_beta_one_is_the_ar_logits_exactly():
    rng = np.random.default_rng(1)
    ar, diff = (jnp.asarray(rng.normal(size=(3, 4, 16)), jnp.float32) for _ in range(2))
    np.testing.assert_array_equal(sampling.mix_logits(ar, diff, jnp.float32(1.0)), ar)
    half = sampling.mix_logits(ar, diff, jnp.float32(0.25))
    np.testing.assert_allclose(half, 0.25 * ar + 0.75 * diff, rtol=1e-6)


def test_greedy_verify_matches_python_loop():
    rng = np.random.default_rng(2)
    batch, k, vocab = 64, 4, 8
    logits = rng.normal(size=(batch, k, vocab)).astype(np.float32)
    # Drafts that match the argmax 70% of the time, so every accepted length occurs.
    drafts = rng.integers(0, vocab, size=(batch, k)).astype(np.int32)
    drafts[:, 1:] = np.where(rng.random((batch, k - 1)) < 0.7, logits.argmax(-1)[:, :-1], drafts[:, 1:])
    accepted, decided = jax.jit(sampling.greedy_verify)(jnp.asarray(logits), jnp.asarray(drafts))
    for b in range(batch):
        t = logits[b].argmax(-1)
        a = 1
        while a < k and drafts[b, a] == t[a - 1]:
            a += 1
        assert int(accepted[b]) == a and int(decided[b]) == t[a - 1]
    assert set(np.asarray(accepted).tolist()) == set(range(1, k + 1))  # every length was exercised


def _tv(counts, probs):
    return 0.5 * np.abs(counts / counts.sum() - probs).sum()


def test_speculative_verify_reproduces_the_target_distribution():
    """Drafts v_2, v_3 ~ q (independently); the emitted tokens must follow p exactly:
    position L+1 ~ p_1; position L+2 given a >= 2 ~ p_2; t_3 given a = 3 ~ p_3; accept rate of v_2 = sum min(p, q)."""
    rng = np.random.default_rng(3)
    n, k, vocab = 200_000, 3, 5
    p = rng.dirichlet(np.ones(vocab), size=k).astype(np.float32)
    q = rng.dirichlet(np.ones(vocab), size=k - 1).astype(np.float32)
    for j in range(k - 1):
        assert _tv(q[j], p[j]) > 5 * TV_THRESHOLD  # accepting drafts blindly would fail the test
    drafts = np.zeros((n, k), np.int32)
    for j in range(k - 1):
        drafts[:, j + 1] = rng.choice(vocab, size=n, p=q[j] / q[j].sum())
    verify = jax.jit(sampling.speculative_verify)
    accepted, decided = verify(jnp.broadcast_to(p, (n, k, vocab)), jnp.broadcast_to(q, (n, k - 1, vocab)),
                               jnp.asarray(drafts), sampling.uniforms(jax.random.key(0), (n, k, sampling.DRAW_UNIFORMS)))
    accepted, decided = np.asarray(accepted), np.asarray(decided)
    first = np.where(accepted >= 2, drafts[:, 1], decided)
    assert _tv(np.bincount(first, minlength=vocab), p[0]) < TV_THRESHOLD
    reached = accepted >= 2
    second = np.where(accepted[reached] >= 3, drafts[reached, 2], decided[reached])
    assert _tv(np.bincount(second, minlength=vocab), p[1]) < TV_THRESHOLD
    assert _tv(np.bincount(decided[accepted == k], minlength=vocab), p[k - 1]) < 2 * TV_THRESHOLD
    assert abs(reached.mean() - np.minimum(p[0], q[0]).sum()) < 0.01


def test_speculative_verify_with_one_token_blocks_samples_p():
    n, vocab = 100_000, 5
    p = np.random.default_rng(4).dirichlet(np.ones(vocab), size=1).astype(np.float32)
    accepted, decided = jax.jit(sampling.speculative_verify)(
        jnp.broadcast_to(p, (n, 1, vocab)), jnp.zeros((n, 0, vocab)), jnp.zeros((n, 1), jnp.int32),
        sampling.uniforms(jax.random.key(1), (n, 1, sampling.DRAW_UNIFORMS)))
    assert np.all(np.asarray(accepted) == 1)
    assert _tv(np.bincount(np.asarray(decided), minlength=vocab), p[0]) < TV_THRESHOLD


def test_inverse_cdf_sample_matches_probs_and_never_picks_zero_mass():
    probs = np.array([0.0, 0.5, 0.0, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0, 0.4], np.float32) * 3  # unnormalised, a zero chunk
    n = 100_000
    u = np.array(sampling.uniforms(jax.random.key(2), (n, sampling.DRAW_UNIFORMS)))
    ends = [1.0, 2.0 ** -23, np.float32(1) - np.float32(2**-24)]  # the ends of (0, 1]
    u[:9] = [(a, b) for a in ends for b in ends]
    drawn = np.asarray(jax.jit(sampling.sample)(jnp.broadcast_to(probs, (n, probs.size)), jnp.asarray(u)))
    counts = np.bincount(drawn, minlength=probs.size)
    assert counts[probs == 0].sum() == 0 and counts.sum() == n
    assert _tv(counts, probs / probs.sum()) < TV_THRESHOLD


# ----- exactness of `sample` at a real vocabulary, computed, not sampled ----------------------------------------------
#
# `uniforms` returns j * 2^-23 for j = 1 .. 2^23, equally likely. An inverse-CDF level picks index i when the float32
# threshold fl(u * total) falls in its CDF step, so the probability it induces is (number of grid points j landing
# there) / 2^23: counted exactly below with float32 products, for every index at once.

GRID = 2 ** 23


def _grid_count_le(x, total):
    """#{j in 1..2^23 : fl32(j * 2^-23) * total <= x} elementwise (float32 arrays; total broadcasts; total > 0)."""
    x = np.asarray(x, np.float32)
    total = np.broadcast_to(np.asarray(total, np.float32), x.shape)
    finite = np.isfinite(x) & (total > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        est = np.where(finite, np.floor(x.astype(np.float64) / total * GRID), 0).astype(np.int64)
    count = np.zeros(x.shape, np.int64)
    for d in range(-3, 4):  # fl(j 2^-23 * total) is within one grid step of j 2^-23 * total: the boundary is here
        j = np.clip(est + d, 1, GRID)
        count = np.maximum(count, np.where((j.astype(np.float32) * np.float32(2.0 ** -23)) * total <= x, j, 0))
    top = np.clip(est + 3, 1, GRID)
    assert np.all((top.astype(np.float32) * np.float32(2.0 ** -23) * total > x) | (count == GRID) | ~finite)
    return np.where(finite, count, 0)


def _induced_by_inverse_cdf(cdf, weights=None):
    """The exact distribution of `first i with cdf[i] >= fl(u * cdf[-1])` over the uniform grid (the old float32
    sampler), or with `weights`, of `sampling.inverse_cdf` (first i with weights[i] > 0 as well, else the last
    positive one). cdf: [..., n] float32 as the sampler computed it -> float64 [..., n]."""
    level = cdf if weights is None else np.where(weights > 0, cdf, -np.inf)
    reached = _grid_count_le(np.maximum.accumulate(level, axis=-1), cdf[..., -1:])  # the first hit is a new max
    probs = np.diff(reached, axis=-1, prepend=0).astype(np.float64)
    if weights is not None:
        positive = weights > 0
        last = positive.shape[-1] - 1 - np.argmax(positive[..., ::-1], axis=-1)
        rest = np.where(positive.any(-1), GRID - reached[..., -1], 0)
        np.put_along_axis(probs, last[..., None], np.take_along_axis(probs, last[..., None], -1) + rest[..., None], -1)
    return probs / GRID


def _skewed_probs(vocab, rng):
    """A heavy-tailed LM-like distribution (Zipf 1.1 over a random token order), 1% exact zeros and one whole zero
    chunk, float32 normalised."""
    p = (1.0 / (rng.permutation(vocab) + 2.0) ** 1.1).astype(np.float32)
    p[rng.random(vocab) < 0.01] = 0
    chunks, width = sampling.chunk_layout(vocab)
    p[3 * width:4 * width] = 0
    return p / p.sum()


def test_sample_is_exact_at_a_151936_token_vocabulary_where_a_float32_cdf_is_not():
    """Total variation between p and the distribution `sample` induces (computed exactly over every uniform pair)
    is below 1e-4 at Qwen's V = 151936 and zero-probability tokens get exactly zero mass; the single float32 CDF
    over V (the previous sampler) is > 1e-3 away from the same p. The analytic model is checked against the real
    sampler on random and extreme uniforms."""
    vocab = 151936
    rng = np.random.default_rng(0)
    p = _skewed_probs(vocab, rng)
    target = p.astype(np.float64) / p.astype(np.float64).sum()
    chunked, chunk_mass = (np.asarray(x) for x in jax.jit(sampling.chunked_probs)(jnp.asarray(p)))
    cumsum = jax.jit(lambda x: jnp.cumsum(x, axis=-1))
    chunk_cdf, within_cdf = np.asarray(cumsum(chunk_mass)), np.asarray(cumsum(chunked))
    induced = (_induced_by_inverse_cdf(chunk_cdf, chunk_mass)[:, None]
               * _induced_by_inverse_cdf(within_cdf, chunked)).reshape(-1)
    assert np.all(induced[vocab:] == 0)
    induced = induced[:vocab]
    tv = 0.5 * np.abs(induced - target).sum()
    assert tv < 1e-4, tv
    assert induced[p == 0].max() == 0 and induced.sum() == pytest.approx(1.0, abs=1e-12)
    old = _induced_by_inverse_cdf(np.asarray(cumsum(jnp.asarray(p))))  # the float32 inverse CDF over V
    old_tv = 0.5 * np.abs(old - target).sum()
    assert old_tv > 10 * 1e-4, old_tv

    # The model above is the sampler: same draws on random pairs and on the grid's ends.
    u = np.array(sampling.uniforms(jax.random.key(3), (512, sampling.DRAW_UNIFORMS)))
    ends = [1.0, 2.0 ** -23]
    u[:4] = [(a, b) for a in ends for b in ends]
    drawn = np.asarray(jax.jit(jax.vmap(sampling.sample, in_axes=(None, 0)))(jnp.asarray(p), jnp.asarray(u)))

    def first_hit(cdf, weights, v):
        hit = (weights > 0) & (cdf >= np.float32(v) * cdf[-1])
        return int(np.argmax(hit)) if hit.any() else int(np.flatnonzero(weights > 0)[-1])

    chunks = [first_hit(chunk_cdf, chunk_mass, a) for a, _ in u]
    expected = [c * chunked.shape[1] + first_hit(within_cdf[c], chunked[c], b) for c, (_, b) in zip(chunks, u)]
    np.testing.assert_array_equal(drawn, expected)
    assert np.all(p[drawn] > 0)


def test_process_logits_skips_the_sort_when_no_filter_is_on():
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(3, 64)), jnp.float32)
    off = SamplingParams.create(temperature=0.7)
    np.testing.assert_array_equal(jax.jit(sampling.process_logits)(logits, off),
                                  (logits - logits.max(-1, keepdims=True)) / jnp.float32(0.7))
    jaxpr = jax.make_jaxpr(sampling.process_logits)(logits, off).jaxpr
    top_level = {eqn.primitive.name for eqn in jaxpr.eqns}
    assert "cond" in top_level and "sort" not in top_level  # the sort runs only in the filtering branch


def test_top_p_one_keeps_all_mass():
    """top_p = 1 (here with top_k = V, so the sorting branch runs) keeps every token even where the float32 running
    sum of the sorted probabilities reaches 1.0 before the tail (the old `mass_before < top_p` rule cut it off)."""
    vocab = 3000
    logits = (np.random.default_rng(0).normal(size=(1, vocab)) * 2).astype(np.float32)
    params = SamplingParams.create(temperature=1.0, top_k=vocab, top_p=1.0)
    got = np.asarray(jax.jit(sampling.process_logits)(jnp.asarray(logits), params))
    assert np.all(np.isfinite(got))
    probs = jax.nn.softmax(-jnp.sort(-jnp.asarray(logits)), axis=-1)
    mass_before = np.asarray(jnp.cumsum(probs, axis=-1) - probs)
    assert np.sum(mass_before >= 1.0) > 0  # the old rule would have dropped these tokens


# ----- knobs are checked where they enter, and a draw never returns a non-token ---------------------------------------

BAD_KNOBS = [("temperature", float("nan")), ("temperature", float("inf")), ("temperature", 1e39),
             ("temperature", -0.5), ("temperature", "0.7"), ("top_p", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
             ("top_k", -1), ("top_k", 2.5), ("top_k", True), ("beta", float("nan")), ("beta", 1.5)]


@pytest.mark.parametrize("name,value", BAD_KNOBS)
def test_sampling_params_refuse_bad_knobs_by_name(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams.create(**{name: value})


def _allowed(vocab, token_limit, reserved):
    """Reference: the ids a draw may return, as a NumPy bool mask."""
    allowed = np.arange(vocab) < token_limit
    allowed[list(reserved)] = False
    return allowed


# Temperatures from float32's smallest denormal (flushed to 0 on some devices) to its largest finite value.
EXTREME_KNOBS = [{"temperature": t} for t in (1.4e-45, 1e-30, 1.0, 1e30, float(np.finfo(np.float32).max))] + [
    {"temperature": 2.0, "top_k": 5}, {"temperature": 1e30, "top_k": 40}, {"temperature": 1.5, "top_p": 0.5},
    {"temperature": 1e30, "top_p": 0.99}]


@pytest.mark.parametrize("knobs", EXTREME_KNOBS)
def test_distribution_gives_non_tokens_zero_mass_at_every_accepted_knob(knobs):
    """Non-tokens (ids past the tokenizer, the mask, the pad) carry the largest logits here, and the mask the finite
    -1e30 that decode.py gives it: the distribution is finite, sums to 1 and gives all of them exactly 0; draws on
    uniforms at the ends of (0, 1] land on allowed ids only."""
    vocab, token_limit, reserved = 96, 80, (1, 2)
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(4, vocab)).astype(np.float32)
    logits[:, token_limit:] = 30.0
    logits[:, 2] = 40.0
    logits[:, 1] = -1e30
    params = SamplingParams.create(**knobs, token_limit=token_limit, reserved=reserved)
    probs = np.asarray(jax.jit(sampling.distribution)(jnp.asarray(logits), params))
    allowed = _allowed(vocab, token_limit, reserved)
    assert np.all(np.isfinite(probs)) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    assert np.all(probs[:, ~allowed] == 0)
    ends = np.array([[a, b] for a in (2.0 ** -23, 0.5, 1.0) for b in (2.0 ** -23, 0.5, 1.0)], np.float32)
    u = np.concatenate([ends, np.asarray(sampling.uniforms(jax.random.key(0), (55, 2)))])
    drawn = np.asarray(jax.jit(jax.vmap(sampling.sample, in_axes=(None, 0)))(jnp.asarray(probs[0]), jnp.asarray(u)))
    assert allowed[drawn].all()


def test_sample_of_nan_probabilities_stays_inside_the_vocabulary():
    """NaN probabilities (the logits of NaN weights) have no right answer, but never an id past V: the last
    chunk's zero padding used to be picked (id 528 at V = 512)."""
    vocab = 512
    drawn = jax.jit(sampling.sample)(jnp.full((3, vocab), jnp.nan), sampling.uniforms(jax.random.key(1), (3, 2)))
    assert np.all((0 <= np.asarray(drawn)) & (np.asarray(drawn) < vocab))


@pytest.fixture(scope="module")
def padded_generator(tiny_config):
    """A random tiny model whose embedding has 64 rows past its 512-token tokenizer (as an import pads SmolLM2's
    49154 ids to 49216 rows), and that tokenizer's ids minus the mask and pad: the allowed outputs."""
    from flax import nnx

    from tidar_jax.config import replace
    from tidar_jax.data.pipeline import load_or_train_tokenizer
    from tidar_jax.decoding.generation import Generator
    from tidar_jax.model.transformer import create_model

    tokenizer = load_or_train_tokenizer(tiny_config)
    cfg = replace(tiny_config, model={"vocab_size": tokenizer.vocab_size + 64})
    graphdef, params = nnx.split(create_model(cfg.model, seed=4))
    generator = Generator(graphdef, params, cfg.model, cfg.decode, tokenizer_size=tokenizer.vocab_size)
    ids = set(tokenizer.hf_tokenizer.get_vocab(with_added_tokens=True).values())
    return generator, ids - {cfg.model.mask_token_id, cfg.model.pad_token_id}


@pytest.mark.parametrize("mode", ["ar", "tidar"])
def test_generation_never_emits_a_non_token(padded_generator, mode):
    """Greedy, tiny and huge temperatures, top-k and top-p, AR and TiDAR: every generated id is one of the
    tokenizer's ids other than the mask and the pad (a random model spreads its mass over all 576 rows, so the
    64 padding rows and the pad would be drawn about 11% of the time without the filter)."""
    generator, allowed = padded_generator
    rng = np.random.default_rng(7)
    pool = sorted(allowed)
    prompts = [[pool[i] for i in rng.integers(0, len(pool), size=n)] for n in (3, 5, 8, 4, 6, 7, 2, 9)]
    for knobs in [{"temperature": 0.0}] + EXTREME_KNOBS[::2] + EXTREME_KNOBS[5:]:
        result = generator.generate(prompts, mode, 24, seed=3, **knobs)
        emitted = {t for row in result.tokens for t in row}
        assert emitted <= allowed, (knobs, sorted(emitted - allowed))
        assert sum(map(len, result.tokens)) > 8 * 4  # rows ran, not all stopped at once


@pytest.mark.parametrize("name,value", [(n, v) for n, v in BAD_KNOBS if n != "beta"] + [("beta", float("nan"))])
def test_generator_refuses_bad_knobs_and_prompts_past_the_tokenizer(padded_generator, name, value):
    generator, allowed = padded_generator
    with pytest.raises(ValueError, match=name):
        generator.generate([[5, 6, 7]], "tidar", 4, **{name: value})
    with pytest.raises(ValueError, match=r"outside the tokenizer's ids \[0, 512\)"):
        generator.generate([[5, max(allowed) + 1]], "ar", 4)


@pytest.mark.parametrize("mode", ["ar", "tidar"])
def test_greedy_decoding_never_emits_a_non_token_the_model_prefers(padded_generator, mode):
    """The same model with its head rows of the pad and of the 64 padding ids scaled up 50-fold, so that they win
    the argmax of most positions: greedy decoding still emits only tokens (the prefill's first token, the AR
    verifier and the TiDAR drafts alike)."""
    from flax import nnx

    from tidar_jax.decoding.generation import Generator

    generator, allowed = padded_generator
    cfg = generator.model_cfg
    params = jax.tree.map(lambda x: x, generator.params)
    pure = nnx.to_pure_dict(params)
    head = "lm_head" if "lm_head" in pure else "embed"
    weight = np.array(pure[head], np.float32)
    rows = [cfg.pad_token_id, *range(generator.token_limit, cfg.vocab_size)]
    if head == "embed":
        weight[rows] *= 50.0
    else:
        weight[:, rows] *= 50.0
    pure[head] = jnp.asarray(weight)
    nnx.replace_by_pure_dict(params, pure)
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    # Control: told nothing of the tokenizer, the same model emits the padding ids it prefers.
    unaware = Generator(generator.graphdef, params, cfg, generator.decode_cfg)
    assert any(t >= generator.token_limit for row in unaware.generate(prompts, mode, 16).tokens for t in row)
    biased = Generator(generator.graphdef, params, cfg, generator.decode_cfg, tokenizer_size=generator.token_limit)
    emitted = {t for row in biased.generate(prompts, mode, 16).tokens for t in row}
    assert emitted and emitted <= allowed, sorted(emitted - allowed)


def test_generator_refuses_pad_ids_and_seeds_that_do_not_fit_a_key(padded_generator):
    generator, _ = padded_generator
    pad = generator.model_cfg.pad_token_id
    assert pad != generator.model_cfg.eos_token_id
    with pytest.raises(ValueError, match=f"pad id {pad}"):
        generator.generate([[5, pad, 7]], "ar", 4)
    for seed in (2**32, -1, 2**70, 1.5, True):  # 2**32 would silently be the key of seed 0
        with pytest.raises(ValueError, match="seed must be an integer"):
            generator.generate([[5, 6, 7]], "ar", 4, seed=seed, temperature=1.0)
    assert generator.generate([[5, 6, 7]], "ar", 4, seed=2**32 - 1, temperature=1.0).tokens
