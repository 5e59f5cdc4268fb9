"""Where one cached decode forward spends its time: the JAX profiler's per-op trace, grouped into a table.

Runs `forward_latency.make_step` (the forward a decode step runs: AR for 1 query token, a TiDAR step for K + K*K)
of a checkpoint under `jax.profiler.trace`, reads the Perfetto trace it writes, and sums each compiled op's time
per step, grouped by op kind and output shape (e.g. all 60 `ynn_fusion -> f32[20,1536]` dots of the MLP's gate and
up projections), largest first. Thunk times add up across the CPU's threads, so their total can exceed the wall
time when ops run concurrently. Also writes the optimized HLO next to the trace, to look up what an op is.

    python benchmarks/profile_forward.py --checkpoint runs/smollm2 --query-tokens 20 --dtype bfloat16

`--decode-loop tidar|ar` profiles the whole decode loop instead (`decode.decode_loop`, as a Generator runs it:
forward, LM head on the rows read, verification, drafting, bookkeeping, the while loop itself) for `--steps`
forwards after a prefill of `--prefix` prompt tokens, greedy, and reports ops per forward, then the wall time per
loop forward (a loop of `--steps` minus a loop of 1, which carries the prefill) beside the forward alone (the same
query tokens, its LM head on the 2K rows a step reads), medians of `--repeats` interleaved runs. Inside the while
loop the per-op times include waits on the CPU thread pool, so read that table for where ops sit, and the wall
times for what a step costs beyond its forward.

    python benchmarks/profile_forward.py --checkpoint runs/smollm2 --decode-loop tidar --steps 16
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_latency import make_step  # noqa: E402

from tidar_jax.checkpoint.inference import load_for_inference  # noqa: E402
from tidar_jax.decoding import decode  # noqa: E402
from tidar_jax.decoding.generation import in_decoding_layout  # noqa: E402
from tidar_jax.decoding.sampling import SamplingParams  # noqa: E402
from tidar_jax.decoding.spec import DecodeSpec
from tidar_jax.model.kv_cache import init_cache  # noqa: E402
from tidar_jax.model.precision import inference_params  # noqa: E402
from tidar_jax.model.transformer import create_model  # noqa: E402

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
    p.add_argument("--batch", type=int, default=1, help="batch rows of the forward (not with --decode-loop)")
    p.add_argument("--dtype", default="float32", help="model.compute_dtype (params cast once, as a Generator does)")
    p.add_argument("--slots", type=int, default=640, help="cache slots (max_len)")
    p.add_argument("--prefix", type=int, default=512, help="committed tokens (cursor)")
    p.add_argument("--steps", type=int, default=5, help="profiled forwards (after 3 warm-up ones)")
    p.add_argument("--top", type=int, default=25, help="rows of the table")
    p.add_argument("--out", help="directory for the trace and the HLO (default: a temporary one)")
    p.add_argument("--scan-layers", action="store_true",
                   help="profile the scanned layer layout (decode.scan_layers=true) instead of the unrolled one")
    p.add_argument("--decode-loop", choices=["tidar", "ar"],
                   help="profile the whole greedy decode loop of this mode (K = the trained block size) instead of "
                        "one forward; --query-tokens is then implied")
    p.add_argument("--repeats", type=int, default=5, help="with --decode-loop: rounds of the wall-time comparison")
    args = p.parse_args(argv)

    bundle = load_for_inference(args.checkpoint)
    cfg = dataclasses.replace(bundle.config.model, compute_dtype=args.dtype)
    params = inference_params(bundle.params, cfg)
    graphdef = nnx.split(nnx.eval_shape(lambda: create_model(cfg)))[0]
    graphdef, params, cfg = in_decoding_layout(graphdef, params, cfg, args.scan_layers)
    out = Path(args.out or tempfile.mkdtemp(prefix="profile_forward_"))
    out.mkdir(parents=True, exist_ok=True)
    if args.decode_loop:
        k = cfg.block_size if args.decode_loop == "tidar" else 1
        run, hlo, steps = _decode_loop_runner(graphdef, params, cfg, args.decode_loop, args.slots, args.prefix,
                                              args.steps)
        what = f"decode loop ({args.decode_loop}, K = {k}, {steps} forwards)"
    else:
        run, hlo, steps = _forward_runner(graphdef, params, cfg, args.query_tokens, args.slots, args.prefix,
                                          args.steps, args.batch)
        what = f"batch {args.batch} x {args.query_tokens} query tokens"
    (out / "step.hlo.txt").write_text(hlo)
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        run()
    trace = max(out.glob("**/*.trace.json.gz"), key=lambda f: f.stat().st_mtime)
    rows = op_table(json.load(gzip.open(trace))["traceEvents"], hlo, steps)
    print(f"{args.checkpoint}: {what}, {args.dtype}, {args.slots} cache slots, cursor {args.prefix}; thunk ms per "
          f"forward (total {sum(r[0] for r in rows):.1f}); trace and HLO in {out}")
    for ms, n, key in rows[:args.top]:
        print(f"{ms:9.2f} ms  {n:5d}x  {key}")
    if args.decode_loop:
        _compare_loop_with_forward(graphdef, params, cfg, args, run, k)


def _compare_loop_with_forward(graphdef, params, cfg, args, loop_run, k: int) -> None:
    """Prints the wall ms per decode-loop forward and per forward alone (see the module docstring)."""
    one_run = _decode_loop_runner(graphdef, params, cfg, args.decode_loop, args.slots, args.prefix, 1)[0]
    forward_run = _forward_runner(graphdef, params, cfg, k + k * k if k > 1 else 1, args.slots, args.prefix,
                                  args.steps)[0]
    times = {name: [] for name in ("loop", "one", "forward")}
    runs = {"loop": loop_run, "one": one_run, "forward": forward_run}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    loop, one, forward = (1e3 * statistics.median(times[n]) for n in ("loop", "one", "forward"))
    print(f"wall, medians of {args.repeats}: {(loop - one) / (args.steps - 1):.1f} ms per decode-loop forward, "
          f"{forward / args.steps:.1f} ms per forward alone")


def _forward_runner(graphdef, params, cfg, query_tokens: int, slots: int, prefix: int, steps: int, batch: int = 1):
    """(run `steps` forwards, their optimized HLO, steps) for one cached forward (`make_step`), warmed up."""
    step = make_step(graphdef, query_tokens)
    holder = {"cache": init_cache(cfg, batch, slots).replace(cursor=jnp.full((batch,), prefix, jnp.int32))}
    tokens = jnp.full((batch, query_tokens), 3, jnp.int32)

    def run(n=steps):
        for _ in range(n):
            logits, holder["cache"] = step(params, holder["cache"], tokens)
            jax.block_until_ready(logits)

    run(3)
    return run, step.lower(params, holder["cache"], tokens).compile().as_text(), steps


def _decode_loop_runner(graphdef, params, cfg, mode: str, slots: int, prefix: int, steps: int):
    """(run the greedy decode loop for `steps` forwards after a `prefix`-token prefill, its optimized HLO,
    steps); compiled and run once before."""
    # Room for `steps` full acceptances, and no EOS: every row runs exactly `steps` forwards.
    spec = dataclasses.replace(DecodeSpec.create(mode, cfg.block_size, True, (steps + 2) * cfg.block_size,
                                                        cfg), eos_token_id=-1)
    sp = SamplingParams.create()
    prompts = jnp.asarray(np.random.default_rng(0).integers(3, cfg.mask_token_id, (1, prefix)), jnp.int32)
    prefill = jax.jit(lambda p, c: decode.prefill(graphdef, p, c, prompts, jnp.full((1,), prefix, jnp.int32),
                                                  jnp.int32(spec.capacity), jax.random.key(0), sp, spec=spec),
                      donate_argnums=1)
    loop = jax.jit(lambda p, s, n: decode.decode_loop(graphdef, p, s, sp, n, spec=spec), donate_argnums=1)
    limit = jnp.int32(steps + 1)  # the prefill counts as one forward

    def run():
        state = jax.block_until_ready(prefill(params, init_cache(cfg, 1, slots)))
        state = jax.block_until_ready(loop(params, state, limit))
        if int(state.forwards) != steps + 1:
            raise SystemExit(f"the loop stopped after {int(state.forwards) - 1} of {steps} forwards (cache full?)")

    state = prefill(params, init_cache(cfg, 1, slots))
    hlo = loop.lower(params, state, limit).compile().as_text()
    run()
    return run, hlo, steps


if __name__ == "__main__":
    main()
