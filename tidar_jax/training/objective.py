"""The training objective as pure functions of (graphdef, params, batch): one forward of the TiDAR layout (or plain
causal for the AR baseline) and its losses, and each microbatch's share of the full-batch loss.

Objectives (`train.objective`):
- `tidar`: the 2S layout `[x | M x S]` with the hybrid mask (layout/masks.py), loss `losses.tidar_loss`.
- `ar`: a plain causal forward over the S clean tokens, loss `losses.ar_loss` (the baseline, same code path).
With `train.adaptation=adapters` only the drafting loss has a gradient (draft_loss.py): the AR path is frozen.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tidar_jax.config import Config
from tidar_jax.layout import masks
from tidar_jax.model.transformer import forward, forward_hidden, head_weight
from tidar_jax.training import losses
from tidar_jax.training.draft_loss import diffusion_metrics

Array = jax.Array


def objective_metrics(graphdef: nnx.GraphDef, params: dict, tokens: Array, valid: Array, cfg: Config,
                      objective: str, soft_targets: bool = False) -> dict[str, Array]:
    """One forward of `objective` on tokens, valid: [batch, S]; returns losses.* metrics (scalars, slot acc [K]).
    `soft_targets`: the diffusion loss against the same forward's AR distributions (dense path only)."""
    m = cfg.model
    batch, seq = tokens.shape
    if objective == "tidar":
        inputs = masks.training_inputs(tokens, m.mask_token_id)
        positions = jnp.broadcast_to(masks.training_positions(seq)[None], inputs.shape)
        mask = masks.tidar_layout_mask(valid, m.block_size)
    else:
        inputs = tokens
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))
        mask = masks.causal_layout_mask(valid)
    chunk = cfg.train.loss_chunk_rows
    if chunk > 0:  # CE straight from hidden states, never the full [batch, rows, vocab] logits (ops.row_ce)
        hidden, _ = forward_hidden(graphdef, params, inputs, positions, mask)
        head = head_weight(graphdef, params)
        if objective == "tidar":
            return losses.tidar_loss_from_hidden(hidden, head, tokens, valid, m.block_size, cfg.train.alpha,
                                                 m.compute_dtype, chunk)[1]
        return losses.ar_loss_from_hidden(hidden, head, tokens, valid, m.compute_dtype, chunk)[1]
    logits, _ = forward(graphdef, params, inputs, positions, mask)
    if objective == "tidar":
        return losses.tidar_loss(logits, tokens, valid, m.block_size, cfg.train.alpha, soft_targets)[1]
    return losses.ar_loss(logits, tokens, valid)[1]


def target_counts(valid: Array) -> tuple[Array, Array]:
    """Valid next-token targets and valid same-position targets of a whole batch (the loss denominators)."""
    v = valid.astype(jnp.float32)
    return jnp.sum(v[:, :-1] * v[:, 1:]), jnp.sum(v)


def weighted_loss(graphdef: nnx.GraphDef, params: dict, tokens: Array, valid: Array, totals: tuple[Array, Array],
                  cfg: Config) -> tuple[Array, dict[str, Array]]:
    """This microbatch's share of the full-batch loss: its mean CE terms scaled by count / batch total.

    Summed over microbatches the terms equal the full-batch `tidar_loss` / `ar_loss` (with one microbatch the
    scale is exactly 1, so the value is bit-identical to calling the loss directly).
    """
    ar_total, diff_total = totals
    soft = cfg.train.draft_targets == "soft"
    if cfg.train.adaptation == "adapters":  # the AR path is frozen: only the drafting loss has a gradient
        metrics = diffusion_metrics(graphdef, params, tokens, valid, cfg.model, cfg.train.loss_chunk_rows, soft)
        diff = metrics["diff_loss"] * (metrics["diff_count"] / jnp.maximum(diff_total, 1.0))
        return diff, {"loss": diff, "diff_loss": diff}
    metrics = objective_metrics(graphdef, params, tokens, valid, cfg, cfg.train.objective, soft)
    ar = metrics["ar_loss"] * (metrics["ar_count"] / jnp.maximum(ar_total, 1.0))
    if cfg.train.objective == "ar":
        return ar, {"loss": ar, "ar_loss": ar}
    diff = metrics["diff_loss"] * (metrics["diff_count"] / jnp.maximum(diff_total, 1.0))
    alpha = cfg.train.alpha
    loss = (alpha * ar + diff) / (1.0 + alpha)
    return loss, {"loss": loss, "ar_loss": ar, "diff_loss": diff}
