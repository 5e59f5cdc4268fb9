"""Bad inputs to the CLIs: each row must end with exit code 2, no traceback, and exactly one `error:` line naming
the offending flag / field / path; a refused training run leaves no workdir behind.

The rows of one CLI run in one subprocess (tests/_cli_rows.py calls its main() per row), so the table pays one jax
start-up per CLI, not per row. One tiny checkpoint (configs/tiny.yaml, 2 steps) serves every row; the corrupt-save
test and the Ctrl-C tests at the end (exit code 130, one line, nothing half-written) run the real commands, one
process each. Those are in the slow suite; the rows in FAST (refused before any checkpoint or corpus is read: flags,
output paths, problem files, Hugging Face files) also run in the default suite, in this process, as does the unit
test of the output-path probe every CLI runs first.
"""

from __future__ import annotations

import json
import os
import re
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


def _write_bad_files(d: Path) -> None:
    """The broken inputs that need no checkpoint: config files, HumanEval problem files and Hugging Face model
    directories, each wrong in one way."""
    files = {"list.yaml": "- model\n- data\n", "empty.yaml": "", "broken.yaml": "model: {d_model: 64\n  n_layers: [\n",
             "scalar_section.yaml": "model: 3\n", "unknown_section.yaml": "model:\n  d_model: 64\nmodle:\n  x: 1\n",
             "unknown_key.yaml": "model:\n  d_modl: 64\n", "one_doc.txt": "a single document\n",
             "a_file": "not a directory\n", "fake.gguf": "not a gguf file\n", "cudnn.yaml": CUDNN_YAML,
             "he_list.jsonl": "[1, 2]\n", "he_number.jsonl": "5\n", "he_null.jsonl": "null\n",
             "he_int_prompt.jsonl": json.dumps({**PROBLEM, "prompt": 5}) + "\n",
             "he_twice.jsonl": (json.dumps(PROBLEM) + "\n") * 2}
    for name, text in files.items():
        (d / name).write_text(text)
    latin1 = json.dumps({**PROBLEM, "prompt": "caf\xe9"}, ensure_ascii=False).encode("latin-1")  # not UTF-8
    (d / "he_latin1.jsonl").write_bytes(latin1 + b"\n")
    _hf_model(d / "hf_ok")
    _hf_model(d / "hf_nan", nan="model.layers.0.mlp.up_proj.weight")
    _hf_model(d / "hf_q_shape", shapes={"model.layers.0.self_attn.q_proj.weight": (32, 64)})
    _hf_model(d / "hf_truncated")
    weights = d / "hf_truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])


# A HumanEval problem in the file format, and a 1-layer Llama in Hugging Face's layout (no tokenizer).
PROBLEM = {"task_id": "F/0", "prompt": "def add(a, b):\n", "entry_point": "add",
           "canonical_solution": "    return a + b\n", "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
HF_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 64,
             "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
             "eos_token_id": 0, "tie_word_embeddings": True, "max_position_embeddings": 2048}


def _hf_model(out: Path, shapes: dict | None = None, nan: str | None = None) -> None:
    """config.json + model.safetensors of HF_CONFIG's random Llama; `shapes` replaces tensor shapes, `nan` names a
    tensor filled with NaN."""
    import numpy as np
    from safetensors.numpy import save_file

    layer = "model.layers.0."
    tensors = {"model.embed_tokens.weight": (64, 64), "model.norm.weight": (64,),
               layer + "input_layernorm.weight": (64,), layer + "post_attention_layernorm.weight": (64,),
               layer + "self_attn.q_proj.weight": (64, 64), layer + "self_attn.k_proj.weight": (32, 64),
               layer + "self_attn.v_proj.weight": (32, 64), layer + "self_attn.o_proj.weight": (64, 64),
               layer + "mlp.gate_proj.weight": (128, 64), layer + "mlp.up_proj.weight": (128, 64),
               layer + "mlp.down_proj.weight": (64, 128)} | (shapes or {})
    rng = np.random.default_rng(0)
    arrays = {name: rng.normal(0, 0.02, shape).astype(np.float32) for name, shape in tensors.items()}
    if nan:
        arrays[nan][:] = np.nan
    out.mkdir()
    (out / "config.json").write_text(json.dumps(HF_CONFIG))
    save_file(arrays, str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ckpt) -> Path:
    """Broken files the rows point at ({in}/...); {swapped}: a copy of the run whose tokenizer.json maps two
    tokens the other way round (a different tokenizer under the same name); {trimmed}: a copy whose tokenizer lost
    its last two tokens, so that the embedding has rows past the tokenizer (as imports pad it to a multiple of 64);
    {tasks}: an lm-eval task on held-out text."""
    d = tmp_path_factory.mktemp("inputs")
    _write_bad_files(d)
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
    trimmed = d / "trimmed"
    shutil.copytree(ckpt, trimmed)
    tok = json.loads((trimmed / "tokenizer.json").read_text())
    dropped = {t for t, i in tok["model"]["vocab"].items() if i >= 510}
    tok["model"]["vocab"] = {t: i for t, i in tok["model"]["vocab"].items() if t not in dropped}
    tok["model"]["merges"] = [m for m in tok["model"]["merges"]
                              if "".join(m.split(" ") if isinstance(m, str) else m) not in dropped]
    (trimmed / "tokenizer.json").write_text(json.dumps(tok))
    from tidar_jax.evals.local_tasks import write_rolling_task

    write_rolling_task(d / "tasks", 4)
    return d


