"""Interleaved timing of decoding methods on the same prompts (what `infer.bench` reports per group), each method
optionally in several CPU kernel modes, with the speed-up taken against the fastest AR configuration measured.

A method is a decoder and a mode ("ar", "tidar", "spec"); with kernel modes (ops/kernel_choice.py: auto, on, off)
on the CPU each method runs in each mode as its own entry (`"ar [off]"`), its programs compiled and cached per mode.
Every entry's `speedup_vs_ar` is the median over rounds of its tokens/s over the tokens/s, in the same round, of the
AR entry with the highest median (`baseline`), so TiDAR is never credited against a slower AR than the machine has.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

from tidar_jax.evals import agreement, benchmark
from tidar_jax.evals.likelihood import summarize_generation
from tidar_jax.ops import kernel_choice


@contextlib.contextmanager
def kernel_mode(mode: str | None):
    """`$TIDAR_JAX_CPU_KERNELS` set to `mode` inside (None: left as it is); programs trace (and cache) under it."""
    if mode is None:
        yield
        return
    before = os.environ.get(kernel_choice.ENV)
    os.environ[kernel_choice.ENV] = mode
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(kernel_choice.ENV, None)
        else:
            os.environ[kernel_choice.ENV] = before


def entry_name(method: str, mode: str | None) -> str:
    return method if mode is None else f"{method} [{mode}]"


def time_methods(methods: dict[str, tuple[Any, str]], prompts: list[list[int]], batch: int, max_new_tokens: int,
                 repeats: int, near_tie_epsilon: float, kernel_modes: tuple[str | None, ...] = (None,)) -> dict:
    """Greedy decoding of `batch` prompts (batch 1: prompt r in round r) by every method {name: (decoder, mode)} in
    every kernel mode, interleaved over `repeats` rounds. Returns {"baseline": the fastest AR entry, "methods":
    {entry: summary}}: tokens/s (median and all), wall time, tokens per forward, forwards, acceptance histogram,
    speed-up over the baseline, and agreement with that baseline's tokens (exact, near-tie or mismatch rows)."""
    def runner(decoder, mode: str, kernels: str | None) -> Callable[[int], Any]:
        def run(r: int):
            rows = prompts[:batch] if batch > 1 else [prompts[r % len(prompts)]]
            with kernel_mode(kernels):
                if mode == "spec":
                    return decoder.generate(rows, max_new_tokens, temperature=0.0)
                return decoder.generate(rows, mode, max_new_tokens, temperature=0.0)
        return run

    entries = {entry_name(name, k): (name, k) for name in methods for k in kernel_modes}
    runs = benchmark.interleaved({e: runner(*methods[name], k) for e, (name, k) in entries.items()}, repeats)
    tps = {e: [sum(len(t) for t in res.tokens) / sec for sec, res in results] for e, results in runs.items()}
    ar_entries = [e for e, (name, _) in entries.items() if methods[name][1] == "ar"]
    baseline = max(ar_entries, key=lambda e: benchmark.median(tps[e]))
    round_prompts = [prompts[:batch] if batch > 1 else [prompts[r % len(prompts)]] for r in range(repeats)]
    ar_decoder = methods[entries[baseline][0]][0]
    out = {}
    for e, results in runs.items():
        last = summarize_generation(results[-1][1])
        out[e] = {
            "tokens_per_second": benchmark.median(tps[e]), "tokens_per_second_all": tps[e],
            "wall_time_s": benchmark.median([sec for sec, _ in results]),
            "tokens_per_forward": sum(summarize_generation(res)["tokens_per_forward"] for _, res in results)
            / len(results),
            "speedup_vs_ar": benchmark.median([t / a for t, a in zip(tps[e], tps[baseline])]),
            "new_tokens": last["new_tokens"],
            "forwards": benchmark.median([summarize_generation(res)["forwards"] for _, res in results]),
            "acceptance_histogram": [sum(x) for x in zip(*(res.acceptance_histogram for _, res in results))],
            "same_tokens_as_ar": all(res.tokens == ar.tokens for (_, res), (_, ar) in zip(results, runs[baseline])),
            **_agreement(ar_decoder, round_prompts, results, runs[baseline], near_tie_epsilon)}
        if "draft_forwards" in last:
            out[e]["draft_forwards"] = last["draft_forwards"]
    return {"baseline": baseline, "methods": out}


def _agreement(ar_generator, round_prompts, results, ar_results, epsilon) -> dict:
    """agreement.compare of a method's rows with AR's over every timed round (rows repeated across rounds judged
    once): exact_match_rows, near_tie_rows, mismatch_rows and the summary under "agreement"."""
    rows = {}
    for prompts_r, (_, res), (_, ar) in zip(round_prompts, results, ar_results):
        for p, a, t in zip(prompts_r, ar.tokens, res.tokens):
            rows.setdefault((tuple(p), tuple(a), tuple(t)), None)
    prompts, ar_tokens, tokens = zip(*rows) if rows else ((), (), ())
    g = ar_generator
    summary = agreement.compare(g.graphdef, g.params, g.model_cfg, prompts, ar_tokens, tokens, epsilon)
    return {key: summary[key] for key in ("exact_match_rows", "near_tie_rows", "mismatch_rows")} | {
        "agreement": summary}
