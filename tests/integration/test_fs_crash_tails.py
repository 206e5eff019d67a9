"""Crashes that left a file damaged after the journal's repairs, through real mounts.

- A daemon killed inside a write past the end of a file (an append of whole blocks, a new file's
  first write, the zeros of a truncate up) left its last block torn: the file read EIO at its
  end and refused every later append. Now a tail record lets the next mount cut that block off.
- A mount that put back a torn block did so in the page cache only and emptied the journal at
  once: a power cut soon after left the torn block on the disk and no record. Now the repair is
  fdatasync'd and the emptied journal fsync'd before the mount serves.
- A daemon that is not root could not reopen a mode-0444 file it owns for the repair.
- The journal only grew (concurrent overwrites), and a clean unmount left it as it was.

The kill is made exactly where the kernel makes it: the daemon's ciphertext pwrite copies up to
the next page boundary, then the daemon sends itself SIGKILL (fs_helpers.daemon_script hooks,
armed by a file, so the writes before it go through).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kmsfs.fs import journal
from kmsfs.fs.fsck import check_tree
from kmsfs.fs.journal import JOURNAL_NAME
from tests.integration.fault_helpers import after_power_cut, ext4_image
from tests.integration.fs_helpers import SoftDeriver, daemon_script, is_mounted, make_volume

REPO = Path(__file__).resolve().parents[2]
#: Longer than ext4's journal commit interval (5 s), shorter than dirty_expire (30 s).
AFTER_COMMIT = 8.0


def cut_hook(arm: Path, condition: str) -> str:
    """Hook text: the first ciphertext pwrite matching *condition* (over fd, view, offset and
    size, the file's size before it) once *arm* exists stops at its first page boundary, and
    the daemon is killed there, as SIGKILL does in a real pwrite."""
    return (
        "import kmsfs.fs.files as _f, os as _os, signal as _sig\n"
        "_real = _f._pwrite_fully\n"
        "def _cut(fd, view, offset):\n"
        "    size = _os.fstat(fd).st_size\n"
        f"    if _os.path.exists({str(arm)!r}) and ({condition}):\n"
        "        n = 4096 - offset % 4096\n"
        "        if n < len(view):\n"
        "            _os.pwrite(fd, bytes(view[:n]), offset)\n"
        "            _os.kill(_os.getpid(), _sig.SIGKILL)\n"
        "    return _real(fd, view, offset)\n"
        "_f._pwrite_fully = _cut\n"
    )


class Daemon:
    """A stub daemon (real kmsfs ops, the stub deriver) serving *volume*, with *hooks*."""

    def __init__(self, volume: Path, mountpoint: Path, log: Path, hooks: str = "",
                 user: str | None = None) -> None:
        self.volume, self.mountpoint, self.log_path, self.hooks = volume, mountpoint, log, hooks
        self.user = user
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.mountpoint.mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", daemon_script(self.volume, self.mountpoint, self.hooks)],
                cwd=REPO, stdout=subprocess.PIPE, stderr=log, user=self.user)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"mount failed: {line!r}\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_killed(self) -> None:
        assert self.proc is not None
        assert self.proc.wait(timeout=30) == -signal.SIGKILL, self.log()
        self._detach()

    def stop(self) -> None:
        if self.proc is None:
            return
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._detach()

    def _detach(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


@contextlib.contextmanager
def daemons() -> object:
    started: list[Daemon] = []

    def start(*args: object, **kw: object) -> Daemon:
        d = Daemon(*args, **kw)  # type: ignore[arg-type]
        started.append(d)
        return d.start()

    try:
        yield start
    finally:
        for d in started:
            d.stop()


def fsck_problems(volume: Path) -> list[tuple[str, str]]:
    report = check_tree(volume, SoftDeriver())
    return [(p.kind, p.detail) for p in report.problems]


def killed(fn) -> None:  # type: ignore[no-untyped-def]
    """Run a client call that the daemon's death interrupts (ECONNABORTED, ENOTCONN...)."""
    with contextlib.suppress(OSError):
        fn()


# --- F1: a write past the end, killed -------------------------------------------------------
SYNCED = 8192  # two whole blocks, fsync'd: the next write starts a new block


def _append(f: Path, fd: int) -> None:
    os.write(fd, os.urandom(16384))


def _truncate_up(f: Path, fd: int) -> None:
    os.ftruncate(fd, SYNCED + 200_000)


def _write_far(f: Path, fd: int) -> None:
    other = os.open(f, os.O_WRONLY)  # not O_APPEND, where pwrite appends whatever its offset
    try:
        os.pwrite(other, b"far", SYNCED + 300_000)
    finally:
        os.close(other)


@pytest.mark.parametrize("grow", [_append, _truncate_up, _write_far],
                         ids=["append", "truncate-up", "write-past-a-gap"])
def test_a_killed_write_past_the_end_leaves_a_file_that_reads_and_appends(
    tmp_path: Path, grow  # type: ignore[no-untyped-def]
) -> None:
    """fsync'd 8 KiB (two whole blocks), then a write that adds new blocks, killed in its
    pwrite at a page boundary: the file's new last block is torn. After the remount the
    fsync'd bytes read back, the whole file reads (nothing EIO: the torn block is cut off,
    what the write finished may stay), an append works, and fsck finds nothing."""
    volume = make_volume(tmp_path / "cipher")
    arm = tmp_path / "ARM"
    synced = os.urandom(SYNCED)
    with daemons() as start:
        d = start(volume, tmp_path / "mnt", tmp_path / "log1",
                  cut_hook(arm, "offset >= size and size > 18"))
        f = d.mountpoint / "app.log"
        fd = os.open(f, os.O_CREAT | os.O_RDWR | os.O_APPEND, 0o644)
        os.write(fd, synced)
        os.fsync(fd)
        arm.touch()
        killed(lambda: grow(f, fd))
        d.wait_killed()
        with contextlib.suppress(OSError):
            os.close(fd)
        arm.unlink()
        torn = next(p for p in volume.iterdir() if not p.name.startswith("kmsfs."))
        assert torn.stat().st_size % 4096 == 0  # the kill's mark: the file ends at a page
        report = check_tree(volume, SoftDeriver())  # before the mount that repairs it
        assert [w.kind for w in report.warnings if w.kind == "interrupted-write"]
        assert any("a write past the end cut short" in p.detail for p in report.problems)

        d2 = start(volume, tmp_path / "mnt", tmp_path / "log2")
        data = f.read_bytes()  # no EIO anywhere
        assert data[:SYNCED] == synced
        assert len(data) >= SYNCED
        assert "cut back" in d2.log()
        with open(f, "ab") as a:
            a.write(b"next line\n")
        assert f.read_bytes() == data + b"next line\n"
        d2.stop()
    assert fsck_problems(volume) == []


def test_a_killed_first_write_of_a_new_file_leaves_it_empty(tmp_path: Path) -> None:
    """A new file's first write (cp, tar -x) killed at its first page boundary left the header
    and a torn block: the file read EIO for good. It is empty after the remount."""
    volume = make_volume(tmp_path / "cipher")
    arm = tmp_path / "ARM"
    with daemons() as start:
        d = start(volume, tmp_path / "mnt", tmp_path / "log1", cut_hook(arm, "size == 0"))
        fd = os.open(d.mountpoint / "new", os.O_CREAT | os.O_WRONLY, 0o644)
        arm.touch()
        killed(lambda: os.write(fd, os.urandom(20000)))
        d.wait_killed()
        with contextlib.suppress(OSError):
            os.close(fd)
        arm.unlink()
        d2 = start(volume, tmp_path / "mnt", tmp_path / "log2")
        assert (d2.mountpoint / "new").read_bytes() == b""
        (d2.mountpoint / "new").write_bytes(b"again")
        assert (d2.mountpoint / "new").read_bytes() == b"again"
        d2.stop()
    assert fsck_problems(volume) == []


def test_an_append_that_finished_stays(tmp_path: Path) -> None:
    """The daemon killed after an append returned but before it marked the record done: the
    replay sees every block whole and cuts nothing."""
    volume = make_volume(tmp_path / "cipher")
    with daemons() as start:
        # Never marked done: the record stays live, as if the kill came right after the reply.
        hooks = "import kmsfs.fs.journal as _j\n_j.WriteJournal.done = lambda self, at: None\n"
        d = start(volume, tmp_path / "mnt", tmp_path / "log1", hooks)
        data = os.urandom(SYNCED + 12288)
        with open(d.mountpoint / "f", "wb") as w:
            w.write(data[:SYNCED])
            w.flush()
            w.write(data[SYNCED:])
        assert b"KJR1" in (volume / JOURNAL_NAME).read_bytes()
        assert d.proc is not None
        d.proc.kill()
        d.wait_killed()
        d2 = start(volume, tmp_path / "mnt", tmp_path / "log2")
        assert (d2.mountpoint / "f").read_bytes() == data
        assert "cut back" not in d2.log()


# --- F2: a power cut after the mount that repaired ---------------------------------------
def test_a_repair_by_the_mount_survives_a_power_cut_soon_after(tmp_path: Path) -> None:
    """Block 1 of a fsync'd file torn by a killed overwrite (on the disk, with its live
    record); the next mount puts it back; a power cut 8 s later (the journal's truncate
    committed by ext4, the repaired page not yet written back, before the fix) must not leave
    the torn block: the file reads back whole on the disk the power cut left, and fsck is
    clean. The emptied journal is on that disk too."""
    arm = tmp_path / "ARM"
    with ext4_image(tmp_path / "img") as (disk, image), daemons() as start:
        volume = make_volume(disk / "cipher")
        d = start(volume, tmp_path / "mnt", tmp_path / "log1", cut_hook(arm, "offset < size"))
        f = d.mountpoint / "data"
        old = os.urandom(4 * 4096)
        with open(f, "wb") as w:
            w.write(old)
            w.flush()
            os.fsync(w.fileno())
        new = os.urandom(4096)
        arm.touch()

        def overwrite() -> None:
            with open(f, "r+b") as w:
                w.seek(4096)
                w.write(new)

        killed(overwrite)
        d.wait_killed()
        arm.unlink()
        os.sync()  # the kernel's own writeback: the torn block and the live record on the disk
        assert (volume / JOURNAL_NAME).read_bytes().startswith(b"KJR1")  # the live record
        d2 = start(volume, tmp_path / "mnt", tmp_path / "log2")
        assert "put back" in d2.log()
        with after_power_cut(image, tmp_path / "cut0") as cut:  # at once: before ext4 commits
            # Emptied, and fsync'd so: no record (the mount's reserve, zeros, may be there).
            assert not (cut / "cipher" / JOURNAL_NAME).read_bytes().strip(b"\0")
        time.sleep(AFTER_COMMIT)
        with after_power_cut(image, tmp_path / "cut") as cut:
            d2.stop()
            d3 = start(cut / "cipher", tmp_path / "mnt", tmp_path / "log3")
            assert (d3.mountpoint / "data").read_bytes() == old[:4096] + new + old[8192:]
            d3.stop()
            assert fsck_problems(cut / "cipher") == []


# --- F4: a daemon that is not root ----------------------------------------------------------
_NOBODY_SCRIPT = r"""
import contextlib, json, os, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from tests.integration.test_fs_crash_tails import Daemon, cut_hook, killed
work = Path(sys.argv[2])
volume, arm = work / "cipher", work / "ARM"
out = {}
d = Daemon(volume, work / "mnt", work / "log1", cut_hook(arm, "offset < size")).start()
try:
    f = d.mountpoint / "pack"
    old = os.urandom(3 * 4096)
    fd = os.open(f, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o444)  # as git makes its objects
    os.write(fd, old)
    os.fsync(fd)
    new = os.urandom(4096)
    arm.touch()
    killed(lambda: os.pwrite(fd, new, 4096))
    d.wait_killed()
    with contextlib.suppress(OSError):
        os.close(fd)
    arm.unlink()
finally:
    d.stop()
d2 = Daemon(volume, work / "mnt", work / "log2").start()
try:
    try:
        out["read"] = (d2.mountpoint / "pack").read_bytes() == old[:4096] + new + old[8192:]
    except OSError as exc:
        out["read"] = str(exc)
    out["mode"] = oct(os.stat(d2.mountpoint / "pack").st_mode & 0o7777)
    out["log"] = d2.log()
finally:
    d2.stop()
print(json.dumps(out))
"""


@contextlib.contextmanager
def dev_fuse_open_to_all() -> object:
    before = os.stat("/dev/fuse").st_mode & 0o7777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", before)


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to the user nobody")
def test_a_daemon_that_is_not_root_repairs_a_read_only_file_it_owns() -> None:
    """Daemon and client as ``nobody``: a mode-0444 file written through the descriptor it was
    created with, its overwrite killed. The next mount (as nobody) puts the block back through
    a u+w it takes and gives back: the file reads whole and keeps mode 0444."""
    work = Path(tempfile.mkdtemp(prefix="tails-nobody-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        make_volume(work / "cipher")
        (work / "mnt").mkdir()
        for path in (work, *work.rglob("*")):
            shutil.chown(path, "nobody", "nogroup")
        with dev_fuse_open_to_all():
            run = subprocess.run(
                [sys.executable, "-c", _NOBODY_SCRIPT, str(REPO), str(work)], cwd="/",
                capture_output=True, text=True, timeout=120, user="nobody", group="nogroup",
                extra_groups=[], env={"PATH": os.environ["PATH"], "HOME": "/"})
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout.splitlines()[-1])
        assert out["read"] is True, out
        assert out["mode"] == "0o444"
        assert "put back" in out["log"]
        assert fsck_problems(work / "cipher") == []
    finally:
        if is_mounted(work / "mnt"):
            subprocess.run(["fusermount3", "-uz", str(work / "mnt")], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


# --- F5: the journal's size --------------------------------------------------------------
def test_a_clean_unmount_leaves_an_empty_journal_after_concurrent_overwrites(
    tmp_path: Path,
) -> None:
    """Three writers overwriting in 1 MiB writes at once keep a write in flight nearly all the
    time, so the journal never rewinds and grew by their whole traffic; a clean unmount left
    it all for the next mount to read. Now it is 0 bytes after the unmount."""
    volume = make_volume(tmp_path / "cipher")
    with daemons() as start:
        d = start(volume, tmp_path / "mnt", tmp_path / "log")
        size = 4 << 20
        for name in "abc":
            (d.mountpoint / name).write_bytes(os.urandom(size))
        stop = threading.Event()

        def overwrite(name: str) -> None:
            buf = os.urandom(1 << 20)
            fd = os.open(d.mountpoint / name, os.O_WRONLY)
            try:
                i = 0
                while not stop.is_set():
                    os.pwrite(fd, buf, (i % 4) << 20)
                    i += 1
            finally:
                os.close(fd)

        threads = [threading.Thread(target=overwrite, args=(n,)) for n in "abc"]
        for t in threads:
            t.start()
        grown = 0
        for _ in range(30):
            time.sleep(0.1)
            with open(volume / JOURNAL_NAME, "rb") as j:
                head = j.read(1 << 21)
            if head.startswith(b"KJR1"):  # records, past the zeros of its reserve
                grown = max(grown, len(head.rstrip(b"\0")))
        stop.set()
        for t in threads:
            t.join()
        d.stop()
    assert grown > 1 << 20  # records of 1 MiB writes were there
    assert (volume / JOURNAL_NAME).stat().st_size == 0


def test_fsck_names_a_read_only_file_of_another_user_a_record_needs(tmp_path: Path) -> None:
    """A live record of a mode-0444 file: fsck's interrupted-write warning says that only a
    mount running as root or as the file's owner can repair it."""
    volume = make_volume(tmp_path / "cipher")
    with daemons() as start:
        d = start(volume, tmp_path / "mnt", tmp_path / "log")
        (d.mountpoint / "f").write_bytes(os.urandom(8192))
        d.stop()
    cipher = next(p for p in volume.iterdir() if not p.name.startswith("kmsfs."))
    header = cipher.read_bytes()[:18]
    (volume / JOURNAL_NAME).write_bytes(
        journal.encode(1, os.fsencode(cipher.name), header, 18, b"x" * 100))
    os.chmod(cipher, 0o444)
    warning = [w.detail for w in check_tree(volume, SoftDeriver()).warnings
               if w.kind == "interrupted-write"]
    assert len(warning) == 1
    assert f"{cipher.name} (mode 0444, owner uid {os.getuid()})" in warning[0]
    assert "running as root or as that owner" in warning[0]
