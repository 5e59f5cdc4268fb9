"""Measured seconds of one compiled decode step (AR, or TiDAR with K' drafts and a proposal set) of a Generator's
model on this machine, cached on disk per machine like the CPU kernel choices (ops/kernel_choice.py).

What is timed is the real `decode.decode_step` as a Generator runs it: its params (decoding layer layout, compute
dtype), its non-token ids, the CPU kernels in the current mode, the loop state donated so that the KV cache is
updated in place as inside the decode loop (an undonated cache is copied every call, which more than doubles a
1-token step on a CPU), over a cache of decode.max_cache_len slots after a prefill of a short prompt. A step's cost
does not depend on where the cursor is (attention reads the whole buffer under a mask), so successive calls on the
advancing state are repeats of one measurement. Every step is compiled and run once, then `repeats` rounds time the
steps in alternating order (benchmark.interleaved, so drift hits all alike); the median is kept.

Cache: `<cache root>/step_costs/costs-<tuning.machine_key()>.json`, {key: seconds}, the key naming the model (a hash
of its config), cache length, kernel mode, batch and step. A later process on the same machine reads them; another
machine measures anew; `remeasure=True` replaces stored values. A damaged or unwritable cache only costs a
re-measurement.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

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
    return (f"model {hashlib.sha256(cfg).hexdigest()[:12]} cache {generator.decode_cfg.max_cache_len} kernels "
            f"{kernels} batch {batch} {name}")


def _runner(generator: Generator, batch: int, step: Step):
    """A callable running one donated decode step per call on a state prefilled for `step`."""
    k, lengths = step
    g, dec = generator, generator.decode_cfg
    spec = DecodeSpec.create("tidar" if lengths else "ar", k, True, g.capacity(dec.max_new_tokens), g.model_cfg,
                             proposal_lengths=lengths, token_limit=g.token_limit, reserved=g.reserved_ids)
    sp = SamplingParams.create(token_limit=g.token_limit, reserved=g.reserved_ids)
    prompt_len = dec.prompt_buckets[0]
    prompts = jnp.full((batch, prompt_len), g.model_cfg.eos_token_id, jnp.int32)
    prefill = jax.jit(lambda p, c, *a: decode.prefill(g.graphdef, p, c, *a, spec=spec.for_prefill()),
                      donate_argnums=1)
    holder = {"state": prefill(g.params, init_cache(g.model_cfg, batch, dec.max_cache_len), prompts,
                               jnp.full((batch,), prompt_len, jnp.int32), np.int32(spec.capacity),
                               jax.random.key(0), sp)}
    forward = jax.jit(lambda p, s, q: decode.decode_step(g.graphdef, p, s, q, spec=spec), donate_argnums=1)

    def run(_: int):
        holder["state"] = forward(g.params, holder["state"], sp)
        return holder["state"].drafts

    return run


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
        times = benchmark.interleaved({step: _runner(generator, batch, step) for step in missing}, repeats)
        stored = _read(path) | {keys[step]: benchmark.median([t for t, _ in times[step]]) for step in missing}
        if path is not None:
            try:
                caches.write_json_atomic(path, stored)
            except OSError:
                pass  # an unwritable cache only costs a re-measurement in the next process
    return {step: float(stored[key]) for step, key in keys.items()}
