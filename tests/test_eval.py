"""infer/eval.py and tidar_jax/evals/likelihood.py on tiny random checkpoints written with save_inference_checkpoint.

References: a direct causal forward + losses.ar_loss and a direct 2S-layout forward + losses.tidar_loss over the
same held-out batches (summed by target counts here), the byte length of the decoded held-out text, and Generator's
AR decoding. The held-out data is a small synthetic ASCII corpus (so decoded text has exactly one byte per char).
"""

import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer import eval as eval_cli
from tidar_jax.checkpoint.inference import save_inference_checkpoint
from tidar_jax.config import replace
from tidar_jax.data import pipeline
from tidar_jax.data.tokenizer import Tokenizer, train_bpe
from tidar_jax.evals.likelihood import token_byte_lengths
from tidar_jax.layout import masks, proposals
from tidar_jax.model.transformer import create_model, forward
from tidar_jax.training import losses

EVAL_ARGS = ["--eval-batches", "3", "--num-prompts", "2", "--prompt-len", "8", "--max-new-tokens", "8",
             "--samples", "1"]


def synthetic_docs(n_docs=40, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    return [" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + "."
                     for _ in range(rng.randint(4, 10))) + "\n" for _ in range(n_docs)]


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TIDAR_JAX_CACHE_DIR", str(tmp_path / "token-cache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(config overrides for a `files` corpus, tokenizer.json path) shared by every run of the module."""
    root = tmp_path_factory.mktemp("corpus")
    docs = synthetic_docs()
    for i, doc in enumerate(docs):
        (root / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    tokenizer_file = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(docs, 512, tokenizer_file)
    return {"corpus": "files", "paths": (str(root),), "holdout_fraction": 0.15}, tokenizer_file


def make_run(tmp_path_factory, tiny_config, corpus, name, objective="tidar", model=None, seed=0):
    """A params-only checkpoint of a random tiny model (matrices scaled up so greedy outputs vary)."""
    data_overrides, tokenizer_file = corpus
    cfg = replace(tiny_config, data=data_overrides, train={"objective": objective},
                  model=model or {}, decode={"max_cache_len": 64, "prompt_buckets": (8, 16)})
    params = nnx.split(create_model(cfg.model, seed=seed))[1]
    params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, params)
    workdir = tmp_path_factory.mktemp(name)
    save_inference_checkpoint(workdir, cfg, params, tokenizer_file=tokenizer_file)
    return workdir, cfg, params


@pytest.fixture(scope="module")
def tidar_run(tmp_path_factory, tiny_config, corpus):
    return make_run(tmp_path_factory, tiny_config, corpus, "tidar")


def _reference(cfg, params, tokenizer):
    """Count-weighted held-out metrics from direct forwards, and the bytes of the decoded target text."""
    graphdef = nnx.graphdef(create_model(cfg.model))
    sums = dict(ar=0.0, ar_n=0.0, diff=0.0, diff_n=0.0, bytes=0)
    for batch in pipeline.make_eval_batches(cfg, tokenizer, 3):
        tokens, valid = jnp.asarray(batch["tokens"]), jnp.asarray(batch["valid"])
        b, s = tokens.shape
        causal = masks.with_key_padding(masks.causal_mask(s), valid)
        logits, _ = forward(graphdef, params, tokens, jnp.broadcast_to(jnp.arange(s), (b, s)), causal)
        m = losses.ar_loss(logits, tokens, valid)[1]
        sums["ar"] += float(m["ar_loss"] * m["ar_count"])
        sums["ar_n"] += float(m["ar_count"])
        hybrid = masks.with_key_padding(masks.training_mask(s, cfg.model.block_size), jnp.concatenate([valid] * 2, 1))
        logits2, _ = forward(graphdef, params, masks.training_inputs(tokens, cfg.model.mask_token_id),
                             jnp.broadcast_to(masks.training_positions(s), (b, 2 * s)), hybrid)
        d = losses.tidar_loss(logits2, tokens, valid, cfg.model.block_size)[1]
        sums["diff"] += float(d["diff_loss"] * d["diff_count"])
        sums["diff_n"] += float(d["diff_count"])
        for row, ok in zip(np.asarray(tokens), np.asarray(valid)):
            targets = row[1:][ok[1:] & ok[:-1]]
            sums["bytes"] += len(tokenizer.decode(targets, skip_special_tokens=True).encode("utf-8"))
    return sums


@pytest.mark.slow  # ~25 s (default suite under 10 min on 2 cores)
def test_eval_matches_direct_loss_computation(tidar_run, tmp_path, capsys):
    workdir, cfg, params = tidar_run
    out = tmp_path / "eval.json"
    assert eval_cli.main(["--checkpoint", str(workdir), "--json", str(out)] + EVAL_ARGS) == 0
    assert "identical to AR greedy output: True  (2 exact, 0 near-tie, 0 mismatching rows of 2; strict float32 " \
           "check passed)" in capsys.readouterr().out
    report = json.loads(out.read_text())
    h = report["heldout"]
    ref = _reference(cfg, params, Tokenizer.from_file(workdir / "tokenizer.json"))
    assert h["objective"] == "tidar" and h["num_targets"] == ref["ar_n"] > 0
    assert h["ar_loss"] == pytest.approx(ref["ar"] / ref["ar_n"], rel=1e-5)
    assert h["diff_loss"] == pytest.approx(ref["diff"] / ref["diff_n"], rel=1e-5)
    assert h["perplexity"] == pytest.approx(math.exp(h["ar_loss"]), rel=1e-9)
    assert h["bytes"] == ref["bytes"]
    assert h["bits_per_byte"] == pytest.approx(ref["ar"] / math.log(2) / ref["bytes"], rel=1e-5)
    assert h["loss"] == pytest.approx((h["ar_loss"] + h["diff_loss"]) / 2, rel=1e-9)
    slots = h["diff_slot_accuracy"]
    assert len(slots) == cfg.model.block_size and all(0.0 <= a <= 1.0 for a in slots)
    d, k = report["decoding"], cfg.model.block_size
    assert d["tidar_equals_ar"] is True  # beta = 1 greedy TiDAR is lossless
    a = d["tidar_vs_ar"]
    assert (a["rows"], a["exact_match_rows"], a["verdict"], a["strict_ok"]) == (2, 2, "exact", True)
    assert d["matmul_precision"] == "highest"  # float32: the strict check runs on full float32 dots
    assert d["ar"]["tokens_per_forward"] == 1.0 and 1.0 <= d["tidar"]["tokens_per_forward"] <= cfg.model.block_size
    assert d["tidar"]["new_tokens"] == d["ar"]["new_tokens"] == 2 * 8
    hist = d["tidar"]["acceptance_histogram"]  # the suggested sparse proposal set comes from it
    assert [s["query_tokens"] for s in d["proposal_sets"]] == [k + m * k for m in range(1, k + 1)]
    assert d["suggested_proposal_lengths"] == proposals.suggest_set(hist, 0.02)["proposal_lengths"]
    assert len(report["samples"]) == 1 and report["samples"][0]["prompt"]
    assert all(math.isfinite(v) for v in (h["ar_loss"], h["diff_loss"], h["bits_per_byte"], h["ar_accuracy"]))


def test_ar_objective_reports_only_the_ar_part(tmp_path_factory, tiny_config, corpus, tmp_path, capsys):
    workdir, cfg, params = make_run(tmp_path_factory, tiny_config, corpus, "ar", objective="ar", seed=3)
    out = tmp_path / "eval.json"
    assert eval_cli.main(["--checkpoint", str(workdir), "--json", str(out)] + EVAL_ARGS) == 0
    report = json.loads(out.read_text())
    h = report["heldout"]
    assert h["objective"] == "ar" and not any(key.startswith("diff") for key in h) and "loss" not in h
    ref = _reference(cfg, params, Tokenizer.from_file(workdir / "tokenizer.json"))
    assert h["ar_loss"] == pytest.approx(ref["ar"] / ref["ar_n"], rel=1e-5)
    assert set(report["decoding"]) >= {"ar"} and "tidar" not in report["decoding"]
    printed = capsys.readouterr().out
    assert "AR perplexity" in printed and "diffusion" not in printed


def test_token_byte_lengths_count_utf8_bytes(corpus):
    tokenizer = Tokenizer.from_file(corpus[1])
    lengths = token_byte_lengths(tokenizer, 520)
    assert lengths.shape == (520,) and lengths[tokenizer.eos_id] == lengths[tokenizer.mask_id] == 0
    assert (lengths[512:] == 0).all()
    for text in ["plain words here", "héllo wörld 日本語 🚀 mixed", "  tabs\tand\nnewlines "]:
        assert lengths[tokenizer.encode(text)].sum() == len(text.encode("utf-8"))


def test_bad_input_gives_clear_error(tidar_run, tmp_path, capsys):
    assert eval_cli.main(["--checkpoint", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    workdir = tidar_run[0]
    assert eval_cli.main(["--checkpoint", str(workdir), "data.seq_len=8"]) == 2
    assert "mesh.field=value, decode.field=value, data.corpus=NAME" in capsys.readouterr().err
