"""TiDAR joint loss (AR next-token + diffusion same-position) and the plain AR loss, with metrics.

`(alpha * mean CE_ar + mean CE_diff) / (1 + alpha)`: each mean is over its own valid targets, so padding never
dilutes a term. Logits are float32 `[batch, 2S, vocab]` laid out as `[clean | mask]` (see masks.training_*).

The `*_from_hidden` forms take the final hidden states `[batch, rows, d_model]` and the head weight
`[d_model, vocab]` instead and go through `ops.row_ce`, which with `chunk_rows > 0` never holds all rows' logits;
both forms reduce the same per-row (ce, hits) with the same `_ar_metrics` / `_diff_metrics`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tidar_jax.ops.chunked_ce import row_ce

Array = jax.Array


def _masked_mean(values: Array, weights: Array) -> Array:
    weights = weights.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def _ce_and_hits(logits: Array, targets: Array) -> tuple[Array, Array]:
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return ce, hits


def _ar_metrics(ce: Array, hits: Array, valid: Array) -> dict[str, Array]:
    """ce, hits: [batch, S-1] of clean rows 0..S-2 against tokens[1:]; valid: [batch, S]."""
    weights = valid[:, :-1] & valid[:, 1:]
    return {"ar_loss": _masked_mean(ce, weights), "ar_accuracy": _masked_mean(hits, weights),
            "ar_count": jnp.sum(weights.astype(jnp.float32))}


def _diff_metrics(ce: Array, hits: Array, valid: Array, block_size: int) -> dict[str, Array]:
    """ce, hits, valid: [batch, S] of the mask rows against tokens (no shift)."""
    batch, seq = valid.shape
    w = valid.astype(jnp.float32).reshape(batch, seq // block_size, block_size)
    slot_hits = jnp.sum(hits.reshape(w.shape) * w, axis=(0, 1)) / jnp.maximum(jnp.sum(w, axis=(0, 1)), 1.0)
    return {"diff_loss": _masked_mean(ce, valid), "diff_accuracy": _masked_mean(hits, valid),
            "diff_count": jnp.sum(valid.astype(jnp.float32)), "diff_slot_accuracy": slot_hits}


def ar_terms(clean_logits: Array, tokens: Array, valid: Array) -> dict[str, Array]:
    """clean_logits: [batch, S, vocab]; tokens, valid: [batch, S]. Position i predicts tokens[i+1].

    Returns scalar `ar_loss`, `ar_accuracy` and `ar_count` (number of valid next-token targets).
    """
    return _ar_metrics(*_ce_and_hits(clean_logits[:, :-1], tokens[:, 1:]), valid)


def diffusion_terms(mask_logits: Array, tokens: Array, valid: Array, block_size: int,
                    teacher_logits: Array | None = None) -> dict[str, Array]:
    """mask_logits: [batch, S, vocab]; mask position i predicts tokens[i] (no shift).

    Returns scalar `diff_loss`, `diff_accuracy`, `diff_count`, and `diff_slot_accuracy` [K]: top-1 accuracy of
    slot r = i % K within each block (slot 0 is the token right after the visible prefix). With `teacher_logits`
    (the clean rows' AR logits [batch, S, vocab], row i predicting position i+1), `diff_loss` is the soft-target
    loss of `soft_draft_ce` instead; accuracies stay against tokens.
    """
    ce, hits = _ce_and_hits(mask_logits, tokens)
    if teacher_logits is not None:
        ce = soft_draft_ce(mask_logits, teacher_logits, ce, valid)
    return _diff_metrics(ce, hits, valid, block_size)


def soft_draft_ce(mask_logits: Array, teacher_logits: Array, hard_ce: Array, valid: Array) -> Array:
    """Per-row draft loss [batch, S] against the verifier's own distribution: mask row i (predicting position i) is
    scored by the cross-entropy to softmax(teacher_logits[i-1]), the AR prediction for position i, which gets no
    gradient; row 0 and rows whose previous position is padding have no teacher and keep `hard_ce` [batch, S]. The
    cross-entropy differs from KL(teacher || draft) by the teacher's entropy, a constant, so their gradients agree.
    mask_logits, teacher_logits: [batch, S, vocab]; valid: [batch, S]."""
    teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits[:, :-1]).astype(jnp.float32), axis=-1)
    soft = optax.softmax_cross_entropy(mask_logits[:, 1:].astype(jnp.float32), teacher)
    has_teacher = valid[:, :-1] & valid[:, 1:]
    return hard_ce.at[:, 1:].set(jnp.where(has_teacher, soft, hard_ce[:, 1:]))


def _next_token_targets(tokens: Array) -> Array:
    """[batch, S]: tokens[i+1] at row i; the last row (no target, always masked out) gets tokens[:, 0]."""
    return jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)


def _with_total_loss(metrics: dict[str, Array], alpha: float) -> tuple[Array, dict[str, Array]]:
    loss = (alpha * metrics["ar_loss"] + metrics["diff_loss"]) / (1.0 + alpha)
    metrics["loss"] = loss
    return loss, metrics


def tidar_loss(logits: Array, tokens: Array, valid: Array, block_size: int, alpha: float = 1.0,
               soft_targets: bool = False) -> tuple[Array, dict[str, Array]]:
    """logits: [batch, 2S, vocab] float32; tokens, valid: [batch, S]. Returns (scalar loss, metrics). With
    `soft_targets` the mask rows learn the clean rows' own AR distributions (`soft_draft_ce`)."""
    seq = tokens.shape[1]
    if logits.shape[1] != 2 * seq:
        raise ValueError(f"TiDAR logits must cover 2S = {2 * seq} positions, got {logits.shape[1]}")
    metrics = ar_terms(logits[:, :seq], tokens, valid)
    metrics.update(diffusion_terms(logits[:, seq:], tokens, valid, block_size,
                                   logits[:, :seq] if soft_targets else None))
    return _with_total_loss(metrics, alpha)


def tidar_loss_from_hidden(hidden: Array, head: Array, tokens: Array, valid: Array, block_size: int,
                           alpha: float = 1.0, compute_dtype="float32",
                           chunk_rows: int = 0) -> tuple[Array, dict[str, Array]]:
    """`tidar_loss` of hidden: [batch, 2S, d_model] (`[clean | mask]`) under head: [d_model, vocab], via
    `ops.row_ce` (one call over both halves; `chunk_rows > 0` never holds the [batch, 2S, vocab] logits)."""
    seq = tokens.shape[1]
    if hidden.shape[1] != 2 * seq:
        raise ValueError(f"TiDAR hidden states must cover 2S = {2 * seq} positions, got {hidden.shape[1]}")
    targets = jnp.concatenate([_next_token_targets(tokens), tokens], axis=1)
    ce, hits = row_ce(hidden, head, targets, compute_dtype, chunk_rows)
    metrics = _ar_metrics(ce[:, :seq - 1], hits[:, :seq - 1], valid)
    metrics.update(_diff_metrics(ce[:, seq:], hits[:, seq:], valid, block_size))
    return _with_total_loss(metrics, alpha)


def diffusion_terms_from_hidden(hidden: Array, head: Array, tokens: Array, valid: Array, block_size: int,
                                compute_dtype="float32", chunk_rows: int = 0) -> dict[str, Array]:
    """`diffusion_terms` of mask-row hidden: [batch, S, d_model] under head: [d_model, vocab] (`ops.row_ce`)."""
    return _diff_metrics(*row_ce(hidden, head, tokens, compute_dtype, chunk_rows), valid, block_size)


def ar_loss_from_hidden(hidden: Array, head: Array, tokens: Array, valid: Array, compute_dtype="float32",
                        chunk_rows: int = 0) -> tuple[Array, dict[str, Array]]:
    """`ar_loss` of hidden: [batch, S, d_model] under head: [d_model, vocab] (`ops.row_ce`)."""
    ce, hits = row_ce(hidden, head, _next_token_targets(tokens), compute_dtype, chunk_rows)
    metrics = _ar_metrics(ce[:, :-1], hits[:, :-1], valid)
    metrics["loss"] = metrics["ar_loss"]
    return metrics["loss"], metrics


def ar_loss(logits: Array, tokens: Array, valid: Array) -> tuple[Array, dict[str, Array]]:
    """Plain next-token loss. logits: [batch, S, vocab]; tokens, valid: [batch, S]."""
    metrics = ar_terms(logits, tokens, valid)
    metrics["loss"] = metrics["ar_loss"]
    return metrics["loss"], metrics
