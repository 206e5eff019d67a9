"""Backing inode numbers reused while the kernel still holds the old FUSE node.

FUSE node ids are the backing (ciphertext) inode numbers (:mod:`kmsfs.fs.inodes`). When an
object is removed while the kernel still holds its node (an open directory fd, a cwd, an
O_PATH fd, or just a FORGET not yet sent), the backing file system may give its number to the
next new object. If the daemon then answered with the same node id, the kernel would take its
old inode for the new object: a new directory inherits the removed one's "dead" state (ENOENT
on every create inside), a held fd of a removed file resolves to the new file, or a directory
alias is moved across parents (ESTALE). Found by ``tools/soak.py`` (EEXIST and ESTALE from
mkdir). Each test holds the old node with an O_PATH fd, removes the object, creates entries
until the ciphertext file system reuses the number, then checks the new object and the old fd.
(An fd open for reading would keep the backing object too, and its number: the daemon holds the
ciphertext of an open file or directory open, as ext4 keeps an open removed inode.) A root
daemon's pool thread (:mod:`kmsfs.fs.dirpool`) makes directories too: each test waits until it
is idle before the removal, so the freed number goes to what the test makes, directly or
(for mkdir) through a directory the pool makes and later hands out.

The ciphertext lives on a small ext4 of its own (:func:`volume`): it has one block group, and
ext4 (with a journal) gives a new inode the lowest free number of the group, so the freed
number is the next one handed out. This machine's root file system is an ext4 without a
journal, which passes over inode numbers freed in the last minutes (its "recently deleted"
check), so there the reuse was a matter of luck: a test skipped in the last two CI runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.fs_helpers import ciphertext_paths, make_volume, wait_pool_full

TRIES = 200
#: Under 128 MiB, an ext4 of 4 KiB blocks has a single block group. The block size is given:
#: mke2fs.conf's "small" type would make 1 KiB blocks, and eight groups, of this image.
EXT4_IMAGE_MB = 64


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A volume on a fresh ext4 loop-mounted in *tmp_path*; on *tmp_path* itself where that
    cannot be made (not root, no loop device, no mkfs.ext4)."""
    image, fs = tmp_path / "ext4.img", tmp_path / "ext4"
    try:
        if os.geteuid() != 0:
            raise PermissionError("a loop mount needs root")
        with open(image, "wb") as f:
            f.truncate(EXT4_IMAGE_MB << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", str(image)],
                       check=True, capture_output=True)
        fs.mkdir()
        subprocess.run(["mount", "-o", "loop", str(image), str(fs)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        yield make_volume(tmp_path / "cipher")
        return
    try:
        yield make_volume(fs / "cipher")
    finally:
        subprocess.run(["umount", str(fs)], check=True)


def _backing_inos(cipherdir: Path) -> set[int]:
    """The inode numbers of the visible ciphertext entries: a ready directory in the daemon's
    pool that took the number is not the object the test just made."""
    return {os.lstat(path).st_ino for path in ciphertext_paths(cipherdir)}


def _until_reused(cipherdir: Path, old_backing: int, make: Callable[[int], Path]) -> Path:
    """Call make(i) until the backing file system gives *old_backing* to a new entry."""
    for i in range(TRIES):
        made = make(i)
        if old_backing in _backing_inos(cipherdir):
            return made
    pytest.skip("the ciphertext file system did not reuse the inode number")


def _held_fd_is_not(fd: int, new: Path) -> None:
    """The fd of the removed object must not have turned into the new object."""
    try:
        held = os.fstat(fd)
    except OSError:
        return  # the removed object is just gone: fine
    new_st = os.lstat(new)
    assert (held.st_ino, held.st_dev) != (new_st.st_ino, new_st.st_dev)


@contextlib.contextmanager
def _held_removed_dir(path: Path, cipherdir: Path) -> Iterator[tuple[int, int]]:
    """Make directory *path*, hold an fd on it, remove it: (the fd, its inode number)."""
    os.mkdir(path)
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)  # no OPENDIR: the daemon keeps no fd
    try:
        old = os.fstat(fd).st_ino  # no reuse yet: the FUSE id is the backing number
        wait_pool_full(cipherdir)  # the pool, refilled after that mkdir, takes no number now
        os.rmdir(path)
        yield fd, old
    finally:
        os.close(fd)


def _file_maker(m: Path, content: Callable[[int], bytes]) -> Callable[[int], Path]:
    """make(i) for :func:`_until_reused`: writes file ``f<i>`` in *m* with content(i)."""

    def make(i: int) -> Path:
        p = m / f"f{i}"
        p.write_bytes(content(i))
        return p

    return make


@pytest.fixture
def m(mnt) -> Path:  # type: ignore[no-untyped-def]
    return mnt.mountpoint


def test_new_dir_after_held_dir_removed(mnt, m: Path) -> None:  # type: ignore[no-untyped-def]
    os.mkdir(m / "x")
    os.mkdir(m / "y")
    with _held_removed_dir(m / "x" / "d1", mnt.cipherdir) as (fd, old):
        new = _until_reused(mnt.cipherdir, old, lambda i: _mkdir(m / "y" / f"n{i}"))
        os.mkdir(new / "sub")  # was ENOENT: the kernel reused the removed dir's dead inode
        (new / "f").write_bytes(b"data")
        assert sorted(os.listdir(new)) == ["f", "sub"]
        assert (new / "f").read_bytes() == b"data"
        _held_fd_is_not(fd, new)
        assert not os.path.exists(m / "x" / "d1")
    assert sorted(os.listdir(new)) == ["f", "sub"]
    os.rmdir(new / "sub")
    os.unlink(new / "f")
    os.rmdir(new)


def test_new_dir_elsewhere_after_renamed_over_dir(mnt, m: Path) -> None:  # type: ignore[no-untyped-def]
    for d in ("x", "y", "x/src", "x/dst"):
        os.mkdir(m / d)
    fd = os.open(m / "x" / "dst", os.O_PATH | os.O_DIRECTORY)  # no OPENDIR (see the top)
    try:
        old = os.fstat(fd).st_ino
        wait_pool_full(mnt.cipherdir)
        os.rename(m / "x" / "src", m / "x" / "dst")  # the old dst is gone
        new = _until_reused(mnt.cipherdir, old, lambda i: _mkdir(m / "y" / f"n{i}"))
        os.mkdir(new / "sub")
        assert os.listdir(new) == ["sub"]
        _held_fd_is_not(fd, new)
        assert os.listdir(m / "x") == ["dst"]
    finally:
        os.close(fd)


def test_new_file_after_held_file_unlinked(mnt, m: Path) -> None:  # type: ignore[no-untyped-def]
    (m / "old").write_bytes(b"old content")
    # O_PATH: the kernel holds the node but the daemon gets no OPEN, so it keeps no backing fd
    # and the backing inode is freed on unlink.
    fd = os.open(m / "old", os.O_PATH)
    try:
        old = os.fstat(fd).st_ino
        wait_pool_full(mnt.cipherdir)
        os.unlink(m / "old")

        def make(i: int) -> Path:
            p = m / f"new{i}"
            p.write_bytes(b"new content %d" % i)
            return p

        new = _until_reused(mnt.cipherdir, old, make)
        _held_fd_is_not(fd, new)
        # Through the held fd, the removed file must not open as the new one.
        with pytest.raises(OSError) as exc:
            os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))
        assert exc.value.errno in (errno.ENOENT, errno.ESTALE, errno.EIO)
        assert new.read_bytes().startswith(b"new content")
    finally:
        os.close(fd)


