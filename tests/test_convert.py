"""HF / GGUF import and HF export against transformers (the `interop` extra): tiny random Qwen2 / Qwen3 / Llama
models built offline. Logits must match transformers' float32 logits to atol 1e-4 (observed ~3e-7)."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from tidar_jax.interop import hf, hf_config  # noqa: E402
from tidar_jax.layout import masks
from tidar_jax.model.transformer import Transformer, forward  # noqa: E402

VOCAB, ATOL = 512, 1e-4
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, eos_token_id=0)
CASES = {  # name: (config class, model class, extra config)
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3-untied": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=False)),
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=5e5,
                                                             rms_norm_eps=1e-5)),
    "llama-tied-sharded": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, head_dim=32)),
}


def make_hf_model(name: str, init_std: float = 0.02):
    """A random transformers model; norms and biases are perturbed so that each tensor's mapping matters."""
    config_cls, model_cls, extra = CASES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SHAPE, initializer_range=init_std, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "bias" in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(model, path, sharded=False):
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "5GB")
    return path


@pytest.fixture(scope="module", params=list(CASES))
def hf_dir(request, tmp_path_factory):
    name = request.param
    model = make_hf_model(name)
    path = save_hf(model, tmp_path_factory.mktemp(name), sharded="sharded" in name)
    return name, model, path


def our_logits(cfg, params, tokens):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    b, s = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    logits, _ = forward(graphdef, params, jnp.asarray(tokens), positions, masks.causal_mask(s)[None])
    return np.asarray(logits)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def test_import_matches_transformers_logits(hf_dir):
    name, model, path = hf_dir
    if "sharded" in name:
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("*.safetensors"))) > 1
    cfg, params = hf.load_hf_checkpoint(path)
    assert (cfg.qkv_bias, cfg.qk_norm) == (name.startswith("qwen2"), name.startswith("qwen3"))
    assert cfg.tie_embeddings == ("untied" not in name)
    assert cfg.head_dim == (getattr(model.config, "head_dim", None) or 16)
    # No tokenizer: every row may be a real token, so the vocabulary grows to the next multiple of 64.
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.eos_token_id) == (VOCAB + 64, VOCAB, 0)
    tokens = np.random.RandomState(1).randint(0, VOCAB, (2, 12))
    ours, ref = our_logits(cfg, params, tokens), hf_logits(model, tokens)
    np.testing.assert_allclose(ours[..., :VOCAB], ref, atol=ATOL, rtol=0)
    # Grown rows are the mean embedding / lm_head column: their logit is the mean of the real logits.
    np.testing.assert_allclose(ours[..., VOCAB], ref.mean(-1), atol=ATOL, rtol=0)


