"""Throughput of one XLA dot `[rows, K] @ [K, N]` on this machine, by row count and dtype (the decode forward's
projections are such dots: rows = batch * query tokens).

Each case is jitted and timed (median of `--repeats` calls on the same, cache-resident weight); GFLOP/s is
2 * rows * K * N / time. `bf16->f32` asks the dot for a float32 result (what `precision.matmul` does), `bf16->bf16`
for a bfloat16 one; on CPUs with AVX-512 bf16 / AMX the two take different XLA kernels.

    python benchmarks/gemm_throughput.py --shape 576 1536 --rows 1 2 8 20 72 128
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

VARIANTS = {  # name -> (operand dtype, dot result dtype)
    "f32": (jnp.float32, jnp.float32),
    "bf16->f32": (jnp.bfloat16, jnp.float32),
    "bf16->bf16": (jnp.bfloat16, jnp.bfloat16),
}


def time_dot(rows: int, k: int, n: int, operand, result, repeats: int) -> float:
    """Median seconds of one jitted [rows, k] @ [k, n] dot."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((rows, k)), operand)
    w = jnp.asarray(rng.standard_normal((k, n)), operand)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=result))
    jax.block_until_ready(dot(x, w))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(x, w))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs=2, type=int, default=[576, 1536], metavar=("K", "N"), help="weight shape")
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 8, 20, 72, 128])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=31)
    args = p.parse_args(argv)
    k, n = args.shape
    print(f"[rows, {k}] @ [{k}, {n}] on {jax.devices()[0].device_kind}: microseconds (GFLOP/s)")
    print(f"{'rows':>5} " + " ".join(f"{v:>18}" for v in args.variants))
    for rows in args.rows:
        cells = []
        for name in args.variants:
            t = time_dot(rows, k, n, *VARIANTS[name], args.repeats)
            cells.append(f"{t * 1e6:9.0f} ({2 * rows * k * n / t / 1e9:5.0f})")
        print(f"{rows:>5} " + " ".join(f"{c:>18}" for c in cells))


if __name__ == "__main__":
    main()
