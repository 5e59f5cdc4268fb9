"""The HumanEval sandbox (tidar_jax/evals/executor.py and sandbox_*.py) against the hostile programs of issue 23's
reliability sweep (cases S1-S29, named so below), plus the attacks its own protocol invites.

Every hostile completion starts with a wrong body (`return a - b` for a test that asserts `candidate(1, 2) == 3`),
so "passed" would be a fake pass; each must end "failed" or "timeout" with nothing changed outside the sandbox: a
sentinel file in the evaluator's directory intact, no file made there or in the host's /tmp, no connection to the
evaluator's UNIX or TCP listener, no signal delivered to the test process, no process left behind.

The verdict tests hold by construction (only plain values cross to the trusted judge), so they also run with
isolation "none"; the escape tests need the operating-system sandbox (bubblewrap; scripts/setup.sh installs it) and
are skipped, saying why, where this machine has none. `test_escapes_are_real_without_isolation` runs the same escape
programs unisolated and checks that they do change the evaluator's directory, so the sandboxed runs pass because
the sandbox stops them, not because the programs do nothing.
"""

import os
import signal
import socket
import uuid

import pytest

from tidar_jax.evals import executor, humaneval, sandbox_codec, sandbox_isolation
from tidar_jax.evals.sandbox_isolation import Isolation, SandboxUnavailable

