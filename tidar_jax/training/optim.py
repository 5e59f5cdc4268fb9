"""AdamW with linear warmup + cosine decay and global-norm clipping, and placement of its state on the mesh.

Weight decay applies to matrices only (ndim >= 2, counted per layer in the stacked layout): norm scales and biases
are not decayed, as in Llama/Qwen training recipes. The optimizer state is laid out like the params (Adam moments
get the param shardings, scalar counters are replicated), because `tx.init` alone would not place it where the
sharded train step expects it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh

from tidar_jax.config import TrainConfig
from tidar_jax.model.layer_stacking import layer_axes
from tidar_jax.sharding import replicated


def learning_rate_schedule(t: TrainConfig) -> Callable[[Any], Any]:
    """step -> learning rate: linear 0 -> `learning_rate` over `warmup_steps`, then cosine down to
    `learning_rate * min_learning_rate_ratio` at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.learning_rate * t.min_learning_rate_ratio)


def _decay_mask(params: Any) -> Any:
    # The rank of one layer's param, so that the stacked layout (model.scan_layers) decays exactly what the
    # unstacked one does.
    return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim - layer_axes(path) >= 2, params)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm (skipped when `grad_clip_norm` is 0), then AdamW on the schedule above."""
    adamw = optax.adamw(learning_rate_schedule(t), b1=t.adam_b1, b2=t.adam_b2, weight_decay=t.weight_decay,
                        mask=_decay_mask)
    if t.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), adamw)
    return adamw


def opt_state_shardings(abstract_opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
    """Shardings for an optimizer state: every sub-tree shaped like the params (Adam mu / nu) gets the params'
    shardings; every other leaf (step counters, empty states) is replicated."""
    params_def = jax.tree.structure(params_shardings)

    def like_params(x: Any) -> bool:
        return jax.tree.structure(x) == params_def

    return jax.tree.map(lambda sub: params_shardings if like_params(sub) else replicated(mesh),
                        abstract_opt_state, is_leaf=like_params)
