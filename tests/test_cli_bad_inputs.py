"""Bad inputs to the CLIs: each row must end with exit code 2, no traceback, and exactly one `error:` line naming
the offending flag / field / path; a refused training run leaves no workdir behind.

The rows of one CLI run in one subprocess (tests/_cli_rows.py calls its main() per row), so the table pays one jax
start-up per CLI, not per row. One tiny checkpoint (configs/tiny.yaml, 2 steps) serves every row; the corrupt-save
test at the end runs the real commands, one process each. Those are in the slow suite; the rows in FAST (refused
before any checkpoint or corpus is read) also run in the default suite, in this process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _cli_rows import run_row

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
TINY = ["--config", "configs/tiny.yaml"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny run with steps 1 and 2."""
    work = tmp_path_factory.mktemp("cli") / "run"
    r = _run("train.train", *TINY, "--workdir", str(work), "train.steps=2", "train.checkpoint_every=1",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    return work


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ckpt) -> Path:
    """Broken files the rows point at ({in}/...), and {swapped}: a copy of the run whose tokenizer.json maps two
    tokens the other way round (a different tokenizer under the same name)."""
    d = tmp_path_factory.mktemp("inputs")
    files = {"list.yaml": "- model\n- data\n", "empty.yaml": "", "broken.yaml": "model: {d_model: 64\n  n_layers: [\n",
             "scalar_section.yaml": "model: 3\n", "unknown_section.yaml": "model:\n  d_model: 64\nmodle:\n  x: 1\n",
             "unknown_key.yaml": "model:\n  d_modl: 64\n", "one_doc.txt": "a single document\n",
             "a_file": "not a directory\n", "fake.gguf": "not a gguf file\n", "cudnn.yaml": CUDNN_YAML}
    for name, text in files.items():
        (d / name).write_text(text)
    (d / "no_text_files").mkdir()
    (d / "no_text_files" / "notes.md").write_text("markdown is not a corpus file\n")
    (d / "hf_broken").mkdir()
    (d / "hf_broken" / "config.json").write_text("{")
    (d / "hf_no_config").mkdir()
    (d / "hf_no_config" / "model.safetensors").write_text("x")
    swapped = d / "swapped"
    shutil.copytree(ckpt, swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    return d


CUDNN_YAML = "model:\n  attention_impl: cudnn\n  compute_dtype: bfloat16\n"  # valid, but not on this CPU
LONG_PROMPT = ",".join(["5"] * 300)  # more tokens than the tiny preset's largest prompt bucket (128)

# CLI module -> [(argv, text the error line must contain)]; {ckpt}, {in}, {tmp} (a fresh path per row) filled in.
ROWS = {
    "train.train": [
        # flags
        (TINY + ["--workdir", "{tmp}", "--stop-at-step", "-1"], "--stop-at-step"),
        (TINY + ["--workdir", "{tmp}", "--stop-at-step", "0"], "--stop-at-step"),
        (TINY + ["--workdir", "{in}/a_file"], "--workdir"),
        (TINY + ["--workdir", "{tmp}", "--num-processes", "2"], "--num-processes"),
        (["--workdir", "{ckpt}", "train.steps=1", "train.warmup_steps=0"], "train.steps=1"),
        (["--workdir", "{ckpt}", "train.steps=4", "--stop-at-step", "1"], "--stop-at-step 1"),
        (["--workdir", "{in}/swapped", "train.steps=3"], "is not the tokenizer this run was trained with"),
        (["--workdir", "{ckpt}", "data.seq_len=32"], "data.seq_len"),
        # config keys and values
        (TINY + ["--workdir", "{tmp}", "train.nonsense=1"], "train.nonsense"),
        (TINY + ["--workdir", "{tmp}", "model.d_modl=64"], "model.d_modl"),
        (TINY + ["--workdir", "{tmp}", "nosection.x=1"], "nosection"),
        (TINY + ["--workdir", "{tmp}", "model=3"], "section model"),
        (TINY + ["--workdir", "{tmp}", "train.steps"], "section.field=value"),
        (TINY + ["--workdir", "{tmp}", "model.d_model=abc"], "model.d_model"),
        (TINY + ["--workdir", "{tmp}", "model.n_layers=1.5"], "model.n_layers"),
        (TINY + ["--workdir", "{tmp}", "decode.prompt_buckets=5"], "decode.prompt_buckets"),
        (TINY + ["--workdir", "{tmp}", "model.n_layers=0"], "model.n_layers"),
        (TINY + ["--workdir", "{tmp}", "train.learning_rate=-1"], "train.learning_rate"),
        (TINY + ["--workdir", "{tmp}", "model.compute_dtype=float8"], "model.compute_dtype"),
        (TINY + ["--workdir", "{tmp}", "model.attention_impl=flash"], "model.attention_impl"),
        (TINY + ["--workdir", "{tmp}", "model.mask_token_id=9999"], "model.mask_token_id"),
        (TINY + ["--workdir", "{tmp}", "data.seq_len=30"], "data.seq_len"),
        (TINY + ["--workdir", "{tmp}", "data.holdout_fraction=1.5"], "data.holdout_fraction"),
        (TINY + ["--workdir", "{tmp}", "train.grad_accum_steps=3"], "train.grad_accum_steps"),
        (TINY + ["--workdir", "{tmp}", "decode.top_p=0"], "decode.top_p"),
        (TINY + ["--workdir", "{tmp}", "mesh.data=3"], "mesh sizes"),
        (TINY + ["--workdir", "{tmp}", "model.param_dtype=bfloat16"], "train.allow_low_precision_params"),
        # YAML shape
        (["--config", "/no/such.yaml", "--workdir", "{tmp}"], "/no/such.yaml"),
        (["--config", "{in}/list.yaml", "--workdir", "{tmp}"], "must hold a mapping"),
        (["--config", "{in}/empty.yaml", "--workdir", "{tmp}"], "empty.yaml is empty"),
        (["--config", "{in}/broken.yaml", "--workdir", "{tmp}"], "cannot parse config file"),
        (["--config", "{in}/scalar_section.yaml", "--workdir", "{tmp}"], "section model"),
        (["--config", "{in}/unknown_section.yaml", "--workdir", "{tmp}"], "modle"),
        (["--config", "{in}/unknown_key.yaml", "--workdir", "{tmp}"], "model.d_modl"),
        # data sources
        (TINY + ["--workdir", "{tmp}", "data.corpus=files", "data.paths=[/no/such/file.txt]"], "/no/such/file.txt"),
        (TINY + ["--workdir", "{tmp}", "data.corpus=nope"], "data.corpus"),
        (TINY + ["--workdir", "{tmp}", "data.corpus=files"], "data.paths"),
        (TINY + ["--workdir", "{tmp}", "data.corpus=files", "data.paths=[{in}/one_doc.txt]"], "at least 2 documents"),
        (TINY + ["--workdir", "{tmp}", "data.corpus=files", "data.paths=[{in}/no_text_files]"], "no_text_files"),
        (TINY + ["--workdir", "{tmp}", "data.corpus=files", "data.paths=[{in}/fake.gguf]"], "fake.gguf"),
        (TINY + ["--workdir", "{tmp}", "data.tokenizer=/no/tok.json"], "/no/tok.json"),
        (TINY + ["--workdir", "{tmp}", "data.tokenizer={in}/one_doc.txt"], "one_doc.txt"),
        (TINY + ["--workdir", "{tmp}", "train.init_from=/no/init"], "/no/init"),
        (TINY + ["--workdir", "{tmp}", "train.init_from={in}"], "no checkpoint found"),
    ],
    "infer.generate": [
        # prompts
        (["--checkpoint", "{ckpt}", "--prompt", ""], "prompt 0 is empty"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", ""], "prompt 0 is empty"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3,x"], "--prompt-ids"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "99999"], "outside the vocabulary"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", LONG_PROMPT], "decode.prompt_buckets"),
        (["--checkpoint", "{ckpt}", "--prompt", "hi", "--chat"], "no chat template"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--chat"], "--chat needs --prompt"),
        # sampling knobs
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--temperature", "-1"], "--temperature"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--top-p", "1.5"], "--top-p"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--top-k", "-1"], "--top-k"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--beta", "2"], "--beta"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--mode", "fast"], "--mode"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "decode.temperature=-1"], "decode.temperature"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "decode.nonsense=1"], "decode.nonsense"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "model.d_model=8"], "decode.field=value"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "decode.prompt_buckets=[64,16]"], "decode.prompt_buckets"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "decode.max_cache_len=8"], "decode.max_cache_len"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "decode.proposal_lengths=[2,3]"],
         "decode.proposal_lengths must include 1"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "decode.proposal_lengths=[1,2]", "--beta", "0.5"],
         "decode.beta must be 1"),
        # checkpoints
        (["--checkpoint", "/no/such/run", "--prompt-ids", "3"], "/no/such/run"),
        (["--checkpoint", "{in}/a_file", "--prompt-ids", "3"], "a_file is not a directory"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--step", "7"], "--step 7"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--block-size", "2"], "--allow-block-size-mismatch"),
    ],
    "infer.eval": [
        (["--checkpoint", "{ckpt}", "--num-prompts", "-1"], "--num-prompts"),
        (["--checkpoint", "{ckpt}", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["--checkpoint", "{ckpt}", "--eval-batches", "0"], "--eval-batches"),
        (["--checkpoint", "{ckpt}", "--step", "9"], "--step 9"),
        (["--checkpoint", "{ckpt}", "train.steps=3"], "train.steps=3"),
        (["--checkpoint", "{ckpt}", "mesh.tensor=3"], "mesh sizes"),
        (["--checkpoint", "{ckpt}", "decode.top_p=2"], "decode.top_p"),
        (["--checkpoint", "{ckpt}", "data.corpus=nope"], "data.corpus"),
        (["--checkpoint", "{ckpt}", "data.corpus=files", "data.paths=[/no/such.txt]"], "/no/such.txt"),
        (["--checkpoint", "{ckpt}", "--prompts", "chat"], "no chat template"),
        (["--checkpoint", "{ckpt}", "--eval-batches", "1", "--prompt-len", "100000"], "prompts of 100000 tokens"),
    ],
    "infer.bench": [
        (["--checkpoint", "{ckpt}", "--repeats", "-1"], "--repeats"),
        (["--checkpoint", "{ckpt}", "--batch-sizes", "1", "-2"], "--batch-sizes"),
        (["--checkpoint", "{ckpt}", "--prompt-len", "0"], "--prompt-len"),
        (["--checkpoint", "{ckpt}", "--proposal-sets", "1,x"], "--proposal-sets"),
        (["--checkpoint", "{ckpt}", "--step", "9"], "--step 9"),
        (["--checkpoint", "{ckpt}", "--draft", "/no/draft"], "/no/draft"),
        (["--checkpoint", "{ckpt}", "--block-sizes", "2", "--skip-latency"], "--allow-block-size-mismatch"),
        (["--checkpoint", "{ckpt}", "--prompts", "chat", "--skip-latency"], "no chat template"),
        (["--checkpoint", "{ckpt}", "--skip-latency", "--override", "decode.beta=0.5"], "with --checkpoint only"),
        (["--cost-only"], "--config"),
        (["--cost-only", "--config", "{in}/list.yaml"], "must hold a mapping"),
    ],
    "train.plan": [
        (["--config", "{in}/empty.yaml", "--devices", "1"], "empty.yaml is empty"),
        (["--config", "configs/tiny.yaml", "--devices", "1", "model.nonsense=1"], "model.nonsense"),
        (["--config", "{in}/cudnn.yaml", "--devices", "1"], "cudnn needs a GPU backend"),
    ],
    "train.import_checkpoint": [
        (["--from", "hf", "/no/such/model", "--out", "{tmp}"], "does not exist"),
        (["--from", "gguf", "/no/such.gguf", "--out", "{tmp}"], "does not exist"),
        (["--from", "gguf", "{in}/fake.gguf", "--out", "{tmp}"], "fake.gguf"),
        (["--from", "hf", "{in}/hf_broken", "--out", "{tmp}"], "config.json"),
        (["--from", "hf", "{in}/hf_no_config", "--out", "{tmp}"], "no config.json"),
        (["--from", "hf", "{in}/hf_no_config"], "--out"),
        (["--from", "hf", "{in}/hf_no_config", "--out", "{in}/hf_broken"], "already exists"),
        (["--from", "hf", "{in}/hf_no_config", "--out", "{tmp}", "--block-size", "0"], "--block-size"),
        (["--export-hf", "{tmp}", "--checkpoint", "/no/ckpt"], "/no/ckpt"),
    ],
}
CASES = [(module, i) for module, rows in ROWS.items() for i in range(len(rows))]
# (module, the row's first distinctive argument): rows refused from the command line or the config alone.
FAST = [("train.train", "--stop-at-step"), ("train.train", "{in}/a_file"), ("train.train", "--num-processes"),
        ("train.train", "model.d_modl=64"),
        ("train.train", "model=3"), ("train.train", "model.d_model=abc"), ("train.train", "model.n_layers=0"),
        ("train.train", "model.param_dtype=bfloat16"), ("train.train", "{in}/list.yaml"),
        ("train.train", "{in}/empty.yaml"), ("train.train", "{in}/broken.yaml"),
        ("train.train", "{in}/scalar_section.yaml"), ("train.train", "data.corpus=nope"),
        ("infer.generate", "--beta"), ("infer.generate", "--temperature"), ("infer.eval", "--eval-batches"),
        ("infer.bench", "--cost-only"),
        ("train.plan", "{in}/cudnn.yaml"),
        ("train.import_checkpoint", "/no/such/model")]