CUDNN_YAML = "model:\n  attention_impl: cudnn\n  compute_dtype: bfloat16\n"  # valid, but not on this CPU
LONG_PROMPT = ",".join(["5"] * 300)  # more tokens than the tiny preset's largest prompt bucket (128)
LM_EVAL = ["--model", "tidar_jax", "--include_path", "{in}/tasks", "--tasks", "tidar_bbc_heldout", "--limit", "2"]

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
        # outputs
        (TINY + ["--workdir", "{in}/a_file/run"], "--workdir"),
    ],
    "infer.generate": [
        # prompts
        (["--checkpoint", "{ckpt}", "--prompt", ""], "prompt 0 is empty"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", ""], "prompt 0 is empty"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3,x"], "--prompt-ids"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3,,4"], "none left empty"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3,"], "none left empty"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "2,2"], "pad id 2"),
        (["--checkpoint", "{in}/trimmed", "--prompt-ids", "3,511"], "outside the tokenizer's ids [0, 510)"),
        (["--checkpoint", "{ckpt}", "--prompt", "caf\udce9 au lait"], "not valid UTF-8"),
        (["--checkpoint", "{ckpt}", "--prompt", "hi", "--chat-special-tokens"], "only applies with --chat"),
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
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--mode", "ar", "--beta", "0.5"], "--mode ar"),
        (["--checkpoint", "{ckpt}", "--prompt-ids", "3", "--seed", str(2**70)], "--seed"),
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
        (["--checkpoint", "{ckpt}", "--eval-batches", "1", "--max-new-tokens", "100000"], "decode.max_cache_len=256"),
        (["--checkpoint", "{ckpt}", "--near-tie-epsilon", "-1"], "--near-tie-epsilon"),
        (["--checkpoint", "{ckpt}", "--json", "{in}/a_file/eval.json"], "--json"),
    ],
    "infer.humaneval": [
        (["--checkpoint", "{ckpt}", "--problems", "{in}/he_list.jsonl"], "must be a JSON object, got [1, 2]"),
        (["--checkpoint", "{ckpt}", "--problems", "{in}/he_number.jsonl"], "must be a JSON object, got 5"),
        (["--checkpoint", "{ckpt}", "--problems", "{in}/he_null.jsonl"], "must be a JSON object, got null"),
        (["--checkpoint", "{ckpt}", "--problems", "{in}/he_int_prompt.jsonl"], "['prompt'] must be strings"),
        (["--checkpoint", "{ckpt}", "--problems", "{in}/he_latin1.jsonl"], "he_latin1.jsonl"),
        (["--checkpoint", "{ckpt}", "--problems", "{in}/he_twice.jsonl"], "repeats line 1"),
        (["--checkpoint", "{ckpt}", "--problems", "{in}/he_twice.jsonl", "--json", "{in}/a_file/he.json"], "--json"),
        (["--checkpoint", "{ckpt}", "--problems", "{in}/he_twice.jsonl", "--json", "{in}"], "is a directory"),
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
        (["--checkpoint", "{ckpt}", "--skip-latency", "--max-new-tokens", "100000"], "decode.max_cache_len=256"),
        (["--checkpoint", "{ckpt}", "--near-tie-epsilon", "-1"], "--near-tie-epsilon"),
        (["--checkpoint", "{ckpt}", "--skip-generation", "--skip-latency"], "nothing to measure"),
        (["--checkpoint", "{ckpt}", "--json", "{in}/a_file/bench.json"], "--json"),
        (["--checkpoint", "{ckpt}", "--plot-dir", "{in}/a_file/plots"], "--plot-dir"),
        (TINY + ["--cost-only", "--peak-tflops", "0"], "--peak-tflops"),
        (TINY + ["--cost-only", "--peak-tflops", "-5"], "--peak-tflops"),
        (TINY + ["--cost-only", "--bandwidth-gbs", "0"], "--bandwidth-gbs"),
        (TINY + ["--cost-only", "--bandwidth-gbs", "nan"], "--bandwidth-gbs"),
        (TINY + ["--cost-only", "--cache-len", str(10**12)], "--cache-len"),
        (TINY + ["--cost-only", "--override", "decode.beta=0.5"], "decode.beta=0.5"),
    ],
    "infer.tune": [
        (["--checkpoint", "{ckpt}", "--block-sizes", "1"], "--block-sizes"),
        (["--checkpoint", "{ckpt}", "--num-prompts", "0"], "--num-prompts"),
        (["--checkpoint", "{ckpt}", "train.steps=3"], "train.steps=3"),
        (["--checkpoint", "{ckpt}", "--json", "{in}/a_file/tune.json"], "--json"),
    ],
    "train.plan": [
        (["--config", "{in}/empty.yaml", "--devices", "1"], "empty.yaml is empty"),
        (["--config", "configs/tiny.yaml", "--devices", "1", "model.nonsense=1"], "model.nonsense"),
        (["--config", "{in}/cudnn.yaml", "--devices", "1"], "cudnn needs a GPU backend"),
        (["--config", "configs/tiny.yaml", "--devices", "0"], "--devices"),
        (["--config", "configs/tiny.yaml", "--devices", "-1"], "--devices"),
    ],
    "train.train_tokenizer": [
        (["--out", "{in}/a_file/tokenizer.json", "--vocab-size", "300"], "--out"),
    ],
    "infer.adaptation_curve": [
        (["--run", "{tmp}", "--base", "{ckpt}"], "holds no finished checkpoints"),
        (["--run", "{ckpt}", "--base", "{ckpt}", "--json", "{in}/a_file/curve.json"], "--json"),
        (["--run", "{ckpt}", "--base", "{ckpt}", "--results-md", "{in}/one_doc.txt"], "lacks the markers"),
    ],
    "tidar_jax.evals.lm_eval_cli": [  # lm-eval logs a few lines first (see _check)
        (LM_EVAL + ["--model_args", "checkpoint=/no/such/run"], "/no/such/run"),
        (LM_EVAL + ["--model_args", "checkpoint={ckpt},mode=fast"], "mode"),
        (LM_EVAL + ["--model_args", "checkpoint={ckpt},batch_size=0"], "batch_size"),
        (LM_EVAL + ["--model_args", "checkpoint={ckpt},max_length=-5"], "max_length"),
        (LM_EVAL + ["--model_args", "checkpoint={ckpt},beta=2"], "decode.beta"),
        (LM_EVAL + ["--model_args", "checkpoint={ckpt},mode=ar,beta=0.5"], "mode=ar"),
        (LM_EVAL + ["--model_args", "checkpoint={ckpt}", "--output_path", "{in}/a_file/results"], "--output_path"),
        (LM_EVAL + ["--model_args", "checkpoint={ckpt}", "-o", "{in}/a_file/results.json"], "--output_path"),
    ],
    "train.import_checkpoint": [
        (["--from", "hf", "/no/such/model", "--out", "{tmp}"], "does not exist"),
        (["--from", "gguf", "/no/such.gguf", "--out", "{tmp}"], "does not exist"),
        (["--from", "gguf", "{in}/hf_broken", "--out", "{tmp}"], "is a directory, not a GGUF file"),
        (["--from", "gguf", "{in}/fake.gguf", "--out", "{tmp}"], "fake.gguf"),
        (["--from", "hf", "{in}/hf_broken", "--out", "{tmp}"], "config.json"),
        (["--from", "hf", "{in}/hf_no_config", "--out", "{tmp}"], "no config.json"),
        (["--from", "hf", "{in}/hf_no_config"], "--out"),
        (["--from", "hf", "{in}/hf_no_config", "--out", "{in}/hf_broken"], "already exists"),
        (["--from", "hf", "{in}/hf_no_config", "--out", "{tmp}", "--block-size", "0"], "--block-size"),
        (["--from", "hf", "{in}/hf_q_shape", "--out", "{tmp}"], "q_proj.weight' in "),
        (["--from", "hf", "{in}/hf_nan", "--out", "{tmp}"], "up_proj.weight' in "),
        (["--from", "hf", "{in}/hf_truncated", "--out", "{tmp}"], "hf_truncated/model.safetensors"),
        (["--from", "hf", "{in}/hf_ok", "--out", "{tmp}", "--block-size", "100000"], "choose K <= 44"),
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
        ("train.import_checkpoint", "/no/such/model"),
        # refused before anything is loaded: flags, output paths, problem files, Hugging Face files
        ("infer.generate", "3,,4"), ("infer.generate", "3,"), ("infer.generate", "caf\udce9 au lait"),
        ("infer.generate", "--chat-special-tokens"), ("infer.generate", "ar"), ("infer.generate", "--seed"),
        ("infer.eval", "--near-tie-epsilon"), ("infer.eval", "{in}/a_file/eval.json"),
        *[("infer.humaneval", argv[3]) for argv, _ in ROWS["infer.humaneval"][:6]],
        ("infer.humaneval", "{in}/a_file/he.json"), ("infer.humaneval", "{in}"),
        ("infer.bench", "--near-tie-epsilon"), ("infer.bench", "--skip-generation"),
        ("infer.bench", "{in}/a_file/bench.json"), ("infer.bench", "{in}/a_file/plots"),
        ("infer.bench", "--peak-tflops"), ("infer.bench", "-5"), ("infer.bench", "--bandwidth-gbs"),
        ("infer.bench", "nan"), ("infer.bench", "--cache-len"),
        ("infer.bench", "decode.beta=0.5"), ("train.plan", "0"), ("train.plan", "-1"),
        ("infer.tune", "--block-sizes"), ("infer.tune", "--num-prompts"), ("infer.tune", "train.steps=3"),
        ("infer.tune", "{in}/a_file/tune.json"),
        ("train.train_tokenizer", "--out"), ("infer.adaptation_curve", "{tmp}"),
        ("infer.adaptation_curve", "{in}/a_file/curve.json"), ("infer.adaptation_curve", "{in}/one_doc.txt"),
        ("tidar_jax.evals.lm_eval_cli", "{in}/a_file/results"), ("tidar_jax.evals.lm_eval_cli", "-o"),
        ("train.import_checkpoint", "{in}/hf_q_shape"), ("train.import_checkpoint", "{in}/hf_nan"),
        ("train.import_checkpoint", "{in}/hf_truncated"), ("train.import_checkpoint", "100000")]
