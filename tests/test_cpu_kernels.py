"""The CPU kernels (ops/cpu_kernels.py, XLA FFI calls) against plain XLA. Attention: jax.nn.dot_product_attention
over `[cache | current]` and ops.attention's XLA formulations, over head dims, groups, query blocks, cache sizes,
ragged and broadcast masks, rows that see nothing, slots no row sees (never read), bfloat16, gradients (plain
XLA's), which formulation "auto" picks, the build's disk cache and its failure path, and greedy decoding with the
kernels on and off. gemv, gemm and matmul_nt: XLA's dot over row counts, chunk, block and tile boundaries, both
dtypes, their gradients, and where precision.matmul uses which."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from markov import trained_model
from test_ops_attention import reference

from tidar_jax import config as config_lib
from tidar_jax.config import MeshConfig
from tidar_jax.decoding.generation import Generator
from tidar_jax.decoding.program_cache import ProgramCache
from tidar_jax.ops import cached_attention, cpu_kernels
from tidar_jax.ops.attention import KERNEL_MAX_COLUMNS, auto_uses_kernel
from tidar_jax.sharding import make_mesh

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU kernel not built (no C++ compiler?)")


def inputs(seed, batch, t, s, heads, kv, head_dim, shared_mask=False):
    """Random q [b, t, heads, d], k / v [b, t, kv, d], caches [b, s, kv, d] and a [b or 1, t, s + t] mask: each row
    sees itself, a random half of the rest, and no cache slot from a per-row fill on (ragged over the batch)."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    q = normal(batch, t, heads, head_dim)
    k, v = normal(batch, t, kv, head_dim), normal(batch, t, kv, head_dim)
    ck, cv = normal(batch, s, kv, head_dim), normal(batch, s, kv, head_dim)
    mask = rng.random((1 if shared_mask else batch, t, s + t)) < 0.5
    mask[:, :, s:] |= np.eye(t, dtype=bool)
    for row in range(mask.shape[0]):
        mask[row, :, (s * (row + 1)) // (mask.shape[0] + 1):s] = False
    return q, k, v, ck, cv, jnp.asarray(mask)


@jax.jit
def kernel_and_xla(q, k, v, ck, cv, mask):
    """The kernel, the reference and ops.attention's "grouped" XLA form (the same dtype as the kernel's inputs)."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ck, cv)]
    return (cached_attention(q, k, v, ck, cv, mask, formulation="kernel"), reference(*f32, mask),
            cached_attention(q, k, v, ck, cv, mask, formulation="grouped"))


@pytest.mark.parametrize("head_dim", cpu_kernels.HEAD_DIMS)
@pytest.mark.parametrize("t,s", [(1, 0), (1, 40), (5, 7), (20, 40)])
def test_equals_dot_product_attention(head_dim, t, s):
    # Over the grid: query groups of 1, 3 and 4 heads (MHA and GQA), batch 1 and 3.
    heads, kv = [(2, 2), (9, 3), (8, 2)][(head_dim // 16 + t + s) % 3]
    batch = 1 + 2 * ((t + s + head_dim // 16) % 2)
    args = inputs(head_dim + 10 * heads + t + s, batch, t, s, heads, kv, head_dim)
    out, ref, grouped = kernel_and_xla(*args)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(out, grouped, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("batch,t,heads,kv", [(2, 3, 20, 1), (1, 7, 6, 3), (2, 1, 12, 2)])
def test_work_items_of_sixteen_query_rows(batch, t, heads, kv):
    """The kernel packs a kv group's query rows (token-major, heads of the group inner) sixteen to a work item:
    a group of 20 heads spills one token's heads over two items, 14 rows of 7 tokens fill one (scored against q
    transposed), 6 rows of one token take the narrow path; every split equals the reference."""
    args = inputs(batch * 100 + t + heads, batch, t, 11, heads, kv, 32)
    out, ref, _ = kernel_and_xla(*args)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)


def test_shared_mask_and_rows_that_see_nothing():
    """One mask for every batch row; a query that sees nothing averages every value, cache slots past every fill
    included (the reference's large-negative convention), so then no slot is skipped."""
    q, k, v, ck, cv, mask = inputs(1, 3, 5, 24, 6, 2, 32, shared_mask=True)
    out, ref, _ = kernel_and_xla(q, k, v, ck, cv, mask.at[0, 2].set(False))
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    mean = jnp.concatenate([cv, v], axis=1).mean(1)  # [b, kv, d]
    np.testing.assert_allclose(out[:, 2], jnp.repeat(mean, 3, axis=1), atol=1e-5)


def test_slots_no_row_sees_are_never_read():
    """NaN in every cache slot no row of a batch row sees: the kernel skips them (0 * NaN would poison the value
    sums), so the result equals the reference on a cache with those slots zeroed."""
    q, k, v, ck, cv, mask = inputs(2, 3, 5, 30, 6, 2, 16)
    unseen = ~jnp.any(mask[..., :30], axis=1)[:, :, None, None]  # [b, s, 1, 1]
    poisoned = [jnp.where(unseen, jnp.nan, c) for c in (ck, cv)]
    out = jax.jit(lambda *a: cached_attention(*a, formulation="kernel"))(q, k, v, *poisoned, mask)
    zeroed = [jnp.where(unseen, 0.0, c) for c in (ck, cv)]
    np.testing.assert_allclose(out, reference(q, k, v, *zeroed, mask), atol=2e-6, rtol=1e-5)


def test_bfloat16_equals_the_xla_formulation():
    """bfloat16 operands: bfloat16 output within one bfloat16 rounding of the XLA "grouped" form (which also rounds
    probabilities to the value dtype before the value products), and close to the float32 reference."""
    args = inputs(3, 3, 20, 40, 9, 3, 64)
    low = [x.astype(jnp.bfloat16) for x in args[:5]]
    out, ref, grouped = kernel_and_xla(*low, args[5])
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), grouped.astype(jnp.float32), atol=2 ** -7, rtol=2 ** -7)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.05)


