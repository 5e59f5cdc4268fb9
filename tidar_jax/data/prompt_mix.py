"""A broad, deduplicated mix of training prompts for self-distillation, far more than the template x topic chats.

Sources, each drawn from training material only (never the held-out topics of chat_prompts.py, never a held-out
document of a corpus, never a HumanEval problem):
- "chat": chat_prompts.py's templates x its training topics;
- "ask": other one-sentence request shapes (lists, comparisons of two topics, step-by-step explanations, poems,
  opinions on a topic, advice) over the same training topics;
- "news": requests about the headlines (first lines) of the train split of the BBC news corpus;
- "code": requests about modules of the Python standard library (what it is for, an example, a function using it);
- "continue-news", "continue-prose", "continue-code": raw text to continue (no chat template): the first words of
  train-split documents of the news, Shakespeare and Python-source corpora.
The first five are chat requests (rendered with the model's chat template when distilled); the continuations are
plain text. All are single requests about one subject: the unseen-style held-out set (prompt_sets/) keeps the
shapes these lack (personal context, quoted text to transform, arithmetic, emails, explicit constraints, follow-ups,
role-play, classification of given items).
"""

from __future__ import annotations

import functools
import random
import re

from tidar_jax.config import DataConfig
from tidar_jax.data.chat_prompts import chat_prompts, training_topics
from tidar_jax.data.corpora import load_corpus_documents, split_documents

SOURCES = ("chat", "ask", "news", "code", "continue-news", "continue-prose", "continue-code")
CHAT_SOURCES = ("chat", "ask", "news", "code")
ASK_TEMPLATES = (
    "Tell me about {t}.",
    "Give me a list of five things related to {t}.",
    "Explain how {t} works, step by step.",
    "Write a short poem about {t}.",
    "What are some fun facts about {t}?",
    "Why do people care about {t}?",
    "What is the future of {t}?",
    "Write a short essay on {t}.",
    "What advice would you give someone interested in {t}?",
    "Describe a typical day that involves {t}.",
    "What is the difference between {t} and {u}?",
    "How are {t} and {u} related?",
)
NEWS_TEMPLATES = (
    "Summarize the news story behind this headline: {h}",
    "Write a short news report with the headline \"{h}\".",
    "What background does a reader need to understand the headline \"{h}\"?",
)
CODE_TEMPLATES = (
    "What is the Python {m} module used for?",
    "Show a short example that uses Python's {m} module.",
    "Write a small Python function that uses the {m} module, with a docstring.",
)
CONTINUE_WORDS = 40  # words of a document that a continuation prompt keeps
CONTINUE_EVERY = 800  # a long document gives a continuation prompt every this many words
_CORPUS_OF = {"continue-news": "bbc-news", "continue-prose": "shakespeare", "continue-code": "python-stdlib"}


def _first_line(doc: str) -> str:
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


@functools.cache
def _train_docs(corpus: str) -> tuple[str, ...]:
    """The corpus's train-split documents (read once per process: "news" and "continue-news" share them), less any whose first line (a news headline, a title) is also the first
    line of a held-out document: the news corpus files some stories twice, under two categories."""
    data = DataConfig(corpus=corpus)
    train, held = split_documents(load_corpus_documents(data), data.holdout_fraction, data.seed)
    held_heads = {_first_line(d) for d in held if isinstance(d, str)}
    return tuple(d for d in train if isinstance(d, str) and _first_line(d) not in held_heads)


def _ask(rng: random.Random) -> list[str]:
    topics = training_topics()
    out = []
    for template in ASK_TEMPLATES:
        for t in topics:
            u = rng.choice([x for x in topics if x != t])
            out.append(template.format(t=t, u=u))
    return out


def _news() -> list[str]:
    heads = sorted({_first_line(d) for d in _train_docs("bbc-news")} - {""})
    return [template.format(h=h) for h in heads for template in NEWS_TEMPLATES]


def _code() -> list[str]:
    names = set()
    for doc in _train_docs("python-stdlib"):
        names.update(re.findall(r"^import ([a-z_][a-z0-9_]*)$", doc, flags=re.M))
    return [template.format(m=m) for m in sorted(names) for template in CODE_TEMPLATES]


def _continuations(source: str) -> list[str]:
    """CONTINUE_WORDS-word windows of the train documents, one every CONTINUE_EVERY words, each followed in its
    document by at least as many words again."""
    out = []
    for doc in _train_docs(_CORPUS_OF[source]):
        words = doc.split(" ")
        for start in range(0, len(words) - 2 * CONTINUE_WORDS, CONTINUE_EVERY):
            out.append(" ".join(words[start:start + CONTINUE_WORDS]))
    return out


def source_prompts(source: str, seed: int = 0) -> list[str]:
    """Every prompt of one source (see the module docstring), deduplicated, in a seeded shuffled order."""
    rng = random.Random(seed)
    if source == "chat":
        prompts = chat_prompts("train", seed)
    elif source == "ask":
        prompts = _ask(rng)
    elif source == "news":
        prompts = _news()
    elif source == "code":
        prompts = _code()
    elif source in _CORPUS_OF:
        prompts = _continuations(source)
    else:
        raise ValueError(f"prompt source must be one of {SOURCES}, got {source!r}")
    prompts = list(dict.fromkeys(prompts))
    rng.shuffle(prompts)
    return prompts


def prompt_mix(counts: dict[str, int], seed: int = 0) -> list[tuple[str, str]]:
    """(source, prompt) pairs: `counts[source]` prompts of each source (its first ones in the seeded order), the
    sources interleaved; no prompt repeats. Raises ValueError when a source has fewer prompts than asked."""
    lists = []
    for source, n in counts.items():
        available = source_prompts(source, seed)
        if not 0 <= n <= len(available):
            raise ValueError(f"{n} prompts of source {source!r} requested; it has {len(available)}")
        lists.append([(source, p) for p in available[:n]])
    mixed = [pair for group in lists for pair in group]
    random.Random(seed).shuffle(mixed)
    return list(dict.fromkeys(mixed))


def is_chat(source: str) -> bool:
    """Whether prompts of `source` are chat requests (rendered with a chat template), not text to continue."""
    return source in CHAT_SOURCES
