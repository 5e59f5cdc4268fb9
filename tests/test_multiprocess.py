"""Two processes on localhost joined by jax.distributed.initialize (CPU collectives "gloo", one CPU device each)
run `python -m train.train --distributed` on one shared workdir and match a single-process run's losses.

Each process feeds its rows p::2 of every global batch (tidar_jax.data.pipeline) into one global array, so the global batch
is a row permutation of the single-process one: losses agree up to float32 summation order (rtol 1e-5).
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tidar_jax.checkpoint.inference import load_for_inference
from tidar_jax.config import MeshConfig, load_config
from tidar_jax.data.pipeline import load_or_train_tokenizer
from tidar_jax.sharding import make_mesh
from tidar_jax.training.loop import train
from tidar_jax.training.metrics_log import read_metrics
from tidar_jax.training.run_setup import plan_run

OVERRIDES = ["data.seq_len=16", "train.steps=3", "train.warmup_steps=1", "train.log_every=1", "train.eval_every=3",
             "train.eval_batches=1", "train.checkpoint_every=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_process(repo_root, tmp_path):
    preset = f"{repo_root}/configs/tiny.yaml"
    tokenizer_dir = tmp_path / "tokenizer"
    load_or_train_tokenizer(load_config(preset)).save(tokenizer_dir / "tokenizer.json")
    overrides = OVERRIDES + [f"data.tokenizer={tokenizer_dir / 'tokenizer.json'}"]

    workdir = tmp_path / "two_processes"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device per process
    env.update(PYTHONPATH=repo_root, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "train.train", "--config", preset, "--workdir", str(workdir), "--no-progress",
         "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
         *overrides], env=env, cwd=repo_root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]

    cfg = load_config(preset, overrides)
    reference = train(plan_run(tmp_path / "one_process", config=cfg), progress=False,
                      mesh=make_mesh(MeshConfig(data=-1), jax.devices()[:1]))
    records = read_metrics(workdir)  # written by process 0 only
    assert [r["step"] for r in records] == [1, 2, 3]
    for got, ref in zip(records, reference.records):
        for key in ("loss", "ar_loss", "diff_loss", "grad_norm", "eval_loss"):
            if key in ref:
                np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, err_msg=f"step {ref['step']} {key}")
    # Both processes took part in one checkpoint, readable by a single process.
    bundle = load_for_inference(workdir)
    assert bundle.step == 3
    for got, ref in zip(jax.tree.leaves(bundle.params), jax.tree.leaves(reference.state["params"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)
