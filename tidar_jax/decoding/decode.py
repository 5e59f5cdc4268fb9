"""TiDAR and AR decoding over a KV cache: prefill, one decode step, and the `lax.while_loop` around it.

design.md section 3. State between steps: the cache holds committed tokens at slots `[0, cursor)`; the draft block
`drafts = [v_1 .. v_K]` sits at positions `cursor .. cursor+K-1`, v_1 already decided. A TiDAR step feeds the K
drafts plus K proposal blocks of K mask tokens in ONE forward, writes the drafts' K/V at the cursor (mask tokens'
K/V is never written), verifies (`sampling.greedy_verify` / `speculative_verify`), commits v_1..v_a by moving the
cursor, and takes the next drafts `[t_a, proposal a's slots 2..K]`. The AR step is the same code with K = 1 and no
proposals. A sparse proposal set A (`DecodeSpec.proposal_lengths`, proposals.py) computes only the blocks of the
acceptance lengths in A (Q = K + |A|*K) and drafts from the longest computed proposal the accepted prefix covers.

Output convention: a token is emitted as soon as it is decided, i.e. v_1 after prefill, then `v_2..v_a, t_a` (a
tokens) per step; committing to the cache lags one token behind. So AR emits one token per forward (prefill
included) and a TiDAR step emits a tokens. A row finishes on EOS (kept, nothing after it), on reaching its
max_new_tokens, or when its cache cannot hold another block (cursor + K > max_len); finished rows still ride along
in the fixed-shape forward but none of their state changes (their cache slots at or past the cursor may). A row
with max_new_tokens 0 is inert: it finishes at prefill having emitted nothing (padding up to a batch bucket).

The LM head ([d, V], the largest matmul of a decode step at real vocabularies) runs only on rows that are read:
prefill reads the last real prompt row and the K mask rows. A TiDAR step reads the K draft rows and the K proposal
slot-1 rows (the beta mix; always computed for the full set, they are only K rows; a sparse set has no mix) before
verification, then only the K-1 rows of the proposal the accepted length selects: 3K-1 of K + K*K rows, but two
passes over the head weight, which pays only once the step has enough rows (`SPLIT_HEAD_MIN_ROWS`); smaller steps
run one pass on every row. Prefill attends only to its own P + K tokens, not to the empty cache
(`forward_into_empty_cache`).

All functions are pure and meant for `jax.jit` with `spec` (and `graphdef`) static; see generation.py.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from tidar_jax.decoding import sampling
from tidar_jax.decoding.spec import DecodeSpec
from tidar_jax.layout import masks
from tidar_jax.model.kv_cache import KVCache
from tidar_jax.model.transformer import forward_hidden, head_logits

Array = jax.Array

RUNNING, FINISH_EOS, FINISH_LENGTH, FINISH_CACHE = 0, 1, 2, 3
FINISH_NAMES = {RUNNING: "running", FINISH_EOS: "eos", FINISH_LENGTH: "length", FINISH_CACHE: "cache"}


@struct.dataclass
class DecodeState:
    """Everything the loop carries (fixed shapes; b = batch, K = spec.num_drafts, V = vocab).

    cache: KVCache with per-row cursor [b]; drafts: [b, K] int32 (v_1..v_K; a sparse proposal set may fill trailing
    guesses with the mask token, `fill_stale_guesses`); draft_probs: [b, K-1, V] float32, the distributions
    v_2..v_K were sampled from (a filler's: a point mass on the mask token; [b, 0, 0] when greedy); tokens:
    [b, capacity + K] int32 output buffer (the K slack lets a step write a whole block); num_tokens: [b] int32
    valid prefix of `tokens`; max_new_tokens: [b] int32 per-row limit <= capacity (0 = inert row); finish: [b]
    int32 (RUNNING or a FINISH_* reason); row_forwards: [b] int32 forwards each row was active for (prefill
    included); forwards: [] int32 batch forwards so far (prefill included); accept_hist: [K+1] int32,
    accept_hist[a] = row-steps that accepted a tokens; key: PRNG key.
    """

    cache: KVCache
    drafts: Array
    draft_probs: Array
    tokens: Array
    num_tokens: Array
    max_new_tokens: Array
    finish: Array
    row_forwards: Array
    forwards: Array
    accept_hist: Array
    key: Array


def suppress_non_tokens(logits: Array, spec: DecodeSpec) -> Array:
    """Makes the mask token (never a training target; a prompt may not contain it), the reserved ids and the
    embedding rows past the tokenizer impossible as outputs, greedy or sampled. A finite -1e30, not -inf, so the
    beta mix `1 * x + 0 * y` is never NaN. logits: [..., V]."""
    logits = logits.at[..., (spec.mask_token_id, *spec.reserved)].set(-1e30)
    return logits if spec.token_limit is None else logits.at[..., spec.token_limit:].set(-1e30)


def head(graphdef: nnx.GraphDef, params: nnx.State, hidden: Array, spec: DecodeSpec) -> Array:
    """The LM head on the given hidden rows only ([..., d] -> float32 [..., V]), mask token suppressed."""
    return suppress_non_tokens(head_logits(graphdef, params, hidden), spec)


def model_logits(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, positions: Array, mask: Array,
                 cache: KVCache, write_start: Array, n_write: int, spec: DecodeSpec) -> tuple[Array, KVCache]:
    """`model.forward` (logits [b, q, V] on EVERY row) with the non-tokens suppressed (`suppress_non_tokens`).
    Decoding itself uses `forward_hidden` + `head` on the rows it reads; this is for callers that read all rows."""
    hidden, cache = forward_hidden(graphdef, params, tokens, positions, mask, cache, write_start, n_write=n_write)
    return head(graphdef, params, hidden, spec), cache


def forward_into_empty_cache(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, positions: Array,
                             local_mask: Array, cache: KVCache, n_write: int) -> tuple[Array, KVCache]:
    """A forward over `tokens` [b, q] that writes the K/V of the first `n_write` of them into slots [0, n_write)
    of `cache` (whose contents are not read: it is treated as empty), attending only among the current tokens.

    local_mask: [b or 1, q, q]. Returns (final-normed hidden [b, q, d], cache with those slots written; slots past
    n_write untouched; cursor unchanged). The model attends to `[cache slots | current tokens]`, so the forward
    runs over a scratch cache of exactly n_write slots, all masked out (n_write + q keys instead of max_len + q),
    then the scratch is copied into `cache`: the K/V values are the model's own.
    """
    batch = tokens.shape[0]
    # Slots are axis -3 of every buffer, per-layer or stacked ([(layers,) batch, slots, kv_heads, head_dim]).
    empty = lambda x: jnp.zeros(x.shape[:-3] + (n_write,) + x.shape[-2:], x.dtype)  # noqa: E731
    scratch = KVCache(keys=jax.tree.map(empty, cache.keys), values=jax.tree.map(empty, cache.values),
                      cursor=jnp.zeros((batch,), jnp.int32))
    if local_mask.shape[0] != batch:
        local_mask = jnp.broadcast_to(local_mask, (batch,) + local_mask.shape[1:])
    mask = masks.with_cache(jnp.zeros((batch, n_write), bool), local_mask)
    hidden, scratch = forward_hidden(graphdef, params, tokens, positions, mask, scratch,
                                     jnp.zeros((batch,), jnp.int32), n_write=n_write)

    def put(buffer: Array, new: Array) -> Array:
        return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), (0,) * buffer.ndim)

    return hidden, cache.replace(keys=jax.tree.map(put, cache.keys, scratch.keys),
                                 values=jax.tree.map(put, cache.values, scratch.values))


def draft_from_slots(slot_logits: Array, u: Array | None, sp: sampling.SamplingParams,
                     spec: DecodeSpec) -> tuple[Array, Array]:
    """Guesses from diffusion slots. slot_logits: [b, n, V]; u: [b, n, DRAW_UNIFORMS] (None when greedy) ->
    (tokens [b, n] int32, the distributions they were drawn from: [b, n, V], or [b, 0, 0] when greedy)."""
    if spec.greedy:
        return jnp.argmax(slot_logits, axis=-1).astype(jnp.int32), jnp.zeros((slot_logits.shape[0], 0, 0))
    probs = sampling.distribution(slot_logits, sp)
    return sampling.sample(probs, u), probs


def next_uniforms(key: Array, shape: tuple[int, ...], spec: DecodeSpec) -> tuple[Array, Array | None]:
    """(next key, uniforms of `shape`); greedy decoding uses no randomness. All of a forward's randomness comes from
    one draw: each threefry call costs about a second of CPU compile time. A `sampling.sample` draw takes a pair:
    callers ask for [..., sampling.DRAW_UNIFORMS] (and use [..., 0] where one uniform is enough)."""
    if spec.greedy:
        return key, None
    key, sub = jax.random.split(key)
    return key, sampling.uniforms(sub, shape)


def _append_output(state: DecodeState, emitted: Array, count: Array, active: Array,
                   spec: DecodeSpec) -> DecodeState:
    """Appends the first count[b] tokens of emitted [b, n] to the output of active rows, keeping an EOS but
    nothing after it and stopping at max_new_tokens; marks rows that finish for those two reasons."""
    n = emitted.shape[1]
    idx = jnp.arange(n, dtype=jnp.int32)[None, :]
    is_eos = (emitted == spec.eos_token_id) & (idx < count[:, None])
    has_eos = jnp.any(is_eos, axis=1)
    first_eos = jnp.argmax(is_eos, axis=1).astype(jnp.int32)
    count = jnp.where(has_eos, first_eos + 1, count)
    count = jnp.where(active, jnp.minimum(count, state.max_new_tokens - state.num_tokens), 0)
    start = state.num_tokens
    window = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (n,)))(state.tokens, start)
    window = jnp.where(idx < count[:, None], emitted, window)
    tokens = jax.vmap(lambda row, w, s: jax.lax.dynamic_update_slice(row, w, (s,)))(state.tokens, window, start)
    num_tokens = start + count
    finish = jnp.where(active & has_eos & (first_eos < count), FINISH_EOS, state.finish)
    finish = jnp.where((finish == RUNNING) & (num_tokens >= state.max_new_tokens), FINISH_LENGTH, finish)
    return state.replace(tokens=tokens, num_tokens=num_tokens, finish=finish)


def mark_cache_full(state: DecodeState, spec: DecodeSpec) -> DecodeState:
    """A row whose cache cannot take the next K-token write stops (the write needs cursor + K <= max_len)."""
    full = state.cache.cursor + spec.num_drafts > state.cache.max_len
    return state.replace(finish=jnp.where((state.finish == RUNNING) & full, FINISH_CACHE, state.finish))


def prefill(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache, prompts: Array, lengths: Array,
            max_new_tokens: Array, key: Array, sp: sampling.SamplingParams, *, spec: DecodeSpec) -> DecodeState:
    """Runs the prompt (plus K mask tokens for TiDAR) through the model and decides the first block.

    cache: empty KVCache [b, max_len, ...] (donate it); prompts: [b, P] int32, left-aligned and padded to the
    bucket P; lengths: [b] int32 real prompt lengths (1 <= lengths <= P, lengths + K <= max_len); max_new_tokens:
    [b] (or [], the same for every row) int32 <= spec.capacity, 0 for an inert row. v_1 = the verifier's choice
    from the last prompt token's AR logits (mixed with mask slot 1 by beta); v_2..v_K from mask slots 2..K. v_1 is
    emitted at once.
    """
    k = spec.num_drafts
    n_masks = k if spec.with_proposals else 0
    batch, prompt_len = prompts.shape
    tokens = jnp.concatenate([prompts, jnp.full((batch, n_masks), spec.mask_token_id, prompts.dtype)], axis=1)
    positions = masks.prefill_positions(prompt_len, lengths, n_masks)
    # The cache is empty: attend among the P + K current tokens only. Pad slots' K/V lands past each row's cursor,
    # so it is never attended to and gets overwritten.
    hidden, cache = forward_into_empty_cache(graphdef, params, tokens, positions,
                                             masks.prefill_mask(prompt_len, lengths, n_masks), cache, prompt_len)
    cache = cache.rewind_to(lengths)
    # The head runs on the rows read: the last real prompt token and the K mask slots.
    rows = jnp.concatenate([sampling.take_rows(hidden, lengths - 1)[:, None], hidden[:, prompt_len:]], axis=1)
    logits = head(graphdef, params, rows, spec)  # [b, 1 + n_masks, V]
    target, slots = logits[:, 0], logits[:, 1:]
    if spec.with_proposals:
        target = sampling.mix_logits(target, slots[:, 0], sp.beta)
    key, u = next_uniforms(key, (batch, k, sampling.DRAW_UNIFORMS), spec)
    if spec.greedy:
        first = jnp.argmax(target, axis=-1).astype(jnp.int32)
    else:
        first = sampling.sample(sampling.distribution(target, sp), u[:, 0])
    guesses, guess_probs = draft_from_slots(slots[:, 1:], None if u is None else u[:, 1:], sp, spec)
    state = DecodeState(
        cache=cache, drafts=jnp.concatenate([first[:, None], guesses], axis=1), draft_probs=guess_probs,
        tokens=jnp.zeros((batch, spec.capacity + k), jnp.int32), num_tokens=jnp.zeros((batch,), jnp.int32),
        max_new_tokens=jnp.broadcast_to(jnp.asarray(max_new_tokens, jnp.int32), (batch,)),
        finish=jnp.zeros((batch,), jnp.int32),
        row_forwards=jnp.ones((batch,), jnp.int32), forwards=jnp.ones((), jnp.int32),
        accept_hist=jnp.zeros((k + 1,), jnp.int32), key=key)
    state = _append_output(state, first[:, None], jnp.ones((batch,), jnp.int32), jnp.ones((batch,), bool), spec)
    return mark_cache_full(state, spec)


def covering_proposal(accepted: Array, lengths: Sequence[int]) -> tuple[Array, Array]:
    """accepted: [b] int32 (1 <= a <= K); lengths: the proposal set A (static, ascending, A[0] = 1) ->
    (index [b] int32 of j* = max{j in A : j <= a} among the step's blocks, shift [b] int32 = a - j*)."""
    table = jnp.asarray(lengths, jnp.int32)
    index = jnp.sum(table[None, :] <= accepted[:, None], axis=1).astype(jnp.int32) - 1
    return index, accepted - table[index]


def shifted_slots(block: Array, shift: Array) -> tuple[Array, Array]:
    """The next block's guesses from proposal j*. block: [b, K, ...] (its K slots; slot r predicts L+j*+r-1);
    shift: [b] int32 = a - j*. The next block sits at L+a.., so guess i = 2..K is slot i + shift.

    Returns (slots [b, K-1, ...], clamped to slot K where i + shift > K; fresh [b, K-1] bool, i + shift <= K: the
    guesses that have a slot. The full set always has shift 0: slots 2..K, all fresh).
    """
    k = block.shape[1]
    wanted = 1 + shift[:, None] + jnp.arange(k - 1, dtype=jnp.int32)[None, :]  # 0-based slot of guess i = 2..K
    index = jnp.minimum(wanted, k - 1).reshape(wanted.shape + (1,) * (block.ndim - 2))
    return jnp.take_along_axis(block, index, axis=1), wanted < k


def fill_stale_guesses(guesses: Array, probs: Array, fresh: Array, spec: DecodeSpec) -> tuple[Array, Array]:
    """Guesses without a slot (~fresh, [b, K-1]) become the mask token, drawn from a point mass on it: the
    verifier's distribution gives the mask token probability 0 (`suppress_non_tokens`), so such a guess is always
    rejected, greedy or sampled, and the speculative residual at it is p itself. probs: [b, K-1, V] or [b, 0, 0]
    (greedy)."""
    guesses = jnp.where(fresh, guesses, spec.mask_token_id)
    if probs.shape[1]:
        point = jax.nn.one_hot(spec.mask_token_id, probs.shape[-1], dtype=probs.dtype)
        probs = jnp.where(fresh[..., None], probs, point)
    return guesses, probs


def decode_step(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, sp: sampling.SamplingParams, *,
                spec: DecodeSpec) -> DecodeState:
    """One forward: verify the draft block, commit v_1..v_a, emit v_2..v_a and t_a, draft the next block.

    Query tokens [b, K + |A|*K] for TiDAR with proposal set A (K + K*K for the full set; [b, 1] for AR); the K
    drafts' K/V is written at the cursor. With a sparse A (proposals.py) the verifier is the AR logits alone (beta
    is not read: callers require beta = 1) and the next guesses come from proposal j* = max{j in A : j <= a},
    shifted by a - j*, the slot-less ones filled (`shifted_slots`, `fill_stale_guesses`).
    """
    k, lengths = spec.num_drafts, spec.lengths
    cache, drafts = state.cache, state.drafts
    batch = drafts.shape[0]
    active = state.finish == RUNNING
    tokens = drafts
    if spec.with_proposals:
        tokens = jnp.concatenate([drafts, jnp.full((batch, len(lengths) * k), spec.mask_token_id, drafts.dtype)],
                                 axis=1)
    positions = masks.step_positions(cache.cursor, k, spec.with_proposals, lengths)
    mask = masks.with_cache(cache.valid_slots(), masks.step_mask(k, spec.with_proposals, lengths))
    # Finished rows still ride along; clamp their write into the buffer (it lands past their cursor or, for a row
    # stopped by a full cache, over slots it will never read again).
    write_start = jnp.minimum(cache.cursor, cache.max_len - k)
    hidden, cache = forward_hidden(graphdef, params, tokens, positions, mask, cache, write_start, n_write=k)
    split_head = spec.with_proposals and batch * tokens.shape[1] >= spec.split_head_min_rows
    mixed = spec.with_proposals and not spec.sparse  # the beta mix reads every proposal's slot-1 row
    if split_head:
        # [b, proposal i, slot r, d]: position L+A[i]+r-1. Before verification the head runs on the K drafts (draft
        # j predicts position L+j) and, for the full set, the K slot-1 rows (the beta mix): 2K rows of K + K*K.
        blocks = hidden[:, k:].reshape(batch, len(lengths), k, hidden.shape[-1])
        rows = jnp.concatenate([hidden[:, :k], blocks[:, :, 0]], axis=1) if mixed else hidden[:, :k]
        logits = head(graphdef, params, rows, spec)
        target = sampling.mix_logits(logits[:, :k], logits[:, k:], sp.beta) if mixed else logits
    else:
        logits = head(graphdef, params, hidden, spec)  # every row, one pass over the head weight
        target = logits[:, :k]
        if spec.with_proposals:
            blocks = logits[:, k:].reshape(batch, len(lengths), k, -1)  # [b, proposal i, slot r, V]
            if mixed:
                target = sampling.mix_logits(target, blocks[:, :, 0], sp.beta)
    key, u = next_uniforms(state.key, (batch, 2 * k - 1, sampling.DRAW_UNIFORMS), spec)  # K to verify, K-1 to draft
    if spec.greedy:
        accepted, decided = sampling.greedy_verify(target, drafts)
    else:
        accepted, decided = sampling.speculative_verify(sampling.distribution(target, sp), state.draft_probs,
                                                        drafts, u[:, :k])
    next_drafts, next_probs = decided[:, None], state.draft_probs
    if spec.with_proposals:
        # Proposal j* saw exactly v_1..v_j* (all committed); its slots from position L+a+1 on draft the rest (split
        # head: the head's second pass runs on those K-1 rows only). The full set has j* = a: slots 2..K.
        index, shift = covering_proposal(accepted, lengths)
        chosen_slots, fresh = shifted_slots(sampling.take_rows(blocks, index), shift)
        if split_head:
            chosen_slots = head(graphdef, params, chosen_slots, spec)
        guesses, next_probs = draft_from_slots(chosen_slots, None if u is None else u[:, k:], sp, spec)
        if spec.sparse:
            guesses, next_probs = fill_stale_guesses(guesses, next_probs, fresh, spec)
        next_drafts = jnp.concatenate([decided[:, None], guesses], axis=1)
    # Tokens for positions L+1 .. L+a: v_2 .. v_a, then t_a.
    following = jnp.concatenate([drafts[:, 1:], decided[:, None]], axis=1)
    emitted = jnp.where(jnp.arange(k)[None, :] == accepted[:, None] - 1, decided[:, None], following)
    row = active[:, None]
    state = state.replace(
        cache=cache.advance(jnp.where(active, accepted, 0)),
        drafts=jnp.where(row, next_drafts, drafts),
        draft_probs=jnp.where(row[..., None], next_probs, state.draft_probs),
        row_forwards=state.row_forwards + active.astype(jnp.int32),
        forwards=state.forwards + 1,
        accept_hist=state.accept_hist.at[accepted].add(active.astype(jnp.int32)),
        key=key)
    state = _append_output(state, emitted, accepted, active, spec)
    return mark_cache_full(state, spec)


def decode_loop(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, sp: sampling.SamplingParams,
                max_forwards: Array, *, spec: DecodeSpec) -> DecodeState:
    """`decode_step` in a `lax.while_loop` until every row finished or `state.forwards` reaches max_forwards
    ([] int32, traced: chunked streaming reuses the same compiled loop). Donate `state`."""
    def cond(s: DecodeState) -> Array:
        return jnp.any(s.finish == RUNNING) & (s.forwards < max_forwards)

    return jax.lax.while_loop(cond, lambda s: decode_step(graphdef, params, s, sp, spec=spec), state)
