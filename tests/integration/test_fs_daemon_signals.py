"""What the mount daemon does on SIGTERM, SIGINT and SIGHUP, on real FUSE mounts.

``systemctl stop`` sends SIGTERM: the daemon closed /dev/fuse and detached the mount at once,
so a process still writing got ENOTCONN and, with ``-o writeback_cache``, the bytes the kernel
had already acknowledged to it were lost. SIGHUP (logrotate) unmounted the volume. Now a stop
unmounts as umount(8) would, and a busy mount is detached and served until its last user is
gone; a second stop request stops at once; SIGHUP opens the log file again.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.fs_helpers import (
    STUB,
    Mount,
    daemon_script,
    is_mounted,
    make_volume,
    stop_daemon,
)

DEADLINE = 15.0


class Daemon:
    """The stub mount daemon run as systemd runs ``kmsfs mount --foreground``: in the
    foreground, $NOTIFY_SOCKET set; what it tells systemd is collected in :attr:`notified`."""

    def __init__(self, cipherdir: Path, mountpoint: Path, log: Path, *args: str) -> None:
        self.mountpoint, self.log = mountpoint, log
        mountpoint.mkdir(exist_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(log.with_suffix(".notify")))
        self._sock.settimeout(DEADLINE)
        env = {**os.environ, "NOTIFY_SOCKET": str(log.with_suffix(".notify"))}
        with open(log.with_suffix(".stderr"), "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(STUB), str(cipherdir), str(mountpoint), *args],
                stdout=subprocess.PIPE, stderr=stderr, env=env,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == b"ready", self.output()
        assert "READY=1" in self.recv()

    def recv(self) -> str:
        return self._sock.recv(4096).decode()

    def output(self) -> str:
        """What it logged (to the log file if it has one, else to stderr)."""
        where = self.log if self.log.exists() else self.log.with_suffix(".stderr")
        return where.read_text(errors="replace") if where.exists() else ""

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def close(self) -> None:
        stop_daemon(self.proc, self.mountpoint)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self._sock.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``daemon(*stub_args)``: a started :class:`Daemon` on a fresh volume; all stopped."""
    started: list[Daemon] = []
    volume = make_volume(tmp_path / "cipher")

    def start(*args: str) -> Daemon:
        d = Daemon(volume, tmp_path / "mnt", tmp_path / "kmsfs.log", *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def wait_for(what: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def remounted_read(tmp_path: Path, name: str) -> bytes:
    """*name* read back through a new mount of the same volume (a new daemon)."""
    again = Mount(tmp_path / "cipher", tmp_path / "again", tmp_path / "again.log").start()
    try:
        return (tmp_path / "again" / name).read_bytes()
    finally:
        again.stop()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stop_request_on_a_busy_mount_serves_the_writer_to_the_end(
    daemon: Callable[..., Daemon], tmp_path: Path, stop: int
) -> None:
    """systemctl stop (SIGTERM) with a writer still at work and ``-o writeback_cache``: the
    writer's 200,000 acknowledged bytes were lost (the file had 0 bytes after a remount) and
    its next write failed with ENOTCONN. Now the mount leaves the namespace at once (detached,
    like ``umount -l``), the writer keeps writing until it closes, the daemon then exits 0 and
    every byte is on disk."""
    d = daemon("-o", "writeback_cache")
    before, after = os.urandom(200_000), os.urandom(300_000)
    fd = os.open(d.mountpoint / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, before) == len(before)  # in the page cache, not fsync'd
        d.signal(stop)
        assert "STOPPING=1" in d.recv()
        assert wait_for(lambda: not is_mounted(d.mountpoint)), "still mounted"
        assert "STATUS=detached" in d.recv()
        time.sleep(0.3)
        assert d.proc.poll() is None, d.output()  # serving its last user
        for start in range(0, len(after), 50_000):
            assert os.write(fd, after[start:start + 50_000]) == 50_000
    finally:
        os.close(fd)
    assert d.proc.wait(timeout=DEADLINE) == 0, d.output()
    log = d.output()
    assert f"{d.mountpoint} is busy: detaching it" in log, log
    assert "unmounted" in log and "again" not in log
    assert remounted_read(tmp_path, "big") == before + after


def test_a_working_directory_in_the_mount_keeps_it_served_after_a_sigterm(
    daemon: Callable[..., Daemon],
) -> None:
    """A shell whose directory is in the mount is a user too: it keeps reading and writing
    there (the old daemon gave it ENOTCONN at once), and its exit ends the daemon."""
    d = daemon()
    (d.mountpoint / "notes").write_text("kept\n")
    shell = subprocess.Popen(
        ["sh", "-c", "echo started; read go; cat notes; echo more >> notes; cat notes"],
        cwd=d.mountpoint, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert shell.stdout is not None
        # Once it runs: a shell that starts in a detached directory cannot say where it is
        # (sh: getcwd() failed), which is no concern of the daemon's.
        assert shell.stdout.readline() == "started\n"
        d.signal(signal.SIGTERM)
        assert wait_for(lambda: not is_mounted(d.mountpoint)), "still mounted"
        assert d.proc.poll() is None, d.output()
        out, err = shell.communicate("go\n", timeout=DEADLINE)
    finally:
        if shell.poll() is None:
            shell.kill()
            shell.communicate()
    assert (out, err, shell.returncode) == ("kept\nkept\nmore\n", "", 0)
    assert d.proc.wait(timeout=DEADLINE) == 0, d.output()


def test_a_second_stop_request_on_a_busy_mount_stops_at_once(
    daemon: Callable[..., Daemon],
) -> None:
    """The first SIGTERM waits for a busy mount's users; a second one (or Ctrl-C) is the
    administrator's way out: the daemon stops at once, exit 0, its users left with ENOTCONN."""
    d = daemon()
    holder = os.open(d.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        d.signal(signal.SIGTERM)
        assert wait_for(lambda: not is_mounted(d.mountpoint)), "still mounted"
        time.sleep(0.3)
        assert d.proc.poll() is None, d.output()
        os.listdir(holder)  # still served
        d.signal(signal.SIGINT)
        assert d.proc.wait(timeout=5) == 0, d.output()
        with pytest.raises(OSError):
            os.listdir(holder)
    finally:
        os.close(holder)
    assert "SIGINT again: stopping at once" in d.output()


def test_a_sigterm_on_an_idle_mount_unmounts_it_at_once(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    d = daemon("-o", "writeback_cache")
    (d.mountpoint / "f").write_bytes(b"x" * 100_000)
    d.signal(signal.SIGTERM)
    assert "STOPPING=1" in d.recv()
    assert d.proc.wait(timeout=5) == 0, d.output()
    assert not is_mounted(d.mountpoint)
    log = d.output()
    assert "SIGTERM: unmounting" in log and "unmounted" in log and "busy" not in log, log
    assert remounted_read(tmp_path, "f") == b"x" * 100_000


def test_sighup_reopens_the_log_file_and_the_mount_stays(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """logrotate moves the log aside and sends SIGHUP, as for kmsfs-hsmd: the daemon
    unmounted the volume. Now it goes on logging in a new file at the old path (0600)."""
    log = tmp_path / "kmsfs.log"
    d = daemon("--log-file", str(log))
    (d.mountpoint / "f").write_text("before")
    rotated = log.with_name("kmsfs.log.1")
    os.rename(log, rotated)
    d.signal(signal.SIGHUP)
    assert wait_for(lambda: log.exists() and "reopened" in log.read_text()), rotated.read_text()
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    time.sleep(0.3)
    assert d.proc.poll() is None and is_mounted(d.mountpoint)
    assert (d.mountpoint / "f").read_text() == "before"
    (d.mountpoint / "f").write_text("after")
    d.signal(signal.SIGTERM)
    assert d.proc.wait(timeout=DEADLINE) == 0
    assert "mounted" in rotated.read_text() and "unmounted" not in rotated.read_text()
    assert "unmounted" in log.read_text()
    assert remounted_read(tmp_path, "f") == b"after"


def test_sighup_without_a_log_file_is_noted_and_the_mount_stays(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon()
    d.signal(signal.SIGHUP)
    assert wait_for(lambda: "no log file to reopen" in d.output()), d.output()
    assert d.proc.poll() is None and is_mounted(d.mountpoint)
    (d.mountpoint / "f").write_text("served")
    assert (d.mountpoint / "f").read_text() == "served"


def test_a_detached_mount_point_is_free_and_a_second_stop_leaves_its_new_mount_alone(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Detached, the old mount is out of the namespace and its mount point can take another
    volume; stopping the old daemon then must not unmount whatever is there now (libfuse's
    own clean-up unmounts the mount point by name)."""
    d = daemon()
    holder = os.open(d.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        d.signal(signal.SIGTERM)
        assert wait_for(lambda: not is_mounted(d.mountpoint)), "still mounted"
        other = Mount(make_volume(tmp_path / "other"), d.mountpoint, tmp_path / "other.log")
        other.start()
        try:
            (d.mountpoint / "new").write_text("other volume")
            d.signal(signal.SIGTERM)
            assert d.proc.wait(timeout=5) == 0, d.output()
            assert is_mounted(d.mountpoint) and other.alive()
            assert (d.mountpoint / "new").read_text() == "other volume"
        finally:
            other.stop()
    finally:
        os.close(holder)


def test_a_sighup_as_the_mount_is_made_is_kept_for_the_loop(tmp_path: Path) -> None:
    """A SIGHUP (logrotate) that lands before the loop watches for it took the signal's
    default action: the daemon died and left a dead mount (ENOTCONN). It reopens the log
    once the loop runs."""
    volume, target, log = make_volume(tmp_path / "cipher"), tmp_path / "mnt", tmp_path / "x.log"
    target.mkdir()
    script = daemon_script(volume, target, (
        "real = pyfuse3.init\n"
        "def init(*args):\n"
        "    real(*args)\n"
        "    os.kill(os.getpid(), signal.SIGHUP)  # as init returns\n"
        "pyfuse3.init = init\n"
    ), log_file=log)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n", log.read_text()
        assert wait_for(lambda: "reopened" in log.read_text()), log.read_text()
        assert proc.poll() is None and is_mounted(target)
        (target / "f").write_text("served")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=DEADLINE) == 0
        assert not is_mounted(target)
    finally:
        stop_daemon(proc, target)
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_sigterm_while_the_mount_is_checked_calls_it_off(tmp_path: Path) -> None:
    """A stop request that lands after the loop started but before the mount was reported
    ready (its first stat through FUSE) unmounts it and never reports it ready: neither
    ``kmsfs mount`` nor systemd may hear of a mount that is going away."""
    volume, target = make_volume(tmp_path / "cipher"), tmp_path / "mnt"
    target.mkdir()
    script = daemon_script(volume, target, (
        "real = os.lstat\n"
        "def lstat(path, *args, **kwargs):\n"
        "    if path == target:  # the readiness check, in a worker thread\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(path, *args, **kwargs)\n"
        "os.lstat = lstat\n"
    ))
    repo = Path(__file__).resolve().parents[2]
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True,
                              text=True, timeout=60)
        assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr
        assert "SIGTERM: unmounting" in proc.stderr and "unmounted" in proc.stderr
        assert not is_mounted(target)
    finally:
        if is_mounted(target):
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts other file systems: root only")


def top_mount(path: Path) -> str | None:
    """The type of the file system on top at *path*, if any."""
    from kmsfs.fs.volume import mount_at

    found = mount_at(path)
    return found[0] if found is not None else None


@needs_root
@pytest.mark.skipif(not shutil.which("unshare") or not shutil.which("nsenter"),
                    reason="needs util-linux's unshare and nsenter")
def test_a_mount_still_held_in_another_namespace_is_served_and_said_so(
    daemon: Callable[..., Daemon],
) -> None:
    """A mount namespace made while the volume was mounted (``unshare -m``, a container with
    the directory bind-mounted) holds a copy of the mount: after a successful unmount here the
    session goes on, and the daemon served on with no end and no word. Now it says so, in the
    log and to systemd, serves that copy, and a second SIGTERM stops it."""
    d = daemon()
    (d.mountpoint / "f").write_text("seen from the namespace\n")
    ours = os.readlink("/proc/self/ns/mnt")
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "300"])
    try:
        assert wait_for(lambda: Path(f"/proc/{holder.pid}/comm").read_text() == "sleep\n")
        assert os.readlink(f"/proc/{holder.pid}/ns/mnt") != ours
        d.signal(signal.SIGTERM)
        assert "STOPPING=1" in d.recv()
        assert "STATUS=unmounted" in d.recv()
        assert not is_mounted(d.mountpoint)
        log = d.output()
        assert (
            f"{d.mountpoint}: unmounted here, but still mounted elsewhere (another mount "
            "namespace?): serving until it is released; a second SIGTERM or SIGINT stops at once"
        ) in log, log
        assert d.proc.poll() is None, log
        seen = subprocess.run(
            ["nsenter", "-t", str(holder.pid), "-m", "cat", str(d.mountpoint / "f")],
            capture_output=True, text=True, timeout=DEADLINE,
        )
        assert (seen.returncode, seen.stdout) == (0, "seen from the namespace\n"), seen.stderr
        d.signal(signal.SIGTERM)
        assert d.proc.wait(timeout=5) == 0, d.output()
        assert "SIGTERM again: stopping at once" in d.output()
    finally:
        holder.kill()
        holder.wait()


@needs_root
def test_a_file_system_mounted_over_the_mount_is_not_unmounted(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """fusermount3 -u unmounts whatever is on top at the path: the first SIGTERM unmounted a
    tmpfs mounted over the volume (its files gone) and left the volume mounted under it; a
    second then left it dead, the log saying "unmounted". Now the daemon leaves the path alone,
    says why, serves on, and a second SIGTERM says what it left."""
    d = daemon()
    (d.mountpoint / "f").write_text("kmsfs")
    inside = os.open(d.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "over-kmsfs", str(d.mountpoint)],
                   check=True)
    try:
        (d.mountpoint / "t").write_text("tmpfs file")
        d.signal(signal.SIGTERM)
        assert "STOPPING=1" in d.recv()
        assert "STATUS=not unmounting" in d.recv()
        log = d.output()
        assert f"{d.mountpoint}: not unmounted: tmpfs from over-kmsfs is mounted over it" in log
        assert top_mount(d.mountpoint) == "tmpfs"
        assert (d.mountpoint / "t").read_text() == "tmpfs file"
        time.sleep(0.3)
        assert d.proc.poll() is None, d.output()
        assert os.listdir(inside) == ["f"]  # still served
        d.signal(signal.SIGTERM)
        assert d.proc.wait(timeout=5) == 0, d.output()
        assert (d.mountpoint / "t").read_text() == "tmpfs file"
        log = d.output()
        assert "SIGTERM again: stopping at once" in log, log
        assert f"{d.mountpoint}: stopped without unmounting it" in log, log
        assert f"unmounted {d.mountpoint}" not in log, log
    finally:
        os.close(inside)
        if top_mount(d.mountpoint) == "tmpfs":
            subprocess.run(["umount", str(d.mountpoint)], check=True)


def test_a_stop_request_leaves_a_new_mount_alone_after_someone_detached_the_old(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """The mount detached by someone else (``umount -l`` while a file was open in it) and
    another volume mounted at the same path: SIGTERM to the old daemon unmounted the NEW
    volume. Now it is left alone, and the old daemon serves its last user to the end."""
    d = daemon()
    holder = os.open(d.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        subprocess.run(["umount", "-l", str(d.mountpoint)], check=True, capture_output=True)
        other = Mount(make_volume(tmp_path / "other"), d.mountpoint, tmp_path / "other.log")
        other.start()
        try:
            (d.mountpoint / "new").write_text("other volume")
            d.signal(signal.SIGTERM)
            assert "STOPPING=1" in d.recv()
            assert "STATUS=not unmounting" in d.recv()
            log = d.output()
            assert f"{d.mountpoint}: not unmounted: another FUSE mount is there" in log, log
            assert is_mounted(d.mountpoint) and other.alive()
            assert (d.mountpoint / "new").read_text() == "other volume"
            assert d.proc.poll() is None
            assert os.listdir(holder) == []  # the old volume, still served
        finally:
            other.stop()
    finally:
        os.close(holder)
    assert d.proc.wait(timeout=DEADLINE) == 0, d.output()  # its last user gone
    assert f"unmounted {d.mountpoint}" in d.output()


EARLY_HOOKS = {
    # as pyfuse3.init returns: held across it, then raised (how daemonize calls a mount off)
    "init": "real_init = pyfuse3.init\n"
            "pyfuse3.init = lambda *a: (real_init(*a), stop())[0]\n",
    # after the mount is made, before the loop runs
    "settling": "daemon.settle_garbage_collector = lambda: (stop(), real_settle())\n",
    # in the loop, just before it watches for signals
    "receiver": "trio.open_signal_receiver = lambda *s: (stop(), real_receiver(*s))[1]\n",
}


@pytest.mark.parametrize(("hook", "signum", "status"), [
    ("settling", signal.SIGTERM, 0), ("receiver", signal.SIGTERM, 0),
    ("settling", signal.SIGINT, 0), ("init", signal.SIGTERM, 143),
])
def test_a_stop_request_before_the_loop_watches_unmounts_quietly(
    tmp_path: Path, hook: str, signum: int, status: int
) -> None:
    """A SIGTERM (with kmsfs's own handler, which raises) or Ctrl-C that landed after the
    mount was made but before the loop watched for it was a traceback: logged as "main loop
    failed", or out of trio.run as an exception group that cliutil.run does not catch (exit 1).
    Now the loop acts on it as soon as it watches: a clean unmount, exit 0, never ready. One
    held across pyfuse3.init still ends start-up as before (exit 143), unmounted, quietly."""
    volume, target = make_volume(tmp_path / "cipher"), tmp_path / "mnt"
    target.mkdir()
    script = daemon_script(volume, target, (
        f"def stop(): os.kill(os.getpid(), {int(signum)})\n"
        "real_settle, real_receiver = daemon.settle_garbage_collector, trio.open_signal_receiver\n"
        + EARLY_HOOKS[hook]
    ), through_run=True)
    repo = Path(__file__).resolve().parents[2]
    try:
        proc = subprocess.run([sys.executable, "-c", script], cwd=repo, capture_output=True,
                              text=True, timeout=60)
        assert (proc.returncode, proc.stdout) == (status, ""), proc.stderr
        assert "Traceback" not in proc.stderr and "failed" not in proc.stderr, proc.stderr
        name = signal.Signals(signum).name
        if status == 0:
            assert f"{name}: unmounting {target}" in proc.stderr, proc.stderr
        assert f"unmounted {target}" in proc.stderr, proc.stderr
        assert not is_mounted(target)
    finally:
        if is_mounted(target):
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def test_sighup_with_a_fifo_at_the_log_path_keeps_the_mount_answering(
    daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """SIGHUP reopened the log file with a blocking open(2) on the loop's thread: a FIFO
    put at the path froze every request of the mount until a reader came. Now the reopen is
    refused at once, said in the old file, and the mount answers."""
    log = tmp_path / "kmsfs.log"
    d = daemon("--log-file", str(log))
    (d.mountpoint / "f").write_text("served")
    rotated = log.with_name("kmsfs.log.1")
    os.rename(log, rotated)
    os.mkfifo(log)
    try:
        d.signal(signal.SIGHUP)
        time.sleep(0.3)
        seen = subprocess.run(["cat", str(d.mountpoint / "f")], capture_output=True, timeout=5)
        assert seen.stdout == b"served"
        assert wait_for(lambda: "logging goes on in the old file" in rotated.read_text())
        assert (
            f"cannot open log file {log}: not a regular file; logging goes on in the old file"
        ) in rotated.read_text()
        d.signal(signal.SIGTERM)
        assert d.proc.wait(timeout=DEADLINE) == 0
        assert f"unmounted {d.mountpoint}" in rotated.read_text()
    finally:  # a daemon waiting to open the FIFO (the bug) goes on once it has a reader
        os.close(os.open(log, os.O_RDONLY | os.O_NONBLOCK))
