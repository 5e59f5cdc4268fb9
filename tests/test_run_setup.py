"""Run resolution (run_setup.plan_run): continual pretraining from an imported model needs no override.

Each case is a failure a user hit before: a preset restating a float32 GGUF epsilon, an instruct model whose eos
(<|im_end|>) is not the document separator (<|endoftext|>), a pad id that is not the tokenizer's <|pad|>, a
Llama-3 style tokenizer without <|endoftext|>, and a chat template that did not follow the run.
"""

import random

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint
from tidar_jax.config import Config, ConfigError, MeshConfig, ModelConfig, load_config
from tidar_jax.data.pipeline import load_corpus_documents, make_train_iterator, split_documents, split_token_stream
from tidar_jax.model.transformer import create_model
from tidar_jax.sharding import make_mesh
from tidar_jax.training.loop import train
from tidar_jax.training.run_setup import plan_run

GGUF_EPS = float(np.float32(1e-5))  # 9.999999747378752e-06, what a GGUF file stores
WORDS = [f"{a}{b}" for a in "bcdfghklmnprst" for b in "aeiou"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def _docs(n=60, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 90))) for _ in range(n)]


def _import(root, specials, eos_token):
    """A params-only 'imported' checkpoint with a BPE whose special tokens are `specials` + <|mask|>."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(_docs(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=[*specials, "<|mask|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok_file = root / "source_tokenizer.json"
    hf.save(str(tok_file))
    model = ModelConfig(vocab_size=448, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                        rms_norm_eps=GGUF_EPS, mask_token_id=hf.token_to_id("<|mask|>"),
                        eos_token_id=hf.token_to_id(eos_token), pad_token_id=hf.token_to_id(eos_token))
    cfg = Config(model=model)
    save_inference_checkpoint(root / "import", cfg, nnx.split(create_model(model))[1], tokenizer_file=tok_file)
    (root / "import" / "chat_template.jinja").write_text(TEMPLATE)
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(_docs(seed=1)):
        (corpus / f"{i:03d}.txt").write_text(doc)
    return hf


def _preset(root, extra=""):
    path = root / "preset.yaml"
    path.write_text(f"""model:
  rms_norm_eps: 1.0e-5
  block_size: 4
  adapter_rank: 4
data:
  corpus: files
  paths: [{root / 'corpus'}]
  seq_len: 16
  global_batch_size: 2
train:
  init_from: {root / 'import'}
  adaptation: adapters
  steps: 1
  warmup_steps: 0
  eval_batches: 1
{extra}""")
    return path


def test_instruct_import_trains_with_no_override(tmp_path):
    hf = _import(tmp_path, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eos_token="<|im_end|>")
    plan = plan_run(tmp_path / "run", preset=_preset(tmp_path))
    m, d = plan.config.model, plan.config.data
    assert m.rms_norm_eps == GGUF_EPS  # restated within tolerance, the checkpoint's exact value kept
    assert (m.eos_token_id, d.separator_token_id) == (hf.token_to_id("<|im_end|>"), hf.token_to_id("<|endoftext|>"))
    assert m.pad_token_id != hf.token_to_id("<|pad|>")  # an eos-as-pad model is fine
    assert d.tokenizer == str(tmp_path / "import" / "tokenizer.json") and d.tokenizer_sha256
    result = train(plan, progress=False, mesh=make_mesh(MeshConfig(data=-1), jax.devices()[:1]))
    assert result.step == 1
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == TEMPLATE  # --chat works on the run
    assert load_for_inference(tmp_path / "run").tokenizer.fingerprint == plan.tokenizer.fingerprint
    # Packed documents are separated by <|endoftext|>, never by the end-of-turn eos.
    stream = split_token_stream(plan.config, plan.tokenizer, "train")
    n_train = len(split_documents(load_corpus_documents(d), d.holdout_fraction, d.seed)[0])
    assert np.sum(stream == d.separator_token_id) == n_train and not np.any(stream == m.eos_token_id)
    # Resuming from --workdir alone works and restates nothing.
    assert plan_run(tmp_path / "run").resume


def test_tokenizer_without_endoftext_separates_with_eos(tmp_path):
    hf = _import(tmp_path, ["<|begin_of_text|>", "<|end_of_text|>"], eos_token="<|end_of_text|>")
    plan = plan_run(tmp_path / "run", preset=_preset(tmp_path))
    assert plan.tokenizer.eos_id is None
    assert plan.config.data.separator_token_id == plan.config.model.eos_token_id == hf.token_to_id("<|end_of_text|>")
    assert next(make_train_iterator(plan.config, plan.tokenizer))["tokens"].shape == (2, 16)


def test_restating_a_different_architecture_is_refused(tmp_path):
    _import(tmp_path, ["<|endoftext|>"], eos_token="<|endoftext|>")
    with pytest.raises(ConfigError, match=r"model.d_model: checkpoint 32, requested 64.*model.rms_norm_eps"):
        plan_run(tmp_path / "run", preset=_preset(tmp_path), overrides=["model.d_model=64", "model.rms_norm_eps=1e-4"])
    assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file_and_list_yaml_are_config_errors(tmp_path, repo_root):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        plan_run(tmp_path / "file", preset=f"{repo_root}/configs/tiny.yaml")
    (tmp_path / "list.yaml").write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="holds no checkpoint to resume"):
        plan_run(tmp_path / "empty")
