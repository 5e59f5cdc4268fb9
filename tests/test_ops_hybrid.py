"""ops.hybrid_attention (fused causal kernel for the clean half, blockwise for the mask half) equals the dense masked
`jax.nn.dot_product_attention` (`LayoutMask.dense()`), in outputs and in gradients wrt q, k, v, with every kind of key
padding, alone and under a mesh. On CPU the fused call runs with implementation="xla", the identical code path
otherwise; the cuDNN kernel itself is tested only where a GPU exists (scripts/gpu_bench.sh). The model-level train
step equality is in tests/test_ops_blockwise.py (parametrised over the structured impls)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import assert_outputs_and_grads_close, inputs, layout_mask, outputs_and_grads

from tidar_jax.config import ConfigError, load_config
from tidar_jax.layout import masks
from tidar_jax.ops import hybrid
from tidar_jax.ops.hybrid import hybrid_attention, suffix_lengths
from tidar_jax.sharding import check_runtime


def padding(kind, batch, seq_len, block_size):
    """[batch >= 4, S] bool per clean position. "none": all valid; "suffix": row 1 right-padded, row 3 fully padded
    (every row of it empty); "any": "suffix" plus row 2's first block padded (not expressible as lengths)."""
    valid = np.ones((batch, seq_len), bool)
    if kind in ("suffix", "any"):
        valid[1, seq_len - 3:] = False
        valid[3] = False
    if kind == "any":
        valid[2, :block_size or 2] = False
    return valid


def dense_reference(lm):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=lm.dense()[:, None], implementation="xla")


@pytest.mark.parametrize("kind", ["suffix", "any"])  # "suffix" has fully valid rows too (0 and 2)
@pytest.mark.parametrize("seq_len, block_size, heads, kv, block", [
    (12, 3, 4, 2, 8),      # GQA g = 2, T = 24 not a multiple of the blockwise tile
    (10, 5, 4, 1, 4),      # MQA g = 4, K = 5 divides no tile
    (16, 4, 2, 2, 128),    # MHA, one tile
    (13, None, 4, 2, 8),   # plain causal layout: the fused call alone
])
def test_equals_dense_reference_with_gradients(seq_len, block_size, heads, kv, block, kind):
    lm = layout_mask(padding(kind, 4, seq_len, block_size), block_size)
    q, k, v, w = inputs(seq_len, 4, lm.layout.length, heads, kv, 8)

    def fn(q, k, v):
        return hybrid_attention(q, k, v, lm.layout, lm.key_valid, implementation="xla", block_q=block,
                                block_k=block)

    reference = outputs_and_grads(dense_reference(lm), q, k, v, w)
    assert_outputs_and_grads_close(outputs_and_grads(fn, q, k, v, w), reference)


def test_suffix_lengths_accepts_exactly_suffix_padding():
    """The run-time switch between the fused kernel and the blockwise fallback for the clean half."""
    for kind, expected in (("none", True), ("suffix", True), ("any", False)):
        valid = padding(kind, 4, 12, 3)
        lengths, is_suffix = suffix_lengths(jnp.asarray(valid))
        np.testing.assert_array_equal(lengths, valid.sum(axis=1))
        assert bool(is_suffix) is expected, kind
    holes = np.ones((2, 6), bool)
    holes[0, 2] = False  # a hole inside a row: not a suffix
    assert not bool(suffix_lengths(jnp.asarray(holes))[1])


def test_fused_kernel_alone_equals_dense_clean_rows():
    """`fused_causal` (the branch suffix padding takes), empty rows included, equals the reference's clean rows, so
    the suffix cases above do not pass through the fallback's correctness alone."""
    seq_len, block_size = 12, 3
    lm = layout_mask(padding("suffix", 4, seq_len, block_size), block_size)
    q, k, v, w = inputs(3, 4, 2 * seq_len, 4, 2, 8)
    lengths, is_suffix = suffix_lengths(lm.key_valid[:, :seq_len])
    assert bool(is_suffix)

    def fused(q, k, v):
        s = seq_len
        return hybrid.fused_causal(q[:, :s], k[:, :s], v[:, :s], lengths, v, "xla")

    def reference(q, k, v):
        return dense_reference(lm)(q, k, v)[:, :seq_len]

    assert_outputs_and_grads_close(*(outputs_and_grads(f, q, k, v, w[:, :seq_len]) for f in (fused, reference)))


@pytest.mark.parametrize("batch", [4, 3])
def test_sharded_over_batch_and_heads_equals_unsharded(monkeypatch, batch):
    """Under a mesh the body runs in shard_map (batch on data, heads on tensor; a batch of 3 that data = 2 does not
    divide stays replicated); each device checks its own rows' padding (row 2 is not a suffix), and the default
    implementation is read from FUSED_IMPLEMENTATION."""
    monkeypatch.setattr(hybrid, "FUSED_IMPLEMENTATION", "xla")
    seq_len, block_size = 12, 3
    lm = layout_mask(padding("any", 4, seq_len, block_size)[:batch], block_size)
    q, k, v, w = inputs(5, batch, 2 * seq_len, 4, 2, 8)

    def fn(q, k, v):
        return hybrid_attention(q, k, v, lm.layout, lm.key_valid, block_q=8, block_k=8)

    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        sharded = outputs_and_grads(fn, q, k, v, w)
    assert_outputs_and_grads_close(sharded, outputs_and_grads(dense_reference(lm), q, k, v, w))


