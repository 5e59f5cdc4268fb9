"""Operating-system isolation for model-written programs: the command that starts one inside a bubblewrap sandbox.

What a sandboxed program gets (`Isolation.command`), whoever starts it:
- its own mount namespace whose root is an empty read-only tmpfs with, read-only, only /usr, /etc, the merged-/usr
  links (/bin, /lib, ...), the Python installation and environment it runs on and the two sandbox files; a fresh
  /proc of its own PID namespace and a minimal /dev; the only writable place is /tmp (its working directory, HOME
  and TMPDIR), a private tmpfs of TMP_MB that vanishes with it. Nothing of the evaluator's directories, /root,
  /home, /run or the host's /tmp (with their UNIX sockets) is visible;
- its own PID, network (loopback only), IPC and UTS namespaces: it sees no other process, reaches no socket of
  the host, and when the sandbox's first process ends or bwrap is killed (`--die-with-parent`) the kernel kills
  every process left in the namespace, those that started a new session included;
- an unprivileged user, before Python starts: started as root, bwrap sets up the sandbox and hands it to setpriv,
  which becomes uid / gid 65534 (nobody) with no supplementary groups and no capabilities; started as another user,
  bwrap runs as that user. Either way the program ends in a user namespace that cannot make another one (so no
  namespace-root capabilities to attack the kernel with);
- no new privileges (PR_SET_NO_NEW_PRIVS): setuid binaries and file capabilities give nothing.

`choose()` probes which way works here (needs `bwrap` from the bubblewrap package; as root also `setpriv`, from
util-linux), once per process, and otherwise refuses with the reason, unless the caller allows running without OS
isolation (`allow_unsafe`, the CLIs' --unsafe-trusted-code), which is for code one would run anyway.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

SANDBOX_UID = 65534  # nobody
TMP_MB = 64  # size of the sandbox's writable /tmp
LIB_DIR = "/.tidar-sandbox"  # where the runner and the codec appear inside the sandbox
HERE = Path(__file__).resolve().parent
SANDBOX_FILES = ("_sandbox_runner.py", "sandbox_codec.py")
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class SandboxUnavailable(ValueError):
    """No operating-system sandbox works on this machine and running without one was not allowed."""


@dataclasses.dataclass(frozen=True)
class Isolation:
    """How programs are started. name: "bwrap" (as root, handing over to uid 65534), "bwrap-userns" (as the
    calling user, in a user namespace) or "none"; max_processes: the RLIMIT_NPROC a program gets (-1 = unchanged;
    only set where the sandbox has a user of its own, as the limit counts every process of that user)."""

    name: str
    max_processes: int = -1

    def runner(self) -> str:
        """Path of _sandbox_runner.py as the started interpreter sees it."""
        return f"{LIB_DIR}/{SANDBOX_FILES[0]}" if self.name != "none" else str(HERE / SANDBOX_FILES[0])

    def command(self, argv: list[str]) -> list[str]:
        """`argv` (an interpreter command line) wrapped so that it runs isolated (see the module docstring)."""
        if self.name == "none":
            return list(argv)
        if self.name == "bwrap-userns":
            return [*_bwrap_args(userns=True), *argv]
        # bwrap as root builds the sandbox, setpriv hands it to uid 65534, and a second bwrap, as that user, moves
        # it into a user namespace that can make no further one (as the first way does)
        return [*_bwrap_args(userns=False), shutil.which("setpriv"), f"--reuid={SANDBOX_UID}",
                f"--regid={SANDBOX_UID}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
                "--", shutil.which("bwrap"), "--unshare-user", "--disable-userns", "--die-with-parent", "--bind", "/",
                "/", "--dev-bind", "/dev", "/dev", "--", *argv]

    def env(self, workdir: str) -> dict[str, str]:
        """The environment the command starts with (inside bwrap it is replaced by the sandbox's own)."""
        return {**_ENV, "HOME": workdir, "TMPDIR": workdir}

    def describe(self) -> str:
        if self.name == "none":
            return "none (--unsafe-trusted-code: programs run as this user, without OS isolation)"
        user = f"uid {SANDBOX_UID}" if self.name == "bwrap" else f"uid {os.getuid()} in a user namespace"
        return (f"bubblewrap as {user}, no capabilities, no new privileges; own mount (read-only, private /tmp), "
                "PID, network, IPC and UTS namespaces")


def _python_dirs() -> list[str]:
    """The directories the sandbox's interpreter needs (environment, base installation, executable), outermost
    only, leaving out what /usr and /etc already bring."""
    exe = sys.executable
    dirs = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix, os.path.dirname(exe),
            os.path.dirname(os.path.realpath(exe))}
    dirs |= {os.path.realpath(d) for d in dirs}
    covered = ("/usr", "/etc")
    kept: list[str] = []
    for d in sorted(os.path.abspath(d) for d in dirs):
        if not any(d == c or d.startswith(c.rstrip("/") + "/") for c in (*covered, *kept)):
            kept.append(d)
    return kept


