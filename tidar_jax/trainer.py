"""Train state, the jitted sharded train / eval steps, and the training loop.

Train state (the pytree that `checkpoint.Checkpointer` saves): `{"step": int32 [], "params": pure dict of
float arrays, "opt_state": optax state}`; params and Adam moments carry the param shardings, scalars are replicated.

Objectives (`train.objective`):
- `tidar`: the 2S layout `[x | M x S]` with the hybrid mask (masks.training_*), loss `losses.tidar_loss`.
- `ar`: a plain causal forward over the S clean tokens, loss `losses.ar_loss` (the baseline, same code path).

Adaptation (`train.adaptation`): `full` differentiates every parameter; `adapters` differentiates only the mask-gated
adapters (adapters.py) on the diffusion loss computed in two passes (draft_loss.py), the optimizer state covering
the adapters alone, so the base model and its AR output stay bit-identical.

Gradient accumulation splits the global batch into `train.grad_accum_steps` microbatches scanned inside the step.
Each microbatch's loss terms are weighted by its share of the batch's valid targets, so the summed gradient equals
the full-batch gradient of the full-batch loss even when padding is uneven across microbatches.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from tidar_jax import losses, masks
from tidar_jax.adapters import attach_to_base, merge_trainable, split_trainable
from tidar_jax.checkpoint import TOKENIZER_FILE, Checkpointer, load_for_inference, runtime_record, saved_steps
from tidar_jax.config import Config, ConfigError, validate_training
from tidar_jax.data import make_eval_batches, make_train_iterator
from tidar_jax.layer_stacking import to_layout
from tidar_jax.draft_loss import diffusion_metrics
from tidar_jax.metrics_log import MetricsLog
from tidar_jax.model import forward, forward_hidden, head_weight
from tidar_jax.optim import learning_rate_schedule, make_optimizer, opt_state_shardings
from tidar_jax.sharding import (BATCH_AXES, abstract_model, batch_sharding, batch_shards, check_runtime,
                                init_sharded_model, make_global_batch, make_mesh, param_shardings, replicated)
from tidar_jax.run_setup import RunPlan, describe

Array = jax.Array
TrainState = dict  # {"step": Array, "params": dict, "opt_state": optax.OptState}

def objective_metrics(graphdef: nnx.GraphDef, params: dict, tokens: Array, valid: Array, cfg: Config,
                       objective: str) -> dict[str, Array]:
    """One forward of `objective` on tokens, valid: [batch, S]; returns losses.* metrics (scalars, slot acc [K])."""
    m = cfg.model
    batch, seq = tokens.shape
    if objective == "tidar":
        inputs = masks.training_inputs(tokens, m.mask_token_id)
        positions = jnp.broadcast_to(masks.training_positions(seq)[None], inputs.shape)
        mask = masks.tidar_layout_mask(valid, m.block_size)
    else:
        inputs = tokens
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None], (batch, seq))
        mask = masks.causal_layout_mask(valid)
    chunk = cfg.train.loss_chunk_rows
    if chunk > 0:  # CE straight from hidden states, never the full [batch, rows, vocab] logits (ops.row_ce)
        hidden, _ = forward_hidden(graphdef, params, inputs, positions, mask)
        head = head_weight(graphdef, params)
        if objective == "tidar":
            return losses.tidar_loss_from_hidden(hidden, head, tokens, valid, m.block_size, cfg.train.alpha,
                                                 m.compute_dtype, chunk)[1]
        return losses.ar_loss_from_hidden(hidden, head, tokens, valid, m.compute_dtype, chunk)[1]
    logits, _ = forward(graphdef, params, inputs, positions, mask)
    if objective == "tidar":
        return losses.tidar_loss(logits, tokens, valid, m.block_size, cfg.train.alpha)[1]
    return losses.ar_loss(logits, tokens, valid)[1]


def _target_counts(valid: Array) -> tuple[Array, Array]:
    """Valid next-token targets and valid same-position targets of a whole batch (the loss denominators)."""
    v = valid.astype(jnp.float32)
    return jnp.sum(v[:, :-1] * v[:, 1:]), jnp.sum(v)


def weighted_loss(graphdef: nnx.GraphDef, params: dict, tokens: Array, valid: Array, totals: tuple[Array, Array],
                  cfg: Config) -> tuple[Array, dict[str, Array]]:
    """This microbatch's share of the full-batch loss: its mean CE terms scaled by count / batch total.

    Summed over microbatches the terms equal the full-batch `tidar_loss` / `ar_loss` (with one microbatch the
    scale is exactly 1, so the value is bit-identical to calling the loss directly).
    """
    ar_total, diff_total = totals
    if cfg.train.adaptation == "adapters":  # the AR path is frozen: only the drafting loss has a gradient
        metrics = diffusion_metrics(graphdef, params, tokens, valid, cfg.model, cfg.train.loss_chunk_rows)
        diff = metrics["diff_loss"] * (metrics["diff_count"] / jnp.maximum(diff_total, 1.0))
        return diff, {"loss": diff, "diff_loss": diff}
    metrics = objective_metrics(graphdef, params, tokens, valid, cfg, cfg.train.objective)
    ar = metrics["ar_loss"] * (metrics["ar_count"] / jnp.maximum(ar_total, 1.0))
    if cfg.train.objective == "ar":
        return ar, {"loss": ar, "ar_loss": ar}
    diff = metrics["diff_loss"] * (metrics["diff_count"] / jnp.maximum(diff_total, 1.0))
    alpha = cfg.train.alpha
    loss = (alpha * ar + diff) / (1.0 + alpha)
    return loss, {"loss": loss, "ar_loss": ar, "diff_loss": diff}


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
        totals = _target_counts(batch["valid"])
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


# --------------------------------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class TrainResult:
    """What `train` leaves behind besides the files: the final state (on the mesh), the step it reached, and the
    records it wrote to metrics.jsonl during this call."""

    state: TrainState
    step: int
    records: list[dict]


def _prepare_workdir(plan: RunPlan) -> None:
    """Creates WORKDIR and, on process 0, writes the run's tokenizer and the files carried from the init
    checkpoint (chat template, ...), never overwriting a file already there."""
    plan.workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() != 0:
        return
    if not (plan.workdir / TOKENIZER_FILE).exists():
        plan.tokenizer.save(plan.workdir / TOKENIZER_FILE)
    for src in plan.carried_files:
        if not (plan.workdir / src.name).exists():
            shutil.copyfile(src, plan.workdir / src.name)


def evaluate(trainer: Trainer, params: dict, batches: list[dict]) -> dict[str, Any]:
    """Held-out metrics over `batches` (global, sharded): losses and accuracies weighted by their target counts,
    `eval_loss` combining the two losses with train.alpha, `eval_slot_accuracy` [K] (mean over batches)."""
    sums: dict[str, Any] = {}
    for batch in batches:
        m = jax.device_get(trainer.eval_step(params, batch))
        for key, count in (("ar_loss", "ar_count"), ("ar_accuracy", "ar_count"), ("diff_loss", "diff_count"),
                           ("diff_accuracy", "diff_count"), ("diff_slot_accuracy", "diff_count")):
            sums[key] = sums.get(key, 0.0) + m[key] * m[count]
        for count in ("ar_count", "diff_count"):
            sums[count] = sums.get(count, 0.0) + m[count]
    out = {f"eval_{k}": sums[k] / max(sums[c], 1.0) for k, c in (
        ("ar_loss", "ar_count"), ("ar_accuracy", "ar_count"), ("diff_loss", "diff_count"),
        ("diff_accuracy", "diff_count"))}
    out["eval_slot_accuracy"] = sums["diff_slot_accuracy"] / max(sums["diff_count"], 1.0)
    alpha = trainer.cfg.train.alpha
    out["eval_loss"] = (alpha * out["eval_ar_loss"] + out["eval_diff_loss"]) / (1.0 + alpha)
    return out


def train(plan: RunPlan, *, stop_at_step: int | None = None, progress: bool = True,
          mesh: Mesh | None = None) -> TrainResult:
    """Trains the resolved run `plan` (run_setup.plan_run) in its WORKDIR, resuming from the latest checkpoint
    when there is one.

    Writes WORKDIR/tokenizer.json (and the init checkpoint's chat template files), WORKDIR/metrics.jsonl (process
    0) and WORKDIR/checkpoints/<step> every train.checkpoint_every steps and at the end (train state +
    data-iterator state + config). A resumed run continues with the exact data order and reaches the same state
    as an uninterrupted one. `stop_at_step` ends (with a checkpoint) before train.steps, as a preempted job
    would; the LR schedule still spans train.steps. Everything that can fail on bad input (init checkpoint, data)
    runs before WORKDIR is created or changed.
    """
    cfg, workdir = plan.config, plan.workdir
    t = cfg.train
    end_step = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
    start = plan.step if plan.step is not None else (saved_steps(workdir) or [None])[-1]
    if start is not None and end_step < start:
        until = f"--stop-at-step {stop_at_step}" if end_step < t.steps else f"train.steps={t.steps}"
        raise ConfigError(f"{workdir} is already at step {start}, past {until}: nothing to train (raise "
                          "train.steps to continue the run)")
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    trainer = trainer_for(cfg, mesh)
    init_params = None if plan.resume or plan.init_dir is None else load_for_inference(
        plan.init_dir, mesh, scan_layers=cfg.model.scan_layers).params
    pid, pcount = jax.process_index(), jax.process_count()
    train_iter = make_train_iterator(cfg, plan.tokenizer, pid, pcount)
    eval_batches = [make_global_batch(b, mesh) for b in make_eval_batches(cfg, plan.tokenizer, t.eval_batches,
                                                                           pid, pcount)]
    _prepare_workdir(plan)
    checkpointer = Checkpointer(workdir, keep=t.keep_checkpoints)
    log = MetricsLog(workdir, enabled=pid == 0)
    try:
        if start is None:
            start, state = 0, trainer.init_state(init_params)
        else:
            state, data_state, _ = checkpointer.restore(trainer.abstract_state, start)
            if data_state is None:
                raise ConfigError(f"checkpoint step {start} in {workdir} has no data-iterator state, so the run "
                                  "cannot resume its data order (was it written by save_inference_checkpoint? "
                                  "use it as train.init_from instead)")
            train_iter.set_state(data_state)
        # Records past the start step come from an attempt that died before saving them (every record of a
        # run killed before its first save): they are recomputed, so drop them rather than log them twice.
        log.truncate_after(start)
        if pid == 0:
            print(f"{describe(plan, start)}; training to step {end_step} of {t.steps}; attention "
                  f"{trainer.runtime['attention_impl']} (model.attention_impl={cfg.model.attention_impl} on "
                  f"{trainer.runtime['backend']})", file=sys.stderr)
        return _loop(cfg, trainer, state, start, end_step, train_iter, eval_batches, checkpointer, log, progress)
    finally:
        checkpointer.close()
        log.close()


def _loop(cfg: Config, trainer: Trainer, state: TrainState, start: int, end_step: int, train_iter: Any,
          eval_batches: list, checkpointer: Checkpointer, log: MetricsLog, progress: bool) -> TrainResult:
    t, mesh = cfg.train, trainer.mesh
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    records: list[dict] = []
    bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    last_time, last_step = time.perf_counter(), start
    step = start
    with jax.set_mesh(mesh):
        while step < end_step:
            state, metrics = trainer.train_step(state, make_global_batch(next(train_iter), mesh))
            step += 1
            bar.update(1)
            record: dict[str, Any] = {}
            if step == start + 1:  # the first step compiles: leave it out of every throughput figure
                jax.block_until_ready(metrics)
                last_time, last_step = time.perf_counter(), step
            if step % t.log_every == 0 or step == end_step:
                record.update(jax.device_get(metrics))  # waits for the step: the timing below is honest
                now = time.perf_counter()
                if step > last_step:
                    record["tokens_per_s"] = tokens_per_step * (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                shown = {name: f"{record[key]:.{digits}f}" for name, key, digits in
                         (("loss", "loss", 4), ("ar", "ar_loss", 4), ("diff", "diff_loss", 4),
                          ("tok_s", "tokens_per_s", 0)) if key in record}
                bar.set_postfix(**shown)
            if eval_batches and (step % t.eval_every == 0 or step == end_step):
                record.update(evaluate(trainer, state["params"], eval_batches))
                last_time = time.perf_counter()  # eval time is not training throughput
            if record:
                records.append(log.write(step, record))
            if step % t.checkpoint_every == 0 or step == end_step:
                checkpointer.save(step, state, train_iter.get_state(), cfg, runtime=trainer.runtime)
    bar.close()
    checkpointer.wait()
    return TrainResult(state=state, step=step, records=records)
