"""Compiled cost of one decode step without weights: FLOPs and bytes accessed from XLA's cost analysis.

The programs are the real ones decoding runs (`decode.decode_step`, `decode.prefill`), lowered on abstract inputs
(`jax.ShapeDtypeStruct`: params from `nnx.eval_shape` of the model init, the KV cache and decode state from
`jax.eval_shape`), so nothing is allocated and no checkpoint is needed. Per step: GFLOP, GB accessed, arithmetic
intensity (FLOP/byte) and, given a chip's peak FLOP/s and memory bandwidth, the roofline time
max(FLOPs / peak, bytes / bandwidth). The TiDAR / AR ratio compares one TiDAR step (K + K*K query rows, or
K + |A|*K with a sparse proposal set A) with one 1-token AR step at the same cache length. The programs are costed
in plain XLA (`cpu_kernels.suspended`): the cost analysis cannot see into a custom call, so on a CPU the kernels'
work would be missing from the figures.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.decoding import decode
from tidar_jax.decoding.sampling import SamplingParams
from tidar_jax.decoding.spec import DecodeSpec
from tidar_jax.layout import masks
from tidar_jax.model.kv_cache import init_cache
from tidar_jax.model.precision import inference_dtype, inference_params
from tidar_jax.model.transformer import create_model
from tidar_jax.ops import cpu_kernels
from tidar_jax.sharding import check_runtime


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params as ShapeDtypeStructs) of the model `cfg` describes; no memory is allocated."""
    model = nnx.eval_shape(lambda: create_model(cfg))
    return nnx.split(model)


