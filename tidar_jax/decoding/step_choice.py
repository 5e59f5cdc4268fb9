"""Acceptance-aware step choice: the TiDAR block size K' and proposal set A with the highest expected tokens/s.

Pure functions (plain Python and numpy, nothing compiled). Inputs:
- the acceptance histogram h measured at the trained K with the full proposal set, greedy, beta = 1: h[a] = steps
  (per row) that accepted a tokens, a = 1..K, index 0 unused (`GenerationResult.acceptance_histogram`);
- measured step costs for one batch bucket (`StepCosts`): seconds of one compiled AR decode step and of TiDAR steps
  of K' drafts with m proposal blocks.

The model (what is assumed, not measured):
1. Truncation. A block of K' <= K drafts accepts min(a, K') where a block of K would accept a: the acceptance at K'
   is h truncated at K' (h'[K'] = sum of h[a >= K']). The drafts of a smaller block are taken as good as those of
   the trained K (the model was trained at K; a smaller block's masks see fewer neighbours, so they may differ).
2. Sparse sets. Steps accept independent draws X ~ h' except for what a sparse set forces (proposals.py, decode.py):
   after a step accepting a, the next block comes from proposal j* = max{j in A : j <= a} shifted by a - j*, and
   its last a - j* guesses are mask fillers the verifier always rejects, so the next block holds c = K' - (a - j*)
   real tokens and accepts min(X, c). That is a Markov chain on c (c = K' after prefill; always K' for the full
   set), and the expected tokens per step is its long-run average sum_c pi(c) E[min(X, c)] from c = K', computed
   to about 1e-6 (a Cesaro sum over 2^20 steps, so periodic chains are averaged too). A shifted proposal's fresh
   guesses come from later slots than the full set's would; they are taken as equally accurate.
   (`proposals.lost_tokens`, which infer.eval's suggested set uses, is this chain's one-step approximation: it caps
   the next step after an uncapped one only.)
3. Cost. A step's cost depends on its shape only: K' and m = |A| (K' + m*K' query tokens); which m lengths form A
   is data (mask and positions), not shape. So one measured step per (K', m) prices every set of that size.
4. Throughput. expected tokens/s = batch * tokens per step / step seconds; AR: batch * 1 / AR step seconds. Prefill,
   the last partial step and rows finishing at different times are left out (they favour neither much on long
   generations; `infer.bench` shows measured against expected).

A choice is among TiDAR configurations only: when AR is expected faster, `Choice.ar_faster` says so (`infer.tune`
prints it) but the user asked for TiDAR, so `best` stays the fastest TiDAR option. Ties go to fewer query tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Mapping, Sequence

import numpy as np

from tidar_jax.config.schema import AUTO

_CESARO_DOUBLINGS = 20  # average over 2^20 steps: the transient and a period shift it by O(K / 2^20)


@dataclasses.dataclass(frozen=True)
class StepCosts:
    """Measured seconds of one decode step for one batch bucket: `ar`, and `tidar[(K', m)]` for a TiDAR step of K'
    drafts and m proposal blocks (any set of m lengths: model point 3)."""

    ar: float
    tidar: Mapping[tuple[int, int], float]


@dataclasses.dataclass(frozen=True)
class Option:
    """One decoding configuration for a batch bucket: block_size K' (1 and proposal_lengths () for AR),
    proposal_lengths A, expected tokens per step (per row), measured step seconds, batch rows."""

    block_size: int
    proposal_lengths: tuple[int, ...]
    tokens_per_step: float
    step_seconds: float
    batch: int

    @property
    def is_ar(self) -> bool:
        return not self.proposal_lengths

    @property
    def query_tokens(self) -> int:
        """Query tokens per row of one step: 1 for AR, K' + |A|*K' for TiDAR."""
        return 1 if self.is_ar else self.block_size * (1 + len(self.proposal_lengths))

    @property
    def tokens_per_second(self) -> float:
        return self.batch * self.tokens_per_step / self.step_seconds

    def describe(self) -> str:
        if self.is_ar:
            return "AR"
        return f"K={self.block_size} A={list(self.proposal_lengths)}"


@dataclasses.dataclass(frozen=True)
class Choice:
    """`best`: the TiDAR option with the highest expected tokens/s; `ar`: the AR option; `table`: every TiDAR
    option considered, best first."""

    best: Option
    ar: Option
    table: tuple[Option, ...]

    @property
    def ar_faster(self) -> bool:
        return self.ar.tokens_per_second > self.best.tokens_per_second


def truncated(histogram: Sequence[float], block_size: int) -> list[float]:
    """Acceptance probabilities at K' = block_size (model point 1): index a = 1..K' (index 0 is 0). Raises
    ValueError for a histogram without steps or a K' outside [1, K]."""
    k, total = len(histogram) - 1, float(sum(histogram[1:]))
    if not total > 0 or any(n < 0 for n in histogram[1:]):
        raise ValueError(f"the acceptance histogram must count some steps (non-negative counts), got {list(histogram)}")
    if not 1 <= block_size <= k:
        raise ValueError(f"block size {block_size} must be in [1, {k}] (the K the acceptance was measured at)")
    p = [0.0] + [n / total for n in histogram[1:block_size]]
    return p + [sum(histogram[block_size:]) / total]


