"""The trusted side of one HumanEval execution: runs the problem's own test code here and the model's code in the
sandbox, and decides the verdict here, where the model's code cannot reach it.

    python -I -B sandbox_judge.py        (a job on stdin, the verdict on stdout; both one JSON object)

job: {"prompt", "completion", "test", "entry_point", "timeout", "call_timeout", "command", "env", "cwd", "output",
      "reap"}
verdict: {"status": "passed" | "failed" | "timeout", "detail": why, in words}

The judge builds its namespace from the problem's prompt and test only (so helpers a test uses, such as
HumanEval/32's `poly`, are the problem's, whatever the completion redefines), binds the entry point to a proxy and
calls `check(proxy)`. The proxy sends each call's arguments to the sandboxed runner (`command`, which starts
_sandbox_runner.py inside the operating-system sandbox, with `prompt + completion` as its program) and returns
what comes back, through sandbox_codec.py: only plain builtin values cross, so no object with forged comparisons and
no message can make a wrong answer pass. A candidate exception is raised here as the builtin exception of that name
(other names as CandidateError). The program passes only when `check` returns; it times out when it is still running
`timeout` seconds after the judge started (all calls and the program's loading included) or a single call takes
longer than `call_timeout`; a runner that dies, answers out of protocol or sends more than MAX_MESSAGE bytes fails
it, even if the test code catches the exception that reports it. The runner is killed before the verdict is written;
with `reap` (an isolation with a PID namespace) the judge is a child subreaper and writes the verdict only once
every process of the sandbox is gone.

Stdlib only and never imported by the evaluator: it is started as a fresh interpreter per program, so the test code
of one problem shares no state with another or with the evaluator.
"""

import builtins
import ctypes
import importlib.util
import json
import os
import select
import subprocess
import sys
import time
import traceback

MAX_MESSAGE = 16 * 2**20  # bytes of one reply; a larger one fails the program
MAX_DETAIL = 2000  # characters of the verdict's explanation
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_TEST_FILE = "<test>"


