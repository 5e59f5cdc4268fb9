"""The training loop and `python -m train.train` end to end on the tiny preset (real data, real checkpoints).

Resume tests compare against an uninterrupted run on the same single-device mesh and demand bitwise-equal params:
the resumed run restores exact float32 arrays and the exact data-iterator position, and XLA on CPU is
deterministic for a fixed program, so any difference means lost state or a shifted data order.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint
from tidar_jax.checkpoint.store import Checkpointer, read_runtime
from tidar_jax.config import ConfigError, MeshConfig, load_config, replace, to_dict
from tidar_jax.data.pipeline import load_or_train_tokenizer, make_train_iterator
from tidar_jax.data.tokenizer import Tokenizer
from tidar_jax.sharding import make_global_batch, make_mesh
from tidar_jax.training.loop import train
from tidar_jax.training.metrics_log import read_metrics
from tidar_jax.training.run_setup import plan_run
from tidar_jax.training.trainer import trainer_for
from train.train import main

STEPS = 4
SMALL = ["data.seq_len=16", f"train.steps={STEPS}", "train.warmup_steps=1", "train.log_every=1",
         "train.eval_every=4", "train.eval_batches=1", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def tokenizer_path(repo_root, tmp_path_factory):
    """One BPE for the whole module (training it takes seconds), passed to runs as data.tokenizer."""
    cfg = load_config(f"{repo_root}/configs/tiny.yaml")
    workdir = tmp_path_factory.mktemp("tokenizer")
    load_or_train_tokenizer(cfg).save(workdir / "tokenizer.json")
    return str(workdir / "tokenizer.json")


@pytest.fixture(scope="module")
def cfg(repo_root, tokenizer_path):
    return load_config(f"{repo_root}/configs/tiny.yaml", SMALL + [f"data.tokenizer={tokenizer_path}"])


def one_device_mesh():
    return make_mesh(MeshConfig(data=-1), jax.devices()[:1])


@pytest.fixture(scope="module")
def uninterrupted(cfg, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    result = train(plan_run(workdir, config=cfg), progress=False, mesh=one_device_mesh())
    return jax.device_get(result.state), result.records


def assert_same_state(state, reference):
    assert int(state["step"]) == int(reference["step"])
    for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--workdir", "--distributed", "--coordinator", "--num-processes", "--process-id",
                 "--stop-at-step", "--no-progress", "--print-config", "section.field=value", "train.steps=100"):
        assert flag in text, flag


@pytest.mark.parametrize("override, message", [("train.stepz=3", "train.stepz"), ("train.steps=abc", "train.steps"),
                                               ("train.steps", "section.field=value"),
                                               ("train.grad_accum_steps=3", "grad_accum_steps")])
def test_bad_override_is_a_clear_error(repo_root, tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    assert main(["--config", f"{repo_root}/configs/tiny.yaml", "--workdir", str(workdir), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not workdir.exists()


def test_resume_without_checkpoint_or_config_is_refused(tmp_path, capsys):
    assert main(["--workdir", str(tmp_path / "empty")]) == 2
    assert "pass --config" in capsys.readouterr().err


def test_cli_end_to_end_writes_loadable_checkpoint_and_metrics(repo_root, tokenizer_path, tmp_path, capsys):
    workdir = tmp_path / "run"
    args = ["--config", f"{repo_root}/configs/tiny.yaml", "--workdir", str(workdir), "--no-progress",
            *SMALL, "train.steps=3", "train.eval_every=3", f"data.tokenizer={tokenizer_path}"]
    assert main(args) == 0
    # The run says which attention ran: the default "auto" resolved on this CPU (and the saved config keeps "auto").
    assert "attention blockwise (model.attention_impl=auto on cpu)" in capsys.readouterr().err
    assert read_runtime(workdir) == {"backend": "cpu", "attention_impl": "blockwise"}
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"loss", "ar_loss", "diff_loss", "lr", "grad_norm"} <= r.keys() and np.isfinite(r["loss"])
    # Step 1 compiles: it gets no throughput figure rather than one inflated by compilation.
    assert "tokens_per_s" not in records[0] and all(r["tokens_per_s"] > 0 for r in records[1:])
    assert {"eval_loss", "eval_ar_loss", "eval_diff_loss", "eval_slot_accuracy"} <= records[-1].keys()
    assert len(records[-1]["eval_slot_accuracy"]) == 4
    assert (workdir / "tokenizer.json").is_file()

    bundle = load_for_inference(workdir)
    assert bundle.step == 3 and bundle.config.model.attention_impl == "auto"
    assert bundle.config.train.steps == 3 and bundle.config.data.seq_len == 16
    assert bundle.tokenizer is not None and bundle.tokenizer.vocab_size == 512
    assert bundle.params["embed"][...].shape == (512, 64)

    # A different model in the same workdir is refused and nothing there changes.
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(args + ["model.d_model=32", "model.head_dim=8"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "model.d_model" in err
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before

    # --workdir alone resumes with the saved config; overrides of the run's identity are refused there too.
    assert main(["--workdir", str(workdir), "--print-config"]) == 0
    assert "seq_len: 16" in capsys.readouterr().out
    assert main(["--workdir", str(workdir), "data.seq_len=32"]) == 2
    assert "data.seq_len" in capsys.readouterr().err
    # Resuming says from which step, also without a progress bar (here with nothing left to train).
    assert main(["--workdir", str(workdir), "--no-progress"]) == 0
    assert f"resuming {workdir} from step 3; training to step 3 of 3" in capsys.readouterr().err
    # An end before the step the run reached trains nothing: refused (it used to exit 0), metrics.jsonl untouched.
    for extra, named in ((["train.steps=2"], "train.steps=2"), (["--stop-at-step", "1"], "--stop-at-step 1")):
        assert main(["--workdir", str(workdir), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "already at step 3" in err and named in err
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]


def test_stopped_and_resumed_run_equals_uninterrupted(cfg, uninterrupted, tmp_path):
    reference, reference_records = uninterrupted
    half = train(plan_run(tmp_path, config=cfg), stop_at_step=STEPS // 2, progress=False, mesh=one_device_mesh())
    assert half.step == STEPS // 2
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == STEPS // 2
    resumed = train(plan_run(tmp_path, config=cfg), progress=False, mesh=one_device_mesh())
    assert [r["step"] for r in resumed.records] == list(range(STEPS // 2 + 1, STEPS + 1))
    assert_same_state(jax.device_get(resumed.state), reference)
    # metrics.jsonl holds each step once, with the uninterrupted run's losses.
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == [r["loss"] for r in reference_records]
    # All three runs of this config shared one compiled step: a restored state does not retrace it.
    assert trainer_for(cfg, one_device_mesh()).train_step._cache_size() == 1


# (kill point, step): what the workdir holds after the kill. checkpoint_every=2, so steps 2 and 4 are saved.
KILLS = [
    pytest.param("save_in_flight", 4, [2], id="during-async-save-of-the-final-step"),
    pytest.param("batch_drawn", 3, [2], id="mid-step-batch-drawn", marks=pytest.mark.slow),
    pytest.param("logged", 3, [2], id="mid-step-between-saves-after-logging", marks=pytest.mark.slow),
    pytest.param("save_in_flight", 2, [], id="during-the-first-save", marks=pytest.mark.slow),
    pytest.param("save_uncommitted", 4, [2], id="save-written-not-renamed", marks=pytest.mark.slow),
    pytest.param("save_committed", 2, [2], id="right-after-a-save-completed", marks=pytest.mark.slow),
]


def without_throughput(records: list[dict]) -> list[dict]:
    """Records minus tokens/s (a timing, and absent on a resumed run's compiling first step)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]


@pytest.mark.parametrize("point, step, saved", KILLS)
def test_run_killed_with_sigkill_resumes_exactly(cfg, uninterrupted, repo_root, tmp_path, point, step, saved):
    """SIGKILL at a named point (tests/_killed_run.py), then resume: the final state is bitwise the uninterrupted
    run's and metrics.jsonl holds every step once with the same numbers."""
    reference, reference_records = uninterrupted
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(to_dict(cfg)))
    workdir = tmp_path / "run"
    # The same XLA flags and matmul precision as this process: the same compiled program, so the same bits.
    env = dict(os.environ, PYTHONPATH=repo_root, JAX_DEFAULT_MATMUL_PRECISION="highest")
    proc = subprocess.run(
        [sys.executable, os.path.join(repo_root, "tests", "_killed_run.py"), str(config_file), str(workdir),
         point, str(step)], env=env, cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    if point == "save_in_flight":  # the kill did interrupt the save
        assert any(p.name.startswith(f"{step}.") for p in (workdir / "checkpoints").iterdir())
    with Checkpointer(workdir) as checkpointer:  # opening it as a writer also clears the unfinished save
        assert checkpointer.all_steps() == saved
    resumed = train(plan_run(workdir, config=cfg), progress=False, mesh=one_device_mesh())
    assert resumed.records[0]["step"] == (saved[-1] if saved else 0) + 1
    assert_same_state(jax.device_get(resumed.state), reference)
    assert without_throughput(read_metrics(workdir)) == without_throughput(reference_records)


def test_missing_data_is_a_clear_error(repo_root, tmp_path, capsys):
    missing = tmp_path / "no_such_corpus.txt"
    args = ["--config", f"{repo_root}/configs/tiny.yaml", "--workdir", str(tmp_path / "run"), "--no-progress",
            "data.corpus=files", f"data.paths=[{missing}]"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no_such_corpus" in err
    assert not (tmp_path / "run").exists()  # a run refused for its data leaves no workdir behind


def test_multi_process_flags_without_distributed_are_refused(repo_root, tmp_path, capsys):
    args = ["--config", f"{repo_root}/configs/tiny.yaml", "--workdir", str(tmp_path / "run"), "--num-processes", "2"]
    assert main(args) == 2  # used to be ignored: a single-process run started
    assert "--num-processes: these flags set up a multi-process run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_init_from_loads_params_only(cfg, uninterrupted, tokenizer_path, tmp_path):
    reference, _ = uninterrupted
    imported = tmp_path / "imported"
    save_inference_checkpoint(imported, cfg, reference["params"], tokenizer_file=tokenizer_path)
    mesh = one_device_mesh()
    result = train(plan_run(tmp_path / "run", config=replace(cfg, train={"init_from": str(imported)})), stop_at_step=1,
                   progress=False, mesh=mesh)
    assert int(result.state["step"]) == 1  # a new run (fresh optimizer), not a continuation of step 4
    # Its first loss is the imported params' loss on the first training batch.
    trainer = trainer_for(cfg, mesh)
    first = next(make_train_iterator(cfg, Tokenizer.from_file(tokenizer_path)))
    m = jax.device_get(trainer.eval_step(jax.device_put(reference["params"], trainer.param_shardings),
                                         make_global_batch(first, mesh)))
    alpha = cfg.train.alpha
    np.testing.assert_allclose(result.records[0]["loss"], (alpha * m["ar_loss"] + m["diff_loss"]) / (1 + alpha),
                               rtol=1e-5)

    with pytest.raises(ConfigError, match="model.d_ff: checkpoint 128, requested 256"):
        plan_run(tmp_path / "other", config=replace(cfg, model={"d_ff": 256}, train={"init_from": str(imported)}))
    assert not (tmp_path / "other").exists()  # refused before anything was written
    # Without data.tokenizer the run takes the init checkpoint's own tokenizer.
    plan = plan_run(tmp_path / "third", config=replace(cfg, data={"tokenizer": ""}, train={"init_from": str(imported)}))
    assert plan.config.data.tokenizer == str(imported / "tokenizer.json")
    assert plan.tokenizer.fingerprint == Tokenizer.from_file(tokenizer_path).fingerprint
