"""A full disk and the write journal (DESIGN.md §2.5: a kill never tears older data).

Before an overwrite, kmsfs puts its new ciphertext in ``kmsfs.journal``; the journal is emptied
at every mount. On a disk that filled up under the mount, the record used to find no room, the
overwrite went ahead unrecorded, and a daemon killed in the middle of it left a block of
fsync'd data reading EIO for good (found by the storage review, with real kill -9 on a full
ext4). The journal now keeps :data:`kmsfs.fs.journal.RESERVE` bytes allocated while mounted,
and an overwrite whose record still finds no room is refused (ENOSPC), never made unrecorded.

Real full file systems: a size-limited tmpfs of its own per test (root, as the suite runs).
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.crypto.content import BLOCK_SIZE, HEADER_SIZE
from kmsfs.fs import journal
from kmsfs.fs.files import FileContent
from kmsfs.fs.journal import WriteJournal
from tests.integration.fs_helpers import Mount, make_volume
from tests.unit.journal_fixtures import Killed, _die_at_first_page_boundary, _keys


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=0700", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(directory: Path) -> None:
    """Take every free block of the file system *directory* is on."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\xa5" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    fd = os.open(directory / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as full:
            os.write(fd, b"x" * 8192)
        assert full.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
        os.unlink(directory / "probe")


def _content(volume: Path, name: str, log: WriteJournal | None) -> FileContent:
    fd = os.open(volume / name, os.O_RDWR | os.O_CREAT, 0o600)
    return FileContent(fd, _keys(), os.fsencode(volume / name), log)


def _read_all(volume: Path, name: str) -> bytes:
    content = _content(volume, name, None)
    try:
        return bytes(content.read(0, 1 << 30))
    finally:
        os.close(content.fd)


def test_a_kill_during_an_overwrite_on_a_disk_that_filled_up_tears_nothing(
    small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = WriteJournal(os.fsencode(small_disk))  # opened by the mount, while there was room
    content = _content(small_disk, "keep", log)
    synced = os.urandom(64 * BLOCK_SIZE)
    content.write(0, synced)
    content.fsync(False)
    log.settle()
    _fill(small_disk)
    new = os.urandom(3 * BLOCK_SIZE)
    _die_at_first_page_boundary(monkeypatch)
    with pytest.raises(Killed):  # the daemon dies in the middle of the overwrite
        content.write(10 * BLOCK_SIZE + 100, new)
    monkeypatch.undo()
    os.close(content.fd)
    assert journal.replay(os.fsencode(small_disk), _keys().cipher) == 1
    after = _read_all(small_disk, "keep")  # every block authenticates: no EIO
    start, end = 10 * BLOCK_SIZE + 100, 13 * BLOCK_SIZE + 100
    assert after[:start] == synced[:start] and after[end:] == synced[end:]
    assert after[start:start + 100] == new[:100]  # the torn block, put back whole


def test_an_overwrite_with_no_room_for_its_record_is_refused_not_made(small_disk: Path) -> None:
    """A disk already full when the journal was opened (no reserve): the overwrite is refused
    with ENOSPC and the file keeps its fsync'd data; once there is room again, it goes."""
    content = _content(small_disk, "keep", None)
    synced = os.urandom(8 * BLOCK_SIZE)
    content.write(0, synced)
    content.fsync(False)
    os.close(content.fd)
    _fill(small_disk)
    log = WriteJournal(os.fsencode(small_disk))
    content = _content(small_disk, "keep", log)
    with pytest.raises(OSError) as refused:
        content.write(BLOCK_SIZE + 5, b"new" * 100)
    assert refused.value.errno == errno.ENOSPC
    assert _read_all(small_disk, "keep") == synced
    (small_disk / "filler").unlink()
    content.write(BLOCK_SIZE + 5, b"new" * 100)
    assert _read_all(small_disk, "keep")[BLOCK_SIZE + 5 : BLOCK_SIZE + 305] == b"new" * 100
    log.close()
    os.close(content.fd)


def test_through_the_mount_an_overwrite_still_works_on_a_full_disk(
    small_disk: Path, tmp_path: Path
) -> None:
    """What a user sees: a database that overwrites its pages in place keeps working when the
    disk fills up (as on ext4, an overwrite needs no new space), its record in the reserve."""
    volume = make_volume(small_disk / "cipher")
    m = Mount(volume, tmp_path / "mnt", tmp_path / "mnt.log").start()
    try:
        db = m.mountpoint / "db"
        db.write_bytes(os.urandom(32 * BLOCK_SIZE))
        assert (volume / journal.JOURNAL_NAME).stat().st_blocks * 512 >= journal.RESERVE
        _fill(small_disk)
        page = os.urandom(BLOCK_SIZE)
        fd = os.open(db, os.O_WRONLY)
        try:
            assert os.pwrite(fd, page, 7 * BLOCK_SIZE) == BLOCK_SIZE
            os.fsync(fd)
        finally:
            os.close(fd)
        with open(db, "rb") as f:
            f.seek(7 * BLOCK_SIZE)
            assert f.read(BLOCK_SIZE) == page
    finally:
        m.stop()


@pytest.mark.parametrize("size", [4096, 128 * 1024, 1 << 20])
def test_a_writer_overwriting_back_to_back_on_a_full_disk_is_never_refused(
    small_disk: Path, size: int
) -> None:
    """One program overwriting a file in place without a pause (no moment for the daemon to
    mark records done): the records must stay in the reserve, not run past it into a disk
    with no room (they did, and most such overwrites were refused; found by review)."""
    log = WriteJournal(os.fsencode(small_disk))
    content = _content(small_disk, "db", log)
    content.write(0, os.urandom(2 << 20))
    _fill(small_disk)
    for i in range(80):  # 80 MiB of 1 MiB records, far past the 4 MiB reserve
        content.write((i * 77777) % ((2 << 20) - size), os.urandom(size))
    assert (small_disk / journal.JOURNAL_NAME).stat().st_size == journal.RESERVE
    log.close()
    os.close(content.fd)


def test_a_shrinking_truncate_works_on_a_disk_full_at_the_mount(small_disk: Path) -> None:
    """Freeing space must work on a full disk: the shortened last block of a truncate goes
    unrecorded when the journal has no room (found by review)."""
    content = _content(small_disk, "big", None)
    data = os.urandom(64 * BLOCK_SIZE)
    content.write(0, data)
    os.close(content.fd)
    _fill(small_disk)
    log = WriteJournal(os.fsencode(small_disk))
    content = _content(small_disk, "big", log)
    content.truncate(1000)
    assert _read_all(small_disk, "big") == data[:1000]
    log.close()
    os.close(content.fd)


def test_a_worker_past_the_reserve_on_a_full_disk_waits_for_the_writes_in_flight(
    small_disk: Path,
) -> None:
    """Two writers at once (a write in flight all along on one side): the other's records
    cannot rewind to 0, run past the reserve and, on a full disk, found no room; most of two
    concurrent writers' overwrites were refused (found by review). A worker thread (big
    writes) now waits for the writes in flight, then writes its record at 0."""
    log = WriteJournal(os.fsencode(small_disk))
    header, block = bytes(HEADER_SIZE), os.urandom(1 << 20)
    _fill(small_disk)
    held = log.begin(b"a", header, HEADER_SIZE, block)  # another writer's, in flight
    placed: list[object] = []

    def worker() -> None:
        try:
            for _ in range(8):  # 8 MiB of records: past the 4 MiB reserve
                log.done(log.begin(b"b", header, HEADER_SIZE, block))
            placed.append("all recorded")
        except OSError as exc:
            placed.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and not placed  # waiting for the write in flight
    log.done(held)
    thread.join(10)
    assert placed == ["all recorded"]
    assert (small_disk / journal.JOURNAL_NAME).stat().st_size == journal.RESERVE
    log.close()