def test_gradients_are_plain_xla():
    q, k, v, ck, cv, mask = inputs(4, 2, 5, 7, 4, 2, 16)
    weights = jax.random.normal(jax.random.key(0), q.shape)

    def grads(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a, mask) * weights), argnums=(0, 1, 2, 3, 4)))(q, k, v, ck, cv)

    kernel = grads(lambda *a: cached_attention(*a, formulation="kernel"))
    for a, b in zip(kernel, grads(reference)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _uses_kernel(*args, **kwargs) -> bool:
    return cpu_kernels.ATTENTION_TARGET in str(jax.jit(lambda *a: cached_attention(*a, **kwargs)).lower(*args).as_text())


def test_auto_picks_the_kernel_where_it_applies(monkeypatch):
    args = inputs(5, 1, 1, 9, 4, 2, 16)
    assert _uses_kernel(*args)
    assert not _uses_kernel(*args, formulation="dense")
    long_block = inputs(5, 1, KERNEL_MAX_COLUMNS // 4 + 1, 9, 4, 2, 16)  # more query columns: XLA's matmuls
    assert not _uses_kernel(*long_block) and _uses_kernel(*long_block, formulation="kernel")
    # The rule callers report by (infer.generate's cpu_attention_kernel) is the one traced.
    assert auto_uses_kernel(16, 4, 1, jnp.float32) and not auto_uses_kernel(16, 4, KERNEL_MAX_COLUMNS // 4 + 1,
                                                                             jnp.float32)
    odd = inputs(5, 1, 1, 9, 4, 2, 8)  # head_dim 8: not a kernel shape, so XLA, and "kernel" is refused
    assert not _uses_kernel(*odd)
    with pytest.raises(ValueError, match="head_dim 8"):
        cached_attention(*odd, formulation="kernel")
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert not _uses_kernel(*args) and not auto_uses_kernel(16, 4, 1, jnp.float32)
    with pytest.raises(ValueError, match=cpu_kernels.ENV):
        cached_attention(*args, formulation="kernel")


@pytest.mark.slow  # ~16 s: builds the library twice (default suite under 10 min on 2 cores)
def test_library_is_built_once_into_the_cache(tmp_path):
    first = cpu_kernels._build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert cpu_kernels._build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left


def test_a_failed_build_warns_and_falls_back_to_xla(tmp_path):
    """No compiler: one warning naming the switch, `available()` False, attention still computed (by XLA)."""
    script = ("import warnings, jax, jax.numpy as jnp\n"
              "from tidar_jax.ops import cached_attention, cpu_kernels\n"
              "with warnings.catch_warnings(record=True) as caught:\n"
              "    warnings.simplefilter('always')\n"
              "    ok = cpu_kernels.available()\n"
              "q = jnp.ones((1, 1, 2, 16)); c = jnp.ones((1, 3, 2, 16))\n"
              "out = cached_attention(q, q, q, c, c, jnp.ones((1, 1, 4), bool))\n"
              "print(ok, float(out.sum()), [str(w.message) for w in caught])\n")
    env = dict(os.environ, CXX="false", TIDAR_JAX_CACHE_DIR=str(tmp_path), JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    ok, total, messages = done.stdout.split(" ", 2)
    assert ok == "False" and float(total) == 32.0
    assert cpu_kernels.ENV in messages and "failed" in messages
    assert not list((tmp_path / "kernels").glob("*.so"))


@pytest.mark.slow
@pytest.mark.parametrize("flag", ["-mno-avx512bf16", "-mno-avx512f"])
def test_builds_for_cpus_without_avx512_features_equal_xla(tmp_path, flag):
    """The sources as built for a CPU without AVX-512 BF16 (bfloat16 products widened to float32) or without AVX-512
    at all (GCC's vector extensions on AVX2 registers), in a fresh process: every kernel still equals XLA. (Slow:
    two builds; the default suite covers whatever the machine it runs on has.)"""
    script = ("import jax, jax.numpy as jnp, numpy as np\n"
              "from tidar_jax.ops import cpu_kernels\n"
              "assert cpu_kernels.available()\n"
              "rng = np.random.default_rng(0)\n"
              "for dtype in (jnp.float32, jnp.bfloat16):\n"
              "    for kernel, rows in ((cpu_kernels.gemv, 1), (cpu_kernels.gemm, 7), (cpu_kernels.matmul_nt, 5)):\n"
              "        x = jnp.asarray(rng.standard_normal((rows, 96)), dtype)\n"
              "        w = jnp.asarray(rng.standard_normal((96, 96)) / 8, dtype)\n"
              "        ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision='highest')\n"
              "        out = jax.jit(kernel)(x, w.T if kernel is cpu_kernels.matmul_nt else w)\n"
              "        np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)\n"
              "    q, c = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((1, 3, 4, 32), (1, 9, 2, 32)))\n"
              "    causal = jnp.tril(jnp.ones((3, 3), bool))\n"
              "    mask = jnp.asarray(rng.random((1, 3, 12)) < 0.7).at[:, :, 9:].set(causal)\n"
              "    attend = jax.jit(cpu_kernels.cached_attention, static_argnums=6)\n"
              "    out = attend(q, q[:, :, :2], q[:, :, 2:], c, c, mask, 0.2)\n"
              "    k = jnp.concatenate([c, q[:, :, :2]], 1).astype(jnp.float32)\n"
              "    v = jnp.concatenate([c, q[:, :, 2:]], 1).astype(jnp.float32)\n"
              "    ref = jax.nn.dot_product_attention(q.astype(jnp.float32), k, v, mask=mask[:, None], scale=0.2)\n"
              "    atol = 1e-2 if dtype == jnp.bfloat16 else 1e-5\n"
              "    np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=atol)\n"
              "print('ok')\n")
    env = dict(os.environ, CXX=f"{os.environ.get('CXX', 'g++')} {flag}", TIDAR_JAX_CACHE_DIR=str(tmp_path),
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.fixture(scope="module")
def decode_cfg(tiny_config):
    return config_lib.replace(tiny_config, decode={"prompt_buckets": (8, 16), "max_cache_len": 32,
                                                   "max_new_tokens": 12, "block_size": 0})


PROMPTS = [[3, 4, 5], [7, 3, 9, 4, 10, 5, 6, 8, 3, 9, 4], [9, 8, 7]]


def _count_kernel_calls(monkeypatch) -> list:
    """Replaces the kernels by wrappers that note each traced call in the returned list."""
    traced = []
    for name in ("cached_attention", "gemv", "gemm", "matmul_nt"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *a, real=real, name=name: traced.append(name) or real(*a))
    return traced


@pytest.mark.parametrize("mode,prompts", [("tidar", PROMPTS), ("ar", PROMPTS), ("ar", PROMPTS[1:2])])
def test_greedy_decoding_equals_decoding_without_the_kernels(decode_cfg, mode, prompts, monkeypatch):
    """A trained tiny model (drafts often accepted), a ragged batch and batch 1: the same tokens with the kernels on
    and off. The program cache keys on the switch, so "off" compiles anew, and only "on" traces kernel calls: the
    attention kernel always, gemv for the 1-row steps of AR at batch 1, gemm for TiDAR steps, batched AR steps
    and prefill (at most 3 x 16 rows here), matmul_nt for the tied LM head on the rows an AR step reads."""
    graphdef, params = trained_model(decode_cfg.model, "tidar", seed=0, steps=100)
    traced = _count_kernel_calls(monkeypatch)
    outputs, kernel_calls = {}, {}
    for switch in ("on", "off"):
        monkeypatch.setenv(cpu_kernels.ENV, switch)
        generator = Generator(graphdef, params, decode_cfg.model, decode_cfg.decode, allow_block_size_mismatch=True,
                              programs=ProgramCache())  # compiled (traced) here, not taken from another test
        before = len(traced)
        outputs[switch] = generator.generate(prompts, mode=mode).tokens
        kernel_calls[switch] = set(traced[before:])
    one_row_steps = mode == "ar" and len(prompts) == 1
    expected = {"cached_attention", "gemm"} | ({"gemv"} if one_row_steps else set())
    expected |= {"matmul_nt"} if mode == "ar" else set()  # TiDAR reads 2K = 8 rows per batch row: 24 > 8 here
    assert kernel_calls["on"] == expected
    assert not kernel_calls["off"]
    assert outputs["on"] == outputs["off"]


def test_mesh_programs_keep_plain_xla(decode_cfg, monkeypatch):
    """Over a mesh the partitioner would gather a kernel's operands (tensor-sharded weights, a head-sharded cache),
    so a Generator with a mesh traces its programs without them; its output equals the one-device kernel run's."""
    graphdef, params = trained_model(decode_cfg.model, "tidar", seed=0, steps=100)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4])
    traced = _count_kernel_calls(monkeypatch)
    one = Generator(graphdef, params, decode_cfg.model, decode_cfg.decode,
                    programs=ProgramCache()).generate(PROMPTS, mode="ar")
    assert traced
    del traced[:]
    sharded = Generator(graphdef, params, decode_cfg.model, decode_cfg.decode, mesh=mesh,
                        programs=ProgramCache()).generate(PROMPTS, mode="ar")
    assert not traced and sharded.tokens == one.tokens


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("inner,columns", [(7, 16), (100, 48), (576, 1536), (1536, 576), (3000, 4112)])
def test_gemv_equals_xla_dot(dtype, rows, inner, columns):
    """Row counts, inner sizes that split into 1 to 16 chunks (3000 x 4112 float32: 16, summed in chunk order)
    and column counts across tile boundaries; float32 accumulation, as XLA's dot with a float32 result."""
    _check_product(cpu_kernels.gemv, dtype, rows, inner, columns)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,inner,columns", [
    (3, 7, 32),        # odd inner size: bfloat16's last product pairs with zeros; one 32-column panel
    (5, 64, 96),       # one 64-column panel and a 32-column tail
    (6, 65, 64),       # a full register block of rows; inner size one past a k block
    (13, 200, 160),    # row blocks 6 + 6 + 1
    (20, 576, 1536),   # SmolLM2's MLP at a K = 4 TiDAR step
    (20, 1536, 576),
    (72, 576, 192),    # K = 8; SmolLM2's k / v projection
    (128, 129, 320),   # the most rows the kernel takes
])
def test_gemm_equals_xla_dot(dtype, rows, inner, columns):
    """Row counts across register blocks, inner sizes across k blocks (and odd, for bfloat16's paired products),
    column counts across panels; float32 accumulation, as XLA's dot with a float32 result."""
    _check_product(cpu_kernels.gemm, dtype, rows, inner, columns)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows,inner,columns", [
    (1, 32, 3),        # fewer rows of w than a work item, inner one bfloat16 pair-vector
    (3, 96, 515),      # inner % 64 == 32; a row block of 3; rows of w over two items
    (5, 576, 1000),    # 4 + 1 rows
    (16, 128, 257),    # more rows than precision.matmul sends it (the kernel takes up to 32)
])
def test_matmul_nt_equals_xla_dot(dtype, rows, inner, columns):
    """x @ w.T for w [columns, inner] as it lies (a tied LM head): row blocks, inner sizes, work-item edges."""
    _check_product(cpu_kernels.matmul_nt, dtype, rows, inner, columns, transposed=True)


