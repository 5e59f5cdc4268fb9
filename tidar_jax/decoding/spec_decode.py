"""Draft-model speculative decoding: the classic baseline that TiDAR's self-drafting is compared against.

A small, separately trained AR model (same tokenizer) drafts; the target verifies. The block convention is TiDAR's
(decode.py): the block `[v_1 .. v_K]` sits at positions `L .. L+K-1`, v_1 already decided by the target. Each step
1. the draft model proposes v_2..v_K autoregressively with its own KV cache: one forward of the two tokens
   `[x_{L-1}, v_1]` at positions `L-1, L` (re-writing x_{L-1}, whose K/V the draft cache may lack after a fully
   accepted block), then K-2 forwards of one token: K-1 draft forwards of fixed shape;
2. the target runs ONE verify forward of the K drafts (`masks.step_mask(K, with_proposals=False)`; this is exactly
   `decode.decode_step` without proposals), accepts a tokens by `sampling.greedy_verify` or `speculative_verify`,
   and commits them.
So at most K tokens per target forward, as for TiDAR with block size K, and the whole generation after the prefill
is one jitted `lax.while_loop` with fixed shapes. Greedy output equals the target's AR greedy output token for
token; with temperature > 0 it is distributed as AR sampling from the target.

The draft cache is kept valid for positions `[0, L-1)` at the start of every step (L = the target's cursor);
slots it wrote for rejected guesses are overwritten later, as in the target cache.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from tidar_jax.config import DecodeConfig, ModelConfig
from tidar_jax.decoding import decode, sampling
from tidar_jax.decoding.decode import DecodeState
from tidar_jax.decoding.generation import GenerationResult, Generator, in_decoding_layout, prng_key, summary
from tidar_jax.decoding.sampling import SamplingParams
from tidar_jax.decoding.spec import DecodeSpec
from tidar_jax.layout import masks
from tidar_jax.model.kv_cache import KVCache, init_cache
from tidar_jax.model.precision import inference_params
from tidar_jax.model.transformer import forward_hidden

Array = jax.Array

# Model-config fields two models must share to exchange token ids.
_VOCAB_FIELDS = ("vocab_size", "mask_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class SpecDecodeSpec(DecodeSpec):
    """A verify-only DecodeSpec (with_proposals=False, num_drafts = K) plus the draft model's graph (so that the
    compiled-program cache keys on the draft architecture too) and the vocabulary size (for draft distributions)."""

    draft_graphdef: nnx.GraphDef | None = None
    vocab_size: int = 0


@struct.dataclass
class SpecState:
    """The loop carry: `base` is the target's DecodeState (cache, drafts [b, K], output buffer, counters);
    draft_cache: the draft model's KVCache (same max_len as the target's); last: [b] int32 token at position
    cursor-1 (the last committed one); draft_forwards: [] int32 batch forwards of the draft model."""

    base: DecodeState
    draft_cache: KVCache
    last: Array
    draft_forwards: Array


@dataclasses.dataclass
class SpecResult(GenerationResult):
    """GenerationResult (forwards / tokens_per_forward count TARGET forwards, prefill included) plus the draft
    model's batch forwards (its prompt pass included)."""

    draft_forwards: int = 0


def spec_prefill(graphdef: nnx.GraphDef, params: nnx.State, draft_params: nnx.State, cache: KVCache,
                 draft_cache: KVCache, prompts: Array, lengths: Array, max_new_tokens: Array, key: Array,
                 sp: SamplingParams, *, spec: SpecDecodeSpec) -> SpecState:
    """Target prefill (decides v_1, emitted at once) and the draft model's prompt pass.

    cache / draft_cache: empty caches [b, max_len, ...] (donate them); prompts: [b, P] int32 padded to a bucket;
    lengths: [b] int32. Returns the loop carry with drafts [b, K] (v_1 then placeholders) and draft_probs sized for
    K-1 guesses.
    """
    k, batch, prompt_len = spec.num_drafts, prompts.shape[0], prompts.shape[1]
    # The target prefill is the AR one (no mask tokens); its state is then widened to blocks of K.
    state = decode.prefill(graphdef, params, cache, prompts, lengths, max_new_tokens, key, sp,
                           spec=dataclasses.replace(spec, num_drafts=1))
    pad = jnp.zeros((batch, k - 1), jnp.int32)
    draft_probs = state.draft_probs if spec.greedy else jnp.zeros((batch, k - 1, spec.vocab_size), jnp.float32)
    state = state.replace(drafts=jnp.concatenate([state.drafts, pad], axis=1), draft_probs=draft_probs,
                          tokens=jnp.concatenate([state.tokens, pad], axis=1),
                          accept_hist=jnp.zeros((k + 1,), jnp.int32))
    state = decode.mark_cache_full(state, spec)
    # The draft's prompt pass only fills its cache: no LM head, and no attention to the empty cache slots.
    _, draft_cache = decode.forward_into_empty_cache(spec.draft_graphdef, draft_params, prompts,
                                                     masks.prefill_positions(prompt_len, lengths, 0),
                                                     masks.prefill_mask(prompt_len, lengths, 0), draft_cache,
                                                     prompt_len)
    return SpecState(base=state, draft_cache=draft_cache, last=sampling.take_rows(prompts, lengths - 1),
                     draft_forwards=jnp.ones((), jnp.int32))


