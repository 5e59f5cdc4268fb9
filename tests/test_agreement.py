"""tidar_jax/evals/agreement.py: first divergences, near-tie vs mismatch, and AR's top-2 gap checked against an independent
numpy reading of a plain unpadded full forward (one prompt + AR prefix at a time).

The near-tie is constructed: after AR decoding, token B's (tied) embedding is set to (1 - 1e-7) x that of AR's token
A at a chosen position, so B is the runner-up there at a gap of ~1e-7 |logit| (B never wins anywhere: its logit is
always just below A's). A method that emits B there has flipped a near-tie; one that emits the lowest-logit token
there has a real mismatch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax.decoding.generation import Generator
from tidar_jax.evals import agreement
from tidar_jax.layout import masks
from tidar_jax.model.transformer import create_model, forward

PROMPTS = [[5, 17, 99, 3, 250, 41], [8, 300, 12, 77], [60, 61, 62, 63, 64, 65, 66, 67, 68]]
NEW_TOKENS = 8
DIVERGE_AT = 3  # the near-tie row's first divergence (> 0, so the AR prefix is part of the recompute)


def _numpy_logits(graphdef, params, sequence):
    """float32 numpy next-token logits after `sequence`, from a forward of exactly that sequence (no padding)."""
    n = len(sequence)
    tokens = jnp.asarray([sequence], jnp.int32)
    logits, _ = forward(graphdef, params, tokens, jnp.arange(n, dtype=jnp.int32)[None], masks.causal_mask(n)[None])
    return np.asarray(logits[0, -1], np.float64)


@pytest.fixture(scope="module")
def setup(tiny_config):
    """(graphdef, params, model cfg, AR tokens per prompt, the near-tie tokens (A, B)) of a tiny model whose
    token B is AR's runner-up at a ~1e-7 relative gap at PROMPTS[1]'s position DIVERGE_AT."""
    cfg = tiny_config.model
    model = create_model(cfg, seed=3)
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, params)  # spread logits: greedy outputs vary
    ar = Generator(graphdef, params, cfg, tiny_config.decode).generate(PROMPTS, "ar", NEW_TOKENS, temperature=0.0)
    a = ar.tokens[1][DIVERGE_AT]
    used = {t for row in PROMPTS for t in row} | {t for row in ar.tokens for t in row}
    b = next(t for t in range(cfg.vocab_size - 1, 0, -1) if t not in used and t != cfg.mask_token_id)
    embed = np.asarray(params["embed"][...]).copy()
    embed[b] = embed[a] * np.float32(1 - 1e-7)
    params["embed"][...] = jnp.asarray(embed)
    tied = Generator(graphdef, params, cfg, tiny_config.decode).generate(PROMPTS, "ar", NEW_TOKENS, temperature=0.0)
    assert tied.tokens == ar.tokens  # B sits just below A everywhere, so AR's greedy output is unchanged
    logits = _numpy_logits(graphdef, params, PROMPTS[1] + ar.tokens[1][:DIVERGE_AT])
    assert np.argsort(-logits)[:2].tolist() == [a, b] and logits[a] > 0  # a real near-tie, B the runner-up
    return graphdef, params, cfg, ar.tokens, (a, b)


def test_first_divergence():
    assert agreement.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert agreement.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert agreement.first_divergence([1, 2, 3], [1, 2]) == 2  # a shorter output diverges where it stops
    assert agreement.first_divergence([], []) is None


def test_near_tie_mismatch_and_exact_rows_with_gaps_from_an_independent_forward(setup):
    graphdef, params, cfg, ar, (a, b) = setup
    prefix1 = PROMPTS[1] + ar[1][:DIVERGE_AT]
    worst = int(np.argmin(_numpy_logits(graphdef, params, PROMPTS[2] + ar[2][:1])))
    method = [list(ar[0]),                                        # exact
              ar[1][:DIVERGE_AT] + [b] + [7] * (NEW_TOKENS - DIVERGE_AT - 1),  # near-tie flip, then its own way
              ar[2][:1] + [worst] + ar[2][2:]]                    # real mismatch at position 1
    out = agreement.compare(graphdef, params, cfg, PROMPTS, ar, method)
    assert (out["rows"], out["exact_match_rows"], out["near_tie_rows"], out["mismatch_rows"]) == (3, 1, 1, 1)
    assert out["verdict"] == "mismatch" and out["strict"] and not out["strict_ok"]
    near, bad = out["divergences"]
    # Independent numpy reading of the same quantities from unpadded single-sequence forwards.
    ref1 = _numpy_logits(graphdef, params, prefix1)
    top1 = np.sort(ref1)[::-1]
    assert (near["row"], near["position"], near["ar_token"], near["method_token"]) == (1, DIVERGE_AT, a, b)
    assert near["top2_gap"] == pytest.approx(top1[0] - top1[1], abs=1e-5)
    assert near["token_gap"] == pytest.approx(ref1[a] - ref1[b], abs=1e-5)
    assert near["tolerance"] == pytest.approx(agreement.tolerance(cfg.compute_dtype, np.abs(ref1).max()), rel=1e-5)
    assert near["top2_gap"] < near["tolerance"] and near["near_tie"] and near["method_is_runner_up"]
    ref2 = _numpy_logits(graphdef, params, PROMPTS[2] + ar[2][:1])
    assert (bad["row"], bad["position"], bad["method_token"]) == (2, 1, worst)
    assert bad["token_gap"] == pytest.approx(ref2[ar[2][1]] - ref2[worst], abs=1e-4)
    assert bad["token_gap"] > 1.0 and not bad["near_tie"] and not bad["method_is_runner_up"] and bad["ar_is_top"]
    assert agreement.describe(out) == "False (1/3 rows)"
    # Without the mismatching row the verdict is a near-tie, shown with its gap; float32's strict check still fails.
    tie = agreement.compare(graphdef, params, cfg, PROMPTS[:2], ar[:2], method[:2])
    assert tie["verdict"] == "near-tie" and tie["strict_ok"] is False
    assert agreement.describe(tie) == f"near-tie (gap {tie['divergences'][0]['spread']:.0e})"
    # An explicit epsilon below the gap turns the near-tie into a mismatch; above it, back. (The gap is ~1 float32
    # ulp of the logit, so batch shapes move it a little: judge each epsilon on the same single-row recompute.)
    row = lambda eps: agreement.compare(graphdef, params, cfg, PROMPTS[1:2], ar[1:2], method[1:2], eps)  # noqa: E731
    spread = row(None)["divergences"][0]["spread"]
    assert spread > 0 and row(spread / 2)["mismatch_rows"] == 1 and row(spread * 2)["near_tie_rows"] == 1


def test_exact_rows_and_length_only_divergence(setup):
    graphdef, params, cfg, ar, _ = setup
    out = agreement.compare(graphdef, params, cfg, PROMPTS, ar, [list(r) for r in ar])
    assert (out["exact_match_rows"], out["verdict"], out["strict_ok"], out["divergences"]) == (3, "exact", True, [])
    assert agreement.describe(out) == "True"
    short = agreement.compare(graphdef, params, cfg, PROMPTS[:1], ar[:1], [ar[0][:-2]])
    (d,) = short["divergences"]
    assert (d["position"], d["method_token"], d["near_tie"], d["top2_gap"]) == (NEW_TOKENS - 2, None, False, None)
    assert short["mismatch_rows"] == 1
    with pytest.raises(ValueError, match="one entry per row"):
        agreement.compare(graphdef, params, cfg, PROMPTS, ar, ar[:2])


def test_tolerance_and_precision_per_dtype():
    assert agreement.tolerance("bfloat16", 25.0) == pytest.approx(4 * 2.0 ** -7 * 25.0)
    assert agreement.tolerance("float32", 25.0) == pytest.approx(4 * 2.0 ** -23 * 25.0)
    assert agreement.tolerance("bfloat16", 25.0, epsilon=0.01) == 0.01
    assert agreement.precision_name("float32") == "highest" and agreement.precision_name("bfloat16") == "default"
    with agreement.matmul_precision("bfloat16", "high"):
        assert jax.config.jax_default_matmul_precision == "high"
