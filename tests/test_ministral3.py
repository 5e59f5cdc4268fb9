"""Ministral-3 blocks against transformers' Ministral3ForCausalLM on random tiny weights (tests/ministral.py: YaRN
with an attention factor, the llama-4 query scale, a sliding window shorter than the sequences, a free head_dim):
logits of the plain, the structured (blockwise) and the TiDAR training forward, and greedy generation (AR and
TiDAR at beta = 1) with the CPU kernels on and off. Also: the defaults keep plain RoPE bit for bit, the window
is exact under TiDAR's duplicated positions, and the export reloads in transformers."""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from ministral import VOCAB, WINDOW, hf_greedy, hf_logits, make_ministral  # noqa: E402

from tidar_jax.config import DecodeConfig, ModelConfig  # noqa: E402
from tidar_jax.decoding.generation import Generator  # noqa: E402
from tidar_jax.decoding.program_cache import ProgramCache  # noqa: E402
from tidar_jax.interop import hf  # noqa: E402
from tidar_jax.layout import masks, window  # noqa: E402
from tidar_jax.model import rope  # noqa: E402
from tidar_jax.model.transformer import Transformer, forward  # noqa: E402
from tidar_jax.ops import cpu_kernels  # noqa: E402

ATOL = 2e-4  # logits of magnitude ~10 (init std 0.3); observed ~2e-5
SEQ = 20


@pytest.fixture(scope="module")
def ministral(tmp_path_factory):
    model = make_ministral()
    path = tmp_path_factory.mktemp("ministral3")
    model.save_pretrained(path)
    cfg, params = hf.load_hf_checkpoint(path)
    return model, path, cfg, params


def _graphdef(cfg):
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))


def _positions(batch, length):
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def test_config_fields_are_read(ministral):
    _, _, cfg, _ = ministral
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len) == ("yarn", 4.0, 8)
    assert cfg.rope_attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
    assert (cfg.query_scale_beta, cfg.query_scale_len, cfg.sliding_window) == (0.1, 8, WINDOW)
    assert (cfg.head_dim, cfg.d_model // cfg.n_heads, cfg.tie_embeddings) == (32, 16, False)


@pytest.mark.parametrize("impl", ["xla", "blockwise"])
def test_logits_match_transformers(ministral, impl):
    """A dense causal mask (xla) and the structured causal LayoutMask (blockwise, the window in its layout)."""
    model, _, cfg, params = ministral
    cfg = dataclasses.replace(cfg, attention_impl=impl)
    tokens = np.random.RandomState(1).randint(0, VOCAB, (2, SEQ))
    mask = (masks.causal_mask(SEQ)[None] if impl == "xla"
            else masks.causal_layout_mask(jnp.ones((2, SEQ), bool)))
    ours, _ = forward(_graphdef(cfg), params, jnp.asarray(tokens), _positions(2, SEQ), mask)
    np.testing.assert_allclose(np.asarray(ours)[..., :VOCAB], hf_logits(model, tokens), atol=ATOL, rtol=0)


def test_tidar_training_forward_clean_half_matches_transformers(ministral):
    """The [clean | mask] training layout with the window stated on positions: clean rows equal transformers'."""
    model, _, cfg, params = ministral
    tokens = np.random.RandomState(2).randint(0, VOCAB, (1, SEQ))
    inputs = masks.training_inputs(jnp.asarray(tokens), cfg.mask_token_id)
    layout = masks.tidar_layout_mask(jnp.ones((1, SEQ), bool), 4)
    logits, _ = forward(_graphdef(cfg), params, inputs, masks.training_positions(SEQ)[None], layout)
    np.testing.assert_allclose(np.asarray(logits)[0, :SEQ, :VOCAB], hf_logits(model, tokens)[0], atol=ATOL, rtol=0)


def test_window_is_stated_on_positions():
    """Decode step with a cache: a proposal slot sees a cached key only within the window of its own position."""
    cache_valid = jnp.arange(16)[None] < 10  # cursor L = 10
    local = masks.step_mask(2, True)  # K = 2: drafts at 10, 11; proposal 1 at 11, 12; proposal 2 at 12, 13
    positions = masks.step_positions(jnp.array([10]), 2, True)
    windowed = window.with_sliding_window(masks.with_cache(cache_valid, local), positions, 3, cache_len=16)
    seen_slots = [np.flatnonzero(np.asarray(windowed[0, row, :16])).tolist() for row in range(6)]
    assert seen_slots == [[8, 9], [9], [9], [], [], []]  # keys p' > p - 3 among the committed slots 0..9
    assert bool(windowed[0, 5, 16 + 4]) and not bool(windowed[0, 5, 16 + 0])  # slot at 13 sees 12, not draft 10


def test_windowed_layout_is_the_position_rule():
    """TrainingLayout's window equals `p - p' < window` on the layout's positions, mask rows' own block included
    (window < K), and the blockwise schedule skips the tiles it removes."""
    from tidar_jax.ops.blockwise import tile_schedule

    for block, win in ((4, 3), (4, 6), (None, 3)):
        plain, windowed = masks.TrainingLayout(8, block), masks.TrainingLayout(8, block, window=win)
        pos = masks.training_positions(8) if block else jnp.arange(8)
        near = pos[:, None] - pos[None, :] < win
        np.testing.assert_array_equal(np.asarray(windowed.dense()), np.asarray(plain.dense() & near))
    long_plain, long_windowed = masks.TrainingLayout(64, 4), masks.TrainingLayout(64, 4, window=8)
    assert len(tile_schedule(long_windowed, 0, 128, 16, 16)) < len(tile_schedule(long_plain, 0, 128, 16, 16))


def test_blockwise_windowed_attention_equals_dense():
    """Forward and gradients of ops.blockwise_attention on a windowed TiDAR layout (small tiles: several skipped)
    against dense attention over the same mask, with padded keys."""
    from tidar_jax.ops import blockwise_attention

    layout = masks.TrainingLayout(8, 4, window=3)
    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (2, 16, 2, 8))
    k, v = (jax.random.normal(key, (2, 16, 1, 8)) for key in keys[1:])
    valid = jnp.ones((2, 16), bool).at[1, 7:8].set(False).at[1, 15:].set(False)
    dense = masks.LayoutMask(valid, layout).dense()[:, None]

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)

    tiled = loss(lambda q, k, v: blockwise_attention(q, k, v, layout, valid, block_q=4, block_k=4))
    reference = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense))
    (got_loss, got_grads), (want_loss, want_grads) = (jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, k, v)
                                                      for f in (tiled, reference))
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_default_rope_is_unchanged():
    """The defaults compute exactly the plain rotate-half RoPE the model always had, and no query scale."""
    cfg = ModelConfig()
    x = jax.random.normal(jax.random.key(0), (2, 5, 4, cfg.head_dim))
    positions = _positions(2, 5) * 7
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = jnp.split(x, 2, axis=-1)
    expected = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    np.testing.assert_array_equal(np.asarray(rope.rotary_embedding(x, positions, cfg)), np.asarray(expected))
    assert rope.scale_queries(x, positions, cfg) is x


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_greedy_generation_matches_transformers(ministral, kernels, monkeypatch):
    """AR and TiDAR (K = 4, beta = 1) over a cache past the window and the query-scale length, kernels on and off
    (the CPU attention kernel takes the windowed mask and the scaled queries)."""
    monkeypatch.setenv(cpu_kernels.ENV, kernels)
    model, _, cfg, params = ministral
    cfg = dataclasses.replace(cfg, eos_token_id=cfg.vocab_size - 1)  # never produced: rows run to max_new_tokens
    n = 14
    generator = Generator(_graphdef(cfg), params, cfg, DecodeConfig(max_new_tokens=n, max_cache_len=48,
                                                                  prompt_buckets=(8, 16)), programs=ProgramCache())
    prompts = [[5, 17, 300, 42, 7, 9, 11], [99, 3, 250]]
    expected = [hf_greedy(model, p, n) for p in prompts]
    assert generator.generate(prompts, mode="ar").tokens == expected
    assert generator.generate(prompts, mode="tidar", beta=1.0).tokens == expected


