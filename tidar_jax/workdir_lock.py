"""One writer per output: an exclusive lock on a training workdir, an import's --out directory or distill's --out file.

The lock is a file (WORKDIR/.lock, or OUT.lock beside an output file) holding "PID HOST" of its holder, locked with
`flock`. The kernel drops a flock when its holder dies, however it dies, so a lock file left by a killed process is
free: the next process takes it over, saying whose it was. Liveness therefore needs no PID probing, which would be
wrong across hosts and after PID reuse. On NFS, Linux emulates flock with POSIX byte-range locks that the server
arbitrates (NFSv4, or v3 with lockd), so two hosts exclude each other too; a mount with `nolock` (or `local_lock`)
keeps locks local to one host, and nothing file-based can do better there. Where flock is not supported at all
(ENOLCK, EOPNOTSUPP: some FUSE and Lustre mounts), the file's contents decide instead: a live process of this host
holds it, one of another host is assumed to (the message says how to clear a stale one), a dead one's is taken over.

A released lock file is removed. Removing a flock file races with a process that opened it just before: that
process then holds a lock on an unlinked file, so after locking it checks that the path still names the file it
locked, and starts over if not.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from pathlib import Path

from tidar_jax.config import ConfigError

LOCK_NAME = ".lock"  # the lock file inside a locked directory
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirBusy(ConfigError):
    """Another live process holds the lock on this output."""


def _holder(lock_file: Path) -> tuple[int, str] | None:
    """(pid, host) written in `lock_file`, or None when it is missing, empty or unreadable."""
    try:
        pid, host = lock_file.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether process `pid` of this host exists (a process of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PathLock:
    """The lock on `target` (a directory or a file) through `lock_file`; a context manager.

    `acquire` creates the missing parent directories of `lock_file` (removed again on release if they are still
    empty, so a run refused or failed before writing anything leaves no trace) and raises `WorkdirBusy`, one line
    naming the holder's PID and host, when another live process holds it (ConfigError when the lock file cannot be
    created: a read-only or missing place). `release` removes the lock file.
    """

    def __init__(self, target: str | Path, lock_file: str | Path):
        self.target, self.lock_file = Path(target), Path(lock_file)
        self._fd: int | None = None
        self._created: list[Path] = []

    def _busy(self, holder: tuple[int, str] | None, hint: str = "") -> WorkdirBusy:
        who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
        return WorkdirBusy(f"{self.target} is in use by {who} (lock {self.lock_file}); wait for it to finish or "
                           f"stop it{hint}")

    def _make_parents(self) -> None:
        missing = [p for p in reversed(self.lock_file.parents) if not p.exists()]
        for directory in missing:
            directory.mkdir(exist_ok=True)
            self._created.append(directory)

    def acquire(self) -> PathLock:
        me = (os.getpid(), socket.gethostname())
        try:
            self._make_parents()
            fd = self._locked_fd(me)
        except OSError as e:  # an unwritable place: one line, as for bad input, not a traceback
            self.release()
            raise ConfigError(f"cannot lock {self.target}: {e.strerror or e} ({self.lock_file})") from None
        except WorkdirBusy:
            self.release()
            raise
        previous = _holder(self.lock_file)
        if previous is not None and previous != me:
            print(f"warning: {self.lock_file} was left by process {previous[0]} on {previous[1]}, which no longer "
                  "holds it; taking it over", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{me[0]} {me[1]}\n".encode(), 0)
        self._fd = fd
        return self

    def _locked_fd(self, me: tuple[int, str]) -> int:
        """An fd of the lock file at `self.lock_file`, flock'ed by us (or claimed by its contents where the
        filesystem has no flock); WorkdirBusy when another process holds it."""
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise self._busy(_holder(self.lock_file)) from None
                if e.errno not in _NO_FLOCK:
                    raise
                return self._claim_without_flock(me)
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # the previous holder removed the file while we locked it: lock the new one

    def _claim_without_flock(self, me: tuple[int, str]) -> int:
        """The lock file's fd when its recorded holder is gone (see the module doc); else WorkdirBusy."""
        holder = _holder(self.lock_file)
        if holder is not None and holder != me:
            if holder[1] != me[1]:
                raise self._busy(holder, f"; this filesystem has no flock, so a holder on another host cannot be "
                                         f"checked: remove {self.lock_file} if it is gone")
            if _alive(holder[0]):
                raise self._busy(holder)
        return os.open(self.lock_file, os.O_RDWR)

    def release(self) -> None:
        """Removes the lock file (if held) and the directories `acquire` created that are still empty."""
        if self._fd is not None:
            try:
                self.lock_file.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)  # unlocks: after the unlink, so a waiter never locks a file still at the path
            self._fd = None
        for directory in reversed(self._created):
            try:
                directory.rmdir()
            except OSError:  # not empty (the run wrote into it) or already gone
                break
        self._created = []

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def workdir_lock(workdir: str | Path) -> PathLock:
    """The lock on directory WORKDIR (WORKDIR/.lock): training runs and imports write into it."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"{workdir} exists and is not a directory")
    return PathLock(workdir, workdir / LOCK_NAME)


def file_lock(path: str | Path) -> PathLock:
    """The lock on output file PATH (PATH.lock beside it), e.g. distill's JSONL file."""
    path = Path(path)
    return PathLock(path, path.with_name(path.name + ".lock"))
