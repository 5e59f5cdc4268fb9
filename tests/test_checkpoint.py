"""Checkpoints: bitwise round trips, keep-latest-N, resume, restore onto another mesh, params-only inference load,
workdir compatibility, clear errors for missing / unfinished / corrupt checkpoints, and survival of a SIGKILL
during an async save."""

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorstore as ts
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint
from tidar_jax.checkpoint.store import Checkpointer, CheckpointError, read_checkpoint_config
from tidar_jax.config import ConfigError, load_config, replace
from tidar_jax.layout import masks
from tidar_jax.model.transformer import create_model, forward
from tidar_jax.sharding import param_shardings

AXES = ("data", "fsdp", "tensor")


def make_train_state(cfg, seed=0):
    """(graphdef, train state) after one AdamW update, so params, mu, nu and count are all non-trivial.

    Eager on purpose: the per-op compilations are cached and shared with every other test in the process, while
    jitting the whole init compiled for ~13 s on a busy 2-core CPU."""
    graphdef, params = nnx.split(create_model(cfg.model, seed=seed))
    params = nnx.to_pure_dict(params)
    tx = optax.adamw(1e-2)
    grads = jax.tree.map(lambda p: jnp.sin(7.0 * p + seed), params)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    return graphdef, {"step": jnp.asarray(seed + 1, jnp.int32), "params": optax.apply_updates(params, updates),
                      "opt_state": opt_state}


def mesh_of(shape, devices):
    return jax.sharding.Mesh(np.array(devices).reshape(shape), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def spec_for(shape):
    """A valid sharding spec for the (2, 2, 2) mesh that really splits most leaves."""
    if len(shape) >= 2 and shape[0] % 4 == 0 and shape[1] % 2 == 0:
        return P(("data", "fsdp"), "tensor")
    if len(shape) == 1 and shape[0] % 2 == 0:
        return P("tensor")
    return P()


def abstract_on(tree, mesh, sharded):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=NamedSharding(mesh, spec_for(x.shape) if sharded else P())), tree)


def place(tree, abstract):
    return jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), tree, abstract)


def abstract_on_cpu0(tree):
    cpu0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu0), tree)


def assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def file_bytes_read():
    """Bytes tensorstore has read from local files so far in this process."""
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v["value"] for m in metrics for v in m["values"])


def snapshot(root):
    """Every file under root with its size and mtime (to prove a call changed nothing)."""
    return {os.path.relpath(os.path.join(d, f), root): (os.stat(os.path.join(d, f)).st_size,
                                                         os.stat(os.path.join(d, f)).st_mtime_ns)
            for d, _, files in os.walk(root) for f in files}


def test_round_trip_is_bitwise(tmp_path, tiny_config):
    _, state = make_train_state(tiny_config)
    data_state = {"epoch": 2, "next_index": 37, "seed": 5}
    with Checkpointer(tmp_path, keep=3, async_save=True) as ckpt:
        assert ckpt.save(7, state, data_state, tiny_config)
        ckpt.wait()
    abstract = abstract_on_cpu0(state)
    with Checkpointer(tmp_path) as fresh:  # a new process would see the same: nothing cached in memory
        assert fresh.latest_step() == 7
        restored, restored_data, restored_cfg = fresh.restore(abstract)
    assert_bitwise(restored, state)
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
    assert restored_data == data_state
    assert restored_cfg == tiny_config


def test_keep_latest_n_resume_and_no_overwrite(tmp_path, tiny_config):
    _, base = make_train_state(tiny_config)
    states = {s: jax.tree.map(lambda x: x + s, base) for s in (10, 20, 30, 40)}  # distinct values per step
    with Checkpointer(tmp_path, keep=2) as ckpt:
        for s, st in states.items():
            assert ckpt.save(s, st, {"pos": s}, tiny_config)
        ckpt.wait()
        assert ckpt.all_steps() == [30, 40]
        before = snapshot(tmp_path)
        with pytest.raises(CheckpointError, match="step 40 is already saved"):
            ckpt.save(40, base, None, tiny_config, force=True)
        assert not ckpt.save(35, base, None, tiny_config)  # below the latest step: skipped, not written
        ckpt.wait()
        assert snapshot(tmp_path) == before
    abstract = abstract_on_cpu0(base)
    with Checkpointer(tmp_path, keep=2) as resumed:  # `--workdir` alone: latest step, its data state and config
        assert resumed.latest_step() == 40
        restored, data, cfg = resumed.restore(abstract)
        assert_bitwise(restored, states[40])
        assert data == {"pos": 40} and cfg == tiny_config
        older, data, _ = resumed.restore(abstract, step=30)
        assert_bitwise(older, states[30])
        assert data == {"pos": 30}
        with pytest.raises(CheckpointError, match=r"step 10 is not saved.*\[30, 40\]"):
            resumed.restore(abstract, step=10)
    assert read_checkpoint_config(tmp_path) == tiny_config


