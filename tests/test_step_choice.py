"""decoding/step_choice.py against plain-Python references on injected histograms and step costs (no timing).

References: a Monte-Carlo run of the decode rule (proposal j* = max{j in A : j <= a}, its slots shifted by a - j*,
fillers always rejected), hand-worked cases, and a brute force over every (K', A) with a plain-Python long-run
average; choices with injected costs, including ones where AR is faster.
"""

import functools
import itertools
import random

import pytest

from tidar_jax.decoding import step_choice
from tidar_jax.decoding.step_choice import StepCosts


def _simulated_tokens(histogram, k, lengths, steps=100_000, seed=0):
    """Mean tokens per step of `steps` decode steps: X ~ histogram truncated at k, a block of c real tokens accepts
    min(X, c), the next block holds k - (a - j*) real tokens."""
    rng = random.Random(seed)
    weights = list(histogram[1:k]) + [sum(histogram[k:])]
    draws = rng.choices(range(1, k + 1), weights=weights, k=steps)
    real, total = k, 0
    for x in draws:
        a = min(x, real)
        total += a
        real = k - (a - max(j for j in lengths if j <= a))
    return total / steps


@functools.lru_cache(maxsize=None)
def _reference_tokens(histogram, k, lengths, steps=2000):
    """The chain's long-run average in plain Python: the state distribution over `steps` steps from a full block."""
    weights = list(histogram[1:k]) + [sum(histogram[k:])]
    p = {x: w / sum(weights) for x, w in zip(range(1, k + 1), weights)}
    dist, total = {k: 1.0}, 0.0
    for _ in range(steps):
        nxt = {}
        for c, pc in dist.items():
            for x, px in p.items():
                a = min(x, c)
                total += pc * px * a
                c2 = k - (a - max(j for j in lengths if j <= a))
                nxt[c2] = nxt.get(c2, 0.0) + pc * px
        dist = nxt
    return total / steps


HISTOGRAMS = [[0, 30, 20, 10, 40], [0, 5, 5, 10, 80], [0, 70, 20, 5, 5], [0, 0, 0, 0, 10], [0, 1, 0, 0, 0]]


@pytest.mark.parametrize("histogram", HISTOGRAMS[:3])
@pytest.mark.parametrize("k,lengths", [(4, (1,)), (4, (1, 3)), (4, (1, 2, 4)), (3, (1, 2)), (4, (1, 2, 3, 4))])
def test_tokens_per_step_matches_a_simulated_decode(histogram, k, lengths):
    assert step_choice.tokens_per_step(histogram, k, lengths) == pytest.approx(
        _simulated_tokens(histogram, k, lengths), abs=0.02)


def test_hand_worked_cases():
    # Always accepting K with A = {1}: a full block accepts 4, leaving 1 real token; that block accepts 1 and the
    # next is full again: 4, 1, 4, 1, ... = 2.5 per step (the one-step approximation proposals.lost_tokens says 1).
    assert step_choice.tokens_per_step([0, 0, 0, 0, 10], 4, (1,)) == pytest.approx(2.5, abs=1e-5)
    assert step_choice.tokens_per_step([0, 0, 0, 0, 10], 4, (1, 2, 3, 4)) == 4.0
    # Truncation at K' = 2: a >= 2 becomes 2.
    assert step_choice.truncated([0, 1, 1, 2], 2) == [0.0, 0.25, 0.75]
    assert step_choice.tokens_per_step([0, 1, 1, 2], 2, (1, 2)) == pytest.approx(1.75)
    # A set never gains: every set's tokens <= the full set's, and the full set's are E[min(X, K')].
    for histogram in HISTOGRAMS:
        full = step_choice.tokens_per_step(histogram, 4, (1, 2, 3, 4))
        assert all(step_choice.tokens_per_step(histogram, 4, (1,) + rest) <= full + 1e-9
                   for m in range(4) for rest in itertools.combinations((2, 3, 4), m))
    with pytest.raises(ValueError, match="count some steps"):
        step_choice.tokens_per_step([0, 0, 0], 2, (1,))
    with pytest.raises(ValueError, match=r"in \[1, 3\]"):
        step_choice.truncated([0, 1, 1, 1], 4)


