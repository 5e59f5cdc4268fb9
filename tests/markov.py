"""Shared test models: tiny transformers with scaled random weights, or trained for a few seconds on a Markov chain.

The chain (states 3..10, each going to its main successor with probability 0.9, else to a side successor) is
predictable enough that a briefly trained model's drafts are often right, so multi-token decode steps happen.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tidar_jax.layout import masks
from tidar_jax.model.transformer import create_model, forward
from tidar_jax.training import losses

CHAIN_STATES = np.arange(3, 11)
MAIN_PROB = 0.9
_PERMUTE = np.random.default_rng(0).permutation
SUCCESSORS = np.stack([_PERMUTE(CHAIN_STATES), _PERMUTE(CHAIN_STATES)], 1)  # [state, (main, side)]
TRAIN_SEQ_LEN = 16


def markov_chain(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """[batch, length] int32 samples of the chain."""
    out = np.zeros((batch, length), np.int32)
    out[:, 0] = rng.choice(CHAIN_STATES, batch)
    for i in range(1, length):
        side = (rng.random(batch) > MAIN_PROB).astype(int)
        out[:, i] = SUCCESSORS[out[:, i - 1] - CHAIN_STATES[0], side]
    return out


def scaled_random_model(model_cfg, seed: int, scale: float = 15.0):
    """(graphdef, params) with matrices scaled up from init_std 0.02, so greedy outputs are not just a repeat of
    the last token."""
    graphdef, params = nnx.split(create_model(model_cfg, seed=seed))
    return graphdef, jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x, params)


@functools.lru_cache(maxsize=None)
def trained_model(model_cfg, objective: str, seed: int, steps: int):
    """(graphdef, params) after `steps` Adam steps on the chain, with the joint TiDAR loss (`objective="tidar"`,
    block size model_cfg.block_size) or the next-token loss (`"ar"`). Cached: several test modules train the same
    model (the arrays are immutable)."""
    graphdef, params = nnx.split(create_model(model_cfg, seed=seed))
    tx, rng, seq = optax.adam(1e-2), np.random.default_rng(seed), TRAIN_SEQ_LEN

    def loss_fn(p, tokens):
        valid = jnp.ones(tokens.shape, bool)
        if objective == "ar":
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), tokens.shape)
            logits, _ = forward(graphdef, p, tokens, positions, masks.causal_mask(seq)[None])
            return losses.ar_loss(logits, tokens, valid)[0]
        inputs = masks.training_inputs(tokens, model_cfg.mask_token_id)
        positions = jnp.broadcast_to(masks.training_positions(seq), inputs.shape)
        logits, _ = forward(graphdef, p, inputs, positions, masks.training_mask(seq, model_cfg.block_size)[None])
        return losses.tidar_loss(logits, tokens, valid, model_cfg.block_size)[0]

    @jax.jit
    def step(params, opt_state, tokens):
        updates, opt_state = tx.update(jax.grad(loss_fn)(params, tokens), opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(steps):
        params, opt_state = step(params, opt_state, markov_chain(rng, 32, seq))
    return graphdef, params
