"""The joint TiDAR loss against a plain NumPy reference, and a tiny model that overfits one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tidar_jax.layout import masks
from tidar_jax.model.transformer import create_model, forward
from tidar_jax.training.losses import ar_loss, tidar_loss


def reference(logits, tokens, valid, block, alpha):
    """Loops over positions: AR targets tokens[i+1] from clean i, diffusion targets tokens[i] from mask i."""
    logits, tokens, valid = np.asarray(logits, np.float64), np.asarray(tokens), np.asarray(valid)
    batch, seq = tokens.shape
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ar, diff, slot_hits, slot_counts = [], [], np.zeros(block), np.zeros(block)
    for b in range(batch):
        for i in range(seq):
            if i + 1 < seq and valid[b, i] and valid[b, i + 1]:
                ar.append(-logp[b, i, tokens[b, i + 1]])
            if valid[b, i]:
                diff.append(-logp[b, seq + i, tokens[b, i]])
                slot_counts[i % block] += 1
                slot_hits[i % block] += np.argmax(logits[b, seq + i]) == tokens[b, i]
    ar_mean, diff_mean = np.mean(ar), np.mean(diff)
    return (alpha * ar_mean + diff_mean) / (1 + alpha), ar_mean, diff_mean, slot_hits / slot_counts


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_tidar_loss_matches_reference_with_padding(alpha):
    batch, seq, vocab, block = 3, 8, 11, 4
    logits = jax.random.normal(jax.random.key(0), (batch, 2 * seq, vocab)) * 3
    tokens = jax.random.randint(jax.random.key(1), (batch, seq), 0, vocab)
    valid = jnp.arange(seq)[None] < jnp.array([[8], [5], [2]])
    loss, metrics = tidar_loss(logits, tokens, valid, block, alpha)
    ref_loss, ref_ar, ref_diff, ref_slots = reference(logits, tokens, valid, block, alpha)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["ar_loss"], ref_ar, rtol=1e-5)
    np.testing.assert_allclose(metrics["diff_loss"], ref_diff, rtol=1e-5)
    np.testing.assert_allclose(metrics["diff_slot_accuracy"], ref_slots, rtol=1e-6)
    assert metrics["ar_count"] == 7 + 4 + 1 and metrics["diff_count"] == 8 + 5 + 2


def soft_reference(logits, tokens, valid):
    """Diffusion loss with soft targets, looped: mask row i is scored against softmax(clean row i-1) (the AR
    prediction of position i) where that row is a valid position, else against tokens[i]."""
    logits, tokens, valid = np.asarray(logits, np.float64), np.asarray(tokens), np.asarray(valid)
    batch, seq = tokens.shape

    def log_softmax(x):
        return x - x.max() - np.log(np.exp(x - x.max()).sum())

    terms = []
    for b in range(batch):
        for i in range(seq):
            if not valid[b, i]:
                continue
            draft = log_softmax(logits[b, seq + i])
            if i > 0 and valid[b, i - 1]:
                teacher = np.exp(log_softmax(logits[b, i - 1]))
                terms.append(-(teacher * draft).sum())
            else:
                terms.append(-draft[tokens[b, i]])
    return np.mean(terms)


def test_soft_draft_targets_match_a_looped_reference_in_value_and_gradient():
    batch, seq, vocab, block = 3, 8, 11, 4
    logits = jax.random.normal(jax.random.key(7), (batch, 2 * seq, vocab)) * 2
    tokens = jax.random.randint(jax.random.key(8), (batch, seq), 0, vocab)
    valid = jnp.arange(seq)[None] < jnp.array([[8], [5], [1]])  # the last row has no teacher at all
    _, metrics = tidar_loss(logits, tokens, valid, block, soft_targets=True)
    np.testing.assert_allclose(metrics["diff_loss"], soft_reference(logits, tokens, valid), rtol=1e-5)
    _, hard = tidar_loss(logits, tokens, valid, block)
    assert abs(float(metrics["diff_loss"]) - float(hard["diff_loss"])) > 1e-2  # the targets really changed
    np.testing.assert_array_equal(metrics["diff_slot_accuracy"], hard["diff_slot_accuracy"])  # still vs tokens

    # Gradient: the draft rows get d/dq of the soft CE; the teacher (clean) rows get none from the diffusion term.
    grad = jax.grad(lambda x: tidar_loss(x, tokens, valid, block, soft_targets=True)[1]["diff_loss"])(logits)
    eps, probe = 1e-3, [(0, seq + 3, 5), (1, seq + 0, 2), (2, seq + 0, 7), (1, seq + 6, 1)]
    for b, i, v in probe:
        up = np.asarray(logits, np.float64).copy()
        down = up.copy()
        up[b, i, v] += eps
        down[b, i, v] -= eps
        numeric = (soft_reference(up, tokens, valid) - soft_reference(down, tokens, valid)) / (2 * eps)
        np.testing.assert_allclose(grad[b, i, v], numeric, rtol=2e-3, atol=1e-6)
    assert float(jnp.max(jnp.abs(grad[:, :seq]))) == 0.0


def test_padding_values_do_not_matter():
    logits = jax.random.normal(jax.random.key(2), (1, 8, 7))
    tokens = jnp.array([[1, 2, 3, 0]])
    valid = jnp.array([[True, True, True, False]])
    changed_logits = logits.at[:, 3].set(100.0).at[:, 7].set(-100.0)
    a, _ = tidar_loss(logits, tokens, valid, 2)
    b, _ = tidar_loss(changed_logits, tokens.at[0, 3].set(6), valid, 2)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_tidar_loss_rejects_wrong_layout():
    with pytest.raises(ValueError, match="2S"):
        tidar_loss(jnp.zeros((1, 4, 5)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool), 2)


def test_ar_loss_equals_ar_term():
    logits = jax.random.normal(jax.random.key(3), (2, 12, 9))
    tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, 9)
    valid = jnp.ones((2, 6), bool)
    _, joint = tidar_loss(logits, tokens, valid, 3)
    plain, _ = ar_loss(logits[:, :6], tokens, valid)
    np.testing.assert_allclose(plain, joint["ar_loss"], rtol=1e-6)


def test_loss_falls_when_overfitting_one_batch(tiny_config):
    cfg = tiny_config.model
    graphdef, params = nnx.split(create_model(cfg, seed=0))
    seq = 16
    tokens = jax.random.randint(jax.random.key(5), (4, seq), 3, cfg.vocab_size)
    valid = jnp.ones_like(tokens, bool)
    inputs = masks.training_inputs(tokens, cfg.mask_token_id)
    positions = jnp.broadcast_to(masks.training_positions(seq), inputs.shape)
    mask = masks.training_mask(seq, cfg.block_size)[None]
    tx = optax.adam(1e-2)

    def loss_fn(p):
        logits, _ = forward(graphdef, p, inputs, positions, mask)
        return tidar_loss(logits, tokens, valid, cfg.block_size)

    @jax.jit
    def step(p, opt_state):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, metrics

    opt_state = tx.init(params)
    params, opt_state, first = step(params, opt_state)
    for _ in range(60):
        params, opt_state, last = step(params, opt_state)
    assert float(last["loss"]) < 0.3 * float(first["loss"])
    assert float(last["ar_loss"]) < 0.3 * float(first["ar_loss"])
    assert float(last["diff_loss"]) < float(first["diff_loss"])
