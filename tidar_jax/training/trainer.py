"""The compiled, sharded train and eval steps of one config on one mesh, and the train state they update.

Train state (the pytree that `checkpoint.Checkpointer` saves): `{"step": int32 [], "params": pure dict of
float arrays, "opt_state": optax state}`; params and Adam moments carry the param shardings, scalars are replicated.
The objective itself (layouts, losses) is objective.py; the loop that drives these steps is loop.py.

Adaptation (`train.adaptation`): `full` differentiates every parameter; `adapters` differentiates only the mask-gated
adapters (model/adapters.py) on the diffusion loss computed in two passes (draft_loss.py), the optimizer state
covering the adapters alone, so the base model and its AR output stay bit-identical.

Gradient accumulation splits the global batch into `train.grad_accum_steps` microbatches scanned inside the step.
Each microbatch's loss terms are weighted by its share of the batch's valid targets, so the summed gradient equals
the full-batch gradient of the full-batch loss even when padding is uneven across microbatches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tidar_jax.checkpoint.store import runtime_record
from tidar_jax.config import Config, ConfigError, validate_training
from tidar_jax.model.adapters import attach_to_base, merge_trainable, split_trainable
from tidar_jax.model.init import abstract_model, init_sharded_model
from tidar_jax.model.layer_stacking import to_layout
from tidar_jax.sharding import BATCH_AXES, batch_sharding, batch_shards, check_runtime, param_shardings, replicated
from tidar_jax.training.objective import objective_metrics, target_counts, weighted_loss
from tidar_jax.training.optim import learning_rate_schedule, make_optimizer, opt_state_shardings

Array = jax.Array
TrainState = dict  # {"step": Array, "params": dict, "opt_state": optax.OptState}

class Trainer:
    """The compiled steps of one config on one mesh.

    `train_step(state, batch) -> (state, metrics)`: jitted once with in/out shardings, the state donated;
    batch = {"tokens": int32 [global_batch, S], "valid": bool [global_batch, S]} sharded by `batch_sharding`;
    metrics = replicated scalars `loss`, `ar_loss` (not with adapters), `diff_loss` (tidar objective), `grad_norm`
    (pre-clip global norm of what trains) and `lr` (the rate applied in this update). With adapters the optimizer
    state covers only the adapter leaves (`split_trainable`), the frozen params pass through unchanged.
    `eval_step(params, batch) -> metrics`: TiDAR-layout forward (for either objective, so runs are comparable):
    `ar_loss, diff_loss, ar_accuracy, diff_accuracy, ar_count, diff_count` and `diff_slot_accuracy` [K].
    """

    def __init__(self, cfg: Config, mesh: Mesh):
        t = cfg.train
        validate_training(cfg)
        check_runtime(cfg.model, mesh.shape["tensor"])
        micro = cfg.data.global_batch_size // t.grad_accum_steps
        if micro % batch_shards(mesh):
            raise ConfigError(
                f"the microbatch (data.global_batch_size {cfg.data.global_batch_size} / train.grad_accum_steps "
                f"{t.grad_accum_steps} = {micro}) must be a multiple of mesh data x fsdp = {batch_shards(mesh)}")
        self.cfg, self.mesh = cfg, mesh
        self.runtime = runtime_record(cfg.model)  # the concrete attention_impl, saved with every checkpoint
        self.adapters = t.adaptation == "adapters"
        self.graphdef, abstract = abstract_model(cfg.model, t.seed)
        self.tx = make_optimizer(t)
        self.schedule = learning_rate_schedule(t)
        self.param_shardings = param_shardings(abstract, mesh)
        abstract_params = nnx.to_pure_dict(abstract)
        abstract_opt = jax.eval_shape(self.tx.init, self._trained(abstract_params))
        self.state_shardings: TrainState = {
            "step": replicated(mesh), "params": self.param_shardings,
            "opt_state": opt_state_shardings(abstract_opt, self._trained(self.param_shardings), mesh)}
        abstract_state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                          "opt_state": abstract_opt}
        self.abstract_state: TrainState = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, self.state_shardings)
        self.batch_sharding = batch_sharding(mesh)
        self._micro_sharding = NamedSharding(mesh, P(None, BATCH_AXES))
        self.train_step: Callable[[TrainState, dict], tuple[TrainState, dict]] = jax.jit(
            self._train_step, in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated(mesh)), donate_argnums=0)
        self.eval_step: Callable[[dict, dict], dict] = jax.jit(
            self._eval_step, in_shardings=(self.param_shardings, self.batch_sharding), out_shardings=replicated(mesh))
        self._init_opt = jax.jit(lambda p: self.tx.init(self._trained(p)),
                                 out_shardings=self.state_shardings["opt_state"])

    def _trained(self, tree: Any) -> Any:
        """The part of a params-shaped tree that trains: all of it, or the adapter leaves (others None)."""
        return split_trainable(tree)[0] if self.adapters else tree

    # ----------------------------------------------------------------------------------------------- state
    def init_state(self, params: dict | nnx.State | None = None) -> TrainState:
        """A step-0 state: fresh sharded params (seed `train.seed`) or `params` (e.g. a loaded checkpoint, any
        placement, either layer layout; moved to the param shardings), and a zero optimizer state placed like the
        trained params.
        With adapters, `params` may be those of the base model alone: fresh adapters are attached to it."""
        fresh = None
        if params is None or self.cfg.model.adapter_rank > 0:
            fresh = nnx.to_pure_dict(init_sharded_model(self.cfg.model, self.mesh, self.cfg.train.seed)[1])
        params = fresh if params is None else params
        if isinstance(params, nnx.State):
            params = nnx.to_pure_dict(params)
        params = to_layout(params, self.cfg.model.scan_layers)  # either layer layout may come in
        expected = jax.tree.structure(self.param_shardings)
        if fresh is not None and jax.tree.structure(params) != expected:
            try:
                params = attach_to_base(params, fresh, self.cfg.model.mask_token_id)
            except ValueError as e:
                raise ConfigError(f"initial params do not fit the adapted model: {e}") from None
        if jax.tree.structure(params) != expected:
            raise ConfigError("initial params do not match model config: tree structure differs "
                              f"(got {jax.tree.structure(params)}, expected {expected})")
        for (path, p), a in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(self.abstract_state["params"])):
            if p.shape != a.shape:
                raise ConfigError(f"initial param {jax.tree_util.keystr(path)} has shape {p.shape}, the model "
                                  f"config needs {a.shape}")
        params = jax.device_put(jax.tree.map(lambda p, a: p.astype(a.dtype), params, self.abstract_state["params"]),
                                self.param_shardings)
        with jax.set_mesh(self.mesh):
            opt_state = self._init_opt(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
        return {"step": step, "params": params, "opt_state": opt_state}

    # ----------------------------------------------------------------------------------------------- steps
    def _microbatches(self, x: Array) -> Array:
        """[B, ...] -> [A, B/A, ...]; microbatch k = rows k, k+A, ... so each device keeps its own rows."""
        a = self.cfg.train.grad_accum_steps
        x = x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, self._micro_sharding)

    def loss_and_grads(self, params: dict, batch: dict) -> tuple[dict, dict]:
        """(float32 gradient of the full-batch loss w.r.t. the trained params (`_trained(params)`'s layout), {loss,
        ar_loss / diff_loss}), accumulated over `train.grad_accum_steps` microbatches with `lax.scan` (pure; call
        inside jit)."""
        totals = target_counts(batch["valid"])
        trained, frozen = split_trainable(params) if self.adapters else (params, None)
        build = (lambda w: merge_trainable(w, frozen)) if self.adapters else (lambda w: w)
        grad_fn = jax.value_and_grad(
            lambda w, tok, val: weighted_loss(self.graphdef, build(w), tok, val, totals, self.cfg), has_aux=True)

        def accumulate(grad_sum, micro):
            (_, terms), grads = grad_fn(trained, *micro)
            return jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads), terms

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
        grads, terms = jax.lax.scan(
            accumulate, zeros, (self._microbatches(batch["tokens"]), self._microbatches(batch["valid"])))
        return grads, {k: jnp.sum(v) for k, v in terms.items()}

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        params = state["params"]
        grads, metrics = self.loss_and_grads(params, batch)
        trained = self._trained(params)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trained)
        updates, opt_state = self.tx.update(grads, state["opt_state"], trained)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["lr"] = jnp.asarray(self.schedule(state["step"]), jnp.float32)
        updated = optax.apply_updates(trained, updates)
        if self.adapters:
            updated = merge_trainable(updated, split_trainable(params)[1])
        new_state = {"step": state["step"] + 1, "params": updated, "opt_state": opt_state}
        return new_state, metrics

    def _eval_step(self, params: dict, batch: dict) -> dict:
        return objective_metrics(self.graphdef, params, batch["tokens"], batch["valid"], self.cfg, "tidar")


# Fields that never reach the compiled steps: runs differing only in these share one Trainer.
_BOOKKEEPING = {"train": ("log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                          "init_from"),
                "data": ("corpus", "paths", "tokenizer", "holdout_fraction", "worker_count", "separator_token_id",
                         "tokenizer_sha256")}


def trainer_for(cfg: Config, mesh: Mesh) -> Trainer:
    """One Trainer per (compiled-program config, mesh): training a config again in this process (a resume, a
    notebook, tests) reuses the compiled steps instead of compiling them anew. Its `cfg` has bookkeeping fields
    (logging, checkpoint cadence, data source, init_from) at their defaults: read those from the run's config."""
    defaults = Config()
    program = dataclasses.replace(cfg, decode=defaults.decode, mesh=defaults.mesh, **{
        section: dataclasses.replace(getattr(cfg, section), **{f: getattr(getattr(defaults, section), f)
                                                               for f in fields})
        for section, fields in _BOOKKEEPING.items()})
    return _cached_trainer(program, mesh)


@functools.lru_cache(maxsize=4)
def _cached_trainer(cfg: Config, mesh: Mesh) -> Trainer:
    return Trainer(cfg, mesh)
