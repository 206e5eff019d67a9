"""Fills the backing disk cannot hold, and a shrinking truncate on a full disk (kmsfs.fs.files).

A hole in a kmsfs file is stored as encrypted zeros (ciphertext files are never sparse), so a
gap costs its full size on the backing disk. A gap the disk cannot hold must fail with ENOSPC
before anything is written (:func:`kmsfs.fs.files.check_room`), not after filling the disk
and cutting the file back. A truncate into the middle of a block must keep every byte below
the new size even when another writer takes the space the cut frees (a daemon killed between
its two steps: tests/unit/test_fs_journal.py).

Every test that could fill a disk (also with its fix broken) runs on a small tmpfs of its own,
never on the disk the tests run from.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from kmsfs.crypto.content import BLOCK_SIZE, cipher_offset, cipher_size
from kmsfs.fs import files
from kmsfs.fs.entries import KmsfsOps
from kmsfs.fs.files import ContentKeys, FileContent, check_room
from tests.integration.fault_helpers import tmpfs
from tests.integration.fs_helpers import SoftDeriver, make_volume

CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
PAGE = 4096  # tmpfs counts its space in pages
_opened: list[int] = []  # fds of the FileContents a test made, closed after it


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    """A fresh 8 MiB tmpfs, unmounted afterwards (what was opened on it closed first)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    with tmpfs(tmp_path / "small", "8m") as fs:
        try:
            yield fs
        finally:
            while _opened:
                os.close(_opened.pop())


def _keys() -> ContentKeys:
    return ContentKeys(SoftDeriver(), key_epochs=True)


def _content(path: Path) -> FileContent:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    _opened.append(fd)
    return FileContent(fd, _keys(), os.fsencode(path))


def _free(path: Path) -> int:
    return os.statvfs(path).f_bfree


def _count_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every pwrite of ciphertext FileContent makes from now on: (offset) of each."""
    calls: list[int] = []
    real = files._pwrite_fully

    def counted(fd: int, data: Any, offset: int) -> None:
        calls.append(offset)
        real(fd, data, offset)

    monkeypatch.setattr(files, "_pwrite_fully", counted)
    return calls


def _fill_up(directory: Path, name: str = "filler") -> None:
    """Take every free page of the tmpfs *directory* is on (ENOSPC must end it)."""
    fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, PAGE, 1):
            while True:
                try:
                    os.write(fd, bytes(chunk))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    assert _free(directory) == 0


# --- a gap the disk cannot hold -------------------------------------------------------------


@pytest.mark.parametrize("how", ["truncate", "write"])
def test_a_gap_bigger_than_the_free_space_fails_at_once(
    small: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """64 MiB of encrypted zeros on an 8 MiB disk: ENOSPC before a single byte is written (it
    wrote zeros until the disk was full, then cut the file back)."""
    content = _content(small / "f")
    old = os.urandom(1000)
    content.write(0, old)
    csize, free = content.cipher_size(), _free(small)
    writes = _count_writes(monkeypatch)
    with pytest.raises(OSError) as exc:
        if how == "truncate":
            content.truncate(64 << 20)
        else:
            content.write(64 << 20, b"x")
    assert exc.value.errno == errno.ENOSPC
    assert writes == [], "zeros were written before the fill was refused"
    assert content.cipher_size() == csize and _free(small) == free
    assert bytes(content.read(0, 2000)) == old


def test_a_write_whose_gap_fits_but_not_with_its_data_fails_at_once(
    small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check counts the whole growth: the gap, and the data written after it."""
    content = _content(small / "f")
    content.write(0, b"start")
    room = _free(small) * PAGE
    gap_end = files.plain_size_lenient(room - 2 * PAGE)  # the gap alone fits
    writes = _count_writes(monkeypatch)
    with pytest.raises(OSError) as exc:
        content.write(gap_end, bytes(4 * PAGE))
    assert exc.value.errno == errno.ENOSPC
    assert writes == []
    assert content.plain_size() == 5


