"""Runs model-written programs in separate, limited processes; never in the evaluator's own process.

Each program gets a fresh `python -I -B` (isolated: no PYTHON* variables, no user site, no script directory on
sys.path, no bytecode written) started through `_sandbox_runner.py` in its own temporary working directory, which is
deleted afterwards. Limits:
- wall clock: the whole process group is SIGKILLed after `timeout` seconds (status "timeout");
- CPU seconds (RLIMIT_CPU = ceil(timeout) + 1), address space (RLIMIT_AS, `memory_mb`), largest written file
  (RLIMIT_FSIZE, `max_output_mb`, which also bounds what stdout / stderr can fill), no core dumps;
- no network: inside `unshare -n` (an empty network namespace, loopback down) when this machine allows it (root,
  or unprivileged user namespaces through `unshare -r -n`), and in any case an audit hook in the child refuses
  every socket operation, new processes, signals to other processes, ctypes, and writes outside its directory;
- a minimal environment (PATH, LANG, HOME / TMPDIR = the sandbox directory, one thread for numeric libraries).

A program passes when it exits 0 after running to its end: the runner writes a per-run nonce (sent over stdin)
to a result file only then, so `sys.exit()` and `os._exit(0)` part-way both count as failures.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

RUNNER = Path(__file__).with_name("_sandbox_runner.py")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_MAX_OUTPUT_MB = 16
_TAIL = 2000  # characters of stdout / stderr kept in a result


@dataclasses.dataclass
class ExecutionResult:
    """status: "passed" | "failed" (raised, exited early or non-zero) | "timeout" (killed at the wall-clock limit);
    returncode: the child's exit status (negative = killed by that signal; None when killed at the timeout);
    stdout / stderr: their last characters; duration_s: wall-clock seconds."""

    status: str
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


_NETWORK_PREFIX: list[str] | None = None


def network_isolation() -> list[str]:
    """The command prefix that runs a child without network: ["unshare", "-n"], ["unshare", "-r", "-n"] or []
    (then only the child's audit hook blocks sockets). Probed once per process."""
    global _NETWORK_PREFIX
    if _NETWORK_PREFIX is None:
        _NETWORK_PREFIX = []
        unshare = shutil.which("unshare")
        if unshare and sys.platform.startswith("linux"):
            for prefix in ([unshare, "-n"], [unshare, "-r", "-n"]):
                try:
                    probe = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
                except (OSError, subprocess.SubprocessError):
                    continue
                if probe.returncode == 0:
                    _NETWORK_PREFIX = prefix
                    break
    return list(_NETWORK_PREFIX)


def describe_isolation() -> str:
    prefix = network_isolation()
    return " ".join(["unshare"] + prefix[1:]) if prefix else "audit hook only (unshare unavailable)"


def _child_env(sandbox: str) -> dict[str, str]:
    # (python -I ignores PYTHON* variables, so none are set here)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "HOME": sandbox, "TMPDIR": sandbox}
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = "1"
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4 * _TAIL, 0))
            return f.read().decode("utf-8", "replace")[-_TAIL:]
    except OSError:
        return ""


def run_program(source: str, timeout: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB,
                max_output_mb: int = DEFAULT_MAX_OUTPUT_MB) -> ExecutionResult:
    """Runs the Python `source` in a sandboxed child process (see the module docstring) and reports the outcome."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    with tempfile.TemporaryDirectory(prefix="tidar-exec-") as sandbox:
        sandbox = os.path.realpath(sandbox)
        root = Path(sandbox)
        (root / "program.py").write_text(source, encoding="utf-8")
        nonce = secrets.token_hex(16)
        cmd = [*network_isolation(), sys.executable, "-I", "-B", str(RUNNER), "program.py", "result",
               str(memory_mb * 2**20), str(math.ceil(timeout) + 1), str(max_output_mb * 2**20)]
        start = time.perf_counter()
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=sandbox, env=_child_env(sandbox), stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True)
            try:
                try:
                    proc.stdin.write((nonce + "\n").encode())
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                try:
                    returncode = proc.wait(timeout=timeout)
                    status = None
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    proc.wait()
                    returncode, status = None, "timeout"
            finally:
                _kill_group(proc)  # anything the program left behind in its group
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        duration = time.perf_counter() - start
        if status is None:
            try:
                wrote = (root / "result").read_text() == nonce
            except OSError:
                wrote = False
            status = "passed" if returncode == 0 and wrote else "failed"
        return ExecutionResult(status=status, returncode=returncode, duration_s=duration,
                               stdout=_tail(root / "stdout"), stderr=_tail(root / "stderr"))


def run_programs(sources: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S, workers: int | None = None,
                 memory_mb: int = DEFAULT_MEMORY_MB, on_done: Callable[[int, ExecutionResult], None] | None = None
                 ) -> list[ExecutionResult]:
    """`run_program` on each source, `workers` child processes at a time (default: min(4, CPUs)); results in input
    order. `on_done(index, result)` is called as each finishes (e.g. to advance a progress bar)."""
    workers = workers or min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    network_isolation()  # probe once, before the threads start
    results: list[ExecutionResult | None] = [None] * len(sources)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, s, timeout, memory_mb): i for i, s in enumerate(sources)}
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if on_done is not None:
                on_done(i, results[i])
    return results  # type: ignore[return-value]
