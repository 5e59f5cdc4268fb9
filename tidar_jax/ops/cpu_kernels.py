"""Hand-written CPU kernels as XLA FFI custom calls, built on first use with the machine's C++ compiler.

A decode step at batch 1 is bound by reading memory, and XLA:CPU reads it slower than the machine can: its
matrix-vector kernels stream small weight matrices at 15-21 GB/s where a plain read reaches 27 (2-core AMD EPYC),
and it runs attention over the KV cache as a handful of small ops per layer that transpose or copy the cache. Two
kernels (sources in `cpu/`) replace those; two more run the few-row products of a TiDAR step, which XLA runs
at about half the FMA peak, and a tied LM head's transposed product, which XLA reads at half the bandwidth:

- `cached_attention` (`cpu/cached_attention.cc`): the current block's queries over the KV cache and the block
  itself, each cache row read once in place, slots no row may see skipped; one call per layer.
- `gemv` (`cpu/gemv.cc`): out = x [M, K] @ w [K, N] for M <= GEMV_MAX_ROWS, one sequential stream per thread over
  contiguous weight rows; what `precision.matmul` runs for the projections of such steps (AR at batch 1).
- `gemm` (`cpu/gemm.cc`): the same product for up to GEMM_MAX_ROWS rows (a TiDAR step, batched decoding), register-
  blocked over column panels, bfloat16 through AVX-512 BF16 where the CPU has it; what `precision.matmul` runs there.
- `matmul_nt` (`cpu/matmul_nt.cc`): out = x [M, D] @ w.T for w [V, D] and M <= MATMUL_NT_MAX_ROWS, each thread
  streaming whole rows of w; what `precision.matmul` runs for a tied LM head on a decode step's rows.

All split their work over XLA's intra-op thread pool and compute the function of the plain-XLA op they replace,
which stays the reference their tests compare against (tests/test_cpu_kernels.py); their gradients are plain XLA's.

Building: the first use in a process compiles the sources with `$CXX` (default `g++`, `-O3 -march=native`) against
JAX's FFI headers into `<cache root>/kernels/` (`caches.root()`, i.e. `$TIDAR_JAX_CACHE_DIR`), keyed on the sources,
the flags, the jaxlib version and this CPU's feature flags, so a later process only loads the library. With no
cache root it is built in a temporary directory each process. If there is no compiler or the build fails,
`available()` is False after one warning and every caller keeps plain XLA.

Which shapes run on a kernel: `$TIDAR_JAX_CPU_KERNELS` = `auto` (the default: each shape a kernel takes runs on it
only where it was measured faster than XLA's op on this machine; kernel_choice.py), `on` (every shape a kernel
takes) or `off` (plain XLA, e.g. for A/B timing or to rule the kernels out while debugging). It is read when a
program is traced: set it before the first forward.
"""

from __future__ import annotations

import contextlib
import contextvars
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
from tidar_jax.ops import kernel_choice

ENV = kernel_choice.ENV
SOURCES = tuple(Path(__file__).parent / "cpu" / name
                for name in ("cached_attention.cc", "gemv.cc", "gemm.cc", "matmul_nt.cc"))
HEADERS = tuple(Path(__file__).parent / "cpu" / name for name in ("product.h", "vector.h", "work.h"))
ATTENTION_TARGET, GEMV_TARGET, GEMM_TARGET = "tidar_cached_attention", "tidar_gemv", "tidar_gemm"  # FFI targets
MATMUL_NT_TARGET = "tidar_matmul_nt"
TARGETS = {ATTENTION_TARGET: "TidarCachedAttention", GEMV_TARGET: "TidarGemv", GEMM_TARGET: "TidarGemm",
           MATMUL_NT_TARGET: "TidarMatmulNt"}  # -> handler symbols
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# `gemv` takes up to 4 rows; at 4 rows it was slower than XLA's dot (the partial sums are re-read per weight row),
# at 1 and 2 rows 15-40% faster (docs/RESULTS.md section 5).
GEMV_MAX_ROWS = 2
# Wider weights (an untied LM head) keep XLA's dot: the kernel's per-chunk partial sums would grow with N.
GEMV_MAX_COLUMNS = 16384
# `gemm` holds a column panel's partial sums for all rows on the stack (cpu/gemm.cc kMaxRows); longer blocks
# (prefill) keep XLA's dot.
GEMM_MAX_ROWS = 128
# `matmul_nt` (a tied LM head on a decode step's rows: 1 for AR, 2K for TiDAR) re-reads x from L1 for every row of
# w; measured faster than XLA's dot at 1-8 rows (docs/RESULTS.md section 5). Longer blocks keep XLA's dot.
MATMUL_NT_MAX_ROWS = 8
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC",
         "-Wno-attributes", "-Wno-return-type")


