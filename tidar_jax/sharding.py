"""Device mesh, the logical-axis rules table, and shardings for params and batches.

The mesh has three `AxisType.Auto` axes `(data, fsdp, tensor)`. Parameters carry logical axis names in their
`out_sharding` metadata (see model/layers.py); `LOGICAL_AXIS_RULES` is the one place that maps those names (and `batch`) to
mesh axes. A dimension that the mesh axes do not divide is replicated instead of failing, so a tiny model still runs
on a large mesh (e.g. 2 KV heads on tensor=4).

Params are created already sharded: `init_sharded_model` traces the constructor under `jax.jit` with
`out_shardings`, so no device ever holds the full unsharded model.

Decoding arrays get their shardings from the same rules (`decode_shardings`): a KV-cache buffer
`[batch, max_len, kv_heads, head_dim]` is split over batch and kv_heads, per-row loop state over batch, the draft
distributions `[batch, K-1, vocab]` also over vocab; so on a (data, tensor) mesh each device holds its rows' cache
for its KV heads, and no device repeats another's work.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tidar_jax.config import ConfigError, MeshConfig, ModelConfig, validate_backend

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated). The only rules table in the project.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),  # the stacked-layers axis (model.scan_layers): every device holds every layer's shard
)
BATCH_AXES = dict(LOGICAL_AXIS_RULES)["batch"]
# Logical names of the decoding arrays, mapped to mesh axes by the rules above. A KV-cache buffer (one per layer):
KV_CACHE_AXES = ("batch", None, "kv_heads", "head_dim")
# The KVCache fields that hold such buffers (a tuple per layer, or one stacked array).
CACHE_BUFFER_FIELDS = ("keys", "values")
# Loop-state fields (decode.DecodeState, spec_decode.SpecState) by name; fields not named here (counters, the
# acceptance histogram, the PRNG key, sampling knobs) are replicated.
DECODE_STATE_AXES: dict[str, tuple[str | None, ...]] = {
    "cursor": ("batch",), "drafts": ("batch", None), "draft_probs": ("batch", None, "vocab"),
    "tokens": ("batch", None), "num_tokens": ("batch",), "max_new_tokens": ("batch",), "finish": ("batch",),
    "row_forwards": ("batch",), "last": ("batch",),
}


def mesh_shape(mesh_cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves `-1` (= all remaining devices) and checks that the sizes multiply to `num_devices`."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    named = dict(zip(MESH_AXES, sizes))
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh sizes {named}: the fixed axes ({fixed} devices) do not divide the "
                              f"{num_devices} available devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"mesh sizes {named} need {fixed} devices but {num_devices} are available "
                          f"(set one axis to -1 to use the rest)")
    return tuple(sizes)


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp, tensor)` mesh with `AxisType.Auto` axes over `devices` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def _axis_size(mesh: Mesh, axes: str | tuple[str, ...] | None) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in names)


def logical_to_mesh(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> P:
    """Maps logical axis names (one per dim of `shape`) to a mesh `PartitionSpec`.

    A dim falls back to replication when its mesh axes do not divide it, when a mesh axis was already used by an
    earlier dim of the same array, or when the name has no rule (unknown names are replicated, never an error).
    """
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match array rank {len(shape)} (shape {tuple(shape)})")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape):
        axes = table.get(name) if name is not None else None
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if not names or used.intersection(names) or dim % _axis_size(mesh, axes):
            spec.append(None)
            continue
        used.update(names)
        spec.append(axes)
    return P(*spec)


def param_shardings(abstract_params: nnx.State, mesh: Mesh) -> dict:
    """abstract_params: an `nnx.State` whose variables carry `out_sharding` logical names (from `nnx.eval_shape`
    + `nnx.split`, or real arrays). Returns a pure dict (the structure of `nnx.to_pure_dict(abstract_params)`)
    of `NamedSharding`.
    """
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    shapes = nnx.to_pure_dict(abstract_params)

    def one(spec, leaf):
        logical = tuple(spec) if isinstance(spec, P) and len(spec) else (None,) * len(leaf.shape)
        return NamedSharding(mesh, logical_to_mesh(logical, leaf.shape, mesh))

    return jax.tree.map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def named_sharding(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """`NamedSharding` of an array of `shape` whose dims have these logical names (`logical_to_mesh`)."""
    return NamedSharding(mesh, logical_to_mesh(logical, shape, mesh))


def place_params(params: nnx.State, mesh: Mesh) -> nnx.State:
    """A copy of `params` (variables carrying logical names) placed in their rule shardings on `mesh` (no copy of
    a leaf that is already placed so)."""
    pure = jax.device_put(nnx.to_pure_dict(params), param_shardings(params, mesh))
    placed = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(placed, pure)
    return placed


def decode_shardings(tree: Any, mesh: Mesh) -> Any:
    """Shardings (same structure) for a decoding pytree of arrays: a KVCache (buffers by `KV_CACHE_AXES`), a loop
    state dataclass (fields by `DECODE_STATE_AXES`, nested dataclasses and caches recursed into), or a bare array
    (replicated). A name whose rank does not match the array is replicated too."""
    def leaf(name: str | None, x: Any) -> Any:
        if x is None:
            return None
        if name in CACHE_BUFFER_FIELDS:
            # Per-layer buffers, or stacked ones (model.scan_layers) whose leading layer axis is replicated.
            return jax.tree.map(
                lambda b: named_sharding((None,) * (b.ndim - len(KV_CACHE_AXES)) + KV_CACHE_AXES, b.shape, mesh), x)
        if dataclasses.is_dataclass(x):
            return x.replace(**{f.name: leaf(f.name, getattr(x, f.name)) for f in dataclasses.fields(x)})
        logical = DECODE_STATE_AXES.get(name, ())
        return named_sharding(logical if len(logical) == x.ndim else (None,) * x.ndim, x.shape, mesh)

    return leaf(None, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a `[batch, ...]` array: the batch dim split over the `batch` rule's mesh axes (data x fsdp)."""
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dim is split; global (micro)batch sizes must be multiples of it."""
    return _axis_size(mesh, BATCH_AXES)


def check_batch_blocks(devices: np.ndarray, axis_names: Sequence[str]) -> None:
    """Checks that every process holds one contiguous block of the batch dim, disjoint from the other processes'
    blocks and of the same size, as `make_global_batch` needs: each process feeds its own rows, so a batch shard
    whose devices span two processes would get two processes' different rows for the same global rows (and a
    process holding scattered shards cannot place its rows as one block).

    devices: the mesh's device grid (anything with a `process_index`), one array dim per name of `axis_names`.
    The batch dim is split over BATCH_AXES in that order (row-major), like `batch_sharding`. Raises ConfigError.
    """
    grid = np.asarray(devices)
    batch_dims = [list(axis_names).index(a) for a in BATCH_AXES]
    others = [i for i in range(grid.ndim) if i not in batch_dims]
    shards = np.transpose(grid, batch_dims + others).reshape(math.prod(grid.shape[i] for i in batch_dims), -1)
    owners = [sorted({d.process_index for d in row}) for row in shards]
    processes = sorted({p for o in owners for p in o})
    if len(processes) == 1:
        return
    axes = " x ".join(BATCH_AXES)
    for i, o in enumerate(owners):
        if len(o) > 1:
            raise ConfigError(f"batch shard {i} of the mesh's {axes} axes lies on devices of processes {o}: each "
                              "process feeds different rows, so they would disagree on the same global rows; give "
                              "the axes that span processes to data / fsdp (e.g. mesh.tensor within one host)")
    per_process = len(shards) // len(processes)
    for p in processes:
        mine = [i for i, o in enumerate(owners) if o == [p]]
        if len(mine) != per_process or mine != list(range(mine[0], mine[0] + len(mine))):
            raise ConfigError(f"process {p} holds batch shards {mine} of the mesh's {axes} axes; every process must "
                              f"hold one contiguous block of {per_process} (order the mesh devices by process)")


@functools.lru_cache(maxsize=16)
def _checked_batch_blocks(mesh: Mesh) -> None:
    check_batch_blocks(mesh.devices, mesh.axis_names)


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles this process's `[local_batch, ...]` arrays into global `[global_batch, ...]` jax arrays sharded
    along the batch dim (global batch = concatenation of the processes' local batches, each process's rows landing
    on its own devices' block; `check_batch_blocks` refuses a mesh where that block is not contiguous).
    """
    _checked_batch_blocks(mesh)
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def check_runtime(model_cfg: ModelConfig, tensor: int) -> None:
    """`config.validate_backend` for this process's backend, a mesh tensor axis of size `tensor` and the first
    device's CUDA compute capability (call it where the model is about to be compiled)."""
    backend = jax.default_backend()
    capability = getattr(jax.devices()[0], "compute_capability", None) if backend == "gpu" else None
    cuda = isinstance(capability, str) and capability.replace(".", "").isdigit()  # ROCm names gfx targets instead
    validate_backend(model_cfg, backend, tensor, capability if cuda else None)
