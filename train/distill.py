"""Self-distillation data for TiDAR drafting: a model's own greedy answers to chat and corpus prompts.

    python -m train.distill --checkpoint runs/smollm2 --out runs/smollm2-distill/distill.jsonl
    python -m train.distill --checkpoint runs/smollm2 --out d.jsonl --chat 512 --corpus-prompts 0 --temperature 0.7

Writes one JSON line per prompt, {"ids": prompt + continuation, "source", "prompt_tokens"}, which training reads
with `data.corpus=files "data.paths=[OUT]"` (token ids are used as they are, chat special tokens included). Chat
prompts come from the project's own train-topic prompt set (held-out topics stay unseen), rendered with the
checkpoint's chat template; corpus prompts are the first --prompt-tokens tokens of train-split documents. Decoding
is our batched, jitted AR loop. Re-running the same command resumes after the last complete line; other settings
for an existing OUT are refused, as are an OUT that train.distill did not write (no OUT.meta.json), one with a damaged
line before its last, and a second process writing the same OUT (OUT.lock).
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.distill", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the model whose answers become the data (a workdir, "
                                                            "e.g. an import from train.import_checkpoint)")
    parser.add_argument("--out", required=True, help="JSONL file to write (resumed when it exists)")
    parser.add_argument("--mix", default="", metavar="SOURCE=N,...",
                        help="prompts of the broad training mix (tidar_jax/data/prompt_mix.py), e.g. "
                             "chat=1600,ask=1000,news=1500,code=400,continue-news=800,continue-prose=400,"
                             "continue-code=800; with --mix, --chat and --corpus-prompts default to 0")
    parser.add_argument("--chat", type=int, help="number of template chat prompts (needs a chat template; "
                                                 "default 256, 0 with --mix)")
    parser.add_argument("--corpus", default="bbc-news", help="embedded corpus for the corpus prompts")
    parser.add_argument("--corpus-prompts", type=int, help="number of corpus prompts (default 256, 0 with --mix)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens per corpus prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (what TiDAR greedy verifies)")
    parser.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"),
                        help="decode in this dtype instead of the checkpoint's (bfloat16: about twice as fast on "
                             "CPUs with AMX; the data are then the bf16 model's greedy output)")
    parser.add_argument("--stop-after", type=int, metavar="N",
                        help="stop once OUT holds N records (the first N prompts); not a setting of OUT, so a later "
                             "run with a larger N, or without it, continues the same file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("chat", "corpus_prompts"):
        if getattr(args, name) is None:
            setattr(args, name, 0 if args.mix else 256)
    for name in ("chat", "corpus_prompts"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.stop_after is not None and args.stop_after < 1:
        parser.error("--stop-after must be >= 1")
    for name in ("prompt_tokens", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.temperature < float("inf"):  # NaN fails this too
        parser.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.chat + args.corpus_prompts == 0 and not args.mix:
        parser.error("nothing to generate: --mix is empty and --chat and --corpus-prompts are both 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tidar_jax import caches

    caches.enable_compile_cache()  # before anything compiles: a repeated run loads its programs from disk
    from infer.common import USER_ERRORS, fail
    from tidar_jax.training.distill import DistillSpec, distill

    spec = DistillSpec(checkpoint=args.checkpoint, chat=args.chat, corpus=args.corpus,
                       corpus_prompts=args.corpus_prompts, prompt_tokens=args.prompt_tokens,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                       batch_size=args.batch_size, mix=args.mix, compute_dtype=args.compute_dtype or "")
    try:
        out = distill(spec, args.out, progress=not args.no_progress, stop_after=args.stop_after)
    except USER_ERRORS as e:
        return fail(e)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
