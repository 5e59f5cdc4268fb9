"""Checksums of a saved checkpoint step: recorded once its files are final, checked before every restore.

Orbax and TensorStore keep no checksum of the array data, so a flipped bit on disk or a partial copy restores
silently wrong weights. `write_manifest(STEP_DIR)` records the size and SHA-256 of every file under the step's item
directories (state/, config/, data/) in STEP_DIR/checksums.json; `verify_manifest(STEP_DIR)` recomputes them and
raises `ManifestError` naming the first file that is missing, has another size or another digest. Files at the top
of STEP_DIR (Orbax's _CHECKPOINT_METADATA and commit marker) are left out: Orbax may rewrite them, and no data is
read from them. SHA-256 because it is the faster of hashlib's two candidates on CPUs with SHA extensions (x86 since
2017, ARMv8): 1.0-1.3 GB/s against blake2b's 0.6 GB/s on one core of the shared 2-core development machine, where
recording or checking the SmolLM2-135M import (538 MB of float32 params, 349 MB on disk) takes 0.3-0.45 s, against
~2.7 s for the load itself. Hashing on several threads gained nothing measurable there (one file holds 73% of the
bytes), so files are hashed one after another.

A step without a manifest (saved before manifests existed, or by a run killed between the end of an async save and
the next synchronisation point that records it, see store.Checkpointer) still loads: `verify_manifest` warns with
`UnverifiedCheckpointWarning` and returns False.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

MANIFEST_NAME = "checksums.json"
ALGORITHM = "sha256"


class ManifestError(Exception):
    """A step's files do not match its checksum manifest (or the manifest itself is unreadable)."""


class UnverifiedCheckpointWarning(UserWarning):
    """A step is loaded without a checksum manifest, so its data is not verified."""


def data_files(step_dir: Path) -> list[str]:
    """The files the manifest covers: every file under STEP_DIR's subdirectories, as sorted POSIX paths relative
    to STEP_DIR."""
    return sorted(path.relative_to(step_dir).as_posix() for item in step_dir.iterdir() if item.is_dir()
                  for path in item.rglob("*") if path.is_file())


def _digest(path: Path, algorithm: str) -> str:
    """The hex digest of the file at `path` (OSError if it cannot be read)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def write_manifest(step_dir: str | Path) -> Path:
    """Records the size and digest of each of `data_files(STEP_DIR)` in STEP_DIR/checksums.json, written to a
    temporary name and renamed, so a reader sees either no manifest or a whole one. Call it only once the step's
    files are final (after Orbax finished the save). Returns the manifest's path."""
    step_dir = Path(step_dir)
    files = {name: [(step_dir / name).stat().st_size, _digest(step_dir / name, ALGORITHM)]
             for name in data_files(step_dir)}
    path = step_dir / MANIFEST_NAME
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump({"algorithm": ALGORITHM, "files": files}, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    return path


def _read(path: Path) -> tuple[str, dict[str, tuple[int, str]]]:
    """(algorithm, {name: (size, hex digest)}) of a manifest; ManifestError if it is not one."""
    try:
        manifest = json.loads(path.read_text())
        algorithm, files = manifest["algorithm"], manifest["files"]
        hashlib.new(algorithm)
        return algorithm, {str(name): (int(size), str(digest)) for name, (size, digest) in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"its checksum manifest {path.name} is unreadable ({type(e).__name__}: {e})") from None


def verify_manifest(step_dir: str | Path) -> bool:
    """Checks every file recorded in STEP_DIR's manifest: present, of the recorded size, of the recorded digest
    (sizes first: a missing or truncated file is reported without hashing). Returns True when all match; False,
    with an `UnverifiedCheckpointWarning`, when STEP_DIR has no manifest. Raises ManifestError naming the first
    damaged file (STEP_DIR-relative) or an unreadable manifest."""
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST_NAME
    if not path.exists():
        warnings.warn(f"{step_dir} has no checksum manifest ({MANIFEST_NAME}; saved by an older version, or its run "
                      "stopped before recording one): loading it unverified", UnverifiedCheckpointWarning,
                      stacklevel=2)
        return False
    algorithm, files = _read(path)
    for name, (size, _) in files.items():
        try:
            actual = (step_dir / name).stat().st_size
        except FileNotFoundError:
            raise ManifestError(f"{name} is missing") from None
        if actual != size:
            raise ManifestError(f"{name} has {actual} bytes, {size} when it was saved")
    for name, (_, digest) in files.items():
        try:
            actual = _digest(step_dir / name, algorithm)
        except OSError as e:
            raise ManifestError(f"{name} cannot be read ({e.strerror})") from None
        if actual != digest:
            raise ManifestError(f"{name} does not match the {algorithm} checksum recorded when it was saved")
    return True
