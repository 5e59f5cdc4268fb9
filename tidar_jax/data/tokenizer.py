"""Byte-level BPE tokenizer: a thin wrapper over a Hugging Face `tokenizers` tokenizer.json.

Our own tokenizers always have the three special tokens at fixed ids: 0 `<|endoftext|>` (eos, also the document
separator in packed training data), 1 `<|mask|>` (the diffusion mask token), 2 `<|pad|>`. Other tokenizers (imported
models: Qwen, SmolLM2, Llama-3) may lack any of them; `eos_id` / `mask_id` / `pad_id` are then None and the model
config's ids (model.eos_token_id, ...) are what counts. Byte-level BPE with no
normaliser means `decode(encode(text)) == text` for every string. Special-token strings that occur in raw text are
encoded as ordinary bytes, so text can never inject an eos or mask id.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN, PAD_TOKEN)  # in id order 0, 1, 2
_BYTE_ALPHABET = 256


class TokenizerError(ValueError):
    """A tokenizer file is missing or corrupt (the message names the file), or the text given to it is not text."""


def check_text(text: str, what: str = "text") -> None:
    """Raises TokenizerError naming `what` unless `text` is a str the tokenizer can encode: valid Unicode, without
    the lone surrogates that Python makes of bytes that are not UTF-8 (a non-UTF-8 terminal or file)."""
    if not isinstance(text, str):
        raise TokenizerError(f"{what} must be a string, got {type(text).__name__}: {text!r:.60}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise TokenizerError(f"{what} is not valid UTF-8 text (bytes {bad!r} at character {e.start})") from None


class Tokenizer:
    """A tokenizer.json, with the ids of `<|endoftext|>` / `<|mask|>` / `<|pad|>` where it has them (else None).

    `encode` adds no special tokens; `decode` keeps special tokens (as their strings) unless asked to skip them.
    """

    def __init__(self, hf_tokenizer: HFTokenizer, path: str | Path | None = None):
        self._tok = hf_tokenizer
        # Raw text that happens to contain "<|mask|>" must not become the mask id (not serialised: set on load).
        self._tok.encode_special_tokens = True
        self.path = None if path is None else Path(path)
        self.eos_id: int | None = self._tok.token_to_id(EOS_TOKEN)
        self.mask_id: int | None = self._tok.token_to_id(MASK_TOKEN)
        self.pad_id: int | None = self._tok.token_to_id(PAD_TOKEN)
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON / unknown models
            raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from None
        return cls(hf, path)

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        return self._tok

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: equal fingerprints encode identically."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; TokenizerError (see `check_text`) for anything but valid text."""
        check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes many texts in parallel (Rust threads); same ids as `encode` on each."""
        texts = list(texts)
        for i, text in enumerate(texts):
            check_text(text, f"text {i}")
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, path: str | Path) -> None:
        """Writes tokenizer.json atomically (a reader never sees a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        self._tok.save(str(tmp))
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={self.path})"


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path | None = None) -> Tokenizer:
    """Trains a byte-level BPE of exactly `vocab_size` tokens (3 specials + 256 bytes + merges) on `texts`.

    Saves it to `out_path` when given. Raises TokenizerError if `vocab_size` is too small for the byte alphabet or the
    text is too small to learn that many merges (the model's embedding must match the tokenizer exactly).
    """
    minimum = len(SPECIAL_TOKENS) + _BYTE_ALPHABET
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size {vocab_size} is below the byte-level minimum of {minimum} "
                             f"({len(SPECIAL_TOKENS)} special tokens + {_BYTE_ALPHABET} bytes)")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer)
    got = hf.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:
        raise TokenizerError(f"the training text only supports {got} BPE tokens, fewer than the requested "
                             f"vocab_size {vocab_size}: use more text or a smaller vocabulary")
    tok = Tokenizer(hf)
    for expected_id, token in enumerate(SPECIAL_TOKENS):  # BpeTrainer places specials first, in order
        assert hf.token_to_id(token) == expected_id, (token, hf.token_to_id(token))
    if out_path is not None:
        tok.save(out_path)
        tok.path = Path(out_path)
    return tok
