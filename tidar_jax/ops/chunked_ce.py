"""Per-row cross-entropy and top-1 hits straight from final hidden states, never holding all rows' logits.

`row_ce(hidden [batch, rows, d_model], head [d_model, vocab], targets [batch, rows])` returns `(ce, hits)`, both
float32 `[batch, rows]`. With `chunk_rows > 0` it scans over chunks of `chunk_rows` rows of every sequence: each step
forms that chunk's float32 logits `[batch, chunk_rows, vocab]`, reduces them to logsumexp, the target logit and the argmax, and
drops them; the step is `jax.checkpoint`ed so the backward pass recomputes a chunk's logits rather than storing
them, so peak logits memory is one chunk instead of `[batch, rows, vocab]`. `chunk_rows = 0` is the dense
reference (one einsum over all rows, as `model.Transformer.logits` + optax). Both run the head matmul in
`compute_dtype` with float32 accumulation, like `Transformer.logits`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def _logits(hidden: Array, head: Array, compute_dtype) -> Array:
    """hidden [..., d_model] @ head [d_model, vocab] -> float32 [..., vocab] (compute dtype, float32 accumulate)."""
    cd = jnp.dtype(compute_dtype)
    return jnp.einsum("...d,dv->...v", hidden.astype(cd), head.astype(cd),
                      preferred_element_type=jnp.float32).astype(jnp.float32)


def _ce_hits(logits: Array, targets: Array) -> tuple[Array, Array]:
    """logits [..., vocab] float32, targets [...] int -> (ce, hits) float32 [...]."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return ce, hits


def row_ce(hidden: Array, head: Array, targets: Array, compute_dtype="float32",
           chunk_rows: int = 0) -> tuple[Array, Array]:
    """hidden: [batch, rows, d_model]; head: [d_model, vocab]; targets: [batch, rows] int (any in-range id on rows
    the caller masks out). Returns float32 (ce, hits) [batch, rows]; see the module docstring for `chunk_rows`."""
    if chunk_rows <= 0:
        return _ce_hits(_logits(hidden, head, compute_dtype), targets)
    batch, rows, d = hidden.shape
    n_chunks = -(-rows // chunk_rows)
    pad = n_chunks * chunk_rows - rows
    # [n_chunks, batch, chunk_rows, ...]: chunks run along the row axis only, so a batch sharded over devices stays
    # sharded (flattening batch x rows would make every device scan the whole global batch).
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(batch, n_chunks, chunk_rows, d).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, n_chunks, chunk_rows).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(h_c: Array, t_c: Array) -> tuple[Array, Array]:
        return _ce_hits(_logits(h_c, head, compute_dtype), t_c)

    def step(carry, xs):
        return carry, chunk(*xs)

    _, (ce, hits) = jax.lax.scan(step, None, (h, t))

    def unchunk(x: Array) -> Array:
        return x.swapaxes(0, 1).reshape(batch, n_chunks * chunk_rows)[:, :rows]

    return unchunk(ce), unchunk(hits)
