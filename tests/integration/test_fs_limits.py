"""Limits through a real mount: the largest file, gaps the disk cannot hold, removed directories.

A hole in a kmsfs file is stored as encrypted zeros (docs/format.md, "Holes and the rules for
writers"), so a write far past the end, or a truncate up, writes its whole gap. A write past
the largest file ext4 can hold fails with EFBIG before anything happens, as on ext4; a gap the
backing disk cannot hold fails with ENOSPC before anything is written, rather than filling the
disk and being cut back. Every volume here lives on a small tmpfs of its own (8 MiB): should a
check be missing, the fill fills that, never the disk the tests run from.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs.fs.operations import MAX_HELD_DIR_FDS
from kmsfs.fs.posix import MAX_FILE_SIZE
from tests.integration.fault_helpers import tmpfs
from tests.integration.fs_helpers import make_volume, wait_pool_full

OLD_NS = 1_000_000_000  # a ciphertext mtime no write or truncate leaves


@contextlib.contextmanager
def _small_volume(tmp_path: Path, mounter, options: tuple[str, ...] = ()) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """A mount whose ciphertext directory is on a fresh 8 MiB tmpfs (stopped on the way out)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs(tmp_path / "small", "8m") as small:
        mount = mounter(make_volume(small / "cipher"), options=options)
        try:
            yield mount
        finally:
            mount.stop()


def _ciphertext(mount: Any, data: bytes) -> tuple[Path, Path]:
    """Plaintext file ``f`` with *data*, and its ciphertext file, whose mtime is set far back
    (so a write or truncate of it that was cut back again still shows). The daemon's pool of
    new directories is full by then: it takes no space while the test looks."""
    plain = mount.mountpoint / "f"
    plain.write_bytes(data)
    wait_pool_full(mount.cipherdir)
    (cipher,) = [p for p in mount.cipherdir.iterdir() if not p.name.startswith("kmsfs.")]
    os.utime(cipher, ns=(OLD_NS, OLD_NS))
    return plain, cipher


def _free(path: Path) -> int:
    return os.statvfs(path).f_bfree


def _untouched(cipher: Path, size: int, free: int, mtime: bool = True) -> None:
    st = os.stat(cipher)
    assert st.st_size == size, "the ciphertext changed size"
    if mtime:
        assert st.st_mtime_ns == OLD_NS, "the ciphertext was written (and cut back?)"
    assert _free(cipher.parent) == free, "the free space changed"


def _errno_of(call: Any, *args: Any) -> int | None:
    try:
        call(*args)
    except OSError as exc:
        return exc.errno
    return None