FAST_CASES = [(m, next(i for i, (argv, _) in enumerate(ROWS[m]) if arg in argv)) for m, arg in FAST]


def _case_id(module: str, index: int) -> str:
    common = {"--config", "configs/tiny.yaml", "--workdir", "{tmp}", "--checkpoint", "{ckpt}", "--prompt-ids", "3"}
    shown = " ".join(a for a in ROWS[module][index][0] if a not in common)
    return f"{module}:{shown[:60]}"


def _check(module: str, index: int, fresh: Path, r: dict) -> None:
    """Exit code 2 and one `error:` line naming the culprit, the last line of stderr; before it at most argparse's
    usage block (which starts with `usage:`), no traceback and no warnings."""
    expected = ROWS[module][index][1]
    assert r["code"] == 2, r["stderr"]
    assert "Traceback" not in r["stderr"], r["stderr"]
    lines = r["stderr"].strip().splitlines()
    assert "error: " in lines[-1] and expected in lines[-1], r["stderr"]
    assert len(lines) == 1 or lines[0].startswith("usage:"), r["stderr"]
    assert not fresh.exists()  # a refused run (or import) leaves nothing behind


@pytest.mark.parametrize("module,index", FAST_CASES, ids=[_case_id(m, i) for m, i in FAST_CASES])
def test_bad_input_exits_2_in_process(tmp_path, module, index):
    """The FAST rows through main() in this process: no checkpoint needed (the {ckpt} path does not exist)."""
    import importlib

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, text in {"a_file": "x\n", "list.yaml": "- model\n", "empty.yaml": "",
                       "broken.yaml": "model: {d_model: 64\n  n_layers: [\n", "scalar_section.yaml": "model: 3\n",
                       "cudnn.yaml": CUDNN_YAML}.items():
        (inputs / name).write_text(text)
    fresh = tmp_path / "fresh"
    argv = [a.format(ckpt=tmp_path / "no_ckpt", tmp=fresh, **{"in": inputs}) for a in ROWS[module][index][0]]
    _check(module, index, fresh, run_row(importlib.import_module(module).main, argv))


@pytest.fixture(scope="module")
def results(ckpt, inputs, tmp_path_factory) -> dict:
    """module -> [(the row's fresh path {tmp}, {"code", "stderr"})], every row of a CLI run in one subprocess."""
    base = tmp_path_factory.mktemp("rows")
    out = {}
    for module, rows in ROWS.items():
        fresh = [base / f"{module}-{i}" for i in range(len(rows))]
        argvs = [[a.format(ckpt=ckpt, tmp=t, **{"in": inputs}) for a in argv] for (argv, _), t in zip(rows, fresh)]
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_cli_rows.py"), module], input=json.dumps(argvs),
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[module] = list(zip(fresh, map(json.loads, proc.stdout.splitlines())))
    return out


@pytest.mark.slow  # ~1.5 min on 2 busy CPU cores: the checkpoint, then one process per CLI
@pytest.mark.parametrize("module,index", CASES, ids=[_case_id(m, i) for m, i in CASES])
def test_bad_input_exits_2_with_one_line(results, module, index):
    fresh, r = results[module][index]
    _check(module, index, fresh, r)


@pytest.mark.slow
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
