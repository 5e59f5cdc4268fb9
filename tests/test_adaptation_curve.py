"""infer.adaptation_curve on a tiny run: rows per checkpoint, tokens per forward over batched decoding equal to one
Generator call over the whole set, TiDAR == AR at beta = 1, and --steps measuring again into an existing --json."""

from __future__ import annotations

import json

import pytest

from infer import adaptation_curve
from train import train as train_cli
from tidar_jax.checkpoint.inference import load_for_inference
from tidar_jax.decoding.generation import Generator

CURVE = ["--prompt-sets", "corpus", "humaneval", "--num-prompts", "3", "--decode-batch", "2", "--max-new-tokens", "8",
         "--eval-batches", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny TiDAR run with checkpoints at steps 1 and 2."""
    work = tmp_path_factory.mktemp("curve") / "run"
    assert train_cli.main(["--config", "configs/tiny.yaml", "--workdir", str(work), "train.steps=2",
                           "train.checkpoint_every=1", "train.eval_every=1000", "--no-progress"]) == 0
    return work


@pytest.mark.slow  # ~40 s on 2 busy cores: a tiny training run, then three checkpoints decoded twice
def test_rows_and_tokens_per_forward_match_one_generator_call(run, tmp_path, capsys):
    out = tmp_path / "curve.json"
    assert adaptation_curve.main(["--run", str(run), "--base", str(run), "--json", str(out), *CURVE]) == 0
    report = json.loads(out.read_text())
    assert [r["step"] for r in report["rows"]] == [0, 1, 2]
    assert [r["training_tokens"] for r in report["rows"]] == [0, 8 * 64, 2 * 8 * 64]
    last = report["rows"][-1]
    assert all(last[f"equals_ar_{name}"] for name in ("corpus", "humaneval"))
    assert len(last["slot_accuracy_distilled"]) == 4

    # --steps measures one checkpoint again and keeps the other rows of the file.
    before = report["rows"]
    assert adaptation_curve.main(["--run", str(run), "--base", str(run), "--json", str(out), "--steps", "2",
                                  *CURVE]) == 0
    after = json.loads(out.read_text())["rows"]
    assert [r["step"] for r in after] == [0, 1, 2] and after[:2] == before[:2]
    capsys.readouterr()
    assert adaptation_curve.main(["--run", str(run), "--base", str(run), "--steps", "7", *CURVE]) == 2
    assert "--steps 7" in capsys.readouterr().err

    # Reference: the same prompts decoded in one call by the Generator of step 2.
    bundle = load_for_inference(run)
    args = adaptation_curve.parse_args(["--run", str(run), "--base", str(run), *CURVE])
    measure = adaptation_curve._Measure(args, bundle.config, bundle)
    generator = Generator(bundle.graphdef, bundle.params, bundle.config.model, measure.decode_cfg)
    for name in ("corpus", "humaneval"):
        whole = generator.generate(measure.prompts[name], "tidar", 8, temperature=0.0)
        assert last[f"tokens_per_forward_{name}"] == pytest.approx(whole.tokens_per_forward, rel=1e-12)


def test_merge_keeps_rows_not_measured_again_and_refuses_other_settings():
    report = {"run": "r", "base": "b", "corpus": "c", "block_size": 4, "prompt_sets": ["corpus"], "num_prompts": 3,
              "max_new_tokens": 8, "rows": [{"step": 1, "x": "old"}, {"step": 3, "x": "old"}]}
    new = {**report, "rows": [{"step": 1, "x": "new"}, {"step": 2, "x": "new"}]}
    assert adaptation_curve.merged(report, new)["rows"] == [{"step": 1, "x": "new"}, {"step": 2, "x": "new"},
                                                              {"step": 3, "x": "old"}]
    with pytest.raises(ValueError, match="num_prompts"):
        adaptation_curve.merged({**report, "num_prompts": 6}, new)
