"""A write torn by a kill, in a file open through a hard link whose other link was removed, is
put back at the next mount (DESIGN.md §2.5).

The reviewer's reproduction on a real mount: write 16 KiB to ``a``; ``ln a b``; open ``b``,
fsync; ``rm a``; an overwrite of 100 bytes at 4000 that the kernel cuts at a page boundary as
the daemon dies; remount; read ``b``. Records named ``a`` (the link the daemon learned first),
so the replay skipped them and block 0 read as EIO. The daemon here is the test stub whose
ciphertext pwrite, once a trigger file exists, stops at its first page boundary and then
SIGKILLs the daemon (what SIGKILL can make the kernel do to a buffered write).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from kmsfs.fs.journal import live_records
from tests.integration import fs_helpers
from tests.integration.test_fs_integrity import cipher_path

_TEARING_STUB = """
import os, signal, sys
sys.path.insert(0, {here!r})
from kmsfs.fs import files, longpath
import fs_mount_stub

TRIGGER = os.environ["KMSFS_TEST_TEAR"]
if os.environ.get("KMSFS_TEST_NO_OPENAT2"):  # the replay's walk, as without openat2
    longpath._have_openat2 = False
real = files._pwrite_fully


def tearing(fd, view, offset):
    if os.path.exists(TRIGGER) and len(view) > 4096 - offset % 4096:
        real(fd, view[: 4096 - offset % 4096], offset)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(fd, view, offset)


files._pwrite_fully = tearing
fs_mount_stub.main()
"""


@pytest.fixture
def tearing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Mounts started from here run a stub whose ciphertext pwrite, once the returned trigger
    file exists, stops at its first page boundary and SIGKILLs the daemon (what SIGKILL can
    make the kernel do to a buffered write)."""
    stub = tmp_path / "tearing_stub.py"
    here = str(Path(fs_helpers.__file__).resolve().parent)
    stub.write_text(_TEARING_STUB.format(here=here))
    trigger = tmp_path / "tear"
    monkeypatch.setattr(fs_helpers, "STUB", stub)
    monkeypatch.setenv("KMSFS_TEST_TEAR", str(trigger))
    return trigger


def _torn_overwrite(fd: int, trigger: Path) -> None:
    """pwrite 100 bytes at 4000 (blocks 0 and 1): the daemon dies inside block 0."""
    trigger.touch()
    try:
        with contextlib.suppress(OSError):  # the daemon is gone: ENOTCONN or the like
            os.pwrite(fd, b"N" * 100, 4000)
        with contextlib.suppress(OSError):
            os.close(fd)
    finally:
        trigger.unlink()


def _blocks(path: Path) -> list[bytes | OSError]:
    """Each 4 KiB block of *path*, or the error reading it gave."""
    fd = os.open(path, os.O_RDONLY)
    out: list[bytes | OSError] = []
    try:
        for n in range(4):
            try:
                out.append(os.pread(fd, 4096, n * 4096))
            except OSError as exc:
                out.append(exc)
    finally:
        os.close(fd)
    return out


def _expected(old: bytes) -> list[bytes | OSError]:
    # Block 0 gets the write whole (put back from the record); block 1 was never reached.
    new = old[:4000] + b"N" * 96 + old[4096:]
    return [new[n * 4096 : (n + 1) * 4096] for n in range(4)]


def test_rm_of_the_first_link_then_a_torn_write_to_the_other(  # type: ignore[no-untyped-def]
    volume: Path, mounter, tearing: Path
) -> None:
    """The daemon knows b: once a is removed, the open file's records name b's path, and the
    replay puts the block back there without searching."""
    mount = mounter(volume)
    m = mount.mountpoint
    old = bytes(range(256)) * 64
    (m / "a").write_bytes(old)
    os.link(m / "a", m / "b")
    fd = os.open(m / "b", os.O_RDWR)
    os.fsync(fd)
    os.unlink(m / "a")
    _torn_overwrite(fd, tearing)
    mount.kill9()  # already dead by its own hand: reap it, drop the mount

    records = live_records(os.fsencode(volume))
    assert records, "the torn write left no live record"
    assert records[-1].path == os.path.relpath(cipher_path(volume, "b"), volume).encode()

    mount.start()
    assert _blocks(m / "b") == _expected(old)
    assert "block(s) torn by an interrupted write put back" in mount.log()
    assert "not replayed" not in mount.log()
    assert "found by its header" not in mount.log()


def test_a_torn_write_to_a_file_whose_other_link_the_daemon_never_saw(  # type: ignore[no-untyped-def]
    volume: Path, mounter, tearing: Path
) -> None:
    """After a remount the daemon has looked up only a: ``rm a`` leaves it no other path to
    give the open file, and its records go on naming a. The replay finds the file by its
    header at b and puts the block back there."""
    mount = mounter(volume)
    m = mount.mountpoint
    old = bytes(range(256)) * 64
    (m / "a").write_bytes(old)
    os.link(m / "a", m / "b")
    mount.stop()
    mount.start()  # a fresh inode table: b is unknown until looked up
    fd = os.open(m / "a", os.O_RDWR)
    os.fsync(fd)
    os.unlink(m / "a")
    _torn_overwrite(fd, tearing)
    mount.kill9()

    records = live_records(os.fsencode(volume))
    a = os.path.relpath(cipher_path(volume, "a"), volume).encode()
    assert records and records[-1].path == a  # nothing at a any more

    mount.start()
    assert _blocks(m / "b") == _expected(old)
    log = mount.log()
    assert "found by its header at" in log and "put back" in log
    assert "not replayed" not in log
