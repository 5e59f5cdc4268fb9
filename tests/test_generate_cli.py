"""`python -m infer.generate` in-process: a random tiny model saved with `save_inference_checkpoint` and reloaded by
the CLI must print what `Generator` produces. The reference Generator runs on the same restored params (on one
device, as the CLI's), so both share compiled programs; the save / load round trip is checkpoint.py's test."""

import dataclasses
import json
import os

import pytest
from flax import nnx

from infer.generate import main
from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint, with_model
from tidar_jax.checkpoint.store import CheckpointError
from tidar_jax.config import replace
from tidar_jax.data.tokenizer import train_bpe
from tidar_jax.decoding.generation import Generator
from tidar_jax.model.transformer import create_model, resolved_config
from tidar_jax.ops import cpu_kernels

OVERRIDES = ["decode.max_cache_len=48", "decode.prompt_buckets=[16,32]"]
NEW = 12  # also the reference Generator's capacity, so that it reuses the CLI's compiled programs


@pytest.fixture(scope="module")
def checkpoint(tiny_config, tmp_path_factory):
    """(workdir, config, reference Generator, tokenizer): random weights plus a BPE trained on stdlib source."""
    cfg = replace(tiny_config, decode={"max_cache_len": 48, "prompt_buckets": (16, 32), "max_new_tokens": NEW})
    graphdef, params = nnx.split(create_model(cfg.model, seed=3))
    workdir = tmp_path_factory.mktemp("generate_cli")
    sources = [open(os.path.join(os.path.dirname(os.__file__), name)).read() for name in ("argparse.py", "ast.py")]
    tokenizer = train_bpe(sources, cfg.model.vocab_size, workdir / "bpe.json")
    save_inference_checkpoint(workdir / "run", cfg, params, tokenizer_file=workdir / "bpe.json")
    bundle = load_for_inference(workdir / "run")
    return workdir / "run", cfg, Generator(bundle.graphdef, bundle.params, cfg.model, cfg.decode), tokenizer


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # a flag refused by argparse (parser.error), as `python -m infer.generate` exits
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_json_output_equals_generator(checkpoint, capsys):
    workdir, cfg, generator, _ = checkpoint
    code, out, err = _run(["--checkpoint", str(workdir), "--prompt-ids", "5,6,7,8", "--max-new-tokens", str(NEW),
                           "--mode", "tidar", "--temperature", "0.9", "--top-k", "20", "--seed", "4", "--json",
                           *OVERRIDES], capsys)
    assert code == 0, err
    summary = json.loads(out)
    expected = generator.generate([[5, 6, 7, 8]], "tidar", NEW, seed=4, temperature=0.9, top_k=20)
    assert summary["token_ids"] == expected.tokens[0] and len(summary["token_ids"]) == NEW
    assert summary["forwards"] == expected.forwards
    assert summary["tokens_per_forward"] == pytest.approx(NEW / summary["forwards"])
    assert summary["tokens_per_second"] > 0 and summary["block_size"] == cfg.model.block_size
    assert isinstance(summary["text"], str)
    # What ran: the backend's concrete attention (never "auto"), and the unrolled layers decoding defaults to.
    assert summary["attention_impl"] == resolved_config(cfg.model).attention_impl != "auto"
    assert summary["compute_dtype"] == cfg.model.compute_dtype and summary["scan_layers"] is False
    # The tiny model's head_dim 16 in float32 is a CPU kernel shape: with a compiler here it ran.
    assert summary["cpu_attention_kernel"] is cpu_kernels.available()


def test_streamed_text_equals_generator(checkpoint, capsys):
    workdir, cfg, generator, tokenizer = checkpoint
    code, out, err = _run(["--checkpoint", str(workdir), "--prompt", "def parse(self", "--max-new-tokens",
                           str(NEW), "--mode", "ar", *OVERRIDES], capsys)
    assert code == 0, err
    expected = generator.generate([tokenizer.encode("def parse(self")], "ar", NEW)
    assert out.rstrip("\n") == tokenizer.decode(expected.tokens[0], skip_special_tokens=True)
    assert f"{NEW} tokens, {NEW} forwards" in err


