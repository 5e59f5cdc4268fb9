"""Model construction without allocation (`abstract_model`) and with every parameter created in its mesh sharding
(`init_sharded_model`). Lives beside the model so that the sharding rules never import it."""

from __future__ import annotations

import functools
from typing import Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from tidar_jax.config import ModelConfig
from tidar_jax.model.transformer import Transformer
from tidar_jax.sharding import param_shardings


def abstract_model(model_cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state of ShapeDtypeStructs with logical-name metadata); allocates nothing.

    Uses `jax.eval_shape` rather than `nnx.eval_shape`, which under an active mesh would try to turn the logical
    names into mesh axes.
    """
    graphdefs = []

    def build() -> nnx.State:
        graphdef, state = nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))
        graphdefs.append(graphdef)
        return state

    state = jax.eval_shape(build)
    return graphdefs[0], state


@functools.lru_cache(maxsize=8)
def _jitted_init(model_cfg: ModelConfig, mesh: Mesh, seed: int) -> Callable[[], dict]:
    """The constructor traced under jit with the params' shardings (cached: a second init does not recompile)."""
    shardings = param_shardings(abstract_model(model_cfg, seed)[1], mesh)

    def init() -> dict:
        return nnx.to_pure_dict(nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))[1])

    return jax.jit(init, out_shardings=shardings)


def init_sharded_model(model_cfg: ModelConfig, mesh: Mesh, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Randomly initialised (graphdef, params) with every param created directly in its mesh sharding.

    The values equal `create_model(model_cfg, seed)` on one device up to the last bit (threefry is
    partitionable, so sharding does not change the random bits).
    """
    with jax.set_mesh(mesh):
        pure = _jitted_init(model_cfg, mesh, seed)()
    graphdef, params = abstract_model(model_cfg, seed)
    nnx.replace_by_pure_dict(params, pure)
    return graphdef, params
