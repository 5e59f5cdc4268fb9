"""Mesh construction, the logical-axis rules, sharded init and global batches (8 fake CPU devices)."""

import types

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from tidar_jax.config import ConfigError, MeshConfig
from tidar_jax.model.init import abstract_model, init_sharded_model
from tidar_jax.model.transformer import create_model
from tidar_jax.sharding import (
    MESH_AXES,
    batch_sharding,
    check_batch_blocks,
    logical_to_mesh,
    make_global_batch,
    make_mesh,
    mesh_shape,
    param_shardings,
)


def test_mesh_shape_resolves_the_free_axis_and_rejects_bad_sizes():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=1), 8) == (2, 4, 1)
    assert mesh_shape(MeshConfig(data=1, fsdp=1, tensor=1), 1) == (1, 1, 1)
    with pytest.raises(ConfigError, match="do not divide the 8 available devices"):
        mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(ConfigError, match="need 4 devices but 8 are available"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)


def test_make_mesh_axes_are_auto():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    single = make_mesh(MeshConfig(data=-1), jax.devices()[:1])
    assert dict(single.shape) == {"data": 1, "fsdp": 1, "tensor": 1}


def test_logical_to_mesh_follows_rules_and_falls_back_to_replication():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    assert logical_to_mesh(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert logical_to_mesh(("heads", "head_dim", "embed"), (4, 16, 64), mesh) == P("tensor", None, "fsdp")
    # 2 KV heads cannot be split 4 ways: replicated, not an error.
    assert logical_to_mesh(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", None, None)
    # An odd embedding width cannot be split over fsdp=2.
    assert logical_to_mesh(("vocab", "embed"), (512, 63), mesh) == P("tensor", None)
    # A mesh axis is used at most once per array; unknown names and None are replicated.
    assert logical_to_mesh(("heads", "vocab"), (4, 8), mesh) == P("tensor", None)
    assert logical_to_mesh(("nonsense", None), (4, 8), mesh) == P(None, None)
    assert logical_to_mesh(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    with pytest.raises(ValueError, match="rank"):
        logical_to_mesh(("embed",), (4, 4), mesh)


def test_sharded_init_matches_unsharded_model_and_is_really_sharded(tiny_config):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, params = init_sharded_model(tiny_config.model, mesh, seed=3)
    # Reference: the plain model constructor, jitted without any sharding (eager init is slow op by op).
    reference = jax.jit(lambda: nnx.to_pure_dict(nnx.split(create_model(tiny_config.model, seed=3))[1]))()
    shardings = param_shardings(abstract_model(tiny_config.model)[1], mesh)
    got = nnx.to_pure_dict(params)
    assert jax.tree.structure(got) == jax.tree.structure(reference)
    for (path, leaf), ref, sharding in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(reference),
                                           jax.tree.leaves(shardings)):
        # The random values do not depend on the sharding (up to the last bit of the normal transform).
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), rtol=0, atol=1e-7, err_msg=str(path))
        assert leaf.sharding == sharding, path
    embed = got["embed"]  # [vocab 512 -> tensor, embed 64 -> fsdp]
    assert embed.sharding.spec == P("tensor", "fsdp")
    assert embed.addressable_shards[0].data.shape == (256, 32)
    assert got["layers"][0]["mlp"]["down_proj"].sharding.spec == P("tensor", "fsdp")
    assert got["layers"][0]["input_norm"]["scale"].sharding.spec == P("fsdp")


def test_make_global_batch_shards_the_batch_dim():
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    tokens = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
    valid = tokens % 3 != 0
    batch = make_global_batch({"tokens": tokens, "valid": valid}, mesh)
    assert batch["tokens"].sharding == batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), tokens)
    np.testing.assert_array_equal(np.asarray(batch["valid"]), valid)
    # data x fsdp = 4 batch shards of 2 rows, replicated over tensor.
    assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(2, 5)}


def fake_grid(process_of: list[int], shape: tuple[int, int, int]) -> np.ndarray:
    """A [data, fsdp, tensor] grid of stand-in devices: device i (row-major) belongs to process process_of[i]."""
    devices = [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate(process_of)]
    return np.array(devices, dtype=object).reshape(shape)


@pytest.mark.parametrize("process_of, shape", [
    ([0] * 4 + [1] * 4, (8, 1, 1)),         # data over both hosts
    ([0] * 4 + [1] * 4, (2, 1, 4)),         # data across hosts, tensor within each host
    ([0] * 4 + [1] * 4, (2, 2, 2)),
    ([0, 0, 1, 1, 2, 2, 3, 3], (1, 4, 2)),  # fsdp across four hosts
])
def test_batch_blocks_that_each_process_can_feed(process_of, shape):
    check_batch_blocks(fake_grid(process_of, shape), MESH_AXES)


@pytest.mark.parametrize("process_of, shape, message", [
    # tensor spans both hosts: the single batch shard would get two hosts' different rows.
    ([0] * 4 + [1] * 4, (1, 1, 8), r"batch shard 0 .* processes \[0, 1\]"),
    ([0, 1] * 4, (4, 1, 2), r"batch shard 0 .* processes \[0, 1\]"),
    # each host holds scattered shards (0 and 2 / 1 and 3): no contiguous block to place its rows in.
    ([0, 0, 1, 1, 0, 0, 1, 1], (4, 1, 2), r"process 0 holds batch shards \[0, 2\]"),
    # uneven blocks: process 0 would have to feed 3 of the 4 shards' rows.
    ([0] * 6 + [1] * 2, (4, 1, 2), r"process 0 holds batch shards \[0, 1, 2\].*block of 2"),
])
def test_batch_blocks_that_would_mix_data_are_refused(process_of, shape, message):
    with pytest.raises(ConfigError, match=message):
        check_batch_blocks(fake_grid(process_of, shape), MESH_AXES)


def test_real_single_process_meshes_pass_the_batch_block_check():
    for cfg in (MeshConfig(data=-1), MeshConfig(data=2, fsdp=2, tensor=2), MeshConfig(data=1, tensor=-1)):
        mesh = make_mesh(cfg)
        check_batch_blocks(mesh.devices, mesh.axis_names)
        assert {d.process_index for d in mesh.devices.flat} == {0}
