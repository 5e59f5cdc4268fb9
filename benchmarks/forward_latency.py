"""Latency of one cached decode forward of a checkpoint, for attention implementations compared side by side.

Each case is (batch, query tokens, cache slots): the query tokens are a decode step's (1 = an AR step, K + K*K = a
TiDAR step at block size K, with its mask and positions from `masks.py`) at cursor `--prefix` over a cache of
`--slots` slots holding random K/V; the forward is `forward_hidden` plus the LM head on the rows a decode step reads
(1 row for AR, 2K for TiDAR), jitted with the cache donated, as `decode.decode_step` runs it. Every case and
attention implementation / compute dtype is compiled and run once, then `--repeats` rounds time all of them in
alternating order (load on a shared machine moves every variant alike); the table shows medians and the ratio to
the 1-token forward of the same batch, implementation and dtype. Params are cast once to the compute dtype, as a
`Generator` does (`precision.inference_params`).

    python benchmarks/forward_latency.py --checkpoint runs/smollm2 --impls xla blockwise --cases 1x1 1x20 16x1
    python benchmarks/forward_latency.py --checkpoint runs/smollm2 --dtypes float32 bfloat16 --cases 1x1 1x20
    python benchmarks/forward_latency.py --checkpoint runs/smollm2 --layouts unrolled scanned --cases 1x1 1x20 16x1

`--layouts` compares the layer layouts (`decode.scan_layers`): the params converted as a Generator converts them,
the cache stacked for "scanned". `--cpu-kernels on off` compares the CPU kernels (ops/cpu_kernels.py: attention,
gemv, gemm, matmul_nt) with plain XLA ($TIDAR_JAX_CPU_KERNELS set while each variant compiles):

    python benchmarks/forward_latency.py --checkpoint runs/smollm2 --cpu-kernels on off --cases 1x1 1x20 16x1
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tidar_jax.checkpoint.inference import load_for_inference
from tidar_jax.layout import masks
from tidar_jax.model.kv_cache import init_cache
from tidar_jax.model.transformer import create_model, forward_hidden, head_logits


def _block_size(query_tokens: int) -> tuple[int, bool]:
    """(K, with proposals) for a step of `query_tokens` = 1 (AR) or K + K*K (TiDAR)."""
    if query_tokens == 1:
        return 1, False
    for k in range(2, 64):
        if k + k * k == query_tokens:
            return k, True
    raise SystemExit(f"query tokens must be 1 or K + K*K (6, 12, 20, 30, ...), got {query_tokens}")


def make_step(graphdef, query_tokens: int):
    k, proposals = _block_size(query_tokens)

    def step(params, cache, tokens):
        positions = masks.step_positions(cache.cursor, k, proposals)
        mask = masks.with_cache(cache.valid_slots(), masks.step_mask(k, proposals))
        hidden, cache = forward_hidden(graphdef, params, tokens, positions, mask, cache, cache.cursor, n_write=k)
        rows = hidden if not proposals else jnp.concatenate([hidden[:, :k], hidden[:, k::k]], axis=1)
        return head_logits(graphdef, params, rows), cache

    return jax.jit(step, donate_argnums=1)


def weight_read_ms(params, repeats: int) -> tuple[float, float]:
    """(median ms, GB) of one jitted pass that reads every param once (a float32 sum per leaf): the time a
    weight-bandwidth-bound forward cannot beat on this machine."""
    leaves = jax.tree.leaves(params)
    read = jax.jit(lambda xs: sum(jnp.sum(x, dtype=jnp.float32) for x in xs))
    jax.block_until_ready(read(leaves))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(read(leaves))
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), sum(x.nbytes for x in leaves) / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/smollm2")
    p.add_argument("--impls", nargs="+", default=["xla"], help="model.attention_impl values to compare")
    p.add_argument("--dtypes", nargs="+", default=["float32"], help="model.compute_dtype values to compare")
    p.add_argument("--layouts", nargs="+", default=["unrolled"], choices=["unrolled", "scanned"],
                   help="layer layouts to compare (decode.scan_layers false / true)")
    p.add_argument("--cpu-kernels", nargs="+", default=[None], choices=["on", "off"],
                   help="compare the CPU kernels (attention, gemv, gemm, matmul_nt) on / off (default: as "
                        "$TIDAR_JAX_CPU_KERNELS says)")
    p.add_argument("--cases", nargs="+", default=["1x1", "1x20", "16x1"], help="BATCHxQUERY_TOKENS")
    p.add_argument("--slots", type=int, default=392, help="cache slots (max_len)")
    p.add_argument("--prefix", type=int, default=300, help="committed tokens (cursor)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    # Imported here, not at the top, so that make_step imports from older checkouts too (forward_versions.py).
    from tidar_jax.model.precision import inference_params

    bundle = load_for_inference(args.checkpoint)
    cfg = bundle.config.model
    params = bundle.params
    variants = {}  # "impl/dtype[/scanned][/kernels-on|off]" -> (graphdef, params cast and laid out, model config,
    # the $TIDAR_JAX_CPU_KERNELS value to compile with)
    for impl, dtype, layout, kernels in itertools.product(args.impls, args.dtypes, args.layouts, args.cpu_kernels):
        vcfg = dataclasses.replace(cfg, attention_impl=impl, compute_dtype=dtype)
        graphdef = nnx.split(nnx.eval_shape(lambda c=vcfg: create_model(c)))[0]
        vparams = inference_params(params, vcfg)
        if layout != ("scanned" if cfg.scan_layers else "unrolled"):
            from tidar_jax.decoding.generation import in_decoding_layout  # not in older checkouts
            graphdef, vparams, vcfg = in_decoding_layout(graphdef, vparams, vcfg, layout == "scanned")
        name = f"{impl}/{dtype}" + ("/scanned" if layout == "scanned" else "")
        name += f"/kernels-{kernels}" if kernels else ""
        variants[name] = (graphdef, vparams, vcfg, kernels)
    rng = np.random.default_rng(0)
    runners = {}
    for case in args.cases:
        batch, q = (int(x) for x in case.split("x"))
        tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, q)), jnp.int32)
        for variant, (graphdef, vparams, vcfg, _) in variants.items():
            cache = init_cache(vcfg, batch, args.slots)
            noise = lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype)  # noqa: E731
            cache = cache.replace(keys=jax.tree.map(noise, cache.keys), values=jax.tree.map(noise, cache.values),
                                  cursor=jnp.full((batch,), args.prefix, jnp.int32))
            holder = {"cache": cache, "step": make_step(graphdef, q), "tokens": tokens, "params": vparams}

            def run(h=holder):
                logits, h["cache"] = h["step"](h["params"], h["cache"], h["tokens"])
                return logits
            runners[(batch, q, variant)] = run
    names = list(runners)
    for name in names:  # compile; the second call compiles again for the placement of the returned cache
        kernels = variants[name[2]][3]
        if kernels:
            os.environ["TIDAR_JAX_CPU_KERNELS"] = kernels  # read when the attention is traced
        for _ in range(2):
            jax.block_until_ready(runners[name]())
    times = {name: [] for name in names}
    for r in range(args.repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            jax.block_until_ready(runners[name]())
            times[name].append(1e3 * (time.perf_counter() - t0))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{args.checkpoint}: {args.slots} cache slots, cursor {args.prefix}, median of {args.repeats} (ms)")
    print(f"{'batch':>5} {'query':>5} {'variant':>30} {'median':>9} {'min':>9} {'vs 1 token':>10}")
    for (batch, q, impl) in names:
        base = med.get((batch, 1, impl))
        ratio = f"{med[(batch, q, impl)] / base:.2f}x" if base else ""
        print(f"{batch:>5} {q:>5} {impl:>30} {med[(batch, q, impl)]:>9.1f} {min(times[(batch, q, impl)]):>9.1f} "
              f"{ratio:>10}")
    for dtype in args.dtypes:  # the roofline's memory side: every weight read once, as a 1-token forward must
        ms, gb = weight_read_ms(inference_params(params, dataclasses.replace(cfg, compute_dtype=dtype)),
                                args.repeats)
        print(f"reading every param once ({dtype}, {gb:.3f} GB, jitted sum): {ms:.1f} ms = {gb / ms * 1e3:.1f} GB/s")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