def _load_codec():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_codec.py")
    spec = importlib.util.spec_from_file_location("sandbox_codec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


codec = _load_codec()


class CandidateError(Exception):
    """The candidate raised an exception that is not a builtin one (its name and message are in the text)."""


class _Broken(BaseException):
    """The sandboxed program can no longer answer (killed at a timeout, died, broke the protocol). A BaseException,
    so that `except Exception` in test code does not swallow it; the verdict does not depend on that anyway."""


class Runner:
    """The sandboxed program: one process started from `command`, spoken to in sandbox_codec lines."""

    def __init__(self, job: dict, deadline: float):
        self.deadline, self.call_timeout, self.reap = deadline, job["call_timeout"], job["reap"]
        self.broken: tuple[str, str] | None = None  # (status, detail) once the runner is unusable
        self._buffer = bytearray()  # what the runner sent beyond the last complete line
        with open(job["output"], "ab") as output:
            self.proc = subprocess.Popen(job["command"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=output, env=job["env"], cwd=job["cwd"], close_fds=True)
        for pipe in (self.proc.stdin, self.proc.stdout):
            os.set_blocking(pipe.fileno(), False)

    def kill(self) -> None:
        """Kills the runner; with `reap` returns only once every process of its sandbox is gone."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        # bwrap's PID-namespace init dies with it (--die-with-parent), but asynchronously; its exit waits for the
        # kernel to have killed every process of the namespace, and as a subreaper this process reaps it.
        while self.reap:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break

    def _break(self, status: str, detail: str):
        self.broken = self.broken or (status, detail)
        self.kill()
        return _Broken(detail)

    def _wait(self, fd: int, write: bool, until: float, doing: str) -> None:
        left = until - time.monotonic()
        ready = select.select([], [fd], [], max(left, 0))[1] if write else select.select([fd], [], [], max(left, 0))[0]
        if not ready:
            raise self._break("timeout", f"timed out {doing}")

    def exchange(self, message, doing: str, timeout: float | None = None):
        """Sends `message`, returns the reply (a plain value); raises _Broken when the runner cannot answer."""
        if self.broken:
            raise _Broken(self.broken[1])
        until = min(self.deadline, time.monotonic() + timeout) if timeout else self.deadline
        data, fd = codec.dumps(message), self.proc.stdin.fileno()
        while data:
            self._wait(fd, True, until, doing)
            try:
                data = data[os.write(fd, data):]
            except BrokenPipeError:
                raise self._break("failed", f"the program exited {doing}") from None
        fd, end = self.proc.stdout.fileno(), self._buffer.find(b"\n")
        while end < 0 and len(self._buffer) <= MAX_MESSAGE:
            self._wait(fd, False, until, doing)
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise self._break("failed", f"the program exited {doing}")
            end = chunk.find(b"\n")
            end = end + len(self._buffer) if end >= 0 else -1
            self._buffer += chunk
        if not 0 <= end <= MAX_MESSAGE:
            raise self._break("failed", f"the program sent more than {MAX_MESSAGE} bytes {doing}")
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        try:
            return codec.loads(line)
        except codec.WireError as e:
            raise self._break("failed", f"malformed reply {doing}: {e}") from None

    def call(self, name: str, args: tuple, kwargs: dict):
        """The entry point's return value for (args, kwargs), or the candidate's exception raised here."""
        reply = self.exchange(["call", list(args), kwargs], f"in a call to {name}", self.call_timeout)
        if type(reply) is list and len(reply) == 2 and reply[0] == "return":
            return reply[1]
        if type(reply) is list and len(reply) == 3 and reply[0] == "raise" and type(reply[1]) is str \
                and type(reply[2]) is str:
            raise _exception(reply[1], reply[2])
        raise self._break("failed", f"out-of-protocol reply to a call to {name}")


def _exception(name: str, text: str) -> Exception:
    """The exception to raise in the test code for a candidate's exception called `name` with message `text`."""
    cls = getattr(builtins, name, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(text)
        except Exception:  # a builtin that needs other arguments (UnicodeDecodeError, ...)
            pass
    return CandidateError(f"{name}: {text}")


def _trusted_namespace(job: dict) -> dict:
    """The problem's prompt (its helpers; a body-less entry point gets `pass` so the prompt compiles) and test."""
    prompt = job["prompt"]
    try:
        compile(prompt, "<prompt>", "exec")
    except SyntaxError:
        prompt += "    pass\n"
    namespace = {"__name__": "__judge__", "__builtins__": builtins}
    exec(compile(prompt, "<prompt>", "exec"), namespace)
    exec(compile(job["test"], _TEST_FILE, "exec"), namespace)
    return namespace


def _where(error: BaseException) -> str:
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == _TEST_FILE]
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return f"{text} (test line {lines[-1]})" if lines else text


def judge(job: dict) -> dict:
    """The verdict of one job (see the module docstring)."""
    deadline = time.monotonic() + job["timeout"]
    try:
        namespace = _trusted_namespace(job)
        check = namespace["check"]
    except Exception as e:
        return {"status": "failed", "detail": f"the problem's own prompt / test code does not run: {_where(e)}"}
    runner = Runner(job, deadline)
    try:
        try:
            reply = runner.exchange(["program", job["prompt"] + job["completion"]], "while loading the program")
        except _Broken:
            return {"status": runner.broken[0], "detail": runner.broken[1]}
        if reply != ["ready"]:
            text = reply[1] if type(reply) is list and len(reply) == 2 and type(reply[1]) is str else "?"
            return {"status": "failed", "detail": f"the program does not load: {text}"}

        name = job["entry_point"]

        def candidate(*args, **kwargs):
            return runner.call(name, args, kwargs)

        candidate.__name__ = candidate.__qualname__ = name
        namespace[name] = candidate
        try:
            check(candidate)
            error = None
        except BaseException as e:  # the test's verdict on the candidate (SystemExit in test code included)
            error = e
        if runner.broken:  # whatever the test code made of it
            return {"status": runner.broken[0], "detail": runner.broken[1]}
        if error is not None:
            return {"status": "failed", "detail": _where(error)}
        return {"status": "passed", "detail": ""}
    finally:
        runner.kill()


def main() -> None:
    job = json.loads(sys.stdin.read())
    # orphans of the sandbox (its PID-namespace init first) become this process's children
    if job["reap"] and ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    verdict_fd = os.dup(1)
    os.dup2(2, 1)  # whatever the test code prints goes to stderr, not into the verdict
    verdict = judge(job)
    verdict["detail"] = verdict["detail"][:MAX_DETAIL]  # it may quote what the program returned or said
    os.write(verdict_fd, json.dumps(verdict).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
