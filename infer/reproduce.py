"""Reproduce the results in docs/RESULTS.md: train, evaluate, benchmark, and render the tables from the JSON.

    bash scripts/reproduce.sh              # full run, fills docs/RESULTS.md (~35 min on a quiet 2-core CPU:
                                           # ~28 min training, ~2 min eval, ~4 min bench)
    bash scripts/reproduce.sh --quick      # smoke test in ~3 min: a few steps, output under runs/reproduce-quick
    python -m infer.reproduce --render-only  # re-render docs/RESULTS.md from docs/results/*.json

On the embedded BBC-news corpus with configs/small.yaml and an equal token budget (same steps x batch x seq_len),
it trains four runs, each through the real CLI (`python -m train.train`):
  ar        the AR-only baseline (train.objective=ar)
  tidar-k4  TiDAR, block size 4
  tidar-k8  TiDAR, block size 8
  draft     a ~4x smaller AR model, the drafter of the speculative-decoding baseline
then `python -m infer.eval` on each (docs/results/eval_<run>.json) and one `python -m infer.bench` over all of them
(docs/results/bench.json, docs/bench_speedup.png, docs/bench_latency.png), and finally rewrites the marked sections
of RESULTS.md from those files, so that no number there is typed by hand. Runs resume: a finished run is not
retrained, so an interrupted reproduction continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "docs" / "RESULTS.md"
RUNS = ("ar", "tidar-k4", "tidar-k8", "draft")
RUN_OVERRIDES = {
    "ar": ["train.objective=ar"],
    "tidar-k4": ["model.block_size=4"],
    "tidar-k8": ["model.block_size=8"],
    "draft": ["train.objective=ar", "model.d_model=128", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
              "model.d_ff=384"],
}
QUICK = {"steps": 4, "eval": ["--eval-batches", "1", "--num-prompts", "2", "--max-new-tokens", "8"],
         "bench": ["--batch-sizes", "1", "2", "--repeats", "1", "--max-new-tokens", "8", "--latency-prefixes", "64",
                   "--latency-queries", "1", "4", "20", "72", "--latency-repeats", "1"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infer.reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 4 training steps, tiny eval / bench; writes under WORKDIR/docs, never docs/")
    parser.add_argument("--workdir", help="where the four runs go (default runs/reproduce, or runs/reproduce-quick)")
    parser.add_argument("--docs", help="where results/*.json, the PNGs and RESULTS.md go (default docs/, or "
                                       "WORKDIR/docs with --quick)")
    parser.add_argument("--steps", type=int, help="training steps of every run (default 500; 4 with --quick)")
    parser.add_argument("--config", default=str(REPO / "configs" / "small.yaml"), help="base preset of every run")
    parser.add_argument("--render-only", action="store_true", help="only re-render RESULTS.md from existing JSON")
    return parser.parse_args(argv)


def _rel(path: Path | str) -> str:
    """A path as written in commands: relative to the repository (the working directory of every stage)."""
    return os.path.relpath(path, REPO)


def _run(cmd: list[str], log: list[dict]) -> None:
    """Runs one entry point, streaming its output; records the command line and its wall time."""
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    log.append({"command": shlex.join(cmd), "wall_time_s": round(time.perf_counter() - start, 1)})


def _train_overrides(steps: int, quick: bool) -> list[str]:
    return [f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={steps}",
            f"train.checkpoint_every={steps}", f"train.log_every={max(1, min(20, steps // 2))}",
            "train.eval_batches=4" if quick else "train.eval_batches=8"]


def run_all(args: argparse.Namespace, workdir: Path, docs: Path) -> dict:
    py = sys.executable
    steps = args.steps or (QUICK["steps"] if args.quick else 500)
    log: list[dict] = []
    results = docs / "results"
    results.mkdir(parents=True, exist_ok=True)
    tokenizer = _rel(workdir / RUNS[0] / "tokenizer.json")
    for i, name in enumerate(RUNS):
        # The first run trains the BPE on the train split; the others reuse that file, so all share one tokenizer.
        shared = [f"data.tokenizer={tokenizer}"] if i else []
        _run([py, "-m", "train.train", "--config", _rel(args.config), "--workdir", _rel(workdir / name),
              *RUN_OVERRIDES[name], *_train_overrides(steps, args.quick), *shared], log)
    for name in RUNS:
        _run([py, "-m", "infer.eval", "--checkpoint", _rel(workdir / name), "--json",
              _rel(results / f"eval_{name}.json"), *(QUICK["eval"] if args.quick else [])], log)
    _run([py, "-m", "infer.bench", "--checkpoint", *(_rel(workdir / n) for n in ("tidar-k4", "tidar-k8", "ar")),
          "--draft", _rel(workdir / "draft"), "--json", _rel(results / "bench.json"), "--plot-dir", _rel(docs),
          *(QUICK["bench"] if args.quick else [])], log)
    meta = {"quick": args.quick, "steps": steps, "config": _rel(args.config),
            "command": "bash scripts/reproduce.sh" + (" --quick" if args.quick else ""), "stages": log,
            "total_wall_time_s": round(sum(s["wall_time_s"] for s in log), 1),
            "training": {name: _training_summary(workdir / name) for name in RUNS}}
    (results / "reproduce.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _training_summary(workdir: Path) -> dict:
    """Steps, tokens seen and median training throughput from WORKDIR/metrics.jsonl."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    return {"steps": max((r["step"] for r in records), default=0),
            "tokens_per_s": rates[len(rates) // 2] if rates else None,
            "final_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None)}


# ------------------------------------------------------------------------------------------------------ rendering
def _f(x, digits=3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_sections(docs: Path) -> dict[str, str]:
    """Markdown for every marked section of RESULTS.md, from docs/results/*.json."""
    results = docs / "results"
    meta = json.loads((results / "reproduce.json").read_text())
    evals = {n: json.loads((results / f"eval_{n}.json").read_text()) for n in RUNS}
    bench = json.loads((results / "bench.json").read_text())
    dev = bench["device"]
    sections = {"meta": "\n".join([
        f"- Command: `{meta['command']}` ({meta['steps']} training steps per run, preset `{meta['config']}`)",
        f"- Machine: {dev['processor']} ({dev['backend']}, {dev['device_kind']}, {dev['device_count']} device(s)), "
        f"host `{dev['host']}`, jax {dev['jax']}",
        f"- Date: {dev['date']}; whole reproduction {meta['total_wall_time_s'] / 60:.1f} min",
        *(["- **Quick smoke-test numbers, not results.**"] if meta["quick"] else [])])}

    rows = []
    for n in RUNS:
        e, h, t = evals[n], evals[n]["heldout"], meta["training"][n]
        rows.append([f"`{n}`", e["objective"], str(e["block_size"]), f"{e['params'] / 1e6:.2f}M",
                     f"{t['steps']} ({_f(t['tokens_per_s'], 0)} tok/s)", _f(h["ar_loss"]), _f(h["perplexity"], 2),
                     _f(h["bits_per_byte"]), _f(h.get("diff_loss")),
                     " / ".join(f"{a:.2f}" for a in h.get("diff_slot_accuracy", [])) or "–"])
    sections["quality"] = _table(["run", "objective", "K", "params", "train steps (throughput)", "AR loss",
                                  "perplexity", "bits/byte", "diffusion loss", "draft accuracy per slot"], rows)

    rows = []
    for n in RUNS:
        d = evals[n].get("decoding")
        if d and "tidar" in d:
            rows.append([f"`{n}`", str(d["decode_block_size"]), _f(d["tidar"]["tokens_per_forward"], 2),
                         str(d["tidar"]["acceptance_histogram"][1:]), str(d["tidar_equals_ar"])])
    d0 = next((evals[n]["decoding"] for n in RUNS if "decoding" in evals[n]), None)
    settings = (f"Settings: {d0['num_prompts']} held-out prompts of {d0['prompt_len']} tokens decoded as one batch, "
                f"{d0['max_new_tokens']} new tokens each.\n\n" if d0 else "")
    sections["tokens_per_forward"] = settings + _table(
        ["run", "K", "TiDAR tokens / forward", "acceptance histogram (a = 1..K)", "output identical to AR"], rows)

    rows = []
    for g in bench.get("generation", []):
        ms = g["methods"]
        cell = lambda m: f"{ms[m]['tokens_per_second']:.1f} ({ms[m]['speedup_vs_ar']:.2f}x)" if m in ms else "–"
        tpf = lambda m: _f(ms[m]["tokens_per_forward"], 2) if m in ms else "–"
        versus = (f"{ms['tidar']['tokens_per_second'] / ms['spec']['tokens_per_second']:.2f}x"
                  if "tidar" in ms and "spec" in ms else "–")
        rows.append([f"`{Path(g['checkpoint']).name}`", str(g["block_size"]), str(g["batch_size"]),
                     f"{ms['ar']['tokens_per_second']:.1f}", cell("tidar"), tpf("tidar"), cell("spec"), tpf("spec"),
                     versus])
    st = bench["settings"]
    sections["speed"] = (f"Settings: prompts of {st['prompt_len']} tokens, {st['max_new_tokens']} new tokens, batch "
                         f"sizes {', '.join(map(str, st['batch_sizes']))}, {st['repeats']} timed rounds after one "
                         "warm-up round.\n\n") + _table(["target", "K", "batch", "AR tok/s", "TiDAR tok/s (vs AR)", "TiDAR tok/fwd",
                                "draft-model spec tok/s (vs AR)", "spec tok/target fwd", "TiDAR vs spec"], rows)

    lat = bench.get("latency")
    if lat:
        prefixes = list(lat["curves"])
        rows = [[str(q)] + [f"{lat['curves'][p][i]['median_ms']:.2f} "
                            f"({lat['curves'][p][i]['median_ms'] / lat['curves'][p][0]['median_ms']:.2f}x)"
                            for p in prefixes] for i, q in enumerate(lat["query_tokens"])]
        sections["latency"] = (f"Model: {lat['label']}.\n\n"
                               + _table(["query tokens"] + [f"ms, prefix {p} (vs 1 token)" for p in prefixes], rows))
    sections["commands"] = "```bash\n" + "\n".join(s["command"].replace(sys.executable, "python")
                                                   + f"   # {s['wall_time_s']:.0f} s" for s in meta["stages"]) + "\n```"
    return sections


def render(docs: Path, template: Path = TEMPLATE) -> Path:
    """Replaces the text between `<!-- results:NAME -->` and `<!-- /results:NAME -->` in the template with the
    rendered sections and writes DOCS/RESULTS.md (the template itself when DOCS is docs/)."""
    from infer.common import replace_marked

    text = template.read_text()
    for name, body in render_sections(docs).items():
        text = replace_marked(text, name, body, str(template))
    out = docs / "RESULTS.md"
    out.write_text(text)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or REPO / "runs" / ("reproduce-quick" if args.quick else "reproduce"))
    docs = Path(args.docs or (workdir / "docs" if args.quick else REPO / "docs"))
    if not args.render_only:
        run_all(args, workdir, docs)
    print(f"\nwrote {render(docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
