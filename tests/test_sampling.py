"""Pure sampling / verification functions against NumPy and Python-loop references, and the exactness of
speculative rejection sampling as a statistical test on synthetic distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax import sampling
from tidar_jax.sampling import SamplingParams

# With >= 100k draws per distribution over 5 tokens, sampling noise gives a TV distance around 0.002-0.003; a
# wrong sampler (e.g. accepting every draft, or resampling from p instead of the residual) is off by > 0.05 here.
TV_THRESHOLD = 0.01


def _numpy_process(logits, temperature, top_k, top_p):
    """Reference: temperature, keep the top_k largest, then the smallest prefix (by probability) of mass >= top_p."""
    x = logits / temperature
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
                               jnp.asarray(drafts), sampling.uniforms(jax.random.key(0), (n, k)))
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
        sampling.uniforms(jax.random.key(1), (n, 1)))
    assert np.all(np.asarray(accepted) == 1)
    assert _tv(np.bincount(np.asarray(decided), minlength=vocab), p[0]) < TV_THRESHOLD


def test_inverse_cdf_sample_matches_probs_and_never_picks_zero_mass():
    probs = np.array([0.0, 0.5, 0.0, 0.2, 0.3, 0.0], np.float32) * 3  # unnormalised on purpose
    n = 100_000
    u = np.array(sampling.uniforms(jax.random.key(2), (n,)))
    u[:3] = [1.0, 1e-12, np.float32(1) - np.float32(2**-24)]  # the ends of (0, 1]
    drawn = np.asarray(jax.jit(sampling.sample)(jnp.broadcast_to(probs, (n, 6)), jnp.asarray(u)))
    counts = np.bincount(drawn, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0
    assert _tv(counts, probs / probs.sum()) < TV_THRESHOLD
