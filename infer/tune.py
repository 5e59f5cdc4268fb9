"""Tune TiDAR decoding for a checkpoint on this machine: write WORKDIR/decode_tuning.json for decode.*=auto.

    python -m infer.tune --checkpoint runs/smollm2-tidar --prompts unseen --max-new-tokens 96
    python -m infer.tune --checkpoint runs/tiny --batch-sizes 1 8 --block-sizes 2 4 model.compute_dtype=bfloat16

Measures
- the checkpoint's acceptance histogram: greedy TiDAR decoding (beta = 1, the trained K, the full proposal set) of
  --num-prompts prompts of a named set (as infer.eval measures it);
- on this machine, in the model's compute dtype, for every --batch-sizes entry: the seconds of one compiled decode
  step (the loop state donated, as inside the decode loop; tidar_jax/evals/step_timing.py) of AR and of TiDAR with
  K' drafts (--block-sizes, default 2..K) and, for every m = 1..K', the best proposal set of m lengths. Step costs
  are cached per machine (~/.cache/tidar_jax/step_costs; --remeasure ignores the cache).
It then prints, per batch size, every option's expected tokens per step (the measured histogram truncated at K', and
a sparse set's shorter blocks after some acceptances: tidar_jax/decoding/step_choice.py states the model) and
expected tokens/s, and the choice: the TiDAR option with the most expected tokens/s (when AR is expected faster,
it says so; auto still decodes TiDAR, as asked). It writes WORKDIR/decode_tuning.json (atomically; profiles of other
machines in an existing file are kept). `decode.block_size=auto` and `decode.proposal_lengths=auto` (infer.generate,
infer.eval, infer.bench, infer.humaneval, or Generator(..., tuning=...)) then decode each batch bucket with the
choice for the largest tuned batch size at or below it. An existing decode_tuning.json that is not a readable tuning
file is left alone (the run refuses). Exit code 2 with one error line on bad input, 130 on Ctrl-C (nothing written).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from infer.common import PROMPT_SET_HELP, PROMPT_SETS

    parser = argparse.ArgumentParser(prog="python -m infer.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a tidar-objective training WORKDIR (its latest step), its checkpoints/ directory or one "
                             "step directory; decode_tuning.json is written into the WORKDIR")
    parser.add_argument("--step", type=int, help="measure the acceptance of this saved step instead of the latest")
    parser.add_argument("--prompts", choices=PROMPT_SETS, default="corpus", help=PROMPT_SET_HELP)
    parser.add_argument("--num-prompts", type=int, default=8, help="prompts decoded (one batch) for the acceptance")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per held-out corpus prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                        help="batch sizes whose step costs are measured (each batch bucket uses the largest tuned "
                             "size at or below it)")
    parser.add_argument("--block-sizes", type=int, nargs="+", metavar="K",
                        help="TiDAR block sizes K' to consider, each in 2..K (default: all of them; every K' adds "
                             "K' step programs to compile and time)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per step (after one warm-up)")
    parser.add_argument("--remeasure", action="store_true",
                        help="time every step again instead of reading this machine's cached step costs")
    parser.add_argument("--json", metavar="PATH", help="also write the report (tables included) as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="decode.* (e.g. decode.max_cache_len=1024: the cache length steps are timed over; use "
                             "the one you decode with) and model.compute_dtype / model.attention_impl overrides")
    args = parser.parse_args(argv)
    from infer.common import require_at_least

    require_at_least(parser, args, num_prompts=1, prompt_len=1, max_new_tokens=1, batch_sizes=1, block_sizes=2,
                     repeats=1)
    return args


def _existing(path):
    """The tuning file at `path` to update (None when there is none); ValueError when something else is there."""
    from tidar_jax.decoding import tuning

    if not path.exists():
        return None
    try:
        return tuning.read_tuning(path)
    except tuning.TuningError as e:
        raise ValueError(f"{e}; refusing to replace it: move it away to tune again") from None


def tune(args: argparse.Namespace) -> dict:
    """Measures, writes WORKDIR/decode_tuning.json and returns the JSON-ready report."""
    from infer.common import MODEL_OVERRIDES, check_writable, decode_room, prompt_set
    from tidar_jax.checkpoint.inference import load_for_inference, with_model
    from tidar_jax.checkpoint.store import step_path
    from tidar_jax.config import ConfigError, apply_overrides
    from tidar_jax.decoding import step_choice, tuning
    from tidar_jax.decoding.generation import Generator
    from tidar_jax.evals import agreement, step_timing
    from tidar_jax.evals.benchmark import device_info
    from tidar_jax.ops import kernel_choice

    for item in args.overrides:
        if not (item.startswith("decode.") or item.split("=", 1)[0] in MODEL_OVERRIDES):
            raise ConfigError(f"override {item!r} must look like decode.field=value or one of "
                              f"{', '.join(MODEL_OVERRIDES)}")
    bundle = load_for_inference(step_path(args.checkpoint, args.step))
    cfg = apply_overrides(bundle.config, args.overrides)
    bundle = dataclasses.replace(with_model(bundle, cfg.model), config=cfg)
    m = cfg.model
    if bundle.tokenizer is None:
        raise ConfigError(f"{args.checkpoint} has no tokenizer.json next to its checkpoints; the prompts need it")
    if cfg.train.objective != "tidar":
        raise ConfigError(f"{args.checkpoint} is an {cfg.train.objective}-objective checkpoint: its mask tokens "
                          "were not trained to draft, so there is no TiDAR decoding to tune")
    bad = [k for k in args.block_sizes or [] if not 2 <= k <= m.block_size]
    if bad:
        raise ConfigError(f"--block-sizes {bad[0]} must be in 2..{m.block_size} (the trained K, which the acceptance "
                          "is measured at)")
    path = tuning.tuning_path(bundle.workdir)
    existing = _existing(path)
    check_writable(path, "--checkpoint")
    prompts = prompt_set(args.prompts, args.checkpoint, bundle, args.num_prompts, args.prompt_len)
    dec = decode_room(cfg.decode, max(map(len, prompts)), args.max_new_tokens, m.block_size)
    dec = dataclasses.replace(dec, proposal_lengths=())
    generator = Generator(bundle.graphdef, bundle.params, m, dec, tokenizer_size=bundle.tokenizer.vocab_size)
    with agreement.matmul_precision(m.compute_dtype):
        result = generator.generate(prompts, "tidar", args.max_new_tokens, beta=1.0, temperature=0.0)
    histogram = result.acceptance_histogram
    block_sizes = sorted(set(args.block_sizes or range(2, m.block_size + 1)))
    steps = [(1, ())] + step_choice.candidates_to_measure(histogram, block_sizes)
    costs = {}
    for batch in sorted(set(args.batch_sizes)):
        seconds = step_timing.step_seconds(generator, batch, steps, args.repeats, args.remeasure)
        costs[batch] = step_choice.StepCosts(ar=seconds[steps[0]],
                                             tidar={(k, len(a)): seconds[(k, a)] for k, a in steps[1:]})
    device = device_info()
    info = {"device": device["processor"] if device["backend"] == "cpu" else device["device_kind"],
            "backend": device["backend"], "cpu_kernels": kernel_choice.mode(), "max_cache_len": dec.max_cache_len,
            "attention_impl": m.attention_impl, "repeats": args.repeats}
    acceptance = {"prompts": args.prompts, "num_prompts": len(prompts), "max_new_tokens": args.max_new_tokens}
    result_tuning = tuning.with_measurements(existing, path, m, bundle.step, histogram, acceptance, costs, info)
    tuning.write_tuning(result_tuning)
    batches = {}
    for batch, c in costs.items():
        choice = step_choice.choose(histogram, c, batch)
        batches[str(batch)] = {"ar": _option(choice.ar), "options": [_option(o) for o in choice.table],
                               "chosen": _option(choice.best), "ar_faster": choice.ar_faster}
    return {"checkpoint": str(args.checkpoint), "step": bundle.step, "tuning_file": str(path),
            "block_size": m.block_size, "compute_dtype": m.compute_dtype, "device": device, "acceptance":
            {**acceptance, "histogram": histogram, "tokens_per_forward": result.tokens_per_forward}, "batches": batches}


def _option(o) -> dict:
    return {"block_size": o.block_size, "proposal_lengths": list(o.proposal_lengths), "query_tokens": o.query_tokens,
            "tokens_per_step": o.tokens_per_step, "step_ms": 1e3 * o.step_seconds,
            "expected_tokens_per_second": o.tokens_per_second}


def format_report(report: dict) -> str:
    a = report["acceptance"]
    lines = [f"decode tuning of {report['checkpoint']} (step {report['step']}, trained K={report['block_size']}, "
             f"{report['compute_dtype']}, {report['device']['backend']})",
             f"acceptance: {a['num_prompts']} {a['prompts']} prompts, {a['max_new_tokens']} new tokens, greedy, beta "
             f"= 1, full set; steps accepting a = 1..K: {a['histogram'][1:]}"]
    for batch, b in report["batches"].items():
        lines += ["", f"batch {batch}: expected tokens/s = batch x tokens per step / step time (prefill excluded)",
                  f"  {'option':<26}{'query tokens':>13}{'tokens/step':>13}{'step ms':>10}{'tokens/s':>11}"]
        for o in [b["ar"]] + b["options"]:
            name = "AR" if not o["proposal_lengths"] else f"K={o['block_size']} A={o['proposal_lengths']}"
            mark = "  <- auto" if o == b["chosen"] else ""
            lines.append(f"  {name:<26}{o['query_tokens']:>13}{o['tokens_per_step']:>13.3f}{o['step_ms']:>10.2f}"
                         f"{o['expected_tokens_per_second']:>11.1f}{mark}")
        if b["ar_faster"]:
            lines.append(f"  AR is expected faster ({b['ar']['expected_tokens_per_second']:.1f} tokens/s) than the "
                         f"best TiDAR option; auto still decodes TiDAR with it (use --mode ar for speed)")
    lines += ["", f"wrote {report['tuning_file']}: decode with decode.block_size=auto decode.proposal_lengths=auto"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tidar_jax import caches

    caches.enable_compile_cache()  # before anything compiles: a repeated run loads its programs from disk
    from infer.common import report_main

    return report_main(args, tune, format_report)


if __name__ == "__main__":
    sys.exit(main())