def test_a_write_past_the_largest_file_is_efbig_at_once(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """pwrite at 2**44 (ext4: EFBIG at once) tried to fill 16 TiB of encrypted zeros; a
    write that only ends past the limit is refused as well, with nothing written."""
    with _small_volume(tmp_path, mounter) as mount:
        plain, cipher = _ciphertext(mount, b"hello")
        size, free = os.stat(cipher).st_size, _free(cipher.parent)
        fd = os.open(plain, os.O_WRONLY)
        try:
            assert _errno_of(os.pwrite, fd, b"x", 2**44) == errno.EFBIG
            assert _errno_of(os.pwrite, fd, b"xy", MAX_FILE_SIZE - 1) == errno.EFBIG
        finally:
            os.close(fd)
        _untouched(cipher, size, free)
        assert plain.read_bytes() == b"hello"
        with open(plain, "ab", buffering=0) as f:  # O_APPEND: at the end, far below it
            f.write(b"!")
        assert plain.read_bytes() == b"hello!"
        assert mount.alive()


def test_a_write_past_the_largest_file_with_writeback_cache(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """With -o writeback_cache the kernel takes the pwrite into its cache (it succeeds, and
    the kernel's st_size says 2**44 + 1 while it keeps the inode); the write-back it then
    sends is refused with EFBIG, which fsync reports. Nothing reaches the disk. (The kernel
    sets the ciphertext's times itself in this mode, so they are not compared.)"""
    with _small_volume(tmp_path, mounter, ("writeback_cache",)) as mount:
        plain, cipher = _ciphertext(mount, b"hello")
        with open(plain, "rb+") as f:  # the first write's write-back, done before looking
            os.fsync(f.fileno())
        size, free = os.stat(cipher).st_size, _free(cipher.parent)
        fd = os.open(plain, os.O_RDWR)
        try:
            err = _errno_of(os.pwrite, fd, b"x", 2**44)
            if err is None:
                err = _errno_of(os.fsync, fd)
            assert err == errno.EFBIG, errno.errorcode.get(err or 0)
            assert os.pread(fd, 5, 0) == b"hello"
        finally:
            os.close(fd)
        _untouched(cipher, size, free, mtime=False)
        assert mount.alive()


@pytest.mark.parametrize("how", ["truncate", "ftruncate", "pwrite"])
def test_a_gap_the_disk_cannot_hold_fails_at_once(tmp_path: Path, mounter, how: str) -> None:  # type: ignore[no-untyped-def]
    """64 MiB of encrypted zeros on an 8 MiB disk: ENOSPC before anything is written (it
    filled the disk, then cut the file back), sizes unchanged, the free space untouched. A
    gap that fits still works."""
    with _small_volume(tmp_path, mounter) as mount:
        old = os.urandom(1000)
        plain, cipher = _ciphertext(mount, old)
        size, free = os.stat(cipher).st_size, _free(cipher.parent)
        fd = os.open(plain, os.O_RDWR)
        try:
            if how == "truncate":
                err = _errno_of(os.truncate, plain, 64 << 20)
            elif how == "ftruncate":
                err = _errno_of(os.ftruncate, fd, 64 << 20)
            else:
                err = _errno_of(os.pwrite, fd, b"x", 64 << 20)
            assert err == errno.ENOSPC, errno.errorcode.get(err or 0)
            assert os.fstat(fd).st_size == len(old)
        finally:
            os.close(fd)
        _untouched(cipher, size, free)
        assert plain.read_bytes() == old
        os.truncate(plain, 1 << 20)  # this one fits
        assert plain.read_bytes() == old + bytes((1 << 20) - len(old))
        assert mount.alive()


def _removed_while_open(parent: Path) -> tuple[list[str], list[str], os.stat_result, tuple]:
    """Make parent/d with a file and an xattr, open it, empty and remove it; then what a
    listing through the fd gives (os.listdir, os.scandir), its fstat, and its xattrs through
    the fd (the one set before; all, once one more is set; all, once the first is removed)."""
    d = parent / "d"
    d.mkdir()
    (d / "x").write_bytes(b"1")
    os.setxattr(d, "user.kept", b"from before")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.unlink(d / "x")
        os.rmdir(d)
        listed = os.listdir(fd)
        with os.scandir(fd) as it:
            scanned = [e.name for e in it]
        kept = os.getxattr(fd, "user.kept")
        os.setxattr(fd, "user.added", b"after")
        both = sorted(os.listxattr(fd))
        os.removexattr(fd, "user.kept")
        return listed, scanned, os.fstat(fd), (kept, both, os.listxattr(fd))
    finally:
        os.close(fd)


def test_a_directory_removed_while_open_lists_as_empty(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """As on a plain tmpfs (and ext4): an empty listing, the directory's attributes with
    0 links, and its xattrs, not ENOENT (the fstat that opendir(3) makes failed on the removed
    inode, and so did every xattr call)."""
    with _small_volume(tmp_path, mounter) as mount:
        (tmp_path / "small" / "plain").mkdir()
        want = _removed_while_open(tmp_path / "small" / "plain")
        got = _removed_while_open(mount.mountpoint)
        assert want[:2] == ([], [])
        assert want[3] == (b"from before", ["user.added", "user.kept"], ["user.added"])
        assert got[:2] == want[:2]
        assert got[3] == want[3]
        for st in (want[2], got[2]):
            assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 0
        assert stat.S_IMODE(got[2].st_mode) == stat.S_IMODE(want[2].st_mode)
        assert mount.alive()


def _in_removed_cwd(parent: Path, how: str) -> tuple[str, str, int]:
    """A shell whose working directory is removed under it (``rmdir``, or a directory
    renamed over it: ``mv -T``) runs ``ls -la`` and stats ``.``: its output, errors and exit
    status, with the attributes it saw."""
    d, other = parent / "d", parent / "other"
    d.mkdir()
    other.mkdir()
    remove = f"rmdir {d}" if how == "rmdir" else f"mv -T {other} {d}"
    p = subprocess.run(
        ["sh", "-c", f"cd {d} && {remove} && ls -la && stat -c '%h %a %F' . && sleep 0.2"],
        capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"},
    )
    if how != "rmdir":
        os.rmdir(d)
    else:
        os.rmdir(other)
    return p.stdout, p.stderr, p.returncode


@pytest.mark.parametrize("how", ["rmdir", "rename over"])
def test_ls_in_a_removed_working_directory_lists_nothing(tmp_path: Path, mounter, how: str) -> None:  # type: ignore[no-untyped-def]
    """ext4 answers the fstat that ``ls`` makes of its removed working directory (0 links) and
    ``ls`` lists nothing: the daemon answered ENOENT, as the removed directory had no path and
    no fd open here, and ``ls`` failed ("cannot open directory '.'")."""
    (tmp_path / "plain").mkdir()
    want = _in_removed_cwd(tmp_path / "plain", how)
    assert want == ("total 0\n0 755 directory\n", "", 0)
    mount = mounter(make_volume(tmp_path / "cipher"))
    assert _in_removed_cwd(mount.mountpoint, how) == want
    assert mount.alive()


def test_opening_one_directory_many_times_costs_the_daemon_a_bounded_number_of_fds(
    tmp_path: Path, mounter  # type: ignore[no-untyped-def]
) -> None:
    """Each open directory handle held a daemon fd: 1,010 opens of one directory, within one
    ordinary process's own limit, used up a daemon's 1,024 and every open on the mount failed
    (EMFILE), for every user. Past MAX_HELD_DIR_FDS a handle lists through an fd of its own
    for the listing, and the mount goes on."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # systemd's soft limit
    try:
        mount = mounter(make_volume(tmp_path / "cipher"))  # the daemon starts with it
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    (mount.mountpoint / "d").mkdir()
    (mount.mountpoint / "d" / "f").write_bytes(b"x")
    daemon = Path(f"/proc/{mount.proc.pid}/fd")
    before = len(os.listdir(daemon))
    limits = Path(f"/proc/{mount.proc.pid}/limits").read_text()
    soft_limit, hard_limit = next(
        line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")
    )
    assert soft_limit == hard_limit  # daemon.raise_open_file_limit: files opened count too
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    held: list[int] = []
    try:
        for _ in range(MAX_HELD_DIR_FDS + 300):
            held.append(os.open(mount.mountpoint / "d", os.O_RDONLY | os.O_DIRECTORY))
        assert len(os.listdir(daemon)) <= before + MAX_HELD_DIR_FDS + 8
        assert os.listdir(held[-1]) == ["f"]  # a handle past the cap lists as before
        (mount.mountpoint / "d" / "g").write_bytes(b"y")
        assert sorted(os.listdir(mount.mountpoint / "d")) == ["f", "g"]
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    deadline = time.monotonic() + 10  # the kernel sends RELEASEDIR after close(2) returns
    while len(os.listdir(daemon)) > before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(os.listdir(daemon)) <= before + 2
    assert mount.alive()
