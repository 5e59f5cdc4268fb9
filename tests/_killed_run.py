"""Helper for test_train_cli: trains a config in a subprocess that SIGKILLs itself at a named point of step STEP.
Trains on the first device only; the caller sets the environment (XLA_FLAGS, matmul precision).

    python tests/_killed_run.py CONFIG.json WORKDIR POINT STEP

Every point is reached deterministically (hooks on the code path, no timing):
- batch_drawn: step STEP's batch has been drawn from the data iterator, its update not yet computed;
- logged: step STEP is computed and its record appended to metrics.jsonl (nothing saved for it yet);
  for these two, every save waits until it is on disk, so exactly the saves before STEP exist;
- save_in_flight: `Checkpointer.save(STEP)` has returned while the asynchronous write is held before its first item
  (the train state) is committed, so the process dies in the middle of the save;
- save_uncommitted: the background writer has committed every item of STEP but not yet renamed the step directory
  into place (the last moment before the save counts);
- save_committed: the background writer has just renamed STEP into place (the save is complete on disk).
"""

import json
import os
import signal
import sys
import threading

import jax
from orbax.checkpoint._src.path import atomicity

from tidar_jax.config import config_from_dict
from tidar_jax.sharding import make_mesh
from tidar_jax.training import loop
from tidar_jax.training.run_setup import plan_run

POINTS = ("batch_drawn", "logged", "save_in_flight", "save_uncommitted", "save_committed")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _KillingIterator:
    """The training iterator, dying right after it hands out the batch of step `step` (its `step`-th batch)."""

    def __init__(self, inner, step: int):
        self.inner, self.step, self.drawn = inner, step, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.drawn += 1
        if self.drawn == self.step:
            die()
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _saves_complete_at_once() -> None:
    save = loop.Checkpointer.save

    def save_and_wait(self, *args, **kwargs):
        started = save(self, *args, **kwargs)
        self.wait()
        return started
    loop.Checkpointer.save = save_and_wait


def install(point: str, step: int) -> None:
    """Patches the hook of `point` (see the module docstring)."""
    if point in ("batch_drawn", "logged"):
        _saves_complete_at_once()
    if point == "batch_drawn":
        make = loop.make_train_iterator
        loop.make_train_iterator = lambda *a, **k: _KillingIterator(make(*a, **k), step)
    elif point == "logged":
        write = loop.MetricsLog.write

        def write_then_die(self, at, metrics):
            record = write(self, at, metrics)
            if at == step:
                die()
            return record
        loop.MetricsLog.write = write_then_die
    elif point == "save_in_flight":
        save, finalize = loop.Checkpointer.save, atomicity.AtomicRenameTemporaryPath.finalize

        def save_then_die(self, at, *args, **kwargs):
            started = save(self, at, *args, **kwargs)
            if at == step:
                die()
            return started

        async def hold_state_item(self):  # the write of STEP never gets past its first item
            if self._final_path.name == "state" and self._final_path.parent.name.startswith(f"{step}."):
                threading.Event().wait()
            return await finalize(self)
        loop.Checkpointer.save = save_then_die
        atomicity.AtomicRenameTemporaryPath.finalize = hold_state_item
    elif point in ("save_uncommitted", "save_committed"):
        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize_step(self):
            is_step = self._final_path.name == str(step) and self._final_path.parent.name == "checkpoints"
            if is_step and point == "save_uncommitted":
                die()
            result = await finalize(self)
            if is_step:
                die()
            return result
        atomicity.AtomicRenameTemporaryPath.finalize = finalize_step
    else:
        sys.exit(f"unknown kill point {point!r}; expected one of {POINTS}")


def main() -> None:
    config_path, workdir, point, step = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    cfg = config_from_dict(json.loads(open(config_path).read()))
    install(point, step)
    # One device, as the test's reference run uses (same program, so the same bits).
    loop.train(plan_run(workdir, config=cfg), progress=False, mesh=make_mesh(cfg.mesh, jax.devices()[:1]))
    sys.exit("the run was expected to be killed")


if __name__ == "__main__":
    main()
