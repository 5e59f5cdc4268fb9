"""Attention over a read-only KV cache plus the current block, without concatenating `[cache | current]`.

A cached forward of `t` query tokens over an `S`-slot cache used to build keys = concatenate([cache_k, k]) in every
layer and call `jax.nn.dot_product_attention` on them. On CPU that costs far more than the attention itself: XLA
materialises the concatenation transposed to `[b, kv, d, S + t]` (a copy of the whole cache per layer, at a few
GB/s), and since the old buffers are read before the in-place write of the new K/V, XLA CPU also copies every cache
buffer twice per step (an optimization barrier does not prevent it). The model therefore writes first and then
calls this op on the written cache (the mask hides the written slots' cache columns). `cached_attention` scores
the cache where it lies and the current block
separately and merges the two parts with one shared max (the log-sum-exp merge of the two partial softmaxes). The
result equals `jax.nn.dot_product_attention(q, [cache_k | k], [cache_v | v], mask)` (implementation "xla") up to
float reassociation, including its handling of masked keys (a large finite negative logit, so a row with every key
masked averages all values as the reference does).

Grouped-query attention never repeats K/V: the `h = kv * g` query heads are viewed as `[kv, g]`. Two ways of
multiplying by the cache are implemented:

- "grouped": einsums with batch dims (b, kv) over the cache in its `[b, S, kv, d]` layout. No wasted FLOPs; XLA may
  lay out (transpose) the cache for the dot. Used when the query block is long (a TiDAR step, prefill).
- "dense": the cache as one `[b, S, kv*d]` matrix times a block-diagonal `[kv*d, kv*g*t]` query matrix (scores) and
  `P^T [b, kv*g*t, S] @ V [b, S, kv*d]` whose diagonal blocks are the outputs. One plain batched matmul per part that
  reads the cache once in place, at `kv` times the FLOPs of the useful blocks; for a few query rows (an AR step, a
  batch of decode rows) the cache read dominates and the extra FLOPs are free.

A third, "kernel", is not XLA: the CPU kernel of `ops.cpu_kernels` (one FFI call per layer that reads each cache
row once in place and skips the slots no row may see), differentiated through the plain-XLA "grouped" form.

`"auto"` picks "kernel" on the CPU backend when `cpu_kernels.available()`, it takes the operands (head_dim 16, 32,
64 or 128; float32 or bfloat16), `kv * g * t` (the query columns per batch row) is at most `KERNEL_MAX_COLUMNS` (an
AR step, a TiDAR step up to K = 4 on SmolLM2's 9 heads, a batch of decode rows) and the kernel mode lets it
(kernel_choice.py: in the default mode "auto", where it was measured faster than the XLA form on this machine). Longer blocks (a prefill, K = 8)
keep XLA, whose matmuls do the many-row products faster (SmolLM2, cursor 512, per layer: 128 tokens 4.0 ms XLA vs
6.9 kernel, 72 tokens equal). Otherwise, on the CPU, "dense" when the query columns are at most
`DENSE_MAX_COLUMNS`, else "grouped". On GPU / TPU it always picks "grouped": their transposes are
cheap, and "dense" contracts over the kv-head axis, which `sharding.py` shards on the tensor axis (it would add a
reduction across it). Measured on SmolLM2-135M (392-slot cache, CPU): batch 16 x 1 query 181 ms dense vs 249
grouped; batch 1 x 20 queries 181 dense vs 157 grouped; batch 1 x 1 query equal. The kernel against the better of
the two is in docs/RESULTS.md section 5. Over a CPU mesh the SPMD partitioner would run the kernel's call on
gathered operands: `Generator` traces mesh programs under `cpu_kernels.suspended()`; pass an XLA formulation (or
do the same) to keep a sharded cache split elsewhere.

Cost that follows the fill: a decode cache has `max_cache_len` slots, a chat turn fills a few hundred, and every
slot at or past each row's cursor is masked for every row. On CPU the op reads only the leading window of
`windows(S, CHUNK)` slots (CHUNK, 2 CHUNK, 4 CHUNK, ..., S) that holds `filled_slots(mask)` (1 + the last cache
column any row may attend to): a `lax.switch` over one `_attention` per window, so one compiled program serves
every fill (the fill is data; only the taken branch runs), and the result is the same function, since the skipped
slots would each add exactly 0 to every row's softmax (a mask with a row that sees no key at all takes the whole
cache, see `_filled_window_attention`). Each window keeps the dense / grouped choice above. Measured (SmolLM2-135M,
1024 slots, cursor 128, whole forward, CHUNK 128 vs the whole cache, medians of 7 interleaved): float32 1 x 1
38 vs 49 ms, 1 x 20 80 vs 101, 16 x 1 92 vs 178; bfloat16 1 x 1 equal, 1 x 20 41 vs 63, 16 x 1 279 vs 320; a
full cache (cursor 1000, 21 interleaved) 1 x 1 about 5% slower (47.0 -> 49.9 ms f32, 43.4 -> 45.6 bf16; the branch),
1 x 20 equal or faster. An online-softmax loop over CHUNK-slot chunks (a while loop with the
fill's trip count) was as fast at small fills but 10-27% slower on a full cache (per-iteration overhead of XLA
CPU's while loop over 30 layers). Off CPU no window is taken (unmeasured there: a data-dependent branch costs a
host sync on GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.ops import cpu_kernels, kernel_choice

Array = jax.Array

FORMULATIONS = ("auto", "grouped", "dense", "kernel")
# Query columns (heads x query tokens) per batch row up to which "auto" uses the dense block-diagonal form.
DENSE_MAX_COLUMNS = 64
# ... and up to which "auto" uses the CPU kernel (when available).
KERNEL_MAX_COLUMNS = 256
# The smallest cache window read on CPU (see the module docstring).
CHUNK = 128


def _large_negative() -> float:
    """The masked-logit value of `jax.nn.dot_product_attention` for float32 logits."""
    return -0.7 * float(np.finfo(np.float32).max)


def _scale(head_dim: int, scale: float | None) -> float:
    return head_dim ** -0.5 if scale is None else scale


def _grouped_scores(qg: Array, keys: Array) -> Array:
    """qg: [b, t, kv, g, d]; keys: [b, s, kv, d] -> float32 logits [b, kv, g, t, s]."""
    return jnp.einsum("btkgd,bskd->bkgts", qg, keys, preferred_element_type=jnp.float32)


def _grouped_values(probs: Array, values: Array) -> Array:
    """probs: [b, kv, g, t, s]; values: [b, s, kv, d] -> float32 [b, kv, g, t, d]."""
    return jnp.einsum("bkgts,bskd->bkgtd", probs, values, preferred_element_type=jnp.float32)


def _block_diagonal_queries(qg: Array) -> Array:
    """qg: [b, t, kv, g, d] -> [b, kv, d, kv*g*t] with qg's (k, g, t) columns in row block k and zeros elsewhere."""
    b, t, kv, g, d = qg.shape
    cols = jnp.transpose(qg, (0, 4, 2, 3, 1))[:, None]  # [b, 1, d, k, g, t]
    eye = jnp.eye(kv, dtype=qg.dtype)[None, :, None, :, None, None]  # [1, j, 1, k, 1, 1]
    return (cols * eye).reshape(b, kv, d, kv * g * t)


