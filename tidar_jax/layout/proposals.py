"""Sparse proposal sets: which proposal blocks a TiDAR step computes, and which one drafts the next block.

A full TiDAR step (design.md section 3) feeds K drafts plus one proposal block of K mask tokens for every possible
accepted length j = 1..K: Q = K + K*K query tokens. Proposal j is conditioned on v_1..v_j and drafts positions
L+j .. L+j+K-1. When some acceptance lengths are rare, computing their blocks buys little: a proposal set A (a subset
of 1..K that contains 1) computes only |A| blocks, Q = K + |A|*K.

After verification with accepted length a, the next block is drafted by the longest computed proposal that the
accepted prefix covers, j* = max{j in A : j <= a} (it exists because 1 is in A). Its slot r predicts position
L+j*+r-1; the next block sits at L+a .. L+a+K-1, so its draft i (2..K) is slot i + (a - j*) of proposal j*, and the
last a - j* drafts have no slot: they are filled with the mask token, which the verifier never outputs (its logit is
suppressed), so a filler is always rejected. A sparse set therefore offers fewer useful drafts after some steps, and
never changes what is emitted: greedy verification stays exactly AR (any draft block is lossless), and speculative
sampling stays exact (the real drafts are sampled from distributions that depend only on committed tokens; a filler
is a point mass the verifier rejects with probability 1, which then samples from p itself).

Zyphra's vLLM TiDAR port names the same sets by accepted drafts beyond the decided token ("acc levels", with a
K+1-token verify segment): its level n is our j = n + 1, so its {0, 6, 16} at 16 drafts is our {1, 7, 17} at K = 17,
and its "must include level 0" is our 1 in A.

The beta < 1 verifier mix reads the slot-1 row of proposal j for position L+j, which only exists for j in A: a
sparse set needs beta = 1 (`check_beta`). The full set keeps today's step exactly.

This module is plain Python (the config validates with it); the step itself is in decode.py (`covering_proposal`,
`shifted_slots`) and masks.py (`step_mask` / `step_positions` with a set).
"""

from __future__ import annotations

import itertools
from typing import Sequence


def resolve_proposal_lengths(lengths: Sequence[int] | None, block_size: int,
                             field: str = "decode.proposal_lengths") -> tuple[int, ...]:
    """The proposal set A for block size K: None or empty = all of 1..K; otherwise checked to be strictly increasing
    integers in [1, K] that include 1. Raises ValueError naming `field`."""
    if not lengths:
        return tuple(range(1, block_size + 1))
    values = list(lengths)
    if any(isinstance(j, bool) or int(j) != j for j in values):
        raise ValueError(f"{field} must be a list of integers, got {values}")
    values = [int(j) for j in values]
    if values != sorted(set(values)):
        raise ValueError(f"{field} must be strictly increasing (sorted, no repeats), got {values}")
    if values[0] != 1:
        raise ValueError(f"{field} must include 1 (the proposal conditioned on v_1 alone, the only one every "
                         f"accepted length covers), got {values}")
    if values[-1] > block_size:
        raise ValueError(f"{field} entries must be acceptance lengths in [1, K={block_size}], got {values}")
    return tuple(values)


def is_sparse(lengths: Sequence[int], block_size: int) -> bool:
    """Whether A misses some of 1..K."""
    return tuple(lengths) != tuple(range(1, block_size + 1))


def check_beta(beta: float, lengths: Sequence[int], block_size: int, field: str = "beta") -> None:
    """A sparse set verifies with the AR logits alone: beta must be 1 (the mix needs proposal j's slot-1 row for
    every j)."""
    if beta != 1.0 and is_sparse(lengths, block_size):
        raise ValueError(f"{field} must be 1 with a sparse proposal set {list(lengths)} (the beta mix needs the "
                         f"proposal block of every acceptance length 1..{block_size}), got {beta}")


def _covering(lengths: Sequence[int], a: int) -> int:
    return max(j for j in lengths if j <= a)


def lost_drafts(histogram: Sequence[int], lengths: Sequence[int]) -> float:
    """Mean guesses per step that a set replaces by fillers, sum_a h[a] (a - j*(a)) / sum_a h[a], for an acceptance
    histogram h (index a = 1..K; index 0 unused) measured with the full set."""
    total = sum(histogram[1:])
    return sum(n * (a - _covering(lengths, a)) for a, n in enumerate(histogram) if a >= 1) / total if total else 0.0


def lost_tokens(histogram: Sequence[int], lengths: Sequence[int]) -> float:
    """Expected tokens per step a set emits fewer than the full set, were successive steps' accepted lengths
    independent draws from `histogram` (a model, not a measurement): after a step accepting a, the next block holds
    K - (a - j*) real tokens, so a next acceptance a' above that is cut to it:
    sum_a p(a) sum_a' p(a') max(0, a' - K + a - j*(a))."""
    k, total = len(histogram) - 1, sum(histogram[1:])
    if not total:
        return 0.0
    p = [n / total for n in histogram]
    return sum(p[a] * p[b] * max(0, b - k + a - _covering(lengths, a))
               for a in range(1, k + 1) for b in range(1, k + 1))


def best_sets(histogram: Sequence[int]) -> list[dict]:
    """For every set size m = 1..K: the set A (containing 1) with the fewest `lost_tokens` on `histogram` (ties: the
    lexicographically first), with its step size Q = K + m*K, `lost_tokens` (as a fraction of the full set's mean
    tokens per step, too) and `lost_drafts`. Exhaustive over the 2^(K-1) sets: about a second at K = 16."""
    k, total = len(histogram) - 1, sum(histogram[1:])
    mean = sum(a * n for a, n in enumerate(histogram)) / total if total else 1.0
    out = []
    for m in range(1, k + 1):
        candidates = [(1,) + rest for rest in itertools.combinations(range(2, k + 1), m - 1)]
        lost, best = min((lost_tokens(histogram, c), c) for c in candidates)
        out.append({"proposal_lengths": list(best), "query_tokens": k + m * k, "lost_tokens_per_step": lost,
                    "lost_token_fraction": lost / mean, "lost_drafts_per_step": lost_drafts(histogram, best)})
    return out


def suggest_set(histogram: Sequence[int], max_loss: float = 0.02) -> dict:
    """The smallest of `best_sets` whose `lost_token_fraction` is at most `max_loss` (the full set loses nothing, so
    one always qualifies)."""
    return next(s for s in best_sets(histogram) if s["lost_token_fraction"] <= max_loss)
