"""Blockwise (flash-style, online-softmax) attention for the training layouts, O(S) memory, forward and backward.

`blockwise_attention(q, k, v, layout, key_valid)` computes exactly what `jax.nn.dot_product_attention(q, k, v,
mask=LayoutMask(key_valid, layout).dense()[:, None])` computes (up to float reassociation), without any [T, T]
array: neither the mask nor the scores nor the probabilities.

- Schedule: the rows and keys are cut into tiles of `block_q` x `block_k` (the token axis padded up to a multiple
  of the tile, padded keys invalid, padded rows dropped). Which (q tile, k tile) pairs hold at least one allowed
  element is decided at trace time in numpy from the static layout (`masks.TrainingLayout.key_ranges`, the same
  predicate the dense mask is built from); fully masked tiles are never computed. Key padding is dynamic and only
  removes elements inside the scheduled tiles.
- Forward: one `lax.scan` over the flattened pair list; the carry holds the float32 running max, denominator and
  output accumulator of every row, a tile's rows updated in place by `dynamic_update_slice`. Saves the output and
  the per-row log-sum-exp only.
- Backward (`jax.custom_vjp`): the flash-attention backward: a second scan over the same pairs recomputes each
  tile's probabilities from the saved log-sum-exp and accumulates float32 dq, dk, dv.
- GQA: the h = kv * g query heads are viewed as [kv, g]; K/V are never repeated.
- A row whose keys are all masked (e.g. a padded row whose whole window is padding) behaves as in the dense
  reference, which masks with a large finite negative logit: its output is the mean of all T values, its logits get
  no gradient, and each value receives 1/T of its output gradient.
Numerics follow `jax.nn.dot_product_attention`: float32 logits (scaled after the matmul) and softmax, probabilities
cast to the value dtype for the value matmul (accumulated in float32 here), output in q's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.layout.masks import TrainingLayout

Array = jax.Array

# Default tile sizes (rows x keys), used by model.py. Not tuned: 128 x 128 is what docs/RESULTS.md measured
# (faster than dense on the CPU at S = 512); accelerators may prefer larger tiles.
BLOCK_Q = 128
BLOCK_K = 128


def _tiles(n: int, block: int) -> tuple[int, int]:
    """(tile size, tile count) for n tokens: the tile shrinks to n when n is smaller."""
    block = min(block, n)
    return block, -(-n // block)


@functools.lru_cache(maxsize=64)
def tile_schedule(layout: TrainingLayout, q_offset: int, n_rows: int, block_q: int, block_k: int) -> np.ndarray:
    """int32 [pairs, 2] (q tile, k tile), row-major, of the tiles holding at least one allowed element for rows
    `[q_offset, q_offset + n_rows)` of `layout` over all its keys (tiles of `block_q` rows, `block_k` keys, the
    last ones padded; padded rows and keys are never allowed)."""
    n_keys = layout.length
    bq, nqt = _tiles(n_rows, block_q)
    bk, nkt = _tiles(n_keys, block_k)
    rows = q_offset + np.arange(nqt * bq, dtype=np.int64)
    lo, hi, lo2, hi2 = layout.key_ranges(rows, np)
    real = rows < q_offset + n_rows
    c0 = np.arange(nkt, dtype=np.int64)[None, :] * bk
    c1 = np.minimum(c0 + bk, n_keys)
    # Row r meets key tile [c0, c1) iff one of its intervals [lo, hi), [lo2, hi2) overlaps it.
    hit = (np.minimum(hi[:, None], c1) > np.maximum(lo[:, None], c0)) | (
        (np.minimum(hi2[:, None], c1) > np.maximum(lo2[:, None], c0)) & (hi2 > lo2)[:, None])
    hit &= real[:, None]
    tile_hit = hit.reshape(nqt, bq, nkt).any(axis=1)
    return np.argwhere(tile_hit).astype(np.int32)


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


class _Plan:
    """Static shapes of one call: tile sizes, padded lengths and the pair schedule."""

    def __init__(self, layout: TrainingLayout, q_offset: int, n_rows: int, block_q: int, block_k: int):
        self.layout, self.q_offset, self.n_rows = layout, q_offset, n_rows
        self.n_keys = layout.length
        self.bq, nqt = _tiles(n_rows, block_q)
        self.bk, nkt = _tiles(self.n_keys, block_k)
        self.rows_pad, self.keys_pad = nqt * self.bq, nkt * self.bk
        self.pairs = tile_schedule(layout, q_offset, n_rows, block_q, block_k)

    def tile_mask(self, i: Array, j: Array, key_valid: Array) -> Array:
        """Allowed elements of tile (i, j): [b, 1, 1, bq, bk] bool (key_valid: [b, keys_pad], padding False)."""
        rows = self.q_offset + i * self.bq + jnp.arange(self.bq, dtype=jnp.int32)
        keys = j * self.bk + jnp.arange(self.bk, dtype=jnp.int32)
        valid = jax.lax.dynamic_slice_in_dim(key_valid, j * self.bk, self.bk, axis=1)
        allowed = self.layout.allowed(rows[:, None], keys[None, :])
        return (allowed[None] & valid[:, None, :])[:, None, None]


def _scores(q_t: Array, k_t: Array, scale: float) -> Array:
    """q_t: [b, bq, kv, g, d]; k_t: [b, bk, kv, d] -> float32 scaled logits [b, kv, g, bq, bk]."""
    return jnp.einsum("bqkgd,bskd->bkgqs", q_t, k_t, preferred_element_type=jnp.float32) * scale


def _slice(x: Array, start: Array, size: int, axis: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _update(x: Array, new: Array, start: Array, axis: int) -> Array:
    return jax.lax.dynamic_update_slice_in_dim(x, new.astype(x.dtype), start, axis=axis)


def _forward(plan: _Plan, scale: float, qg: Array, k: Array, v: Array, key_valid: Array):
    """Padded inputs qg: [b, rows_pad, kv, g, d]; k, v: [b, keys_pad, kv, d]; key_valid: [b, keys_pad] ->
    (out float32 [b, rows_pad, kv, g, d] (garbage on empty rows), lse float32 [b, kv, g, rows_pad], empty bool
    [b, kv, g, rows_pad]: rows with no allowed key)."""
    b, _, kv, g, d = qg.shape
    bq, bk = plan.bq, plan.bk
    stats = jnp.full((b, kv, g, plan.rows_pad), -jnp.inf, jnp.float32)
    carry0 = (stats, jnp.zeros_like(stats), jnp.zeros((b, kv, g, plan.rows_pad, d), jnp.float32))

    def step(carry, pair):
        m, l, acc = carry
        i0, j0 = pair[0] * bq, pair[1] * bk
        s = _scores(_slice(qg, i0, bq, 1), _slice(k, j0, bk, 1), scale)
        s = jnp.where(plan.tile_mask(pair[0], pair[1], key_valid), s, -jnp.inf)
        m_old = _slice(m, i0, bq, 3)
        m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # a row with nothing allowed so far: p = 0, not NaN
        p = jnp.exp(s - m_safe[..., None])
        corr = jnp.exp(m_old - m_safe)
        l_new = _slice(l, i0, bq, 3) * corr + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), _slice(v, j0, bk, 1),
                        preferred_element_type=jnp.float32)
        acc_new = _slice(acc, i0, bq, 3) * corr[..., None] + pv
        return (_update(m, m_new, i0, 3), _update(l, l_new, i0, 3), _update(acc, acc_new, i0, 3)), None

    (m, l, acc), _ = jax.lax.scan(step, carry0, jnp.asarray(plan.pairs))
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
    return jnp.transpose(out, (0, 3, 1, 2, 4)), lse, empty


def _backward(plan: _Plan, scale: float, qg: Array, k: Array, v: Array, key_valid: Array, out: Array,
              lse: Array, dout: Array):
    """Padded qg, out, dout: [b, rows_pad, kv, g, d]; k, v: [b, keys_pad, kv, d]; lse: [b, kv, g, rows_pad] ->
    float32 (dq [b, rows_pad, kv, g, d], dk, dv [b, keys_pad, kv, d]) from the allowed elements only."""
    bq, bk = plan.bq, plan.bk
    delta = jnp.transpose(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1), (0, 2, 3, 1))
    carry0 = (jnp.zeros(qg.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))

    def step(carry, pair):
        dq, dk, dv = carry
        i0, j0 = pair[0] * bq, pair[1] * bk
        q_t, k_t, v_t = _slice(qg, i0, bq, 1), _slice(k, j0, bk, 1), _slice(v, j0, bk, 1)
        do_t = _slice(dout, i0, bq, 1)
        s = _scores(q_t, k_t, scale)
        mask = plan.tile_mask(pair[0], pair[1], key_valid)
        p = jnp.where(mask, jnp.exp(s - _slice(lse, i0, bq, 3)[..., None]), 0.0)  # [b, kv, g, bq, bk]
        dv_t = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(dout.dtype), do_t, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do_t, v_t, preferred_element_type=jnp.float32)
        ds = p * (dp - _slice(delta, i0, bq, 3)[..., None]) * scale
        dq_t = jnp.einsum("bkgqs,bskd->bqkgd", ds.astype(k.dtype), k_t, preferred_element_type=jnp.float32)
        dk_t = jnp.einsum("bkgqs,bqkgd->bskd", ds.astype(qg.dtype), q_t, preferred_element_type=jnp.float32)
        return (_update(dq, _slice(dq, i0, bq, 1) + dq_t, i0, 1), _update(dk, _slice(dk, j0, bk, 1) + dk_t, j0, 1),
                _update(dv, _slice(dv, j0, bk, 1) + dv_t, j0, 1)), None

    (dq, dk, dv), _ = jax.lax.scan(step, carry0, jnp.asarray(plan.pairs))
    return dq, dk, dv


def _prepare(plan: _Plan, q: Array, k: Array, v: Array, key_valid: Array):
    b, n, h, d = q.shape
    kv = k.shape[2]
    qg = _pad_axis(q, 1, plan.rows_pad).reshape(b, plan.rows_pad, kv, h // kv, d)
    return (qg, _pad_axis(k, 1, plan.keys_pad), _pad_axis(v, 1, plan.keys_pad),
            _pad_axis(key_valid, 1, plan.keys_pad, False))


def _finish(plan: _Plan, out: Array, empty: Array, v: Array, shape, dtype) -> Array:
    """Empty rows take the mean of all real values (the dense reference's uniform softmax); unpad; [b, n, h, d]."""
    mean_v = jnp.mean(v.astype(jnp.float32), axis=1)[:, None, :, None, :]  # [b, 1, kv, 1, d]
    out = jnp.where(jnp.transpose(empty, (0, 3, 1, 2))[..., None], mean_v, out)
    return out[:, :plan.n_rows].reshape(shape).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, key_valid, plan, scale):
    out, _ = _attention_fwd(q, k, v, key_valid, plan, scale)
    return out


