"""Batch and capacity buckets: new batch sizes and max_new_tokens within a bucket reuse the compiled programs, and
the padding changes no output; the program cache is a bounded LRU.

Reference for the outputs: a teacher-forced causal forward without a cache over prompt + output (every greedy token
must be its argmax there), and exactly the requested number of tokens per row.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from markov import scaled_random_model

from tidar_jax import config as config_lib
from tidar_jax.decoding import generation
from tidar_jax.decoding.generation import Generator
from tidar_jax.decoding.program_cache import ProgramCache
from tidar_jax.layout import masks
from tidar_jax.model.transformer import forward

PROMPTS = [[3, 4, 5], [7, 3, 9, 4, 10], [9, 8, 7, 6]]
# (rows, max_new_tokens): every batch in batch bucket 4, every limit in capacity bucket 8 (= decode.max_new_tokens).
CALLS = [(1, 8), (2, 3), (3, 5), (3, 8), (1, 1)]
WIDTH = 16  # longest prompt + output, padded


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return config_lib.replace(tiny_config, decode={"prompt_buckets": (8,), "max_cache_len": 24, "max_new_tokens": 8,
                                                   "batch_buckets": (4, 8), "block_size": 0})


@pytest.fixture(scope="module")
def model(cfg):
    """Scaled random weights (tests/markov.py); test_decode.py runs the padded batches with a trained model too."""
    return scaled_random_model(cfg.model, seed=1)


@functools.partial(jax.jit, static_argnums=0)
def _causal_logits(graphdef, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = forward(graphdef, params, tokens, positions, masks.causal_mask(tokens.shape[1])[None])
    return logits


def _assert_greedy(cfg, model, prompts, outputs):
    """Every output token is the argmax of a causal forward (no cache) over the prompt and the tokens before it."""
    tokens = np.full((len(prompts), WIDTH), cfg.model.pad_token_id, np.int32)
    for i, (p, o) in enumerate(zip(prompts, outputs)):
        tokens[i, :len(p) + len(o)] = p + o
    logits = np.array(_causal_logits(*model, tokens))
    logits[..., cfg.model.mask_token_id] = -np.inf
    for row, prompt, out in zip(logits, prompts, outputs):
        assert row[len(prompt) - 1:len(prompt) - 1 + len(out)].argmax(-1).tolist() == out


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_batch_sizes_and_max_new_tokens_within_buckets_compile_once(cfg, model, mode):
    programs = ProgramCache(8)  # this test's own cache: its misses are this test's compilations
    gen = Generator(*model, cfg.model, cfg.decode, programs=programs)
    traces_before = dict(generation.TRACE_COUNTS)
    by_rows = {}
    for rows, new in CALLS:
        result = gen.generate(PROMPTS[:rows], mode, new)
        assert [len(t) for t in result.tokens] == [new] * rows  # the exact limit, not the capacity bucket's 8
        assert result.finish_reasons == ["length"] * rows
        _assert_greedy(cfg, model, PROMPTS[:rows], result.tokens)
        # Padding rows never count: tokens per forward over the real rows only (AR: exactly 1).
        row_steps = sum(result.acceptance_histogram)
        assert result.tokens_per_forward == pytest.approx(rows * new / (rows + row_steps))
        if mode == "ar":
            assert result.forwards == new and row_steps == rows * (new - 1)
        for i, tokens in enumerate(result.tokens):  # a shorter limit gives a prefix of a longer one
            longest = by_rows.setdefault(i, tokens)
            assert tokens[:len(longest)] == longest[:len(tokens)]
    assert programs.misses == 2 and programs.hits == 2 * (len(CALLS) - 1)
    traces = {name: generation.TRACE_COUNTS[name] - traces_before.get(name, 0) for name in ("prefill", "decode_loop")}
    assert traces == {"prefill": 1, "decode_loop": 1}


def test_buckets_round_up_and_grow_past_the_largest(cfg, model):
    gen = Generator(*model, cfg.model, cfg.decode)
    assert [gen.batch_bucket(n) for n in (1, 4, 5, 8, 9, 17)] == [4, 4, 8, 8, 16, 24]
    assert [gen.capacity(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 32]
    batch = gen.pad_batch(PROMPTS, 4, 5)
    assert batch.prompts.shape == (4, 8) and batch.rows == 3
    assert batch.lengths.tolist() == [3, 5, 4, 1] and batch.limits.tolist() == [5, 5, 5, 0]


def test_program_cache_evicts_the_least_recently_used():
    cache, built = ProgramCache(2), []

    def build(name):
        built.append(name)
        return name

    for name in "abac":  # "a" is used again before "c" arrives, so "b" is the least recently used
        assert cache.get(name, lambda: build(name)) == name
    assert built == ["a", "b", "c"] and "b" not in cache and "a" in cache and "c" in cache
    assert (cache.hits, cache.misses, cache.evictions, len(cache)) == (1, 3, 1, 2)
    cache.max_programs = 1  # shrinking evicts at once, oldest first
    assert "a" not in cache and "c" in cache and cache.evictions == 2
    with pytest.raises(ValueError, match="max_programs"):
        cache.max_programs = 0


def test_generator_recompiles_what_the_bound_evicted(cfg, model):
    programs = ProgramCache(2)
    gen = Generator(*model, cfg.model, cfg.decode, programs=programs)
    first = gen.generate(PROMPTS, "ar", 4).tokens
    assert programs.misses == 2 and len(programs) == 2
    programs.max_programs = 1  # keeps the decode loop (used last); the prefill must compile again
    state, _, _ = gen.prefill(PROMPTS, "ar", 4)
    assert np.asarray(state.tokens)[:len(PROMPTS), 0].tolist() == [t[0] for t in first]
    assert programs.misses == 3 and len(programs) == 1 and programs.evictions == 2  # the loop made room
