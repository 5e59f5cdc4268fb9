"""Attention kernels beyond `jax.nn.dot_product_attention`, each tested against it (tests/test_ops_attention.py).

- `cached_attention`: the current block's queries over a read-only KV cache plus the block itself, merged by a
  shared softmax max instead of concatenating `[cache | current]` (the cached forward's default for
  `model.attention_impl = "xla"`; `"xla_reference"` keeps the concatenating reference path).
"""

from tidar_jax.ops.attention import cached_attention

__all__ = ["cached_attention"]
