"""Sliding-window attention as an exact restriction of any attention mask (Ministral-3's `sliding_window`).

A query at position p may attend to a key at position p' only if `p - p' < window` (transformers'
`sliding_window_overlay`: `kv_idx > q_idx - sliding_window`), on top of whatever the layout allows. The rule is
stated on positions, not on rows, so it holds as is for every layout: the training layout's mask rows at
positions 0..S-1 (their own block included when window < K), prefill, and a TiDAR step whose drafts and proposal
slots share positions. Cache slot i holds the token at position i (decoding writes the token at position L to slot
L), so a cached key's position is its slot.

A structured `masks.LayoutMask` keeps its structure: its layout gains the window (`TrainingLayout.window`, the
same rule on the layout's own positions, which are the positions every LayoutMask forward runs at), so blockwise
and splash attention skip the tiles the window removes and stay linear in memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tidar_jax.layout.masks import LayoutMask

Array = jax.Array


def key_positions(positions: Array, cache_len: int | None) -> Array:
    """[batch, keys] int32 positions of the keys a forward attends to: the cache slots 0..cache_len-1 (when a cache
    is given), then the current tokens' own `positions` [batch, q]."""
    positions = positions.astype(jnp.int32)
    if cache_len is None:
        return positions
    slots = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (positions.shape[0], cache_len))
    return jnp.concatenate([slots, positions], axis=1)


def with_sliding_window(mask: Array | LayoutMask, positions: Array, window: int,
                        cache_len: int | None = None) -> Array | LayoutMask:
    """`mask` with every key at a position `window` or more before its query's position removed.

    mask: [batch or 1, q, keys] bool (keys = cache_len + q with a cache, cache columns first; q without) or a
    `LayoutMask` (returned with the window in its layout); positions: [batch, q] int, the queries' positions;
    window > 0; cache_len: the cache's slot count, None without a cache. Returns [batch, q, keys] bool, or the
    windowed LayoutMask.
    """
    if isinstance(mask, LayoutMask):
        return mask.replace(layout=dataclasses.replace(mask.layout, window=window))
    keys = key_positions(positions, cache_len)  # [batch, keys]
    near = positions.astype(jnp.int32)[:, :, None] - keys[:, None, :] < window
    return mask & near
