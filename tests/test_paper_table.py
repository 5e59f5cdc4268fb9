"""infer.paper_table (Table-2-style rendering) and tidar_jax.evals.local_tasks (offline lm-eval tasks)."""

import json

import pytest

from infer import paper_table
from tidar_jax.config import DataConfig
from tidar_jax.data.corpora import load_corpus_documents, split_documents
from tidar_jax.evals import local_tasks


def _humaneval_report(n, passed_tidar, passed_ar):
    mode = lambda p, tpf: {"pass@1": p / n, "tokens_per_forward": tpf, "tokens_per_second": 5.0}  # noqa: E731
    return {"num_problems": n, "tidar_equals_ar": passed_tidar == passed_ar,
            "modes": {"tidar": mode(passed_tidar, 1.5), "ar": mode(passed_ar, 1.0)}}


def test_renders_one_row_per_model_and_mode_into_the_markers(tmp_path):
    (tmp_path / "he.json").write_text(json.dumps(_humaneval_report(8, 2, 2)))
    lm = tmp_path / "lm" / "model"
    lm.mkdir(parents=True)
    (lm / "results_2026.json").write_text(json.dumps({"results": {"tidar_bbc_heldout": {
        "alias": "tidar_bbc_heldout", "word_perplexity,none": 31.5, "bits_per_byte,none": 0.91,
        "word_perplexity_stderr,none": "N/A"}}}))
    md = tmp_path / "R.md"
    md.write_text("head\n<!-- results:paper-table -->\nold\n<!-- /results:paper-table -->\ntail\n")
    assert paper_table.main(["--humaneval", f"base={tmp_path / 'he.json'}", "--lm-eval", f"base={tmp_path / 'lm'}",
                             "--results-md", str(md)]) == 0
    text = md.read_text()
    assert "old" not in text and text.startswith("head\n") and text.endswith("tail\n")
    assert "| base | TiDAR | 8 | 25.0 | 1.50 | 5.0 | True |" in text
    assert "| base | AR | 8 | 25.0 | 1.00 | 5.0 | - |" in text
    assert "| base | tidar_bbc_heldout | 31.5000 | - | 0.9100 |" in text


@pytest.mark.parametrize("args, needle", [([], "at least one"), (["--humaneval", "nolabel"], "LABEL=PATH"),
                                          (["--humaneval", "a=/missing.json"], "/missing.json")])
def test_bad_input_exits_2_naming_it(args, needle, capsys):
    assert paper_table.main(args) == 2
    assert needle in capsys.readouterr().err


def test_rolling_task_holds_only_heldout_documents(tmp_path):
    name = local_tasks.write_rolling_task(tmp_path, 5)
    rows = [json.loads(line)["text"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
    data = DataConfig()
    train, held = split_documents(load_corpus_documents(data), data.holdout_fraction, data.seed)
    assert len(rows) == 5 and set(rows) <= set(held) and not set(rows) & set(train)
    assert f"task: {name}" in (tmp_path / f"{name}.yaml").read_text()
    with pytest.raises(ValueError, match="--docs"):
        local_tasks.write_rolling_task(tmp_path, 10**6)
