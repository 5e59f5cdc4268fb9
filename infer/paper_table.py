"""A table laid out like the paper's Table 2 from `infer.humaneval` and lm-eval result files.

    python -m infer.paper_table --humaneval base=he_base.json --humaneval adapted=he_tidar.json \
        --lm-eval base=lm_base/ --lm-eval adapted=lm_tidar/ --results-md docs/RESULTS.md

One row per (model, decoding mode): HumanEval pass@1, tokens per forward (T/NFE), tokens/s, and whether TiDAR's
completions equal AR's; then the AR-mode likelihood scores lm-eval wrote for each model. With --results-md the
tables replace what lies between `<!-- results:paper-table -->` markers; nothing there is typed by hand.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from infer.common import replace_marked

MARKER = "paper-table"
LIKELIHOOD_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


def _labelled(pairs: list[str], flag: str) -> list[tuple[str, Path]]:
    out = []
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"{flag} takes LABEL=PATH, got {pair!r}")
        if not Path(path).exists():
            raise ValueError(f"{flag} {label}: {path} does not exist")
        out.append((label, Path(path)))
    return out


def humaneval_rows(label: str, report: dict) -> list[str]:
    """Markdown rows of one infer.humaneval report: one per decoding mode."""
    rows = []
    same = report.get("tidar_equals_ar")
    for mode, s in report["modes"].items():
        rows.append(f"| {label} | {mode.upper() if mode == 'ar' else 'TiDAR'} | {report['num_problems']} | "
                    f"{100 * s['pass@1']:.1f} | {s['tokens_per_forward']:.2f} | {s['tokens_per_second']:.1f} | "
                    f"{'-' if same is None or mode == 'ar' else same} |")
    return rows


def lm_eval_scores(result_dir: Path) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from the newest lm-eval results_*.json under `result_dir`."""
    files = sorted(glob.glob(str(result_dir / "**" / "results_*.json"), recursive=True))
    if not files:
        raise ValueError(f"{result_dir} holds no lm-eval results_*.json")
    results = json.loads(Path(files[-1]).read_text())["results"]
    return {task: {m: v for key, v in metrics.items() for m in LIKELIHOOD_METRICS if key.split(",")[0] == m}
            for task, metrics in results.items()}


def render(humaneval: list[tuple[str, dict]], lm_eval: list[tuple[str, dict]]) -> str:
    lines = []
    if humaneval:
        lines += ["| model | decoding | problems | HumanEval pass@1 (%) | T/NFE | tokens/s | same as AR |",
                  "|---|---|---|---|---|---|---|"]
        for label, report in humaneval:
            lines += humaneval_rows(label, report)
    if lm_eval:
        tasks = sorted({t for _, scores in lm_eval for t in scores})
        lines += ["", "| model | task (AR likelihood) | " + " | ".join(LIKELIHOOD_METRICS) + " |",
                  "|---|---|" + "---|" * len(LIKELIHOOD_METRICS)]
        for label, scores in lm_eval:
            for task in tasks:
                vals = scores.get(task, {})
                lines.append(f"| {label} | {task} | "
                             + " | ".join(f"{vals[m]:.4f}" if m in vals else "-" for m in LIKELIHOOD_METRICS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--humaneval", action="append", default=[], metavar="LABEL=JSON",
                        help="an infer.humaneval --json report, labelled (repeat for each model)")
    parser.add_argument("--lm-eval", action="append", default=[], metavar="LABEL=DIR",
                        help="an lm-eval --output_path directory, labelled (repeat for each model)")
    parser.add_argument("--results-md", metavar="PATH",
                        help=f"also write the tables between the results:{MARKER} markers of this file")
    args = parser.parse_args(argv)
    try:
        if not args.humaneval and not args.lm_eval:
            raise ValueError("give at least one --humaneval or --lm-eval")
        he = [(label, json.loads(path.read_text())) for label, path in _labelled(args.humaneval, "--humaneval")]
        lm = [(label, lm_eval_scores(path)) for label, path in _labelled(args.lm_eval, "--lm-eval")]
        table = render(he, lm)
        if args.results_md:
            md = Path(args.results_md)
            md.write_text(replace_marked(md.read_text(), MARKER, table, str(md)))
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
