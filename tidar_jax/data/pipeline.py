"""Grain input pipeline: corpus documents -> token stream -> packed examples -> shuffled, per-process batches.

Packing: every document of a split is encoded (token-id documents, e.g. self-distilled text, are taken as they are)
and followed by one separator token (`separator_id`: data.separator_token_id, by default the tokenizer's
`<|endoftext|>`, which for an instruct model differs from its end-of-turn eos), the documents are concatenated in
corpus order, and the stream is cut into examples of `S = data.seq_len` tokens (the incomplete tail is dropped for
training). Training examples are therefore all-valid and a separator marks each document boundary.

Order: the global example order is a seeded permutation of the N examples, a different one each epoch (grain
`MapDataset.shuffle` folds the epoch into the seed), repeated forever. Global batch n is global-order examples
[n*B, (n+1)*B). Process p of P receives rows p::P of every global batch, so the union of all processes' local
batches is the single-process global batch, and the iterator state (the next local batch index) is the same on
every process and independent of P: a run may resume on a different process count.

The token stream of a split is cached on disk (`$TIDAR_JAX_CACHE_DIR`, default ~/.cache/tidar_jax; "off" disables)
under the sha256 of the tokenizer and the split's text, so a restart skips re-tokenising.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import grain
import numpy as np
from absl import flags as absl_flags

from tidar_jax import caches
from tidar_jax.config import Config, ConfigError
from tidar_jax.data.corpora import CORPORA, DataError, Document, load_corpus_documents, split_documents
from tidar_jax.data.tokenizer import Tokenizer, train_bpe

__all__ = ["CORPORA", "DataError", "load_corpus_documents", "split_documents", "check_tokenizer_matches",
           "separator_id", "split_token_stream", "pack_examples", "make_train_dataset", "make_train_iterator",
           "make_eval_batches", "heldout_prompts", "load_or_train_tokenizer"]

_PREFETCH_BATCHES = 4  # batches read ahead by one background thread; a batch is a cheap numpy gather


def separator_id(cfg: Config, tokenizer: Tokenizer) -> int:
    """The document separator of packed data: data.separator_token_id, or (-1) the tokenizer's `<|endoftext|>`,
    or, for tokenizers without one (Llama-3 style), model.eos_token_id."""
    if cfg.data.separator_token_id >= 0:
        return cfg.data.separator_token_id
    return tokenizer.eos_id if tokenizer.eos_id is not None else cfg.model.eos_token_id


def check_tokenizer_matches(tokenizer: Tokenizer, cfg: Config) -> None:
    """Raises ConfigError unless every tokenizer id fits the model's embedding, a `<|mask|>` token of the tokenizer
    is model.mask_token_id, and model.eos_token_id and the separator are tokens of the tokenizer.

    The embedding may have more rows than the tokenizer has tokens (imported models keep spare rows; the mask
    token may be one of them). The pad id needs no token: padded positions are never attended to or scored.
    """
    model_cfg = cfg.model
    where = f" ({tokenizer.path})" if tokenizer.path else ""
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"tokenizer{where} has {tokenizer.vocab_size} tokens but model.vocab_size is "
                          f"{model_cfg.vocab_size}: the embedding needs a row for every token")
    if tokenizer.mask_id is not None and tokenizer.mask_id != model_cfg.mask_token_id:
        raise ConfigError(f"tokenizer{where} has mask id {tokenizer.mask_id} but model.mask_token_id is "
                          f"{model_cfg.mask_token_id}")
    for name, tok_id in (("model.eos_token_id", model_cfg.eos_token_id),
                         ("data.separator_token_id", separator_id(cfg, tokenizer))):
        if not 0 <= tok_id < tokenizer.vocab_size or tok_id == model_cfg.mask_token_id:
            raise ConfigError(f"{name} ({tok_id}) is not a token of the tokenizer{where} "
                              f"({tokenizer.vocab_size} tokens, mask id {model_cfg.mask_token_id})")


def _encode_stream(docs: Sequence[Document], tokenizer: Tokenizer, separator: int) -> np.ndarray:
    """[total] int32: each document's tokens followed by the separator, in order."""
    texts = [doc for doc in docs if isinstance(doc, str)]
    encoded = iter(tokenizer.encode_batch(texts))
    pieces = []
    for doc in docs:
        pieces.append(np.asarray(next(encoded) if isinstance(doc, str) else doc, dtype=np.int32))
        pieces.append(np.array([separator], dtype=np.int32))
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def _token_stream(docs: Sequence[Document], tokenizer: Tokenizer, separator: int) -> np.ndarray:
    """`_encode_stream`, read from / written to the disk cache when one is configured."""
    cache = caches.root()
    if cache is None:
        return _encode_stream(docs, tokenizer, separator)
    digest = hashlib.sha256(f"{tokenizer.fingerprint}/{separator}".encode())
    for doc in docs:
        if isinstance(doc, str):
            digest.update(doc.encode("utf-8", errors="surrogatepass"))
        else:
            digest.update(b"\xfe" + np.asarray(doc, dtype=np.int32).tobytes())
        digest.update(b"\0\xff")  # cannot occur inside UTF-8: document boundaries are part of the key
    path = cache / f"tokens-{digest.hexdigest()[:32]}.npy"
    if path.is_file():
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass  # a corrupt cache entry is recomputed and overwritten
    stream = _encode_stream(docs, tokenizer, separator)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.save(f, stream)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache location only costs speed
    return stream