# The dense matmuls contract the cache as it lies ([b, S, kv, d], never reshaped) and take it as the operand XLA
# CPU can read in place. Which arrangement achieves that differs at batch 1, where XLA drops the batch dim and
# otherwise keeps extra copies of the just-written cache buffer; the batch-1 forms still transpose each layer's
# cache once (cheap at batch 1), the batched forms read it in place (see tests/test_ops_attention.py, HLO check).


def _dense_scores(qg: Array, keys: Array) -> Array:
    """Like `_grouped_scores` via one [S, kv*d] @ [kv*d, kv*g*t] matmul per batch row (block-diagonal queries)."""
    b, t, kv, g, d = qg.shape
    s = keys.shape[1]
    q_blocks = _block_diagonal_queries(qg)
    if b == 1:
        logits = jnp.einsum("bsjd,bjdx->bsx", keys, q_blocks, preferred_element_type=jnp.float32)
    else:
        logits = jax.lax.dot_general(keys, q_blocks, (((2, 3), (1, 2)), ((0,), (0,))),
                                     preferred_element_type=jnp.float32)  # [b, S, kv*g*t]
    return jnp.transpose(logits.reshape(b, s, kv, g, t), (0, 2, 3, 4, 1))


def _dense_values(probs: Array, values: Array) -> Array:
    """Like `_grouped_values` via one [kv*g*t, S] @ [S, kv*d] matmul per batch row, keeping the diagonal blocks
    (by static slices: a contraction with the identity makes XLA transpose the cache for the matmul)."""
    b, kv, g, t, s = probs.shape
    d = values.shape[-1]
    p = probs.reshape(b, kv * g * t, s)
    if b == 1:
        full = jax.lax.dot_general(values, p, (((1,), (2,)), ((0,), (0,))),
                                   preferred_element_type=jnp.float32)  # [b, kv, d, kv*g*t]
        blocks = [full[:, j, :, j * g * t:(j + 1) * g * t] for j in range(kv)]  # kv x [b, d, g*t]
        return jnp.transpose(jnp.stack(blocks, axis=1).reshape(b, kv, d, g, t), (0, 1, 3, 4, 2))
    full = jax.lax.dot_general(p, values, (((2,), (1,)), ((0,), (0,))),
                               preferred_element_type=jnp.float32)  # [b, kv*g*t, kv, d]
    full = full.reshape(b, kv, g * t, kv, d)
    return jnp.stack([full[:, j, :, j] for j in range(kv)], axis=1).reshape(b, kv, g, t, d)