def _draft_guesses(draft_params: nnx.State, draft_cache: KVCache, last: Array, first: Array, cursor: Array,
                   u: Array | None, sp: SamplingParams, spec: SpecDecodeSpec) -> tuple[Array, Array, KVCache]:
    """K-1 autoregressive draft forwards from committed length `cursor` [b] and decided v_1 = `first` [b]; u:
    [b, K-1, sampling.DRAW_UNIFORMS] (None when greedy).

    Returns (guesses v_2..v_K [b, K-1] int32, their distributions [b, K-1, V] ([b, 0, 0] when greedy), cache).
    Writes are clamped into the buffer for finished rows (whose cache may be full), as decode.decode_step does.
    """
    k, max_len = spec.num_drafts, draft_cache.max_len

    def one_forward(cache: KVCache, tokens: Array, start: Array, u_slot: Array | None):
        n = tokens.shape[1]
        cache = cache.rewind_to(start)  # valid slots: [0, start)
        positions = start[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
        mask = masks.with_cache(cache.valid_slots(), masks.causal_mask(n))
        hidden, cache = forward_hidden(spec.draft_graphdef, draft_params, tokens, positions, mask, cache,
                                       jnp.minimum(start, max_len - n), n_write=n)
        # Only the last row's guess is read: the head runs on it alone.
        logits = decode.head(spec.draft_graphdef, draft_params, hidden[:, -1:], spec)
        guess, probs = decode.draft_from_slots(logits, u_slot, sp, spec)
        return cache, guess[:, 0], probs

    u_first = None if u is None else u[:, :1]
    draft_cache, guess, probs = one_forward(draft_cache, jnp.stack([last, first], axis=1), cursor - 1, u_first)
    guesses, all_probs = [guess], [probs]
    if k > 2:
        def body(carry, j):
            cache, prev = carry
            u_slot = None if u is None else jax.lax.dynamic_slice_in_dim(u, j, 1, axis=1)
            cache, nxt, p = one_forward(cache, prev[:, None], cursor + j, u_slot)
            return (cache, nxt), (nxt, p)

        (draft_cache, _), (rest, rest_probs) = jax.lax.scan(body, (draft_cache, guess),
                                                            jnp.arange(1, k - 1, dtype=jnp.int32))
        guesses.append(rest.T)  # [K-2, b] -> [b, K-2]
        if not spec.greedy:
            all_probs.append(jnp.moveaxis(rest_probs[:, :, 0], 0, 1))  # [K-2, b, 1, V] -> [b, K-2, V]
    guesses = jnp.concatenate([guesses[0][:, None]] + guesses[1:], axis=1)
    return guesses, jnp.concatenate(all_probs, axis=1), draft_cache


def spec_step(graphdef: nnx.GraphDef, params: nnx.State, draft_params: nnx.State, s: SpecState,
              sp: SamplingParams, *, spec: SpecDecodeSpec) -> SpecState:
    """One step: K-1 draft forwards, then the target's verify-only `decode.decode_step` (one forward)."""
    state = s.base
    cursor = state.cache.cursor
    key, u = decode.next_uniforms(state.key, (cursor.shape[0], spec.num_drafts - 1, sampling.DRAW_UNIFORMS), spec)
    guesses, probs, draft_cache = _draft_guesses(draft_params, s.draft_cache, s.last, state.drafts[:, 0], cursor,
                                                 u, sp, spec)
    drafts = jnp.concatenate([state.drafts[:, :1], guesses], axis=1)
    new = decode.decode_step(graphdef, params, state.replace(drafts=drafts, draft_probs=probs, key=key), sp,
                             spec=spec)
    accepted = new.cache.cursor - cursor  # 0 for finished rows
    last = jnp.where(accepted > 0, sampling.take_rows(drafts, jnp.maximum(accepted - 1, 0)), s.last)
    return SpecState(base=new, draft_cache=draft_cache, last=last,
                     draft_forwards=s.draft_forwards + spec.num_drafts - 1)


def spec_loop(graphdef: nnx.GraphDef, params: nnx.State, draft_params: nnx.State, s: SpecState,
              sp: SamplingParams, max_forwards: Array, *, spec: SpecDecodeSpec) -> SpecState:
    """`spec_step` in a `lax.while_loop` until every row finished or the target forwards reach max_forwards."""
    def cond(c: SpecState) -> Array:
        return jnp.any(c.base.finish == decode.RUNNING) & (c.base.forwards < max_forwards)

    return jax.lax.while_loop(cond, lambda c: spec_step(graphdef, params, draft_params, c, sp, spec=spec), s)


class SpecDecoder(Generator):
    """Draft-model speculative decoding with the Generator's prompt checks, buckets and compiled-program cache
    (on one device: a mesh is not supported here).

    target (graphdef, params, model_cfg) verifies; draft (draft_graphdef, draft_params, draft_cfg) proposes;
    num_drafts = K >= 2 (the target verifies K tokens per forward, the draft makes K-1 guesses). The two models must
    share vocabulary size and special ids (i.e. the tokenizer); their architectures may differ freely.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State, model_cfg: ModelConfig, decode_cfg: DecodeConfig,
                 draft_graphdef: nnx.GraphDef, draft_params: nnx.State, draft_cfg: ModelConfig, num_drafts: int):
        if num_drafts < 2:
            raise ValueError(f"speculative decoding needs num_drafts >= 2 (1 is plain AR), got {num_drafts}")
        diffs = [f"{f}: target {getattr(model_cfg, f)}, draft {getattr(draft_cfg, f)}" for f in _VOCAB_FIELDS
                 if getattr(model_cfg, f) != getattr(draft_cfg, f)]
        if diffs:
            raise ValueError(f"the draft model must share the target's tokenizer; differences: {'; '.join(diffs)}")
        super().__init__(graphdef, params, model_cfg, dataclasses.replace(decode_cfg, block_size=num_drafts),
                         allow_block_size_mismatch=True)
        self.draft_graphdef, draft_params, self.draft_cfg = in_decoding_layout(draft_graphdef, draft_params,
                                                                               draft_cfg, decode_cfg.scan_layers)
        self.draft_params = inference_params(draft_params, self.draft_cfg)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | None = None, seed: int = 0, *,
                 temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None) -> SpecResult:
        """Generates up to max_new_tokens (default decode.max_new_tokens) per prompt; temperature 0 = greedy."""
        dec = self.decode_cfg
        sp, greedy = self._sampling_params(1.0, temperature, top_k, top_p)
        limit = dec.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if limit < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {limit}")
        k = self.block_size
        base = DecodeSpec.create("tidar", k, greedy, self.capacity(limit), self.model_cfg,
                                 token_limit=self.token_limit, reserved=self.reserved_ids)
        spec = SpecDecodeSpec(**{**dataclasses.asdict(base), "with_proposals": False},
                              draft_graphdef=self.draft_graphdef, vocab_size=self.model_cfg.vocab_size)
        batch = self.pad_batch(prompts, k, limit)

        compile_before = self._compile_time
        start = time.perf_counter()
        caches = (init_cache(self.model_cfg, len(batch.lengths), dec.max_cache_len),
                  init_cache(self.draft_cfg, len(batch.lengths), dec.max_cache_len))
        state = self._run_compiled("spec_prefill", spec_prefill, spec, (2, 3), self.params, self.draft_params,
                                   *caches, batch.prompts, batch.lengths, batch.limits, prng_key(seed), sp)
        state = self._run_compiled("spec_loop", spec_loop, spec, 2, self.params, self.draft_params, state, sp,
                                   np.int32(spec.capacity + 1))
        host = jax.device_get(state.replace(draft_cache=None, base=state.base.replace(cache=None, draft_probs=None,
                                                                                         key=None)))
        compile_time = self._compile_time - compile_before
        wall = time.perf_counter() - start - compile_time
        return SpecResult(**summary(host.base, batch.rows, wall), mode="spec", block_size=k,
                          compile_time_s=compile_time, draft_forwards=int(host.draft_forwards))
