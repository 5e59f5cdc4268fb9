"""Draft-model speculative decoding against the target's own AR decoding (the lossless anchor).

Models: a tiny target and a smaller draft (another architecture), random or trained for a few seconds on the same
Markov chain (so drafts are often accepted and multi-token steps happen). References: `Generator(...).generate(mode=
"ar")` of the target (itself tested against full recomputes in test_decode.py), and the draft == target case in
which every guess must be accepted, greedy or sampled.
"""

import dataclasses

import pytest
from markov import scaled_random_model, trained_model

from tidar_jax import config as config_lib
from tidar_jax.decoding import generation
from tidar_jax.decoding.generation import Generator
from tidar_jax.decoding.spec_decode import SpecDecoder

PROMPTS = [[3, 4, 5], [7, 3, 9, 4, 10, 5, 6, 8, 3, 9, 4, 7, 5], [9, 8, 7, 6, 5, 4, 3]]
MAX_NEW = 12


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return config_lib.replace(tiny_config, decode={"prompt_buckets": (8, 16), "max_cache_len": 40,
                                                   "max_new_tokens": 16, "block_size": 0})


@pytest.fixture(scope="module")
def draft_cfg(cfg):
    return dataclasses.replace(cfg.model, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)


@pytest.fixture(scope="module")
def random_models(cfg, draft_cfg):
    return scaled_random_model(cfg.model, 1), scaled_random_model(draft_cfg, 2)


@pytest.fixture(scope="module")
def trained_models(cfg, draft_cfg):
    return trained_model(cfg.model, "ar", seed=0, steps=60), trained_model(draft_cfg, "ar", seed=1, steps=60)


def _spec(cfg, draft_cfg, target, draft, k):
    return SpecDecoder(*target, cfg.model, cfg.decode, *draft, draft_cfg, k)


def _ar(cfg, target, prompts, max_new=MAX_NEW):
    return Generator(*target, cfg.model, cfg.decode).generate(prompts, "ar", max_new).tokens


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("kind", ["random", "trained"])
def test_greedy_equals_target_ar_greedy(cfg, draft_cfg, random_models, trained_models, kind, k):
    target, draft = {"random": random_models, "trained": trained_models}[kind]
    result = _spec(cfg, draft_cfg, target, draft, k).generate(PROMPTS, MAX_NEW)
    assert result.tokens == _ar(cfg, target, PROMPTS)
    assert result.finish_reasons == ["length"] * len(PROMPTS)
    steps = result.forwards - 1  # the prefill is a target forward too
    assert result.draft_forwards == 1 + steps * (k - 1)
    assert len(result.acceptance_histogram) == k + 1 and sum(result.acceptance_histogram) > 0
    if kind == "trained":  # the chain is 90% predictable: the multi-token path must run
        assert sum(result.acceptance_histogram[2:]) > 0
        assert result.tokens_per_forward > 1.2 and result.forwards < MAX_NEW


def test_draft_equal_to_target_accepts_every_guess(cfg, random_models):
    """With the target as its own draft every guess is right, greedy or sampled (p == q accepts always); a wrong
    draft-cache position, mask or probability row would show up as rejections."""
    target, _ = random_models
    k = 4
    decoder = SpecDecoder(*target, cfg.model, cfg.decode, *target, cfg.model, k)
    greedy = decoder.generate(PROMPTS, MAX_NEW)
    assert greedy.tokens == _ar(cfg, target, PROMPTS)
    sampled = decoder.generate(PROMPTS, MAX_NEW, seed=3, temperature=1.0)
    for result in (greedy, sampled):
        hist = result.acceptance_histogram
        assert hist[k] == sum(hist) > 0, hist
        assert result.forwards == 1 + -(-(MAX_NEW - 1) // k)
        assert all(len(t) == MAX_NEW and all(0 <= x < cfg.model.vocab_size and x != cfg.model.mask_token_id
                                             for x in t) for t in result.tokens)
    assert sampled.tokens != greedy.tokens  # temperature 1 on a random model: sampling really happened


def test_while_loop_traces_once(cfg, draft_cfg, trained_models):
    target, draft = trained_models
    decoder = _spec(cfg, draft_cfg, target, draft, 3)
    before = generation.TRACE_COUNTS["spec_loop"]
    first = decoder.generate(PROMPTS[:2], 7)
    after_first = generation.TRACE_COUNTS["spec_loop"]
    second = decoder.generate([[5, 6], [8, 9, 10, 3, 4, 5, 6, 7, 8, 9]], 11, seed=1)  # same prompt bucket
    assert after_first - before <= 1 and generation.TRACE_COUNTS["spec_loop"] == after_first
    assert [len(t) for t in first.tokens] == [7, 7] and [len(t) for t in second.tokens] == [11, 11]
    assert second.compile_time_s == 0.0


def test_bad_inputs_raise_clear_errors(cfg, draft_cfg, random_models):
    target, draft = random_models
    with pytest.raises(ValueError, match="num_drafts >= 2"):
        _spec(cfg, draft_cfg, target, draft, 1)
    other = dataclasses.replace(draft_cfg, vocab_size=256)
    with pytest.raises(ValueError, match="share the target's tokenizer.*vocab_size"):
        SpecDecoder(*target, cfg.model, cfg.decode, *draft, other, 4)
    with pytest.raises(ValueError, match="mask token"):
        _spec(cfg, draft_cfg, target, draft, 4).generate([[3, cfg.model.mask_token_id]])
