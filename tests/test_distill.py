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
    # Unusable outputs are refused before the model loads (they failed with a traceback at the first write).
    assert distill_main(["--checkpoint", str(base / "base"), "--out", str(base), "--chat", "1"]) == 2
    assert "is not a regular file" in capsys.readouterr().err
    assert distill_main(["--checkpoint", str(base / "base"), "--out", "/proc/nope/x.jsonl", "--chat", "1"]) == 2
    assert "cannot lock /proc/nope/x.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_distill_cli_refuses_a_non_finite_temperature(base, capsys, value):
    """The sweep's D5: --temperature nan wrote ids past the vocabulary into the training data, and exited 0."""
    out = base / f"t_{value}.jsonl"
    with pytest.raises(SystemExit) as e:
        distill_main(["--checkpoint", str(base / "base"), "--out", str(out), "--temperature", value])
    assert e.value.code == 2 and "--temperature must be a finite number >= 0" in capsys.readouterr().err
    spec = DistillSpec(checkpoint=str(base / "base"), chat=1, corpus_prompts=0, temperature=float(value))
    with pytest.raises(ValueError, match="temperature"):  # the library refuses it too, before writing anything
        distill(spec, out, progress=False)
    assert not out.exists() and not out.with_name(out.name + ".meta.json").exists()


def test_distill_resumes_only_its_own_intact_file(base, capsys):
    """D9: an existing OUT without OUT.meta.json (garbage here) used to be resumed, its garbage line counted as a
    finished prompt; D13: a corrupt line mid-file was kept. Both are refused naming the file (and the line), the
    files untouched; a last line cut by a crash is still dropped and regenerated (D12), giving the same file, as does
    distilling in parts (stop_after)."""
    foreign = base / "foreign.jsonl"
    foreign.write_text("garbage not json\n")
    spec = DistillSpec(checkpoint=str(base / "base"), chat=3, corpus_prompts=2, prompt_tokens=8, max_new_tokens=6,
                       batch_size=2)
    with pytest.raises(ConfigError, match=f"{foreign} exists but has no foreign.jsonl.meta.json"):
        distill(spec, foreign, progress=False)
    assert distill_main(["--checkpoint", str(base / "base"), "--out", str(foreign), "--chat", "3",
                         "--corpus-prompts", "2", "--no-progress"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert foreign.read_text() == "garbage not json\n" and not (base / "foreign.jsonl.meta.json").exists()

    out = base / "own.jsonl"
    distill(spec, out, progress=False)
    whole = out.read_bytes()
    lines = whole.splitlines(keepends=True)
    assert len(lines) == 5
    out.write_bytes(b"".join(lines[:3]) + lines[3][:len(lines[3]) // 2])  # killed while writing line 4
    distill(spec, out, progress=False)
    assert out.read_bytes() == whole
    parts = base / "parts.jsonl"  # distilled in parts: stop after 3 records, ask for 1 (nothing to do), then the rest
    for stop_after, records in ((3, 3), (1, 3), (None, 5)):
        distill(spec, parts, progress=False, stop_after=stop_after)
        assert parts.read_bytes() == b"".join(lines[:records])
    for number, bad in [(2, b'{"ids": [1, 2\n'), (1, b'{"ids": [1, 2], "source": "chat"}\n'),
                        (4, b'{"ids": [-3], "source": "chat", "prompt_tokens": 1}\n')]:
        damaged = b"".join(lines[:number - 1]) + bad + b"".join(lines[number:])
        out.write_bytes(damaged)
        with pytest.raises(ConfigError, match=f"{out} line {number} is damaged"):
            distill(spec, out, progress=False)
        assert out.read_bytes() == damaged


def test_distill_mix_renders_chat_sources_and_continues_text_sources(base, tiny_config):
    from tidar_jax.data import prompt_mix
    from tidar_jax.data.chat import encode_chat

    out = base / "data" / "mix.jsonl"
    spec = DistillSpec(checkpoint=str(base / "base"), chat=0, corpus_prompts=0, max_new_tokens=4, batch_size=4,
                       mix="ask=2,code=1,continue-prose=2", compute_dtype="bfloat16")
    distill(spec, out, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    bundle = load_for_inference(base / "base")
    expected = prompt_mix.prompt_mix({"ask": 2, "code": 1, "continue-prose": 2}, 0)
    assert [r["source"] for r in rows] == [s for s, _ in expected]
    for r, (source, text) in zip(rows, expected):
        want = (encode_chat(base / "base", [{"role": "user", "content": text}]) if prompt_mix.is_chat(source)
                else bundle.tokenizer.encode(text))
        assert r["ids"][:r["prompt_tokens"]] == want
    with pytest.raises(ConfigError, match="--mix part 'poems=3'"):
        distill(dataclasses.replace(spec, mix="poems=3"), base / "data" / "bad.jsonl", progress=False)
    assert not (base / "data" / "bad.jsonl").exists()


def test_distill_refuses_a_token_limit_past_its_cache_bound(base):
    out = base / "data" / "long.jsonl"
    spec = DistillSpec(checkpoint=str(base / "base"), chat=1, corpus_prompts=0, max_new_tokens=100_000)
    with pytest.raises(ConfigError, match="lower --max-new-tokens"):
        distill(spec, out, progress=False)
    assert not out.exists()
