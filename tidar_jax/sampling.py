"""Logit processing, sampling and TiDAR draft verification (design.md section 3). Pure, batched, jit-friendly.

Conventions: `logits` / `probs` are float32 `[batch, ..., vocab]`; a draft block is `drafts [batch, K]` =
`v_1 .. v_K`, where v_1 is already decided and v_2..v_K are guesses. Verification returns the accepted length
`a` ([batch] int32, 1 <= a <= K: v_1..v_a are committed) and the next decided token `t_a` ([batch] int32), which
becomes v_1 of the next block.

Per-call knobs live in `SamplingParams` (arrays, so a new temperature never recompiles); whether decoding is greedy
is a static choice of the caller.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class SamplingParams:
    """Traced scalars. beta: weight of the AR logits in the verifier mix (1 = pure AR); temperature > 0 for
    sampling (ignored when greedy); top_k: keep the k most likely tokens (0 = off); top_p: nucleus mass (1 = off)."""

    beta: Array
    temperature: Array
    top_k: Array
    top_p: Array

    @classmethod
    def create(cls, beta: float = 1.0, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0) -> "SamplingParams":
        return cls(beta=jnp.asarray(beta, jnp.float32), temperature=jnp.asarray(temperature, jnp.float32),
                   top_k=jnp.asarray(top_k, jnp.int32), top_p=jnp.asarray(top_p, jnp.float32))


def mix_logits(ar_logits: Array, diff_logits: Array, beta: Array) -> Array:
    """The verifier's logits `beta * ar + (1 - beta) * diff` (same shapes). beta = 1 gives `ar_logits` bit for bit
    (1 * x + 0 * y == x for finite y)."""
    return beta * ar_logits + (1.0 - beta) * diff_logits


def process_logits(logits: Array, params: SamplingParams) -> Array:
    """Temperature, then top-k, then top-p (on the top-k renormalised distribution), HF order.

    logits: [..., vocab] -> same shape, filtered entries set to -inf. Needs temperature > 0. Tokens tied with the
    last kept logit are kept too (so top-k may keep more than k on exact ties).
    """
    scaled = logits.astype(jnp.float32) / params.temperature
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    rank = jnp.arange(scaled.shape[-1], dtype=jnp.int32)
    keep_k = (params.top_k <= 0) | (rank < params.top_k)
    probs_k = jax.nn.softmax(jnp.where(keep_k, ordered, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs_k, axis=-1) - probs_k
    keep = keep_k & ((mass_before < params.top_p) | (rank == 0))  # the most likely token always survives
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def distribution(logits: Array, params: SamplingParams) -> Array:
    """[..., vocab] logits -> float32 probabilities after `process_logits`."""
    return jax.nn.softmax(process_logits(logits, params), axis=-1)


def sample(probs: Array, u: Array) -> Array:
    """Inverse-CDF draw: probs [..., vocab] (need not be normalised), u [...] uniform in (0, 1] -> int32 [...].

    One uniform per draw (no [..., vocab] Gumbel noise, which is costly for large vocabularies and slow to compile
    on CPU). The threshold is u times the last CDF entry, so rounding never selects a zero-probability token.
    """
    cdf = jnp.cumsum(probs.astype(jnp.float32), axis=-1)
    return jnp.argmax(cdf >= u[..., None] * cdf[..., -1:], axis=-1).astype(jnp.int32)


def uniforms(key: Array, shape: tuple[int, ...]) -> Array:
    """Uniform floats in (0, 1] (never 0, which `sample` and `speculative_verify` rely on)."""
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
    u: [batch, K] uniforms in (0, 1] (`uniforms`): u[:, :K-1] decide the acceptances, u[:, K-1] draws t_a.
    v_{j+1} is accepted with probability min(1, p_j(v) / q(v)); at the first rejection j, t_j ~ normalize(max(0,
    p_j - q)); if every draft passes, t_K ~ p_K. Drafts may be sampled independently of each other (as TiDAR's
    diffusion drafts are): given the accepted prefix, v_{j+1} is still distributed as q_{j+1}, so the proof holds.
    Returns (a [batch] int32, t_a [batch] int32).
    """
    guesses = drafts[:, 1:, None]
    p_guess = jnp.take_along_axis(target_probs[:, :-1], guesses, axis=-1)[..., 0]
    q_guess = jnp.take_along_axis(draft_probs, guesses, axis=-1)[..., 0]
    accepted = accepted_length(u[:, :-1] * q_guess < p_guess)  # P(u < p/q) = min(1, p/q), no division by zero
    # Padding q with a zero row makes the "all accepted" residual exactly p_K.
    q_padded = jnp.concatenate([draft_probs, jnp.zeros_like(target_probs[:, :1])], axis=1)
    p_chosen = take_rows(target_probs, accepted - 1)
    residual = jnp.maximum(take_rows(target_probs - q_padded, accepted - 1), 0.0)
    # A rejection with p == q has probability ~0; fall back to p if rounding ever makes the residual empty.
    residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p_chosen)
    return accepted, sample(residual, u[:, -1])  # `sample` normalises