FAST_CASES = [(m, next(i for i, (argv, _) in enumerate(ROWS[m]) if arg in argv)) for m, arg in FAST]


def _case_id(module: str, index: int) -> str:
    common = {"--config", "configs/tiny.yaml", "--workdir", "{tmp}", "--checkpoint", "{ckpt}", "--prompt-ids", "3"}
    argv = ROWS[module][index][0]
    argv = argv[len(LM_EVAL):] if argv[:len(LM_EVAL)] == LM_EVAL else argv
    shown = " ".join(a for a in argv if a not in common)
    return f"{module}:{shown[:60]}"


def _check(module: str, index: int, fresh: Path, r: dict) -> None:
    """Exit code 2 and one `error:` line naming the culprit, the last line of stderr; before it at most argparse's
    usage block (which starts with `usage:`), or lm-eval's own log lines, no traceback and no warnings."""
    expected = ROWS[module][index][1]
    assert r["code"] == 2, r["stderr"]
    assert "Traceback" not in r["stderr"], r["stderr"]
    lines = r["stderr"].strip().splitlines()
    assert "error: " in lines[-1] and expected in lines[-1], r["stderr"]
    if module == "tidar_jax.evals.lm_eval_cli":  # lm-eval logs "2026-12-07:10:50:36 INFO [...] ..." lines
        lines = [line for line in lines if not re.match(r"\d{4}-\d\d-\d\d:\d\d:\d\d:\d\d (INFO|WARNING) ", line)]
    assert len(lines) == 1 or lines[0].startswith("usage:"), r["stderr"]
    assert not fresh.exists()  # a refused run (or import) leaves nothing behind


