"""Logit processing, sampling and TiDAR draft verification (design.md section 3). Pure, batched, jit-friendly.

Conventions: `logits` / `probs` are float32 `[batch, ..., vocab]`; a draft block is `drafts [batch, K]` =
`v_1 .. v_K`, where v_1 is already decided and v_2..v_K are guesses. Verification returns the accepted length
`a` ([batch] int32, 1 <= a <= K: v_1..v_a are committed) and the next decided token `t_a` ([batch] int32), which
becomes v_1 of the next block.

Per-call knobs live in `SamplingParams` (arrays, so a new temperature never recompiles), checked where they are
created (`checked_knobs`), together with the ids a draw never returns (`non_tokens`: the mask, the pad, embedding
rows past the tokenizer); whether decoding is greedy is a static choice of the caller. Randomness comes as uniforms
in (0, 1] (`uniforms`); one draw from a distribution (`sample`) takes a pair of them (`DRAW_UNIFORMS`), so callers
size their single `uniforms` call [..., 2] per draw.
"""

from __future__ import annotations

import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


NO_TOKEN_LIMIT = 2**31 - 1  # `SamplingParams.token_limit` when every embedding row is a token


def checked_knobs(beta: float = 1.0, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> tuple[float, float, int, float]:
    """The sampling knobs as (beta, temperature, top_k, top_p) Python numbers, or ValueError naming the first bad
    one: beta in [0, 1]; temperature a finite float32 >= 0 (0 = greedy; NaN, inf and 1e39 refused); top_k an
    integer >= 0 (0 = off; 2.5 refused, not truncated); top_p in (0, 1]. Every comparison fails for NaN."""
    def number(name: str, value) -> float:
        try:
            if isinstance(value, (bool, str, bytes)):  # float("0.5") and float(True) would pass silently
                raise TypeError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None

    beta, temperature, top_p = number("beta", beta), number("temperature", temperature), number("top_p", top_p)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= temperature <= float(np.finfo(np.float32).max):  # the device holds it as float32
        raise ValueError(f"temperature must be a finite (float32) number >= 0 (0 = greedy), got {temperature}")
    try:
        if isinstance(top_k, bool):
            raise TypeError
        top_k = operator.index(top_k)  # ints, NumPy ints, integer arrays of one element; never 2.5 -> 2
    except TypeError:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}") from None
    if top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    return beta, temperature, top_k, top_p


@struct.dataclass
class SamplingParams:
    """Traced scalars. beta: weight of the AR logits in the verifier mix (1 = pure AR); temperature > 0 for
    sampling (ignored when greedy); top_k: keep the k most likely tokens (0 = off); top_p: nucleus mass (1 = off).

    The ids a draw may never return (`non_tokens`): every id >= token_limit (embedding rows past the tokenizer,
    e.g. SmolLM2's rows 49154..49215) and the ids in reserved ([n] int32: the mask, the pad)."""

    beta: Array
    temperature: Array
    top_k: Array
    top_p: Array
    token_limit: Array
    reserved: Array

    @classmethod
    def create(cls, beta: float = 1.0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, *,
               token_limit: int = NO_TOKEN_LIMIT, reserved: tuple[int, ...] = ()) -> "SamplingParams":
        """Checked knobs (`checked_knobs`: ValueError naming a bad one) as device scalars."""
        beta, temperature, top_k, top_p = checked_knobs(beta, temperature, top_k, top_p)
        if not 0 < token_limit <= NO_TOKEN_LIMIT or any(not 0 <= r < NO_TOKEN_LIMIT for r in reserved):
            raise ValueError(f"token_limit must be >= 1 and reserved ids >= 0, got {token_limit}, {reserved}")
        return cls(beta=jnp.asarray(beta, jnp.float32), temperature=jnp.asarray(temperature, jnp.float32),
                   top_k=jnp.asarray(top_k, jnp.int32), top_p=jnp.asarray(top_p, jnp.float32),
                   token_limit=jnp.asarray(token_limit, jnp.int32), reserved=jnp.asarray(reserved, jnp.int32))


def non_tokens(vocab: int, params: SamplingParams) -> Array:
    """[vocab] bool: the ids no draw may return (ids >= params.token_limit, and params.reserved)."""
    ids = jnp.arange(vocab, dtype=jnp.int32)
    return (ids >= params.token_limit) | jnp.any(ids[:, None] == params.reserved[None, :], axis=-1)


def mix_logits(ar_logits: Array, diff_logits: Array, beta: Array) -> Array:
    """The verifier's logits `beta * ar + (1 - beta) * diff` (same shapes). beta = 1 gives `ar_logits` bit for bit
    (1 * x + 0 * y == x for finite y)."""
    return beta * ar_logits + (1.0 - beta) * diff_logits


