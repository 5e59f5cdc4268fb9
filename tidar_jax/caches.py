"""Where the tools cache on disk, and the command-line tools' persistent XLA compilation cache.

The root is `$TIDAR_JAX_CACHE_DIR` (default ~/.cache/tidar_jax; "off" disables every cache below it): token arrays
(data/pipeline.py) lie there, compiled programs in its `xla` folder.

Every CLI run is a new process, so without it each one compiles its programs again: on a 2-core CPU a 30-layer
unrolled decode loop (prefill + loop) takes 16-20 s, a 28-layer train step 13-72 s. With the cache a repeated run of
the same program shapes loads the executables from disk. JAX keys each entry on the program, the compile options,
the backend and the jax / jaxlib versions, so an entry is only reused where it is valid.

Compiled programs go to `$TIDAR_JAX_COMPILE_CACHE`, else `root()/xla`; "off" (for either variable) disables it.
A cache directory the user gave JAX itself (`JAX_COMPILATION_CACHE_DIR` or `jax.config`) is left as it is.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax

ENV = "TIDAR_JAX_COMPILE_CACHE"
# Programs that compile faster than this are not written (JAX's own default threshold).
MIN_COMPILE_SECONDS = 1.0
# The cache's size limit: JAX evicts the least recently used entries beyond it.
MAX_BYTES = 4 << 30


def root() -> Path | None:
    """`$TIDAR_JAX_CACHE_DIR` (default ~/.cache/tidar_jax); None when it is "off" or empty."""
    value = os.environ.get("TIDAR_JAX_CACHE_DIR", "~/.cache/tidar_jax")
    return None if value in ("", "off") else Path(value).expanduser()


def compile_cache_dir() -> Path | None:
    """The directory the tools cache compiled programs in (see the module docstring); None when disabled."""
    value = os.environ.get(ENV)
    if value is None:
        return None if root() is None else root() / "xla"
    return None if value in ("", "off") else Path(value).expanduser()


def enable_compile_cache() -> Path | None:
    """Turns the persistent cache on for this process (call before the first compilation). Returns the directory
    in use, or None when disabled; a directory already configured in JAX wins and is returned."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    path = compile_cache_dir()
    if path is None:
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path


def write_json_atomic(path: Path, data) -> None:
    """Writes `data` as JSON to `path` (parent folders created) through a temporary file in the same folder and
    `os.replace`, so a concurrent reader or an interrupted write never sees half a file. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".json", prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