@pytest.mark.parametrize("module,index", FAST_CASES, ids=[_case_id(m, i) for m, i in FAST_CASES])
def test_bad_input_exits_2_in_process(tmp_path, module, index):
    """The FAST rows through main() in this process: no checkpoint needed (the {ckpt} path does not exist)."""
    import importlib

    inputs = tmp_path / "in"
    inputs.mkdir()
    _write_bad_files(inputs)
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


def test_output_paths_are_probed_before_the_work(tmp_path, monkeypatch):
    """infer.common.check_writable, which every CLI runs on its output paths (--json, --out, --plot-dir,
    --output_path, --workdir) before any work: folders are made and a probe written and removed, so an
    unwritable path fails in the first second and leaves nothing behind."""
    import errno

    from infer import common
    from infer.common import OutputError, check_writable

    out = tmp_path / "new" / "deeper" / "report.json"
    check_writable(out, "--json")
    assert out.parent.is_dir() and list(out.parent.iterdir()) == []  # the folders a write would make; no probe
    check_writable(tmp_path / "plots", "--plot-dir", directory=True)
    assert list((tmp_path / "plots").iterdir()) == []
    check_writable(tmp_path / "run" / "sub", "--workdir", directory=True, create=False)
    assert not (tmp_path / "run").exists()  # probed in tmp_path, nothing created
    (tmp_path / "a_file").write_text("x")
    for path, kwargs, message in [(tmp_path / "a_file" / "r.json", {}, "a_file is not a directory"),
                                  (tmp_path / "plots", {}, "plots is a directory; give a file path"),
                                  (tmp_path / "a_file" / "run", dict(directory=True, create=False), "not a directory")]:
        with pytest.raises(OutputError, match=f"^--out {tmp_path}.*{message}"):
            check_writable(path, "--out", **kwargs)
    assert not (tmp_path / "a_file").is_dir()

    def read_only(*args, **kwargs):  # a read-only mount, which refuses root too (mode bits do not)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(common.tempfile, "TemporaryDirectory", read_only)
    with pytest.raises(OutputError, match=r"--json .*report.json: cannot write there \(Read-only file system\)"):
        check_writable(out, "--json")


