"""Hand-written CPU kernels as XLA FFI custom calls, built on first use with the machine's C++ compiler.

XLA:CPU runs a decode step's attention as a handful of small ops per layer: it transposes or copies each layer's
K/V cache for its dot kernels and dispatches small dots with more overhead than work. `cached_attention` here
(source: `cpu/cached_attention.cc`) reads each cache row once, in place, in one call per layer, splitting the work
over XLA's intra-op thread pool. It computes the function of ops/attention.py's plain-XLA path, which stays the
reference its tests compare it against (tests/test_cpu_kernels.py).

Building: the first call in a process compiles the source with `$CXX` (default `g++`, `-O3 -march=native`) against
JAX's FFI headers into `<cache root>/kernels/` (`caches.root()`, i.e. `$TIDAR_JAX_CACHE_DIR`), keyed on the source,
the flags, the jaxlib version and this CPU's feature flags, so a later process only loads it. With no cache root
the library is built in a temporary directory each process. If there is no compiler or the build fails, `available()`
is False after one warning, and ops/attention.py keeps its plain-XLA formulations.

`TIDAR_JAX_CPU_KERNELS=off` turns the kernels off (for A/B timing or to rule them out while debugging).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from tidar_jax import caches

ENV = "TIDAR_JAX_CPU_KERNELS"
SOURCE = Path(__file__).parent / "cpu" / "cached_attention.cc"
TARGET = "tidar_cached_attention"
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC",
         "-Wno-attributes", "-Wno-return-type")


def enabled() -> bool:
    """False when `$TIDAR_JAX_CPU_KERNELS` is "off" (or "0" / "false")."""
    return os.environ.get(ENV, "on").strip().lower() not in ("off", "0", "false")


def _cpu_signature() -> str:
    """This CPU's model and feature flags (a `-march=native` build is only valid where they match)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "g++"))


def _build(out_dir: Path) -> Path:
    """Compiles SOURCE into out_dir (atomically: other processes may build the same file at once); returns it."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_compiler() + list(FLAGS)).encode(),
                                     jaxlib.__version__.encode(), _cpu_signature().encode()])).hexdigest()[:16]
    library = out_dir / f"cached_attention-{key}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    command = [*_compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", partial]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return library


@functools.cache
def _registered() -> bool:
    """Builds (or finds) the library and registers its FFI target, once per process. False, after a warning,
    when that fails."""
    root = caches.root()
    try:
        if root is None:
            library = _build(Path(tempfile.mkdtemp(prefix="tidar_jax_kernels_")))
        else:
            library = _build(root / "kernels")
        handler = ctypes.cdll.LoadLibrary(str(library)).TidarCachedAttention
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"tidar_jax CPU kernels unavailable, using plain XLA attention ({error}); set {ENV}=off to "
                      "skip building them", RuntimeWarning, stacklevel=3)
        return False
    return True


def available() -> bool:
    """True when the CPU kernels are enabled, the default backend is the CPU and the library is built and loaded."""
    return enabled() and jax.default_backend() == "cpu" and _registered()


def supports(head_dim: int, *dtypes) -> bool:
    """Whether `cached_attention` takes operands of this head_dim and these dtypes (one of DTYPES, all alike)."""
    kinds = {jnp.dtype(d) for d in dtypes}
    return len(kinds) == 1 and kinds.pop() in DTYPES and head_dim in HEAD_DIMS


def decodes_with_kernel(head_dim: int, compute_dtype) -> bool:
    """Whether a model of this head_dim and compute dtype attends over its KV cache with the kernel here."""
    return supports(head_dim, compute_dtype) and available()


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     mask: jax.Array, scale: float) -> jax.Array:
    """The FFI call (see cpu/cached_attention.cc): q [b, t, h, d]; k, v [b, t, kv, d]; cache_k, cache_v
    [b, S, kv, d]; mask [b or 1, t, S + t] bool; all arrays of one dtype in DTYPES (`supports`). Returns
    [b, t, h, d] in q's dtype, equal to ops/attention.py's `_attention` up to float reassociation. Needs
    `available()`. Not differentiable by itself (ops/attention.py gives it the plain-XLA VJP)."""
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, k, v, cache_k, cache_v, mask, scale=np.float32(scale))
