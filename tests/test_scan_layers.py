"""Scanned layers (`model.scan_layers`): the stacked model computes what the unrolled one computes (logits in the
training layout, prefill and cached decode steps, the training step with and without adapters, greedy TiDAR == AR),
and params convert between the layouts on load (checkpoints, HF tensors, init_from) and for decoding
(`decode.scan_layers`, the Generator and SpecDecoder).

The references are the unrolled model (the long-standing path) and `layer_stacking.to_layout`'s inverse. Float32 at
matmul precision "highest"; scan and unrolled layers may only reorder nothing but fusion, so tolerances are tight.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint
from tidar_jax.checkpoint.manifest import MANIFEST_NAME
from tidar_jax.config import MeshConfig, replace
from tidar_jax.decoding.generation import Generator
from tidar_jax.decoding.spec_decode import SpecDecoder
from tidar_jax.interop import hf
from tidar_jax.layout import masks
from tidar_jax.model import adapters
from tidar_jax.model.init import abstract_model
from tidar_jax.model.kv_cache import init_cache
from tidar_jax.model.layer_stacking import is_stacked, to_layout
from tidar_jax.model.transformer import create_model, forward
from tidar_jax.sharding import make_global_batch, make_mesh, param_shardings
from tidar_jax.training.objective import target_counts, weighted_loss
from tidar_jax.training.trainer import Trainer

S = 16
TOL = dict(rtol=1e-5, atol=1e-6)


def _close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL)), a, b)


@pytest.fixture(scope="module")
def cfgs(tiny_config):
    """(unrolled config, scanned config): tiny, Qwen2-style biases, adapters; seq_len S. The scanned one also
    decodes scanned (decode.scan_layers; decoding unrolls by default)."""
    base = replace(tiny_config, model={"qkv_bias": True, "adapter_rank": 4}, data={"seq_len": S})
    return base, replace(base, model={"scan_layers": True}, decode={"scan_layers": True})


@pytest.fixture(scope="module")
def params(cfgs):
    """Unrolled pure params (host arrays: trainers donate theirs) with every leaf perturbed (so biases, norms and
    adapter B are non-trivial)."""
    def build():
        pure = nnx.to_pure_dict(nnx.split(create_model(cfgs[0].model, seed=0))[1])
        leaves, treedef = jax.tree.flatten(pure)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

    return jax.device_get(jax.jit(build)())


def _graphdef(model_cfg):
    return abstract_model(model_cfg)[0]


def _tokens(batch=2, seq=S, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 3, 512, jnp.int32)


def test_same_seed_same_values_and_conversion_is_lossless(cfgs, params):
    flat, stacked = (nnx.to_pure_dict(nnx.split(create_model(c.model, seed=0))[1]) for c in cfgs)
    assert not is_stacked(flat) and is_stacked(stacked)
    assert stacked["layers"]["attn"]["q_proj"].shape == (2,) + flat["layers"][0]["attn"]["q_proj"].shape
    jax.tree.map(np.testing.assert_array_equal, to_layout(flat, True), stacked)
    jax.tree.map(np.testing.assert_array_equal, to_layout(to_layout(params, True), False), params)
    jax.tree.map(np.testing.assert_array_equal, to_layout(params, False), params)  # already there: unchanged


def test_training_layout_logits_equal(cfgs, params):
    (cfg, scfg), tokens = cfgs, _tokens()
    inputs = masks.training_inputs(tokens, cfg.model.mask_token_id)
    positions = jnp.broadcast_to(masks.training_positions(S)[None], inputs.shape)
    mask = masks.training_mask(S, cfg.model.block_size)[None]
    logits = [jax.jit(lambda p, c=c: forward(_graphdef(c.model), p, inputs, positions, mask)[0])(p)
              for c, p in ((cfg, params), (scfg, to_layout(params, True)))]
    _close(logits[1], logits[0])
    assert float(jnp.std(logits[0][:, S:])) > 0.1  # the adapted mask half is part of what is compared


def test_prefill_and_cached_decode_steps_equal(cfgs, params):
    """Prefill 9 tokens (ragged rows) then two 3-token cached steps, each layout with its own cache form."""
    tokens = _tokens(seq=15, seed=1)
    results = []
    for c, p in ((cfgs[0], params), (cfgs[1], to_layout(params, True))):
        graphdef = _graphdef(c.model)
        step = jax.jit(lambda p, cache, tok, pos, mask, start, g=graphdef: forward(g, p, tok, pos, mask, cache, start,
                                                                                 3), donate_argnums=1)
        cache = init_cache(c.model, 2, 24)
        assert cache.stacked == c.model.scan_layers and cache.max_len == 24
        pre_mask = masks.with_cache(cache.valid_slots(), masks.causal_mask(9))
        logits, cache = jax.jit(lambda p, cache, g=graphdef: forward(
            g, p, tokens[:, :9], jnp.broadcast_to(jnp.arange(9), (2, 9)), pre_mask, cache,
            jnp.zeros(2, jnp.int32), 9))(p, cache)
        cache = cache.rewind_to(jnp.array([9, 6]))  # a fresh array each time: the cache's cursor is donated
        outs = [logits]
        for block in (tokens[:, 9:12], tokens[:, 12:15]):
            pos = cache.cursor[:, None] + jnp.arange(3)[None]
            mask = masks.with_cache(cache.valid_slots(), masks.causal_mask(3))
            logits, cache = step(p, cache, block, pos, mask, pos[:, 0])
            cache = cache.advance(jnp.array([3, 2]))
            outs.append(logits)
        keys = [np.asarray(cache.keys[i]) for i in range(c.model.n_layers)]
        results.append((outs, keys, np.asarray(cache.cursor)))
    (outs0, keys0, cur0), (outs1, keys1, cur1) = results
    _close(outs1, outs0)
    _close(keys1, keys0)
    np.testing.assert_array_equal(cur1, cur0)


def _batch(seed=0, batch=8):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 512, (batch, S)).astype(np.int32)
    valid = np.arange(S)[None, :] < rng.integers(S // 2, S + 1, batch)[:, None]
    return {"tokens": tokens, "valid": valid}


def _one_device():
    return make_mesh(MeshConfig(data=-1), jax.devices()[:1])


def _trainer_configs(cfgs, adaptation):
    """(unrolled, scanned) configs; the scanned one also rematerialises with a policy (the unrolled one does not
    remat at all: remat changes what is stored, never what is computed)."""
    cfg, scfg = (replace(c, train={"adaptation": adaptation, "warmup_steps": 0}) for c in cfgs)  # step 1 moves
    return cfg, replace(scfg, model={"remat": True, "remat_policy": "dots_with_no_batch_dims_saveable"})


def test_loss_and_gradients_equal(cfgs, params):
    """`weighted_loss` (what the trainer differentiates) of a padded batch, and its gradient (every leaf trains here,
    adapters included); the scanned model rematerialises with a policy, the unrolled one does not."""
    batch = _batch(batch=2)
    totals = target_counts(batch["valid"])
    out = []
    for c, p in zip(_trainer_configs(cfgs, "full"), (params, to_layout(params, True))):
        graphdef = _graphdef(c.model)
        loss_fn = lambda w, c=c, g=graphdef: weighted_loss(g, w, batch["tokens"], batch["valid"], totals, c)[0]
        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(p)
        out.append((loss, jax.device_get(to_layout(grads, False))))
    (l0, g0), (l1, g1) = out
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    _close(g1, g0, rtol=1e-5, atol=1e-7)
    assert float(np.abs(g0["layers"][1]["mlp"]["down_adapter"]["b"]).max()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("adaptation", ["full", "adapters"])
def test_training_step_equal(cfgs, params, adaptation):
    """One train step: loss, gradient norm and the updated params (AdamW)."""
    mesh, out = _one_device(), []
    for c in _trainer_configs(cfgs, adaptation):
        trainer = Trainer(c, mesh)
        state = trainer.init_state(params)
        with jax.set_mesh(mesh):
            state, metrics = trainer.train_step(state, make_global_batch(_batch(), mesh))
        out.append((jax.device_get(metrics), jax.device_get(to_layout(state["params"], False))))
    (m0, p0), (m1, p1) = out
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-5)
    _close(p1, p0)
    assert float(np.abs(p1["layers"][0]["attn"]["q_adapter"]["a"] - params["layers"][0]["attn"]["q_adapter"]["a"]
                        ).max()) > 0
    if adaptation == "adapters":  # only adapters moved, in both layouts
        frozen = adapters.split_trainable(params)[1]
        jax.tree.map(np.testing.assert_array_equal, adapters.split_trainable(p1)[1], frozen)


@pytest.mark.slow
def test_sharded_train_step_with_scan_layers(cfgs, params):
    """fsdp 4 x tensor 2 on 8 simulated devices: the stacked params keep the unrolled shardings behind a replicated
    layer axis, and the loss, gradients and step equal the one-device ones."""
    scfg, results = _trainer_configs(cfgs, "full")[1], []
    for mesh in (_one_device(), make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))):
        trainer = Trainer(scfg, mesh)
        state = trainer.init_state(params)
        batch = make_global_batch(_batch(seed=1), mesh)
        with jax.set_mesh(mesh):
            grads, _ = jax.jit(trainer.loss_and_grads)(state["params"], batch)
            state, metrics = trainer.train_step(state, batch)
        results.append((jax.device_get(metrics), jax.device_get(grads), jax.device_get(state["params"])))
    flat_spec = param_shardings(abstract_model(cfgs[0].model)[1], mesh)["layers"][0]["attn"]["q_proj"].spec
    assert flat_spec[:2] == ("fsdp", "tensor")  # [embed, heads, head_dim]
    assert state["params"]["layers"]["attn"]["q_proj"].sharding.spec == P(None, *flat_spec)
    (m0, g0, p0), (m1, g1, p1) = results
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-5)
    _close(g1, g0, rtol=1e-4, atol=1e-7)
    # Adam's first step is lr * g / |g|: where g is ~1e-8 the mesh's summation order shows, in a few elements.
    close = [np.isclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p0))]
    assert sum(c.sum() for c in close) >= 0.9999 * sum(c.size for c in close)
    moved = p1["layers"]["mlp"]["up_proj"] - to_layout(params, True)["layers"]["mlp"]["up_proj"]
    assert float(np.abs(moved).max()) > 1e-4


@pytest.mark.slow  # ~14 s (default suite under 10 min on 2 cores)
def test_decode_scan_layers_picks_the_decoding_layout(cfgs, params):
    """Whatever the params' layout, a Generator decodes in decode.scan_layers's (params converted once: a
    per-layer cache when unrolled, a stacked one when scanned), and greedy TiDAR in all four combinations gives
    the unrolled model's greedy AR tokens."""
    prompts = [[5, 9, 33, 7], [12, 40, 41, 42, 43, 44, 45]]
    outputs = {}
    for c, p in ((cfgs[0], params), (cfgs[1], to_layout(params, True))):
        state = abstract_model(c.model)[1]
        nnx.replace_by_pure_dict(state, p)
        for scanned in (False, True):
            gen = Generator(_graphdef(c.model), state, c.model, dataclasses.replace(c.decode, scan_layers=scanned))
            assert gen.model_cfg.scan_layers == scanned
            assert gen.prefill(prompts, "tidar", 12)[0].cache.stacked == scanned
            outputs[c.model.scan_layers, scanned] = gen.generate(prompts, "tidar", 12).tokens
            if not c.model.scan_layers and not scanned:
                ar = gen.generate(prompts, "ar", 12).tokens
    assert all(tokens == ar for tokens in outputs.values()), (ar, outputs)


