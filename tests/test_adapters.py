"""Mask-gated adapters: the AR path is bit-identical to the base model; the two-pass drafting loss equals the joint
forward's; adapter training moves only adapters, decodes losslessly, and exports / re-imports exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint
from tidar_jax.config import MeshConfig, load_config, replace
from tidar_jax.decoding.generation import Generator
from tidar_jax.layout import masks
from tidar_jax.model import adapters
from tidar_jax.model.transformer import create_model, forward
from tidar_jax.sharding import make_mesh
from tidar_jax.training import losses
from tidar_jax.training.draft_loss import diffusion_metrics
from tidar_jax.training.loop import train
from tidar_jax.training.run_setup import plan_run

S = 16


@pytest.fixture(scope="module")
def models(tiny_config):
    """(base cfg, base graphdef, base params, adapted cfg, adapted graphdef, adapted params with non-zero B)."""
    base_cfg = tiny_config.model
    adapted_cfg = dataclasses.replace(base_cfg, adapter_rank=4)
    g0, p0 = nnx.split(create_model(base_cfg, seed=0))
    g1, p1 = nnx.split(create_model(adapted_cfg, seed=1))
    pure = adapters.attach_to_base(nnx.to_pure_dict(p0), nnx.to_pure_dict(p1), base_cfg.mask_token_id)
    assert np.array_equal(pure["mask_embed"], nnx.to_pure_dict(p0)["embed"][base_cfg.mask_token_id])
    noise = jax.random.normal(jax.random.key(3), (), jnp.float32)
    pure = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 * (1 + noise) if adapters.is_trainable(path) else x, pure)
    nnx.replace_by_pure_dict(p1, pure)
    return base_cfg, g0, p0, adapted_cfg, g1, p1


def _tokens(batch=2, seq=S, vocab=512, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 3, vocab, jnp.int32)


def test_ar_path_is_bit_identical_to_the_base_model(models):
    base_cfg, g0, p0, _, g1, p1 = models
    tokens = _tokens()
    positions = jnp.broadcast_to(jnp.arange(S)[None], tokens.shape)
    causal = masks.causal_mask(S)[None]
    ar0 = jax.jit(lambda p: forward(g0, p, tokens, positions, causal)[0])(p0)
    ar1 = jax.jit(lambda p: forward(g1, p, tokens, positions, causal)[0])(p1)
    np.testing.assert_array_equal(ar0, ar1)
    # In the TiDAR layout the clean half is exact too, and the mask half is what the adapters change.
    inputs = masks.training_inputs(tokens, base_cfg.mask_token_id)
    pos2 = jnp.broadcast_to(masks.training_positions(S)[None], inputs.shape)
    hybrid = masks.training_mask(S, base_cfg.block_size)[None]
    joint0 = jax.jit(lambda p: forward(g0, p, inputs, pos2, hybrid)[0])(p0)
    joint1 = jax.jit(lambda p: forward(g1, p, inputs, pos2, hybrid)[0])(p1)
    np.testing.assert_array_equal(joint0[:, :S], joint1[:, :S])
    assert float(jnp.max(jnp.abs(joint0[:, S:] - joint1[:, S:]))) > 1e-2


@pytest.mark.parametrize("chunk_rows,soft",
                         [(0, False), pytest.param(5, False, marks=pytest.mark.slow), (0, True)])  # 5: ops.row_ce, row chunks
def test_two_pass_drafting_loss_equals_the_joint_forward(models, chunk_rows, soft):
    _, _, _, cfg, g1, p1 = models
    tokens = _tokens(seed=1)
    valid = jnp.ones(tokens.shape, bool).at[1, 11:].set(False)  # a padded row

    def joint(params):
        inputs = masks.training_inputs(tokens, cfg.mask_token_id)
        positions = jnp.broadcast_to(masks.training_positions(S)[None], inputs.shape)
        mask = masks.with_key_padding(masks.training_mask(S, cfg.block_size), jnp.concatenate([valid, valid], 1))
        logits, _ = forward(g1, params, inputs, positions, mask)
        return losses.diffusion_terms(logits[:, S:], tokens, valid, cfg.block_size, logits[:, :S] if soft else None)

    def two_pass(params):
        return diffusion_metrics(g1, params, tokens, valid, cfg, chunk_rows, soft)

    ref, got = jax.jit(joint)(p1), jax.jit(two_pass)(p1)
    for key in ("diff_loss", "diff_accuracy", "diff_count", "diff_slot_accuracy"):
        np.testing.assert_allclose(got[key], ref[key], rtol=2e-5, atol=1e-6, err_msg=key)
    # Same gradient for the adapters (the clean pass carries none: the base is frozen).
    pure = nnx.to_pure_dict(p1)
    trained, frozen = adapters.split_trainable(pure)

    def grads(fn):
        return jax.jit(jax.grad(lambda w: fn(adapters.merge_trainable(w, frozen))["diff_loss"]))(trained)

    for a, b in zip(jax.tree.leaves(grads(two_pass)), jax.tree.leaves(grads(joint))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def adapted_run(tiny_config, tmp_path_factory):
    """A tiny base checkpoint, then 3 adapter-training steps started from it (train.init_from)."""
    root = tmp_path_factory.mktemp("adapters")
    base = create_model(tiny_config.model, seed=0)
    from tidar_jax.data.pipeline import load_or_train_tokenizer

    tok_file = root / "tok.json"
    load_or_train_tokenizer(tiny_config).save(tok_file)
    save_inference_checkpoint(root / "base", tiny_config, nnx.split(base)[1], tokenizer_file=tok_file)
    cfg = replace(tiny_config, model={"adapter_rank": 4}, data={"seq_len": S},
                  train={"init_from": str(root / "base"), "adaptation": "adapters", "steps": 3, "warmup_steps": 0,
                         "learning_rate": 1e-2, "log_every": 1, "eval_every": 3, "eval_batches": 1,
                         "checkpoint_every": 3})
    mesh = make_mesh(MeshConfig(data=-1), jax.devices()[:1])
    result = train(plan_run(root / "run", config=cfg), progress=False, mesh=mesh)
    return root, result


def test_adapter_training_moves_only_adapters(adapted_run):
    root, result = adapted_run
    base = nnx.to_pure_dict(load_for_inference(root / "base").params)
    final = jax.device_get(result.state["params"])
    trained, frozen = adapters.split_trainable(final)
    for path, leaf in jax.tree_util.tree_flatten_with_path(frozen)[0]:
        node = base
        for k in path:
            node = node[k.key]
        np.testing.assert_array_equal(leaf, node, err_msg=jax.tree_util.keystr(path))
    moved = [float(np.max(np.abs(leaf))) for path, leaf in jax.tree_util.tree_flatten_with_path(trained)[0]
             if path[-1].key == "b"]
    assert moved and min(moved) > 0  # every B started at zero and trained
    losses_seen = [r["diff_loss"] for r in result.records if "diff_loss" in r]
    assert len(losses_seen) == 3 and "ar_loss" not in result.records[0]
    # The saved checkpoint restores the adapters exactly.
    restored = nnx.to_pure_dict(load_for_inference(root / "run").params)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(final)):
        np.testing.assert_array_equal(a, b)


def test_adapted_tidar_reproduces_the_base_models_greedy_output(adapted_run, tiny_config):
    root, _ = adapted_run
    base, adapted = load_for_inference(root / "base"), load_for_inference(root / "run")
    prompts = [[5, 9, 33, 7], [12, 40, 41, 42, 43, 44, 45]]
    ar = Generator(base.graphdef, base.params, base.config.model, tiny_config.decode).generate(
        prompts, mode="ar", max_new_tokens=24)
    gen = Generator(adapted.graphdef, adapted.params, adapted.config.model, tiny_config.decode)
    tidar = gen.generate(prompts, mode="tidar", max_new_tokens=24)
    assert tidar.tokens == ar.tokens
    assert gen.generate(prompts, mode="ar", max_new_tokens=24).tokens == ar.tokens


def test_adapters_export_and_reimport(adapted_run, tmp_path):
    pytest.importorskip("safetensors")
    from tidar_jax.interop import hf

    root, _ = adapted_run
    bundle = load_for_inference(root / "run")
    out = hf.export_hf_checkpoint(tmp_path / "hf", bundle.config.model, bundle.params)
    assert (out / hf.ADAPTERS_FILE).is_file()
    again = hf.import_hf_checkpoint(out)
    assert again.config.adapter_rank == bundle.config.model.adapter_rank
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(again.params)), jax.tree.leaves(nnx.to_pure_dict(bundle.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_pack_attaches_onto_the_base_exactly(adapted_run, tiny_config, tmp_path, dtype):
    pytest.importorskip("safetensors")
    from tidar_jax.interop.adapter_pack import attach_adapter_pack, export_adapter_pack

    root, _ = adapted_run
    base, adapted = load_for_inference(root / "base"), load_for_inference(root / "run")
    pack = export_adapter_pack(adapted, tmp_path / "pack", dtype=dtype)
    attached = attach_adapter_pack(base, pack)
    assert attached.config.model == adapted.config.model
    tol = 0 if dtype == "float32" else 1e-2  # bf16 keeps 8 significant bits of each adapter weight
    got, want = nnx.to_pure_dict(attached.params), nnx.to_pure_dict(adapted.params)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol if adapters.is_trainable(path) else 0,
                                   atol=0, err_msg=jax.tree_util.keystr(path))
    # The base model's AR path is untouched: AR decoding equals the base's, and TiDAR (beta = 1) equals AR.
    prompts = [[5, 9, 33, 7], [12, 40, 41, 42, 43, 44, 45]]
    ar = Generator(base.graphdef, base.params, base.config.model, tiny_config.decode).generate(
        prompts, mode="ar", max_new_tokens=24)
    gen = Generator(attached.graphdef, attached.params, attached.config.model, tiny_config.decode)
    assert gen.generate(prompts, mode="tidar", max_new_tokens=24).tokens == ar.tokens
    assert gen.generate(prompts, mode="ar", max_new_tokens=24).tokens == ar.tokens


def test_adapter_pack_refuses_what_does_not_fit(adapted_run, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file, save_file

    from tidar_jax.interop.adapter_pack import (META_FILE, TENSORS_FILE, attach_adapter_pack, export_adapter_pack)
    from tidar_jax.interop.hf_config import ConversionError

    root, _ = adapted_run
    base, adapted = load_for_inference(root / "base"), load_for_inference(root / "run")
    pack = export_adapter_pack(adapted, tmp_path / "pack", dtype="float32")
    with pytest.raises(FileExistsError):
        export_adapter_pack(adapted, pack)
    with pytest.raises(ConversionError, match="no adapters"):
        export_adapter_pack(base, tmp_path / "none")
    with pytest.raises(ConversionError, match="already has adapters"):
        attach_adapter_pack(adapted, pack)
    other = dataclasses.replace(base, config=replace(base.config, model={"eos_token_id": 3}))
    with pytest.raises(ConversionError, match="another base model: eos_token_id"):
        attach_adapter_pack(other, pack)
    tensors = load_file(str(pack / TENSORS_FILE))
    name = sorted(tensors)[0]
    for label, change, message in (("missing", lambda t: t.pop(name), "lacks tensor"),
                                   ("nan", lambda t: t[name].fill(np.nan), "NaN"),
                                   ("shape", lambda t: t.update({name: t[name][:1]}), "has shape"),
                                   ("extra", lambda t: t.update(stray=np.zeros(2, np.float32)), "does not")):
        broken = tmp_path / label
        broken.mkdir()
        (broken / META_FILE).write_text((pack / META_FILE).read_text())
        copy = {k: v.copy() for k, v in tensors.items()}
        change(copy)
        save_file(copy, str(broken / TENSORS_FILE))
        with pytest.raises(ConversionError, match=message):
            attach_adapter_pack(base, broken)
    with pytest.raises(ConversionError, match="not an adapter pack"):
        attach_adapter_pack(base, tmp_path / "missing-dir")


def test_import_cli_attaches_a_pack_and_exports_one(adapted_run, tmp_path):
    """`--export-adapters` writes a run's adapters as a pack; `--from hf ... --adapters PACK` imports the base with
    them: the checkpoint's adapter leaves equal the run's (float32 pack), its base leaves the base model's."""
    pytest.importorskip("safetensors")
    import shutil

    from tidar_jax.interop import hf
    from train import import_checkpoint

    root, _ = adapted_run
    base, adapted = load_for_inference(root / "base"), load_for_inference(root / "run")
    src = hf.export_hf_checkpoint(tmp_path / "hf", base.config.model, base.params)
    shutil.copyfile(root / "base" / "tokenizer.json", src / "tokenizer.json")
    pack = tmp_path / "pack"
    assert import_checkpoint.main(["--export-adapters", str(pack), "--checkpoint", str(root / "run"),
                                   "--adapters-dtype", "float32"]) == 0
    assert import_checkpoint.main(["--from", "hf", str(src), "--out", str(tmp_path / "out"),
                                   "--adapters", str(pack)]) == 0
    got = load_for_inference(tmp_path / "out")
    assert got.config.model.adapter_rank == adapted.config.model.adapter_rank
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(got.params))[0],
                            jax.tree.leaves(nnx.to_pure_dict(adapted.params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    with pytest.raises(SystemExit) as refused:  # the pack fixes K: a --block-size beside it is refused
        import_checkpoint.main(["--from", "hf", str(src), "--out", str(tmp_path / "again"), "--adapters", str(pack),
                                "--block-size", "4"])
    assert refused.value.code == 2