@pytest.mark.parametrize("direction", ["8_to_1", "1_to_8"])
def test_restore_onto_another_mesh(tmp_path, tiny_config, direction):
    devices = jax.devices()
    assert len(devices) == 8, "conftest must force 8 CPU devices"
    mesh8, mesh1 = mesh_of((2, 2, 2), devices), mesh_of((1, 1, 1), devices[:1])
    _, state = make_train_state(tiny_config)
    src, dst = ((mesh8, True), (mesh1, False)) if direction == "8_to_1" else ((mesh1, False), (mesh8, True))
    saved = place(state, abstract_on(state, *src))
    if direction == "8_to_1":
        assert saved["params"]["embed"].sharding.shard_shape((512, 64)) == (128, 32)  # really split 8 ways
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, saved, None, tiny_config)
    target = abstract_on(state, *dst)
    with Checkpointer(tmp_path) as ckpt:
        restored, data, _ = ckpt.restore(target)
    assert data is None
    assert_bitwise(restored, state)
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
        assert leaf.sharding.is_equivalent_to(want.sharding, leaf.ndim)


@functools.partial(jax.jit, static_argnums=0)
def run_forward(graphdef, params, tokens):
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    return forward(graphdef, params, tokens, positions, masks.causal_mask(tokens.shape[1])[None])[0]


def test_load_for_inference_matches_original_forward(tmp_path, tiny_config):
    graphdef, state = make_train_state(tiny_config, seed=3)
    original = nnx.split(create_model(tiny_config.model, seed=3))[1]
    nnx.replace_by_pure_dict(original, state["params"])
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, tiny_config.model.vocab_size)
    expected = np.asarray(run_forward(graphdef, original, tokens))

    train_dir = tmp_path / "train"
    with Checkpointer(train_dir) as ckpt:
        ckpt.save(5, state, {"pos": 1}, tiny_config)
    before = file_bytes_read()
    bundle = load_for_inference(train_dir)
    params_read = file_bytes_read() - before
    with Checkpointer(train_dir) as ckpt:
        before = file_bytes_read()
        ckpt.restore(abstract_on_cpu0(state))
        full_read = file_bytes_read() - before
    # Params are a third of the state (params, Adam mu, nu): a params-only restore never reads the optimizer's data.
    assert 0 < params_read < 0.5 * full_read
    assert bundle.step == 5 and bundle.config == tiny_config and bundle.tokenizer is None
    assert set(nnx.to_pure_dict(bundle.params)) == set(state["params"])  # params only, no optimizer state
    assert_bitwise(nnx.to_pure_dict(bundle.params), state["params"])
    np.testing.assert_array_equal(np.asarray(run_forward(bundle.graphdef, bundle.params, tokens)), expected)
    mesh8 = mesh_of((2, 2, 2), jax.devices())
    sharded = load_for_inference(train_dir, mesh=mesh8)  # onto the training rules' shardings of another mesh
    assert_bitwise(nnx.to_pure_dict(sharded.params), state["params"])
    wanted = param_shardings(sharded.params, mesh8)
    for leaf, sharding in zip(jax.tree.leaves(nnx.to_pure_dict(sharded.params)), jax.tree.leaves(wanted)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
    # embed [vocab, d]: vocab over tensor, d over fsdp.
    assert sharded.params["embed"][...].sharding.shard_shape((512, 64)) == (256, 32)

    export_dir = tmp_path / "export"
    assert save_inference_checkpoint(export_dir, tiny_config, original) == export_dir
    for path in (export_dir, export_dir / "checkpoints", export_dir / "checkpoints" / "0"):
        bundle = load_for_inference(path)
        assert bundle.step == 0
        np.testing.assert_array_equal(np.asarray(run_forward(bundle.graphdef, bundle.params, tokens)), expected)
    before = snapshot(export_dir)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        save_inference_checkpoint(export_dir, tiny_config, original)
    assert snapshot(export_dir) == before
    with pytest.raises(CheckpointError, match=r"embed: params shape \(512, 64\), config.model shape \(512, 32\)"):
        save_inference_checkpoint(tmp_path / "bad", replace(tiny_config, model={"d_model": 32}), original)


def test_load_for_inference_reads_workdir_tokenizer(tmp_path, tiny_config):
    tokenizer_mod = pytest.importorskip("tidar_jax.data.tokenizer")
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|mask|>", "<|pad|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["the cat sat on the mat", "a checkpoint holds the tokenizer"] * 20, trainer)
    source = tmp_path / "source_tokenizer.json"
    hf.save(str(source))
    params = nnx.split(create_model(tiny_config.model, seed=0))[1]
    save_inference_checkpoint(tmp_path / "run", tiny_config, params, tokenizer_file=source)
    bundle = load_for_inference(tmp_path / "run")
    assert isinstance(bundle.tokenizer, tokenizer_mod.Tokenizer)
    assert bundle.tokenizer.encode("the cat sat") == hf.encode("the cat sat").ids


