"""Test setup: 8 simulated CPU devices and offline Hugging Face, both fixed before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The CLIs turn on JAX's persistent compilation cache (tidar_jax/caches.py), a process-wide setting: the
# in-process CLI tests must not switch it on for the whole session, nor read executables left by an earlier run.
os.environ["TIDAR_JAX_COMPILE_CACHE"] = "off"
# The CPU kernels run every shape they take, as the kernel tests expect: the default mode "auto" would time each
# shape on this machine (tests/test_kernel_choice.py covers it with injected timings).
os.environ.setdefault("TIDAR_JAX_CPU_KERNELS", "on")

import jax  # noqa: E402  (must come after the environment above)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_config():
    """The tiny preset (d_model 64, 2 layers, vocab 512), validated. TIDAR_TEST_DTYPE (e.g. bfloat16) sets its
    model.compute_dtype, so the tests built on it run in that dtype (scripts/gpu_bench.sh)."""
    from tidar_jax.config import load_config

    dtype = os.environ.get("TIDAR_TEST_DTYPE")
    return load_config(os.path.join(REPO_ROOT, "configs", "tiny.yaml"),
                       [f"model.compute_dtype={dtype}"] if dtype else ())
