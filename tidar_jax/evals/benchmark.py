"""Honest timing helpers: forward-latency curve over a KV cache, interleaved repeated runs, medians, plots.

Rules every measurement here follows: compile (and run once) before timing, `jax.block_until_ready` on the result
before reading the clock, several repeats reported by their median, and runs of the variants being compared
interleaved (round r runs A, B, ... and round r+1 runs them in reverse order) so that machine drift hits all alike.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.layout import masks
from tidar_jax.model.kv_cache import KVCache, init_cache
from tidar_jax.model.precision import inference_params
from tidar_jax.model.transformer import forward

DEFAULT_QUERY_COUNTS = (1, 2, 4, 8, 12, 16, 20, 24, 32, 48, 64, 72, 96, 128, 192, 256, 384, 512)


def _cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux, else what `platform` knows) and its logical core count."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def device_info() -> dict[str, Any]:
    """Where the numbers come from: backend, device kind and count, CPU, host, jax version, timestamp (UTC)."""
    devices = jax.devices()
    return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind, "device_count": len(devices),
            "host": platform.node(), "processor": _cpu_name(), "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of `fn()`, the clock read after `jax.block_until_ready(result)`."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def interleaved(runners: dict[str, Callable[[int], Any]], repeats: int,
                warmup: int = 1) -> dict[str, list[tuple[float, Any]]]:
    """Runs every `runners[name](r)` for r in range(repeats), alternating the order of names every round, after
    `warmup` untimed rounds (compilation). Returns {name: [(seconds, result) per repeat]} in round order."""
    names = list(runners)
    for r in range(warmup):
        for name in names:
            jax.block_until_ready(runners[name](r))
    out: dict[str, list[tuple[float, Any]]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(timed(lambda: runners[name](r)))
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _latency_step(graphdef: nnx.GraphDef, num_queries: int):
    """A jitted cached forward of `num_queries` causal tokens at the cache cursor (the cache is donated)."""
    def step(params, cache: KVCache, tokens):
        positions = cache.cursor[:, None] + jnp.arange(num_queries, dtype=jnp.int32)[None]
        mask = masks.with_cache(cache.valid_slots(), masks.causal_mask(num_queries))
        logits, cache = forward(graphdef, params, tokens, positions, mask, cache, cache.cursor, n_write=num_queries)
        return logits, cache

    return jax.jit(step, donate_argnums=1)


def forward_latency_curve(graphdef: nnx.GraphDef, params: nnx.State, model_cfg: ModelConfig, prefix_len: int,
                          query_counts: Sequence[int] = DEFAULT_QUERY_COUNTS, batch_size: int = 1,
                          repeats: int = 5, progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Latency of ONE model forward of q query tokens over a KV cache holding `prefix_len` committed tokens.

    The cache has `prefix_len + max(query_counts)` slots (every q uses the same buffer, as decoding does: the XLA
    attention reads the whole buffer under a mask, so the buffer length, not only the prefix, sets the cost). Each q
    is compiled and run once first; then `repeats` rounds time every q in alternating order. Returns one dict per
    entry of `query_counts`, in order: query_tokens, median_ms, min_ms, times_ms.
    """
    counts = [int(q) for q in query_counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"query_counts must be positive integers, got {list(query_counts)}")
    if prefix_len < 1:
        raise ValueError(f"prefix_len must be >= 1, got {prefix_len}")
    params = inference_params(params, model_cfg)
    cache = init_cache(model_cfg, batch_size, prefix_len + max(counts))
    # Random K/V, as a real prefix would hold (the cost does not depend on the values, but nothing degenerate).
    rng = np.random.default_rng(0)
    noise = lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)  # noqa: E731
    cache = cache.replace(keys=jax.tree.map(noise, cache.keys), values=jax.tree.map(noise, cache.values),
                          cursor=jnp.full((batch_size,), prefix_len, jnp.int32))
    steps = {q: _latency_step(graphdef, q) for q in counts}
    tokens = {q: jnp.asarray(rng.integers(3, model_cfg.vocab_size, (batch_size, q)), jnp.int32) for q in counts}
    holder = {"cache": cache}

    def runner(q: int) -> Callable[[int], Any]:
        def run(_: int):
            logits, holder["cache"] = steps[q](params, holder["cache"], tokens[q])
            return logits
        return run

    if progress is not None:
        progress(f"latency curve: compiling {len(counts)} shapes, prefix {prefix_len}")
    times = interleaved({q: runner(q) for q in counts}, repeats)
    return [{"query_tokens": q, "median_ms": 1e3 * median([t for t, _ in times[q]]),
             "min_ms": 1e3 * min(t for t, _ in times[q]), "times_ms": [1e3 * t for t, _ in times[q]]}
            for q in counts]


def plot_latency(curves: dict[str, list[dict[str, Any]]], path: str, title: str,
                 marks: dict[str, int] | None = None) -> None:
    """Two panels: milliseconds per forward vs query tokens (log-log) and cost relative to a 1-token forward;
    `marks` draws vertical lines at named query counts (e.g. a TiDAR step's K + K*K)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, curve in curves.items():
        q = [p["query_tokens"] for p in curve]
        ms = [p["median_ms"] for p in curve]
        axes[0].plot(q, ms, marker="o", ms=3, label=label)
        axes[1].plot(q, [m / ms[0] for m in ms], marker="o", ms=3, label=label)
    for ax, ylabel in zip(axes, ("ms per forward (median)", "cost / cost of a 1-token forward")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("query tokens in the forward")
        ax.set_ylabel(ylabel)
        for name, q in (marks or {}).items():
            ax.axvline(q, color="grey", lw=0.8, ls="--")
            ax.annotate(name, (q, ax.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=8, color="grey")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_speedups(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Grouped bars: speed-up vs AR (tokens/s ratio) and tokens per forward, one group per (label, batch) row.

    rows: dicts with `label`, `batch_size`, `speedup` {method: ratio}, `tokens_per_forward` {method: value}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for r in rows for m in r["speedup"]})
    groups = [f"{r['label']}\nbatch {r['batch_size']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) + 4), 4.2))
    width = 0.8 / max(len(methods), 1)
    for panel, (key, ylabel) in enumerate((("speedup", "tokens/s vs AR (same run)"),
                                           ("tokens_per_forward", "tokens per target forward"))):
        ax = axes[panel]
        for i, method in enumerate(methods):
            xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(rows))]
            ax.bar(xs, [r[key].get(method, float("nan")) for r in rows], width, label=method)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(rows)), groups, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