def _attention_fwd(q, k, v, key_valid, plan, scale):
    qg, kp, vp, valid = _prepare(plan, q, k, v, key_valid)
    out, lse, empty = _forward(plan, scale, qg, kp, vp, valid)
    result = _finish(plan, out, empty, v, q.shape, q.dtype)
    return result, (q, k, v, key_valid, result, lse, empty)


def _attention_bwd(plan, scale, residuals, dout):
    q, k, v, key_valid, result, lse, empty = residuals
    b, n, h, d = q.shape
    kv = k.shape[2]
    qg, kp, vp, valid = _prepare(plan, q, k, v, key_valid)

    def grouped(x):
        return _pad_axis(x, 1, plan.rows_pad).reshape(qg.shape)

    dq, dk, dv = _backward(plan, scale, qg, kp, vp, valid, grouped(result), lse, grouped(dout))
    # Empty rows averaged all T values with constant weights 1/T: their output gradient goes to every value.
    empty_rows = jnp.transpose(empty, (0, 3, 1, 2))[..., None]  # [b, rows_pad, kv, g, 1]
    to_all = jnp.sum(jnp.where(empty_rows, grouped(dout).astype(jnp.float32), 0.0), axis=(1, 3)) / plan.n_keys
    dv = dv[:, :plan.n_keys] + to_all[:, None]
    return (dq[:, :n].reshape(b, n, h, d).astype(q.dtype), dk[:, :plan.n_keys].astype(k.dtype),
            dv.astype(v.dtype), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q: Array, k: Array, v: Array, layout: TrainingLayout, key_valid: Array, *,
                        q_offset: int = 0, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                        scale: float | None = None) -> Array:
    """Attention of rows `[q_offset, q_offset + n)` of `layout` over all its T = layout.length keys.

    q: [b, n, h, d]; k, v: [b, T, kv, d] (h % kv == 0); key_valid: [b, T] bool (False = padded key, seen by
    nobody). scale defaults to d ** -0.5. Returns [b, n, h, d] in q's dtype; differentiable in q, k, v (custom VJP,
    memory O(T) beyond the inputs). Equals the dense reference, see the module docstring.
    """
    b, n, h, d = q.shape
    if k.shape[1] != layout.length or key_valid.shape != (b, layout.length):
        raise ValueError(f"k and key_valid must span the layout's {layout.length} keys, got k {k.shape}, "
                         f"key_valid {key_valid.shape}")
    if not 0 <= q_offset <= layout.length - n:
        raise ValueError(f"rows [{q_offset}, {q_offset + n}) are outside the layout's {layout.length} rows")
    if h % k.shape[2]:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({k.shape[2]})")
    plan = _plan(layout, q_offset, n, block_q, block_k)
    return _attention(q, k, v, key_valid, plan, d ** -0.5 if scale is None else float(scale))


@functools.lru_cache(maxsize=64)
def _plan(layout: TrainingLayout, q_offset: int, n_rows: int, block_q: int, block_k: int) -> _Plan:
    return _Plan(layout, q_offset, n_rows, block_q, block_k)

