"""What the CLIs share: which exceptions are the user's input errors (exit code 2, one `error:` line), what Ctrl-C
ends with (exit code 130, one line), how an output path is checked before the work and how a JSON report is
written, and how a checkpoint's decode config is fitted to a run's prompts and outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

from tidar_jax.checkpoint.store import CheckpointError

# ConfigError, DataError, TokenizerError and ChatTemplateError are ValueErrors.
USER_ERRORS = (ValueError, CheckpointError)
# Model fields an inference CLI may override (execution only; e.g. a checkpoint trained with cudnn attention in
# bfloat16 runs on a CPU with model.attention_impl=xla model.compute_dtype=float32): checkpoint.with_model applies them.
MODEL_OVERRIDES = ("model.attention_impl", "model.compute_dtype")


# The exit code of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports a process killed by it.
INTERRUPTED = 130


class OutputError(ValueError):
    """An output path cannot be written; the message names the flag and the path."""


def check_writable(path: str | Path, flag: str, *, directory: bool = False, create: bool = True) -> None:
    """Returns only if the run can later write its output at `path`: a file there (or, with `directory`, files
    inside that folder); raises OutputError naming `flag` otherwise. A folder is created and removed in the target
    folder to find out, so a read-only mount, a missing permission or a path under a file fails now, in the first
    second, and not after the whole evaluation. With `create` the missing folders are made (they would be made when
    the output is written); without, nothing is left behind: the nearest existing folder is probed."""
    path = Path(path)
    if not directory and path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; give a file path")
    folder = path if directory else path.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        # A real write, not os.access: a read-only mount refuses even root, whom mode bits do not stop.
        tempfile.TemporaryDirectory(dir=folder if create else existing, prefix=".write-probe-").cleanup()
        if not directory and path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(f"{path} is read-only")
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def write_json(path: str | Path, report: dict) -> None:
    """Writes `report` to `path` (parent folders created), indented, newline-terminated; atomically, so an
    interrupted write leaves the old file (or none), never half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fail(error: Exception) -> int:
    """Prints `error: ...` to stderr and returns the CLIs' exit code for bad input (2)."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def interrupted(detail: str = "nothing was written") -> int:
    """Prints the one line a run stopped by Ctrl-C ends with (`detail`: what it leaves on disk) and returns 130."""
    print(f"error: interrupted; {detail}", file=sys.stderr)
    return INTERRUPTED


def require_at_least(parser, args, **minimums: float) -> None:
    """Exits 2 (argparse's one-line usage error) naming the flag when a number option given on the command line is
    below its minimum (or NaN), e.g. `require_at_least(parser, args, num_prompts=0, max_new_tokens=1)`; unset ones
    pass."""
    for name, low in minimums.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not v >= low:
                parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {v}")


def require_positive(parser, args, *names: str) -> None:
    """Exits 2 naming the flag when a float option given on the command line is not a finite number > 0 (a
    hardware peak of 0, -5, NaN or inf gives no meaningful time)."""
    for name in names:
        v = getattr(args, name)
        if v is not None and not 0 < v < float("inf"):
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {v}")


def decode_room(dec, prompt_len: int, max_new_tokens: int, block_size: int, flag: str = "--max-new-tokens"):
    """`dec` (a DecodeConfig) with block size K, max_new_tokens and a prompt bucket that fits `prompt_len`, so that
    no row stops early for lack of room. The cache is the configured decode.max_cache_len: prompts of `prompt_len`
    tokens + `max_new_tokens` (the value of `flag`) + two blocks must fit in it, or ValueError says what to lower
    or raise; a token limit never grows the cache past what the user configured."""
    buckets = dec.prompt_buckets if prompt_len <= dec.prompt_buckets[-1] else (*dec.prompt_buckets, prompt_len)
    need = max(buckets[-1] + 1, prompt_len + max_new_tokens + 2 * block_size)
    if need > dec.max_cache_len:
        raise ValueError(f"{flag} {max_new_tokens} after prompts of up to {prompt_len} tokens (K={block_size}) needs "
                         f"a KV cache of {need} slots, more than decode.max_cache_len={dec.max_cache_len}: lower "
                         f"{flag} or raise decode.max_cache_len")
    return dataclasses.replace(dec, block_size=block_size, max_new_tokens=max_new_tokens, prompt_buckets=buckets)


PROMPT_SETS = ("corpus", "chat", "unseen", "humaneval")
PROMPT_SET_HELP = ("held-out document windows (corpus), held-out-topic chat requests from the training templates "
                   "(chat), hand-written requests in shapes no training prompt has (unseen), or the HumanEval "
                   "problems' prompts as raw text (humaneval); chat and unseen use the checkpoint's chat template")


def prompt_set(kind: str, checkpoint: str | Path, bundle, n: int, prompt_len: int) -> list[list[int]]:
    """The first `n` held-out prompts of `kind` (see PROMPT_SET_HELP) as token-id lists; "corpus" windows have
    `prompt_len` tokens, the others their own length. Raises ValueError when the set has fewer than `n`."""
    from tidar_jax.checkpoint.store import locate_checkpoint
    from tidar_jax.data import pipeline
    from tidar_jax.data.chat import encode_chat
    from tidar_jax.data.chat_prompts import encoded_chat_prompts
    from tidar_jax.data.prompt_sets import unseen_style_prompts
    from tidar_jax.evals.humaneval import load_problems

    if kind == "corpus":
        return pipeline.heldout_prompts(bundle.config, bundle.tokenizer, n, prompt_len)
    workdir = locate_checkpoint(checkpoint)[2]
    if kind == "chat":
        return encoded_chat_prompts(workdir, "heldout", n)
    texts = ([p["prompt"] for p in unseen_style_prompts()] if kind == "unseen"
             else [p["prompt"] for p in load_problems()])
    if not 0 < n <= len(texts):
        raise ValueError(f"{n} {kind} prompts requested; the set has {len(texts)}")
    if kind == "unseen":
        return [encode_chat(workdir, [{"role": "user", "content": text}]) for text in texts[:n]]
    if bundle.tokenizer is None:
        raise ValueError(f"{checkpoint} has no tokenizer.json to encode the HumanEval prompts")
    return [bundle.tokenizer.encode(text) for text in texts[:n]]


def replace_marked(text: str, name: str, body: str, where: str = "the document") -> str:
    """`text` with what lies between `<!-- results:NAME -->` and `<!-- /results:NAME -->` replaced by `body` (how
    docs/RESULTS.md is rendered from measurements: nothing between markers is typed by hand)."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if start not in text or end not in text:
        raise ValueError(f"{where} lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    return head + start + "\n" + body + "\n" + end + rest.split(end, 1)[1]


def report_main(args, compute, format_report) -> int:
    """The body of a measuring CLI: check that --json (when given) can be written, `report = compute(args)` (exit
    2 with one line on bad input, 130 on Ctrl-C), print `format_report(report)`, write --json; returns the exit
    code."""
    try:
        if getattr(args, "json", None):
            check_writable(args.json, "--json")
        report = compute(args)
    except USER_ERRORS as e:
        return fail(e)
    except KeyboardInterrupt:
        return interrupted()
    print(format_report(report))
    if getattr(args, "json", None):
        write_json(args.json, report)
    return 0