ADD = {"task_id": "hostile/add", "prompt": 'def add(a, b):\n    """a + b"""\n', "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
WRONG = "    return a - b\n"
NONE = Isolation("none")


def _run(completion, problem=ADD, isolation=NONE, **kw):
    return executor.run_problem(problem, completion, isolation=isolation, **kw)


@pytest.fixture(scope="module")
def sandbox():
    try:
        return sandbox_isolation.choose()
    except SandboxUnavailable as e:
        pytest.skip(f"needs the operating-system sandbox: {e}")


# ----- the plain-value codec ---------------------------------------------------------------------------------------

def test_codec_round_trips_plain_values_and_refuses_everything_else():
    value = [None, True, 0, -7, 2**5000, 1.5, float("inf"), "h\u00e9\n\udc80", b"\x00\xff",
             (1, (2,)), {3, "x"}, frozenset({4}), {1: [2], "k": {(1, 2): frozenset()}}, []]
    back = sandbox_codec.loads(sandbox_codec.dumps(value))
    assert back == value and [type(v) for v in back] == [type(v) for v in value]
    assert type(back[-2]) is dict and type(next(iter(back[-2]["k"]))) is tuple

    class Liar(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__

    loop = []
    loop.append(loop)
    for bad in (Liar(1), [Liar(1)], {"k": 1j}, object(), loop, range(3)):
        with pytest.raises(sandbox_codec.NotPlain):
            sandbox_codec.dumps(bad)
    for line in (b"[" * 100_000, b"\x80", b'{"tuple": 1}', b'{"set": [[1]]}', b'{"dict": [[1]]}', b'{"a": 1, "b": 2}',
                 b'{"__class__": "Liar"}', b"\x80\x04K\x03.", b"9" * 5000, b'{"int": "zz"}'):
        with pytest.raises(sandbox_codec.WireError):
            sandbox_codec.loads(line)


# ----- verdicts: correct passes, wrong fails, nothing fakes a pass ------------------------------------------------

VERDICT = b'{"status": "passed", "detail": ""}\n'
FAKE_PASSES = {
    # S19: the old runner's nonce and result fd sat in a frame above the program; there is nothing to find now, so
    # the program writes a passing verdict to every descriptor it can name and exits 0.
    "S19 forged verdict on every descriptor": WRONG + (
        "import os, sys\n"
        "fds, f = set(range(64)), sys._getframe()\n"
        "while f is not None:\n"
        "    fds |= {v for v in f.f_locals.values() if type(v) is int and 0 <= v < 4096}\n"
        "    f = f.f_back\n"
        "for fd in sorted(fds):\n"
        f"    for line in ({VERDICT!r}, b'passed\\n', b'[\"ready\"]\\n'):\n"
        "        try:\n"
        "            os.write(fd, line)\n"
        "        except OSError:\n"
        "            pass\n"
        "os._exit(0)\n"),
    # S20: the classic always-equal result object.
    "S20 int subclass equal to everything": (
        "    class Liar(int):\n"
        "        def __eq__(self, other):\n"
        "            return True\n"
        "        __hash__ = int.__hash__\n"
        "    return Liar(a - b)\n"),
    # S21: os._exit / sys.exit replaced by a function that forges a verdict and exits 0 once the test has failed.
    "S21 patched exits forge a verdict": WRONG + (
        "import os, sys\n"
        "real_exit = os._exit\n"
        "def fake_exit(code=0):\n"
        "    for fd in range(64):\n"
        "        try:\n"
        f"            os.write(fd, {VERDICT!r})\n"
        "        except OSError:\n"
        "            pass\n"
        "    real_exit(0)\n"
        "os._exit = sys.exit = fake_exit\n"),
    # The runner's reply channel, found from its frame: a reply nested too deep to decode, and a pickle.
    "malformed replies": (
        "    import os, pickle, sys\n"
        "    fd = sys._getframe(1).f_locals['replies']\n"
        "    os.write(fd, b'[' * 200000 + b'\\n')\n"
        "    os.write(fd, pickle.dumps(3) + b'\\n')\n"
        "    return a - b\n"),
    "reply larger than the judge reads": "    return 'x' * (17 * 2**20)\n",
    # S22-S26: early exits, patched exit helpers, a changed environment, a guessed verdict on stdout
    "S22 SystemExit(0) on load": WRONG + "raise SystemExit(0)\n",
    "S23 exit helpers replaced and called": WRONG + "import sys, builtins\nsys.exit = builtins.exit = lambda *a: None\n"
                                                    "sys.exit(0)\nexit(0)\n",
    "S24 os._exit(0) on load": WRONG + "import os\nos._exit(0)\n",
    "S24 os._exit(0) in the call": "    import os\n    os._exit(0)\n",
    "S25 environment and modules changed": WRONG + "import os, sys\nos.environ['X'] = '1'\n"
                                                   "sys.modules['unittest'] = None\n",
    "S26 a verdict printed": WRONG + f"import os\nos.write(1, {VERDICT!r})\nprint('passed')\n",
    "S27 40 MB of output": WRONG + "import sys\nsys.stdout.write('x' * (40 * 2**20))\n",
    "S11 memory": WRONG + "x = bytearray(20 * 2**30)\n",
    "a returned NaN": "    return float('nan')\n",
}


@pytest.mark.parametrize("isolation", ["none", "sandbox"])
def test_no_wrong_solution_passes(isolation, request):
    iso = NONE if isolation == "none" else request.getfixturevalue("sandbox")
    jobs = [(ADD, "    return a + b\n"), (ADD, WRONG)] + [(ADD, c) for c in FAKE_PASSES.values()]
    results = executor.run_problems(jobs, timeout=10, workers=2, isolation=iso)
    statuses = {name: r.status for name, r in zip(FAKE_PASSES, results[2:])}
    assert results[0].status == "passed" and results[1].status == "failed", (results[0], results[1])
    assert statuses == {name: "failed" for name in FAKE_PASSES}, {n: r.detail for n, r in zip(FAKE_PASSES, results[2:])}
    detail = dict(zip(FAKE_PASSES, (r.detail for r in results[2:])))
    assert "not plain data" in detail["S20 int subclass equal to everything"]
    assert "malformed reply" in detail["malformed replies"]
    assert "more than" in detail["reply larger than the judge reads"]
    assert "does not load: SystemExit" in detail["S22 SystemExit(0) on load"]
    assert "exited" in detail["S24 os._exit(0) in the call"]
    assert "MemoryError" in detail["S11 memory"]


def test_helpers_tests_use_are_the_problems_not_the_completions():
    """HumanEval/32 checks `poly(coeffs, candidate(coeffs))`; a completion that redefines `poly` to return 0 and
    returns a wrong root must fail, and the canonical solution pass."""
    problem = humaneval.load_problems()[32]
    cheat = "    return 0.123\n\n\ndef poly(xs, x):\n    return 0\n"
    results = executor.run_problems([(problem, problem["canonical_solution"]), (problem, cheat)], isolation=NONE)
    assert [r.status for r in results] == ["passed", "failed"]


def test_timeouts_hold_whatever_the_test_code_catches():
    swallow = {**ADD, "test": "def check(candidate):\n    try:\n        assert candidate(1, 2) == 3\n"
                              "    except BaseException:\n        pass\n"}
    loop = _run("    while True:\n        pass\n", swallow, timeout=1.0)
    assert loop.status == "timeout" and 1.0 <= loop.duration_s < 3.0
    died = _run("    import os\n    os._exit(3)\n", swallow)
    assert died.status == "failed" and "exited" in died.detail
    slow = _run("    import time\n    time.sleep(30)\n", timeout=20, call_timeout=0.5)  # per call, not per program
    assert slow.status == "timeout" and slow.duration_s < 3.0
    load = _run(WRONG + "import time\ntime.sleep(30)\n", timeout=0.5)  # loading counts towards the timeout
    assert load.status == "timeout" and "loading" in load.detail


def test_candidate_exceptions_reach_the_test_as_builtin_exceptions():
    expects = {**ADD, "test": "def check(candidate):\n    try:\n        candidate(1, 0)\n"
                              "    except ZeroDivisionError:\n        return\n    assert False\n"}
    assert _run("    return a // b\n", expects).status == "passed"
    custom = _run("    class Odd(Exception):\n        pass\n    raise Odd('no')\n")
    assert custom.status == "failed" and "CandidateError: Odd: no" in custom.detail


# ----- escapes: nothing outside the sandbox changes ----------------------------------------------------------------

PRELUDE = ("import os, signal, socket, subprocess\n"
           "def attempt(f):\n"
           "    try:\n"
           "        f()\n"
           "    except Exception as e:\n"
           "        print('blocked:', type(e).__name__, e)\n")
ESCAPES = {
    "S1 open for writing": "attempt(lambda: open(EVAL + '/escape_open', 'w').write('x'))",
    "S2 create through dir_fd": "attempt(lambda: os.close(os.open('escape_dirfd', os.O_WRONLY | os.O_CREAT, 0o644, "
                                "dir_fd=os.open(EVAL, os.O_RDONLY))))",
    "S3 mkfifo": "attempt(lambda: os.mkfifo(EVAL + '/escape_fifo'))",
    "S4 sqlite3": "attempt(lambda: __import__('sqlite3').connect(EVAL + '/escape.sqlite')"
                  ".execute('create table t (x)'))",
    "S7 os.system": "os.system('touch ' + EVAL + '/escape_system')",
    "S8 S9 subprocess and spawn": "attempt(lambda: subprocess.run(['touch', EVAL + '/escape_subprocess']))\n"
                                  "attempt(lambda: os.waitpid(os.posix_spawn('/usr/bin/touch', "
                                  "['touch', EVAL + '/escape_spawn'], {}), 0))",
    "S13 remove": "attempt(lambda: os.remove(EVAL + '/victim.txt'))",
    "S14 remove through dir_fd": "attempt(lambda: os.remove('victim.txt', dir_fd=os.open(EVAL, os.O_RDONLY)))",
    "S6 S16 sockets and signals": "attempt(lambda: socket.socket(socket.AF_UNIX).connect(UNIX))\n"
                                  "attempt(lambda: socket.create_connection(('127.0.0.1', PORT), timeout=1))\n"
                                  "attempt(lambda: os.kill(PID, signal.SIGUSR1))",
    "host /tmp": "attempt(lambda: open('/tmp/escape_' + TOKEN, 'w').write('x'))",
}


@pytest.fixture
def evaluator(tmp_path):
    """The evaluator's side: a sentinel file, a world-writable UNIX socket and a TCP socket listening, SIGUSR1
    counted; `changes()` lists what differs from that afterwards."""
    (tmp_path / "victim.txt").write_text("keep")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "evaluator.sock"))
    os.chmod(tmp_path / "evaluator.sock", 0o777)  # so that only the sandbox, not file modes, keeps a program out
    tcp = socket.create_server(("127.0.0.1", 0))
    for s in (unix, tcp):
        s.listen(8)
        s.setblocking(False)
    signals = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: signals.append(1))
    token = uuid.uuid4().hex
    names = {"EVAL": str(tmp_path), "UNIX": str(tmp_path / "evaluator.sock"), "PORT": tcp.getsockname()[1],
             "PID": os.getpid(), "TOKEN": token}

    def changes() -> list[str]:
        found = sorted(set(os.listdir(tmp_path)) - {"victim.txt", "evaluator.sock"})
        if not (tmp_path / "victim.txt").exists():
            found.append("victim.txt deleted")
        for name, s in (("unix", unix), ("tcp", tcp)):
            try:
                s.accept()[0].close()
                found.append(f"{name} connection")
            except BlockingIOError:
                pass
        found += ["SIGUSR1"] * len(signals)
        if os.path.exists(f"/tmp/escape_{token}"):
            os.remove(f"/tmp/escape_{token}")
            found.append("host /tmp file")
        return found

    yield "".join(f"{k} = {v!r}\n" for k, v in names.items()), changes, token
    signal.signal(signal.SIGUSR1, previous)
    unix.close()
    tcp.close()


