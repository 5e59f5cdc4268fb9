"""Evaluate a checkpoint on held-out data: likelihood, diffusion draft accuracy, TiDAR tokens per forward, samples.

    python -m infer.eval --checkpoint runs/small --json docs/results/eval_small.json
    python -m infer.eval --checkpoint runs/small --eval-batches 4 --num-prompts 4 --max-new-tokens 64
    python -m infer.eval --checkpoint runs/small mesh.data=2 mesh.tensor=4 decode.max_cache_len=1024

The held-out split is the checkpoint's own (its data config and WORKDIR/tokenizer.json). Reported:
- AR-mode next-token loss (nats), perplexity = exp(loss), top-1 accuracy and bits per byte (cross-entropy in bits
  over the UTF-8 bytes of the predicted held-out text);
- for a `tidar` checkpoint: diffusion loss and per-slot draft accuracy on the training layout (losses.tidar_loss);
  an `ar`-objective checkpoint reports the AR part only;
- greedy decoding of held-out prompts: TiDAR tokens per forward and acceptance histogram, the same prompts decoded
  AR, and whether the two outputs are identical (they must be at beta = 1; float32 decodes at "highest" matmul
  precision for it): exactly, up to near-ties (the first divergence where AR's top-2 logit gap is below a
  tolerance: a low-precision flip, tidar_jax/evals/agreement.py) or not;
- from that histogram (full proposal set), the best sparse proposal set of each size (proposals.best_sets: the
  fewest tokens per step lost to shorter draft blocks, modelling steps as independent) and a suggested
  `decode.proposal_lengths`: the smallest set losing at most --max-token-loss of the tokens per step (a model:
  measure the set with `infer.bench --proposal-sets`);
- a few generations as text.
The params are restored onto a mesh of all visible devices (`mesh.*` overrides shape it), and decoding runs sharded
on it: prompt rows over data, heads / MLP / vocabulary and the KV cache's heads over tensor.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from infer.common import PROMPT_SET_HELP, PROMPT_SETS

    parser = argparse.ArgumentParser(prog="python -m infer.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a training WORKDIR (its latest step), its checkpoints/ directory or one step directory")
    parser.add_argument("--step", type=int, help="load this saved step instead of the latest (e.g. after a "
                                                 "corrupt save)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to this file")
    parser.add_argument("--eval-batches", type=int, default=16,
                        help="held-out batches of data.global_batch_size x data.seq_len tokens (fewer if the "
                             "held-out split is smaller)")
    parser.add_argument("--batch-size", type=int,
                        help="rows per held-out batch (default: the checkpoint's data.global_batch_size)")
    parser.add_argument("--num-prompts", type=int, default=8,
                        help="held-out prompts decoded as one batch for tokens per forward (0 = skip decoding)")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per held-out corpus prompt")
    parser.add_argument("--prompts", choices=PROMPT_SETS, default="corpus", help=PROMPT_SET_HELP)
    parser.add_argument("--max-new-tokens", type=int, help="tokens generated per prompt (default: "
                                                           "decode.max_new_tokens of the checkpoint)")
    parser.add_argument("--samples", type=int, default=3, help="generations printed (and stored) as text")
    parser.add_argument("--max-token-loss", type=float, default=0.02,
                        help="the suggested sparse proposal set is the smallest whose modelled loss of tokens per "
                             "step, on the measured acceptance histogram, is at most this fraction")
    parser.add_argument("--near-tie-epsilon", type=float, metavar="LOGITS",
                        help="TiDAR's first divergence from AR's output counts as a near-tie when AR's top-2 logit "
                             "gap there is below this (default: 4 x the compute dtype's eps x max|logit|)")
    parser.add_argument("--block-size", type=int,
                        help="TiDAR decode block size K (default: the trained one; another K needs the next flag)")
    parser.add_argument("--allow-block-size-mismatch", action="store_true",
                        help="decode with a block size other than the one the model was trained with")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="mesh.*, decode.*, data.corpus, data.paths, model.attention_impl and "
                             "model.compute_dtype overrides, e.g. mesh.tensor=2 decode.max_cache_len=1024 "
                             "data.corpus=bbc-news (held-out text of another corpus), model.attention_impl=xla "
                             "model.compute_dtype=float32 (a checkpoint trained with cudnn, run on a CPU)")
    args = parser.parse_args(argv)
    from infer.common import require_at_least

    require_at_least(parser, args, eval_batches=1, batch_size=1, num_prompts=0, prompt_len=1, max_new_tokens=1,
                     samples=0, block_size=1, max_token_loss=0, near_tie_epsilon=0)
    return args


def _check_overrides(args: argparse.Namespace) -> None:
    from infer.common import MODEL_OVERRIDES
    from tidar_jax.config import ConfigError

    for item in args.overrides:
        key = item.split("=", 1)[0] if "=" in item else ""
        if not (key.startswith(("mesh.", "decode.")) or key in ("data.corpus", "data.paths", *MODEL_OVERRIDES)):
            raise ConfigError(f"override {item!r} must look like mesh.field=value, decode.field=value, "
                              f"data.corpus=NAME, data.paths=[...] or one of {', '.join(MODEL_OVERRIDES)}")


def _mesh_config(args: argparse.Namespace):
    """The evaluation mesh: every visible device on the data axis unless mesh.* overrides say otherwise (the
    training run's mesh is irrelevant here)."""
    from tidar_jax.config import load_config

    _check_overrides(args)
    return load_config(None, [o for o in args.overrides if o.startswith("mesh.")]).mesh


def _effective_config(config, args: argparse.Namespace, mesh_cfg):
    """The checkpoint's config with the evaluation mesh, decode.* overrides and the batch / block-size flags."""
    import dataclasses

    from tidar_jax.config import apply_overrides

    flags = {"data.global_batch_size": args.batch_size, "decode.block_size": args.block_size}
    overrides = [o for o in args.overrides if o.startswith(("decode.", "data.", "model."))]
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    return apply_overrides(dataclasses.replace(config, mesh=mesh_cfg), overrides)


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Runs every measurement; returns the JSON-ready report."""
    import dataclasses

    import jax

    from infer.common import decode_room, prompt_set
    from tidar_jax.checkpoint.inference import load_for_inference, with_model
    from tidar_jax.checkpoint.store import step_path
    from tidar_jax.config import ConfigError
    from tidar_jax.data import pipeline
    from tidar_jax.decoding import tuning
    from tidar_jax.decoding.generation import Generator
    from tidar_jax.decoding.spec import resolve_block_size
    from tidar_jax.evals import agreement
    from tidar_jax.evals import likelihood as evaluation
    from tidar_jax.evals.benchmark import device_info
    from tidar_jax.layout import proposals
    from tidar_jax.model.transformer import count_params
    from tidar_jax.sharding import make_mesh

    mesh_cfg = _mesh_config(args)
    mesh = make_mesh(mesh_cfg)
    bundle = load_for_inference(step_path(args.checkpoint, args.step), mesh)
    cfg = _effective_config(bundle.config, args, mesh_cfg)
    bundle = with_model(bundle, cfg.model)
    if bundle.tokenizer is None:
        raise ConfigError(f"{args.checkpoint} has no tokenizer.json next to its checkpoints; held-out data needs it")
    tok, m = bundle.tokenizer, cfg.model
    report = {"checkpoint": str(args.checkpoint), "step": bundle.step, "objective": cfg.train.objective,
              "block_size": m.block_size, "params": count_params(bundle.params),
              "model": {k: getattr(m, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                   "d_ff")},
              "corpus": cfg.data.corpus, "device": device_info()}
    if args.num_prompts > 0:  # prompts and their cache first: a token limit past the cache fails before any work
        max_new = args.max_new_tokens or cfg.decode.max_new_tokens
        prompts = prompt_set(args.prompts, args.checkpoint, dataclasses.replace(bundle, config=cfg), args.num_prompts,
                             args.prompt_len)
        # Room for every prompt and continuation, so no row stops early for lack of cache.
        dec = decode_room(cfg.decode, max(map(len, prompts)), max_new, resolve_block_size(m, cfg.decode, True))
        dec = dataclasses.replace(dec, block_size=cfg.decode.block_size)  # "auto" stays auto
    batches = pipeline.make_eval_batches(cfg, tok, args.eval_batches)
    report["heldout"] = evaluation.heldout_likelihood(bundle.graphdef, bundle.params, cfg, batches, mesh,
                                                      evaluation.token_byte_lengths(tok, m.vocab_size))
    report["heldout"].update(batches=len(batches), batch_size=cfg.data.global_batch_size, seq_len=cfg.data.seq_len)
    if args.num_prompts > 0:
        generator = Generator(bundle.graphdef, bundle.params, m, dec,
                              allow_block_size_mismatch=args.allow_block_size_mismatch, mesh=mesh,
                              tuning=tuning.for_decode(dec, bundle.workdir, bundle.step))
        modes = ("tidar", "ar") if cfg.train.objective == "tidar" else ("ar",)
        # Float32 decodes at "highest" matmul precision: the strict check must not be judged on TF32 dots.
        with jax.set_mesh(mesh), agreement.matmul_precision(m.compute_dtype):
            stats, outputs = evaluation.decoding_stats(generator, prompts, max_new, modes, args.near_tie_epsilon)
        report["decoding"] = {"prompts": args.prompts, "num_prompts": len(prompts),
                              "prompt_len": max(map(len, prompts)),
                              "max_new_tokens": max_new, "decode_block_size": generator.block_size,
                              "matmul_precision": agreement.precision_name(m.compute_dtype), **stats}
        k = generator.block_size
        # Sets are suggested from a histogram of the trained K's full set only (auto may have run other shapes).
        if "tidar" in stats and not tuning.uses_auto(dec) and not proposals.is_sparse(
                proposals.resolve_proposal_lengths(dec.proposal_lengths, k), k):
            hist = stats["tidar"]["acceptance_histogram"]
            report["decoding"]["proposal_sets"] = proposals.best_sets(hist)
            report["decoding"]["suggested_proposal_lengths"] = proposals.suggest_set(
                hist, args.max_token_loss)["proposal_lengths"]
        report["samples"] = [{"prompt": tok.decode(p), "continuation": tok.decode(outputs[modes[0]][i]),
                              "mode": modes[0]} for i, p in enumerate(prompts[:args.samples])]
    return report


def format_report(report: dict) -> str:
    """The readable table printed to stdout."""
    from tidar_jax.evals import agreement

    h = report["heldout"]
    lines = [f"checkpoint {report['checkpoint']}  (step {report['step']}, objective {report['objective']}, "
             f"K={report['block_size']}, {report['params'] / 1e6:.2f}M params, {report['device']['backend']} "
             f"x{report['device']['device_count']})",
             f"held-out: {h['batches']} batches of {h['batch_size']}x{h['seq_len']}, {h['num_targets']:,} targets, "
             f"{h.get('bytes', 0):,} bytes", "",
             f"  {'metric':<28}{'value':>12}",
             f"  {'AR loss (nats/token)':<28}{h['ar_loss']:>12.4f}",
             f"  {'AR perplexity':<28}{h['perplexity']:>12.3f}",
             f"  {'AR bits per byte':<28}{h.get('bits_per_byte', float('nan')):>12.4f}",
             f"  {'AR top-1 accuracy':<28}{h['ar_accuracy']:>12.4f}"]
    if "diff_loss" in h:
        lines += [f"  {'diffusion loss':<28}{h['diff_loss']:>12.4f}",
                  f"  {'diffusion top-1 accuracy':<28}{h['diff_accuracy']:>12.4f}",
                  f"  {'draft accuracy per slot':<28}  " + " ".join(f"{a:.3f}" for a in h["diff_slot_accuracy"])]
    d = report.get("decoding")
    if d:
        lines += ["", f"greedy decoding: {d['num_prompts']} held-out {d.get('prompts', 'corpus')} prompts "
                      f"(up to {d['prompt_len']} tokens), "
                      f"{d['max_new_tokens']} new tokens, one batch (K={d['decode_block_size']})",
                  f"  {'mode':<8}{'tokens/forward':>16}{'forwards':>10}{'tokens/s':>10}  acceptance histogram [a=1..K]"]
        for mode in ("tidar", "ar"):
            if mode in d:
                s = d[mode]
                lines.append(f"  {mode:<8}{s['tokens_per_forward']:>16.3f}{s['forwards']:>10}"
                             f"{s['tokens_per_second']:>10.1f}  {s['acceptance_histogram'][1:]}")
        if "tidar_vs_ar" in d:
            a = d["tidar_vs_ar"]
            rule = (f"strict float32 check {'passed' if a['strict_ok'] else 'FAILED'}" if a["strict"]
                    else f"{a['compute_dtype']}: near-ties allowed")
            lines.append(f"  TiDAR greedy output identical to AR greedy output: {agreement.describe(a)}  "
                         f"({a['exact_match_rows']} exact, {a['near_tie_rows']} near-tie, {a['mismatch_rows']} "
                         f"mismatching rows of {a['rows']}; {rule})")
        elif "tidar_equals_ar" in d:
            lines.append(f"  TiDAR greedy output identical to AR greedy output: {d['tidar_equals_ar']}")
        if "proposal_sets" in d:
            lines += ["", "  sparse proposal sets on this histogram: query tokens per step, modelled tokens per "
                          "step lost (fraction), guesses replaced by fillers per step"]
            lines += [f"    {str(s['proposal_lengths']):<24}Q={s['query_tokens']:<6}{s['lost_tokens_per_step']:.4f} "
                      f"({s['lost_token_fraction']:.2%})  {s['lost_drafts_per_step']:.3f}" for s in d["proposal_sets"]]
            best = ",".join(map(str, d["suggested_proposal_lengths"]))
            lines.append(f"  suggested: decode.proposal_lengths=[{best}]")
    for i, s in enumerate(report.get("samples", [])):
        lines += ["", f"sample {i} ({s['mode']}): {s['prompt']!r}", f"  -> {s['continuation']!r}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tidar_jax import caches

    caches.enable_compile_cache()  # before anything compiles: a repeated run loads its programs from disk
    from infer.common import report_main

    return report_main(args, evaluate_checkpoint, format_report)


if __name__ == "__main__":
    sys.exit(main())