_SUSPENDED = contextvars.ContextVar("tidar_jax_cpu_kernels_suspended", default=False)


def enabled() -> bool:
    """False when `$TIDAR_JAX_CPU_KERNELS` is "off" (or "0" / "false") or inside `suspended()`."""
    return not _SUSPENDED.get() and kernel_choice.mode() != "off"


@contextlib.contextmanager
def suspended():
    """Code traced inside uses plain XLA. For programs over a device mesh: the SPMD partitioner would run a kernel's
    call on gathered (replicated) operands, e.g. every tensor-sharded weight of a batch-1 step."""
    token = _SUSPENDED.set(True)
    try:
        yield
    finally:
        _SUSPENDED.reset(token)


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


@functools.cache
def build_key() -> str:
    """What a built library is valid for: the sources, the compiler and flags, jaxlib and this CPU's model and
    feature flags (16 hex digits). Measured kernel choices (kernel_choice.py) are keyed on it too."""
    code = b"\0".join(p.read_bytes() for p in SOURCES + HEADERS)
    return hashlib.sha256(b"\0".join([code, " ".join(_compiler() + list(FLAGS)).encode(),
                                      jaxlib.__version__.encode(), _cpu_signature().encode()])).hexdigest()[:16]


def _build(out_dir: Path) -> Path:
    """Compiles SOURCES into one library in out_dir (atomically: other processes may build it at once); returns it."""
    library = out_dir / f"tidar_cpu_kernels-{build_key()}.so"
    if library.exists():
        return library
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    command = [*_compiler(), *FLAGS, f"-I{jax.ffi.include_dir()}", *map(str, SOURCES), "-o", partial]
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
    """Builds (or finds) the library and registers its FFI targets, once per process. False, after a warning,
    when that fails."""
    root = caches.root()
    try:
        library = _build(Path(tempfile.mkdtemp(prefix="tidar_jax_kernels_")) if root is None else root / "kernels")
        loaded = ctypes.cdll.LoadLibrary(str(library))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(loaded, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        warnings.warn(f"tidar_jax CPU kernels unavailable, using plain XLA ({error}); set {ENV}=off to skip "
                      "building them", RuntimeWarning, stacklevel=3)
        return False
    return True


def available() -> bool:
    """True when the CPU kernels are enabled, the default backend is the CPU and the library is built and loaded."""
    return enabled() and jax.default_backend() == "cpu" and _registered()


def _one_kernel_dtype(dtypes) -> bool:
    """All of `dtypes` alike and one of DTYPES."""
    kinds = {jnp.dtype(d) for d in dtypes}
    return len(kinds) == 1 and kinds.pop() in DTYPES


def supports(head_dim: int, *dtypes) -> bool:
    """Whether `cached_attention` takes operands of this head_dim and these dtypes (one of DTYPES, all alike)."""
    return _one_kernel_dtype(dtypes) and head_dim in HEAD_DIMS


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                     mask: jax.Array, scale: float) -> jax.Array:
    """The FFI call (see cpu/cached_attention.cc): q [b, t, h, d]; k, v [b, t, kv, d]; cache_k, cache_v
    [b, S, kv, d]; mask [b or 1, t, S + t] bool; all arrays of one dtype in DTYPES (`supports`). Returns
    [b, t, h, d] in q's dtype, equal to ops/attention.py's `_attention` up to float reassociation. Needs
    `available()`. Not differentiable by itself (ops/attention.py gives it the plain-XLA VJP)."""
    call = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
    return call(q, k, v, cache_k, cache_v, mask, scale=np.float32(scale))


