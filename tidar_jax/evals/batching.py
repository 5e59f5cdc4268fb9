"""Fixed-shape batched decoding for benchmarks: every batch has the same number of rows and a prompt-length bucket,
so a whole benchmark compiles one prefill per (bucket, mode) and one decode loop per mode.

- `length_buckets` / `bucket_for` (from buckets.py): power-of-two length buckets, the smallest that holds a length;
- `decode_config_for`: a DecodeConfig whose buckets, cache and capacity fit the benchmark's longest prompt and
  output, so no row stops early for lack of room;
- `BatchDecoder.run`: one batch through `Generator.prefill` / `Generator.advance` (the same compiled programs as
  `Generator.generate`), with the last partial batch padded by repeating its last prompt (those rows are dropped
  from the outputs and statistics), optional stop strings checked every `chunk_forwards` forwards (the loop ends
  once every real row has stopped), per-row forward counts, and compilation kept out of the timing by a warm-up per
  new program;
- `cut_at_eos`, `truncate_at_stops`: completion post-processing.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import numpy as np

from tidar_jax.config import DecodeConfig
from tidar_jax.decoding import decode
from tidar_jax.decoding.buckets import bucket_for, length_buckets
from tidar_jax.decoding.generation import Generator


def decode_config_for(dec: DecodeConfig, max_prompt_len: int, max_new_tokens: int, block_size: int) -> DecodeConfig:
    """`dec` with power-of-two prompt buckets (keeping its own ones) up to one holding `max_prompt_len`, capacity
    `max_new_tokens`, block size K, and a KV cache for the largest bucket + `max_new_tokens` + two blocks (the
    same room rule as infer/common.py's decode_room)."""
    buckets = length_buckets(max_prompt_len, smallest=min(dec.prompt_buckets), extra=dec.prompt_buckets)
    cache = max(buckets[-1] + 1, buckets[-1] + max_new_tokens + 2 * block_size)
    return dataclasses.replace(dec, block_size=block_size, max_new_tokens=max_new_tokens, prompt_buckets=buckets,
                               max_cache_len=cache)


def cut_at_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """The tokens before the first EOS."""
    tokens = list(tokens)
    return tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


@dataclasses.dataclass
class BatchOutput:
    """Per real row: tokens (new tokens as generated, an ending EOS kept), row_forwards (forwards the row was active
    for, prefill included), finish_reasons ("eos" | "length" | "cache" | "stop": a stop string was seen). forwards:
    batch forwards; wall_time_s: prefill + decoding (+ the stop checks), compilation excluded unless
    the decoder was made with warmup=False."""

    tokens: list[list[int]]
    row_forwards: list[int]
    finish_reasons: list[str]
    forwards: int
    wall_time_s: float


class BatchDecoder:
    """Runs batches of exactly `batch_size` rows through `generator` (see the module docstring). With `warmup`
    (default) the first batch of every new program shape is also run once untimed, so that `wall_time_s` never
    includes compilation; `warmup_time_s` sums those runs."""

    def __init__(self, generator: Generator, batch_size: int, chunk_forwards: int = 16, warmup: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if chunk_forwards < 1:
            raise ValueError(f"chunk_forwards must be >= 1, got {chunk_forwards}")
        self.generator, self.batch_size, self.chunk_forwards = generator, batch_size, chunk_forwards
        self.warmup = warmup
        self._warm: set = set()
        self.warmup_time_s = 0.0

    def _signature(self, rows, mode, max_new_tokens, temperature):
        gen = self.generator
        dec = gen.decode_cfg
        limit = dec.max_new_tokens if max_new_tokens is None else max_new_tokens
        greedy = (dec.temperature if temperature is None else temperature) == 0
        return (gen.batch_bucket(len(rows)), bucket_for(max(map(len, rows)), dec.prompt_buckets), mode, greedy,
                gen.capacity(limit))

    def run(self, prompts: Sequence[Sequence[int]], mode: str, max_new_tokens: int | None = None, *,
            stop: Callable[[int, list[int]], bool] | None = None, seed: int = 0, beta: float | None = None,
            temperature: float | None = None, top_k: int | None = None, top_p: float | None = None) -> BatchOutput:
        """Generates for up to `batch_size` prompts. `stop(i, new_tokens_of_row_i)` -> True once row i is done
        (e.g. its text holds a stop string); checked after the prefill and after every `chunk_forwards` forwards."""
        n = len(prompts)
        if not 1 <= n <= self.batch_size:
            raise ValueError(f"a batch holds 1..{self.batch_size} prompts, got {n}")
        rows = [list(p) for p in prompts] + [list(prompts[-1])] * (self.batch_size - n)
        gen = self.generator
        knobs = dict(beta=beta, temperature=temperature, top_k=top_k, top_p=top_p)
        signature = self._signature(rows, mode, max_new_tokens, temperature)
        if self.warmup and signature not in self._warm:  # compile (and run once) outside the timed region
            start = time.perf_counter()
            state, spec, sp = gen.prefill(rows, mode, max_new_tokens, seed, **knobs)
            jax.block_until_ready(gen.advance(state, spec, sp, 1).tokens)
            self._warm.add(signature)
            self.warmup_time_s += time.perf_counter() - start
        start = time.perf_counter()
        state, spec, sp = gen.prefill(rows, mode, max_new_tokens, seed, **knobs)
        stopped = np.zeros(n, bool)
        if stop is None:
            state = gen.advance(state, spec, sp)
        else:
            bound = 1
            while True:
                tokens, counts, finish = jax.device_get((state.tokens, state.num_tokens, state.finish))
                for i in range(n):
                    if not stopped[i] and finish[i] == decode.RUNNING:
                        stopped[i] = bool(stop(i, tokens[i, :counts[i]].tolist()))
                if all(stopped[i] or finish[i] != decode.RUNNING for i in range(n)):
                    break
                bound += self.chunk_forwards
                state = gen.advance(state, spec, sp, bound)
        tokens, counts, row_forwards, forwards, finish = jax.device_get(
            (state.tokens, state.num_tokens, state.row_forwards, state.forwards, state.finish))
        wall = time.perf_counter() - start
        reasons = ["stop" if stopped[i] and finish[i] == decode.RUNNING else decode.FINISH_NAMES[int(finish[i])]
                   for i in range(n)]
        return BatchOutput(tokens=[tokens[i, :counts[i]].tolist() for i in range(n)],
                           row_forwards=[int(row_forwards[i]) for i in range(n)], finish_reasons=reasons,
                           forwards=int(forwards), wall_time_s=wall)
