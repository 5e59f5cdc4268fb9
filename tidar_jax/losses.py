"""TiDAR joint loss (AR next-token + diffusion same-position) and the plain AR loss, with metrics.

`(alpha * mean CE_ar + mean CE_diff) / (1 + alpha)`: each mean is over its own valid targets, so padding never
dilutes a term. Logits are float32 `[batch, 2S, vocab]` laid out as `[clean | mask]` (see masks.training_*).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _masked_mean(values: Array, weights: Array) -> Array:
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _ce_and_hits(logits: Array, targets: Array) -> tuple[Array, Array]:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return ce, hits


def ar_terms(clean_logits: Array, tokens: Array, valid: Array) -> dict[str, Array]:
    """clean_logits: [batch, S, vocab]; tokens, valid: [batch, S]. Position i predicts tokens[i+1].

    Returns scalar `ar_loss`, `ar_accuracy` and `ar_count` (number of valid next-token targets).
    """
    ce, hits = _ce_and_hits(clean_logits[:, :-1], tokens[:, 1:])
    weights = valid[:, :-1] & valid[:, 1:]
    return {"ar_loss": _masked_mean(ce, weights), "ar_accuracy": _masked_mean(hits, weights),
            "ar_count": jnp.sum(weights.astype(jnp.float32))}


def diffusion_terms(mask_logits: Array, tokens: Array, valid: Array, block_size: int) -> dict[str, Array]:
    """mask_logits: [batch, S, vocab]; mask position i predicts tokens[i] (no shift).

    Returns scalar `diff_loss`, `diff_accuracy`, `diff_count`, and `diff_slot_accuracy` [K]: top-1 accuracy of
    slot r = i % K within each block (slot 0 is the token right after the visible prefix).
    """
    ce, hits = _ce_and_hits(mask_logits, tokens)
    batch, seq = tokens.shape
    w = valid.astype(jnp.float32).reshape(batch, seq // block_size, block_size)
    slot_hits = jnp.sum(hits.reshape(w.shape) * w, axis=(0, 1)) / jnp.maximum(jnp.sum(w, axis=(0, 1)), 1.0)
    return {"diff_loss": _masked_mean(ce, valid), "diff_accuracy": _masked_mean(hits, valid),
            "diff_count": jnp.sum(valid.astype(jnp.float32)), "diff_slot_accuracy": slot_hits}


def tidar_loss(logits: Array, tokens: Array, valid: Array, block_size: int,
               alpha: float = 1.0) -> tuple[Array, dict[str, Array]]:
    """logits: [batch, 2S, vocab] float32; tokens, valid: [batch, S]. Returns (scalar loss, metrics)."""
    seq = tokens.shape[1]
    if logits.shape[1] != 2 * seq:
        raise ValueError(f"TiDAR logits must cover 2S = {2 * seq} positions, got {logits.shape[1]}")
    metrics = ar_terms(logits[:, :seq], tokens, valid)
    metrics.update(diffusion_terms(logits[:, seq:], tokens, valid, block_size))
    loss = (alpha * metrics["ar_loss"] + metrics["diff_loss"]) / (1.0 + alpha)
    metrics["loss"] = loss
    return loss, metrics


def ar_loss(logits: Array, tokens: Array, valid: Array) -> tuple[Array, dict[str, Array]]:
    """Plain next-token loss. logits: [batch, S, vocab]; tokens, valid: [batch, S]."""
    metrics = ar_terms(logits, tokens, valid)
    metrics["loss"] = metrics["ar_loss"]
    return metrics["loss"], metrics