def test_resume_refuses_a_different_run(tmp_path, tiny_config):
    from tidar_jax.data.pipeline import load_or_train_tokenizer
    from tidar_jax.training.run_setup import plan_run

    assert not plan_run(tmp_path / "fresh", config=tiny_config).resume  # nothing there yet: a new run
    assert not (tmp_path / "fresh").exists()
    _, state = make_train_state(tiny_config)
    tokenizer = load_or_train_tokenizer(tiny_config)
    tokenizer.save(tmp_path / "tokenizer.json")
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, None, replace(tiny_config, data={"tokenizer_sha256": tokenizer.fingerprint}))
    before = snapshot(tmp_path)
    assert plan_run(tmp_path, config=tiny_config).resume
    # Longer training, another mesh, remat (with a policy): the same run, resumable.
    plan_run(tmp_path, config=replace(tiny_config, train={"steps": 500}, mesh={"fsdp": 2},
                                      model={"remat": True, "remat_policy": "dots_saveable"}))
    # Another layer layout changes the saved train state's layout: refused (a new run via train.init_from converts).
    other = replace(tiny_config, model={"d_model": 128, "scan_layers": True}, data={"seq_len": 32},
                    train={"objective": "ar"})
    with pytest.raises(ConfigError) as err:
        plan_run(tmp_path, config=other)
    for name in ("model.d_model", "model.scan_layers", "data.seq_len", "train.objective"):
        assert name in str(err.value)
    assert "model.n_layers" not in str(err.value)
    assert snapshot(tmp_path) == before  # refusing only read
    # A replaced tokenizer.json is another token mapping: refused, naming the file.
    load_or_train_tokenizer(replace(tiny_config, data={"seed": 1})).save(tmp_path / "tokenizer.json")
    with pytest.raises(ConfigError, match="tokenizer.json is not the tokenizer this run was trained with"):
        plan_run(tmp_path, config=tiny_config)


# A failed read leaves an Orbax-internal asyncio task behind that may complain at garbage collection.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_clear_errors(tmp_path, tiny_config):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_inference(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_for_inference(tmp_path / "empty")
    _, state = make_train_state(tiny_config)
    abstract = abstract_on_cpu0(state)
    with Checkpointer(tmp_path / "empty") as ckpt, pytest.raises(CheckpointError, match="no checkpoint to restore"):
        ckpt.restore(abstract)

    run = tmp_path / "run"
    with Checkpointer(run) as ckpt:
        ckpt.save(1, state, None, tiny_config)
        ckpt.save(2, state, None, tiny_config)
        ckpt.save(3, state, None, tiny_config)
    # A restore target of another model shape names the differing leaf.
    small_abstract = jax.eval_shape(lambda: make_train_state(replace(tiny_config, model={"d_model": 32}))[1])
    with Checkpointer(run) as ckpt, pytest.raises(
            CheckpointError, match=r"/embed: checkpoint shape \(512, 64\), target shape \(512, 32\)"):
        ckpt.restore(small_abstract)
    # Training resume needs the optimizer state; an inference checkpoint lacks it, and says so.
    save_inference_checkpoint(tmp_path / "export", tiny_config, state["params"])
    with Checkpointer(tmp_path / "export") as ckpt, pytest.raises(
            CheckpointError, match="opt_state/0/count missing from checkpoint"):
        ckpt.restore(abstract)

    # Truncated array data (step 3), deleted metadata (step 2), a deleted item (step 1).
    data_files = [os.path.join(d, f) for d, _, fs in os.walk(run / "checkpoints" / "3" / "state")
                  for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
    assert data_files
    for f in data_files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
    with pytest.raises(CheckpointError, match=r"checkpoints/3 is corrupt") as e:
        load_for_inference(run)
    assert "\n" not in str(e.value) and "TensorStore details" not in str(e.value)  # one line, no spec repr
    with Checkpointer(run) as ckpt, pytest.raises(CheckpointError, match=r"checkpoints/3 is corrupt"):
        ckpt.restore(abstract)
    os.remove(run / "checkpoints" / "2" / "state" / "_METADATA")
    with pytest.raises(CheckpointError, match=r"checkpoints/2 is corrupt"):
        load_for_inference(run / "checkpoints" / "2")
    shutil.rmtree(run / "checkpoints" / "1" / "state")
    with pytest.raises(CheckpointError, match=r"checkpoints/1 is incomplete.*'state'"):
        load_for_inference(run / "checkpoints" / "1")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_emptied_state_is_one_error_without_storage_warnings(tmp_path, tiny_config, caplog):
    _, state = make_train_state(tiny_config)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, None, tiny_config)
        ckpt.save(2, state, None, tiny_config)
    for f in (tmp_path / "checkpoints" / "2" / "state").iterdir():
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    level = logging.getLogger("absl").level
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError, match="newest intact step is 1"):
        load_for_inference(tmp_path)
    assert not [r for r in caplog.records if r.name == "absl"]  # Orbax's warning used to precede the one line
    assert logging.getLogger("absl").level == level  # and the logger is as it was


