"""Nemotron-Labs-Diffusion directories: a tiny random Ministral-3 (tests/ministral.py) written by the test in the
released layout (config.json with model_type nemotron_labs_diffusion, mask_token_id 100 and block_size 32;
`encoder.`-prefixed weights and `diffusion_head.weight` in two safetensors shards with an index; a tokenizer and a
chat template) imports through the CLI, its AR logits equal transformers' Ministral-3 on the same weights, and
greedy TiDAR (beta = 1, the default K and a user-chosen one) decodes exactly what AR and transformers decode.
Configs we cannot run exactly are refused, naming the field."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from ministral import CONFIG, VOCAB, hf_greedy, hf_logits, make_ministral  # noqa: E402

from tidar_jax.config import DecodeConfig  # noqa: E402
from tidar_jax.decoding.generation import Generator  # noqa: E402
from tidar_jax.interop import hf_config, nemotron_diffusion  # noqa: E402
from tidar_jax.layout import masks  # noqa: E402
from tidar_jax.model.transformer import forward  # noqa: E402

MASK_ID = 100
CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"


def _released_name(name: str) -> str:
    return "diffusion_head.weight" if name == "lm_head.weight" else name.replace("model.", "encoder.", 1)


def write_nld(model, path, **config_changes):
    """Writes `model` (a Ministral3ForCausalLM) as a Nemotron-Labs-Diffusion directory: two weight shards + index,
    config.json, tokenizer.json (one word per id, id 100 the mask word), tokenizer_config.json, chat template."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    path.mkdir(parents=True)
    tensors = {_released_name(k): v.detach().numpy() for k, v in model.state_dict().items()}
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        shard = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(path / shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = CONFIG | dict(model_type="nemotron_labs_diffusion", architectures=["NemotronLabsDiffusionModel"],
                           auto_map={"AutoModel": "modeling_nemotron_labs_diffusion.NemotronLabsDiffusionModel"},
                           mask_token_id=MASK_ID, block_size=32, dlm_paradigm="bidirectional", num_ar_layers=0,
                           num_diffusion_layers=0, torch_dtype="float32") | config_changes
    (path / "config.json").write_text(json.dumps(config))
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, VOCAB)]
    words[MASK_ID] = "[MASK]"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>", "chat_template": CHAT_TEMPLATE}))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from tidar_jax.checkpoint.inference import load_for_inference
    from train import import_checkpoint

    model = make_ministral()
    root = tmp_path_factory.mktemp("nld")
    src = write_nld(model, root / "Nemotron-Labs-Diffusion-tiny")
    assert import_checkpoint.main(["--from", "hf", str(src), "--out", str(root / "run")]) == 0
    return model, src, root / "run", load_for_inference(root / "run")


def test_import_keeps_the_trained_mask_row_and_the_tokenizer(imported):
    _, src, out, bundle = imported
    m = bundle.config.model
    assert (m.vocab_size, m.mask_token_id, m.tie_embeddings) == (VOCAB, MASK_ID, False)  # no row added
    assert (m.block_size, bundle.config.decode.block_size) == (nemotron_diffusion.DECODE_BLOCK_SIZE, 0)
    assert (m.rope_scaling, m.query_scale_beta, m.sliding_window) == ("yarn", 0.1, CONFIG["sliding_window"])
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert json.loads((out / "hf_config.json").read_text())["block_size"] == 32  # the trained block, kept


def test_ar_logits_equal_transformers_ministral3(imported):
    model, _, _, bundle = imported
    tokens = np.random.RandomState(4).randint(0, VOCAB, (2, 20))
    positions = jnp.broadcast_to(jnp.arange(20, dtype=jnp.int32), (2, 20))
    logits, _ = forward(bundle.graphdef, bundle.params, jnp.asarray(tokens), positions, masks.causal_mask(20)[None])
    np.testing.assert_allclose(np.asarray(logits), hf_logits(model, tokens), atol=2e-4, rtol=0)


