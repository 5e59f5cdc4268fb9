"""ops.blockwise_attention equals jax.nn.dot_product_attention with the dense training masks (outputs and
gradients), its schedule skips exactly the fully masked tiles, no [T, T] array exists in its forward + backward,
and the model / train step with attention_impl=blockwise (splash, cudnn_hybrid) equal the dense "xla" path."""

import dataclasses

import jax
import jax.extend.core as jex_core
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import assert_outputs_and_grads_close, inputs, layout_mask, outputs_and_grads
from flax import nnx

from tidar_jax.config import replace
from tidar_jax.layout import masks
from tidar_jax.model.transformer import create_model, forward
from tidar_jax.ops import hybrid
from tidar_jax.ops.blockwise import blockwise_attention, tile_schedule
from tidar_jax.training.objective import target_counts, weighted_loss


def dense_layout_mask(seq_len, block_size):
    """design.md section 2 (or plain causal when block_size is None) with numpy broadcasting, independent of
    masks.py: [T, T] bool."""
    if block_size is None:
        idx = np.arange(seq_len)
        return idx[None, :] <= idx[:, None]
    idx = np.arange(2 * seq_len)
    q, k = idx[:, None], idx[None, :]
    qc, kc, qp, kp = q < seq_len, k < seq_len, q % seq_len, k % seq_len
    return ((qc & kc & (kp <= qp)) | (~qc & kc & (kp < (qp // block_size) * block_size))
            | (~qc & ~kc & (qp // block_size == kp // block_size)))


def padding(batch, seq_len, block_size):
    """[batch, S] bool key_valid per clean position: all valid, right padding, the first block padded (its mask
    rows then see no key at all) and, from batch 4 on, a fully padded row (every row empty)."""
    valid = np.ones((max(batch, 4), seq_len), bool)
    valid[1, seq_len - 3:] = False
    valid[2, :block_size or 2] = False
    valid[3:] = False
    return valid[:batch]


@pytest.mark.parametrize("seq_len,block_size,block_q,block_k,heads,kv", [
    (12, 3, 16, 16, 4, 2),    # T = 24 not a multiple of the tile, GQA g = 2
    (10, 5, 8, 4, 4, 1),      # K = 5 divides neither tile, g = 4
    (16, 4, 128, 128, 2, 2),  # one tile covers everything, g = 1
    (16, 4, 8, 16, 4, 2),     # rectangular tiles
    (13, None, 4, 8, 4, 2),   # plain causal, S = 13
])
def test_equals_dense_reference_with_gradients(seq_len, block_size, block_q, block_k, heads, kv):
    lm = layout_mask(padding(4, seq_len, block_size), block_size)
    q, k, v, w = inputs(seq_len, 4, lm.layout.length, heads, kv)
    dense = jnp.asarray(dense_layout_mask(seq_len, block_size))[None, None] & lm.key_valid[:, None, None, :]

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")

    def blockwise(q, k, v):
        return blockwise_attention(q, k, v, lm.layout, lm.key_valid, block_q=block_q, block_k=block_k)

    assert_outputs_and_grads_close(outputs_and_grads(blockwise, q, k, v, w), outputs_and_grads(reference, q, k, v, w))


def test_rows_of_a_layout_over_given_keys():
    """q_offset: the S mask rows alone over all 2S keys (draft_loss.py's mask pass) equal those rows of the whole."""
    seq_len, block_size = 12, 3
    lm = layout_mask(padding(3, seq_len, block_size), block_size)
    q, k, v, _ = inputs(1, 3, 2 * seq_len, 4, 2)
    whole = blockwise_attention(q, k, v, lm.layout, lm.key_valid, block_q=8, block_k=8)
    rows = blockwise_attention(q[:, seq_len:], k, v, lm.layout, lm.key_valid, q_offset=seq_len, block_q=8,
                               block_k=8)
    np.testing.assert_allclose(rows, whole[:, seq_len:], atol=1e-6)


@pytest.mark.parametrize("seq_len,block_size,q_offset,block_q,block_k", [
    (64, 4, 0, 16, 16), (60, 6, 0, 16, 32), (60, 6, 60, 16, 8), (64, None, 0, 16, 16), (50, 5, 0, 128, 128)])
def test_schedule_is_exactly_the_tiles_with_an_allowed_element(seq_len, block_size, q_offset, block_q, block_k):
    mask = dense_layout_mask(seq_len, block_size)[q_offset:]
    rows, keys = mask.shape
    bq, bk = min(block_q, rows), min(block_k, keys)
    padded = np.zeros((-(-rows // bq) * bq, -(-keys // bk) * bk), bool)
    padded[:rows, :keys] = mask
    tiles = padded.reshape(padded.shape[0] // bq, bq, padded.shape[1] // bk, bk).any(axis=(1, 3))
    pairs = tile_schedule(masks.TrainingLayout(seq_len, block_size), q_offset, rows, block_q, block_k)
    assert sorted(map(tuple, pairs.tolist())) == sorted(map(tuple, np.argwhere(tiles).tolist()))
    if tiles.size > 1:
        assert len(pairs) < tiles.size  # something is skipped


def _avals(jaxpr):
    """Every variable's aval in a (closed) jaxpr, recursing into sub-jaxprs (scan bodies, custom rules)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield from (v.aval for v in eqn.outvars)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, (jex_core.Jaxpr, jex_core.ClosedJaxpr)):
                    yield from _avals(sub)


def _grad_fns(seq_len, block_size):
    """(q, k, v, blockwise gradient fn, dense gradient fn) of a random linear functional, batch 1, 2 heads, 1 kv."""
    lm = layout_mask(padding(1, seq_len, block_size), block_size)
    q, k, v, w = inputs(0, 1, lm.layout.length, 2, 1)

    def grad_of(attend):
        return jax.grad(lambda *a: jnp.sum(attend(*a) * w), argnums=(0, 1, 2))

    blockwise = grad_of(lambda q, k, v: blockwise_attention(q, k, v, lm.layout, lm.key_valid, block_q=16,
                                                            block_k=16))
    dense = grad_of(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=lm.dense()[:, None]))
    return (q, k, v), blockwise, dense


def test_no_quadratic_array_in_forward_and_backward():
    """No array in the jaxpr of forward + backward is anywhere near [T, T] (the dense path's are, which shows the
    check can fail), and the compiled temp memory grows linearly: doubling S at most ~doubles it."""
    args, blockwise, dense = _grad_fns(128, 4)
    t = 256

    def largest(fn):
        return max(a.size for a in _avals(jax.make_jaxpr(fn)(*args)) if hasattr(a, "size"))

    assert largest(dense) >= t * t
    assert largest(blockwise) < t * t // 8
    temps = []
    for seq_len in (128, 256):
        args, blockwise, _ = _grad_fns(seq_len, 4)
        temps.append(jax.jit(blockwise).lower(*args).compile().memory_analysis().temp_size_in_bytes)
    assert temps[1] <= 2.2 * temps[0]
    assert temps[1] < 4 * 512 * 512  # below a single float32 [T, T] score matrix at T = 512


def test_model_forward_xla_bit_identical_and_blockwise_close(tiny_config):
    """A LayoutMask on the "xla" path gives exactly the dense-mask forward; "blockwise" the same within float32."""
    cfg = replace(tiny_config, model={"n_layers": 1, "attention_impl": "xla"})  # the dense reference
    graphdef, params = nnx.split(create_model(cfg.model, seed=0))
    block_graphdef = nnx.graphdef(create_model(replace(cfg, model={"attention_impl": "blockwise"}).model))
    seq, block = 16, cfg.model.block_size
    valid = jnp.asarray(padding(2, seq, block))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 100, (2, seq)), jnp.int32)
    inputs_ = masks.training_inputs(tokens, cfg.model.mask_token_id)
    positions = jnp.broadcast_to(masks.training_positions(seq), inputs_.shape)
    dense = masks.with_key_padding(masks.training_mask(seq, block), jnp.concatenate([valid, valid], 1))
    run = jax.jit(forward, static_argnums=0)
    ref, _ = run(graphdef, params, inputs_, positions, dense)
    same, _ = run(graphdef, params, inputs_, positions, masks.tidar_layout_mask(valid, block))
    close, _ = run(block_graphdef, params, inputs_, positions, masks.tidar_layout_mask(valid, block))
    np.testing.assert_array_equal(same, ref)
    np.testing.assert_allclose(close, ref, atol=1e-5, rtol=1e-5)


def _with_impl(cfg, impl):
    """cfg with model.attention_impl=impl. cudnn_hybrid, whose fused clean half the caller forces onto the XLA
    kernel (hybrid.FUSED_IMPLEMENTATION), skips the load-time check that refuses it float32 compute (cuDNN has no
    float32 kernel); every other impl goes through the validated `replace`."""
    if impl != "cudnn_hybrid":
        return replace(cfg, model={"attention_impl": impl})
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=impl))


@pytest.mark.parametrize("impl", ["blockwise", "splash", "cudnn_hybrid"])
@pytest.mark.parametrize("mode", ["tidar", pytest.param("ar", marks=pytest.mark.slow), "adapters"])
def test_train_loss_and_grads_equal_xla(tiny_config, mode, impl, monkeypatch):
    """The trainer's loss (tidar / ar objective, and the two-pass adapter loss of draft_loss.py) and its
    gradients with attention_impl=blockwise / splash (Pallas interpret mode on CPU) / cudnn_hybrid (its causal
    kernel run by XLA) equal the dense "xla" path's (float32). Splash tiles are multiples of 128 tokens, hence its
    longer sequences. cudnn_hybrid gets suffix padding only, so its fused kernel (not the blockwise fallback it
    takes for other padding, tests/test_ops_hybrid.py) computes the clean half."""
    monkeypatch.setattr(hybrid, "FUSED_IMPLEMENTATION", "xla")
    seq = 16 if impl in ("blockwise", "cudnn_hybrid") else (128 if mode == "ar" else 64)
    overrides = {"tidar": {}, "ar": {"train": {"objective": "ar"}},
                 "adapters": {"train": {"adaptation": "adapters"}, "model": {"adapter_rank": 2}}}[mode]
    cfg = replace(tiny_config, data={"seq_len": seq}, **overrides)
    cfg = replace(cfg, model={"n_layers": 1})
    rng = np.random.default_rng(1)
    valid = padding(3, seq, cfg.model.block_size)
    if impl == "cudnn_hybrid":
        valid[2] = True  # row 1 stays right-padded
    valid = jnp.asarray(valid)
    tokens = jnp.where(valid, jnp.asarray(rng.integers(3, 100, (3, seq)), jnp.int32), 2)
    params = nnx.to_pure_dict(nnx.split(create_model(cfg.model, seed=0))[1])
    results = []
    for name in ("xla", impl):
        c = _with_impl(cfg, name)
        graphdef = nnx.graphdef(create_model(c.model))
        fn = jax.jit(jax.value_and_grad(
            lambda p: weighted_loss(graphdef, p, tokens, valid, target_counts(valid), c)[0]))
        results.append(fn(params))
    (ref_loss, ref_grads), (loss, grads) = results
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)