def process_logits(logits: Array, params: SamplingParams) -> Array:
    """Non-tokens out, then temperature, then top-k, then top-p (on the top-k renormalised distribution), HF order.

    logits: [..., vocab] -> float32, same shape: `(logits - m) / temperature`, m the largest logit of a token, with
    `non_tokens` and filtered entries -inf. Shifting first keeps every temperature > 0 finite: the best token is 0,
    a tiny temperature leaves a point mass on it (no overflow to inf, whose softmax is NaN), a huge one a uniform
    distribution over the tokens, and the non-tokens stay -inf (a finite mask logit such as decode's -1e30 divided
    by a huge temperature would come back near 0). Temperatures below float32's smallest normal number act as it.
    Tokens tied with the last kept logit are kept too (so top-k may keep more than k on exact ties). With top_k = 0
    and top_p >= 1 the logits are only shifted and scaled (a `lax.cond` skips the full-vocabulary sort), and
    top_p >= 1 never drops any mass (the float32 running sum reaching 1.0 before the tail does not cut the tail off).
    """
    logits = logits.astype(jnp.float32)
    dropped = non_tokens(logits.shape[-1], params) | (logits == -jnp.inf)
    best = jnp.max(jnp.where(dropped, -jnp.inf, logits), axis=-1, keepdims=True)
    temperature = jnp.maximum(params.temperature, jnp.finfo(jnp.float32).tiny)
    # -inf goes in after the division: XLA may divide by multiplying with 1 / temperature, which is 0 for a huge
    # temperature (flushed denormal), and -inf * 0 is NaN.
    scaled = jnp.where(dropped, -jnp.inf, (logits - best) / temperature)

    def filtered(x: Array) -> Array:
        ordered = -jnp.sort(-x, axis=-1)  # descending
        rank = jnp.arange(x.shape[-1], dtype=jnp.int32)
        keep_k = (params.top_k <= 0) | (rank < params.top_k)
        probs_k = jax.nn.softmax(jnp.where(keep_k, ordered, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs_k, axis=-1) - probs_k
        # The most likely token always survives; top_p >= 1 keeps everything top-k kept.
        keep = keep_k & ((mass_before < params.top_p) | (rank == 0) | (params.top_p >= 1.0))
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(x >= cutoff, x, -jnp.inf)

    filters_on = (params.top_k > 0) | (params.top_p < 1.0)
    return jax.lax.cond(filters_on, filtered, lambda x: x, scaled)


def distribution(logits: Array, params: SamplingParams) -> Array:
    """[..., vocab] logits -> float32 probabilities after `process_logits`."""
    return jax.nn.softmax(process_logits(logits, params), axis=-1)


DRAW_UNIFORMS = 2  # uniforms per `sample` draw: one picks the chunk, one the token within it


def chunk_layout(vocab: int) -> tuple[int, int]:
    """(chunks C, width W) of `sample`'s two-level CDF: W = ceil(sqrt(vocab)), C = ceil(vocab / W), C * W >= vocab
    (the last chunk is zero-padded)."""
    width = max(1, math.isqrt(vocab - 1) + 1) if vocab > 1 else 1
    return -(-vocab // width), width


def chunked_probs(probs: Array) -> tuple[Array, Array]:
    """The two levels `sample` inverts: probs [..., V] -> (chunked [..., C, W] float32, zero-padded; the chunks'
    masses [..., C] float32)."""
    vocab = probs.shape[-1]
    chunks, width = chunk_layout(vocab)
    probs = probs.astype(jnp.float32)
    pad = [(0, 0)] * (probs.ndim - 1) + [(0, chunks * width - vocab)]
    chunked = jnp.pad(probs, pad).reshape(probs.shape[:-1] + (chunks, width))
    return chunked, jnp.sum(chunked, axis=-1)


def inverse_cdf(weights: Array, u: Array) -> Array:
    """One level of `sample`: weights [..., n] >= 0 (some > 0), u [...] in (0, 1] -> int32 [...]: the first index i
    with weights[i] > 0 and cdf[i] >= u * cdf[-1] (cdf = jnp.cumsum(weights)); if rounding leaves none, the last
    index with weights > 0; if none is > 0 (NaN weights, from the NaN logits of broken params), index 0, never the
    last one: `sample`'s last chunk ends in zero padding past the vocabulary. XLA's cumsum is a parallel scan whose
    float32 result need not be monotone, so the weights > 0 test, not the CDF, is what keeps zero-probability
    entries from ever being picked."""
    cdf = jnp.cumsum(weights, axis=-1)
    positive = weights > 0
    hit = positive & (cdf >= u[..., None] * cdf[..., -1:])
    last_positive = weights.shape[-1] - 1 - jnp.argmax(jnp.flip(positive, axis=-1), axis=-1)
    fallback = jnp.where(jnp.any(positive, axis=-1), last_positive, 0)
    return jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), fallback).astype(jnp.int32)


