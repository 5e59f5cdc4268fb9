"""Fixed-shape KV cache: per-layer K and V buffers plus a per-row cursor.

Two forms, one API: a tuple with one [batch, max_len, kv_heads, head_dim] buffer per layer (unrolled layers), or one
stacked [n_layers, batch, max_len, kv_heads, head_dim] buffer each (`model.scan_layers`). Either way `keys[i]` is
layer i's buffer and `jax.tree.map` over `keys` / `values` reaches every buffer.

Slots `[0, cursor[b])` of row b hold committed tokens (their position equals their slot). Writing happens inside the
model forward (`model.py` writes the first `n_write` query tokens at a given slot); committing is moving the cursor,
and rewinding a rejected draft is simply not moving it past the draft, so its K/V is overwritten by the next step.
Buffers should be donated to the jitted step so XLA updates them in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from tidar_jax.config import ModelConfig

Array = jax.Array


@struct.dataclass
class KVCache:
    """keys / values: tuples (one per layer) of [batch, max_len, kv_heads, head_dim], or stacked arrays
    [n_layers, batch, max_len, kv_heads, head_dim]; cursor: [batch] int32."""

    keys: tuple[Array, ...] | Array
    values: tuple[Array, ...] | Array
    cursor: Array

    @property
    def stacked(self) -> bool:
        """Whether the buffers are stacked on a leading layer axis (the `model.scan_layers` form)."""
        return not isinstance(self.keys, tuple)

    @property
    def batch_size(self) -> int:
        return self.cursor.shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]  # layer 0's [batch, max_len, ...] in either form

    def advance(self, accepted: Array) -> "KVCache":
        """Commits `accepted[b]` more slots per row ([batch] int32); the rest of what was written is discarded."""
        return self.replace(cursor=self.cursor + accepted.astype(jnp.int32))

    def rewind_to(self, cursor: Array) -> "KVCache":
        """Sets the committed length per row to `cursor` ([batch]); slots past it become free."""
        return self.replace(cursor=cursor.astype(jnp.int32))

    def valid_slots(self) -> Array:
        """[batch, max_len] bool: which slots hold committed tokens."""
        return jnp.arange(self.max_len, dtype=jnp.int32)[None, :] < self.cursor[:, None]


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype: str | None = None) -> KVCache:
    """Zeroed cache with cursor 0, stacked iff `cfg.scan_layers`. dtype defaults to the model's compute dtype."""
    dt = jnp.dtype(dtype or cfg.compute_dtype)
    shape = (batch_size, max_len, cfg.n_kv_heads, cfg.head_dim)
    if cfg.scan_layers:
        buffers = lambda: jnp.zeros((cfg.n_layers,) + shape, dt)  # noqa: E731
    else:
        buffers = lambda: tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))  # noqa: E731
    return KVCache(keys=buffers(), values=buffers(), cursor=jnp.zeros((batch_size,), jnp.int32))
