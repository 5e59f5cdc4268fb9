"""One cached decode forward of a checkpoint in float32, in bfloat16 with params cast once, and in bfloat16 with
float32 params (cast inside every step, as a `Generator` did before `precision.inference_params`), interleaved.

Self-contained apart from `forward_latency.make_step` (same folder), so it measures any checkout of the library:
put that checkout first on PYTHONPATH to compare versions back to back.

    PYTHONPATH=. python benchmarks/forward_versions.py --checkpoint runs/smollm2
    git worktree add /tmp/before 120301f && PYTHONPATH=/tmp/before python benchmarks/forward_versions.py
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from forward_latency import make_step  # noqa: E402

import tidar_jax  # noqa: E402
from tidar_jax.checkpoint.inference import load_for_inference  # noqa: E402
from tidar_jax.model.kv_cache import init_cache  # noqa: E402
from tidar_jax.model.transformer import create_model  # noqa: E402

VARIANTS = {"float32": ("float32", False), "bfloat16": ("bfloat16", True), "bf16, f32 params": ("bfloat16", False)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/smollm2")
    p.add_argument("--queries", nargs="+", type=int, default=[1, 20], help="query tokens: 1 or K + K*K")
    p.add_argument("--slots", type=int, default=640, help="cache slots (max_len)")
    p.add_argument("--prefix", type=int, default=512, help="committed tokens (cursor)")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    bundle = load_for_inference(args.checkpoint)
    runners = {}
    for name, (dtype, cast) in VARIANTS.items():
        cfg = dataclasses.replace(bundle.config.model, compute_dtype=dtype)
        params = jax.tree.map(lambda x: x.astype(dtype) if cast and x.ndim >= 2 else x, bundle.params)
        graphdef = nnx.split(nnx.eval_shape(lambda c=cfg: create_model(c)))[0]
        for q in args.queries:
            holder = {"cache": init_cache(cfg, 1, args.slots).replace(cursor=jnp.full((1,), args.prefix, jnp.int32)),
                      "step": make_step(graphdef, q), "tokens": jnp.full((1, q), 3, jnp.int32), "params": params}

            def run(h=holder):
                logits, h["cache"] = h["step"](h["params"], h["cache"], h["tokens"])
                return logits
            for _ in range(2):
                jax.block_until_ready(run())
            runners[(name, q)] = run
    times = {k: [] for k in runners}
    for r in range(args.repeats):
        for k in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            t0 = time.perf_counter()
            jax.block_until_ready(runners[k]())
            times[k].append(1e3 * (time.perf_counter() - t0))
    print(f"library: {Path(tidar_jax.__file__).parent}; {args.slots} slots, cursor {args.prefix}; median ms")
    for (name, q), ts in times.items():
        print(f"{name:>18} {q:>4} query tokens {statistics.median(ts):8.1f}")


if __name__ == "__main__":
    main()