def split_token_stream(cfg: Config, tokenizer: Tokenizer, split: str) -> np.ndarray:
    """[total] int32 packed token stream of the "train" or "heldout" documents of `cfg.data`."""
    d = cfg.data
    train_docs, heldout_docs = split_documents(load_corpus_documents(d), d.holdout_fraction, d.seed)
    docs = {"train": train_docs, "heldout": heldout_docs}[split]
    return _token_stream(docs, tokenizer, separator_id(cfg, tokenizer))


def pack_examples(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """[N, seq_len] view of the first N * seq_len tokens of `stream`, N = len(stream) // seq_len."""
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len)


def _check_processes(global_batch: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} must be in [0, process_count {process_count})")
    if global_batch % process_count:
        raise DataError(f"data.global_batch_size ({global_batch}) must be divisible by the process count "
                        f"({process_count})")
    return global_batch // process_count


def _as_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"tokens": tokens.astype(np.int32, copy=False), "valid": np.ones(tokens.shape, dtype=np.bool_)}


def make_train_dataset(cfg: Config, tokenizer: Tokenizer, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
    """Endless grain MapDataset whose element n is this process's share of global batch n (see module docstring).

    Elements: dict(tokens=int32 [B/P, S], valid=bool [B/P, S]). Raises DataError / ConfigError for bad input.
    """
    check_tokenizer_matches(tokenizer, cfg)
    d = cfg.data
    local_batch = _check_processes(d.global_batch_size, process_index, process_count)
    stream = split_token_stream(cfg, tokenizer, "train")
    examples = pack_examples(stream, d.seq_len)
    if len(examples) < d.global_batch_size:
        raise DataError(f"the train split of corpus {d.corpus!r} has {len(stream)} tokens, fewer than one global "
                        f"batch needs ({d.global_batch_size} x {d.seq_len} = {d.global_batch_size * d.seq_len})")
    ds = grain.MapDataset.source(examples).shuffle(seed=d.seed % 2**32).repeat(None)
    ds = ds[process_index::process_count]
    return ds.batch(local_batch, drop_remainder=True).map(_as_batch)


def make_train_iterator(cfg: Config, tokenizer: Tokenizer, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
    """Endless iterator of local batches dict(tokens=int32 [B/P, S], valid=bool [B/P, S]).

    `get_state()` / `set_state(state)` (grain DatasetIterator) checkpoint and restore the position exactly: after
    `set_state` the next batch is the one that followed when the state was taken. Loading runs in-process unless
    `data.worker_count` > 0 (grain multiprocess prefetch; needs absl flags parsed and a `__main__` guard).
    """
    ds = make_train_dataset(cfg, tokenizer, process_index, process_count)
    if cfg.data.worker_count > 0:
        # Grain's worker processes read absl flags; accept their defaults unless the program parsed its own.
        if not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()
        it_ds = ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.worker_count))
    else:
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=_PREFETCH_BATCHES))
    return iter(it_ds)


