"""Measured seconds of one compiled decode step (AR, or TiDAR with K' drafts and a proposal set) of a Generator's
model on this machine, cached on disk per machine like the CPU kernel choices (ops/kernel_choice.py).

What is timed is the real `decode.decode_step` as a Generator runs it, inside the real `decode.decode_loop`: its
params (decoding layer layout, compute dtype), its non-token ids, the CPU kernels in the current mode, the loop state
donated so that the KV cache is updated in place, over a cache of decode.max_cache_len slots after a prefill of a
short prompt. A step's cost is the time of a loop call running 1 + LOOP_FORWARDS forwards minus that of a call
running 1, divided by LOOP_FORWARDS: what a step costs inside the loop, without the call's own dispatch (timed as
separate jitted calls, steps came out 10-12 ms slower than inside the loop for SmolLM2-135M on a 2-core CPU, which
favoured the larger steps). Every call starts from a copy of the same prefilled state, whose rows cannot finish within
it (no token is taken for EOS, the output buffer is as long as the cache, the cache has room for every forward). Every
call is compiled and run once, then `repeats` rounds time them in alternating order (benchmark.interleaved, so drift
hits all alike); the medians are kept.

Cache: `<cache root>/step_costs/costs-<tuning.machine_key()>.json`, {key: seconds}, the key naming the model (a hash
of its config), cache length, kernel mode, batch and step. A later process on the same machine reads them; another
machine measures anew; `remeasure=True` replaces stored values. A damaged or unwritable cache only costs a
re-measurement.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax import caches
from tidar_jax.config import to_dict
from tidar_jax.decoding import decode
from tidar_jax.decoding.generation import Generator
from tidar_jax.decoding.sampling import SamplingParams
from tidar_jax.decoding.spec import DecodeSpec
from tidar_jax.decoding.tuning import machine_key
from tidar_jax.evals import benchmark
from tidar_jax.model.kv_cache import init_cache
from tidar_jax.ops import cpu_kernels, kernel_choice

Step = tuple[int, tuple[int, ...]]  # (K', A); AR is (1, ())
LOOP_FORWARDS = 8


def cache_path() -> Path | None:
    root = caches.root()
    return None if root is None else root / "step_costs" / f"costs-{machine_key()}.json"


def _read(path: Path | None) -> dict:
    try:
        stored = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        stored = {}
    return stored if isinstance(stored, dict) else {}


def step_key(generator: Generator, batch: int, step: Step) -> str:
    cfg = json.dumps(to_dict(generator.model_cfg), sort_keys=True).encode()
    kernels = kernel_choice.mode() if cpu_kernels.enabled() else "off"
    name = "ar" if not step[1] else f"K{step[0]} A{','.join(map(str, step[1]))}"
    return (f"in-loop model {hashlib.sha256(cfg).hexdigest()[:12]} cache {generator.decode_cfg.max_cache_len} kernels "
            f"{kernels} batch {batch} {name}")


def _runner(generator: Generator, batch: int, step: Step, forwards: int):
    """{n: callable} for n in (1, forwards): each call runs n forwards of one compiled decode loop (n is traced, so
    both share the program) on a fresh copy of one state prefilled for `step` (the copy costs every call alike, so
    it cancels in the difference), whose rows do not finish within them (see the module docstring)."""
    k, lengths = step
    g, dec = generator, generator.decode_cfg
    prompt_len = dec.prompt_buckets[0]
    if prompt_len + (forwards + 1) * k > dec.max_cache_len:
        raise ValueError(f"step timing needs {prompt_len + (forwards + 1) * k} cache slots for {forwards} forwards "
                         f"of K={k}; decode.max_cache_len is {dec.max_cache_len}")
    spec = DecodeSpec.create("tidar" if lengths else "ar", k, True, dec.max_cache_len, g.model_cfg,
                             proposal_lengths=lengths, token_limit=g.token_limit, reserved=g.reserved_ids)
    spec = dataclasses.replace(spec, eos_token_id=-1)  # no token ends a timed row
    sp = SamplingParams.create(token_limit=g.token_limit, reserved=g.reserved_ids)
    prompts = jnp.full((batch, prompt_len), g.model_cfg.eos_token_id, jnp.int32)
    prefill = jax.jit(lambda p, c, *a: decode.prefill(g.graphdef, p, c, *a, spec=spec.for_prefill()),
                      donate_argnums=1)
    start = prefill(g.params, init_cache(g.model_cfg, batch, dec.max_cache_len), prompts,
                    jnp.full((batch,), prompt_len, jnp.int32), np.int32(spec.capacity), jax.random.key(0), sp)
    loop = jax.jit(lambda p, s, q, n: decode.decode_loop(g.graphdef, p, s, q, n, spec=spec), donate_argnums=1)
    def runner(n: int):
        limit = np.int32(int(start.forwards) + n)
        return lambda _: loop(g.params, jax.tree.map(jnp.copy, start), sp, limit).forwards

    return {n: runner(n) for n in (1, forwards)}


def _per_step(short: float, long: float) -> float:
    """Seconds of one step from the median times of a call of 1 and of 1 + LOOP_FORWARDS forwards; when timing noise
    hides the difference (a step too cheap to resolve, e.g. a tiny model), the long call's time per forward, an upper
    bound that still carries its dispatch, so a cost is never zero or negative."""
    difference = (long - short) / LOOP_FORWARDS
    return difference if difference > 0 else long / (1 + LOOP_FORWARDS)


def step_seconds(generator: Generator, batch: int, steps: Sequence[Step], repeats: int = 7,
                 remeasure: bool = False) -> dict[Step, float]:
    """{step: median seconds of one decode step of `batch` rows} for every (K', A) in `steps` ((1, ()) is the AR
    step), read from this machine's cache or measured (and stored). The Generator must run on one device."""
    if generator.mesh is not None:
        raise ValueError("step costs are measured on one device: build the Generator without a mesh")
    path = cache_path()
    stored = {} if remeasure else _read(path)
    keys = {step: step_key(generator, batch, step) for step in dict.fromkeys(steps)}
    missing = [step for step, key in keys.items() if key not in stored]
    if missing:
        runners = {(step, n): run for step in missing
                   for n, run in _runner(generator, batch, step, 1 + LOOP_FORWARDS).items()}
        times = {name: benchmark.median([t for t, _ in runs])
                 for name, runs in benchmark.interleaved(runners, repeats).items()}
        stored = _read(path) | {keys[step]: _per_step(times[step, 1], times[step, 1 + LOOP_FORWARDS])
                                for step in missing}
        if path is not None:
            try:
                caches.write_json_atomic(path, stored)
            except OSError:
                pass  # an unwritable cache only costs a re-measurement in the next process
    return {step: float(stored[key]) for step, key in keys.items()}
