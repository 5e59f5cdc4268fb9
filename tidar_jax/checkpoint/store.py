"""The run's checkpoint directory: the Orbax `Checkpointer` (async save, keep-latest-N, resume), damage detection,
the saved config and the step that a path names. The layout and guarantees are in the package docstring."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from tidar_jax.checkpoint.manifest import ManifestError, verify_manifest, write_manifest
from tidar_jax.config import Config, ModelConfig, config_from_dict, to_dict
from tidar_jax.model.transformer import resolved_config

CHECKPOINT_DIR = "checkpoints"
TOKENIZER_FILE = "tokenizer.json"
_STATE, _DATA, _CONFIG = "state", "data", "config"
_RUNTIME = "runtime"  # key of the saved config JSON that holds `runtime_record`, not a Config section
_UNFINISHED = ".orbax-checkpoint-tmp"
_STEP_METADATA = "_CHECKPOINT_METADATA"
# Fields that change how a run executes, not what it computes: a resumed run may change them freely.
# model.scan_layers is not one of them although the function is the same: it changes the layout of the whole saved
# train state (params and the optimizer's moments), which a resume restores as saved, and a compiled scan need not
# round like the unrolled layers, so a resumed run could not promise to continue bit-exactly. Switch layouts with a
# new run from train.init_from=OLD_WORKDIR (params converted on load, optimizer state fresh); eval / generate load
# either layout (load_for_inference converts).
_RUNTIME_FIELDS = frozenset({"model.remat", "model.remat_policy", "model.attention_impl", "model.compute_dtype",
                             "data.worker_count"})


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unfinished, corrupt, or does not match what the caller asked for."""


def _handlers(state_handler: ocp.CheckpointHandler) -> dict[str, ocp.CheckpointHandler]:
    return {_STATE: state_handler, _DATA: ocp.JsonCheckpointHandler(), _CONFIG: ocp.JsonCheckpointHandler()}


def _reader(root: Path, state_handler: ocp.CheckpointHandler | None = None) -> ocp.CheckpointManager:
    """A manager that only reads `root` (creates nothing, cleans nothing up, so a live writer is undisturbed)."""
    options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    return ocp.CheckpointManager(root, options=options,
                                 item_handlers=_handlers(state_handler or ocp.StandardCheckpointHandler()))


def _steps(root: Path) -> list[int]:
    """Finished steps under `root` (unfinished `*.orbax-checkpoint-tmp` directories are not steps)."""
    if not root.is_dir():
        return []
    with _reader(root) as manager:
        return sorted(manager.all_steps())


def saved_steps(workdir: str | Path) -> list[int]:
    """The finished steps of WORKDIR/checkpoints, ascending (empty when there are none)."""
    return _steps(Path(workdir).absolute() / CHECKPOINT_DIR)


def _keystr(path: tuple) -> str:
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def _shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
    """Flattened `path -> shape` (None for scalars without a shape) of an array, abstract or metadata tree."""
    flat, _ = jax.tree_util.tree_flatten_with_path(getattr(tree, "tree", tree))  # Orbax TreeMetadata -> dict
    return {_keystr(path): (tuple(leaf.shape) if getattr(leaf, "shape", None) is not None else None)
            for path, leaf in flat}


def _mismatch(have: Any, want: Any, names: tuple[str, str] = ("checkpoint", "target"),
              subtree: str | None = None) -> list[str]:
    """Differences in leaves and shapes between tree `have` and tree `want` (arrays, abstract or Orbax metadata),
    worded with `names` = (what `have` is, what `want` is). With `subtree`, only that part of `have` must match."""
    have_shapes, want_shapes = _shapes(have), _shapes(want)
    if subtree is not None:
        have_shapes = {k: v for k, v in have_shapes.items() if k == subtree or k.startswith(subtree + "/")}
    h, w = names
    problems = [f"{k} missing from {h}" for k in want_shapes if k not in have_shapes]
    problems += [f"{k} in {h} but not in {w}" for k in have_shapes if k not in want_shapes]
    problems += [f"{k}: {h} shape {have_shapes[k]}, {w} shape {want_shapes[k]}" for k in want_shapes
                 if k in have_shapes and None not in (have_shapes[k], want_shapes[k])
                 and have_shapes[k] != want_shapes[k]]
    return problems


