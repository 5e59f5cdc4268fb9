"""Train a byte-level BPE tokenizer (ids 0/1/2 = eos/mask/pad) on the train split of a corpus.

    python -m train.train_tokenizer --corpus bbc-news --vocab-size 4096 --out tokenizer.json

The held-out documents (same split as training uses: --holdout-fraction, --seed) are excluded from tokenizer
training and used to report compression (bytes per token). Pass the result to training with
`data.tokenizer=tokenizer.json`, with `model.vocab_size` equal to --vocab-size.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from infer.common import check_writable, fail
from tidar_jax.config import DataConfig
from tidar_jax.data.corpora import CORPORA, DataError, load_corpus_documents, split_documents
from tidar_jax.data.tokenizer import TokenizerError, train_bpe


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default="bbc-news", choices=CORPORA,
                        help="text to train on: an embedded corpus, or 'files' with --paths (default: bbc-news)")
    parser.add_argument("--paths", nargs="+", default=[],
                        help="for --corpus files: .txt (one document each), .jsonl ('text' field), .parquet "
                             "('text' column) files or directories of them")
    parser.add_argument("--vocab-size", type=int, default=4096,
                        help="exact vocabulary size including the 3 special tokens and 256 bytes (default: 4096)")
    parser.add_argument("--out", default="tokenizer.json", help="output tokenizer.json path (default: tokenizer.json)")
    parser.add_argument("--holdout-fraction", type=float, default=DataConfig.holdout_fraction,
                        help="fraction of documents held out, as data.holdout_fraction (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=DataConfig.seed,
                        help="seed of the held-out split, as data.seed (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        check_writable(out, "--out")  # before the corpus is read and the BPE trained, not after
    except ValueError as e:
        return fail(e)
    data_cfg = DataConfig(corpus=args.corpus, paths=tuple(args.paths), holdout_fraction=args.holdout_fraction,
                          seed=args.seed)
    start = time.perf_counter()
    try:
        train_docs, heldout_docs = split_documents(load_corpus_documents(data_cfg), args.holdout_fraction,
                                                   args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_chars = sum(len(d) for d in train_docs)
    print(f"corpus {args.corpus}: {len(train_docs)} train documents ({n_chars / 1e6:.2f} M chars), "
          f"{len(heldout_docs)} held out; loaded in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    try:
        tokenizer = train_bpe(train_docs, args.vocab_size, out)
    except TokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trained {tokenizer.vocab_size}-token BPE in {time.perf_counter() - start:.1f} s -> {out}")
    held_bytes = sum(len(d.encode("utf-8")) for d in heldout_docs)
    held_tokens = sum(len(ids) for ids in tokenizer.encode_batch(heldout_docs))
    print(f"held-out: {held_tokens} tokens, {held_bytes / held_tokens:.2f} bytes/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
