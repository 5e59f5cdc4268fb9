"""Shape buckets: a length (prompt tokens, batch rows, output capacity) is rounded up to the smallest bucket that
holds it, so that a new length within a bucket reuses the compiled program instead of recompiling.

- `bucket_for(length, buckets)`: the smallest entry of the sorted `buckets` that is >= length;
- `length_buckets(max_len, smallest, extra)`: power-of-two multiples of `smallest` up to one holding max_len (plus
  `extra` entries), e.g. the output capacities `max_new_tokens * 2^i`.
"""

from __future__ import annotations

from typing import Sequence


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest of the sorted `buckets` that holds `length`; ValueError when none does."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def length_buckets(max_len: int, smallest: int = 16, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """Sorted buckets: `extra` entries up to the first power-of-two-multiple of `smallest` that holds `max_len`,
    plus smallest * 2^i up to there (so the last entry is that multiple)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    top = smallest
    while top < max_len:
        top *= 2
    powers = set()
    b = smallest
    while b <= top:
        powers.add(b)
        b *= 2
    return tuple(sorted(powers | {e for e in extra if 0 < e <= top}))