def cost_dict(compiled: Any) -> dict[str, float]:
    """`compiled.cost_analysis()` as one dict (older jax versions return a list of one dict per program)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _figures(compiled: Any, rows: int, peak_tflops: float | None, bandwidth_gbs: float | None) -> dict[str, Any]:
    cost = cost_dict(compiled)
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    out = {"query_rows": rows, "gflop": flops / 1e9, "gb_accessed": nbytes / 1e9,
           "intensity_flop_per_byte": flops / nbytes if nbytes else float("nan")}
    if peak_tflops and bandwidth_gbs:
        t_compute, t_memory = flops / (peak_tflops * 1e12), nbytes / (bandwidth_gbs * 1e9)
        out.update(roofline_ms=1e3 * max(t_compute, t_memory),
                   bound="compute" if t_compute >= t_memory else "memory")
    return out


def step_costs(cfg: ModelConfig, block_size: int, cache_len: int, batch_size: int = 1, prompt_bucket: int = 128,
               peak_tflops: float | None = None, bandwidth_gbs: float | None = None,
               model: tuple[nnx.GraphDef, nnx.State] | None = None,
               proposal_lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """Cost figures of the TiDAR step ([b, K + K*K] query tokens; [b, K + |A|*K] with the proposal set
    `proposal_lengths` = A), the AR step ([b, 1]) and the TiDAR prefill of a prompt bucket ([b, P + K]), all over a
    KV cache of `cache_len` slots, greedy, as `Generator` compiles them.

    Returns {"tidar_step", "ar_step", "prefill": figures (query_rows, gflop, gb_accessed, intensity_flop_per_byte,
    and roofline_ms / bound when both chip figures are given), "tidar_over_ar": {"flops", "bytes", "roofline"}
    ratios, "params": parameter count}. `model`: (graphdef, params) to cost instead of `abstract_model(cfg)`
    (params may be concrete: only their shapes and dtypes are used).
    """
    check_runtime(cfg, 1)  # the programs are compiled for this backend (one device)
    if prompt_bucket + block_size > cache_len:
        raise ValueError(f"prompt bucket {prompt_bucket} + K {block_size} exceeds the cache length {cache_len}")
    if cfg.scan_layers:  # XLA's cost analysis counts a loop body once: cost the unrolled layers (same function)
        cfg, model = dataclasses.replace(cfg, scan_layers=False), None
    graphdef, params = model or abstract_model(cfg)
    # Cast as a Generator casts them (precision.inference_params): the step reads compute-dtype weights.
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, inference_dtype(x.dtype, x.ndim, cfg)), params)
    sp = jax.eval_shape(SamplingParams.create)
    prompts = jax.ShapeDtypeStruct((batch_size, prompt_bucket), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    cache = jax.eval_shape(lambda: init_cache(cfg, batch_size, cache_len))
    out: dict[str, Any] = {"params": int(sum(x.size for x in jax.tree.leaves(params)))}
    with cpu_kernels.suspended():
        for mode in ("tidar", "ar"):
            spec = DecodeSpec.create(mode, block_size, True, 1, cfg, proposal_lengths=proposal_lengths)
            pre = jax.jit(lambda p, c, *a, spec=spec: decode.prefill(graphdef, p, c, *a, spec=spec))
            lowered = pre.lower(params, cache, prompts, lengths, scalar, key, sp)
            if mode == "tidar":
                out["prefill"] = _figures(lowered.compile(), batch_size * (prompt_bucket + block_size), peak_tflops,
                                          bandwidth_gbs)
            state = jax.eval_shape(lambda p, c, *a, spec=spec: decode.prefill(graphdef, p, c, *a, spec=spec),
                                   params, cache, prompts, lengths, scalar, key, sp)
            step = jax.jit(lambda p, s, q, spec=spec: decode.decode_step(graphdef, p, s, q, spec=spec))
            rows = batch_size * masks.step_query_count(spec.num_drafts, spec.with_proposals, spec.lengths)
            out[f"{mode}_step"] = _figures(step.lower(params, state, sp).compile(), rows, peak_tflops, bandwidth_gbs)
    t, a = out["tidar_step"], out["ar_step"]
    out["tidar_over_ar"] = {"flops": t["gflop"] / a["gflop"], "bytes": t["gb_accessed"] / a["gb_accessed"]}
    if "roofline_ms" in t:
        out["tidar_over_ar"]["roofline"] = t["roofline_ms"] / a["roofline_ms"]
    return out


def time_steps(cfg: ModelConfig, block_size: int, cache_len: int, batch_size: int = 1, prompt_bucket: int = 128,
               repeats: int = 5, seed: int = 0, proposal_lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """Measured milliseconds (median of `repeats`, interleaved, after a compile run) of the same jitted TiDAR and
    AR `decode_step` programs as `step_costs`, on RANDOM-init weights (the cost does not depend on their values),
    in `cfg.scan_layers`'s layer layout (pass the one decoding runs in, `decode.scan_layers`):
    {"tidar_step_ms", "ar_step_ms", "tidar_over_ar"}. Allocates the model and a [b, cache_len] KV cache."""
    from tidar_jax.evals import benchmark

    graphdef, params = nnx.split(create_model(cfg, seed))
    params = inference_params(params, cfg)
    sp = SamplingParams.create()
    prompts = jnp.full((batch_size, prompt_bucket), 3, jnp.int32)
    lengths = jnp.full((batch_size,), prompt_bucket, jnp.int32)
    runners = {}
    for mode in ("tidar", "ar"):
        spec = DecodeSpec.create(mode, block_size, True, 1, cfg, proposal_lengths=proposal_lengths)
        state = jax.jit(lambda p, c, *a, spec=spec: decode.prefill(graphdef, p, c, *a, spec=spec))(
            params, init_cache(cfg, batch_size, cache_len), prompts, lengths, jnp.int32(1), jax.random.key(0), sp)
        step = jax.jit(lambda p, s, q, spec=spec: decode.decode_step(graphdef, p, s, q, spec=spec))
        runners[mode] = lambda _, step=step, state=state: step(params, state, sp).drafts
    times = benchmark.interleaved(runners, repeats)
    ms = {mode: 1e3 * benchmark.median([t for t, _ in times[mode]]) for mode in runners}
    return {"tidar_step_ms": ms["tidar"], "ar_step_ms": ms["ar"], "tidar_over_ar": ms["tidar"] / ms["ar"]}


def format_costs(costs: dict[str, Any], title: str) -> str:
    """A text table of `step_costs` output."""
    roof = "roofline_ms" in costs["ar_step"]
    lines = [title, f"  {'program':<12}{'rows':>7}{'GFLOP':>11}{'GB':>10}{'FLOP/B':>9}"
             + (f"{'roofline ms':>13}  bound" if roof else "")]
    for name in ("tidar_step", "ar_step", "prefill"):
        f = costs[name]
        line = (f"  {name:<12}{f['query_rows']:>7}{f['gflop']:>11.3f}{f['gb_accessed']:>10.4f}"
                f"{f['intensity_flop_per_byte']:>9.1f}")
        lines.append(line + (f"{f['roofline_ms']:>13.4f}  {f['bound']}" if roof else ""))
    r = costs["tidar_over_ar"]
    if "measured" in costs:
        m = costs["measured"]
        lines.append(f"  measured (random weights, this device): TiDAR step {m['tidar_step_ms']:.2f} ms, AR step "
                     f"{m['ar_step_ms']:.2f} ms, ratio {m['tidar_over_ar']:.2f}x")
    lines.append(f"  TiDAR step / AR step: FLOPs {r['flops']:.2f}x, bytes {r['bytes']:.2f}x"
                 + (f", roofline time {r['roofline']:.2f}x" if roof else ""))
    return "\n".join(lines)