@pytest.mark.slow  # ~30 s: a real Trainer step on a 2 x 2 x 2 mesh (the op-level sharded test above is fast)
def test_sharded_scanned_remat_train_step_equals_xla(tiny_config, monkeypatch):
    """The real Trainer on a data x fsdp x tensor = 2 x 2 x 2 mesh with scanned, rematerialised layers: two steps of
    cudnn_hybrid (XLA in place of cuDNN, so the CPU refusals of the Trainer and of float32 are bypassed here) give the
    losses of "xla", the second one after an update (the gradients agree). Row 2's padding is not a suffix, so its
    device takes the blockwise fallback while the others take the fused kernel."""
    import dataclasses

    from tidar_jax.config import MeshConfig, replace
    from tidar_jax.sharding import make_global_batch, make_mesh
    from tidar_jax.training import trainer as trainer_module

    monkeypatch.setattr(hybrid, "FUSED_IMPLEMENTATION", "xla")
    monkeypatch.setattr(trainer_module, "check_runtime", lambda *args: None)
    cfg = replace(tiny_config, data={"seq_len": 16, "global_batch_size": 4}, train={"warmup_steps": 0},
                  model={"scan_layers": True, "remat": True})
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    valid = padding("any", 4, 16, cfg.model.block_size)
    tokens = np.random.default_rng(0).integers(3, 500, (4, 16)).astype(np.int32)
    batch = make_global_batch({"tokens": tokens, "valid": valid}, mesh)
    losses = {}
    for impl in ("xla", "cudnn_hybrid"):
        trainer = trainer_module.Trainer(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=impl)), mesh)
        with jax.set_mesh(mesh):
            state = trainer.init_state()
            state, first = trainer.train_step(state, batch)
            state, second = trainer.train_step(state, batch)
        losses[impl] = (float(first["loss"]), float(second["loss"]))
    assert losses["xla"][1] < losses["xla"][0]  # the second loss is after a real update
    np.testing.assert_allclose(losses["cudnn_hybrid"], losses["xla"], rtol=1e-5)


def test_bad_shapes_are_refused():
    lm = layout_mask(padding("none", 4, 12, 3), 3)
    q, k, v, _ = inputs(0, 4, 20, 4, 2, 8)
    with pytest.raises(ValueError, match="must span the layout's 24 tokens"):
        hybrid_attention(q, k, v, lm.layout, lm.key_valid, implementation="xla")


def test_config_refuses_float32_and_this_cpu_backend():
    """The load-time dtype refusal names the flag; the run-time check refuses the CPU backend (cuDNN)."""
    with pytest.raises(ConfigError, match=r"model.attention_impl=cudnn_hybrid needs model.compute_dtype in .*"
                                          r"use attention_impl=blockwise for float32"):
        load_config(None, ["model.attention_impl=cudnn_hybrid"])
    model = load_config(None, ["model.attention_impl=cudnn_hybrid", "model.compute_dtype=bfloat16"]).model
    assert jax.default_backend() == "cpu"
    with pytest.raises(ConfigError, match="model.attention_impl=cudnn_hybrid needs a GPU backend.*'cpu'"):
        check_runtime(model, 1)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the cuDNN kernel needs a GPU (scripts/gpu_bench.sh)")
def test_cudnn_kernel_equals_dense_reference_on_gpu():
    """The real cuDNN call in bfloat16 (it has no float32 kernel) against the float32 dense reference on the same
    bfloat16-rounded inputs: suffix padding with an empty row (the fused branch) and arbitrary padding (the
    blockwise fallback), one compile (the padding is an argument)."""
    seq_len, block_size = 256, 4
    layout = masks.TrainingLayout(seq_len, block_size)
    q, k, v, w = inputs(7, 4, layout.length, 4, 2, 64, jnp.bfloat16)

    def run(attend, q, k, v, w, key_valid):
        fn = functools.partial(attend, key_valid=key_valid)
        return fn(q, k, v), jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w), argnums=(0, 1, 2))(q, k, v)

    def fused(q, k, v, key_valid):
        return hybrid_attention(q, k, v, layout, key_valid, implementation="cudnn")

    def reference(q, k, v, key_valid):
        return dense_reference(masks.LayoutMask(key_valid, layout))(q, k, v)

    run_fused, run_reference = jax.jit(functools.partial(run, fused)), jax.jit(functools.partial(run, reference))
    f32 = [x.astype(jnp.float32) for x in (q, k, v, w)]
    for kind in ("suffix", "any"):
        key_valid = layout_mask(padding(kind, 4, seq_len, block_size), block_size).key_valid
        out, grads = run_fused(q, k, v, w.astype(jnp.float32), key_valid)
        ref, ref_grads = run_reference(*f32, key_valid)
        assert out.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=3e-2, err_msg=kind)
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=6e-2, rtol=6e-2, err_msg=f"{kind} {name}")
