"""The write journal: a daemon killed in the middle of an overwrite leaves no torn block.

Linux cuts a buffered pwrite short at a page boundary when the writer is killed; every 4124-byte
ciphertext block straddles one, so the block there is left half new, half old. These tests make
exactly that state (the write stops at the first page boundary and the daemon "dies": nothing
after it runs, not even marking the record done) and check that a replay puts back a block that
authenticates, while older data elsewhere stays, and that a replay never writes anything else.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

from kmsfs.crypto.content import (
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    CIPHER_BLOCK_SIZE,
    HEADER_SIZE,
    cipher_offset,
)
from kmsfs.fs import files, journal
from kmsfs.fs.files import BlockIntegrityError, FileContent
from kmsfs.fs.journal import WriteJournal
from kmsfs.fs.longpath import PATH_MAX, reach
from tests.unit.journal_fixtures import Killed, _die_at_first_page_boundary, _keys


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    return tmp_path


def _open(volume: Path, name: str, log: WriteJournal | None) -> FileContent:
    path = volume / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return FileContent(fd, _keys(), os.fsencode(path), log)




def _read(content: FileContent, offset: int, size: int) -> bytes:
    return bytes(content.read(offset, size))


def test_a_killed_overwrite_is_put_back_and_older_data_stays(
    volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = os.urandom(4 * BLOCK_SIZE)
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, "f", log)
    content.write(0, old)
    new = os.urandom(2 * BLOCK_SIZE)
    _die_at_first_page_boundary(monkeypatch)
    with pytest.raises(Killed):
        content.write(BLOCK_SIZE, new)  # blocks 1 and 2; cut inside block 1
    monkeypatch.undo()
    after = _open(volume, "f", None)
    with pytest.raises(BlockIntegrityError):  # what the next mount would see without a replay
        _read(after, BLOCK_SIZE, BLOCK_SIZE)

    assert journal.replay(os.fsencode(volume), _keys().cipher) == 1  # the torn block 1
    replayed = _open(volume, "f", None)
    # Each block is whole, old or new, as after an interrupted write on ext4: block 1 as the
    # write had it, block 2 (the write never reached it) as it was.
    want = old[:BLOCK_SIZE] + new[:BLOCK_SIZE] + old[2 * BLOCK_SIZE :]
    assert _read(replayed, 0, 4 * BLOCK_SIZE) == want
    assert (volume / journal.JOURNAL_NAME).stat().st_size == 0


def test_a_killed_append_to_a_partial_block_keeps_what_was_there(
    volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log file: each append rewrites its partial last block in place."""
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, "log", log)
    synced = b"line of an fsync'd log\n" * 170  # 3910 bytes: one partial block
    content.write(0, synced)
    more = os.urandom(3000)
    _die_at_first_page_boundary(monkeypatch)
    with pytest.raises(Killed):
        content.write(len(synced), more)
    monkeypatch.undo()
    journal.replay(os.fsencode(volume), _keys().cipher)
    data = _read(_open(volume, "log", None), 0, 10_000)
    assert data == synced + more  # the interrupted append completes: nothing older is lost


def test_a_killed_shrinking_truncate_is_finished(
    volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cut to where the shortened block ends happened, the block was not written yet."""
    old = os.urandom(3 * BLOCK_SIZE)
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, "t", log)
    content.write(0, old)

    def killed(*args: Any) -> int:
        raise Killed

    monkeypatch.setattr(files, "_pwrite_fully", killed)
    monkeypatch.setattr(WriteJournal, "done", lambda self, at: None)
    with pytest.raises(Killed):
        content.truncate(BLOCK_SIZE + 1000)
    monkeypatch.undo()
    # Block 1 holds the first 1028 bytes of its old ciphertext: bytes 4096..5095 unreadable.
    assert (volume / "t").stat().st_size == cipher_offset(1) + 1000 + BLOCK_OVERHEAD
    journal.replay(os.fsencode(volume), _keys().cipher)
    assert _read(_open(volume, "t", None), 0, 3 * BLOCK_SIZE) == old[: BLOCK_SIZE + 1000]


def test_records_of_writes_that_returned_are_never_replayed(volume: Path) -> None:
    """A finished write's record must not bring its blocks back after a later truncate."""
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, "f", log)
    content.write(0, os.urandom(3 * BLOCK_SIZE))
    content.write(2 * BLOCK_SIZE, b"x" * 100)  # an overwrite: recorded, then marked done
    assert journal.MAGIC in (volume / journal.JOURNAL_NAME).read_bytes()
    content.truncate(BLOCK_SIZE)
    size = (volume / "f").stat().st_size
    assert journal.replay(os.fsencode(volume), _keys().cipher) == 0
    assert (volume / "f").stat().st_size == size