def tokens_per_step(histogram: Sequence[float], block_size: int, lengths: Sequence[int]) -> float:
    """Expected tokens per step (per row) of K' = block_size with proposal set `lengths` (model points 1 and 2);
    histogram: measured at the trained K, index a = 1..K."""
    p, k = truncated(histogram, block_size), block_size
    gain = np.array([sum(p[x] * min(x, c) for x in range(1, k + 1)) for c in range(1, k + 1)])
    if tuple(lengths) == tuple(range(1, k + 1)):
        return float(gain[-1])  # every block is full: E[X]
    covering = [0] + [max(j for j in lengths if j <= a) for a in range(1, k + 1)]  # j*(a); a >= 1
    step = np.zeros((k, k))  # step[c-1, c'-1]: probability that a block of c real tokens leads to one of c'
    for c in range(1, k + 1):
        for x in range(1, k + 1):
            a = min(x, c)
            step[c - 1, k - (a - covering[a]) - 1] += p[x]
    total, power = np.eye(k), step  # total = sum_{t < T} step^t, power = step^T, T doubling
    for _ in range(_CESARO_DOUBLINGS):
        total, power = total + total @ power, power @ power
    return float(total[k - 1] @ gain / 2**_CESARO_DOUBLINGS)


@functools.lru_cache(maxsize=256)
def _best_set(histogram: tuple[float, ...], block_size: int, size: int) -> tuple[tuple[int, ...], float]:
    candidates = [(1,) + rest for rest in itertools.combinations(range(2, block_size + 1), size - 1)]
    scored = [(tokens_per_step(histogram, block_size, c), c) for c in candidates]
    # Ties (to 1e-5, above the long-run average's numerical error): the lexicographically first set.
    value, best = max(scored, key=lambda s: (round(s[0], 5), [-j for j in s[1]]))
    return best, value


def best_set(histogram: Sequence[float], block_size: int, size: int) -> tuple[tuple[int, ...], float]:
    """(A, its expected tokens per step): the proposal set of `size` lengths (1 among them) with the most expected
    tokens per step at K' = block_size; exhaustive over the C(K'-1, size-1) sets (cached per histogram)."""
    if not 1 <= size <= block_size:
        raise ValueError(f"a proposal set of K'={block_size} has 1..{block_size} lengths, got {size}")
    return _best_set(tuple(float(n) for n in histogram), block_size, size)


def _candidates(histogram, costs: StepCosts, block_size, proposal_lengths) -> list[tuple[int, tuple, float]]:
    """(K', A, tokens per step) of every TiDAR configuration the constraints allow and `costs` prices."""
    trained = len(histogram) - 1
    sizes = sorted({k for k, _ in costs.tidar if 2 <= k <= trained} if block_size == AUTO else {block_size})
    out = []
    for k in sizes:
        if proposal_lengths == AUTO:
            out += [(k, *best_set(histogram, k, m)) for m in range(1, k + 1) if (k, m) in costs.tidar]
            continue
        lengths = tuple(proposal_lengths) or tuple(range(1, k + 1))
        if lengths[-1] <= k and (k, len(lengths)) in costs.tidar:
            out.append((k, lengths, tokens_per_step(histogram, k, lengths)))
    return out


def choose(histogram: Sequence[float], costs: StepCosts, batch: int, block_size: int | str = AUTO,
           proposal_lengths: Sequence[int] | str = AUTO) -> Choice:
    """The TiDAR configuration with the highest expected tokens/s for a batch bucket of `batch` rows.

    block_size: "auto" (any K' in 2..K that `costs` prices) or one K'; proposal_lengths: "auto" (per K' and set size
    m, the best set of m lengths, `best_set`), () for the full set of each K', or one set A (only K' >= max(A)).
    Raises ValueError when the constraints leave no option that `costs` prices (naming what was measured).
    """
    options = [Option(k, lengths, value, costs.tidar[(k, len(lengths))], batch)
               for k, lengths, value in _candidates(histogram, costs, block_size, proposal_lengths)]
    if not options:
        measured = ", ".join(f"K={k} with {m} proposal block{'s' * (m > 1)}" for k, m in sorted(costs.tidar))
        raise ValueError(f"no measured step cost fits block size {block_size} and proposal set "
                         f"{proposal_lengths if proposal_lengths == AUTO else list(proposal_lengths) or 'full'}; "
                         f"measured: {measured or 'none'} (rerun infer.tune with those block sizes)")
    options.sort(key=lambda o: (-o.tokens_per_second, o.query_tokens, o.block_size, o.proposal_lengths))
    return Choice(best=options[0], ar=Option(1, (), 1.0, costs.ar, batch), table=tuple(options))


def candidates_to_measure(histogram: Sequence[float], block_sizes: Sequence[int]) -> list[tuple[int, tuple[int, ...]]]:
    """The TiDAR steps worth timing: for every K' in block_sizes and set size m = 1..K', the best set of m lengths
    (its cost prices every set of that size: model point 3)."""
    return [(k, best_set(histogram, k, m)[0]) for k in block_sizes for m in range(1, k + 1)]
