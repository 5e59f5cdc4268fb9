"""Self-distillation data: the verifier's own continuations of chat and corpus prompts, as token-id documents.

TiDAR's drafts are accepted when they equal what the AR model would say next, so the most useful drafting data is
the AR model's own output. `distill` renders chat prompts (chat_prompts.py, through the checkpoint's chat template)
and corpus prompts (the first tokens of train-split documents), continues them with our batched jitted decoding
(AR mode, greedy by default; one compiled program per bucket), and appends one JSON line per prompt to OUT:
`{"ids": prompt + continuation (an ending eos kept), "source": "chat" | corpus name, "prompt_tokens": n}`, which
`data.corpus=files data.paths=[OUT]` trains on. OUT.meta.json records the settings; running again with the same
settings resumes after the last complete line (nothing is regenerated), different settings are refused, and so is
an OUT that distill did not write (no OUT.meta.json) or that holds a damaged line anywhere but at its end (a last
line cut by a crash is dropped and regenerated). One process writes OUT at a time (OUT.lock, `file_lock`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from tidar_jax.checkpoint.inference import load_for_inference, with_model
from tidar_jax.checkpoint.store import locate_checkpoint
from tidar_jax.config import ConfigError, DataConfig, DecodeConfig
from tidar_jax.data import prompt_mix
from tidar_jax.data.chat import encode_chat
from tidar_jax.data.chat_prompts import encoded_chat_prompts
from tidar_jax.data.corpora import load_corpus_documents, split_documents
from tidar_jax.decoding.generation import Generator
from tidar_jax.decoding.sampling import checked_knobs
from tidar_jax.workdir_lock import file_lock


# The longest KV cache distill builds (prompt bucket + new tokens + two blocks): a bound on memory and time, so that
# a mistyped --max-new-tokens fails at once instead of decoding for hours.
MAX_CACHE_LEN = 8192


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """What to generate: `mix` ("source=count,...": the broad prompt mix of data/prompt_mix.py), `chat` chat prompts
    (train topics), `corpus_prompts` prompts of `prompt_tokens` tokens from the train split of `corpus`, each
    continued by up to `max_new_tokens` tokens; temperature 0 = greedy; `compute_dtype` the dtype the model decodes
    in ("": the checkpoint's; "bfloat16" is about twice as fast on CPUs with AMX)."""

    checkpoint: str
    chat: int = 256
    corpus: str = "bbc-news"
    corpus_prompts: int = 256
    prompt_tokens: int = 32
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0
    batch_size: int = 16
    mix: str = ""
    compute_dtype: str = ""


def parse_mix(text: str) -> dict[str, int]:
    """"chat=100,news=50" -> {"chat": 100, "news": 50}; ConfigError naming the bad part (sources: prompt_mix.SOURCES)."""
    counts = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        source, _, count = part.partition("=")
        if source not in prompt_mix.SOURCES or not count.isdigit() or source in counts:
            raise ConfigError(f"--mix part {part!r} must be SOURCE=COUNT, each source once, SOURCE one of "
                              f"{prompt_mix.SOURCES}")
        counts[source] = int(count)
    return counts


def _prompts(spec: DistillSpec, bundle, workdir: Path) -> list[tuple[str, list[int]]]:
    """(source, prompt ids) pairs: the mix's prompts (chat requests in the chat template, continuations as plain
    text), then chat prompts, then corpus prompts."""
    out = []
    if spec.mix:
        for source, text in prompt_mix.prompt_mix(parse_mix(spec.mix), spec.seed):
            ids = (encode_chat(workdir, [{"role": "user", "content": text}]) if prompt_mix.is_chat(source)
                   else bundle.tokenizer.encode(text))
            out.append((source, ids))
    out += [("chat", ids) for ids in (encoded_chat_prompts(workdir, "train", spec.chat, spec.seed) if spec.chat
                                      else [])]
    if spec.corpus_prompts:
        data = DataConfig(corpus=spec.corpus)
        train_docs, _ = split_documents(load_corpus_documents(data), data.holdout_fraction, data.seed)
        encoded = bundle.tokenizer.encode_batch([d for d in train_docs if isinstance(d, str)])
        long_enough = [ids[:spec.prompt_tokens] for ids in encoded if len(ids) >= spec.prompt_tokens]
        if len(long_enough) < spec.corpus_prompts:
            raise ConfigError(f"corpus {spec.corpus!r} has {len(long_enough)} train documents of >= "
                              f"{spec.prompt_tokens} tokens, {spec.corpus_prompts} requested")
        out += [(spec.corpus, ids) for ids in long_enough[:spec.corpus_prompts]]
    return out


def _record_problem(line: bytes) -> str | None:
    """What makes `line` (one newline-terminated line of OUT) other than a record `distill` writes; None if it is
    one: a JSON object {"ids": [ids >= 0], "source": str, "prompt_tokens": n} with 1 <= n <= len(ids)."""
    try:
        record = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return f"not JSON: {e}"
    if not isinstance(record, dict) or set(record) != {"ids", "source", "prompt_tokens"}:
        return "not a distill record {ids, source, prompt_tokens}"
    ids, count = record["ids"], record["prompt_tokens"]
    if not isinstance(ids, list) or not all(type(t) is int and t >= 0 for t in ids):
        return "its ids are not a list of token ids"
    if type(count) is not int or not 1 <= count <= len(ids) or not isinstance(record["source"], str):
        return "its prompt_tokens or source is invalid"
    return None


def _resume_point(out: Path, meta_path: Path, meta: dict) -> tuple[int, int]:
    """(records already in OUT, their length in bytes) for a run with settings `meta`; (0, 0) when OUT does not
    exist. A last line without its newline (cut by a crash) is not counted: the caller truncates OUT to the returned
    length. Raises ConfigError naming OUT when it cannot be resumed: it exists without META (distill did not write
    it), META records other settings, or a line before the last is not a record (naming its line number)."""
    if meta_path.is_file():
        try:
            saved = json.loads(meta_path.read_text())
        except ValueError as e:
            raise ConfigError(f"{meta_path} is not the JSON train.distill writes ({e}); choose another --out") from None
        if isinstance(saved, dict):  # a setting added since OUT was written had its default then
            saved = {**dataclasses.asdict(DistillSpec(checkpoint="")), **saved}
        if saved != meta:
            raise ConfigError(f"{out} was generated with other settings ({meta_path}); choose another --out")
    elif out.exists():
        raise ConfigError(f"{out} exists but has no {meta_path.name}, so train.distill did not write it; refusing to "
                          "add to it (choose another --out)")
    done = size = 0
    if not out.exists():
        return done, size
    with out.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break  # the last line, cut by a crash
            problem = _record_problem(line)
            if problem is not None:
                raise ConfigError(f"{out} line {number} is damaged ({problem}); only a cut last line is dropped and "
                                  f"regenerated: remove the file, or its lines from {number} on, to go on")
            done, size = number, size + len(line)
    return done, size


def _batches(items: Sequence, size: int) -> Iterator[tuple[int, list]]:
    for start in range(0, len(items), size):
        yield start, list(items[start:start + size])


def distill(spec: DistillSpec, out: str | Path, progress: bool = True, stop_after: int | None = None) -> Path:
    """Generates (or resumes) the self-distillation file OUT; returns its path. `stop_after` N stops once OUT holds
    the first N records of the spec's prompts: it is not a setting of OUT, so a later call with a larger N, or none,
    continues the same file (distilling in parts). Raises ConfigError (ValueError) on
    bad input, when OUT cannot be resumed (`_resume_point`), or when another process is writing OUT (WorkdirBusy):
    checks of the knobs and of OUT come before the model is loaded, and every check before anything is written."""
    checked_knobs(temperature=spec.temperature)
    parse_mix(spec.mix)
    out = Path(out)
    if out.exists() and not out.is_file():
        raise ConfigError(f"--out {out} exists and is not a regular file")
    with file_lock(out):
        return _distill(spec, out, progress, stop_after)


def _distill(spec: DistillSpec, out: Path, progress: bool, stop_after: int | None) -> Path:
    meta_path = out.with_name(out.name + ".meta.json")
    meta = dataclasses.asdict(spec)
    done, size = _resume_point(out, meta_path, meta)
    _, _, workdir = locate_checkpoint(spec.checkpoint)
    bundle = load_for_inference(spec.checkpoint)
    if spec.compute_dtype:
        bundle = with_model(bundle, dataclasses.replace(bundle.config.model, compute_dtype=spec.compute_dtype))
    if bundle.tokenizer is None:
        raise ConfigError(f"{spec.checkpoint} has no tokenizer.json")
    prompts = _prompts(spec, bundle, workdir)
    longest = max(len(ids) for _, ids in prompts)
    buckets = tuple(sorted({64, 256, max(64, -(-longest // 64) * 64)}))
    cache = buckets[-1] + spec.max_new_tokens + 2 * bundle.config.model.block_size
    if cache > MAX_CACHE_LEN:
        raise ConfigError(f"--max-new-tokens {spec.max_new_tokens} after prompts of up to {longest} tokens needs a KV "
                          f"cache of {cache} slots, more than distill's {MAX_CACHE_LEN}: lower --max-new-tokens")
    decode_cfg = DecodeConfig(max_new_tokens=spec.max_new_tokens, prompt_buckets=buckets, max_cache_len=cache)
    generator = Generator(bundle.graphdef, bundle.params, bundle.config.model, decode_cfg,
                          tokenizer_size=bundle.tokenizer.vocab_size)
    if done > len(prompts):
        raise ConfigError(f"{out} holds {done} records, more than the {len(prompts)} prompts of its settings")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        os.truncate(out, size)  # drops a last line cut by a crash
    end = len(prompts) if stop_after is None else min(stop_after, len(prompts))
    bar = tqdm(total=end, initial=min(done, end), unit="prompt", desc="distill", disable=not progress,
               dynamic_ncols=True)
    generated, start_time = 0, time.perf_counter()
    with out.open("a", encoding="utf-8") as f:
        for start, batch in _batches(prompts[done:end], spec.batch_size):
            rows = [ids for _, ids in batch]
            rows += [rows[-1]] * (spec.batch_size - len(rows))  # a full batch: one compiled program
            result = generator.generate(rows, mode="ar", temperature=spec.temperature, seed=spec.seed + done + start)
            for (source, ids), new in zip(batch, result.tokens):
                f.write(json.dumps({"ids": ids + new, "source": source, "prompt_tokens": len(ids)}) + "\n")
                generated += len(new)
            f.flush()
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{generated / max(time.perf_counter() - start_time, 1e-9):.0f}")
    bar.close()
    return out
