"""One writer per output (tidar_jax/workdir_lock.py), with real processes: a second process is refused with the
holder's PID, by the library and by train.train, train.distill and train.import_checkpoint (exit 2, one line,
nothing written); a lock left by a killed process is taken over with a message; a released lock leaves nothing."""

import errno
import fcntl
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from tidar_jax.workdir_lock import LOCK_NAME, WorkdirBusy, file_lock, workdir_lock

HOLDER = textwrap.dedent("""
    import sys
    from tidar_jax.workdir_lock import file_lock, workdir_lock

    kind, path = sys.argv[1], sys.argv[2]
    lock = (workdir_lock if kind == "dir" else file_lock)(path).acquire()
    print("LOCKED", flush=True)
    sys.stdin.read()  # hold until the test closes our stdin (or kills us)
    lock.release()
""")


@pytest.fixture
def holder(repo_root):
    """Starts a process holding the lock of (kind, path); yields the Popen. Killed at the end if still alive."""
    started = []

    def start(kind, path):
        env = dict(os.environ, PYTHONPATH=repo_root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, kind, str(path)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=env)
        started.append(proc)
        assert proc.stdout.readline().strip() == "LOCKED"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_second_process_is_refused_then_takes_over_a_killed_holders_lock(holder, tmp_path, capsys):
    workdir = tmp_path / "run"
    proc = holder("dir", workdir)
    host = socket.gethostname()
    with pytest.raises(WorkdirBusy, match=f"{workdir} is in use by process {proc.pid} on {host}"):
        workdir_lock(workdir).acquire()
    assert (workdir / LOCK_NAME).read_text().split() == [str(proc.pid), host]  # the refusal changed nothing

    proc.kill()  # SIGKILL: no cleanup, the lock file stays behind with the dead holder's PID
    proc.wait(timeout=60)
    assert (workdir / LOCK_NAME).exists()
    capsys.readouterr()
    with workdir_lock(workdir):
        assert (workdir / LOCK_NAME).read_text().split() == [str(os.getpid()), host]
        err = capsys.readouterr().err
        assert f"was left by process {proc.pid} on {host}" in err and "taking it over" in err
    assert files_under(workdir) == []  # released: the lock file is gone


def test_a_released_lock_is_free_and_leaves_no_trace(holder, tmp_path):
    out = tmp_path / "new" / "dir" / "d.jsonl"
    proc = holder("file", out)
    with pytest.raises(WorkdirBusy, match=f"process {proc.pid}"):
        file_lock(out).acquire()
    proc.stdin.close()  # the holder releases and exits normally
    assert proc.wait(timeout=60) == 0
    assert not (tmp_path / "new").exists()  # its lock file and the directories it created for it are gone
    with file_lock(out):
        assert out.with_name("d.jsonl.lock").exists()
    assert not (tmp_path / "new").exists()


@pytest.fixture(scope="module")
def tokenizer_file(tiny_config, tmp_path_factory):
    from tidar_jax.data.pipeline import load_or_train_tokenizer

    path = tmp_path_factory.mktemp("lock_tok") / "tokenizer.json"
    load_or_train_tokenizer(tiny_config).save(path)
    return path


@pytest.mark.parametrize("tool", ["train", "distill", "import"])
def test_clis_refuse_an_output_another_process_holds(holder, tool, repo_root, tokenizer_file, tmp_path, capsys):
    """The sweep's T3 (two train.train on one workdir deleted each other's checkpoints) and its kin: the second
    process exits 2 with one line naming the holder, having written nothing (distill and import: before reading
    the model)."""
    workdir = tmp_path / "out"
    if tool == "train":
        from train.train import main

        proc = holder("dir", workdir)
        argv = ["--config", os.path.join(repo_root, "configs", "tiny.yaml"), "--workdir", str(workdir),
                f"data.tokenizer={tokenizer_file}", "--no-progress"]
    elif tool == "distill":
        from train.distill import main

        proc = holder("file", workdir / "d.jsonl")
        argv = ["--checkpoint", str(tmp_path / "never_read"), "--out", str(workdir / "d.jsonl"), "--no-progress"]
    else:
        from train.import_checkpoint import main

        proc = holder("dir", workdir)
        argv = ["--from", "hf", str(tmp_path), "--out", str(workdir)]
    before = files_under(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is in use by process {proc.pid} on {socket.gethostname()}" in err[0], err
    assert files_under(tmp_path) == before


def test_without_flock_the_recorded_holder_decides(tmp_path, monkeypatch, capsys):
    """Filesystems without flock (ENOLCK): a live process of this host holds the lock, one of another host is
    assumed to (with how to clear it), a dead one's is taken over."""
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock_file = workdir / LOCK_NAME
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        lock_file.write_text(f"{live.pid} {host}\n")
        with pytest.raises(WorkdirBusy, match=f"process {live.pid} on {host}"):
            workdir_lock(workdir).acquire()
    finally:
        live.kill()
        live.wait(timeout=60)
    lock_file.write_text("123 another-host\n")
    with pytest.raises(WorkdirBusy, match=f"process 123 on another-host.*remove {lock_file} if it is gone"):
        workdir_lock(workdir).acquire()
    lock_file.write_text(f"{live.pid} {host}\n")  # now dead
    with workdir_lock(workdir):
        assert f"left by process {live.pid}" in capsys.readouterr().err
    assert not lock_file.exists()
