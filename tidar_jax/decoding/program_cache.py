"""A bounded least-recently-used cache of compiled programs (XLA executables), keyed by a program signature.

Why bounded: every executable pins its compiled code and buffers in host and device memory for as long as it is
referenced, and a long-lived process (a server, an evaluation sweep) that meets many shapes, block sizes or models
would otherwise grow without limit. Shape buckets keep the working set of a steady workload small (a prefill per
prompt bucket and a decode loop per batch bucket and mode), so a bound of a few dozen programs costs no
recompilation there, and when it is exceeded the program unused for longest goes first.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Hashable

DEFAULT_MAX_PROGRAMS = 64


class ProgramCache:
    """`get(signature, build)`: the cached program, or `build()` stored under `signature` (a miss), evicting the
    least recently used program once more than `max_programs` are held. `hits` / `misses` / `evictions` count
    lookups since creation (tests read `misses` as the number of compilations)."""

    def __init__(self, max_programs: int = DEFAULT_MAX_PROGRAMS):
        self._programs: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self.hits = self.misses = self.evictions = 0
        self.max_programs = max_programs

    @property
    def max_programs(self) -> int:
        return self._max

    @max_programs.setter
    def max_programs(self, value: int) -> None:
        """Changes the bound; a smaller one evicts the least recently used programs at once."""
        if value < 1:
            raise ValueError(f"max_programs must be >= 1, got {value}")
        self._max = value
        self._evict()

    def __len__(self) -> int:
        return len(self._programs)

    def __contains__(self, signature: Hashable) -> bool:
        return signature in self._programs

    def get(self, signature: Hashable, build: Callable[[], Any]) -> Any:
        program = self._programs.get(signature)
        if program is None:
            self.misses += 1
            program = self._programs[signature] = build()
            self._evict()
        else:
            self.hits += 1
            self._programs.move_to_end(signature)
        return program

    def _evict(self) -> None:
        while len(self._programs) > self._max:
            self._programs.popitem(last=False)
            self.evictions += 1