def sample(probs: Array, u: Array) -> Array:
    """Exact inverse-CDF draw at any vocabulary size: probs [..., V] (need not be normalised), u [..., 2] uniforms in
    (0, 1] (`DRAW_UNIFORMS` per draw) -> int32 [...].

    Two levels of ~sqrt(V) entries each (`chunk_layout`): u[..., 0] picks a chunk of W consecutive tokens by the
    chunks' float32 masses, then u[..., 1] the token within it by that chunk's own CDF (`inverse_cdf`). A single
    float32 CDF over V entries cannot represent the distribution: its running sum carries ~1e-7 absolute error per
    entry and a 23-bit uniform resolves 1.2e-7, so at V = 151936 the induced distribution is ~3e-3 from p in total
    variation. Here each level is a short sum whose errors are relative to its own total: ~1.5e-5 at that V
    (tests/test_sampling.py computes the induced distribution exactly). No [..., V] noise and no V-long scan: one
    sum over V, two short cumsums and a gather. Never returns a zero-probability token, nor (even for NaN
    probabilities) an id >= V.
    """
    chunked, chunk_mass = chunked_probs(probs)
    chunk = inverse_cdf(chunk_mass, u[..., 0])
    within = jnp.take_along_axis(chunked, chunk[..., None, None], axis=-2)[..., 0, :]
    return (chunk * chunked.shape[-1] + inverse_cdf(within, u[..., 1])).astype(jnp.int32)


def uniforms(key: Array, shape: tuple[int, ...]) -> Array:
    """Uniform floats in (0, 1] (never 0, which `sample` and `speculative_verify` rely on): multiples of 2^-23.
    Size a draw's share [..., DRAW_UNIFORMS]."""
    return 1.0 - jax.random.uniform(key, shape, jnp.float32)


def accepted_length(matches: Array) -> Array:
    """matches: [batch, K-1] bool (draft v_{j+1} accepted at j) -> [batch] int32 `1 + cumprod(matches).sum()`."""
    return 1 + jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def take_rows(x: Array, index: Array) -> Array:
    """x: [batch, n, ...]; index: [batch] -> x[b, index[b]]: [batch, ...]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(x, index, axis=1)[:, 0]


def greedy_verify(target_logits: Array, drafts: Array) -> tuple[Array, Array]:
    """Greedy verification. target_logits: [batch, K, vocab], row j-1 predicts position L+j (the mixed verifier
    logits after v_1..v_j); drafts: [batch, K] int32.

    t_j = argmax(target_j); a = 1 + cumprod(v_{j+1} == t_j).sum(); returns (a, t_a).
    """
    t = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
    accepted = accepted_length(drafts[:, 1:] == t[:, :-1])
    return accepted, take_rows(t, accepted - 1)


def speculative_verify(target_probs: Array, draft_probs: Array, drafts: Array, u: Array) -> tuple[Array, Array]:
    """Speculative rejection sampling: the committed tokens plus t_a are distributed exactly as sampling from the
    target distributions one token at a time.

    target_probs: [batch, K, vocab] p_j (row j-1 = the verifier's distribution for position L+j);
    draft_probs: [batch, K-1, vocab] q (row j-1 = the distribution v_{j+1} was sampled from); drafts: [batch, K];
    u: [batch, K, DRAW_UNIFORMS] uniforms in (0, 1] (`uniforms`): u[:, :K-1, 0] decide the acceptances, the pair
    u[:, K-1] draws t_a.
    v_{j+1} is accepted with probability min(1, p_j(v) / q(v)); at the first rejection j, t_j ~ normalize(max(0,
    p_j - q)); if every draft passes, t_K ~ p_K. Drafts may be sampled independently of each other (as TiDAR's
    diffusion drafts are): given the accepted prefix, v_{j+1} is still distributed as q_{j+1}, so the proof holds.
    Returns (a [batch] int32, t_a [batch] int32).
    """
    guesses = drafts[:, 1:, None]
    p_guess = jnp.take_along_axis(target_probs[:, :-1], guesses, axis=-1)[..., 0]
    q_guess = jnp.take_along_axis(draft_probs, guesses, axis=-1)[..., 0]
    accepted = accepted_length(u[:, :-1, 0] * q_guess < p_guess)  # P(u < p/q) = min(1, p/q), no division by zero
    # Padding q with a zero row makes the "all accepted" residual exactly p_K.
    q_padded = jnp.concatenate([draft_probs, jnp.zeros_like(target_probs[:, :1])], axis=1)
    p_chosen = take_rows(target_probs, accepted - 1)
    residual = jnp.maximum(take_rows(target_probs - q_padded, accepted - 1), 0.0)
    # A rejection with p == q has probability ~0; fall back to p if rounding ever makes the residual empty.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_chosen)
    return accepted, sample(residual, u[:, -1])  # `sample` normalises