@pytest.mark.slow  # ~13 s (default suite under 10 min on 2 cores)
def test_spec_decoding_converts_target_and_draft(cfgs, params):
    """SpecDecoder lays out the draft like the target (decode.scan_layers): a scanned model drafting for itself
    decodes unrolled by default (both caches per layer), scanned on request, and matches its AR greedy output."""
    scfg = cfgs[1]
    state = abstract_model(scfg.model)[1]
    nnx.replace_by_pure_dict(state, to_layout(params, True))
    graphdef = _graphdef(scfg.model)
    prompts = [[5, 9, 33, 7], [12, 40, 41]]
    ar = Generator(graphdef, state, scfg.model, scfg.decode).generate(prompts, "ar", 6).tokens
    for scanned in (False, True):
        decoder = SpecDecoder(graphdef, state, scfg.model, dataclasses.replace(scfg.decode, scan_layers=scanned),
                              graphdef, state, scfg.model, 3)
        assert decoder.model_cfg.scan_layers == decoder.draft_cfg.scan_layers == scanned
        assert decoder.generate(prompts, 6).tokens == ar


def _run_forward(bundle, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(forward(bundle.graphdef, bundle.params, tokens, positions,
                              masks.causal_mask(tokens.shape[1])[None])[0])


@pytest.mark.slow  # ~14 s (default suite under 10 min on 2 cores)
def test_checkpoints_load_into_either_layout(cfgs, params, tmp_path):
    """An unrolled checkpoint written before model.scan_layers existed (no such key in its config) and a scanned
    one each load as saved, stacked and unstacked, with the same logits."""
    cfg, scfg = cfgs
    old, new = tmp_path / "old", tmp_path / "new"
    save_inference_checkpoint(old, cfg, params)
    config_file = old / "checkpoints" / "0" / "config" / "metadata"  # Orbax's JSON item
    data = json.loads(config_file.read_text())
    del data["model"]["scan_layers"], data["model"]["remat_policy"]  # an old workdir: it never heard of them
    config_file.write_text(json.dumps(data))
    (old / "checkpoints" / "0" / MANIFEST_NAME).unlink()  # nor of checksum manifests
    save_inference_checkpoint(new, scfg, params)  # unrolled params given, saved stacked
    tokens = _tokens(seed=2)
    expected = None
    for path in (old, new):
        for layout in (None, True, False):
            bundle = load_for_inference(path, scan_layers=layout)
            stacked = (path == new) if layout is None else layout
            assert bundle.config.model.scan_layers == stacked == is_stacked(nnx.to_pure_dict(bundle.params))
            logits = _run_forward(bundle, tokens)
            expected = logits if expected is None else expected
            _close(logits, expected)
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    sharded = load_for_inference(old, mesh, scan_layers=True)
    assert sharded.params["layers"]["mlp"]["down_proj"][...].sharding.spec == P(None, "tensor", "fsdp")
    jax.tree.map(np.testing.assert_array_equal, to_layout(jax.device_get(nnx.to_pure_dict(sharded.params)), False),
                 jax.device_get(params))


def test_hf_tensors_round_trip_with_scan_layers(cfgs, params, tmp_path):
    cfg, scfg = cfgs
    stacked_state = abstract_model(scfg.model)[1]
    nnx.replace_by_pure_dict(stacked_state, to_layout(params, True))
    tensors = hf.hf_tensors_from_params(scfg.model, stacked_state)
    assert tensors.keys() == hf.hf_tensors_from_params(cfg.model, params).keys()
    jax.tree.map(np.testing.assert_array_equal, tensors, hf.hf_tensors_from_params(cfg.model, params))
    back = nnx.to_pure_dict(hf.params_from_hf_tensors(dataclasses.replace(scfg.model, adapter_rank=0), tensors))
    assert is_stacked(back)
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(to_layout(params, True))}
    for path, leaf in jax.tree_util.tree_leaves_with_path(back):  # the base model's leaves, stacked
        np.testing.assert_array_equal(leaf, want[jax.tree_util.keystr(path)])
    # With adapters: export (adapters go to their own file) and re-import as a scanned model.
    out = hf.export_hf_checkpoint(tmp_path / "hf", scfg.model, stacked_state)
    imported = hf.convert_hf(json.loads((out / "config.json").read_text()), hf.SafetensorsCheckpoint(out))
    again = to_layout(nnx.to_pure_dict(imported.params), True)
    jax.tree.map(np.testing.assert_array_equal, again, to_layout(params, True))


def test_sharded_decoding_with_a_stacked_cache(cfgs, params):
    """data 2 x tensor 2: the stacked cache is split over rows and KV heads behind a replicated layer axis, and
    the output equals the unrolled model's on one device."""
    cfg, scfg = cfgs
    prompts = [[5, 9, 33, 7], [12, 40, 41]]
    states = []
    for c, p in ((cfg, params), (scfg, to_layout(params, True))):
        state = abstract_model(c.model)[1]
        nnx.replace_by_pure_dict(state, p)
        states.append(state)
    one = Generator(_graphdef(cfg.model), states[0], cfg.model, cfg.decode).generate(prompts, "tidar", 6)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    gen = Generator(_graphdef(scfg.model), states[1], scfg.model, scfg.decode, mesh=mesh)
    state, _, _ = gen.prefill(prompts, "tidar", 6)
    for buffer in (state.cache.keys, state.cache.values):  # [layers, batch, slots, kv_heads, head_dim]
        assert tuple(n // s for n, s in zip(buffer.shape, buffer.sharding.shard_shape(buffer.shape))) == (1, 2, 1, 2, 1)
    assert gen.generate(prompts, "tidar", 6).tokens == one.tokens
