"""Self-distillation smoke test: the model's own greedy continuations become token-id training documents."""

import dataclasses
import json

import pytest
from flax import nnx

from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint
from tidar_jax.config import ConfigError, replace
from tidar_jax.data.chat_prompts import chat_prompts, encoded_chat_prompts
from tidar_jax.data.pipeline import load_or_train_tokenizer, split_token_stream
from tidar_jax.decoding.generation import Generator
from tidar_jax.model.transformer import create_model
from tidar_jax.training.distill import DistillSpec, distill
from train.distill import main as distill_main


@pytest.fixture(scope="module")
def base(tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tok_file = root / "tok.json"
    load_or_train_tokenizer(tiny_config).save(tok_file)
    save_inference_checkpoint(root / "base", tiny_config, nnx.split(create_model(tiny_config.model))[1],
                              tokenizer_file=tok_file)
    (root / "base" / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:")
    return root


def test_chat_prompt_splits_share_no_topic():
    train, held = chat_prompts("train"), chat_prompts("heldout")
    assert len(train) > 4 * len(held) > 0 and not set(train) & set(held)
    assert not {p.split()[-1] for p in held if p.startswith("What is")} & {p.split()[-1] for p in train
                                                                           if p.startswith("What is")}


def test_distill_writes_the_models_own_greedy_continuations(base, tiny_config):
    out = base / "data" / "d.jsonl"
    spec = DistillSpec(checkpoint=str(base / "base"), chat=3, corpus_prompts=2, prompt_tokens=8, max_new_tokens=6,
                       batch_size=2)
    distill(spec, out, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in rows] == ["chat"] * 3 + ["bbc-news"] * 2
    bundle = load_for_inference(base / "base")
    prompts = [r["ids"][:r["prompt_tokens"]] for r in rows]
    assert prompts[:3] == encoded_chat_prompts(base / "base", "train", 3)
    reference = Generator(bundle.graphdef, bundle.params, bundle.config.model, tiny_config.decode).generate(
        prompts, "ar", 6, temperature=0.0)
    assert [r["ids"][r["prompt_tokens"]:] for r in rows] == reference.tokens
    # Re-running resumes (nothing to add); other settings for the same file are refused, the file untouched.
    before = out.read_text()
    distill(spec, out, progress=False)
    assert out.read_text() == before
    with pytest.raises(ConfigError, match="generated with other settings"):
        distill(dataclasses.replace(spec, max_new_tokens=7), out, progress=False)
    # Training reads the ids as they are, each document followed by the separator.
    cfg = replace(tiny_config, data={"corpus": "files", "paths": (str(out),), "holdout_fraction": 0.2})
    stream = split_token_stream(cfg, bundle.tokenizer, "train").tolist()
    assert any(stream[i:i + len(r["ids"])] == r["ids"] for r in rows for i in range(len(stream)))


def test_distill_cli_rejects_bad_input(base, capsys):
    with pytest.raises(SystemExit) as e:
        distill_main(["--checkpoint", str(base / "base"), "--out", str(base / "x.jsonl"), "--chat", "0",
                      "--corpus-prompts", "0"])
    assert e.value.code == 2 and "nothing to generate" in capsys.readouterr().err
    assert distill_main(["--checkpoint", str(base / "missing"), "--out", str(base / "y.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