def _escape_jobs(names: str) -> list[tuple[dict, str]]:
    return [(ADD, WRONG + names + PRELUDE + code + "\n") for code in ESCAPES.values()]


def test_escapes_are_contained(sandbox, evaluator):
    names, changes, _ = evaluator
    results = executor.run_problems(_escape_jobs(names), timeout=10, workers=2, isolation=sandbox)
    assert {n: r.status for n, r in zip(ESCAPES, results)} == {n: "failed" for n in ESCAPES}
    assert changes() == []
    said = dict(zip(ESCAPES, (r.output for r in results)))  # why each attempt failed: the sandbox, not a typo
    assert "blocked: FileNotFoundError" in said["S2 create through dir_fd"]  # the evaluator's folder is not there
    assert said["S6 S16 sockets and signals"].split("blocked: ")[1:] == [  # no such socket file, own loopback, own
        "FileNotFoundError [Errno 2] No such file or directory\n",  # PID namespace
        "ConnectionRefusedError [Errno 111] Connection refused\n", "ProcessLookupError [Errno 3] No such process\n"]


def test_escapes_are_real_without_isolation(evaluator):
    names, changes, _ = evaluator
    results = executor.run_problems(_escape_jobs(names), timeout=10, workers=2, isolation=NONE)
    assert all(r.status == "failed" for r in results)  # the verdict holds even here; the machine does not
    assert changes() == ["escape.sqlite", "escape_dirfd", "escape_fifo", "escape_open", "escape_spawn",
                         "escape_subprocess", "escape_system", "victim.txt deleted", "unix connection",
                         "tcp connection", "SIGUSR1", "host /tmp file"]


