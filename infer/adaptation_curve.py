"""How TiDAR drafting improves while a pretrained model is adapted: one row per saved checkpoint of a run.

    python -m infer.adaptation_curve --run runs/smollm2-tidar --base runs/smollm2 \\
        --json docs/results/smollm2_curve.json --plot docs/smollm2_adaptation.png --results-md docs/RESULTS.md

For the base model (training tokens 0: adapters at their zero start compute exactly the base model) and every
checkpoint kept in the run's WORKDIR it measures
- per-slot draft accuracy (training layout, greedy top-1) on the run's held-out split (self-distilled text) and on
  held-out documents of an embedded corpus (real text, default bbc-news);
- greedy TiDAR tokens per forward on each of --prompt-sets (default: held-out-topic chat prompts, hand-written
  unseen-style requests, HumanEval prompts; see infer.eval --prompts), decoded in batches of --decode-batch, and
  whether TiDAR's output equals the base model's AR output token for token;
and writes JSON, a PNG (tokens per forward and slot accuracy against training tokens) and, with --results-md, the
table between the `<!-- results:smollm2-curve -->` markers of that file. Compiled programs are shared by all
checkpoints (same architecture, same shapes), so each extra checkpoint costs only its forwards. --steps measures
only some checkpoints (e.g. the new ones of a run that went on), and --json then keeps the rows it already holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from infer.common import PROMPT_SET_HELP, PROMPT_SETS

MARKER = "smollm2-curve"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infer.adaptation_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="the adaptation WORKDIR (every kept checkpoint is measured)")
    parser.add_argument("--base", required=True, help="the base model's checkpoint (the AR reference, row 0)")
    parser.add_argument("--corpus", default="bbc-news", help="embedded corpus for real held-out text")
    parser.add_argument("--eval-batches", type=int, default=4, help="held-out batches per slot-accuracy figure")
    parser.add_argument("--prompt-sets", nargs="+", choices=PROMPT_SETS, default=["chat", "unseen", "humaneval"],
                        metavar="SET", help="prompt sets for tokens per forward: " + PROMPT_SET_HELP)
    parser.add_argument("--num-prompts", type=int, default=48,
                        help="prompts per set (at most the set's size: unseen 48, humaneval 164)")
    parser.add_argument("--decode-batch", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--steps", type=int, nargs="+", metavar="STEP",
                        help="measure only these saved steps (default: every kept checkpoint and the base)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="tokens generated per prompt")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    parser.add_argument("--plot", metavar="PNG", help="write the curve as a PNG")
    parser.add_argument("--results-md", metavar="MD", help="render the table into this markdown file's markers")
    args = parser.parse_args(argv)
    for name in ("eval_batches", "num_prompts", "max_new_tokens", "decode_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


class _Measure:
    """Measurements shared by every checkpoint: held-out batches, prompts, the base model's AR answers, and one
    compiled metrics step."""

    def __init__(self, args, run_cfg, base):
        import dataclasses

        import jax

        from infer.common import decode_room, prompt_set
        from tidar_jax.data import pipeline
        from tidar_jax.decoding.generation import Generator
        from tidar_jax.training.objective import objective_metrics

        self.args, self.cfg = args, run_cfg
        corpus_cfg = dataclasses.replace(run_cfg, data=dataclasses.replace(run_cfg.data, corpus=args.corpus,
                                                                           paths=()))
        self.batches = {"distilled": pipeline.make_eval_batches(run_cfg, base.tokenizer, args.eval_batches),
                        args.corpus: pipeline.make_eval_batches(corpus_cfg, base.tokenizer, args.eval_batches)}
        self.prompts = {kind: prompt_set(kind, args.base, dataclasses.replace(base, config=corpus_cfg),
                                         args.num_prompts, 32) for kind in args.prompt_sets}
        longest = max(len(p) for ps in self.prompts.values() for p in ps)
        k = run_cfg.model.block_size
        # The sets are measured as they are: the cache grows to fit the longest prompt (HumanEval's are long).
        room = dataclasses.replace(run_cfg.decode, max_cache_len=max(run_cfg.decode.max_cache_len,
                                                                     longest + args.max_new_tokens + 2 * k))
        self.decode_cfg = decode_room(room, longest, args.max_new_tokens, k)
        ar = Generator(base.graphdef, base.params, base.config.model, self.decode_cfg)
        self.reference = {k: self._decode(ar, p, "ar")[0] for k, p in self.prompts.items()}
        self._steps = {}
        self._jax, self._objective_metrics, self._generator = jax, objective_metrics, Generator

    def _decode(self, generator, prompts: list[list[int]], mode: str) -> tuple[list[list[int]], float]:
        """Greedy continuations of `prompts`, decoded in batches of --decode-batch, and the row forwards they took
        (summed over rows, as `GenerationResult.tokens_per_forward` counts them)."""
        tokens, forwards = [], 0.0
        for start in range(0, len(prompts), self.args.decode_batch):
            result = generator.generate(prompts[start:start + self.args.decode_batch], mode, self.args.max_new_tokens,
                                        temperature=0.0)
            tokens += result.tokens
            forwards += sum(map(len, result.tokens)) / result.tokens_per_forward
        return tokens, forwards

    def row(self, bundle, tokens_seen: int) -> dict:
        jax, m = self._jax, bundle.config.model
        key = id(bundle.graphdef)
        if key not in self._steps:
            self._steps[key] = jax.jit(lambda p, tok, val, g=bundle.graphdef: self._objective_metrics(
                g, p, tok, val, self.cfg, "tidar"))
        row = {"step": bundle.step, "training_tokens": tokens_seen}
        for name, batches in self.batches.items():
            hits, counts = 0.0, 0.0
            for batch in batches:
                out = jax.device_get(self._steps[key](bundle.params, batch["tokens"], batch["valid"]))
                slot_count = batch["valid"].reshape(batch["valid"].shape[0], -1, m.block_size).sum(axis=(0, 1))
                hits, counts = hits + out["diff_slot_accuracy"] * slot_count, counts + slot_count
            row[f"slot_accuracy_{name}"] = (hits / counts).tolist()
        generator = self._generator(bundle.graphdef, bundle.params, m, self.decode_cfg)
        for name, prompts in self.prompts.items():
            tokens, forwards = self._decode(generator, prompts, "tidar")
            row[f"tokens_per_forward_{name}"] = sum(map(len, tokens)) / forwards
            row[f"equals_ar_{name}"] = tokens == self.reference[name]
        return row


def measure(args) -> dict:
    import dataclasses

    from tidar_jax.checkpoint.inference import load_for_inference
    from tidar_jax.checkpoint.store import CHECKPOINT_DIR, saved_steps

    steps = saved_steps(args.run)
    if not steps:
        raise ValueError(f"--run {args.run} holds no finished checkpoints (no {CHECKPOINT_DIR}/<step>)")
    missing = sorted(set(args.steps or ()) - set(steps))
    if missing:
        raise ValueError(f"--steps {' '.join(map(str, missing))}: not among the kept checkpoints of {args.run} "
                         f"({' '.join(map(str, steps))})")
    base = load_for_inference(args.base)
    first = load_for_inference(Path(args.run) / CHECKPOINT_DIR / str(steps[0]))
    cfg = first.config
    if base.tokenizer is None or first.tokenizer is None or base.tokenizer.fingerprint != first.tokenizer.fingerprint:
        raise ValueError(f"{args.run} and {args.base} must share one tokenizer")
    measure_ = _Measure(args, cfg, base)
    per_step = cfg.data.global_batch_size * cfg.data.seq_len
    rows = []
    if not args.steps:
        # Row 0: the base model with the run's block size (adapters at B = 0 compute exactly this).
        base = dataclasses.replace(base, config=dataclasses.replace(base.config, model=dataclasses.replace(
            base.config.model, block_size=cfg.model.block_size)), step=0)
        rows.append(measure_.row(base, 0))
    for step in args.steps or steps:
        bundle = first if step == steps[0] else load_for_inference(Path(args.run) / CHECKPOINT_DIR / str(step))
        rows.append(measure_.row(bundle, step * per_step))
        print(_format([rows[-1]], args.corpus, args.prompt_sets).splitlines()[-1], file=sys.stderr)
    return {"run": args.run, "base": args.base, "corpus": args.corpus, "block_size": cfg.model.block_size,
            "adapter_rank": cfg.model.adapter_rank, "prompt_sets": args.prompt_sets, "num_prompts": args.num_prompts,
            "max_new_tokens": args.max_new_tokens, "rows": rows}


def merged(previous: dict, report: dict) -> dict:
    """`report` with the rows of an earlier report of the same run and settings that it did not measure again,
    ordered by step. Raises ValueError when `previous` measured another run or with other settings."""
    keys = ("run", "base", "corpus", "block_size", "prompt_sets", "num_prompts", "max_new_tokens")
    differ = [k for k in keys if previous.get(k) != report[k]]
    if differ:
        raise ValueError(f"the existing --json file was measured with other settings ({', '.join(differ)}): "
                         "choose another --json, or measure every step again")
    new_steps = {r["step"] for r in report["rows"]}
    rows = [r for r in previous["rows"] if r["step"] not in new_steps] + report["rows"]
    return {**report, "rows": sorted(rows, key=lambda r: r["step"])}


def _read_report(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ValueError(f"--json {path} is not a report this tool wrote ({e}): choose another --json") from None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise ValueError(f"--json {path} is not a report this tool wrote: choose another --json")  # noqa: TRY004
    return report


def _format(rows: list[dict], corpus: str, prompt_sets: list[str]) -> str:
    head = " | ".join(f"T/F {name}" for name in prompt_sets)
    lines = [(f"| step | training tokens | {head} | slot accuracy (distilled held-out) | "
              f"slot accuracy ({corpus} held-out) | TiDAR == AR |"), "|---" * (5 + len(prompt_sets)) + "|"]
    for r in rows:
        slots = {k: " / ".join(f"{a:.2f}" for a in r[f"slot_accuracy_{k}"]) for k in ("distilled", corpus)}
        same = all(r[k] for k in r if k.startswith("equals_ar_"))
        per_set = " | ".join(f"{r[f'tokens_per_forward_{name}']:.2f}" for name in prompt_sets)
        lines.append(f"| {r['step']} | {r['training_tokens']:,} | {per_set} | {slots['distilled']} | "
                     f"{slots[corpus]} | {same} |")
    return "\n".join(lines)


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    x = [r["training_tokens"] / 1e6 for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name in report["prompt_sets"]:
        left.plot(x, [r[f"tokens_per_forward_{name}"] for r in rows], marker="o", label=f"{name} prompts")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set(xlabel="training tokens (millions)", ylabel="greedy tokens per forward",
             title=f"TiDAR K={report['block_size']}: tokens per forward")
    left.legend()
    for slot in range(report["block_size"]):
        right.plot(x, [r["slot_accuracy_distilled"][slot] for r in rows], marker="o", label=f"slot {slot + 1}")
    right.set(xlabel="training tokens (millions)", ylabel="draft top-1 accuracy",
              title="draft accuracy per slot (distilled held-out)", ylim=(0, 1))
    right.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def render(md_path: str, table: str) -> None:
    """Writes `table` between the `<!-- results:smollm2-curve -->` markers of `md_path`."""
    from infer.common import replace_marked

    Path(md_path).write_text(replace_marked(Path(md_path).read_text(), MARKER, table, md_path))


def _check_outputs(args) -> None:
    """Refuses (ValueError) an unwritable --json / --plot, or a --results-md without its markers, before any
    checkpoint is measured."""
    from infer.common import check_writable, replace_marked

    if args.results_md:
        try:
            replace_marked(Path(args.results_md).read_text(), MARKER, "", args.results_md)
        except OSError as e:
            raise ValueError(f"--results-md {args.results_md}: cannot read it ({e.strerror or e})") from None
    for flag, path in (("--json", args.json), ("--plot", args.plot), ("--results-md", args.results_md)):
        if path:
            check_writable(path, flag)


def main(argv=None) -> int:
    args = parse_args(argv)
    from infer.common import USER_ERRORS, fail, write_json

    try:
        _check_outputs(args)
        report = measure(args)
        if args.steps and args.json and Path(args.json).is_file():
            report = merged(_read_report(args.json), report)
        table = _format(report["rows"], args.corpus, args.prompt_sets)
        if args.results_md:
            render(args.results_md, table)
    except USER_ERRORS as e:
        return fail(e)
    print(table)
    if args.json:
        write_json(args.json, report)
    if args.plot:
        _plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
