"""Chat prompts written for this project (no third-party text): requests built from task templates and topics.

Used to self-distil an instruct model (distill.py: its own answers become the drafts' training text) and to measure
TiDAR on chat. The split is by topic: `chat_prompts("train")` and `chat_prompts("heldout")` share no topic, so
held-out measurements are on subjects the drafts never saw answered.
"""

from __future__ import annotations

import random
from pathlib import Path

TEMPLATES = (
    "What is {t}?",
    "Explain {t} in simple terms.",
    "Give me three facts about {t}.",
    "Why is {t} important?",
    "Write a short paragraph about {t}.",
    "How would you explain {t} to a child?",
    "What are the main benefits of {t}?",
    "List some common misconceptions about {t}.",
    "Write a haiku about {t}.",
    "Summarize the history of {t} in a few sentences.",
    "What should a beginner know about {t}?",
    "Describe {t} in one paragraph.",
    "What are the pros and cons of {t}?",
    "Give me a tip related to {t}.",
    "How does {t} affect everyday life?",
    "Write a short story that involves {t}.",
    "What questions would an expert ask about {t}?",
    "Compare {t} with something similar.",
)

TOPICS = (
    "photosynthesis", "the water cycle", "gravity", "volcanoes", "the moon", "rainbows", "electricity",
    "recycling", "healthy sleep", "drinking water", "exercise", "vegetables", "coffee", "bread baking",
    "houseplants", "gardening", "bees", "dogs", "cats", "birds", "the ocean", "forests", "deserts", "mountains",
    "rivers", "weather forecasts", "clouds", "snow", "the sun", "stars", "planets", "the internet", "email",
    "passwords", "computers", "smartphones", "programming", "the Python language", "databases", "robots",
    "music", "painting", "reading books", "libraries", "museums", "friendship", "teamwork", "time management",
    "saving money", "budgeting", "cooking pasta", "making tea", "bicycles", "trains", "airplanes", "cars",
    "public transport", "maps", "the alphabet", "mathematics", "fractions", "geometry", "history lessons",
    "learning a language", "writing letters", "public speaking", "chess", "football", "swimming", "running",
    "yoga", "meditation", "the human heart", "teeth brushing", "vitamins", "solar panels", "wind power",
    "batteries", "magnets", "light bulbs", "microscopes", "telescopes", "dinosaurs", "fossils", "earthquakes",
    "tides", "islands", "farming", "honey", "cheese", "chocolate", "apples", "rice", "soup", "birthdays",
    "holidays", "camping", "hiking", "photography", "movies", "theatre", "poetry", "newspapers", "calendars",
    "clocks", "the seasons", "autumn leaves", "spring flowers", "kindness", "curiosity", "patience",
)
_HELDOUT_EVERY = 6  # every 6th topic is held out


def _topics(held: bool) -> list[str]:
    return [t for i, t in enumerate(TOPICS) if (i % _HELDOUT_EVERY == _HELDOUT_EVERY - 1) == held]


def training_topics() -> list[str]:
    """The topics of the "train" split (no held-out topic), in TOPICS order."""
    return _topics(False)


def chat_prompts(split: str, seed: int = 0) -> list[str]:
    """All template x topic requests of `split` ("train" or "heldout"), in a seeded shuffled order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    topics = _topics(split == "heldout")
    prompts = [template.format(t=topic) for topic in topics for template in TEMPLATES]
    random.Random(seed).shuffle(prompts)
    return prompts


def encoded_chat_prompts(tokenizer_dir: str | Path, split: str, n: int, seed: int = 0) -> list[list[int]]:
    """The first `n` prompts of `split` as single-turn chats rendered with the chat template of `tokenizer_dir` (a
    workdir from an import), ending where the assistant's reply starts: token-id lists of ragged length."""
    from tidar_jax.data.chat import encode_chat

    prompts = chat_prompts(split, seed)
    if not 0 < n <= len(prompts):
        raise ValueError(f"{n} {split} chat prompts requested; there are {len(prompts)}")
    return [encode_chat(tokenizer_dir, [{"role": "user", "content": p}]) for p in prompts[:n]]