def test_a_replay_puts_back_the_last_write_to_a_block_not_an_older_one(
    volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two overwrites of a block return (not yet marked done: the daemon marks in its pauses),
    the second is fsync'd, a third is torn by the kill: the block must read as the second or
    the third, never as the first."""
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, "f", log)
    content.write(0, b"0" * (4 * BLOCK_SIZE))
    content.write(BLOCK_SIZE, b"A" * BLOCK_SIZE)
    content.write(BLOCK_SIZE, b"B" * BLOCK_SIZE)
    content.fsync(False)
    _die_at_first_page_boundary(monkeypatch)
    with pytest.raises(Killed):
        content.write(BLOCK_SIZE, b"C" * BLOCK_SIZE)
    monkeypatch.undo()
    assert len([r for r in journal.live_records(os.fsencode(volume)) if not r.tail]) == 3
    assert journal.replay(os.fsencode(volume), _keys().cipher) == 1
    assert _read(_open(volume, "f", None), BLOCK_SIZE, BLOCK_SIZE) == b"C" * BLOCK_SIZE
    assert _read(_open(volume, "f", None), 0, BLOCK_SIZE) == b"0" * BLOCK_SIZE


def test_an_overwrite_whose_record_cannot_be_written_is_refused(
    volume: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal cannot be written (a disk full past its reserve): the overwrite is refused
    with the disk's error and nothing of it is made, since one made unrecorded and torn by a
    kill would leave older data unreadable for good. The file keeps the last write that
    returned, which a replay leaves alone (it authenticates); one warning says why."""
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, "f", log)
    content.write(0, b"0" * (3 * BLOCK_SIZE))
    content.write(BLOCK_SIZE, b"1" * BLOCK_SIZE)  # recorded, returned, not yet marked

    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(journal.os, "pwritev", full)
    monkeypatch.setattr(journal.os, "posix_fallocate", full)
    log._reserved = False  # as on a disk already full when the volume was mounted
    for _ in range(2):
        with pytest.raises(OSError) as refused:
            content.write(BLOCK_SIZE + 10, b"2" * 100)
        assert refused.value.errno == errno.ENOSPC
    monkeypatch.undo()
    warned = [r for r in caplog.records if "no room for the record" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"
    assert _read(content, BLOCK_SIZE, BLOCK_SIZE) == b"1" * BLOCK_SIZE
    assert journal.replay(os.fsencode(volume), _keys().cipher) == 0
    assert _read(_open(volume, "f", None), 0, 3 * BLOCK_SIZE) == (
        b"0" * BLOCK_SIZE + b"1" * BLOCK_SIZE + b"0" * BLOCK_SIZE
    )


def test_the_journal_keeps_its_reserve_while_mounted(volume: Path) -> None:
    """Allocated when the mount opens it, kept when it is cut back, given back at a clean
    unmount: a disk that fills up under the mount still has room for an overwrite's record."""
    log = WriteJournal(os.fsencode(volume))
    path = volume / journal.JOURNAL_NAME
    assert path.stat().st_blocks * 512 >= journal.RESERVE
    header, data = bytes(HEADER_SIZE), os.urandom(1 << 20)  # the largest write's record
    in_flight = [log.begin(b"f", header, HEADER_SIZE, data)
                 for _ in range(journal.SHRINK_ABOVE // len(data) + 1)]  # concurrent writers
    assert path.stat().st_size > journal.SHRINK_ABOVE
    for at in in_flight:
        log.done(at)
    log.settle()
    assert path.stat().st_size == journal.RESERVE  # cut back to the reserve, not to 0
    assert path.stat().st_blocks * 512 >= journal.RESERVE
    log.close()
    assert path.stat().st_size == 0


def test_a_growing_write_that_fails_is_not_brought_back_by_a_replay(
    volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that rewrites the partial last block, then meets a full disk, leaves the file
    as it was; its record, marked done at once, must not grow the file again in a replay."""
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, "f", log)
    old = os.urandom(BLOCK_SIZE + 1000)
    content.write(0, old)
    before = (volume / "f").read_bytes()
    real, calls = files._pwrite_fully, []

    def full_disk(fd: int, view: memoryview, offset: int) -> None:
        calls.append(offset)
        if len(calls) == 1:  # the append: part of it lands, then the disk is full
            real(fd, view[: len(view) // 2], offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, view, offset)  # putting the old bytes back needs no new space

    monkeypatch.setattr(files, "_pwrite_fully", full_disk)
    with pytest.raises(OSError):
        content.write(BLOCK_SIZE + 1000, os.urandom(3 * BLOCK_SIZE))
    monkeypatch.undo()
    assert (volume / "f").read_bytes() == before
    assert journal.replay(os.fsencode(volume), _keys().cipher) == 0
    assert (volume / "f").read_bytes() == before


def test_writes_past_the_end_get_no_redo_record(volume: Path) -> None:
    """Only a tail record (no data: test_fs_journal_tails.py)."""
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, "new", log)
    content.write(0, os.urandom(BLOCK_SIZE))  # a new file
    content.write(BLOCK_SIZE, os.urandom(3 * BLOCK_SIZE))  # whole blocks after the end
    raw = (volume / journal.JOURNAL_NAME).read_bytes()
    assert all(r.tail for r in journal.parse(raw))
    content.write(100, b"x")  # and an overwrite is
    assert journal.MAGIC in (volume / journal.JOURNAL_NAME).read_bytes()


def test_a_record_puts_back_only_blocks_that_authenticate(
    volume: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever writes the journal cannot put anything into a file through a replay."""
    content = _open(volume, "f", None)
    content.write(0, os.urandom(2 * BLOCK_SIZE))
    header = (volume / "f").read_bytes()[:HEADER_SIZE]
    before = (volume / "f").read_bytes()
    raw = (volume / "f").read_bytes()
    torn = bytearray(raw)
    torn[cipher_offset(1) + 10] ^= 1  # block 1 is damaged: a replay would want to fix it
    (volume / "f").write_bytes(bytes(torn))
    forged = [  # junk; block 0 put where block 1 goes; a path outside the volume
        journal.encode(1, b"f", header, cipher_offset(1), os.urandom(CIPHER_BLOCK_SIZE)),
        journal.encode(2, b"f", header, cipher_offset(1), raw[cipher_offset(0):cipher_offset(1)]),
        journal.encode(3, b"../f", header, cipher_offset(1), raw[cipher_offset(1):]),
    ]
    (volume / journal.JOURNAL_NAME).write_bytes(b"".join(forged))
    assert journal.replay(os.fsencode(volume), _keys().cipher) == 0
    assert (volume / "f").read_bytes() == bytes(torn)
    assert before != bytes(torn)
    assert caplog.text.count("not replayed") == 3


def test_parse_stops_at_a_cut_record_and_at_older_bytes() -> None:
    header = bytes(HEADER_SIZE)
    first = journal.encode(7, b"a", header, HEADER_SIZE, b"1" * 50)
    second = journal.encode(8, b"b", header, HEADER_SIZE, b"2" * 50)
    stale = journal.encode(3, b"c", header, HEADER_SIZE, b"3" * 50)
    assert [r.sequence for r in journal.parse(first + second)] == [7, 8]
    assert [r.sequence for r in journal.parse(first + second[:-1])] == [7]  # cut: not begun
    assert [r.sequence for r in journal.parse(first + stale)] == [7]  # space reused from 0
    done = bytearray(first)
    done[4] = journal.DONE
    assert [r.sequence for r in journal.parse(bytes(done) + second)] == [8]
    assert journal.parse(b"") == []


def test_space_is_reused_only_when_no_write_is_in_flight(volume: Path) -> None:
    """A record may go at offset 0 again only once every write before it returned: reusing it
    while one is in flight would overwrite that write's record."""
    log = WriteJournal(os.fsencode(volume))
    header, data = bytes(HEADER_SIZE), os.urandom(CIPHER_BLOCK_SIZE)
    first = log.begin(b"a", header, HEADER_SIZE, data)
    second = log.begin(b"b", header, HEADER_SIZE, data)
    log.done(first)  # b's write is still in flight
    log.settle()
    third = log.begin(b"c", header, HEADER_SIZE, data)
    assert first == 0 and second is not None and third is not None and third > second
    raw = (volume / journal.JOURNAL_NAME).read_bytes()
    assert [r.path for r in journal.parse(raw)] == [b"b", b"c"]
    log.done(second)
    log.done(third)
    log.settle()
    assert journal.parse((volume / journal.JOURNAL_NAME).read_bytes()) == []
    assert log.begin(b"d", header, HEADER_SIZE, data) == 0


def test_a_returned_write_is_marked_done_in_the_pause_after_it(volume: Path) -> None:
    """done() writes nothing (the mark is off the write's path); settle() marks, and only then
    may the space be used again."""
    log = WriteJournal(os.fsencode(volume))
    header, data = bytes(HEADER_SIZE), os.urandom(CIPHER_BLOCK_SIZE)
    first = log.begin(b"a", header, HEADER_SIZE, data)
    before = (volume / journal.JOURNAL_NAME).read_bytes()
    log.done(first)
    assert (volume / journal.JOURNAL_NAME).read_bytes() == before
    second = log.begin(b"b", header, HEADER_SIZE, data)
    assert second != 0  # a is not marked: its space is not reused yet
    log.done(second)
    assert log.settle() is True
    assert journal.parse((volume / journal.JOURNAL_NAME).read_bytes()) == []
    assert log.settle() is False
    assert log.begin(b"c", header, HEADER_SIZE, data) == 0


def test_returned_records_are_marked_before_many_pile_up(volume: Path) -> None:
    """A mount that never pauses still marks them: done() settles at MAX_UNSETTLED."""
    log = WriteJournal(os.fsencode(volume))
    header, data = bytes(HEADER_SIZE), b"x" * 10
    for _ in range(journal.MAX_UNSETTLED):
        log.done(log.begin(b"a", header, HEADER_SIZE, data))
    assert journal.parse((volume / journal.JOURNAL_NAME).read_bytes()) == []
    assert log.begin(b"a", header, HEADER_SIZE, data) == 0


def test_a_record_is_not_replayed_into_another_file_at_its_path(volume: Path) -> None:
    """A record names a path; if the file there now has another header (the one it was for
    was renamed away, or removed and a new one made), the record is left alone, even where
    the new file has a block that does not authenticate and the record's block would."""
    old = _open(volume, "old", None)
    old.write(0, os.urandom(3 * BLOCK_SIZE))
    old_bytes = (volume / "old").read_bytes()
    new = _open(volume, "f", None)
    new.write(0, os.urandom(3 * BLOCK_SIZE))
    damaged = bytearray((volume / "f").read_bytes())
    damaged[cipher_offset(1) + 5] ^= 1
    (volume / "f").write_bytes(bytes(damaged))
    record = journal.encode(
        1, b"f", old_bytes[:HEADER_SIZE], cipher_offset(1),
        old_bytes[cipher_offset(1) : cipher_offset(2)],
    )
    (volume / journal.JOURNAL_NAME).write_bytes(record)
    assert journal.replay(os.fsencode(volume), _keys().cipher) == 0
    assert (volume / "f").read_bytes() == bytes(damaged)


def test_a_rename_while_a_record_path_is_made_does_not_stick_to_later_writes(
    volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big overwrite runs in a worker thread, and a rename on the trio thread may land while
    it makes its record's path from the file's old one. That one record names the old path
    (it is in flight, as any write already under way); the writes after it must name the new
    one, or a replay would skip them all (it finds no file there)."""
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, "old", log)
    content.write(0, os.urandom(3 * BLOCK_SIZE))
    os.rename(volume / "old", volume / "new")
    real = WriteJournal.relative

    def renamed_meanwhile(self: WriteJournal, path: bytes) -> bytes:
        made = real(self, path)
        content.moved(os.fsencode(volume / "old"), os.fsencode(volume / "new"))
        return made

    monkeypatch.setattr(WriteJournal, "relative", renamed_meanwhile)
    content.write(100, b"first")  # its record: made from the old path
    monkeypatch.undo()
    new = os.urandom(BLOCK_SIZE)
    _die_at_first_page_boundary(monkeypatch)
    with pytest.raises(Killed):
        content.write(BLOCK_SIZE, new)
    monkeypatch.undo()

    assert journal.replay(os.fsencode(volume), _keys().cipher) == 1
    assert _read(content, BLOCK_SIZE, BLOCK_SIZE) == new


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (b"/v/a", b"/v/b"),  # the file exchanged itself
        (b"/v/b/x/f", b"/v/a/x/f"),  # under the other side
        (b"/v/a/f", b"/v/b/f"),
        (b"/v/ab/f", b"/v/ab/f"),  # a name that only starts like one side
        (b"/v/c/f", b"/v/c/f"),
    ],
)
def test_an_exchange_moves_an_open_file_on_either_side(before: bytes, after: bytes) -> None:
    content = FileContent(-1, _keys(), before, None)
    content.exchanged(b"/v/a", b"/v/b")
    assert content._path == after


def test_a_record_naming_a_path_with_a_nul_byte_is_skipped(volume: Path) -> None:
    """No file's path holds a NUL; a record that names one is refused like one naming a path
    outside the volume, not an error (ValueError from open) that stops the replay."""
    f = _open(volume, "f", None)
    f.write(0, os.urandom(2 * BLOCK_SIZE))
    data = (volume / "f").read_bytes()
    record = journal.encode(
        1, b"f\0x", data[:HEADER_SIZE], cipher_offset(1), data[cipher_offset(1) :]
    )
    (volume / journal.JOURNAL_NAME).write_bytes(record)
    assert journal.replay(os.fsencode(volume), _keys().cipher) == 0


@pytest.mark.parametrize(
    "under",
    [b"a", b"a/b/c", b"./a", b"a/../b", b"a//b", b"a/", b"kmsfs.tmp.1/x", b"a/.b"],
)
def test_records_name_a_file_by_its_path_under_the_root(tmp_path: Path, under: bytes) -> None:
    """The fast cut of the daemon's paths names what os.path.relpath names, whatever the path
    holds (a record naming another path would not be replayed into its file)."""
    root = os.fsencode(tmp_path)
    j = WriteJournal(root)
    try:
        assert j.relative(root + b"/" + under) == os.path.relpath(root + b"/" + under, root)
    finally:
        j.close()


def test_a_record_of_a_file_deeper_than_path_max_is_replayed(
    volume: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ciphertext path can pass PATH_MAX (kmsfs.fs.longpath), and so can a record's."""
    at = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    below = b""
    while len(below) < 2 * PATH_MAX:
        os.mkdir(b"d" * 200, dir_fd=at)
        deeper = os.open(b"d" * 200, os.O_RDONLY | os.O_DIRECTORY, dir_fd=at)
        os.close(at)
        at, below = deeper, below + b"d" * 200 + b"/"
    fd = os.open(b"f", os.O_RDWR | os.O_CREAT, 0o600, dir_fd=at)
    os.close(at)
    path = os.fsencode(volume) + b"/" + below + b"f"
    old = os.urandom(3 * BLOCK_SIZE)
    content = FileContent(fd, _keys(), path, WriteJournal(os.fsencode(volume)))
    content.write(0, old)
    new = os.urandom(BLOCK_SIZE)
    _die_at_first_page_boundary(monkeypatch)
    with pytest.raises(Killed):
        content.write(BLOCK_SIZE, new)
    monkeypatch.undo()
    os.close(fd)

    assert journal.replay(os.fsencode(volume), _keys().cipher) == 1
    fd = os.open(reach(path), os.O_RDWR)
    try:
        replayed = FileContent(fd, _keys(), path, None)
        assert _read(replayed, 0, 3 * BLOCK_SIZE) == old[:BLOCK_SIZE] + new + old[2 * BLOCK_SIZE :]
    finally:
        os.close(fd)


def test_a_file_too_deep_for_a_record_is_overwritten_unrecorded(volume: Path) -> None:
    """A record carries its path's length in 16 bits; a file whose path does not fit (only
    relative paths reach that deep) is overwritten as when the journal is full, not failed."""
    log = WriteJournal(os.fsencode(volume))
    fd = os.open(volume / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deep_name = os.fsencode(volume) + b"/" + b"d/" * 40_000 + b"f"  # 80,000 bytes
        content = FileContent(fd, _keys(), deep_name, log)
        content.write(0, b"a" * 2 * BLOCK_SIZE)
        content.write(10, b"b" * BLOCK_SIZE)  # an overwrite: recorded if it could be
        assert _read(content, 0, 2 * BLOCK_SIZE) == b"a" * 10 + b"b" * BLOCK_SIZE + b"a" * (
            BLOCK_SIZE - 10
        )
        assert journal.parse(log_bytes(volume)) == []
    finally:
        os.close(fd)


def log_bytes(volume: Path) -> bytes:
    return (volume / journal.JOURNAL_NAME).read_bytes()