def _bwrap_args(userns: bool) -> list[str]:
    args = [shutil.which("bwrap"), "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-net",
            "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if userns:
        args += ["--unshare-user", "--disable-userns"]
    # /tmp first, so that an interpreter installed under /tmp is bound on top of the sandbox's own /tmp
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(TMP_MB * 2**20), "--tmpfs", "/tmp",
             "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
    for link in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    made = {"/", "/tmp"}
    for target in _python_dirs():
        for parent in reversed(Path(target).parents):
            if str(parent) not in made:  # bwrap would make it 0700: the sandbox user could not pass through
                args += ["--perms", "0755", "--dir", str(parent)]
                made.add(str(parent))
        args += ["--ro-bind", target, target]
    args += ["--perms", "0755", "--dir", LIB_DIR]
    for name in SANDBOX_FILES:
        args += ["--ro-bind", str(HERE / name), f"{LIB_DIR}/{name}"]
    args += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp", "--clearenv"]
    for key, value in {**_ENV, "HOME": "/tmp", "TMPDIR": "/tmp"}.items():
        args += ["--setenv", key, value]
    return args + ["--"]


def _probe(isolation: Isolation) -> str | None:
    """None when `isolation` starts this interpreter as the expected user, else why not."""
    expected = SANDBOX_UID if isolation.name == "bwrap" else os.getuid()
    cmd = isolation.command([sys.executable, "-I", "-B", "-c", "import os; print(os.getuid())"])
    try:
        probe = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                               env=isolation.env("/tmp"))
    except (OSError, subprocess.SubprocessError) as e:
        return f"{isolation.name}: {e}"
    if probe.returncode != 0 or probe.stdout.strip() != str(expected):
        lines = (probe.stderr.strip() or f"exit status {probe.returncode}").splitlines()
        return f"{isolation.name}: {lines[-1]}"
    return None


_PROBED: tuple[Isolation | None, str] | None = None  # (the isolation that works, or None and why)
_LOCK = threading.Lock()


def candidates() -> list[Isolation]:
    """The ways to isolate that this machine could support, best first (all need bwrap)."""
    if not sys.platform.startswith("linux") or shutil.which("bwrap") is None:
        return []
    if os.geteuid() == 0:
        return [Isolation("bwrap", max_processes=256)] if shutil.which("setpriv") else []
    return [Isolation("bwrap-userns")]


def _probe_all() -> tuple[Isolation | None, str]:
    reasons = []
    for isolation in candidates():
        reason = _probe(isolation)
        if reason is None:
            return isolation, ""
        reasons.append(reason)
    if not reasons:
        reasons.append("bwrap not found (Debian / Ubuntu: apt-get install bubblewrap)" if shutil.which("bwrap") is None
                       else "running as root needs setpriv (util-linux), which is not found")
    return None, "; ".join(reasons)


def choose(allow_unsafe: bool = False) -> Isolation:
    """The first of `candidates()` that works here (probed once per process). Without one: Isolation("none") when
    `allow_unsafe`, else SandboxUnavailable with the reason."""
    global _PROBED
    with _LOCK:
        if _PROBED is None:
            _PROBED = _probe_all()
    isolation, why = _PROBED
    if isolation is not None:
        return isolation
    if allow_unsafe:
        return Isolation("none")
    raise SandboxUnavailable(f"no operating-system sandbox for model-written code on this machine ({why}); install "
                             "bubblewrap, or pass --unsafe-trusted-code to run the programs unisolated if you trust "
                             "them")