def test_export_reloads_as_ministral3(ministral, tmp_path):
    model, path, _, _ = ministral
    imported = hf.import_hf_checkpoint(path)
    out = hf.export_hf_checkpoint(tmp_path / "export", imported.config, imported.params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "Ministral3ForCausalLM"
    tokens = np.random.RandomState(3).randint(0, VOCAB, (1, SEQ))
    np.testing.assert_allclose(hf_logits(reloaded, tokens)[..., :VOCAB], hf_logits(model, tokens), atol=ATOL, rtol=0)
    assert hf.import_hf_checkpoint(out).config == imported.config


@pytest.mark.parametrize("layout", ["saved", "in_memory"])
def test_mistral3_directory_imports_its_text_decoder(tmp_path, layout):
    """A Mistral3ForConditionalGeneration directory (the Ministral-3 releases' format) in the layout transformers
    saves (language_model.model.*) and under its in-memory names (model.language_model.*, lm_head.weight): the
    vision tower is not read, and the logits equal the multimodal model's on text."""
    import json

    from safetensors.torch import save_file
    from ministral import make_mistral3

    model = make_mistral3()
    if layout == "saved":
        model.save_pretrained(tmp_path)
    else:
        save_file({k: v.clone() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"),
                  metadata={"format": "pt"})
        (tmp_path / "config.json").write_text(model.config.to_json_string())
        assert any(k.startswith("model.language_model.") for k in model.state_dict())
    cfg, params = hf.load_hf_checkpoint(tmp_path)
    assert (cfg.rope_scaling, cfg.sliding_window, cfg.head_dim) == ("yarn", WINDOW, 32)
    # Mistral3Config ties the head: the saved file leaves it out (tied), the state dict holds its copy (untied).
    assert cfg.tie_embeddings == (layout == "saved")
    tokens = np.random.RandomState(5).randint(0, VOCAB, (1, SEQ))
    ours, _ = forward(_graphdef(cfg), params, jnp.asarray(tokens), _positions(1, SEQ), masks.causal_mask(SEQ)[None])
    np.testing.assert_allclose(np.asarray(ours)[..., :VOCAB], hf_logits(model, tokens), atol=ATOL, rtol=0)
    quantized = json.loads((tmp_path / "config.json").read_text()) | {"quantization_config": {"quant_method": "fp8"}}
    (tmp_path / "config.json").write_text(json.dumps(quantized))
    with pytest.raises(hf.ConversionError, match="quantization_config \\(fp8"):
        hf.import_hf_checkpoint(tmp_path)
