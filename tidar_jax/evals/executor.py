"""Runs model-written HumanEval completions so that their verdict cannot be forged and their code cannot reach out.

For each (problem, completion), `run_problem` starts a fresh trusted judge process (sandbox_judge.py), which runs
the problem's own test code and calls the completion's entry point in a sandboxed runner (_sandbox_runner.py)
through a proxy that passes only plain builtin values (sandbox_codec.py). Nothing the model's code does decides the
verdict: it passes only when the problem's `check(candidate)` returns in the judge. The runner is isolated by the
operating system (sandbox_isolation.py: bubblewrap; an unprivileged user, a read-only mount view with a private
/tmp, its own PID and network namespaces, no new privileges), and limited in wall clock (`timeout` for the whole
program, optionally `call_timeout` per call), CPU seconds, address space, size of any file written (its printed
output included) and number of processes. Without a working sandbox nothing runs (SandboxUnavailable) unless the
caller passes `sandbox_isolation.choose(allow_unsafe=True)` as `isolation`.

The judge itself is killed `GRACE_S` after `timeout` (status "timeout"), together with everything it started; each
run's temporary directory is deleted afterwards.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from tidar_jax.evals import sandbox_isolation
from tidar_jax.evals.sandbox_isolation import Isolation

JUDGE = Path(__file__).with_name("sandbox_judge.py")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_MAX_OUTPUT_MB = 16
GRACE_S = 5.0  # the judge's own start and the test code's work between calls, beyond `timeout`
_TAIL = 2000  # characters of the program's output kept in a result
_FIELDS = ("task_id", "prompt", "entry_point", "test")


@dataclasses.dataclass
class ExecutionResult:
    """status: "passed" (the problem's check returned) | "failed" | "timeout"; detail: why, decided by the trusted
    judge (empty when passed); duration_s: wall-clock seconds; output: the last characters the program printed
    (stdout and stderr together; written by the model's code, so for diagnosis only)."""

    status: str
    detail: str
    duration_s: float
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _check_job(problem: dict, completion: str) -> None:
    for field in _FIELDS:
        if type(problem.get(field)) is not str:
            raise ValueError(f"problem {problem.get('task_id', '?')!r}: {field} must be a string")
    if type(completion) is not str:
        raise ValueError(f"the completion of {problem['task_id']} must be a string, got {type(completion).__name__}")


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4 * _TAIL, 0))
            return f.read().decode("utf-8", "replace")[-_TAIL:]
    except OSError:
        return ""


def _verdict(stdout: bytes, stderr: bytes) -> tuple[str, str]:
    try:
        verdict = json.loads(stdout)
        if verdict["status"] in ("passed", "failed", "timeout") and isinstance(verdict["detail"], str):
            return verdict["status"], verdict["detail"]
    except (ValueError, TypeError, KeyError):
        pass
    last = (stderr.decode("utf-8", "replace").strip().splitlines() or ["no verdict"])[-1]
    return "failed", f"the judge gave no verdict: {last}"


def run_problem(problem: dict, completion: str, timeout: float = DEFAULT_TIMEOUT_S,
                memory_mb: int = DEFAULT_MEMORY_MB, max_output_mb: int = DEFAULT_MAX_OUTPUT_MB,
                call_timeout: float | None = None, isolation: Isolation | None = None) -> ExecutionResult:
    """Executes `completion` for `problem` (a HumanEval dict: task_id, prompt, entry_point, test) as the module
    docstring says, with `isolation` (default `sandbox_isolation.choose()`, which refuses without a sandbox)."""
    if not timeout > 0 or (call_timeout is not None and not call_timeout > 0):
        raise ValueError(f"timeouts must be positive, got {timeout} and {call_timeout}")
    _check_job(problem, completion)
    isolation = isolation or sandbox_isolation.choose()
    with tempfile.TemporaryDirectory(prefix="tidar-exec-") as work:
        output = os.path.join(work, "output")
        argv = [sys.executable, "-I", "-B", "-u", isolation.runner(), problem["entry_point"], str(memory_mb * 2**20),
                str(math.ceil(timeout) + 1), str(max_output_mb * 2**20), str(isolation.max_processes)]
        job = {**{k: problem[k] for k in ("prompt", "entry_point", "test")}, "completion": completion,
               "timeout": timeout, "call_timeout": call_timeout, "command": isolation.command(argv),
               "env": isolation.env(work), "cwd": work, "output": output, "reap": isolation.name != "none"}
        start = time.perf_counter()
        judge = subprocess.Popen([sys.executable, "-I", "-B", str(JUDGE)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work, env=isolation.env(work),
                                 start_new_session=True)
        try:
            stdout, stderr = judge.communicate(json.dumps(job).encode(), timeout=timeout + GRACE_S)
            status, detail = _verdict(stdout, stderr)
        except subprocess.TimeoutExpired:
            status, detail = "timeout", f"the test code was still running {timeout + GRACE_S:g} s after it started"
        finally:
            try:  # the judge and whatever it started (bwrap takes its whole sandbox with it)
                os.killpg(judge.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            judge.wait()
        return ExecutionResult(status, detail, time.perf_counter() - start, _tail(output))


def run_problems(jobs: Sequence[tuple[dict, str]], timeout: float = DEFAULT_TIMEOUT_S, workers: int | None = None,
                 memory_mb: int = DEFAULT_MEMORY_MB, isolation: Isolation | None = None,
                 on_done: Callable[[int, ExecutionResult], None] | None = None) -> list[ExecutionResult]:
    """`run_problem` on each (problem, completion), `workers` at a time (default: min(4, CPUs)); results in input
    order. `on_done(index, result)` is called as each finishes (e.g. to advance a progress bar)."""
    workers = workers or min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for problem, completion in jobs:
        _check_job(problem, completion)
    isolation = isolation or sandbox_isolation.choose()  # probed (or refused) before any thread starts
    results: list[ExecutionResult | None] = [None] * len(jobs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_problem, p, c, timeout, memory_mb, isolation=isolation): i
                   for i, (p, c) in enumerate(jobs)}
        try:
            for future in concurrent.futures.as_completed(futures):
                i = futures[future]
                results[i] = future.result()
                if on_done is not None:
                    on_done(i, results[i])
        except BaseException:  # Ctrl-C: what runs ends within its timeout, what waits never starts
            pool.shutdown(cancel_futures=True)
            raise
    return results  # type: ignore[return-value]