def test_a_fill_that_just_fits_is_not_refused(small: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No margin: a fill one page too big is refused at once, one that needs every free page
    succeeds (a stricter check would refuse fills the disk can hold)."""
    content = _content(small / "f")
    room = _free(small) * PAGE
    lo, hi = 0, room  # the smallest plaintext size whose ciphertext needs one page more
    while lo < hi:
        mid = (lo + hi) // 2
        if cipher_size(mid) > room:
            hi = mid
        else:
            lo = mid + 1
    too_big = lo
    writes = _count_writes(monkeypatch)
    with pytest.raises(OSError) as exc:
        content.truncate(too_big)
    assert exc.value.errno == errno.ENOSPC and writes == []
    content.truncate(too_big - 1)  # every free page, to the last
    assert content.plain_size() == too_big - 1
    assert -(-content.cipher_size() // PAGE) == room // PAGE
    assert bytes(content.read(too_big - 2, 1)) == b"\0"


@pytest.mark.parametrize(
    ("euid", "need", "refused"),
    [(0, 100, False), (0, 101, True), (1000, 50, False), (1000, 51, True)],
)
def test_root_may_use_the_reserved_blocks_others_only_the_available_ones(
    monkeypatch: pytest.MonkeyPatch, euid: int, need: int, refused: bool
) -> None:
    """f_bfree for a daemon running as root (ext4 lets its reserved uid, root by default, use
    the reserved blocks), f_bavail otherwise; counted in f_frsize units, a partly used last
    block included."""
    figures = SimpleNamespace(f_frsize=PAGE, f_bsize=PAGE, f_blocks=1000, f_bfree=100,
                              f_bavail=50)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: figures)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    csize = 100  # one page, partly used
    if refused:
        with pytest.raises(OSError) as exc:
            check_room(-1, csize, (need + 1) * PAGE)
        assert exc.value.errno == errno.ENOSPC
    else:
        check_room(-1, csize, (need + 1) * PAGE)


def test_a_file_system_without_figures_is_not_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """f_blocks 0 (some FUSE and network file systems), or no fstatvfs at all: the fill goes
    ahead and finds out (the cut back on ENOSPC stays)."""
    none = SimpleNamespace(f_frsize=PAGE, f_bsize=PAGE, f_blocks=0, f_bfree=0, f_bavail=0)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: none)
    check_room(-1, 0, 1 << 40)

    def fails(fd: int) -> Any:
        raise OSError(errno.ENOSYS, "no statvfs")

    monkeypatch.setattr(os, "fstatvfs", fails)
    check_room(-1, 0, 1 << 40)


def test_fallocate_past_the_free_space_fails_at_once(
    small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fallocate grows the file by filling, through the same check (in-process handlers)."""
    ops = KmsfsOps(make_volume(small / "c"), SoftDeriver())
    writes = _count_writes(monkeypatch)

    async def main() -> None:
        info, _ = await ops.create(
            pyfuse3.ROOT_INODE, b"f", 0o100644, os.O_RDWR | os.O_CREAT, CTX
        )
        await ops.write(info.fh, 0, b"data")
        before = len(writes)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.fallocate(info.fh, 0, 0, 64 << 20)
        assert exc.value.errno == errno.ENOSPC
        assert len(writes) == before
        assert (await ops.getattr(ops.files.handle(info.fh).file.ino, CTX)).st_size == 4
        await ops.release(info.fh)

    try:
        trio.run(main)
    finally:
        ops.files.close_all()
        if ops.journal is not None:
            ops.journal.close()


# --- a truncate into the middle of a block -------------------------------------------------


def test_truncate_into_a_block_keeps_its_bytes_when_another_writer_takes_the_freed_space(
    small: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk is full, and another writer takes whatever the cut frees, at once (made
    deterministic: the ftruncate itself hands it over). Cutting to the block's start and then
    writing the shortened block past the new end needed new space just then: ENOSPC, and the
    kept bytes of the block were gone. Cut to where the shortened block ends, then written in
    place, it needs none.

    Block 2 starts 74 bytes into a page; kept to 4000 bytes it ends past that page's end, so
    writing it past a cut at its start needs one more page."""
    content = _content(small / "f")
    data = os.urandom(5 * BLOCK_SIZE + 123)
    content.write(0, data)
    new_size = 2 * BLOCK_SIZE + 4000
    assert cipher_offset(2) // PAGE != (cipher_size(new_size) - 1) // PAGE  # as said above
    _fill_up(small)

    real = os.ftruncate
    taken: list[int] = []

    def ftruncate_then_taken(fd: int, length: int) -> None:
        real(fd, length)
        _fill_up(small, f"other{len(taken)}")  # the other writer, between the two steps
        taken.append(length)

    monkeypatch.setattr(os, "ftruncate", ftruncate_then_taken)
    content.truncate(new_size)
    monkeypatch.setattr(os, "ftruncate", real)
    assert taken, "the truncate made no cut"
    assert content.plain_size() == new_size
    assert bytes(content.read(0, len(data))) == data[:new_size]
    for name in os.listdir(small):  # and with the space back, as from the start
        if name != "f":
            os.unlink(small / name)
    assert bytes(_content(small / "f").read(0, len(data))) == data[:new_size]


# --- a directory removed while open ---------------------------------------------------------


def test_readdir_of_a_directory_removed_while_open_lists_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In-process (the kernel itself answers getdents of a directory removed through the
    mount, so the daemon's readdir is reached only without it): no entries, not even "." and
    "..", and no error; its attributes come from the handle's fd (0 links)."""
    ops = KmsfsOps(make_volume(tmp_path / "c"), SoftDeriver())
    listed: list[bytes] = []

    def reply(token: Any, name: bytes, attrs: Any, next_id: int) -> bool:
        listed.append(name)
        return True

    async def main() -> None:
        d = await ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o40755, CTX)
        fh = await ops.opendir(d.st_ino, CTX)
        await ops.rmdir(pyfuse3.ROOT_INODE, b"d", CTX)
        attrs = await ops.getattr(d.st_ino, CTX)
        assert stat.S_ISDIR(attrs.st_mode) and attrs.st_nlink == 0
        monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        # No handle left, but the kernel holds the inode (a removed cwd): what rmdir left.
        attrs = await ops.getattr(d.st_ino, CTX)
        assert stat.S_ISDIR(attrs.st_mode) and attrs.st_nlink == 0
        await ops.forget([(d.st_ino, 1)])
        with pytest.raises(pyfuse3.FUSEError) as exc:  # forgotten: nothing to ask
            await ops.getattr(d.st_ino, CTX)
        assert exc.value.errno == errno.ENOENT

    trio.run(main)
    assert listed == []
