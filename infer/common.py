"""What the inference CLIs share: which exceptions are the user's input errors (exit code 2, one `error:` line),
how a JSON report is written, and how a checkpoint's decode config is widened for a run's prompts and outputs."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from tidar_jax.checkpoint.store import CheckpointError

# ConfigError, DataError, TokenizerError and ChatTemplateError are ValueErrors.
USER_ERRORS = (ValueError, CheckpointError)
# Model fields an inference CLI may override (execution only; e.g. a checkpoint trained with cudnn attention in
# bfloat16 runs on a CPU with model.attention_impl=xla model.compute_dtype=float32): checkpoint.with_model applies them.
MODEL_OVERRIDES = ("model.attention_impl", "model.compute_dtype")


def write_json(path: str | Path, report: dict) -> None:
    """Writes `report` to `path` (parent folders created), indented, newline-terminated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


def fail(error: Exception) -> int:
    """Prints `error: ...` to stderr and returns the CLIs' exit code for bad input (2)."""
    print(f"error: {error}", file=sys.stderr)
    return 2


def require_at_least(parser, args, **minimums: int) -> None:
    """Exits 2 (argparse's one-line usage error) naming the flag when an int option given on the command line is
    below its minimum, e.g. `require_at_least(parser, args, num_prompts=0, max_new_tokens=1)`; unset ones pass."""
    for name, low in minimums.items():
        value = getattr(args, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < low:
                parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {v}")


def decode_room(dec, prompt_len: int, max_new_tokens: int, block_size: int):
    """`dec` (a DecodeConfig) with block size K, a prompt bucket that fits `prompt_len` and a cache large enough for
    prompt + `max_new_tokens` + two blocks, so that no row stops early for lack of room."""
    buckets = dec.prompt_buckets if prompt_len <= dec.prompt_buckets[-1] else (*dec.prompt_buckets, prompt_len)
    cache = max(dec.max_cache_len, buckets[-1] + 1, prompt_len + max_new_tokens + 2 * block_size)
    return dataclasses.replace(dec, block_size=block_size, max_new_tokens=max_new_tokens, prompt_buckets=buckets,
                               max_cache_len=cache)


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
    """The body of a measuring CLI: `report = compute(args)` (exit 2 with one line on bad input), print
    `format_report(report)`, write --json when given; returns the exit code."""
    try:
        report = compute(args)
    except USER_ERRORS as e:
        return fail(e)
    print(format_report(report))
    if getattr(args, "json", None):
        write_json(args.json, report)
    return 0