def _check_product(kernel, dtype, rows, inner, columns, transposed=False):
    rng = np.random.default_rng(inner + columns + rows)
    x = jnp.asarray(rng.standard_normal((rows, inner)), dtype)
    w = jnp.asarray(rng.standard_normal((inner, columns)) / np.sqrt(inner), dtype)
    out = jax.jit(kernel)(x, w.T if transposed else w)
    assert out.shape == (rows, columns) and out.dtype == jnp.float32
    ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(jax.jit(kernel)(x, w.T if transposed else w), out)  # whatever the scheduling


def test_matmul_uses_the_product_kernels_for_decode_rows_of_a_projection():
    """precision.matmul: gemv for 1-2 rows, gemm for 3 to GEMM_MAX_ROWS, in the "x's trailing dims times w's
    leading dims" form (several contracted / output dims included); matmul_nt for up to MATMUL_NT_MAX_ROWS rows
    times a 2-D weight used transposed (a tied LM head); XLA otherwise (more rows, columns or inner sizes the
    kernels do not tile); always equal to einsum."""
    from tidar_jax.model.precision import matmul

    rng = np.random.default_rng(0)
    gemv, gemm, nt = cpu_kernels.GEMV_TARGET, cpu_kernels.GEMM_TARGET, cpu_kernels.MATMUL_NT_TARGET
    many, many_nt = cpu_kernels.GEMM_MAX_ROWS + 1, cpu_kernels.MATMUL_NT_MAX_ROWS + 1
    cases = [("bsd,dhk->bshk", (1, 1, 32), (32, 4, 16), gemv), ("bshk,hkd->bsd", (2, 1, 4, 16), (4, 16, 32), gemv),
             ("bsd,df->bsf", (1, 3, 32), (32, 64), gemm), ("bshk,hkd->bsd", (4, 5, 4, 16), (4, 16, 32), gemm),
             ("bsd,df->bsf", (1, many, 32), (32, 64), None), ("bsd,df->bsf", (1, 3, 32), (32, 48), None),
             ("bsd,vd->bsv", (1, 1, 32), (48, 32), nt), ("bsd,vd->bsv", (2, 4, 64), (50, 64), nt),
             ("bsd,vd->bsv", (1, many_nt, 32), (64, 32), None), ("bsd,vd->bsv", (1, 2, 48), (64, 48), None),
             ("bshk,dhk->bsd", (1, 1, 4, 16), (32, 4, 16), None)]
    for equation, x_shape, w_shape, target in cases:
        x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (x_shape, w_shape))
        lowered = str(jax.jit(lambda a, b, e=equation: matmul(e, a, b)).lower(x, w).as_text())
        assert [t for t in (gemv, gemm, nt) if t in lowered] == ([target] if target else []), (equation, x_shape)
        np.testing.assert_allclose(matmul(equation, x, w), jnp.einsum(equation, x, w, precision="highest"),
                                   atol=1e-5, rtol=1e-5, err_msg=equation)