def _costs(ar, per_query_token, base=1.0):
    """Injected step seconds: base + per_query_token * (K' + m K') for every K' in 2..4 and m in 1..K'."""
    return StepCosts(ar=ar, tidar={(k, m): base + per_query_token * k * (1 + m)
                                   for k in range(2, 5) for m in range(1, k + 1)})


def _brute_force(histogram, costs, batch):
    """(tokens/s, K', A) of every TiDAR (K', A) with a cost, by plain-Python reference tokens."""
    out = []
    for k in range(2, len(histogram)):
        for m in range(k):
            for rest in itertools.combinations(range(2, k + 1), m):
                lengths = (1,) + rest
                if (k, len(lengths)) in costs.tidar:
                    tokens = _reference_tokens(tuple(histogram), k, lengths)
                    out.append((batch * tokens / costs.tidar[(k, len(lengths))], k, lengths))
    return sorted(out, reverse=True)


@pytest.mark.parametrize("histogram", HISTOGRAMS)
@pytest.mark.parametrize("costs", [_costs(1.0, 0.02), _costs(1.0, 0.3), _costs(0.5, 0.5, base=0.2)],
                         ids=["flat", "steep", "ar-cheap"])
def test_choice_equals_a_brute_force_over_every_set(histogram, costs):
    choice = step_choice.choose(histogram, costs, batch=2)
    reference = _brute_force(histogram, costs, 2)
    best_rate, best_k, best_lengths = reference[0]
    assert choice.best.tokens_per_second == pytest.approx(best_rate, rel=2e-3)
    # The reference's winner is (within the references' precision) as good as the one chosen.
    assert step_choice.tokens_per_step(histogram, best_k, best_lengths) * 2 / costs.tidar[
        (best_k, len(best_lengths))] == pytest.approx(choice.best.tokens_per_second, rel=2e-3)
    assert choice.table[0] == choice.best and len(choice.table) == len(costs.tidar)
    assert [o.tokens_per_second for o in choice.table] == sorted((o.tokens_per_second for o in choice.table),
                                                                 reverse=True)
    assert choice.ar.tokens_per_second == pytest.approx(2 / costs.ar)
    assert choice.ar_faster == (choice.ar.tokens_per_second > best_rate)


def test_when_ar_is_faster_the_best_tidar_is_still_chosen():
    costs = _costs(ar=0.1, per_query_token=0.5)
    choice = step_choice.choose([0, 70, 20, 5, 5], costs, batch=1)
    assert choice.ar_faster and not choice.best.is_ar
    assert choice.best.tokens_per_second == max(o.tokens_per_second for o in choice.table)


def test_constraints_limit_the_options():
    histogram, costs = [0, 30, 20, 10, 40], _costs(1.0, 0.05)
    fixed_k = step_choice.choose(histogram, costs, 1, block_size=3)
    assert {o.block_size for o in fixed_k.table} == {3} and len(fixed_k.table) == 3
    full = step_choice.choose(histogram, costs, 1, proposal_lengths=())
    assert [(o.block_size, o.proposal_lengths) for o in sorted(full.table, key=lambda o: o.block_size)] == [
        (2, (1, 2)), (3, (1, 2, 3)), (4, (1, 2, 3, 4))]
    one_set = step_choice.choose(histogram, costs, 1, proposal_lengths=(1, 3))
    assert {(o.block_size, o.proposal_lengths) for o in one_set.table} == {(3, (1, 3)), (4, (1, 3))}
    with pytest.raises(ValueError, match="no measured step cost fits block size 4.*measured: K=2 with 1 proposal"):
        step_choice.choose(histogram, StepCosts(ar=1.0, tidar={(2, 1): 1.0}), 1, block_size=4)


def test_candidates_to_measure_are_the_best_set_of_each_size():
    histogram = [0, 30, 20, 10, 40]
    measured = step_choice.candidates_to_measure(histogram, [3, 4])
    assert [(k, len(a)) for k, a in measured] == [(3, 1), (3, 2), (3, 3), (4, 1), (4, 2), (4, 3), (4, 4)]
    for k, lengths in measured:
        best = max(_reference_tokens(tuple(histogram), k, (1,) + rest)
                   for rest in itertools.combinations(range(2, k + 1), len(lengths) - 1))
        assert _reference_tokens(tuple(histogram), k, lengths) == pytest.approx(best, abs=2e-3)