def _raise_mismatch(problems: list[str], what: str) -> None:
    if problems:
        shown = "; ".join(problems[:8]) + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else "")
        raise CheckpointError(f"{what}: {shown}")


def _check_finished(step_dir: Path, items: tuple[str, ...]) -> None:
    missing = [item for item in items if not (step_dir / item).is_dir()]
    if missing:
        raise _damaged(step_dir, f"checkpoint {step_dir} is incomplete: item(s) {missing} are missing")


_PROBING = False


def _is_intact(step_dir: Path) -> bool:
    """Whether `step_dir` holds a state and a config that can be read (metadata only, no array data)."""
    global _PROBING
    _PROBING = True  # errors raised while probing need no recovery hint of their own
    try:
        _check_finished(step_dir, (_STATE, _CONFIG))
        read_step_config(step_dir.parent, int(step_dir.name))
        with _reader(step_dir.parent, ocp.PyTreeCheckpointHandler()) as manager:
            _state_metadata(manager, int(step_dir.name), step_dir)
    except Exception:
        return False
    finally:
        _PROBING = False
    return True


def _recovery_hint(step_dir: Path) -> str:
    """How to go on without the damaged `step_dir`: the newest earlier step that reads, and the --step flag."""
    root, step = step_dir.parent, int(step_dir.name)
    intact = next((s for s in reversed(_steps(root)) if s < step and _is_intact(root / str(s))), None)
    if intact is None:
        return "no earlier intact step is saved"
    return (f"the newest intact step is {intact}: load it with --step {intact} (infer.*), or move {step_dir} out of "
            f"{root} and resume training with --step {intact}; nothing is deleted")


def _damaged(step_dir: Path, message: str) -> CheckpointError:
    """CheckpointError `message` about the unreadable `step_dir`, plus how to go on from an earlier step."""
    hint = _recovery_hint(step_dir) if step_dir.name.isdigit() and not _PROBING else ""
    return CheckpointError(message + (f"; {hint}" if hint else ""))


def _corrupt(step_dir: Path, error: Exception | str) -> CheckpointError:
    if isinstance(error, Exception):  # its first line, without TensorStore's pointer to a repr of its spec
        first = str(error).splitlines()[0].split(" See full TensorStore details")[0] if str(error) else ""
        error = f"{type(error).__name__}: {first}"
    return _damaged(step_dir, f"checkpoint {step_dir} is corrupt or partially written and cannot be read ({error})")


@contextlib.contextmanager
def _quiet_storage_warnings():
    """Orbax's warnings (logger "absl") are errors to hide while reading: the caller raises its own message."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def verify_step(step_dir: Path) -> None:
    """Checks the step's files against its checksum manifest (manifest.py) before anything is restored: a
    CheckpointError naming the damaged file (and the newest intact step) if one differs; a warning if the step has
    no manifest."""
    try:
        verify_manifest(step_dir)
    except ManifestError as e:
        raise _damaged(step_dir, f"checkpoint {step_dir} is corrupt: {e}") from None


def _state_metadata(manager: ocp.CheckpointManager, step: int, step_dir: Path) -> Any:
    """The saved state's metadata tree (shapes and dtypes, no array data)."""
    try:
        with _quiet_storage_warnings():  # a damaged item is reported below, in one line, not as Orbax warnings
            saved = manager.item_metadata(step)[_STATE]
    except Exception as e:  # any failure to read metadata means the files are damaged
        raise _corrupt(step_dir, e) from e
    if saved is None or not _shapes(saved):
        raise _corrupt(step_dir, f"no readable array metadata in {step_dir / _STATE}")
    return saved