@pytest.mark.parametrize("k", [None, 2])
def test_tidar_decodes_what_ar_and_transformers_decode(imported, k):
    """The default K (model.block_size) and a user-chosen decode.block_size, greedy, beta = 1."""
    model, _, _, bundle = imported
    cfg = bundle.config.model
    decode = DecodeConfig(block_size=k or 0, max_new_tokens=12, max_cache_len=48, prompt_buckets=(8, 16))
    generator = Generator(bundle.graphdef, bundle.params, cfg, decode, allow_block_size_mismatch=k is not None)
    prompts = [[5, 17, 300, 42, 7, 9, 11], [99, 3, 250]]
    ar = generator.generate(prompts, mode="ar", max_new_tokens=12)
    tidar = generator.generate(prompts, mode="tidar", beta=1.0, max_new_tokens=12)
    assert tidar.block_size == (k or nemotron_diffusion.DECODE_BLOCK_SIZE)
    assert tidar.tokens == ar.tokens
    if k is None:
        expected = [hf_greedy(model, p, n=len(row)) for p, row in zip(prompts, ar.tokens)]
        assert ar.tokens == expected


def _model_config(config: dict):
    as_ministral, _ = nemotron_diffusion.as_ministral3(config, {"encoder.embed_tokens.weight": None})
    return hf_config.model_config_from_hf(as_ministral, VOCAB)


NLD = CONFIG | dict(model_type="nemotron_labs_diffusion", mask_token_id=MASK_ID, block_size=32)


@pytest.mark.parametrize("change, message", [
    (dict(num_ar_layers=2), "num_ar_layers 2"),
    (dict(num_diffusion_layers=4), "num_diffusion_layers 4"),
    (dict(mask_token_id=None), "mask_token_id None"),
    (dict(mask_token_id=VOCAB), f"mask_token_id {VOCAB}"),
    (dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e6, factor=8.0)), "rope scaling 'llama3'"),
    (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e6)), "rope scaling 'yarn' without"),
    (dict(rope_parameters=dict(rope_type="default", rope_theta=1e6, llama_4_scaling_beta=0.1)),
     "llama_4_scaling_beta without"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "sliding-window attention layers"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
])
def test_configs_we_cannot_run_exactly_are_refused(change, message):
    with pytest.raises(hf_config.ConversionError, match=message):
        _model_config(NLD | change)


def test_llama_4_scale_outside_ministral_is_refused():
    with pytest.raises(hf_config.ConversionError, match="llama_4_scaling_beta in a llama config"):
        hf_config.model_config_from_hf(CONFIG | dict(model_type="llama"), VOCAB)


def test_cli_refusal_is_one_line_naming_the_field(tmp_path, capsys):
    from train import import_checkpoint

    src = write_nld(make_ministral(), tmp_path / "nld", num_ar_layers=2)
    assert import_checkpoint.main(["--from", "hf", str(src), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "num_ar_layers 2" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "run").exists()


def test_weights_outside_the_encoder_prefix_are_refused(tmp_path):
    src = write_nld(make_ministral(), tmp_path / "nld")
    with pytest.raises(hf_config.ConversionError, match="'encoder.'"):
        nemotron_diffusion.as_ministral3(json.loads((src / "config.json").read_text()), {"model.norm.weight": None})


def test_held_out_batches_pad_with_the_model_pad_id(imported):
    """The checkpoint's tokenizer has no <|pad|>: held-out padding (infer.eval) takes model.pad_token_id."""
    from tidar_jax.data import pipeline

    _, _, _, bundle = imported
    assert bundle.tokenizer.pad_id is None
    last = pipeline.make_eval_batches(bundle.config, bundle.tokenizer, 10**6)[-1]  # the padded tail
    tokens, valid = last["tokens"], last["valid"]
    assert (~valid).any() and (tokens[~valid] == bundle.config.model.pad_token_id).all()
