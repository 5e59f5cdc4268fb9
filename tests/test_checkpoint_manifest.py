"""Checksum manifests of checkpoint steps: every data file of a saved step is covered, a damaged one is named on
load (training resume and load_for_inference), a step without a manifest loads with a warning, and an async save
records its manifest only once the step is final."""

import json
import os

import pytest
from flax import nnx
from test_checkpoint import abstract_on_cpu0, make_train_state

from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint
from tidar_jax.checkpoint.manifest import MANIFEST_NAME, UnverifiedCheckpointWarning
from tidar_jax.checkpoint.store import Checkpointer, CheckpointError
from tidar_jax.model.transformer import create_model


def item_files(step_dir):
    """Reference: every file under the step's item directories, relative to the step, by os.walk."""
    return sorted(os.path.relpath(os.path.join(d, f), step_dir) for item in os.listdir(step_dir)
                  if os.path.isdir(step_dir / item) for d, _, files in os.walk(step_dir / item) for f in files)


def flip(path, fraction):
    """XORs 4 bytes of `path` at `fraction` of its length (fewer in a shorter file); returns the original bytes."""
    data = path.read_bytes()
    at = min(int(len(data) * fraction), max(len(data) - 4, 0))
    path.write_bytes(data[:at] + bytes(b ^ 0x5A for b in data[at:at + 4]) + data[at + 4:])
    return data


@pytest.fixture(scope="module")
def saved(tiny_config, tmp_path_factory):
    """A training workdir (steps 1 and 2, async saves) and an inference checkpoint, both of the tiny model."""
    root = tmp_path_factory.mktemp("manifest")
    _, state = make_train_state(tiny_config)
    with Checkpointer(root / "train", keep=3, async_save=True) as ckpt:
        ckpt.save(1, state, {"pos": 1}, tiny_config)
        ckpt.save(2, state, {"pos": 2}, tiny_config)
    save_inference_checkpoint(root / "export", tiny_config, nnx.split(create_model(tiny_config.model))[1])
    return root, abstract_on_cpu0(state)


def test_manifest_covers_every_item_file(saved):
    root, _ = saved
    for step_dir in (root / "train" / "checkpoints" / "2", root / "export" / "checkpoints" / "0"):
        manifest = json.loads((step_dir / MANIFEST_NAME).read_text())
        assert manifest["algorithm"] == "sha256"
        assert sorted(manifest["files"]) == item_files(step_dir)
        assert any(name.startswith("state/") and "/d/" in name for name in manifest["files"])  # array data


# A failed read leaves an Orbax-internal asyncio task behind that may complain at garbage collection.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_flipped_bytes_in_any_file_are_named_on_resume_and_inference_load(saved, fraction):
    """The sweep's C9: 4 flipped bytes at 30% / 90% of each data file. Without checksums most such flips loaded
    silently (bytes a params-only load never reads, or changed weights); now each one is refused, naming the file,
    by both readers, before anything is restored."""
    root, abstract = saved
    cases = [(root / "train", "2"), (root / "export", "0")]
    for workdir, step in cases:
        step_dir = workdir / "checkpoints" / step
        for name in item_files(step_dir):
            original = flip(step_dir / name, fraction)
            try:
                with pytest.raises(CheckpointError, match=f"checkpoints/{step} is corrupt: {name} does not match"):
                    load_for_inference(workdir)
                if step != "0":  # an inference checkpoint has no optimizer state to resume
                    with Checkpointer(workdir) as ckpt, pytest.raises(CheckpointError, match=f"{name} does not match"):
                        ckpt.restore(abstract)
            finally:
                (step_dir / name).write_bytes(original)
    load_for_inference(root / "train")  # restored bytes verify again


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_file_and_unreadable_manifest_are_named(saved, tmp_path):
    root, _ = saved
    step_dir = root / "train" / "checkpoints" / "2"
    manifest = (step_dir / MANIFEST_NAME).read_bytes()
    name = next(n for n in item_files(step_dir) if n.endswith("manifest.ocdbt"))
    data = (step_dir / name).read_bytes()
    try:
        (step_dir / name).unlink()  # the sweep's C4 printed 61 tracebacks for this one
        with pytest.raises(CheckpointError, match=f"{name} is missing.*newest intact step is 1"):
            load_for_inference(root / "train")
        (step_dir / name).write_bytes(data)
        (step_dir / MANIFEST_NAME).write_text('{"algorithm": "sha256", "files": {"state/x": [1')
        with pytest.raises(CheckpointError, match=f"its checksum manifest {MANIFEST_NAME} is unreadable"):
            load_for_inference(root / "train")
    finally:
        (step_dir / name).write_bytes(data)
        (step_dir / MANIFEST_NAME).write_bytes(manifest)


def test_a_step_without_manifest_loads_with_a_warning(tiny_config, tmp_path):
    """Steps saved before manifests existed (or by a run killed before recording one) still load, unverified."""
    _, state = make_train_state(tiny_config)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, {"pos": 3}, tiny_config)
    (tmp_path / "checkpoints" / "3" / MANIFEST_NAME).unlink()
    with pytest.warns(UnverifiedCheckpointWarning, match="checkpoints/3 has no checksum manifest"):
        assert load_for_inference(tmp_path).step == 3
    with Checkpointer(tmp_path) as ckpt, pytest.warns(UnverifiedCheckpointWarning):
        _, data, _ = ckpt.restore(abstract_on_cpu0(state))
    assert data == {"pos": 3}


def test_async_save_records_its_manifest_once_the_step_is_final(tiny_config, tmp_path):
    """The manifest is written at the next synchronisation point (save, wait, close), never for files still being
    written; keep-latest-N may delete a step before that without harm."""
    _, state = make_train_state(tiny_config)
    steps = tmp_path / "checkpoints"
    with Checkpointer(tmp_path, keep=1, async_save=True) as ckpt:
        ckpt.save(1, state, None, tiny_config)
        assert not (steps / "1" / MANIFEST_NAME).exists()
        ckpt.save(2, state, None, tiny_config)  # waits for step 1, records it, then starts step 2
        assert (steps / "1" / MANIFEST_NAME).exists() or not (steps / "1").exists()
        ckpt.wait()
        assert (steps / "2" / MANIFEST_NAME).exists() and sorted(os.listdir(steps)) == ["2"]
    assert load_for_inference(tmp_path).step == 2
