"""train.plan: AOT memory figures of the real train step on simulated devices, chunked CE below dense."""

import json
import os
import subprocess
import sys

import jax

from tidar_jax.config import load_config
from train.plan import memory_plan

VOCAB_HEAVY = ["data.seq_len=128", "model.vocab_size=8192", "model.n_layers=1", "train.steps=10"]


def test_chunked_ce_lowers_temp_memory_of_a_vocab_heavy_step(repo_root):
    plans = {c: memory_plan(load_config(f"{repo_root}/configs/tiny.yaml", VOCAB_HEAVY + [f"train.loss_chunk_rows={c}"]),
                            jax.devices()[:2]) for c in (0, 32)}
    for plan in plans.values():
        assert plan["devices"] == 2
        assert all(plan[k] > 0 for k in ("arguments", "outputs", "temp", "total"))
        assert plan["total"] == plan["arguments"] + plan["outputs"] + plan["temp"] - plan["alias"]
    # [batch 8 / 2 devices, 2S = 256, vocab 8192] float32 logits alone are 8 MiB per device, kept for backward
    assert plans[32]["temp"] < plans[0]["temp"] / 2


def test_cli_sets_the_device_count_before_jax_and_prints_json(repo_root):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "train.plan", "--config", "configs/tiny.yaml", "--devices", "4",
                          "--json", "data.seq_len=32", "model.n_layers=1", "train.steps=10"],
                         cwd=repo_root, env=env, capture_output=True, text=True, timeout=300, check=True)
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["devices"] == 4 and plan["mesh"]["data"] == 4
    assert plan["temp"] > 0 and plan["compile_s"] > 0
