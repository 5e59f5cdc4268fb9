"""Masks and positions against design.md's golden tables and plain-Python references."""

import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.layout import masks

# design.md section 2, S = 6, K = 3: columns [clean 0..5 | mask 0..5].
GOLDEN_TRAINING_S6_K3 = np.array([
    [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1],
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1],
], dtype=bool)

# design.md section 3, K = 3: columns [v1 v2 v3 | P1 | P2 | P3] (the cache part is tested separately).
GOLDEN_STEP_K3 = np.array(
    [[1, 0, 0] + [0] * 9, [1, 1, 0] + [0] * 9, [1, 1, 1] + [0] * 9]
    + [[1, 0, 0] + [1, 1, 1] + [0] * 6] * 3
    + [[1, 1, 0] + [0] * 3 + [1, 1, 1] + [0] * 3] * 3
    + [[1, 1, 1] + [0] * 6 + [1, 1, 1]] * 3, dtype=bool)


def reference_training_mask(seq_len, block):
    """Direct transcription of design.md section 2's rules, one pair at a time."""
    out = np.zeros((2 * seq_len, 2 * seq_len), bool)
    for q in range(2 * seq_len):
        for k in range(2 * seq_len):
            qp, kp = q % seq_len, k % seq_len
            if q < seq_len and k < seq_len:
                out[q, k] = kp <= qp
            elif q >= seq_len and k < seq_len:
                out[q, k] = kp < (qp // block) * block
            elif q >= seq_len and k >= seq_len:
                out[q, k] = qp // block == kp // block
    return out


def reference_step(block, cursor, lengths=None):
    """(mask among current tokens, positions) of a TiDAR step, from design.md section 3's prose; `lengths` = the
    proposal set (the j whose blocks are present, in order; default all of 1..K)."""
    lengths = range(1, block + 1) if lengths is None else lengths
    tokens = [("draft", i) for i in range(block)] + [("prop", j, r) for j in lengths for r in range(1, block + 1)]
    n = len(tokens)
    mask = np.zeros((n, n), bool)
    pos = []
    for a, qt in enumerate(tokens):
        pos.append(cursor + qt[1] if qt[0] == "draft" else cursor + qt[1] + qt[2] - 1)
        for b, kt in enumerate(tokens):
            if qt[0] == "draft":
                mask[a, b] = kt[0] == "draft" and kt[1] <= qt[1]
            elif kt[0] == "draft":
                mask[a, b] = kt[1] < qt[1]  # sees v_1 .. v_j
            else:
                mask[a, b] = kt[1] == qt[1]
    return mask, np.array(pos)


def test_training_mask_matches_design_golden():
    np.testing.assert_array_equal(np.asarray(masks.training_mask(6, 3)), GOLDEN_TRAINING_S6_K3)


@pytest.mark.parametrize("seq_len, block", [(8, 1), (8, 2), (8, 4), (12, 3), (16, 16)])
def test_training_mask_matches_reference(seq_len, block):
    np.testing.assert_array_equal(np.asarray(masks.training_mask(seq_len, block)),
                                  reference_training_mask(seq_len, block))


@pytest.mark.parametrize("seq_len, block", [(8, 2), (12, 4), (16, 8)])
def test_no_mask_query_sees_clean_token_at_or_after_its_block_start(seq_len, block):
    m = np.asarray(masks.training_mask(seq_len, block))
    for q in range(seq_len, 2 * seq_len):
        block_start = ((q - seq_len) // block) * block
        assert not m[q, block_start:seq_len].any()
        assert m[q, :block_start].all()
    assert not m[:seq_len, seq_len:].any(), "a clean query sees a mask token"


def test_training_mask_rejects_misaligned_block():
    with pytest.raises(ValueError, match="multiple of block_size"):
        masks.training_mask(10, 4)


def test_training_positions_and_inputs():
    np.testing.assert_array_equal(masks.training_positions(4), [0, 1, 2, 3, 0, 1, 2, 3])
    tokens = jnp.array([[5, 6, 7, 8]])
    np.testing.assert_array_equal(masks.training_inputs(tokens, 1), [[5, 6, 7, 8, 1, 1, 1, 1]])


def test_key_padding_removes_padded_keys_only():
    valid = jnp.array([[True, True, False, False], [True, True, True, True]])
    m = np.asarray(masks.with_key_padding(masks.causal_mask(4), valid))
    assert m.shape == (2, 4, 4)
    assert not m[0, :, 2:].any()
    np.testing.assert_array_equal(m[1], np.tril(np.ones((4, 4), bool)))


def test_step_mask_matches_design_golden_k3():
    np.testing.assert_array_equal(np.asarray(masks.step_mask(3, with_proposals=True)), GOLDEN_STEP_K3)


@pytest.mark.parametrize("block", [1, 2, 4, 5])
def test_step_mask_and_positions_match_reference(block):
    cursor = jnp.array([7, 11])
    ref_mask, _ = reference_step(block, 0)
    np.testing.assert_array_equal(np.asarray(masks.step_mask(block, True)), ref_mask)
    pos = np.asarray(masks.step_positions(cursor, block, True))
    for row, c in enumerate([7, 11]):
        np.testing.assert_array_equal(pos[row], reference_step(block, c)[1])
    assert masks.step_query_count(block, True) == block + block * block


@pytest.mark.parametrize("block,lengths", [(2, (1,)), (3, (1,)), (3, (1, 3)), (4, (1,)), (4, (1, 4)), (4, (1, 2)),
                                          (4, (1, 3, 4)), (4, (1, 2, 3, 4))])
def test_sparse_step_mask_and_positions_match_reference(block, lengths):
    """A step with proposal set A: Q = K + |A|*K query tokens, the mask and positions of design.md's rules for
    the blocks present (the full set equals the default)."""
    cursor = jnp.array([7, 11])
    ref_mask, _ = reference_step(block, 0, lengths)
    queries = block + len(lengths) * block
    assert masks.step_query_count(block, True, lengths) == queries == ref_mask.shape[0]
    np.testing.assert_array_equal(np.asarray(masks.step_mask(block, True, lengths)), ref_mask)
    pos = np.asarray(masks.step_positions(cursor, block, True, lengths))
    assert pos.shape == (2, queries)
    for row, c in enumerate([7, 11]):
        np.testing.assert_array_equal(pos[row], reference_step(block, c, lengths)[1])


def test_verify_only_step_is_causal():
    np.testing.assert_array_equal(np.asarray(masks.step_mask(4, with_proposals=False)),
                                  np.tril(np.ones((4, 4), bool)))
    np.testing.assert_array_equal(np.asarray(masks.step_positions(jnp.array([3]), 4, False)), [[3, 4, 5, 6]])


def test_with_cache_prepends_committed_slots():
    valid = jnp.arange(6)[None, :] < jnp.array([[2], [5]])
    m = np.asarray(masks.with_cache(valid, masks.step_mask(2, True)))
    assert m.shape == (2, 6, 12)
    for row, length in enumerate([2, 5]):
        assert m[row, :, :length].all() and not m[row, :, length:6].any()
        np.testing.assert_array_equal(m[row, :, 6:], np.asarray(masks.step_mask(2, True)))


def test_prefill_mask_and_positions_match_reference():
    prompt_len, block = 5, 3
    lengths = jnp.array([5, 2])
    m = np.asarray(masks.prefill_mask(prompt_len, lengths, block))
    pos = np.asarray(masks.prefill_positions(prompt_len, lengths, block))
    for row, length in enumerate([5, 2]):
        for q in range(prompt_len + block):
            for k in range(prompt_len + block):
                if q < prompt_len:
                    expected = k < prompt_len and k <= q
                else:
                    expected = k >= prompt_len or k < length
                assert m[row, q, k] == expected, (row, q, k)
        np.testing.assert_array_equal(pos[row, prompt_len:], np.arange(length, length + block))
        np.testing.assert_array_equal(pos[row, :prompt_len], np.arange(prompt_len))


def test_layout_mask_dense_forms_with_and_without_a_cache():
    """LayoutMask.dense(): the padded training mask; with a cache (draft_loss.py's two passes) the layout's last q
    rows with its first T - q keys as cache slots and the remaining slots unseen."""
    seq, block = 6, 3
    valid = np.ones((2, seq), bool)
    valid[1, 4:] = False
    lm = masks.tidar_layout_mask(jnp.asarray(valid), block)
    ref = reference_training_mask(seq, block)[None] & np.concatenate([valid, valid], 1)[:, None, :]
    np.testing.assert_array_equal(lm.dense(), ref)
    cached = np.asarray(lm.dense(cache_len=seq + 2, n_queries=seq))  # mask rows over [clean slots | 2 free | mask]
    assert cached.shape == (2, seq, 2 * seq + 2)
    np.testing.assert_array_equal(cached[..., :seq], ref[:, seq:, :seq])
    assert not cached[..., seq:seq + 2].any()
    np.testing.assert_array_equal(cached[..., seq + 2:], ref[:, seq:, seq:])
    causal = np.asarray(masks.causal_layout_mask(jnp.asarray(valid)).dense(cache_len=seq, n_queries=seq))
    assert not causal[..., :seq].any()  # the clean pass reads no cache slot
    np.testing.assert_array_equal(causal[..., seq:], np.tril(np.ones((seq, seq), bool))[None] & valid[:, None, :])
