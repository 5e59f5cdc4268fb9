"""Params-only restore for inference onto any mesh or layer layout (`load_for_inference`), and writing an
imported model as a params-only checkpoint (`save_inference_checkpoint`)."""

from __future__ import annotations

import dataclasses
import filecmp
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from tidar_jax.checkpoint.store import (
    _CONFIG,
    _RUNTIME_FIELDS,
    _STATE,
    CHECKPOINT_DIR,
    TOKENIZER_FILE,
    Checkpointer,
    CheckpointError,
    _check_finished,
    _corrupt,
    _mismatch,
    _raise_mismatch,
    _reader,
    _state_metadata,
    _steps,
    locate_checkpoint,
    read_step_config,
    verify_step,
)
from tidar_jax.config import Config, ModelConfig, to_dict
from tidar_jax.model.init import abstract_model
from tidar_jax.model.layer_stacking import is_stacked, to_layout
from tidar_jax.sharding import param_shardings

if TYPE_CHECKING:
    from tidar_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class InferenceBundle:
    """Everything generation / eval needs: `forward(graphdef, params, ...)` and the tokenizer (None if absent);
    workdir: the checkpoint's workdir (where its tokenizer and decode tuning live), None when not loaded from one."""

    config: Config
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Tokenizer | None
    step: int
    workdir: Path | None = None


def with_model(bundle: InferenceBundle, model: ModelConfig) -> InferenceBundle:
    """`bundle` running `model`, which may differ from the saved model section only in execution-only fields
    (attention_impl, compute_dtype, remat): the same params, a graphdef built for `model`. Raises CheckpointError
    for any other difference (the params would not fit)."""
    if model == bundle.config.model:
        return bundle
    changed = sorted(f"model.{k}" for k, v in to_dict(model).items() if v != to_dict(bundle.config.model)[k])
    if not set(changed) <= _RUNTIME_FIELDS:
        raise CheckpointError(f"{', '.join(changed)} cannot change for a saved model: only "
                              f"{sorted(f for f in _RUNTIME_FIELDS if f.startswith('model.'))} can")
    return dataclasses.replace(bundle, config=dataclasses.replace(bundle.config, model=model),
                               graphdef=abstract_model(model)[0])


def _pure(tree: Any) -> Any:
    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _inference_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh | None) -> Any:
    """Pure dict of target shardings: the training rules on `mesh`, else this process's first device (replicating
    over all local devices would make every one of them run the same decoding)."""
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree.map(lambda _: one, nnx.to_pure_dict(abstract_state))
    return param_shardings(abstract_state, mesh)


def _restore_target(model_cfg: Any, mesh: jax.sharding.Mesh | None) -> tuple[nnx.GraphDef, nnx.State, dict]:
    """(graphdef, abstract state, pure dict of ShapeDtypeStructs carrying the target shardings) of a model."""
    graphdef, abstract_state = abstract_model(model_cfg)
    abstract = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            nnx.to_pure_dict(abstract_state), _inference_shardings(abstract_state, mesh))
    return graphdef, abstract_state, abstract


