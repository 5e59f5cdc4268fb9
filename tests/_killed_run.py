"""Helper for test_train_cli: trains a config in a subprocess and SIGKILLs itself while a checkpoint is being
written asynchronously (right after `Checkpointer.save(kill_step)` returned, before the write is finished).
Trains on the first device only; the caller sets the environment (XLA_FLAGS, matmul precision).

    python tests/_killed_run.py CONFIG.json WORKDIR KILL_STEP
"""

import json
import os
import signal
import sys

import jax

from tidar_jax import trainer
from tidar_jax.config import config_from_dict
from tidar_jax.run_setup import plan_run
from tidar_jax.sharding import make_mesh


def main() -> None:
    config_path, workdir, kill_step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = config_from_dict(json.loads(open(config_path).read()))
    save = trainer.Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        started = save(self, step, *args, **kwargs)
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)  # the async write of `step` is still in flight
        return started

    trainer.Checkpointer.save = save_then_die
    # One device, as the test's reference run uses (same program, so the same bits).
    trainer.train(plan_run(workdir, config=cfg), progress=False, mesh=make_mesh(cfg.mesh, jax.devices()[:1]))
    sys.exit("the run was expected to be killed")


if __name__ == "__main__":
    main()
