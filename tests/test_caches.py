"""The CLIs' persistent compilation cache (tidar_jax/caches.py): where it lives, that "off" disables it, that
a directory already given to JAX wins, and that a second process loads a program the first one wrote instead of
writing it again. Enabling is process-wide, so the last two run in subprocesses."""

import os
import subprocess
import sys
import textwrap

from tidar_jax import caches

_PROGRAM = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from tidar_jax import caches
    caches.MIN_COMPILE_SECONDS = 0.0  # this small program compiles fast; write it anyway
    print(caches.enable_compile_cache())
    x = jax.jit(lambda a: jnp.sin(a) @ a.T + 1.0)(jnp.arange(12.0).reshape(3, 4))
    print(float(x.sum()))
""")


def _run(env: dict) -> list[str]:
    full = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", _PROGRAM], env=full, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def _entries(cache, kind: str = "cache") -> dict[str, int]:
    """Compiled-program entries ("cache") or JAX's LRU access stamps ("atime") -> modification time."""
    return {p.name: p.stat().st_mtime_ns for p in cache.glob(f"*-{kind}")}


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(caches.ENV, raising=False)
    monkeypatch.setenv("TIDAR_JAX_CACHE_DIR", str(tmp_path / "root"))
    assert caches.root() == tmp_path / "root"  # the token cache's folder (data/pipeline.py)
    assert caches.compile_cache_dir() == tmp_path / "root" / "xla"  # beside the token arrays
    monkeypatch.setenv("TIDAR_JAX_CACHE_DIR", "off")
    assert caches.root() is None and caches.compile_cache_dir() is None  # the tools' caches are off
    monkeypatch.setenv(caches.ENV, str(tmp_path / "own"))
    assert caches.compile_cache_dir() == tmp_path / "own"  # its own variable wins
    monkeypatch.setenv(caches.ENV, "off")
    monkeypatch.setenv("TIDAR_JAX_CACHE_DIR", str(tmp_path / "root"))
    assert caches.compile_cache_dir() is None


def test_second_process_reuses_the_compiled_program(tmp_path):
    cache = tmp_path / "xla"
    first = _run({caches.ENV: str(cache), "JAX_COMPILATION_CACHE_DIR": ""})
    assert first[0] == str(cache) and _entries(cache), "the first run wrote no cache entry"
    written, touched = _entries(cache), _entries(cache, "atime")
    second = _run({caches.ENV: str(cache), "JAX_COMPILATION_CACHE_DIR": ""})
    assert second == first  # same directory, same result
    assert _entries(cache) == written  # nothing compiled and written again
    after = _entries(cache, "atime")  # JAX stamps an entry's "-atime" file when it reads the entry
    assert after.keys() == touched.keys() and any(after[name] > touched[name] for name in touched)


def test_off_writes_nothing_and_jax_own_setting_wins(tmp_path):
    assert _run({caches.ENV: "off", "JAX_COMPILATION_CACHE_DIR": ""})[0] == "None"
    own = tmp_path / "jax-own"
    out = _run({caches.ENV: str(tmp_path / "ours"), "JAX_COMPILATION_CACHE_DIR": str(own)})
    assert out[0] == str(own) and not (tmp_path / "ours").exists()
