"""Decoder-only transformer (Qwen2 / Qwen2.5 / Qwen3 / Llama / SmolLM2 family) in Flax NNX.

One forward serves every use: the 2S-token TiDAR training input, prefill and cached decode steps. Positions and the
boolean attention mask are explicit inputs, so the caller decides who sees whom (see `masks.py`). With a KV cache,
keys are `[cache slots | current tokens]` and the first `n_write` current tokens' K/V are written into the cache at a
per-row slot after attention, so mask tokens (placed after them) never enter the cache.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`) in their
`out_sharding` metadata; `sharding.py` maps them to mesh axes. Jitted code stays pure in the split state: use
`nnx.split(model)` once and `forward(graphdef, params, ...)` inside `jax.jit`.

With `adapter_rank > 0` the projections carry mask-gated low-rank adapters (adapters.py): the gate is
`tokens == mask_token_id`, computed here, so real-token rows compute exactly the model without adapters.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tidar_jax.config import ModelConfig, resolve_attention_impl
from tidar_jax.layout.window import with_sliding_window
from tidar_jax.model.adapters import MASK_EMBED
from tidar_jax.model.kv_cache import KVCache
from tidar_jax.model.layer_stacking import stack_modules
from tidar_jax.model.layers import DecoderLayer, RMSNorm, param
from tidar_jax.model.precision import matmul

Array = jax.Array


def remat_policy(cfg: ModelConfig) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy of `model.remat_policy` (None: save nothing but the layer's inputs)."""
    return None if cfg.remat_policy == "full" else getattr(jax.checkpoint_policies, cfg.remat_policy)


