"""ops.row_ce and the *_from_hidden losses: chunked == dense in value, metrics and gradients; the trainer's
`train.loss_chunk_rows` path matches the dense one on a (data 2, fsdp 2, tensor 2) mesh, tied and untied heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tidar_jax.config import MeshConfig, load_config, replace
from tidar_jax.model.init import init_sharded_model
from tidar_jax.ops import row_ce
from tidar_jax.sharding import make_global_batch, make_mesh
from tidar_jax.training import losses
from tidar_jax.training.trainer import Trainer

SEQ = 16


def _inputs(batch=3, rows=10, d=8, vocab=37, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (batch, rows, d)), jax.random.normal(k[1], (d, vocab)),
            jax.random.randint(k[2], (batch, rows), 0, vocab))


@pytest.mark.parametrize("chunk", [1, 7, 30, 64])  # 7 does not divide 30 rows (padded last chunk); 64 > rows
def test_row_ce_chunked_matches_dense_values_and_grads(chunk):
    hidden, head, targets = _inputs()
    weights = jax.random.uniform(jax.random.key(9), targets.shape)

    def scalar(h, w, c):
        ce, hits = row_ce(h, w, targets, "float32", c)
        return jnp.sum(ce * weights), hits

    (dense, dense_hits), dense_g = jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True)(hidden, head, 0)
    (got, hits), g = jax.jit(jax.value_and_grad(scalar, argnums=(0, 1), has_aux=True),
                             static_argnums=2)(hidden, head, chunk)
    np.testing.assert_allclose(got, dense, rtol=1e-6)
    np.testing.assert_array_equal(hits, dense_hits)
    for a, b in zip(g, dense_g):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~16 s (default suite under 10 min on 2 cores)
def test_tidar_and_ar_loss_from_hidden_match_the_logits_losses_with_padding():
    batch, seq, block, vocab = 3, 8, 4, 23
    hidden, head, _ = _inputs(batch, 2 * seq, 6, vocab, seed=1)
    tokens = jax.random.randint(jax.random.key(5), (batch, seq), 0, vocab)
    valid = jnp.arange(seq)[None] < jnp.array([[8], [5], [2]])

    def dense(h, w):
        return losses.tidar_loss(jnp.einsum("brd,dv->brv", h, w), tokens, valid, block, 0.3)

    def chunked(h, w):
        return losses.tidar_loss_from_hidden(h, w, tokens, valid, block, 0.3, "float32", 5)

    (ref, ref_m), ref_g = jax.value_and_grad(dense, argnums=(0, 1), has_aux=True)(hidden, head)
    (got, got_m), got_g = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, head)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for key in ref_m:
        np.testing.assert_allclose(got_m[key], ref_m[key], rtol=1e-6, err_msg=key)
    for a, b in zip(got_g, ref_g):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    clean = hidden[:, :seq]
    ar_ref = losses.ar_loss(jnp.einsum("brd,dv->brv", clean, head), tokens, valid)[1]
    ar_got = losses.ar_loss_from_hidden(clean, head, tokens, valid, "float32", 3)[1]
    for key in ar_ref:
        np.testing.assert_allclose(ar_got[key], ar_ref[key], rtol=1e-6, err_msg=key)


def _batch(batch=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 512, (batch, SEQ)).astype(np.int32)
    lengths = rng.integers(SEQ // 2, SEQ + 1, batch)
    valid = np.arange(SEQ)[None, :] < lengths[:, None]
    return {"tokens": np.where(valid, tokens, 2).astype(np.int32), "valid": valid}


@pytest.mark.parametrize("tie", [pytest.param(True, marks=pytest.mark.slow), False])
def test_trainer_chunked_loss_matches_dense_on_a_tensor_sharded_mesh(repo_root, tie):
    """Vocab-sharded head (tensor=2): the chunked path lowers and gives the dense loss and gradients."""
    cfg = load_config(f"{repo_root}/configs/tiny.yaml", [f"data.seq_len={SEQ}", "model.n_layers=1",
                                                         f"model.tie_embeddings={tie}"])
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    params = nnx.to_pure_dict(init_sharded_model(cfg.model, mesh, 0)[1])
    batch = make_global_batch(_batch(), mesh)
    out = {}
    for chunk in (0, 24):
        trainer = Trainer(replace(cfg, train={"loss_chunk_rows": chunk}), mesh)
        with jax.set_mesh(mesh):
            out[chunk] = jax.device_get(jax.jit(trainer.loss_and_grads)(params, batch))
    (g0, m0), (g1, m1) = out[0], out[24]
    for key in m0:
        np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
