"""The diffusion (drafting) loss of the TiDAR layout, computed in two passes for adapter training.

`diffusion_metrics` gives the same numbers as the mask half of the joint 2S forward (`losses.diffusion_terms` on
`masks.training_*`), but splits it: the S clean tokens run first, writing their per-layer K/V into a cache of S
slots; then the S mask tokens run as queries over `[that cache | themselves]`, mask block b seeing clean keys
`< b*K` and its own block (both passes take the mask as a `masks.LayoutMask`, so attention_impl=blockwise keeps
them O(S) in memory). With mask-gated adapters (adapters.py) the clean pass depends on frozen params only, so
its output is a constant under `stop_gradient`: the backward pass covers the S mask rows only, and the LM head
runs on clean rows only for soft targets (the teacher distributions). Per step that is about half the compute of differentiating the joint forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tidar_jax.config import ModelConfig
from tidar_jax.layout import masks
from tidar_jax.model.kv_cache import init_cache
from tidar_jax.model.transformer import forward_hidden, head_logits, head_weight
from tidar_jax.training import losses

Array = jax.Array


def clean_pass(graphdef: nnx.GraphDef, params: nnx.State | dict, tokens: Array, valid: Array, cfg: ModelConfig):
    """The causal forward of tokens [batch, S] (valid: [batch, S]): (its final hidden states [batch, S, d_model],
    a KVCache of S slots holding its per-layer K/V)."""
    batch, seq = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))
    cache = init_cache(cfg, batch, seq)
    # The causal layout's S rows are all current tokens, so no cache slot is read (masks.LayoutMask).
    return forward_hidden(graphdef, params, tokens, positions, masks.causal_layout_mask(valid), cache,
                          jnp.zeros((batch,), jnp.int32), n_write=seq)


def diffusion_metrics(graphdef: nnx.GraphDef, params: nnx.State | dict, tokens: Array, valid: Array,
                      cfg: ModelConfig, chunk_rows: int = 0, soft_targets: bool = False) -> dict[str, Array]:
    """`losses.diffusion_terms` metrics (diff_loss, diff_accuracy, diff_count, diff_slot_accuracy [K]) of
    tokens, valid: [batch, S], with no gradient through the clean pass (see module docstring); `chunk_rows > 0`
    computes the CE in row chunks (`ops.row_ce`) instead of forming the [batch, S, vocab] logits. `soft_targets`
    scores the drafts against the clean pass's own AR distributions (`losses.soft_draft_ce`; dense only)."""
    batch, seq = tokens.shape
    clean_hidden, cache = jax.lax.stop_gradient(clean_pass(graphdef, params, tokens, valid, cfg))
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))
    queries = jnp.full_like(tokens, cfg.mask_token_id)
    # The S mask tokens are the TiDAR layout's last S rows; its first S keys (the clean ones) are the cache slots.
    hidden, _ = forward_hidden(graphdef, params, queries, positions, masks.tidar_layout_mask(valid, cfg.block_size),
                               cache, None, n_write=0)
    if chunk_rows > 0:
        if soft_targets:
            raise ValueError("soft draft targets need the dense path (chunk_rows = 0)")
        return losses.diffusion_terms_from_hidden(hidden, head_weight(graphdef, params), tokens, valid,
                                                  cfg.block_size, cfg.compute_dtype, chunk_rows)
    teacher = head_logits(graphdef, params, clean_hidden) if soft_targets else None
    return losses.diffusion_terms(head_logits(graphdef, params, hidden), tokens, valid, cfg.block_size, teacher)