def test_new_file_after_held_dir_removed(mnt, m: Path) -> None:  # type: ignore[no-untyped-def]
    with _held_removed_dir(m / "d1", mnt.cipherdir) as (fd, old):
        new = _until_reused(mnt.cipherdir, old, _file_maker(m, lambda i: b"x"))
        assert stat.S_ISREG(os.lstat(new).st_mode)
        assert new.read_bytes() == b"x"
        _held_fd_is_not(fd, new)


def test_hard_links_and_distinct_inos_after_reuse(mnt, m: Path) -> None:  # type: ignore[no-untyped-def]
    # Held: the number stays the kernel's.
    with _held_removed_dir(m / "d1", mnt.cipherdir) as (_fd, old):
        new = _until_reused(mnt.cipherdir, old, _file_maker(m, lambda i: b"%d" % i))
        os.link(new, m / "hard")
        a, b = os.lstat(new), os.lstat(m / "hard")
        assert a.st_ino == b.st_ino and b.st_nlink == 2
        assert os.path.samefile(new, m / "hard")
        inos = [os.lstat(p).st_ino for p in sorted(m.iterdir()) if p.name != "hard"]
        assert len(set(inos)) == len(inos)  # different files, different st_ino
        listed = {e.name: e.inode() for e in os.scandir(m)}
        assert listed["hard"] == listed[new.name] == a.st_ino
        os.unlink(new)
        assert (m / "hard").read_bytes() == new.name[1:].encode()
        assert os.lstat(m / "hard").st_ino == a.st_ino


def _mkdir(p: Path) -> Path:
    os.mkdir(p)
    return p