def resolved_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with attention_impl=auto replaced by this process's backend's choice (`config.schema.AUTO_ATTENTION_IMPL`);
    explicit choices unchanged. `Transformer` applies it, so the graphdef (and `model.cfg`) names the concrete
    implementation that runs, while configs and checkpoints keep "auto"."""
    return resolve_attention_impl(cfg, jax.default_backend())


class Transformer(nnx.Module):
    """The full model. `__call__` returns float32 logits `[batch, q, vocab]` and the updated cache (or None).

    `self.cfg` is `resolved_config(cfg)`: every entry point that builds a model (create_model, sharding's
    abstract / sharded init, checkpoint loading) gets the concrete attention implementation here, once."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        cfg = resolved_config(cfg)
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.d_model),
                            ("vocab", "embed"), pd)
        # Built one by one in both layouts, so a seed gives the same values whether or not the layers are stacked.
        layers = [DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.n_layers)]
        self.layers = stack_modules(layers) if cfg.scan_layers else nnx.List(layers)
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps, "embed", pd, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.d_model, cfg.vocab_size),
                                  ("embed", "vocab"), pd)
        if cfg.adapter_rank > 0:
            setattr(self, MASK_EMBED, param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.d_model,),
                                             ("embed",), pd))

    def hidden_states(self, tokens: Array, positions: Array, mask: Array, cache: KVCache | None = None,
                      write_start: Array | None = None, n_write: int = 0) -> tuple[Array, KVCache | None]:
        """Final-normed hidden states [batch, q, d_model] (compute dtype) and the updated cache (or None).

        tokens, positions: [batch, q] int32; mask: [batch or 1, q, keys] bool (keys = cache.max_len + q with a
        cache, else q); cache: K/V buffers, stacked iff model.scan_layers (its cursor is not read or moved
        here); write_start: [batch]; n_write: static count of leading tokens whose K/V are written at
        `write_start`. Both layer layouts compute the same function (tests/test_scan_layers.py). With
        model.sliding_window > 0 every layer attends with the windowed mask (layout/window.py).
        """
        cfg = self.cfg
        cd = jnp.dtype(cfg.compute_dtype)
        if cfg.sliding_window > 0:
            mask = with_sliding_window(mask, positions, cfg.sliding_window, None if cache is None else cache.max_len)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(cd)
        gate = None
        if cfg.adapter_rank > 0:
            gate = tokens == cfg.mask_token_id
            x = jnp.where(gate[..., None], getattr(self, MASK_EMBED)[...].astype(cd), x)
        if cfg.scan_layers:
            x, new_cache = self._scanned_layers(x, positions, mask, cache, write_start, n_write, gate)
        else:
            layer_fn = DecoderLayer.__call__
            if cfg.remat:
                layer_fn = nnx.remat(layer_fn, static_argnums=(6,), policy=remat_policy(cfg))
            new_keys, new_values = [], []
            for i, layer in enumerate(self.layers):
                layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
                x, layer_cache = layer_fn(layer, x, positions, mask, layer_cache, write_start, n_write, gate)
                if cache is not None:
                    new_keys.append(layer_cache[0])
                    new_values.append(layer_cache[1])
            new_cache = None if cache is None else cache.replace(keys=tuple(new_keys), values=tuple(new_values))
        return self.final_norm(x), new_cache

    def _scanned_layers(self, x: Array, positions: Array, mask: Array, cache: KVCache | None,
                        write_start: Array | None, n_write: int, gate: Array | None) -> tuple[Array, KVCache | None]:
        """The stacked layers as one `lax.scan` (see `hidden_states`); the cache must be stacked too. Its buffers
        [n_layers, batch, max_len, kv_heads, head_dim] ride in the scan carry, so each layer's slice is updated in
        place in the (donated) buffer rather than collected into a new one."""
        graphdef, stacked = nnx.split(self.layers)

        def layer(state: nnx.State, x: Array, layer_cache: tuple[Array, Array] | None):
            return nnx.merge(graphdef, state)(x, positions, mask, layer_cache, write_start, n_write, gate)

        if self.cfg.remat:
            layer = jax.checkpoint(layer, policy=remat_policy(self.cfg), prevent_cse=False)  # no CSE to undo in a scan
        if cache is None:
            x, _ = jax.lax.scan(lambda h, state: (layer(state, h, None)[0], None), x, stacked)
            return x, None
        if not cache.stacked:
            raise ValueError("a model with model.scan_layers=true needs a stacked KV cache (kv_cache.init_cache)")

        def body(carry, xs):
            h, keys, values = carry
            state, i = xs
            h, (k, v) = layer(state, h, (keys[i], values[i]))
            return (h, jax.lax.dynamic_update_index_in_dim(keys, k, i, 0),
                    jax.lax.dynamic_update_index_in_dim(values, v, i, 0)), None

        (x, keys, values), _ = jax.lax.scan(body, (x, cache.keys, cache.values),
                                            (stacked, jnp.arange(self.cfg.n_layers)))
        return x, cache.replace(keys=keys, values=values)

    def head_weight(self) -> Array:
        """The LM head matrix [d_model, vocab] (the embedding's transpose when tied), in the param dtype."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]

    def logits(self, hidden: Array) -> Array:
        """LM head: hidden [..., d_model] -> float32 logits [..., vocab] (tied to the embedding when configured).

        Applied to any subset of rows it gives exactly those rows of the full-sequence logits, so callers may run
        it only on the rows they read."""
        cd = jnp.dtype(self.cfg.compute_dtype)
        rows = hidden.reshape(1, -1, hidden.shape[-1]).astype(cd)
        if self.cfg.tie_embeddings:  # the embedding as it lies: no transposed copy of it for the CPU kernel
            logits = matmul("bsd,vd->bsv", rows, self.embed[...], out_dtype=jnp.float32)
        else:
            logits = matmul("bsd,dv->bsv", rows, self.lm_head[...], out_dtype=jnp.float32)
        return logits.reshape(hidden.shape[:-1] + logits.shape[-1:])

    def __call__(self, tokens: Array, positions: Array, mask: Array, cache: KVCache | None = None,
                 write_start: Array | None = None, n_write: int = 0) -> tuple[Array, KVCache | None]:
        """`logits(hidden_states(...))`: float32 logits [batch, q, vocab] and the updated cache (or None)."""
        hidden, new_cache = self.hidden_states(tokens, positions, mask, cache, write_start, n_write)
        return self.logits(hidden), new_cache


def create_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """Builds a randomly initialised model on the default device (use `sharding.py` for sharded init)."""
    return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def forward(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, positions: Array, mask: Array,
            cache: KVCache | None = None, write_start: Array | None = None,
            n_write: int = 0) -> tuple[Array, KVCache | None]:
    """Pure forward for use inside `jax.jit`: merges `params` into `graphdef` and calls the model.

    `n_write` must be static (a Python int). See `Transformer.__call__` for shapes.
    """
    model = nnx.merge(graphdef, params)
    return model(tokens, positions, mask, cache, write_start, n_write)


def forward_hidden(graphdef: nnx.GraphDef, params: nnx.State, tokens: Array, positions: Array, mask: Array,
                   cache: KVCache | None = None, write_start: Array | None = None,
                   n_write: int = 0) -> tuple[Array, KVCache | None]:
    """Like `forward` but stops before the LM head: (final-normed hidden [batch, q, d_model], cache or None).
    Pair it with `head_logits` on the rows actually read."""
    model = nnx.merge(graphdef, params)
    return model.hidden_states(tokens, positions, mask, cache, write_start, n_write)


def head_logits(graphdef: nnx.GraphDef, params: nnx.State, hidden: Array) -> Array:
    """LM head of the model: hidden [..., d_model] -> float32 logits [..., vocab] (see `Transformer.logits`)."""
    return nnx.merge(graphdef, params).logits(hidden)


def head_weight(graphdef: nnx.GraphDef, params: nnx.State) -> Array:
    """The LM head matrix [d_model, vocab] of the model (see `Transformer.head_weight`), for `ops.row_ce`."""
    return nnx.merge(graphdef, params).head_weight()


def count_params(params: nnx.State) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