def product_kernel(rows: int, inner: int, columns: int, *dtypes):
    """The kernel that runs x [rows, inner] @ w [inner, columns] in these dtypes (one of DTYPES, all alike) when it
    is available and the kernel mode lets it (`kernel_choice.use_kernel`): `gemv` for 1 to GEMV_MAX_ROWS rows,
    `gemm` for up to GEMM_MAX_ROWS rows; else None (XLA's dot)."""
    if not _one_kernel_dtype(dtypes):
        return None
    if 1 <= rows <= GEMV_MAX_ROWS and columns % 16 == 0 and columns <= GEMV_MAX_COLUMNS:
        kernel = gemv
    elif GEMV_MAX_ROWS < rows <= GEMM_MAX_ROWS and columns % 32 == 0:
        kernel = gemm
    else:
        return None
    return kernel if _chosen(kernel, _xla_dot, (rows, inner), (inner, columns), dtypes[0]) else None


def transposed_product_kernel(rows: int, inner: int, columns: int, *dtypes):
    """The kernel that runs x [rows, inner] @ w.T for w [columns, inner] in these dtypes (one of DTYPES, all
    alike): `matmul_nt` for 1 to MATMUL_NT_MAX_ROWS rows and inner % 32 == 0, when it is available and the kernel
    mode lets it; else None (XLA's dot)."""
    if _one_kernel_dtype(dtypes) and 1 <= rows <= MATMUL_NT_MAX_ROWS and inner % 32 == 0:
        return matmul_nt if _chosen(matmul_nt, _xla_dot_nt, (rows, inner), (columns, inner), dtypes[0]) else None
    return None


def _chosen(kernel, reference, x_shape: tuple, w_shape: tuple, dtype) -> bool:
    """Whether `kernel` runs this product (it is available, and measured faster than `reference` in mode auto)."""
    if not available():
        return False
    name = {gemv: "gemv", gemm: "gemm", matmul_nt: "matmul_nt"}[kernel]
    key = f"{name} x{list(x_shape)} w{list(w_shape)} {jnp.dtype(dtype).name}"

    def timings() -> dict:
        x = jax.random.normal(jax.random.key(0), x_shape, dtype)
        w = jax.random.normal(jax.random.key(1), w_shape, dtype)
        fast, plain = jax.jit(kernel), jax.jit(reference)
        return kernel_choice.measure(lambda: fast(x, w), lambda: plain(x, w))

    return kernel_choice.use_kernel(key, build_key(), timings)


def _xla_dot(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _xla_dot_nt(x, w):
    return jnp.dot(x, w.T, preferred_element_type=jnp.float32)


def _product(target: str, reference, columns_axis: int, doc: str):
    """x [M, K] times w -> [M, w.shape[columns_axis]] float32 by the FFI call `target`, with the VJP of
    `reference` (XLA's form of the same product)."""

    @jax.custom_vjp
    def product(x: jax.Array, w: jax.Array) -> jax.Array:
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], w.shape[columns_axis]), jnp.float32),
                                vmap_method="sequential")
        return call(x, w)

    product.defvjp(lambda x, w: (product(x, w), (x, w)), lambda res, g: jax.vjp(reference, *res)[1](g))
    product.__doc__ = doc
    return product


_PRODUCT_DOC = """{product} accumulated and returned in float32 ({form}; `{selector}` says which shapes,
needs `available()`): XLA's `jnp.dot({dot}, preferred_element_type=float32)` up to float reassociation, and the same
bits on every call. Its VJP is that dot's."""
gemv = _product(GEMV_TARGET, _xla_dot, 1, _PRODUCT_DOC.format(
    product="x [M, K] @ w [K, N]", form="cpu/gemv.cc: 1-2 rows, bound by reading w", selector="product_kernel",
    dot="x, w"))
gemm = _product(GEMM_TARGET, _xla_dot, 1, _PRODUCT_DOC.format(
    product="x [M, K] @ w [K, N]", form="cpu/gemm.cc: a few to 128 rows, bound by arithmetic",
    selector="product_kernel", dot="x, w"))
matmul_nt = _product(MATMUL_NT_TARGET, _xla_dot_nt, 0, _PRODUCT_DOC.format(
    product="x [M, D] @ w.T for w [V, D]", form="cpu/matmul_nt.cc: up to 8 rows, bound by reading w",
    selector="transposed_product_kernel", dot="x, w.T"))
