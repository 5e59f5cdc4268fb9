"""How `infer.bench` shows its report (the dict it also writes as JSON): plain-text tables and PNG plots."""

from __future__ import annotations

from pathlib import Path

from tidar_jax.evals import agreement, benchmark


def format_tables(report: dict) -> str:
    """The report's generation groups and latency curve as the plain-text tables bench prints."""
    lines = []
    for g in report.get("generation", []):
        ms = g["methods"]
        w = max(8, *(len(name) + 1 for name in ms))
        r = g["step_cost"]["tidar_over_ar"]
        expected = any(s.get("expected_tokens_per_second") for s in ms.values())  # infer.tune's model (step_choice)
        lines += ["", f"{g['label']}  decode K={g['block_size']}  batch {g['batch_size']}  (TiDAR step / AR step: "
                      f"FLOPs {r['flops']:.2f}x, bytes {r['bytes']:.2f}x)",
                  f"  {'method':<{w}}{'tokens/s':>10}" + (f"{'expected':>10}" if expected else "")
                  + f"{'speed-up vs AR':>16}{'tokens/forward':>16}{'forwards':>10}{'draft fwd':>10}  same tokens as AR"]
        for name, s in ms.items():
            rate = s.get("expected_tokens_per_second")
            lines.append(f"  {name:<{w}}{s['tokens_per_second']:>10.1f}"
                         + (f"{rate:>10.1f}" if rate else f"{'-':>10}" if expected else "")
                         + f"{s['speedup_vs_ar']:>15.2f}x"
                         f"{s['tokens_per_forward']:>16.2f}{s['forwards']:>10}{s.get('draft_forwards', '-'):>10}"
                         f"  {agreement.describe(s['agreement'])}")
        if expected:
            lines.append("  expected: the tokens/s infer.tune's step costs and acceptance predict (prefill excluded)")
        if g.get("auto_step"):
            lines.append(f"  tidar auto: decode.block_size=auto decode.proposal_lengths=auto, here "
                         f"K={g['auto_step'][0]} A={list(g['auto_step'][1])}")
        if len(ms) > 1 and "ar_baseline" in g:
            used = g.get("cpu_kernels", {}).get("choices", {})
            kernel = sum(c["choice"] == "kernel" for c in used.values())
            lines.append(f"  speed-up against {g['ar_baseline']}, the fastest AR measured; CPU kernels chosen by "
                         f"measurement ran {kernel} of {len(used)} shapes" if used else
                         f"  speed-up against {g['ar_baseline']}, the fastest AR measured")
    lat = report.get("latency")
    if lat:
        prefixes = list(lat["curves"])
        lines += ["", f"forward latency ({lat['label']}), ms (median) per forward of q query tokens",
                  f"  {'q':>5}" + "".join(f"{'prefix ' + p:>14}{'x 1-token':>10}" for p in prefixes)]
        for i, q in enumerate(lat["query_tokens"]):
            row = f"  {q:>5}"
            for p in prefixes:
                c = lat["curves"][p]
                row += f"{c[i]['median_ms']:>14.2f}{c[i]['median_ms'] / c[0]['median_ms']:>10.2f}"
            lines.append(row)
    return "\n".join(lines)


def write_plots(report: dict, plot_dir: str) -> list[str]:
    """PLOT_DIR/bench_speedup.png and PLOT_DIR/bench_latency.png for the parts the report has; their paths."""
    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    written = []
    d = report["device"]
    device = d["processor"] if d["backend"] == "cpu" else f"{d['backend']}: {d['device_kind']}"
    if report.get("generation"):
        rows = [{"label": f"{Path(g['checkpoint']).name} K={g['block_size']}", "batch_size": g["batch_size"],
                 "speedup": {n: s["speedup_vs_ar"] for n, s in g["methods"].items() if not n.startswith("ar")},
                 "tokens_per_forward": {n: s["tokens_per_forward"] for n, s in g["methods"].items()}}
                for g in report["generation"]]
        path = str(Path(plot_dir) / "bench_speedup.png")
        benchmark.plot_speedups(rows, path, f"Greedy decoding, {report['settings']['max_new_tokens']} new tokens "
                                            f"({device})")
        written.append(path)
    if report.get("latency"):
        lat = report["latency"]
        path = str(Path(plot_dir) / "bench_latency.png")
        marks = {f"K={k}": k + k * k for k in (4, 8, 16) if k + k * k in lat["query_tokens"]}
        benchmark.plot_latency({f"prefix {p}": c for p, c in lat["curves"].items()}, path,
                               f"One forward with a KV cache, {lat['label']} ({device})", marks)
        written.append(path)
    return written