def test_mesh_overrides_decode_sharded_with_the_same_output(checkpoint, capsys):
    workdir, _, generator, _ = checkpoint
    code, out, err = _run(["--checkpoint", str(workdir), "--prompt-ids", "5,6,7", "--mode", "tidar", "--json",
                           "--max-new-tokens", str(NEW), "mesh.data=1", "mesh.tensor=2", *OVERRIDES], capsys)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == generator.generate([[5, 6, 7]], "tidar", NEW).tokens[0]


@pytest.mark.parametrize("argv,message", [
    (["--prompt-ids", "5,x"], "comma-separated integers"),
    (["--prompt-ids", "5,512"], "outside the vocabulary"),
    (["--prompt-ids", "5,1"], "mask token"),
    (["--prompt-ids", ""], "empty"),
    (["--prompt-ids", "5", "train.steps=3"], "only decode"),
    (["--prompt-ids", "5", "--block-size", "2"], "trained block size"),
    (["--prompt-ids", "5", "mesh.data=1", "mesh.tensor=16"], "need 16 devices"),
])
def test_bad_requests_fail_with_clear_errors(checkpoint, capsys, argv, message):
    code, out, err = _run(["--checkpoint", str(checkpoint[0]), *argv, *OVERRIDES], capsys)
    assert code == 2 and message in err and out == ""


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    code, _, err = _run(["--checkpoint", str(tmp_path / "nowhere"), "--prompt-ids", "5"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = _run(["--checkpoint", str(tmp_path), "--prompt-ids", "5"], capsys)
    assert code == 2 and "no checkpoint" in err


def test_chat_wraps_the_prompt_in_the_checkpoint_template(checkpoint, capsys, tmp_path):
    import shutil

    from tidar_jax.data.chat import encode_chat

    workdir, _, generator, _ = checkpoint
    code, out, err = _run(["--checkpoint", str(workdir), "--chat", "--prompt", "hi", *OVERRIDES], capsys)
    assert code == 2 and "no chat template" in err and out == ""
    chat_dir = tmp_path / "chat_run"
    shutil.copytree(workdir, chat_dir)
    (chat_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    code, out, err = _run(["--checkpoint", str(chat_dir), "--chat", "--prompt", "hi", "--mode", "ar", "--json",
                           "--max-new-tokens", str(NEW), *OVERRIDES], capsys)
    assert code == 0, err
    summary = json.loads(out)
    expected_prompt = encode_chat(chat_dir, [{"role": "user", "content": "hi"}])
    assert summary["prompt_ids"] == expected_prompt and len(expected_prompt) > 3
    assert summary["token_ids"] == generator.generate([expected_prompt], "ar", NEW).tokens[0]


def test_a_cudnn_checkpoint_on_cpu_is_refused_unless_attention_is_overridden(checkpoint, tmp_path, capsys):
    """A checkpoint trained with cudnn attention stops with the reason on this CPU backend; the execution-only
    overrides model.attention_impl=xla model.compute_dtype=float32 run it here, as the original float32 model."""
    workdir, cfg, generator, _ = checkpoint
    cudnn = replace(cfg, model={"attention_impl": "cudnn", "compute_dtype": "bfloat16"})
    save_inference_checkpoint(tmp_path / "run", cudnn, generator.params, tokenizer_file=workdir / "tokenizer.json")
    argv = ["--checkpoint", str(tmp_path / "run"), "--prompt-ids", "5,6,7,8", "--mode", "ar", "--json"]  # compiled already
    code, out, err = _run(argv, capsys)
    assert code == 2 and "cudnn needs a GPU backend" in err and out == ""
    code, out, err = _run(argv + ["model.attention_impl=xla", "model.compute_dtype=float32"], capsys)
    assert code == 0, err
    assert json.loads(out)["token_ids"] == generator.generate([[5, 6, 7, 8]], "ar", NEW).tokens[0]
    bundle = load_for_inference(tmp_path / "run")
    with pytest.raises(CheckpointError, match="model.d_ff cannot change for a saved model"):
        with_model(bundle, dataclasses.replace(bundle.config.model, d_ff=64))