@pytest.mark.parametrize("rows,transposed", [(2, False), (7, False), (3, True)])
def test_product_gradients_are_xla_dots(rows, transposed):
    rng = np.random.default_rng(rows)
    x, w = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((rows, 64), (64, 96)))
    weights = jnp.asarray(rng.standard_normal((rows, 96)), jnp.float32)
    if transposed:
        kernel, w = cpu_kernels.transposed_product_kernel(rows, 64, 96, jnp.float32), w.T
        reference = lambda a, b: jnp.dot(a, b.T, precision="highest")  # noqa: E731
    else:
        kernel = cpu_kernels.product_kernel(rows, 64, 96, jnp.float32)
        reference = lambda a, b: jnp.dot(a, b, precision="highest")  # noqa: E731
    grads = [jax.jit(jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) * weights), argnums=(0, 1)))(x, w)
             for f in (kernel, reference)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_step_costs_count_the_work_the_kernels_do(tiny_config, monkeypatch):
    """XLA's cost analysis cannot see into a custom call: step_cost.step_costs costs plain-XLA programs, so its
    figures are the same with the kernels on and off."""
    from tidar_jax.evals.step_cost import step_costs

    costs = {}
    for switch in ("on", "off"):
        monkeypatch.setenv(cpu_kernels.ENV, switch)
        costs[switch] = step_costs(tiny_config.model, 4, 64, prompt_bucket=16)
    for step in ("ar_step", "tidar_step", "prefill"):
        assert costs["on"][step] == costs["off"][step], step
