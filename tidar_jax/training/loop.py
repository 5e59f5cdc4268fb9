"""The training loop: a resolved run (run_setup.RunPlan) assembled into the pieces it needs (mesh, Trainer,
state, data iterators, checkpointer, metrics log), then trained step by step with logging, held-out evaluation
and checkpoints; a resumed run continues with the exact data order."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm.auto import tqdm

from tidar_jax.checkpoint.inference import load_for_inference
from tidar_jax.checkpoint.store import TOKENIZER_FILE, Checkpointer, saved_steps
from tidar_jax.config import Config, ConfigError
from tidar_jax.data.pipeline import make_eval_batches, make_train_iterator
from tidar_jax.sharding import make_global_batch, make_mesh
from tidar_jax.training.metrics_log import MetricsLog
from tidar_jax.training.run_setup import RunPlan, describe
from tidar_jax.training.trainer import Trainer, TrainState, trainer_for
from tidar_jax.workdir_lock import WorkdirBusy, workdir_lock


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


@dataclasses.dataclass
class TrainingRun:
    """What one training call drives, assembled once from the resolved run: the compiled steps on their mesh, the
    state to continue from (at step `start`), the data iterators, and the run's checkpointer and metrics log."""

    config: Config
    trainer: Trainer
    state: TrainState
    start: int
    end_step: int
    train_iter: Any
    eval_batches: list[dict]
    checkpointer: Checkpointer
    log: MetricsLog


def train(plan: RunPlan, *, stop_at_step: int | None = None, progress: bool = True,
          mesh: Mesh | None = None) -> TrainResult:
    """Trains the resolved run `plan` (run_setup.plan_run) in its WORKDIR, resuming from the latest checkpoint
    when there is one.

    Writes WORKDIR/tokenizer.json (and the init checkpoint's chat template files), WORKDIR/metrics.jsonl (process
    0) and WORKDIR/checkpoints/<step> every train.checkpoint_every steps and at the end (train state +
    data-iterator state + config). A resumed run continues with the exact data order and reaches the same state
    as an uninterrupted one. `stop_at_step` ends (with a checkpoint) before train.steps, as a preempted job
    would; the LR schedule still spans train.steps. Everything that can fail on bad input (init checkpoint, data)
    runs before WORKDIR is changed. The call holds WORKDIR's lock (`workdir_lock`): a second run on it is refused
    with `WorkdirBusy` naming the holder, before this one reads its steps or writes anything (a WORKDIR the lock
    had to create is removed again if the run fails before writing into it).
    """
    with _locked(plan.workdir):
        return _train(plan, stop_at_step, progress, mesh)


@contextlib.contextmanager
def _locked(workdir: Path):
    """Holds WORKDIR's lock for the whole job. Process 0 alone takes it (every process of a multi-host job shares
    WORKDIR, and only process 0 writes its files besides Orbax's own coordinated ones); the others learn from it
    whether it succeeded, so a refused job stops on every host instead of hanging in its first collective."""
    lock, refusal = workdir_lock(workdir), None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except ConfigError as e:  # WorkdirBusy, or a place where the lock file cannot be made
            refusal = e
    refused = refusal is not None
    if jax.process_count() > 1:  # every process takes part in the broadcast, process 0 included
        refused = bool(multihost_utils.broadcast_one_to_all(np.int32(refused)))
    if refused and refusal is None:
        refusal = WorkdirBusy(f"process 0 of this job could not take the lock of {workdir} (in use by another run?)")
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        lock.release()


def _train(plan: RunPlan, stop_at_step: int | None, progress: bool, mesh: Mesh | None) -> TrainResult:
    cfg, workdir = plan.config, plan.workdir
    t = cfg.train
    end_step = t.steps if stop_at_step is None else min(stop_at_step, t.steps)
    start = plan.step if plan.step is not None else (saved_steps(workdir) or [None])[-1]
    if start is not None and not plan.resume:  # the plan was resolved before this run held the lock
        raise ConfigError(f"{workdir} gained checkpoints from another run while this one was starting; start it "
                          "again to check them against its config")
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
        run = TrainingRun(cfg, trainer, state, start, end_step, train_iter, eval_batches, checkpointer, log)
        return _loop(run, progress)
    finally:
        checkpointer.close()
        log.close()


def _loop(run: TrainingRun, progress: bool) -> TrainResult:
    cfg, trainer, state, start, end_step = run.config, run.trainer, run.state, run.start, run.end_step
    t, mesh = cfg.train, trainer.mesh
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    records: list[dict] = []
    bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not progress or jax.process_index() != 0)
    last_time, last_step = time.perf_counter(), start
    step = start
    with jax.set_mesh(mesh):
        while step < end_step:
            state, metrics = trainer.train_step(state, make_global_batch(next(run.train_iter), mesh))
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
            if run.eval_batches and (step % t.eval_every == 0 or step == end_step):
                record.update(evaluate(trainer, state["params"], run.eval_batches))
                last_time = time.perf_counter()  # eval time is not training throughput
            if record:
                records.append(run.log.write(step, record))
            if step % t.checkpoint_every == 0 or step == end_step:
                run.checkpointer.save(step, state, run.train_iter.get_state(), cfg, runtime=trainer.runtime)
    bar.close()
    run.checkpointer.wait()
    return TrainResult(state=state, step=step, records=records)
