"""lm-evaluation-harness tasks written at run time from text already on this machine (nothing is downloaded).

The harness's own tasks fetch their datasets from the Hugging Face Hub. Offline, a task is a YAML file with
`dataset_path: json` and `dataset_kwargs.data_files` pointing at a JSONL file; this module writes such tasks from
the held-out split of an embedded corpus (the same deterministic document split training uses, so no document a
run trained on is scored) and from the project's held-out chat prompts. The data files are written under the
caller's directory and never committed.

    python -m tidar_jax.evals.local_tasks --out /tmp/tasks --docs 64
    python -m tidar_jax.evals.lm_eval_cli --model tidar_jax --model_args checkpoint=runs/smollm2 \\
        --include_path /tmp/tasks --tasks tidar_bbc_heldout --output_path results/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tidar_jax.config import DataConfig
from tidar_jax.data.corpora import load_corpus_documents, split_documents

TASK_NAME = "tidar_bbc_heldout"


def heldout_documents(n_docs: int, corpus: str = "bbc-news") -> list[str]:
    """The first `n_docs` held-out documents of `corpus` under the default data split (DataConfig's
    holdout_fraction and seed): text no run with the default split trained on."""
    data = DataConfig(corpus=corpus)
    _, held = split_documents(load_corpus_documents(data), data.holdout_fraction, data.seed)
    texts = [d for d in held if isinstance(d, str)]
    if n_docs < 1 or n_docs > len(texts):
        raise ValueError(f"--docs must be in 1..{len(texts)} (held-out documents of {corpus}), got {n_docs}")
    return texts[:n_docs]


def write_rolling_task(out_dir: str | Path, n_docs: int, corpus: str = "bbc-news") -> str:
    """Writes `TASK_NAME`.yaml + .jsonl under `out_dir`: a loglikelihood_rolling task (word perplexity, bits per
    byte) over held-out documents; returns the task name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"{TASK_NAME}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in heldout_documents(n_docs, corpus)))
    (out / f"{TASK_NAME}.yaml").write_text(
        f"task: {TASK_NAME}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    return TASK_NAME


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write the task YAML and its JSONL data into")
    parser.add_argument("--docs", type=int, default=64, help="held-out documents in the task (default 64)")
    parser.add_argument("--corpus", default="bbc-news", help="embedded corpus to take them from (default bbc-news)")
    args = parser.parse_args(argv)
    try:
        print(write_rolling_task(args.out, args.docs, args.corpus))
    except (ValueError, OSError) as e:
        parser.exit(2, f"error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