def cached_attention(q: Array, k: Array, v: Array, cache_k: Array, cache_v: Array, mask: Array, *,
                     scale: float | None = None, formulation: str = "auto", chunk: int | None = None) -> Array:
    """Attention of the current block over `[cache slots | current tokens]` without concatenating them.

    q: [b, t, h, d]; k, v: [b, t, kv, d] (the current tokens' keys / values); cache_k, cache_v: [b, S, kv, d]
    (read only; S may be 0); mask: [b or 1, t, S + t] bool, cache columns first, True = may attend; h % kv == 0.
    scale defaults to d ** -0.5. Logits and softmax are float32; probabilities are cast to the value dtype for the
    value matmuls, as `jax.nn.dot_product_attention` does. chunk: the smallest cache window read by the XLA
    formulations (see the module docstring); None = `CHUNK` on the CPU backend and the whole cache elsewhere, 0 =
    the whole cache (the kernel always skips the slots no row may see).
    Returns [b, t, h, d] in q's dtype.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"query heads ({h}) must be a multiple of kv heads ({kv})")
    s = cache_k.shape[1]
    if mask.shape[-2:] != (t, s + t):
        raise ValueError(f"mask must be [b or 1, {t}, {s + t}], got {mask.shape}")
    if chunk is None:
        chunk = CHUNK if jax.default_backend() == "cpu" else 0
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    args = (q, k, v, cache_k.astype(k.dtype), cache_v.astype(v.dtype), mask)
    dtypes = [x.dtype for x in args[:5]]
    if formulation == "kernel" and not (cpu_kernels.supports(d, *dtypes) and cpu_kernels.available()):
        raise ValueError(f"formulation 'kernel' needs the CPU backend, ${cpu_kernels.ENV} not off, a built kernel "
                         f"library and operands it takes (one dtype of {cpu_kernels.DTYPES}, head_dim in "
                         f"{cpu_kernels.HEAD_DIMS}); got backend {jax.default_backend()!r}, head_dim {d}, dtypes "
                         f"{sorted(map(str, dtypes))}")
    if formulation == "auto":
        xla = "dense" if jax.default_backend() == "cpu" and h * t <= DENSE_MAX_COLUMNS else "grouped"  # h*t = kv*g*t
        kernel = auto_uses_kernel(d, h, t, *dtypes) and _kernel_chosen(q.shape, kv, s, mask.shape[0], dtypes[0], xla,
                                                                       chunk, scale)
        formulation = "kernel" if kernel else xla
    sc = _scale(d, scale)
    if formulation == "kernel":
        return _kernel_attention(*args[:5], mask.astype(bool), sc)
    if chunk == 0 or s <= chunk:  # one window: the whole cache
        return _attention(*args, sc, formulation == "dense")
    return _filled_window_attention(*args, sc, formulation == "dense", chunk)


def auto_uses_kernel(head_dim: int, heads: int, query_tokens: int, *dtypes) -> bool:
    """Whether formulation "auto" runs the CPU kernel for a block of `query_tokens` over `heads` query heads with
    operands of these dtypes (the rule in the module docstring), when traced now (`cpu_kernels.enabled()`)."""
    return (jax.default_backend() == "cpu" and heads * query_tokens <= KERNEL_MAX_COLUMNS
            and cpu_kernels.supports(head_dim, *dtypes) and cpu_kernels.available())


def _kernel_chosen(q_shape: tuple, kv: int, slots: int, mask_rows: int, dtype, xla: str, chunk: int,
                   scale: float | None) -> bool:
    """Whether the kernel runs this block in the current kernel mode (kernel_choice.py): in mode auto, whether it
    was measured faster than the `xla` formulation on operands of these shapes, with a half-filled cache."""
    b, t, h, d = q_shape
    key = f"attention q{list(q_shape)} kv{kv} slots{slots} {jnp.dtype(dtype).name}"

    def timings() -> dict:
        keys = jax.random.split(jax.random.key(0), 5)
        q = jax.random.normal(keys[0], q_shape, dtype)
        k, v = (jax.random.normal(keys[i], (b, t, kv, d), dtype) for i in (1, 2))
        ck, cv = (jax.random.normal(keys[i], (b, slots, kv, d), dtype) for i in (3, 4))
        cols = jnp.arange(slots + t)
        mask = (cols[None] < slots // 2) | ((cols[None] >= slots) & (cols[None] - slots <= jnp.arange(t)[:, None]))
        mask = jnp.broadcast_to(mask, (mask_rows, t, slots + t))
        fast, plain = (jax.jit(functools.partial(cached_attention, formulation=f, chunk=chunk, scale=scale))
                       for f in ("kernel", xla))
        return kernel_choice.measure(lambda: fast(q, k, v, ck, cv, mask), lambda: plain(q, k, v, ck, cv, mask))

    return kernel_choice.use_kernel(key, cpu_kernels.build_key(), timings)


def _attention(q: Array, k: Array, v: Array, cache_k: Array, cache_v: Array, mask: Array, sc: float,
               dense: bool) -> Array:
    """`cached_attention` over every cache slot (shapes there; caches already in k / v's dtype): the cache's
    scores in one part, the current block's in another, merged with one shared max."""
    b, t, h, d = q.shape
    kv = k.shape[2]
    s = cache_k.shape[1]
    scores_fn, values_fn = (_dense_scores, _dense_values) if dense else (_grouped_scores, _grouped_values)
    qg = q.reshape(b, t, kv, h // kv, d)
    neg = jnp.asarray(_large_negative(), jnp.float32)
    mask = mask[:, None, None]  # [b or 1, 1, 1, t, S + t]
    local = jnp.where(mask[..., s:], _grouped_scores(qg, k) * sc, neg)  # [b, kv, g, t, t]
    top = jnp.max(local, axis=-1, keepdims=True)
    if s:
        cached = jnp.where(mask[..., :s], scores_fn(qg, cache_k) * sc, neg)  # [b, kv, g, t, S]
        top = jnp.maximum(top, jnp.max(cached, axis=-1, keepdims=True))
    top = jax.lax.stop_gradient(top)
    p_local = jnp.exp(local - top)
    denom = jnp.sum(p_local, axis=-1, keepdims=True)
    out = _grouped_values(p_local.astype(v.dtype), v)
    if s:
        p_cached = jnp.exp(cached - top)
        denom = denom + jnp.sum(p_cached, axis=-1, keepdims=True)
        out = out + values_fn(p_cached.astype(v.dtype), cache_v)
    return _heads_last(out / denom, q.dtype)


def _heads_last(out: Array, dtype) -> Array:
    """[b, kv, g, t, d] -> [b, t, kv*g, d] in dtype."""
    b, kv, g, t, d = out.shape
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, kv * g, d).astype(dtype)


def filled_slots(cache_mask: Array) -> Array:
    """cache_mask: [..., S] bool (the mask's cache columns) -> int32 scalar: 1 + the last slot any row may attend
    to (0 if none). Every slot from it on is masked for every row."""
    s = cache_mask.shape[-1]
    seen = jnp.any(cache_mask.reshape(-1, s), axis=0)
    return jnp.max(jnp.where(seen, jnp.arange(1, s + 1, dtype=jnp.int32), 0), initial=0)


def windows(slots: int, chunk: int) -> tuple[int, ...]:
    """The cache windows (leading slots) `cached_attention` may read: chunk, 2 chunk, 4 chunk, ... up to slots."""
    sizes = [chunk]
    while sizes[-1] < slots:
        sizes.append(min(2 * sizes[-1], slots))
    return tuple(sizes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _filled_window_attention(q: Array, k: Array, v: Array, cache_k: Array, cache_v: Array, mask: Array, sc: float,
                             dense: bool, chunk: int) -> Array:
    """`_attention` over the smallest window of `windows(S, chunk)` slots that holds every slot some row may attend
    to: a `lax.switch` over one `_attention` per window (one program for every fill; only the taken branch runs).

    The slots past the window are masked for every row, so they would add exp(large negative - max) = 0 to each
    row's softmax, except for a row whose every key is masked: it averages all S + t values (the large-negative
    convention), unfilled slots included, so a mask with such a row takes the whole cache.
    """
    s = cache_k.shape[1]
    sizes = windows(s, chunk)
    any_dead_row = jnp.any(~jnp.any(mask, axis=-1))
    needed = jnp.where(any_dead_row, s, filled_slots(mask[..., :s]))
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), needed)  # first window >= needed

    def branch(w):
        def attend(q, k, v, cache_k, cache_v, mask):
            window_mask = jnp.concatenate([mask[..., :w], mask[..., s:]], axis=-1)
            return _attention(q, k, v, cache_k[:, :w], cache_v[:, :w], window_mask, sc, dense)
        return attend

    return jax.lax.switch(index, [branch(w) for w in sizes], q, k, v, cache_k, cache_v, mask)