def make_eval_batches(cfg: Config, tokenizer: Tokenizer, num_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The first `num_batches` global batches of held-out examples, in order, this process's rows p::P of each.

    Unlike training, the held-out tail is kept: the last example is padded with pad tokens (valid False), and
    rows past the last example are all padding. Fewer than `num_batches` batches are returned when the held-out
    split is smaller than that. Each: dict(tokens=int32 [B/P, S], valid=bool [B/P, S]).
    """
    check_tokenizer_matches(tokenizer, cfg)
    d = cfg.data
    _check_processes(d.global_batch_size, process_index, process_count)
    if num_batches < 1:
        raise DataError(f"num_batches must be positive, got {num_batches}")
    stream = split_token_stream(cfg, tokenizer, "heldout")
    n_examples = -(-len(stream) // d.seq_len)
    n_batches = min(num_batches, -(-n_examples // d.global_batch_size))
    rows = n_batches * d.global_batch_size
    # A tokenizer kept as the checkpoint shipped it (e.g. Nemotron-Labs-Diffusion's) may have no <|pad|>.
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else cfg.model.pad_token_id
    tokens = np.full(rows * d.seq_len, pad, dtype=np.int32)
    valid = np.zeros(rows * d.seq_len, dtype=np.bool_)
    used = min(len(stream), rows * d.seq_len)
    tokens[:used], valid[:used] = stream[:used], True
    tokens = tokens.reshape(n_batches, d.global_batch_size, d.seq_len)
    valid = valid.reshape(tokens.shape)
    return [{"tokens": tokens[b, process_index::process_count], "valid": valid[b, process_index::process_count]}
            for b in range(n_batches)]


def heldout_prompts(cfg: Config, tokenizer: Tokenizer, n: int, prompt_len: int) -> list[list[int]]:
    """`n` prompts of exactly `prompt_len` tokens from held-out documents (no separator inside a prompt).

    First the opening `prompt_len` tokens of every held-out document long enough, in order; then, if more are
    needed, the next non-overlapping window of each document, and so on. Raises DataError if there are too few.
    """
    if n < 1 or prompt_len < 1:
        raise DataError(f"n ({n}) and prompt_len ({prompt_len}) must be positive")
    stream = split_token_stream(cfg, tokenizer, "heldout")
    # Encoding never emits special tokens (their strings are encoded as bytes), so separators are document ends.
    docs = np.split(stream, np.flatnonzero(stream == separator_id(cfg, tokenizer)) + 1)
    docs = [doc[:-1] for doc in docs if len(doc) > 1]
    prompts = []
    for window in range(max((len(doc) for doc in docs), default=0) // prompt_len):
        for doc in docs:
            if len(doc) >= (window + 1) * prompt_len:
                prompts.append(doc[window * prompt_len:(window + 1) * prompt_len].tolist())
                if len(prompts) == n:
                    return prompts
    raise DataError(f"the held-out split of corpus {cfg.data.corpus!r} yields only {len(prompts)} prompts of "
                    f"{prompt_len} tokens, {n} requested")


def load_or_train_tokenizer(cfg: Config, existing: str | Path | None = None) -> Tokenizer:
    """The tokenizer a new run uses, in memory (nothing is written): `data.tokenizer` when set, else `existing`
    (e.g. a workdir's tokenizer.json) when it is a file, else a byte-level BPE of `model.vocab_size` tokens trained
    (deterministically) on the train split. Does not check it against the model: see `check_tokenizer_matches`."""
    if cfg.data.tokenizer:
        return Tokenizer.from_file(cfg.data.tokenizer)
    if existing is not None and Path(existing).is_file():
        return Tokenizer.from_file(existing)
    train_docs, _ = split_documents(load_corpus_documents(cfg.data), cfg.data.holdout_fraction, cfg.data.seed)
    texts = [doc for doc in train_docs if isinstance(doc, str)]
    if len(texts) < len(train_docs):
        raise DataError("the corpus holds token-id documents, which cannot train a tokenizer: set data.tokenizer "
                        "(or train.init_from) to the tokenizer they were made with")
    return train_bpe(texts, cfg.model.vocab_size)