def load_for_inference(path: str | Path, mesh: jax.sharding.Mesh | None = None,
                       scan_layers: bool | None = None) -> InferenceBundle:
    """Restores params (never the optimizer state: a partial restore reads only the `params` subtree) and config
    from a workdir (latest step), a checkpoints directory (latest step) or one step directory, placed on `mesh`
    (default: one device, this process's first), plus WORKDIR/tokenizer.json when present.

    `scan_layers` picks the layer layout of the returned params (layer_stacking.py; None: as saved): the layout on
    disk is read from the checkpoint itself, so workdirs written before `model.scan_layers` existed load into either.
    The bundle's `config.model.scan_layers` says which layout it holds.

    Raises `CheckpointError` for a missing path, no checkpoint, or unfinished / corrupt files; every file of the
    step is checked against its checksum manifest first (`verify_step`: the error names a damaged file; a step
    saved without a manifest loads with an `UnverifiedCheckpointWarning`).
    """
    root, step, workdir = locate_checkpoint(path)
    step_dir = root / str(step)
    _check_finished(step_dir, (_STATE, _CONFIG))
    verify_step(step_dir)
    config = read_step_config(root, step)
    with _reader(root, ocp.PyTreeCheckpointHandler()) as manager:
        saved = _state_metadata(manager, step, step_dir)
        saved_params = getattr(saved, "tree", saved).get("params")
        on_disk = dataclasses.replace(config.model, scan_layers=bool(saved_params) and is_stacked(saved_params))
        graphdef, abstract_state, abstract = _restore_target(on_disk, mesh)
        target = {"params": abstract}
        _raise_mismatch(_mismatch(saved, target, subtree="params"),
                        f"checkpoint {step_dir} does not match its config.model")
        restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                         partial_restore=True)
        try:
            params = manager.restore(step, args=ocp.args.Composite(**{_STATE: restore}))[_STATE]["params"]
        except Exception as e:
            raise _corrupt(step_dir, e) from e
    wanted = on_disk if scan_layers is None else dataclasses.replace(on_disk, scan_layers=scan_layers)
    if wanted != on_disk:
        graphdef, abstract_state, abstract = _restore_target(wanted, mesh)
        shardings = jax.tree.map(lambda a: a.sharding, abstract)
        params = jax.jit(lambda p: to_layout(p, wanted.scan_layers), out_shardings=shardings)(params)
    config = dataclasses.replace(config, model=wanted)
    nnx.replace_by_pure_dict(abstract_state, params)
    tokenizer = None
    if (workdir / TOKENIZER_FILE).is_file():
        from tidar_jax.data.tokenizer import Tokenizer  # imported lazily: only needed when a tokenizer was saved

        tokenizer = Tokenizer.from_file(workdir / TOKENIZER_FILE)
    return InferenceBundle(config=config, graphdef=graphdef, params=abstract_state, tokenizer=tokenizer, step=step,
                           workdir=workdir)


def save_inference_checkpoint(workdir: str | Path, config: Config, params: nnx.State | dict,
                              tokenizer_file: str | Path | None = None) -> Path:
    """Writes `params` (nnx.State or its pure dict, matching `config.model` in either layer layout: they are saved in
    `config.model.scan_layers`'s) as a params-only step-0 checkpoint, with its checksum manifest,
    that `load_for_inference(workdir)` reads, and copies `tokenizer_file` to WORKDIR/tokenizer.json.

    Refuses (CheckpointError) if WORKDIR already holds checkpoints or a different tokenizer.json. Returns WORKDIR.
    """
    workdir = Path(workdir)
    root = workdir / CHECKPOINT_DIR
    existing = _steps(root)
    if existing:
        raise CheckpointError(f"{root} already holds checkpoints (steps {existing}); refusing to write over "
                              "them, choose an empty workdir")
    pure = to_layout(_pure(params), config.model.scan_layers)
    template = nnx.to_pure_dict(abstract_model(config.model)[1])
    _raise_mismatch(_mismatch(pure, template, names=("params", "config.model")), "params do not match config.model")
    tokenizer_dest = workdir / TOKENIZER_FILE
    if tokenizer_file is not None:
        if not Path(tokenizer_file).is_file():
            raise CheckpointError(f"tokenizer file {tokenizer_file} does not exist")
        if tokenizer_dest.exists() and not filecmp.cmp(tokenizer_file, tokenizer_dest, shallow=False):
            raise CheckpointError(f"{tokenizer_dest} already exists with different contents; refusing to "
                                  "overwrite it")
    state = {"step": np.zeros((), np.int32), "params": pure}
    with Checkpointer(workdir, keep=None, async_save=False) as checkpointer:
        checkpointer.save(0, state, None, config)
    if tokenizer_file is not None and not tokenizer_dest.exists() and jax.process_index() == 0:
        shutil.copyfile(tokenizer_file, tokenizer_dest)
    return workdir