def _whole_cache_vjp(args: tuple, sc: float, dense: bool):
    """(output, pullback) of `_attention` over the whole cache: what differentiated callers of the window switch and
    of the kernel (the drafting loss's mask pass, draft_loss.py) run, the same function in plain XLA (the switch's
    VJP would keep residuals for every window; the kernel has none)."""
    return jax.vjp(lambda *a: _attention(*a, sc, dense), *args)


def _filled_window_fwd(q, k, v, cache_k, cache_v, mask, sc, dense, chunk):
    return _whole_cache_vjp((q, k, v, cache_k, cache_v, mask), sc, dense)


def _filled_window_bwd(sc, dense, chunk, pullback, cotangent):
    return pullback(cotangent)


_filled_window_attention.defvjp(_filled_window_fwd, _filled_window_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _kernel_attention(q: Array, k: Array, v: Array, cache_k: Array, cache_v: Array, mask: Array, sc: float) -> Array:
    """`_attention` computed by the CPU kernel (`cpu_kernels.cached_attention`); its VJP is plain XLA's."""
    return cpu_kernels.cached_attention(q, k, v, cache_k, cache_v, mask, sc)


def _kernel_fwd(q, k, v, cache_k, cache_v, mask, sc):
    return _whole_cache_vjp((q, k, v, cache_k, cache_v, mask), sc, False)


def _kernel_bwd(sc, pullback, cotangent):
    return pullback(cotangent)


_kernel_attention.defvjp(_kernel_fwd, _kernel_bwd)
