"""Attention masks and positions for TiDAR training, prefill and decode steps (design.md sections 2 and 3).

Every function is pure and built from `iota` on static shapes, so under `jit` it costs no host transfer and a new
cursor value never recompiles. A mask is boolean, `True` = the query (row) may attend to the key (column).

Query layouts:
- training: `[x_0 .. x_{S-1} | M x S]`, positions `[0..S-1, 0..S-1]`.
- prefill: `[prompt (padded to a bucket P) | M x K]`, mask tokens at positions `len .. len+K-1`.
- decode step: `[v_1 .. v_K | P_j for j in A]` (proposal blocks of K mask tokens for the acceptance lengths in the
  proposal set A, by default all of 1..K; none for the AR / draft-model verify step), drafts at `L .. L+K-1`,
  proposal j's slot r at `L+j+r-1` (j, r from 1).
With a KV cache the key axis is `[cache slots (max_len) | current tokens]`; `with_cache` prepends the cache part.
A no-cache training forward may take its mask in structured form (`LayoutMask`: a static `TrainingLayout` plus
key padding), which `ops.blockwise_attention` uses without ever forming the dense mask.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TrainingLayout:
    """The static attention pattern of a no-cache training forward (hashable: usable as a jit-static argument).

    `block_size=None`: plain causal over `seq_len` tokens (the AR objective, likelihood evals). Otherwise the TiDAR
    layout of `2 * seq_len` tokens `[clean | mask]` with draft blocks of `block_size` (design.md section 2).

    `window` (None: none) is a sliding window on positions (layout/window.py): a row at position p sees only keys
    at positions > p - window. Rows and keys sit at the layout's own positions: clean / causal index i at i, mask
    index S + i at i (`training_positions`).

    Every row's allowed keys are at most two intervals, `[lo, hi)` and `[lo2, hi2)` (`key_ranges`): this one
    predicate builds the dense masks (`training_mask`, `causal_mask`), the in-tile masks of `ops.blockwise` and,
    evaluated on the rows of a tile, its schedule of tiles that are not fully masked, so the two cannot drift.
    """

    seq_len: int
    block_size: int | None = None
    window: int | None = None

    def __post_init__(self):
        if self.block_size is not None and self.seq_len % self.block_size:
            raise ValueError(f"seq_len ({self.seq_len}) must be a multiple of block_size ({self.block_size})")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be positive (None: no window), got {self.window}")

    @property
    def length(self) -> int:
        """Tokens (= query rows = keys) of the layout: S causal, 2S TiDAR."""
        return self.seq_len if self.block_size is None else 2 * self.seq_len

    def key_ranges(self, q, xp=jnp):
        """Row indices q (int array, numpy with `xp=np`) -> (lo, hi, lo2, hi2): row q may attend to keys in
        `[lo, hi) | [lo2, hi2)` (the second interval is empty, lo2 == hi2 == 0, for clean and causal rows; lo is 0
        without a window).

        TiDAR: clean row p sees clean keys <= p; mask row at position p (block b = p // K) sees clean keys < b*K and
        the mask keys of its own block, `[S + b*K, S + b*K + K)`. A window raises lo (and lo2) to the first key at
        a position > p - window."""
        zero = xp.zeros_like(q)
        if self.block_size is None:
            return self._window_start(q, xp), q + 1, zero, zero
        s, k = self.seq_len, self.block_size
        is_mask = q >= s
        start = ((q - s) // k) * k  # b*K, meaningful for mask rows
        position = xp.where(is_mask, q - s, q)
        lo = self._window_start(position, xp)
        hi = xp.where(is_mask, start, q + 1)
        lo2 = xp.where(is_mask, s + xp.maximum(start, lo), zero)
        hi2 = xp.where(is_mask, s + start + k, zero)
        return lo, hi, lo2, hi2

    def _window_start(self, position, xp):
        """The first position a row at `position` may see: 0, or position - window + 1 with a window."""
        if self.window is None:
            return xp.zeros_like(position)
        return xp.maximum(position - self.window + 1, 0)

    def allowed(self, q, k, xp=jnp):
        """Broadcastable row / key indices -> bool: may row q attend to key k."""
        lo, hi, lo2, hi2 = self.key_ranges(q, xp)
        return ((k >= lo) & (k < hi)) | ((k >= lo2) & (k < hi2))

    def dense(self) -> Array:
        """[T, T] bool, T = `length`."""
        idx = jnp.arange(self.length, dtype=jnp.int32)
        return self.allowed(idx[:, None], idx[None, :])


@struct.dataclass
class LayoutMask:
    """A training forward's mask in structured form: the static `layout` plus key padding.

    key_valid: [batch, T] bool (T = layout.length; for TiDAR `[valid, valid]`). A forward of q tokens computes the
    layout's last q rows; with a KV cache its first `T - q` keys are cache slots `0 .. T-q-1` (the clean pass of
    draft_loss.py: q = T, nothing read; its mask pass: the S mask rows over the S cached clean keys).
    `dense(cache_len)` is the boolean mask the "xla" path attends with; `ops.blockwise_attention` uses the
    structure instead and never forms it.
    """

    key_valid: Array
    layout: TrainingLayout = struct.field(pytree_node=False)

    def dense(self, cache_len: int | None = None, n_queries: int | None = None) -> Array:
        """No cache (`cache_len=None`): [batch, T, T], exactly `with_key_padding(layout.dense(), key_valid)`.

        With a cache of `cache_len` slots and q = `n_queries` current tokens (required then): [batch, q,
        cache_len + q] (cache columns first, as `with_cache`), slots past `T - q` unseen."""
        full = with_key_padding(self.layout.dense(), self.key_valid)
        if cache_len is None:
            return full
        if n_queries is None:
            raise ValueError("a cached LayoutMask.dense needs n_queries (the current tokens)")
        n_cached = self.layout.length - n_queries
        if not 0 <= n_cached <= cache_len:
            raise ValueError(f"{n_queries} current tokens need T - q = {n_cached} of the {cache_len} cache slots")
        rows = full[:, n_cached:]
        unseen = jnp.zeros(rows.shape[:2] + (cache_len - n_cached,), bool)
        return jnp.concatenate([rows[..., :n_cached], unseen, rows[..., n_cached:]], axis=2)


def tidar_layout_mask(valid: Array, block_size: int) -> LayoutMask:
    """valid: [batch, S] bool -> the TiDAR training mask of `[x | M x S]` with padded keys removed (both halves)."""
    return LayoutMask(key_valid=jnp.concatenate([valid, valid], axis=1),
                      layout=TrainingLayout(valid.shape[1], block_size))


def causal_layout_mask(valid: Array) -> LayoutMask:
    """valid: [batch, S] bool -> the plain causal mask over S tokens with padded keys removed."""
    return LayoutMask(key_valid=valid, layout=TrainingLayout(valid.shape[1]))


def training_mask(seq_len: int, block_size: int) -> Array:
    """[2S, 2S] bool hybrid mask: clean causal; mask block b sees clean keys < b*K and its own block."""
    return TrainingLayout(seq_len, block_size).dense()


def training_positions(seq_len: int) -> Array:
    """[2S] int32: `[0..S-1, 0..S-1]`."""
    pos = jnp.arange(seq_len, dtype=jnp.int32)
    return jnp.concatenate([pos, pos])


def training_inputs(tokens: Array, mask_token_id: int) -> Array:
    """tokens: [batch, S] -> [batch, 2S]: the clean tokens followed by S mask tokens."""
    return jnp.concatenate([tokens, jnp.full_like(tokens, mask_token_id)], axis=1)


def with_key_padding(mask: Array, key_valid: Array) -> Array:
    """mask: [q, k] or [batch, q, k]; key_valid: [batch, k] bool -> [batch, q, k] with padded keys removed."""
    if mask.ndim == 2:
        mask = mask[None]
    return mask & key_valid[:, None, :]


def causal_mask(length: int) -> Array:
    """[length, length] bool lower-triangular mask (plain AR training and full recomputes)."""
    return TrainingLayout(length).dense()


def prefill_mask(prompt_len: int, lengths: Array, block_size: int) -> Array:
    """[batch, P+K, P+K] bool for `[prompt padded to P | K mask tokens]` (no cache part).

    Prompt tokens are causal (a padded row sees itself, so no row is empty); mask tokens see the real prompt
    tokens (slot < lengths[b]) and all K mask tokens; prompt tokens never see mask tokens.
    """
    total = prompt_len + block_size
    idx = jnp.arange(total, dtype=jnp.int32)
    q, k = idx[:, None], idx[None, :]
    q_prompt, k_prompt = q < prompt_len, k < prompt_len
    prompt_causal = (q_prompt & k_prompt & (k <= q))[None]
    mask_to_prompt = (~q_prompt & k_prompt)[None] & (k[None] < lengths[:, None, None])
    mask_to_mask = (~q_prompt & ~k_prompt)[None]
    return prompt_causal | mask_to_prompt | mask_to_mask


def prefill_positions(prompt_len: int, lengths: Array, block_size: int) -> Array:
    """[batch, P+K] int32: prompt slots at 0..P-1, mask slot r (from 0) at lengths[b] + r."""
    prompt = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (lengths.shape[0], prompt_len))
    masks = lengths[:, None].astype(jnp.int32) + jnp.arange(block_size, dtype=jnp.int32)[None]
    return jnp.concatenate([prompt, masks], axis=1)


def proposal_set(num_drafts: int, proposal_lengths: Sequence[int] | None = None) -> tuple[int, ...]:
    """A: the acceptance lengths j (1 <= j <= K, ascending) whose proposal blocks a TiDAR step computes; None = all
    of 1..K (design.md section 3). Validation lives in `proposals.resolve_proposal_lengths`."""
    return tuple(range(1, num_drafts + 1)) if proposal_lengths is None else tuple(proposal_lengths)


def step_query_count(num_drafts: int, with_proposals: bool, proposal_lengths: Sequence[int] | None = None) -> int:
    """Q = K + |A|*K for a TiDAR step (K + K*K with every proposal), K for a verify-only step (K = 1: the AR step)."""
    blocks = len(proposal_set(num_drafts, proposal_lengths)) if with_proposals else 0
    return num_drafts + num_drafts * blocks


def step_mask(num_drafts: int, with_proposals: bool, proposal_lengths: Sequence[int] | None = None) -> Array:
    """[Q, Q] bool among the current tokens of a decode step (design.md section 3).

    Drafts are causal among themselves; the proposal block for acceptance length j (the i-th block, j = A[i]) sees
    drafts v_1..v_j and its own block.
    """
    total = step_query_count(num_drafts, with_proposals, proposal_lengths)
    idx = jnp.arange(total, dtype=jnp.int32)
    q, k = idx[:, None], idx[None, :]
    q_draft, k_draft = q < num_drafts, k < num_drafts
    q_block = (q - num_drafts) // num_drafts  # block index i for proposal queries
    k_block = (k - num_drafts) // num_drafts
    draft_causal = q_draft & k_draft & (k <= q)
    if not with_proposals:
        return draft_causal
    lengths = jnp.asarray(proposal_set(num_drafts, proposal_lengths), jnp.int32)
    q_length = lengths[jnp.clip(q_block, 0, lengths.shape[0] - 1)]  # j of the query's block
    proposal_to_drafts = ~q_draft & k_draft & (k < q_length)
    proposal_own_block = ~q_draft & ~k_draft & (q_block == k_block)
    return draft_causal | proposal_to_drafts | proposal_own_block


def step_positions(cursor: Array, num_drafts: int, with_proposals: bool,
                   proposal_lengths: Sequence[int] | None = None) -> Array:
    """[batch, Q] int32: drafts at L..L+K-1, slot r (from 1) of the proposal for length j at L+j+r-1, L = cursor[b]."""
    offsets = [jnp.arange(num_drafts, dtype=jnp.int32)]
    if with_proposals:
        j = jnp.asarray(proposal_set(num_drafts, proposal_lengths), jnp.int32)[:, None]
        r = jnp.arange(1, num_drafts + 1, dtype=jnp.int32)[None, :]
        offsets.append((j + r - 1).reshape(-1))
    return cursor[:, None].astype(jnp.int32) + jnp.concatenate(offsets)[None, :]


def with_cache(cache_valid: Array, local_mask: Array) -> Array:
    """Prepends the cache part to a mask among current tokens.

    cache_valid: [batch, max_len] bool (committed slots); local_mask: [q, q] or [batch, q, q].
    Returns [batch, q, max_len + q]: every query sees every committed slot, plus `local_mask` among current tokens.
    """
    batch = cache_valid.shape[0]
    if local_mask.ndim == 2:
        local_mask = jnp.broadcast_to(local_mask[None], (batch,) + local_mask.shape)
    q = local_mask.shape[1]
    cache_part = jnp.broadcast_to(cache_valid[:, None, :], (batch, q, cache_valid.shape[1]))
    return jnp.concatenate([cache_part, local_mask], axis=2)