def _popen(module: str, *args: str) -> subprocess.Popen:
    """`python -m MODULE ARGS` with stderr piped and Ctrl-C raising KeyboardInterrupt even where this test runs as
    a shell's background job, whose children start with SIGINT ignored."""
    run = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")
    return subprocess.Popen([sys.executable, "-c", run, module, *args], cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                            text=True)


def _interrupt_when(proc: subprocess.Popen, ready, timeout: float = 300) -> str:
    """Sends SIGINT (Ctrl-C) to `proc` once `ready()` holds; returns its stderr."""
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=timeout)[1]


@pytest.mark.slow
def test_ctrl_c_in_train_exits_130_at_a_finished_checkpoint(tmp_path):
    """Ctrl-C mid-training (saves every 2 steps, so often during one): exit 130, one line naming the newest
    finished checkpoint (the one a rerun resumes from), no traceback, not even Orbax's logged one."""
    work = tmp_path / "run"
    proc = _popen("train.train", *TINY, "--workdir", str(work), "train.steps=100000", "train.checkpoint_every=2",
                  "train.eval_every=100000", "--no-progress")
    err = _interrupt_when(proc, lambda: (work / "checkpoints" / "6").is_dir())
    assert proc.returncode == 130 and "Traceback" not in err and "ERROR" not in err, err
    last = err.strip().splitlines()[-1]
    step = max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
    assert last == f"error: interrupted; the newest checkpoint in {work} is step {step}; the same command resumes " \
                   "from it", err


@pytest.mark.slow
def test_ctrl_c_in_bench_exits_130_and_writes_nothing(ckpt, tmp_path):
    report = tmp_path / "bench.json"
    proc = _popen("infer.bench", "--checkpoint", str(ckpt), "--skip-latency", "--batch-sizes", "1", "--repeats", "20",
                  "--json", str(report))
    started = []  # the measuring has begun once the first group's progress line is out

    def measuring() -> bool:
        started.append(proc.stderr.readline())
        return started[-1].startswith("generation:")

    err = "".join(started) + _interrupt_when(proc, measuring)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "error: interrupted; nothing was written"
    assert not report.exists() and list(tmp_path.iterdir()) == []
