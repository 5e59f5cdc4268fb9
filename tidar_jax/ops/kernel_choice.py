"""Whether a CPU kernel or XLA's own op runs a given shape: measured once per machine, then read from disk.

The hand-written kernels (cpu_kernels.py) were tuned on one CPU; on another (e.g. one whose bf16 matrix products
XLA runs on AMX tiles) XLA can be the faster of the two for some shapes and the slower for others. So the switch
`$TIDAR_JAX_CPU_KERNELS` has three modes:
- `auto` (the default): for each shape a kernel takes (a projection of R rows, K inputs and N outputs in a dtype;
  a cached attention block), the first trace that needs it times the kernel against XLA's op on operands of that
  shape, interleaved, and keeps the faster. The measurement runs outside the trace (`ensure_compile_time_eval`),
  once: decisions are stored in `<cache root>/kernels/choices-<key>.json`, where the key is the kernel library's
  build key (its sources, flags, jaxlib and this CPU's model and feature flags), so a later process on the same
  machine only reads them and a different CPU (or changed kernels) measures anew.
- `on`: every shape a kernel takes runs on it. `off` (or `0` / `false`): plain XLA everywhere.
The mode is read when a program is traced. `decisions()` lists what this process chose (bench and generate
report it).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable

import jax

from tidar_jax import caches

ENV = "TIDAR_JAX_CPU_KERNELS"
MODES = ("auto", "on", "off")
ROUNDS = 7  # timed rounds per implementation, interleaved, after one warm-up call each
_LOCK = threading.Lock()
_STATE: dict = {"path": None, "choices": None, "used": {}}


def mode() -> str:
    """The kernel mode of `$TIDAR_JAX_CPU_KERNELS`: "auto" (unset), "on" ("1", "true") or "off" ("0", "false").
    Raises ValueError naming the variable for anything else."""
    raw = os.environ.get(ENV, "auto").strip().lower()
    value = {"1": "on", "true": "on", "0": "off", "false": "off"}.get(raw, raw)
    if value not in MODES:
        raise ValueError(f"${ENV} must be one of {MODES}, got {raw!r}")
    return value


def choices_path(build_key: str) -> Path | None:
    """Where the decisions for this kernel build (and so this CPU) are stored; None without a cache root."""
    root = caches.root()
    return None if root is None else root / "kernels" / f"choices-{build_key}.json"


def _choices(build_key: str) -> dict:
    path = choices_path(build_key)
    if _STATE["choices"] is None or _STATE["path"] != path:
        stored = {}
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                stored = {}  # a damaged file is measured anew, then rewritten whole
        _STATE.update(path=path, choices=stored if isinstance(stored, dict) else {})
    return _STATE["choices"]


def _store(path: Path | None, choices: dict) -> None:
    if path is None:
        return
    try:
        caches.write_json_atomic(path, choices)  # concurrent processes never read half a file
    except OSError:
        pass  # an unwritable cache only costs a re-measurement in the next process


def measure(kernel: Callable[[], jax.Array], xla: Callable[[], jax.Array], rounds: int = ROUNDS) -> dict:
    """Median seconds of `kernel()` and `xla()` (each a call returning an array), one warm-up call each (it
    compiles), then `rounds` interleaved rounds so that drift in the machine's speed hits both alike."""
    times: dict[str, list[float]] = {"kernel_s": [], "xla_s": []}
    jax.block_until_ready((kernel(), xla()))
    for _ in range(rounds):
        for name, fn in (("kernel_s", kernel), ("xla_s", xla)):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def use_kernel(key: str, build_key: str, timings: Callable[[], dict]) -> bool:
    """Whether the kernel runs the shape named `key` (e.g. "gemm r20 k576 n1536 bfloat16"): always in mode "on";
    in "auto" when it was measured faster (`timings()` gives {"kernel_s", "xla_s"}, called outside any trace the
    first time this machine meets the key, then stored); never in "off"."""
    current = mode()
    if current != "auto":
        return current == "on"
    with _LOCK:
        choices = _choices(build_key)
        if key not in choices:
            with jax.ensure_compile_time_eval():
                found = timings()
            choices[key] = {"kernel_s": found["kernel_s"], "xla_s": found["xla_s"],
                            "choice": "kernel" if found["kernel_s"] < found["xla_s"] else "xla"}
            _store(_STATE["path"], choices)
        chosen = choices[key]["choice"] == "kernel"
        _STATE["used"][key] = choices[key]
    return chosen


def decisions() -> dict:
    """{mode, choices: {shape key: {choice, kernel_s, xla_s}}} for the shapes this process asked about."""
    return {"mode": mode(), "choices": dict(sorted(_STATE["used"].items()))}


def forget() -> None:
    """Drops this process's in-memory decisions (tests; a changed cache root is re-read anyway)."""
    with _LOCK:
        _STATE.update(path=None, choices=None, used={})