def test_export_roundtrip_reloads_in_transformers(hf_dir, tmp_path):
    name, model, path = hf_dir
    imported = hf.import_hf_checkpoint(path, block_size=8)
    out = hf.export_hf_checkpoint(tmp_path / "export", imported.config, imported.params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(model)
    original, exported = model.state_dict(), reloaded.state_dict()
    assert set(original) == set(exported)
    for key, value in original.items():
        got = exported[key].numpy()
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            np.testing.assert_array_equal(got[VOCAB:], np.repeat(value.numpy().mean(0, keepdims=True), 64, 0))
            got = got[:VOCAB]
        np.testing.assert_array_equal(got, value.numpy(), err_msg=key)
    # Re-importing our export keeps the mask row and block size instead of growing again.
    again = hf.import_hf_checkpoint(out)
    assert again.config == imported.config
    for a, b in zip(nnx.to_flat_state(again.params), nnx.to_flat_state(imported.params)):
        assert a[0] == b[0]
        np.testing.assert_array_equal(np.asarray(a[1][...]), np.asarray(b[1][...]))


def _word_tokenizer(n_words: int, specials=("<|endoftext|>",)):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = list(specials) + [f"w{i}" for i in range(n_words - len(specials))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_unused_embedding_row_becomes_mask_token(tmp_path):
    from tidar_jax.data.tokenizer import Tokenizer

    model = make_hf_model("qwen2-tied")
    path = save_hf(model, tmp_path / "hf")
    _word_tokenizer(300).save(str(path / "tokenizer.json"))
    imported = hf.import_hf_checkpoint(path)
    cfg = imported.config
    assert (cfg.vocab_size, cfg.mask_token_id, cfg.pad_token_id) == (VOCAB, 300, 301)  # rows 300.. were unused
    (tmp_path / "tok.json").write_text(imported.tokenizer_json)
    tok = Tokenizer.from_file(tmp_path / "tok.json")
    assert (tok.eos_id, tok.mask_id, tok.pad_id) == (0, 300, 301)
    assert tok.encode("w4 <|mask|>") == [5, 0]  # raw text never becomes the mask id
    np.testing.assert_array_equal(np.asarray(imported.params["embed"][...]),
                                  model.model.embed_tokens.weight.detach().numpy())


def test_tokenizer_that_already_has_a_mask_token_is_refused(tmp_path):
    path = save_hf(make_hf_model("qwen2-tied"), tmp_path / "hf")
    _word_tokenizer(300, specials=("<|endoftext|>", "<|mask|>")).save(str(path / "tokenizer.json"))
    with pytest.raises(hf.ConversionError, match="already defines '<\\|mask\\|>'"):
        hf.import_hf_checkpoint(path)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gemma"), "unsupported model_type 'gemma'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope scaling 'linear'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope scaling 'yarn'"),
    (dict(use_sliding_window=True), "sliding-window"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(model_type="llama", attention_bias=True), "o_proj"),
    (dict(eos_token_id=None), "no eos_token_id"),
])
def test_unsupported_configs_are_rejected(change, message):
    config_json = dict(SHAPE, model_type="qwen2", hidden_act="silu") | change
    with pytest.raises(hf_config.ConversionError, match=message):
        hf_config.model_config_from_hf(config_json, VOCAB)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    model = make_hf_model("llama-untied")
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    config_json = json.loads(model.config.to_json_string())
    with pytest.raises(hf.ConversionError, match="lacks tensor 'lm_head.weight'"):
        hf.convert_hf(config_json, {k: v for k, v in tensors.items() if k != "lm_head.weight"})
    with pytest.raises(hf.ConversionError, match="o_proj.bias"):
        hf.convert_hf(config_json, tensors | {"model.layers.0.self_attn.o_proj.bias": np.zeros(64, np.float32)})
    path = save_hf(model, tmp_path / "hf")
    (path / "model.safetensors").unlink()
    with pytest.raises(hf.ConversionError, match="no \\*.safetensors"):
        hf.import_hf_checkpoint(path)


def _greedy_reference(model, prompt, n):
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         eos_token_id=None, pad_token_id=0)
    return ids[0, len(prompt):].tolist()


def test_greedy_generation_matches_transformers(tmp_path):
    from tidar_jax.config import DecodeConfig
    from tidar_jax.decoding.generation import Generator

    # A larger init spreads the logits, so greedy choices are not near-ties decided by rounding.
    model = make_hf_model("qwen3-untied", init_std=0.3)
    cfg, params = hf.load_hf_checkpoint(save_hf(model, tmp_path / "hf"), block_size=4)
    # eos outside the original vocabulary: rows run to max_new_tokens, like transformers with eos disabled.
    cfg = dataclasses.replace(cfg, eos_token_id=cfg.vocab_size - 1)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    n = 12
    generator = Generator(graphdef, params, cfg, DecodeConfig(max_new_tokens=n, max_cache_len=48,
                                                              prompt_buckets=(8, 16)))
    prompts = [[5, 17, 300, 42, 7], [99, 3, 250]]
    expected = [_greedy_reference(model, p, n) for p in prompts]
    assert generator.generate(prompts, mode="ar").tokens == expected
    tidar = generator.generate(prompts, mode="tidar", beta=1.0)
    assert tidar.tokens == expected


# ------------------------------------------------------------------------------------------------ GGUF, chat, CLI

_GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                     "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                     "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                     "mlp.down_proj": "ffn_down"}
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                 "{{ raise_exception('system message must come first') }}{% endif %}"
                 "<{{ m['role'] }}>{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def _llama_cpp_permute(w, n_heads):
    """llama.cpp's convert_hf_to_gguf.py permutation of Q / K rows (the importer must undo it)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path):
    """A float32 llama GGUF of a random tied Llama with a byte-level BPE tokenizer; returns the source HF model."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat and the dog sat on the log"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    spec = json.loads(tok.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(SHAPE | dict(vocab_size=len(tokens))), tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (len(tokens) - 1))
    writer.add_token_merges([" ".join(m) for m in spec["merges"]])
    writer.add_eos_token_id(0)
    writer.add_bos_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, value in model.state_dict().items():
        w = value.numpy()
        if name == "lm_head.weight":
            continue  # tied
        if name in ("model.embed_tokens.weight", "model.norm.weight"):
            writer.add_tensor({"model.embed_tokens.weight": "token_embd.weight"}.get(name, "output_norm.weight"), w)
            continue
        layer, rest = name.split(".")[2], ".".join(name.split(".")[3:-1])
        if rest in ("self_attn.q_proj", "self_attn.k_proj"):
            w = _llama_cpp_permute(w, 4 if rest.endswith("q_proj") else 2)
        writer.add_tensor(f"blk.{layer}.{_GGUF_LAYER_NAMES[rest]}.weight", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_gguf_import_matches_transformers(tmp_path):
    from tidar_jax.data.chat import apply_chat_template, encode_chat
    from tidar_jax.interop.gguf import import_gguf_checkpoint

    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    imported, hf_config = import_gguf_checkpoint(tmp_path / "tiny.gguf", tmp_path / "tok")
    cfg, vocab = imported.config, model.config.vocab_size
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.mask_token_id, cfg.vocab_size) == (2, True, vocab, 320)
    # Same logits as transformers' own GGUF loading of the file (which also undoes the permutation).
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    tokens = np.random.RandomState(2).randint(0, vocab, (1, 10))
    ours = our_logits(cfg, imported.params, tokens)[..., :vocab]
    np.testing.assert_allclose(ours, hf_logits(reference, tokens), atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours, hf_logits(model, tokens), atol=ATOL, rtol=0)
    # The tokenizer and chat template come along.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(imported.tokenizer_json)
    assert tok.encode("the cat sat").ids == transformers.AutoTokenizer.from_pretrained(
        tmp_path, gguf_file="tiny.gguf")("the cat sat")["input_ids"]
    assert tok.token_to_id("<|mask|>") == cfg.mask_token_id
    chat = [{"role": "user", "content": "hi"}]
    assert apply_chat_template(tmp_path / "tok", chat) == "<|endoftext|><user>hi<|endoftext|>\n<assistant>"
    ids = encode_chat(tmp_path / "tok", chat)  # the template's special tokens keep their ids
    assert ids[0] == 0 and ids.count(0) == 2 and tok.decode(ids, skip_special_tokens=False).startswith("<|endoftext|>")


def test_chat_template_matches_transformers(tmp_path):
    from tidar_jax.data.chat import ChatTemplateError, apply_chat_template

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=_word_tokenizer(20), bos_token="<s>",
                                                  eos_token="</s>")
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(tmp_path)
    messages = [{"role": "system", "content": " be brief "}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    for prompt in (True, False):
        assert apply_chat_template(tmp_path, messages, add_generation_prompt=prompt) == hf_tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=prompt)
    with pytest.raises(ChatTemplateError, match="system message must come first"):
        apply_chat_template(tmp_path, messages[1:] + messages[:1])
    with pytest.raises(ChatTemplateError, match="no chat template"):
        apply_chat_template(tmp_path / "missing", messages)


def test_import_cli_checkpoint_and_export(tmp_path):
    from tidar_jax.checkpoint.inference import load_for_inference
    from train import import_checkpoint

    model = make_hf_model("llama-untied")
    src = save_hf(model, tmp_path / "hf")
    _word_tokenizer(VOCAB - 12).save(str(src / "tokenizer.json"))
    (src / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    out = tmp_path / "run"
    assert import_checkpoint.main(["--from", "hf", str(src), "--out", str(out), "--block-size", "8"]) == 0
    assert import_checkpoint.main(["--from", "hf", str(src), "--out", str(out)]) == 2  # refuses to overwrite
    bundle = load_for_inference(out)
    m = bundle.config.model
    assert (m.block_size, m.mask_token_id, m.vocab_size, bundle.tokenizer.mask_id) == (8, VOCAB - 12, VOCAB, VOCAB - 12)
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    tokens = np.random.RandomState(3).randint(0, VOCAB, (1, 8))
    np.testing.assert_allclose(our_logits(m, bundle.params, tokens), hf_logits(model, tokens), atol=ATOL, rtol=0)
    exported = tmp_path / "exported"
    assert import_checkpoint.main(["--export-hf", str(exported), "--checkpoint", str(out)]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(model, tokens), atol=ATOL, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(exported).convert_tokens_to_ids("<|mask|>") == VOCAB - 12
