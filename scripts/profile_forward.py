"""Where one cached decode forward spends its time: the JAX profiler's per-op trace, grouped into a table.

Runs `forward_latency.make_step` (the forward a decode step runs: AR for 1 query token, a TiDAR step for K + K*K)
of a checkpoint under `jax.profiler.trace`, reads the Perfetto trace it writes, and sums each compiled op's time
per step, grouped by op kind and output shape (e.g. all 60 `ynn_fusion -> f32[20,1536]` dots of the MLP's gate and
up projections), largest first. Thunk times add up across the CPU's threads, so their total can exceed the wall
time when ops run concurrently. Also writes the optimized HLO next to the trace, to look up what an op is.

    python scripts/profile_forward.py --checkpoint runs/smollm2 --query-tokens 20 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_latency import make_step  # noqa: E402

from tidar_jax.checkpoint import load_for_inference  # noqa: E402
from tidar_jax.generation import in_decoding_layout  # noqa: E402
from tidar_jax.kv_cache import init_cache  # noqa: E402
from tidar_jax.model import create_model  # noqa: E402
from tidar_jax.precision import inference_params  # noqa: E402

_RUNTIME_EVENTS = ("ThunkExecutor", "$", "PjitFunction", "SlinkyThreadPool", "CommonPjRt", "ParseArguments", "end: ")


def op_table(trace_events: list[dict], hlo_text: str, steps: int) -> list[tuple[float, int, str]]:
    """[(ms per step, ops per step, "kind -> output shape")], largest first, from the trace's complete events."""
    shapes = {m.group(1): m.group(2).split(" ")[0] for m in
              re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", hlo_text, re.M)}
    total, count = collections.defaultdict(float), collections.Counter()
    for e in trace_events:
        if e.get("ph") != "X" or e["name"].startswith(_RUNTIME_EVENTS):
            continue
        kind = re.sub(r"[.]\d+$", "", e["name"])  # ynn_fusion.64 -> ynn_fusion
        key = f"{kind} -> {shapes.get(e['name'], '?')}"
        total[key] += e["dur"] / 1e3
        count[key] += 1
    return sorted(((ms / steps, count[k] // steps, k) for k, ms in total.items()), reverse=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/smollm2")
    p.add_argument("--query-tokens", type=int, default=20, help="1 (an AR step) or K + K*K (a TiDAR step)")
    p.add_argument("--dtype", default="float32", help="model.compute_dtype (params cast once, as a Generator does)")
    p.add_argument("--slots", type=int, default=640, help="cache slots (max_len)")
    p.add_argument("--prefix", type=int, default=512, help="committed tokens (cursor)")
    p.add_argument("--steps", type=int, default=5, help="profiled forwards (after 3 warm-up ones)")
    p.add_argument("--top", type=int, default=25, help="rows of the table")
    p.add_argument("--out", help="directory for the trace and the HLO (default: a temporary one)")
    p.add_argument("--scan-layers", action="store_true",
                   help="profile the scanned layer layout (decode.scan_layers=true) instead of the unrolled one")
    args = p.parse_args(argv)

    bundle = load_for_inference(args.checkpoint)
    cfg = dataclasses.replace(bundle.config.model, compute_dtype=args.dtype)
    params = inference_params(bundle.params, cfg)
    graphdef = nnx.split(nnx.eval_shape(lambda: create_model(cfg)))[0]
    graphdef, params, cfg = in_decoding_layout(graphdef, params, cfg, args.scan_layers)
    step = make_step(graphdef, args.query_tokens)
    cache = init_cache(cfg, 1, args.slots).replace(cursor=jnp.full((1,), args.prefix, jnp.int32))
    tokens = jnp.full((1, args.query_tokens), 3, jnp.int32)
    for _ in range(3):
        logits, cache = step(params, cache, tokens)
        jax.block_until_ready(logits)
    out = Path(args.out or tempfile.mkdtemp(prefix="profile_forward_"))
    out.mkdir(parents=True, exist_ok=True)
    hlo = step.lower(params, cache, tokens).compile().as_text()
    (out / "step.hlo.txt").write_text(hlo)
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        for _ in range(args.steps):
            logits, cache = step(params, cache, tokens)
            jax.block_until_ready(logits)
    trace = max(out.glob("**/*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    rows = op_table(json.load(gzip.open(trace))["traceEvents"], hlo, args.steps)
    print(f"{args.checkpoint}: {args.query_tokens} query tokens, {args.dtype}, {args.slots} cache slots, cursor "
          f"{args.prefix}; thunk ms per step (total {sum(r[0] for r in rows):.1f}); trace and HLO in {out}")
    for ms, n, key in rows[:args.top]:
        print(f"{ms:9.2f} ms  {n:5d}x  {key}")


if __name__ == "__main__":
    main()