class Checkpointer:
    """Saves and restores a run's train state, data-iterator state and config under WORKDIR/checkpoints.

    `keep` = how many latest steps to keep (None keeps all). With `async_save` the device-to-host copy happens in
    `save` and the write continues in the background; `wait()` blocks until it is on disk. All processes of a
    multi-host job call every method (Orbax coordinates them).

    Each saved step gets its checksum manifest (manifest.py) once its files are final: at the next `save`, `wait`
    or `close` (Orbax's `save` waits for the previous one anyway), written by process 0 alone; `restore` checks it.
    A process killed between the end of an async save and that point leaves the step without a manifest, which
    still restores, with a warning.
    """

    def __init__(self, workdir: str | Path, keep: int | None = 3, async_save: bool = True):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=_handlers(ocp.StandardCheckpointHandler()))
        self._unrecorded: list[int] = []  # steps this Checkpointer saved that have no manifest yet

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, train_state: Any, data_state: dict | None, config: Config, force: bool = False,
             runtime: dict | None = None) -> bool:
        """Starts saving `step`; returns False (saving nothing) when `step` is below the latest saved step unless
        `force`. Raises `CheckpointError` if `step` already exists: checkpoints are never overwritten.

        train_state: pytree of arrays, e.g. {"step": int32 [], "params": pure dict, "opt_state": optax state};
        data_state: JSON-serialisable dict (grain `get_state()`) or None; runtime: `runtime_record` of the process
        that ran the steps (stored beside the config, read back by `read_runtime`), or None.
        """
        step = int(step)
        self.wait()  # the previous step's files are final: record its manifest
        if step in self._manager.all_steps():
            raise CheckpointError(f"step {step} is already saved in {self.directory}; checkpoints are never "
                                  "overwritten")
        saved_config = to_dict(config) if runtime is None else {**to_dict(config), _RUNTIME: dict(runtime)}
        items = {_STATE: ocp.args.StandardSave(train_state), _CONFIG: ocp.args.JsonSave(saved_config)}
        if data_state is not None:
            try:
                json.dumps(data_state)
            except TypeError as e:
                raise CheckpointError(f"data_state must be JSON-serialisable: {e}") from None
            items[_DATA] = ocp.args.JsonSave(data_state)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._unrecorded.append(step)
        return saved

    def restore(self, abstract_train_state: Any, step: int | None = None) -> tuple[Any, dict | None, Config]:
        """Restores (train_state, data_state or None, config) of `step` (default: the latest).

        abstract_train_state: the train state's pytree with `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`
        leaves; arrays come back with those shardings, whatever mesh wrote them.
        """
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint to restore in {self.directory}")
        step = steps[-1] if step is None else int(step)
        if step not in steps:
            raise CheckpointError(f"step {step} is not saved in {self.directory}; saved steps: {steps}")
        step_dir = self.directory / str(step)
        _check_finished(step_dir, (_STATE, _CONFIG))
        verify_step(step_dir)
        saved = _state_metadata(self._manager, step, step_dir)
        _raise_mismatch(_mismatch(saved, abstract_train_state),
                        f"checkpoint {step_dir} does not match the restore target")
        args = {_STATE: ocp.args.StandardRestore(abstract_train_state), _CONFIG: ocp.args.JsonRestore()}
        has_data = (step_dir / _DATA).is_dir()
        if has_data:
            args[_DATA] = ocp.args.JsonRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise _corrupt(step_dir, e) from e
        return restored[_STATE], restored[_DATA] if has_data else None, _saved_config(restored[_CONFIG])

    def wait(self) -> None:
        """Blocks until every started save is complete on disk, with its checksum manifest."""
        self._manager.wait_until_finished()
        steps, self._unrecorded = self._unrecorded, []
        if jax.process_index() == 0:
            for step in steps:
                if (self.directory / str(step)).is_dir():  # keep-latest-N may have deleted it already
                    write_manifest(self.directory / str(step))

    def close(self) -> None:
        """Waits for pending saves (recording their manifests) and releases Orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def runtime_record(model: ModelConfig) -> dict[str, str]:
    """What this process runs `model` with: {"backend": jax.default_backend(), "attention_impl": the concrete
    implementation (model.attention_impl=auto resolved, as model.Transformer resolves it)}."""
    return {"backend": jax.default_backend(), "attention_impl": resolved_config(model).attention_impl}


def _saved_config(data: dict) -> Config:
    return config_from_dict({k: v for k, v in data.items() if k != _RUNTIME})


def _read_config_json(root: Path, step: int) -> dict:
    step_dir = root / str(step)
    _check_finished(step_dir, (_CONFIG,))
    try:
        with _reader(root) as manager:
            return manager.restore(step, args=ocp.args.Composite(**{_CONFIG: ocp.args.JsonRestore()}))[_CONFIG]
    except Exception as e:
        raise _corrupt(step_dir, e) from e


def read_step_config(root: Path, step: int) -> Config:
    """The config saved with `step` under the checkpoints directory `root`."""
    return _saved_config(_read_config_json(root, step))


def read_runtime(path: str | Path) -> dict | None:
    """The `runtime_record` saved with a checkpoint (a workdir, checkpoints directory or step directory, as
    `locate_checkpoint` reads them): the backend and concrete attention implementation its training steps ran
    with; None for a checkpoint saved without one (e.g. `save_inference_checkpoint`)."""
    root, step, _ = locate_checkpoint(path)
    return _read_config_json(root, step).get(_RUNTIME)


def read_checkpoint_config(workdir: str | Path, step: int | None = None) -> Config | None:
    """The config stored with WORKDIR's checkpoint `step` (default: the latest), or None when WORKDIR has none (how
    `--workdir` alone resumes a run). Raises CheckpointError when `step` is given but not saved."""
    root = Path(workdir) / CHECKPOINT_DIR
    steps = _steps(root)
    if step is not None and step not in steps:
        raise CheckpointError(f"--step {step} is not saved in {root}; saved steps: {steps}")
    return read_step_config(root, steps[-1] if step is None else step) if steps else None


def step_path(path: str | Path, step: int | None) -> Path:
    """`path` (a workdir or checkpoints directory) narrowed to its step directory `step` (--step N); `path` itself
    when `step` is None. Raises CheckpointError when that step is not saved."""
    if step is None:
        return Path(path)
    root = locate_checkpoint(path)[0]
    steps = _steps(root)
    if step not in steps:
        raise CheckpointError(f"--step {step} is not saved in {root}; saved steps: {steps}")
    return root / str(step)


def run_fields(cfg: Config) -> dict[str, Any]:
    """The fields that define what a run computes, as `section.field -> value`: the model and data sections, the
    training objective and the adaptation mode (execution-only fields such as model.remat are left out)."""
    flat = {f"{section}.{k}": v for section in ("model", "data") for k, v in to_dict(getattr(cfg, section)).items()}
    flat["train.objective"] = cfg.train.objective
    flat["train.adaptation"] = cfg.train.adaptation
    return {k: v for k, v in flat.items() if k not in _RUNTIME_FIELDS}


def locate_checkpoint(path: str | Path) -> tuple[Path, int, Path]:
    """Resolves a workdir, a checkpoints directory or one step directory to (checkpoints root, step, workdir).

    Paths are made absolute first: Orbax refuses relative ones.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    if path.name.isdigit() and any((path / name).exists() for name in (_STATE, _CONFIG, _STEP_METADATA)):
        root, step = path.parent, int(path.name)
    else:
        root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        steps = _steps(root)
        if not steps:
            unfinished = sorted(p.name for p in root.glob(f"*{_UNFINISHED}*"))
            hint = f" (only unfinished saves: {unfinished})" if unfinished else ""
            raise CheckpointError(f"no checkpoint found in {path}{hint}; expected WORKDIR/{CHECKPOINT_DIR}/<step>/")
        step = steps[-1]
    workdir = root.parent if root.name == CHECKPOINT_DIR else root
    return root, step, workdir