def _processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_no_process_survives_the_timeout(sandbox, evaluator):
    """S18: a process in a new session (which left the killed process group before) and a double-forked daemon."""
    names, changes, token = evaluator
    sleep = f"47.{int(token, 16) % 10**9}"  # a unique argument to find it by
    program = WRONG + names + (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen(['sleep', {sleep!r}], start_new_session=True)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', TOKEN], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', TOKEN])\n"
        "    os._exit(0)\n"
        "time.sleep(0.5)\n"
        "while True:\n"
        "    pass\n")
    result = _run(program, isolation=sandbox, timeout=2.0)
    assert result.status == "timeout"
    assert _processes_with(token) == _processes_with(sleep) == [] and changes() == []


SEES = """
import os, socket, subprocess
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
mounts = [line.split() for line in open("/proc/self/mounts")]  # device, mount point, type, options, ...
rw = [m[1] for m in mounts if "rw" in m[3].split(",") and not m[1].startswith("/proc")]


def readable(path):
    try:
        open(path, "rb").read(1)
        return True
    except OSError:
        return os.path.isdir(path)


SEEN = {
    "uid": os.getuid(), "groups": os.getgroups(), "caps": status["CapEff"].strip(),
    "no_new_privs": status["NoNewPrivs"].strip(), "pids": len([p for p in os.listdir("/proc") if p.isdigit()]),
    "interfaces": [name for _, name in socket.if_nameindex()],
    "new_user_namespace": subprocess.run(["unshare", "--user", "true"], capture_output=True).returncode == 0,
    "writable": [d for point in rw if os.path.isdir(point) for d, _, _ in os.walk(point) if os.access(d, os.W_OK)],
    "visible": [p for p in ("/etc/shadow", "/root/.bashrc", "/home", "/run", EVAL, SOURCE) if readable(p)],
}
"""


def test_what_the_sandboxed_program_sees(sandbox, evaluator):
    """An unprivileged user without capabilities or new privileges, alone in its PID namespace, loopback only,
    nothing writable but /tmp (everything else is on read-only mounts), none of the evaluator's files (S5 read
    /etc/shadow, /root and the evaluator's source)."""
    names, _, _ = evaluator
    as_root = sandbox.name == "bwrap"  # then a second bwrap, as uid 65534, runs in the PID namespace too
    expected = {"uid": sandbox_isolation.SANDBOX_UID if as_root else os.getuid(), "caps": "0000000000000000",
                "no_new_privs": "1", "pids": 3 if as_root else 2, "interfaces": ["lo"],
                "new_user_namespace": False, "writable": ["/tmp"], "visible": []}
    if as_root:  # as another user, that user's groups stay (shown as the overflow gid in the user namespace)
        expected["groups"] = []
    probe = {"task_id": "probe", "prompt": "def probe():\n", "entry_point": "probe",
             "test": f"def check(candidate):\n    seen = candidate()\n"
                     f"    seen = {{k: seen[k] for k in {list(expected)}}}\n    assert seen == {expected!r}, seen\n"}
    program = "    return SEEN\n" + names + f"SOURCE = {executor.__file__!r}\n" + SEES
    result = _run(program, probe, isolation=sandbox)
    assert result.status == "passed", result.detail
