"""Bad inputs to the CLIs: each row runs one CLI as a subprocess and expects exit code 2, no traceback, and a
one-line message naming the offending flag / field / path. One tiny checkpoint (configs/tiny.yaml, 2 steps) per
module; its step 2 is then damaged to check the corrupt-checkpoint message."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # ~2 min on 2 busy CPU cores: one subprocess (jax start-up) per row

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny run with steps 1 and 2, whose step 2 then loses its state (a corrupt latest save)."""
    work = tmp_path_factory.mktemp("cli") / "run"
    r = _run("train.train", "--config", "configs/tiny.yaml", "--workdir", str(work), "train.steps=2",
             "train.checkpoint_every=1", "--no-progress")
    assert r.returncode == 0, r.stderr
    return work


# (argv, text the error must contain); "{ckpt}" / "{tmp}" are filled in.
ROWS = [
    (["train.train", "--config", "configs/tiny.yaml", "--workdir", "{tmp}/w", "--stop-at-step", "-1"], "--stop-at-step"),
    (["train.train", "--config", "configs/tiny.yaml", "--workdir", "{tmp}/w", "--stop-at-step", "0"], "--stop-at-step"),
    (["train.train", "--config", "configs/tiny.yaml", "--workdir", "{tmp}/w", "train.nonsense=1"], "nonsense"),
    (["train.train", "--config", "/no/such.yaml", "--workdir", "{tmp}/w"], "/no/such.yaml"),
    (["train.train", "--config", "configs/tiny.yaml", "--workdir", "{tmp}/w", "data.corpus=files",
      "data.paths=[/no/such/file.txt]"], "/no/such/file.txt"),
    (["infer.eval", "--checkpoint", "{ckpt}", "--num-prompts", "-1"], "--num-prompts"),
    (["infer.eval", "--checkpoint", "{ckpt}", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["infer.bench", "--checkpoint", "{ckpt}", "--repeats", "-1"], "--repeats"),
    (["infer.bench", "--checkpoint", "{ckpt}", "--batch-sizes", "1", "-2"], "--batch-sizes"),
    (["infer.generate", "--checkpoint", "{ckpt}", "--prompt-ids", "3", "--temperature", "-1"], "--temperature"),
    (["infer.generate", "--checkpoint", "{ckpt}", "--prompt-ids", "3", "--top-p", "1.5"], "--top-p"),
    (["infer.generate", "--checkpoint", "{ckpt}", "--prompt-ids", "3", "--top-k", "-1"], "--top-k"),
    (["infer.generate", "--checkpoint", "/no/such/run", "--prompt-ids", "3"], "/no/such/run"),
    (["infer.generate", "--checkpoint", "{ckpt}", "--prompt-ids", "3", "--step", "7"], "--step 7"),
    (["infer.generate", "--checkpoint", "{ckpt}", "--prompt-ids", "3", "--block-size", "2"],
     "--allow-block-size-mismatch"),
    (["train.import_checkpoint", "--from", "hf", "/no/such/model", "--out", "{tmp}/imp"], "does not exist"),
    (["infer.generate", "--checkpoint", "{ckpt}", "--prompt-ids", "3", "decode.proposal_lengths=[2,3]"],
     "decode.proposal_lengths must include 1"),
    (["infer.generate", "--checkpoint", "{ckpt}", "--prompt-ids", "3", "decode.proposal_lengths=[1,2]", "--beta",
      "0.5"], "decode.beta must be 1"),
    (["infer.bench", "--checkpoint", "{ckpt}", "--proposal-sets", "1,x"], "--proposal-sets"),
]


@pytest.mark.parametrize("argv,expected", ROWS, ids=[" ".join(r[0][:1] + r[0][-2:]) for r in ROWS])
def test_bad_input_exits_2(ckpt, tmp_path, argv, expected):
    r = _run(*[a.format(ckpt=ckpt, tmp=tmp_path) for a in argv])
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert expected in r.stderr
    assert not (tmp_path / "w").exists()  # a refused training run leaves no workdir behind


def test_corrupt_latest_checkpoint_names_intact_step(ckpt, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ckpt, run)
    shutil.rmtree(run / "checkpoints" / "2" / "state")
    r = _run("infer.generate", "--checkpoint", str(run), "--prompt-ids", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "newest intact step is 1" in r.stderr and "--step 1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _run("train.train", "--workdir", str(run), "--step", "1")
    assert r.returncode == 2 and "later step(s) ['2']" in r.stderr
    assert (run / "checkpoints" / "2").is_dir()  # nothing deleted
    ok = _run("infer.generate", "--checkpoint", str(run), "--step", "1", "--prompt-ids", "3", "--max-new-tokens", "2")
    assert ok.returncode == 0, ok.stderr
