"""Rotary position embedding (plain, or YaRN-scaled) and Ministral-3's position-dependent query scale.

Both act on explicit positions, so the duplicated positions of a TiDAR decode step (a draft and the proposal slots
at the same position) get exactly the rotation and scale a plain forward gives that position. With the
`ModelConfig` defaults (rope_scaling "none", attention factor 1, query_scale_beta 0) the functions compute exactly
the plain RoPE the model always had: the extra terms are Python-level branches, not multiplications by 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tidar_jax.config import ModelConfig

Array = jax.Array


def _yarn_keep_original(cfg: ModelConfig) -> np.ndarray:
    """[head_dim / 2] float32 in [0, 1]: how much of each frequency stays original (1) rather than interpolated
    (0), YaRN's linear ramp between the dims that rotate `rope_beta_fast` and `rope_beta_slow` times over the
    pre-training context (transformers `_compute_yarn_parameters`: `find_correction_range`, `linear_ramp_factor`)."""
    dim, base, context = cfg.head_dim, cfg.rope_theta, cfg.rope_original_max_len

    def correction_dim(rotations: float) -> float:
        return dim * math.log(context / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a one-dim ramp would divide by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    return (1 - ramp).astype(np.float32)


def inverse_frequencies(cfg: ModelConfig) -> Array:
    """[head_dim / 2] float32 rotation frequencies of `cfg` (plain `theta ** (-2i / head_dim)`, or YaRN's blend)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    if cfg.rope_scaling == "none":
        return inv_freq
    keep = jnp.asarray(_yarn_keep_original(cfg))
    return inv_freq / cfg.rope_factor * (1 - keep) + inv_freq * keep


def rotary_embedding(x: Array, positions: Array, cfg: ModelConfig) -> Array:
    """Applies rotate-half RoPE (HF layout) of `cfg` at explicit positions; cos and sin carry YaRN's attention
    factor when it is not 1.

    x: [batch, seq, heads, head_dim]; positions: [batch, seq] int. Returns x's shape and dtype.
    """
    angles = positions.astype(jnp.float32)[..., None] * inverse_frequencies(cfg)  # [batch, seq, head_dim/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    if cfg.rope_attention_factor != 1.0:
        cos, sin = cos * cfg.rope_attention_factor, sin * cfg.rope_attention_factor
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def scale_queries(q: Array, positions: Array, cfg: ModelConfig) -> Array:
    """Ministral-3's query scale `1 + beta * log(1 + floor(p / query_scale_len))` at each query's position p
    (transformers `get_llama_4_attn_scale`); q unchanged when `query_scale_beta` is 0. Applied to the roped queries
    before attention, so every attention path (XLA, blockwise, the CPU kernel) sees the scaled queries.

    q: [batch, seq, heads, head_dim]; positions: [batch, seq] int. Returns q's shape and dtype.
    """
    if cfg.query_scale_beta == 0:
        return q
    blocks = jnp.floor(positions.astype(jnp.float32) / cfg.query_scale_len)
    scale = 1 + cfg.query_scale_beta * jnp.log(1 + blocks)  # [batch, seq]
    return q * scale[:, :, None, None].astype(q.dtype)
