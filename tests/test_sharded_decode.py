"""Sharded decoding on simulated CPU devices: params split over `tensor` (heads, kv_heads, mlp, vocab), rows over
`data`, the KV cache over rows and KV heads; the output must equal one device's, token for token. And
`load_for_inference` without a mesh puts the params on one device (no redundant decoding on every device)."""

import jax
import numpy as np
import pytest
from markov import scaled_random_model

from tidar_jax import config as config_lib
from tidar_jax.checkpoint.inference import load_for_inference, save_inference_checkpoint
from tidar_jax.config import MeshConfig
from tidar_jax.decoding.generation import Generator
from tidar_jax.sharding import make_mesh

PROMPTS = [[3, 4, 5], [7, 3, 9, 4, 10, 5], [9, 8, 7, 6]]  # 3 rows: padded to 4, two per data shard
NEW = 6


@pytest.fixture(scope="module")
def cfg(tiny_config):
    # The tiny model: 4 heads, 2 KV heads, d_ff 128, vocab 512, so tensor=2 splits every one of them.
    return config_lib.replace(tiny_config, decode={"prompt_buckets": (8,), "max_cache_len": 24, "max_new_tokens": NEW,
                                                   "batch_buckets": (4,), "block_size": 0})


@pytest.fixture(scope="module")
def model(cfg):
    return scaled_random_model(cfg.model, seed=2)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])


def _splits(array) -> tuple[int, ...]:
    """How many ways each dim of a jax array is split across devices."""
    return tuple(n // s for n, s in zip(array.shape, array.sharding.shard_shape(array.shape)))


@pytest.mark.parametrize("mode", ["tidar", "ar"])
def test_sharded_decoding_equals_one_device(cfg, model, mesh, mode):
    one = Generator(*model, cfg.model, cfg.decode).generate(PROMPTS, mode)
    sharded_gen = Generator(*model, cfg.model, cfg.decode, mesh=mesh)
    sharded = sharded_gen.generate(PROMPTS, mode)
    assert sharded.tokens == one.tokens and [len(t) for t in one.tokens] == [NEW] * len(PROMPTS)
    assert sharded.acceptance_histogram == one.acceptance_histogram and sharded.forwards == one.forwards


def test_params_and_decode_state_are_really_sharded(cfg, model, mesh):
    gen = Generator(*model, cfg.model, cfg.decode, mesh=mesh)
    params = dict(jax.tree.leaves_with_path(gen.params))
    by_name = {jax.tree_util.keystr(path): leaf for path, leaf in params.items()}
    split = {name: _splits(leaf) for name, leaf in by_name.items()}
    # Every matrix with heads, kv_heads, mlp or vocab is split 2 ways along that dim, and lives on the 4 devices.
    assert all(leaf.sharding.device_set == set(mesh.devices.flat) for leaf in by_name.values())
    assert sum(2 in s for s in split.values()) >= 1 + 6 * cfg.model.n_layers  # embed + q/k/v/o/gate/up/down
    embed = next(v for k, v in split.items() if "embed" in k and len(v) == 2)
    assert embed == (2, 1)  # [vocab, embed]: vocab over tensor
    state, spec, sp = gen.prefill(PROMPTS, "tidar")
    state = gen.advance(state, spec, sp, max_forwards=2)
    for buffer in state.cache.keys + state.cache.values:  # [batch 4, slots, kv_heads 2, head_dim]
        assert _splits(buffer) == (2, 1, 2, 1)
    assert _splits(state.cache.cursor) == (2,) and _splits(state.tokens) == (2, 1)
    assert _splits(state.finish) == (2,) and _splits(state.max_new_tokens) == (2,)


def test_load_for_inference_without_a_mesh_uses_one_device(cfg, model, tmp_path, mesh):
    save_inference_checkpoint(tmp_path / "run", cfg, model[1])
    leaves = jax.tree.leaves(load_for_inference(tmp_path / "run").params)
    assert all(len(leaf.sharding.device_set) == 1 for leaf in leaves)
    on_mesh = jax.tree.leaves(load_for_inference(tmp_path / "run", mesh).params)
    assert all(leaf.sharding.device_set == set(mesh.devices.flat) for leaf in on_mesh)
    np.testing.assert_array_equal(np.asarray(on_mesh[0]), np.asarray(leaves[0]))