CHILD = textwrap.dedent("""
    import os, signal, sys, threading
    import numpy as np
    from orbax.checkpoint._src.path import atomicity
    from tidar_jax.checkpoint.store import Checkpointer
    from tidar_jax.config import load_config

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def hold_step_2(self):  # step 2's background write never commits its state item: the kill is mid-save
        if self._final_path.name == "state" and self._final_path.parent.name.startswith("2."):
            threading.Event().wait()
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = hold_step_2
    workdir, config_path = sys.argv[1], sys.argv[2]
    cfg = load_config(config_path)
    ckpt = Checkpointer(workdir, keep=3, async_save=True)
    ckpt.save(1, {"step": np.int32(1), "w": np.arange(1024, dtype=np.float32)}, {"pos": 1}, cfg)
    ckpt.wait()
    ckpt.save(2, {"step": np.int32(2), "w": np.zeros(1024, np.float32)}, {"pos": 2}, cfg)
    import time
    deadline = time.time() + 60  # the background write creates step 2's temporary directory (later under load)
    while not any(n.startswith("2.") for n in os.listdir(ckpt.directory)) and time.time() < deadline:
        time.sleep(0.05)
    print("LISTING", sorted(os.listdir(ckpt.directory)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkill_during_async_save_keeps_previous_step(tmp_path, repo_root):
    env = dict(os.environ, PYTHONPATH=repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    config_path = os.path.join(repo_root, "configs", "tiny.yaml")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), config_path],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    listing = next(line for line in proc.stdout.splitlines() if line.startswith("LISTING"))
    assert "'1'" in listing and "'2'" not in listing and "2.orbax-checkpoint-tmp" in listing  # killed mid-save

    # A reader (no cleanup, nothing written) sees step 1 only and its config.
    assert read_checkpoint_config(tmp_path).model == load_config(config_path).model
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "w": jax.ShapeDtypeStruct((1024,), jnp.float32)}
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        restored, data, _ = ckpt.restore(abstract)
        assert int(restored["step"]) == 1 and data == {"pos": 1}
        np.testing.assert_array_equal(restored["w"], np.arange(1024, dtype=np.float32))
        with pytest.raises(CheckpointError, match=r"step 2 is not saved.*\[1\]"):
            ckpt.restore(abstract, step=2)
        # The writer removes the unfinished directory (before its next save) and can save step 2 afresh.
        assert ckpt.save(2, {"step": np.int32(2), "w": np.ones(1024, np.float32)}, {"pos": 2}, load_config(config_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    with Checkpointer(tmp_path) as ckpt:
        restored, data, _ = ckpt.restore(abstract)
    assert int(restored["step"]) == 2 and data == {"pos": 2}
    np.testing.assert_array_equal(restored["w"], np.ones(1024, np.float32))


def test_load_for_inference_accepts_a_relative_path(tmp_path, monkeypatch, tiny_config):
    from flax import nnx

    from tidar_jax.model.transformer import create_model

    _, params = nnx.split(create_model(tiny_config.model, seed=1))
    save_inference_checkpoint(tmp_path / "run", tiny_config, params)
    monkeypatch.chdir(tmp_path)
    bundle = load_for_inference("run")
    assert bundle.step == 0 and bundle.config == tiny_config
