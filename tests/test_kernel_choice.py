"""Kernel choice by measurement (ops/kernel_choice.py): with injected timings, "auto" picks the faster per shape,
stores the choice keyed by the kernel build (so another process reads it back without measuring), a changed CPU
signature measures anew, and "on" / "off" override; the real products and attention consult it."""

import json

import jax
import jax.numpy as jnp
import pytest

from tidar_jax.model.precision import matmul
from tidar_jax.ops import cpu_kernels, kernel_choice
from tidar_jax.ops.attention import cached_attention


@pytest.fixture
def auto(monkeypatch, tmp_path):
    monkeypatch.setenv(kernel_choice.ENV, "auto")
    monkeypatch.setenv("TIDAR_JAX_CACHE_DIR", str(tmp_path))
    kernel_choice.forget()
    yield tmp_path
    kernel_choice.forget()


def fake_timings(kernel_s, xla_s, calls):
    def timings():
        calls.append(1)
        return {"kernel_s": kernel_s, "xla_s": xla_s}
    return timings


def test_auto_keeps_the_faster_per_shape_and_stores_it(auto):
    calls = []
    assert kernel_choice.use_kernel("gemm a", "build1", fake_timings(1.0, 2.0, calls))
    assert not kernel_choice.use_kernel("gemm b", "build1", fake_timings(3.0, 2.0, calls))
    assert kernel_choice.use_kernel("gemm a", "build1", fake_timings(9.0, 1.0, calls))  # decided: not re-timed
    assert len(calls) == 2
    stored = json.loads(kernel_choice.choices_path("build1").read_text())
    assert {k: v["choice"] for k, v in stored.items()} == {"gemm a": "kernel", "gemm b": "xla"}
    assert kernel_choice.decisions()["choices"]["gemm b"] == {"choice": "xla", "kernel_s": 3.0, "xla_s": 2.0}


def test_a_later_process_reads_the_choices_and_another_cpu_measures_anew(auto):
    calls = []
    kernel_choice.use_kernel("gemv x", "build1", fake_timings(1.0, 2.0, calls))
    kernel_choice.forget()  # as a new process: only the file remains
    assert kernel_choice.use_kernel("gemv x", "build1", fake_timings(5.0, 1.0, calls)) and len(calls) == 1
    # Another CPU (or other kernel sources) gives another build key, so its own measurement.
    assert not kernel_choice.use_kernel("gemv x", "build2", fake_timings(5.0, 1.0, calls)) and len(calls) == 2


def test_on_and_off_override_the_measurement(auto, monkeypatch):
    calls = []
    for mode, expected in (("on", True), ("off", False), ("1", True), ("false", False)):
        monkeypatch.setenv(kernel_choice.ENV, mode)
        assert kernel_choice.use_kernel("k", "b", fake_timings(9.0, 1.0, calls)) is expected
    assert not calls
    monkeypatch.setenv(kernel_choice.ENV, "sometimes")
    with pytest.raises(ValueError, match=kernel_choice.ENV):
        kernel_choice.mode()


@pytest.mark.skipif(jax.default_backend() != "cpu" or not cpu_kernels.available(), reason="needs the CPU kernels")
@pytest.mark.parametrize("kernel_faster", [True, False])
def test_products_and_attention_follow_the_measured_choice(auto, monkeypatch, kernel_faster):
    def measure(kernel, xla, rounds=kernel_choice.ROUNDS):
        jax.block_until_ready((kernel(), xla()))  # both implementations really run on the shape
        return {"kernel_s": 1.0, "xla_s": 2.0} if kernel_faster else {"kernel_s": 2.0, "xla_s": 1.0}

    monkeypatch.setattr(kernel_choice, "measure", measure)
    x, w = jnp.ones((1, 20, 64), jnp.float32), jnp.ones((64, 96), jnp.float32)
    lowered = jax.jit(lambda a, b: matmul("bsd,dn->bsn", a, b)).lower(x, w).as_text()
    assert (cpu_kernels.GEMM_TARGET in lowered) is kernel_faster
    q = jnp.ones((1, 1, 4, 16), jnp.float32)
    kv = jnp.ones((1, 1, 2, 16), jnp.float32)
    cache = jnp.ones((1, 9, 2, 16), jnp.float32)
    mask = jnp.ones((1, 1, 10), bool)
    lowered = jax.jit(lambda *a: cached_attention(*a)).lower(q, kv, kv, cache, cache, mask).as_text()
    assert (cpu_kernels.ATTENTION_TARGET in lowered) is kernel_faster
    keys = set(kernel_choice.decisions()["choices"])
    assert any(k.startswith("gemm x[20, 64] w[64, 96] float32") for k in keys)
    assert any(k.startswith("attention q[1, 1, 4, 16] kv2 slots9 float32") for k in keys)


def test_measure_times_both_implementations_interleaved():
    order = []
    timings = kernel_choice.measure(lambda: order.append("k") or jnp.ones(3), lambda: order.append("x") or jnp.ones(3),
                                    rounds=3)
    assert order == ["k", "x"] * 4 and timings["kernel_s"] > 0 and timings["xla_s"] > 0
