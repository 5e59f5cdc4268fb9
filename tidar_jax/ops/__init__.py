"""Attention kernels beyond `jax.nn.dot_product_attention`, each tested against it (tests/test_ops_attention.py).

`model.attention_impl` picks among them; its default `"auto"` is resolved per backend when the model is built
(`config.schema.AUTO_ATTENTION_IMPL`: `"blockwise"` on CPU and GPU, `"splash"` on TPU, `"xla"` elsewhere).

- `cached_attention`: the current block's queries over a read-only KV cache plus the block itself, merged by a
  shared softmax max instead of concatenating `[cache | current]` (the cached forward's default for
  `model.attention_impl = "xla"`; `"xla_reference"` keeps the concatenating reference path).
- `blockwise_attention`: flash-style attention for the training layouts (`masks.TrainingLayout`), fully masked
  tiles skipped, no [T, T] array, custom VJP (`model.attention_impl = "blockwise"`, tests/test_ops_blockwise.py).
- `splash_attention`: TPU Pallas Splash attention with the training layout as a computable mask, under `shard_map`
  when a mesh is set (`model.attention_impl = "splash"`; interpret mode off TPU, tests/test_ops_splash.py).
- `hybrid_attention`: GPU training attention: the causal clean half through cuDNN flash attention (one fused
  `jax.nn.dot_product_attention` call with suffix key padding; blockwise when the padding is not a suffix), the mask
  half through `blockwise_attention` (`model.attention_impl = "cudnn_hybrid"`; the XLA kernel in place of cuDNN on
  CPU, tests/test_ops_hybrid.py).
- `row_ce`: per-row cross-entropy / top-1 hits from hidden states and the head weight, chunked over rows so the
  full logits are never held (tests/test_chunked_ce.py).
- `cpu_kernels`: C++ CPU kernels as XLA FFI calls, compiled on first use: the cached attention that
  `cached_attention` runs on the CPU by default, and the matrix-vector product `precision.matmul` runs for 1-2-row
  projections (tests/test_cpu_kernels.py).
"""

from tidar_jax.ops.attention import cached_attention
from tidar_jax.ops.blockwise import blockwise_attention
from tidar_jax.ops.chunked_ce import row_ce
from tidar_jax.ops.hybrid import hybrid_attention
from tidar_jax.ops.splash import splash_attention

__all__ = ["blockwise_attention", "cached_attention", "hybrid_attention", "row_ce", "splash_attention"]
