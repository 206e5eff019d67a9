"""The write journal's tail records, its durability and its size (kmsfs.fs.journal).

A write past the end of a file gets a tail record (its size before, no data); a replay cuts off
the last block such a write tore, and nothing else. A record left live on the disk by a power
cut (its done mark never written back) must not put an older block over a block a later write
tore. The journal shrinks, and says so when a replay cannot read it all.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from kmsfs.crypto.content import BLOCK_SIZE, CIPHER_BLOCK_SIZE, HEADER_SIZE, cipher_offset
from kmsfs.fs import journal
from kmsfs.fs.files import BlockIntegrityError, FileContent
from kmsfs.fs.journal import WriteJournal
from tests.unit.journal_fixtures import PAGE, Killed, _die_at_first_page_boundary, _keys


def _open(volume: Path, name: str, log: WriteJournal | None) -> FileContent:
    path = volume / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return FileContent(fd, _keys(), os.fsencode(path), log)


def _replay(volume: Path) -> int:
    return journal.replay(os.fsencode(volume), _keys().cipher)


def _read_all(volume: Path, name: str) -> bytes:
    content = _open(volume, name, None)
    try:
        return bytes(content.read(0, 1 << 30))
    finally:
        os.close(content.fd)


def _spy_on_syncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """(call, file name, its size then) of each fdatasync, fsync and ftruncate the journal
    module makes from now on, in order."""
    events: list[tuple[str, str, int]] = []

    def spy(name: str, real):  # type: ignore[no-untyped-def]
        def call(fd: int, *args: int) -> None:
            where = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            events.append((name, where, os.fstat(fd).st_size))
            real(fd, *args)
        return call

    for name in ("fdatasync", "fsync", "ftruncate"):
        monkeypatch.setattr(journal.os, name, spy(name, getattr(os, name)))
    return events


def _killed_append(volume: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A file *name* of two whole blocks, then an append of four more that the daemon's death
    stops at its first page boundary (its tail record left live). Returns the two blocks."""
    log = WriteJournal(os.fsencode(volume))
    content = _open(volume, name, log)
    synced = os.urandom(2 * BLOCK_SIZE)
    content.write(0, synced)
    _die_at_first_page_boundary(monkeypatch)
    with pytest.raises(Killed):
        content.write(len(synced), os.urandom(4 * BLOCK_SIZE))
    monkeypatch.undo()
    return synced


# --- the record format -----------------------------------------------------------------
def test_a_tail_record_is_parsed_as_one_and_skipped_by_a_reader_that_knows_only_redo() -> None:
    header = os.urandom(HEADER_SIZE)
    redo = journal.encode(1, b"a", header, HEADER_SIZE, b"r" * 40)
    tail = journal.encode(2, b"b", header, cipher_offset(2), b"", journal.TAIL)
    after = journal.encode(3, b"c", header, HEADER_SIZE, b"s" * 40)
    records = journal.parse(redo + tail + after)
    assert [(r.sequence, r.tail) for r in records] == [(1, False), (2, True), (3, False)]
    assert records[1].offset == cipher_offset(2) and records[1].data == b""
    # A reader that applies only state 1 (kmsfs before tail records) passes over it and goes
    # on to the records after it: the sequence and the CRC hold, the state is not "live".
    assert tail[4] == journal.TAIL != journal.LIVE
    unknown = bytearray(tail)
    unknown[4] = 7  # a kind no kmsfs knows yet: skipped, the walk goes on
    assert [r.sequence for r in journal.parse(redo + bytes(unknown) + after)] == [1, 3]


def test_a_tail_record_with_data_is_not_one() -> None:
    header = os.urandom(HEADER_SIZE)
    odd = journal.encode(1, b"b", header, cipher_offset(2), b"x" * 10, journal.TAIL)
    assert journal.parse(odd) == []


def test_writes_past_the_end_get_tail_records(tmp_path: Path) -> None:
    log = WriteJournal(os.fsencode(tmp_path))
    content = _open(tmp_path, "new", log)
    log.done = lambda at: None  # type: ignore[method-assign]  # keep them live to look at
    content.write(0, os.urandom(BLOCK_SIZE))  # a new file: size 0 before
    content.write(BLOCK_SIZE, os.urandom(3 * BLOCK_SIZE))  # whole blocks after the end
    records = journal.parse((tmp_path / journal.JOURNAL_NAME).read_bytes())
    assert [(r.tail, r.offset, r.data) for r in records] == [
        (True, 0, b""), (True, cipher_offset(1), b"")]


# --- F1: what a replay does with a tail record ---------------------------------------------
def test_a_killed_append_of_whole_blocks_is_cut_back_to_what_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = _killed_append(tmp_path, "log", monkeypatch)
    assert (tmp_path / "log").stat().st_size % PAGE == 0
    with pytest.raises(BlockIntegrityError):
        _read_all(tmp_path, "log")
    assert _replay(tmp_path) == 1
    assert _read_all(tmp_path, "log") == synced  # the write had finished no block of its own
    assert (tmp_path / journal.JOURNAL_NAME).stat().st_size == 0


def test_a_killed_overwrite_that_would_have_grown_the_file_keeps_its_old_last_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pwrite from inside the file to past its end, killed in a block before the old
    partial last block (so the file kept its size): the replay put the torn block back, then
    wrote the record's blocks past the old end after the old last block, which, zeros between,
    never authenticated again: fsync'd bytes read EIO for good (found by review)."""
    log = WriteJournal(os.fsencode(tmp_path))
    content = _open(tmp_path, "db", log)
    old = os.urandom(3 * BLOCK_SIZE + 1000)
    content.write(0, old)
    new = os.urandom(4 * BLOCK_SIZE)
    _die_at_first_page_boundary(monkeypatch)
    with pytest.raises(Killed):
        content.write(BLOCK_SIZE, new)  # blocks 1-4; the kill cuts it inside block 1
    monkeypatch.undo()
    assert _replay(tmp_path) == 1
    assert _read_all(tmp_path, "db") == old[:BLOCK_SIZE] + new[:BLOCK_SIZE] + old[2 * BLOCK_SIZE :]


def test_a_tail_record_leaves_a_file_alone_unless_its_end_is_torn(tmp_path: Path) -> None:
    """A write that finished, a file that grew no further, and a block torn in the middle (not
    what a kill in a write past the end leaves): nothing is cut."""
    content = _open(tmp_path, "f", None)
    data = os.urandom(5 * BLOCK_SIZE + 100)
    content.write(0, data)
    os.close(content.fd)
    header = (tmp_path / "f").read_bytes()[:HEADER_SIZE]
    record = journal.encode(1, b"f", header, cipher_offset(2), b"", journal.TAIL)
    (tmp_path / journal.JOURNAL_NAME).write_bytes(record)
    assert _replay(tmp_path) == 0
    assert _read_all(tmp_path, "f") == data
    # A finished write whose file happens to end at a page boundary (4050 bytes of plaintext:
    # 18 + 4050 + 28 = 4096 bytes of ciphertext): its last block authenticates, it stays.
    content = _open(tmp_path, "page", None)
    page = os.urandom(4050)
    content.write(0, page)
    os.close(content.fd)
    assert (tmp_path / "page").stat().st_size == PAGE
    head = (tmp_path / "page").read_bytes()[:HEADER_SIZE]
    (tmp_path / journal.JOURNAL_NAME).write_bytes(
        journal.encode(1, b"page", head, 0, b"", journal.TAIL))
    assert _replay(tmp_path) == 0
    assert _read_all(tmp_path, "page") == page
    # Block 3 torn in the middle and a file ending at a page boundary with a torn last block:
    # the block between the record's size and the end does not authenticate, so no cut.
    raw = bytearray((tmp_path / "f").read_bytes())
    raw[cipher_offset(3) + 5] ^= 1
    cut_at = (len(raw) // PAGE) * PAGE
    torn = bytes(raw[:cut_at])
    (tmp_path / "f").write_bytes(torn)
    (tmp_path / journal.JOURNAL_NAME).write_bytes(record)
    assert _replay(tmp_path) == 0
    assert (tmp_path / "f").read_bytes() == torn
    # A last block damaged where no kill leaves the file's end (not at a page boundary), the
    # blocks before it whole: damage, not a tear; it stays for fsck to report, not cut off.
    content = _open(tmp_path, "g", None)
    content.write(0, os.urandom(5 * BLOCK_SIZE + 100))
    os.close(content.fd)
    raw = bytearray((tmp_path / "g").read_bytes())
    assert len(raw) % PAGE
    raw[-10] ^= 1
    (tmp_path / "g").write_bytes(raw)
    (tmp_path / journal.JOURNAL_NAME).write_bytes(
        journal.encode(1, b"g", bytes(raw[:HEADER_SIZE]), cipher_offset(2), b"", journal.TAIL))
    assert _replay(tmp_path) == 0
    assert (tmp_path / "g").read_bytes() == raw


# --- the observation: a stale record after a power cut -----------------------------------
def test_an_older_live_record_does_not_put_its_block_over_a_later_tear(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The disk after a power cut: a live record of an earlier write to block 1 (its done mark
    never written back), block 1 rewritten since and torn by the power cut (its first page
    holds the newest write's bytes). The record's block authenticates, but putting it back
    would bring older data back silently; the block is left torn (EIO, as documented)."""
    content = _open(tmp_path, "f", None)
    content.write(0, os.urandom(4 * BLOCK_SIZE))
    header = (tmp_path / "f").read_bytes()[:HEADER_SIZE]
    content.write(BLOCK_SIZE, os.urandom(BLOCK_SIZE))  # v1 of block 1: what the record holds
    v1 = (tmp_path / "f").read_bytes()[cipher_offset(1) : cipher_offset(2)]
    content.write(BLOCK_SIZE, os.urandom(BLOCK_SIZE))  # v2, fsync'd say
    content.write(BLOCK_SIZE, os.urandom(BLOCK_SIZE))  # v3, torn by the power cut:
    v3 = (tmp_path / "f").read_bytes()[cipher_offset(1) : cipher_offset(2)]
    os.close(content.fd)
    raw = bytearray((tmp_path / "f").read_bytes())
    raw[cipher_offset(1) + 3000 : cipher_offset(2)] = os.urandom(len(v3) - 3000)
    torn = bytes(raw)
    (tmp_path / "f").write_bytes(torn)
    (tmp_path / journal.JOURNAL_NAME).write_bytes(
        journal.encode(1, b"f", header, cipher_offset(1), v1))
    with caplog.at_level(logging.WARNING):
        assert _replay(tmp_path) == 0
    assert (tmp_path / "f").read_bytes() == torn
    assert "did not tear it" in caplog.text


def test_a_tail_record_does_not_cut_a_last_block_a_newer_write_tore(tmp_path: Path) -> None:
    """The disk after a power cut: the tail record of an append that returned (its done mark
    never written back), then a newer overwrite from the file's last block on past its end,
    torn by the power cut in the last block (its size change never reached the disk; a sector
    of its bytes did). The newer write's record cannot vouch for that tear, and the append's
    record must not take it for its own: the block held the append's bytes, fsync'd perhaps.
    Cutting it off would lose them silently; left as it is, it reads EIO."""
    log = WriteJournal(os.fsencode(tmp_path))
    log.done = lambda at: None  # type: ignore[method-assign]  # every record stays live
    content = _open(tmp_path, "f", log)
    content.write(0, os.urandom(2 * BLOCK_SIZE))
    # The append: the file then ends at a page boundary (3 full blocks, then 3966 bytes).
    content.write(2 * BLOCK_SIZE, os.urandom(BLOCK_SIZE + 3966))
    before = (tmp_path / "f").read_bytes()
    assert len(before) % PAGE == 0
    content.write(3 * BLOCK_SIZE, os.urandom(2 * BLOCK_SIZE))  # the newer write, past the end
    after = (tmp_path / "f").read_bytes()
    os.close(content.fd)
    records = journal.parse((tmp_path / journal.JOURNAL_NAME).read_bytes())
    assert [r.tail for r in records] == [True, True, False]
    torn = before[:-512] + after[len(before) - 512 : len(before)]
    (tmp_path / "f").write_bytes(torn)
    with pytest.raises(BlockIntegrityError):
        _read_all(tmp_path, "f")
    assert _replay(tmp_path) == 0
    assert (tmp_path / "f").read_bytes() == torn
    # Without the newer record, the append's record would (rightly) take the tear for its own.
    (tmp_path / journal.JOURNAL_NAME).write_bytes(
        b"".join(journal.encode(r.sequence, r.path, r.header, r.offset, r.data, journal.TAIL)
                 for r in records[:2]))
    assert _replay(tmp_path) == 1
    assert len((tmp_path / "f").read_bytes()) == cipher_offset(3)


# --- F5: the journal's size --------------------------------------------------------------
def test_the_journal_is_cut_back_when_it_rewinds_past_the_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal, "SHRINK_ABOVE", 64 * 1024)
    monkeypatch.setattr(journal, "RESERVE", 16 * 1024)
    log = WriteJournal(os.fsencode(tmp_path))
    header, data = bytes(HEADER_SIZE), os.urandom(CIPHER_BLOCK_SIZE)
    small = [log.begin(b"a", header, HEADER_SIZE, data) for _ in range(2)]
    for at in small:
        log.done(at)
    log.settle()
    assert (tmp_path / journal.JOURNAL_NAME).stat().st_size > 0  # below it: kept, reused
    many = [log.begin(b"a", header, HEADER_SIZE, data) for _ in range(20)]  # > 64 KiB, in flight
    for at in many:
        log.done(at)
    log.settle()
    assert (tmp_path / journal.JOURNAL_NAME).stat().st_size == journal.RESERVE  # kept
    # ... as zeros: the records' ciphertext (rollback material) is gone with them
    assert (tmp_path / journal.JOURNAL_NAME).read_bytes() == bytes(journal.RESERVE)
    assert log.begin(b"a", header, HEADER_SIZE, data) == 0
    log.close()


def test_a_record_past_the_rewind_threshold_waits_for_the_writes_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers that always keep one write in flight never let the journal start again from
    0: it grew for as long as they went on (some 4 MB a second with three 1 MiB overwriters).
    A record that would reach past REWIND_ABOVE waits for those writes to return, then goes
    at 0, on a journal cut back to nothing."""
    monkeypatch.setattr(journal, "REWIND_ABOVE", 64 * 1024)
    monkeypatch.setattr(journal, "SHRINK_ABOVE", 32 * 1024)
    monkeypatch.setattr(journal, "REWIND_WAIT_SECONDS", 60.0)  # woken by done(), not by this
    monkeypatch.setattr(journal, "RESERVE", 4096)  # below one record: sizes are the records'
    log = WriteJournal(os.fsencode(tmp_path))
    header, data = bytes(HEADER_SIZE), os.urandom(CIPHER_BLOCK_SIZE)
    held = log.begin(b"a", header, HEADER_SIZE, data)  # another thread's write, in flight
    for _ in range(14):  # each returns, but one write stays in flight all along
        log.done(log.begin(b"b", header, HEADER_SIZE, data))
    journal_file = tmp_path / journal.JOURNAL_NAME
    assert 60 * 1024 < journal_file.stat().st_size < 64 * 1024
    placed: list[int | None] = []
    waiter = threading.Thread(target=lambda: placed.append(
        log.begin(b"b", header, HEADER_SIZE, data)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and placed == []  # waits for the write in flight
    log.done(held)
    waiter.join(5)
    assert placed == [0]
    assert journal_file.stat().st_size == len(journal.encode(1, b"b", header, 0, data))
    log.close()


def test_a_record_waits_for_the_rewind_a_bounded_time_and_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A write stuck in the backing file system (an NFS stall, an fdatasync) does not slow
    every other writer: past REWIND_WAIT_SECONDS the record goes at the end, and the records
    after it do not wait again until the journal has grown by another REWIND_ABOVE (each
    waited the full time, and with small writes on the event loop, the whole mount froze)."""
    monkeypatch.setattr(journal, "REWIND_ABOVE", 16 * 1024)
    monkeypatch.setattr(journal, "REWIND_WAIT_SECONDS", 0.2)
    caplog.set_level(logging.DEBUG, logger=journal.__name__)
    log = WriteJournal(os.fsencode(tmp_path))
    header, data = bytes(HEADER_SIZE), os.urandom(CIPHER_BLOCK_SIZE)
    stuck = log.begin(b"a", header, HEADER_SIZE, data)

    def five_records() -> list[int | None]:
        ats: list[int | None] = []
        worker = threading.Thread(
            target=lambda: ats.extend(log.begin(b"b", header, HEADER_SIZE, data) for _ in range(5))
        )
        worker.start()
        worker.join(30)
        return ats

    def waits() -> int:
        return sum("a write in flight for" in r.getMessage() for r in caplog.records)

    ats = five_records()
    assert ats == sorted(ats) and len(set(ats)) == 5 and 0 not in ats
    assert len(journal.parse((tmp_path / journal.JOURNAL_NAME).read_bytes())) == 6
    assert waits() == 1
    # Once it has rewound, the next write past the threshold waits again.
    for at in [stuck, *ats]:
        log.done(at)
    log.settle()
    log.begin(b"a", header, HEADER_SIZE, data)  # stuck again
    five_records()
    assert waits() == 2
    log.close()


def test_a_record_made_on_the_event_loop_never_waits_to_rewind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Small writes run on the daemon's event loop (the main thread): a wait there held up
    every request of the mount, not only writes."""
    monkeypatch.setattr(journal, "REWIND_ABOVE", 16 * 1024)
    monkeypatch.setattr(journal, "REWIND_WAIT_SECONDS", 3.0)
    caplog.set_level(logging.DEBUG, logger=journal.__name__)
    log = WriteJournal(os.fsencode(tmp_path))
    header, data = bytes(HEADER_SIZE), os.urandom(CIPHER_BLOCK_SIZE)
    log.begin(b"a", header, HEADER_SIZE, data)  # another thread's write, in flight
    assert threading.current_thread() is threading.main_thread()
    ats = [log.begin(b"b", header, HEADER_SIZE, data) for _ in range(5)]
    assert 0 not in ats and len(set(ats)) == 5
    assert not [r for r in caplog.records if "a write in flight for" in r.getMessage()]
    log.close()


def test_a_clean_close_empties_the_journal_but_not_with_a_write_in_flight(
    tmp_path: Path,
) -> None:
    log = WriteJournal(os.fsencode(tmp_path))
    header, data = bytes(HEADER_SIZE), os.urandom(100)
    log.done(log.begin(b"a", header, HEADER_SIZE, data))
    log.close()
    assert (tmp_path / journal.JOURNAL_NAME).stat().st_size == 0
    log = WriteJournal(os.fsencode(tmp_path))
    log.begin(b"a", header, HEADER_SIZE, data)  # still in flight at the close
    log.close()
    assert len(journal.parse((tmp_path / journal.JOURNAL_NAME).read_bytes())) == 1


def test_records_past_what_a_replay_reads_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    header = bytes(HEADER_SIZE)
    raw = b"".join(journal.encode(i, b"gone", header, HEADER_SIZE, b"x" * 100)
                   for i in range(1, 5))
    (tmp_path / journal.JOURNAL_NAME).write_bytes(raw)
    monkeypatch.setattr(journal, "MAX_JOURNAL_BYTES", len(raw) // 2)
    with caplog.at_level(logging.WARNING):
        _replay(tmp_path)
    assert "records past that are not replayed" in caplog.text
    caplog.clear()
    (tmp_path / journal.JOURNAL_NAME).write_bytes(raw[: len(raw) // 2])
    with caplog.at_level(logging.WARNING):
        _replay(tmp_path)
    assert "records past that" not in caplog.text


# --- F2: a replay is durable before the journal goes ----------------------------------------
def test_a_replay_syncs_what_it_repaired_then_empties_and_syncs_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order a power cut needs: the repaired file fdatasync'd, then the journal truncated
    and fsync'd (the power-cut test in test_fs_crash_tails.py shows the first on ext4; the
    daemon's own directory fsyncs commit ext4's journal soon after a mount, so only this test
    sees the second)."""
    log = WriteJournal(os.fsencode(tmp_path))
    content = _open(tmp_path, "f", log)
    content.write(0, os.urandom(3 * BLOCK_SIZE))
    _die_at_first_page_boundary(monkeypatch)
    with pytest.raises(Killed):
        content.write(BLOCK_SIZE, os.urandom(BLOCK_SIZE))
    monkeypatch.undo()
    events = _spy_on_syncs(monkeypatch)
    assert _replay(tmp_path) == 1
    assert [(name, where) for name, where, _ in events] == [
        ("fdatasync", "f"), ("ftruncate", journal.JOURNAL_NAME),
        ("fsync", journal.JOURNAL_NAME)]
    assert events[-1][2] == 0  # the journal was empty when it was fsync'd


def test_a_replay_syncs_the_end_it_cut_off_before_it_empties_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above for a tail record (a killed append): the file cut back to what the write had
    finished is fdatasync'd before the journal that held the record is emptied and fsync'd, or
    a power cut could bring back the torn end with no record left to cut it off (the file would
    read EIO at its end, and every later append fail, for good)."""
    synced = _killed_append(tmp_path, "f", monkeypatch)
    events = _spy_on_syncs(monkeypatch)
    assert _replay(tmp_path) == 1
    names = [(name, where) for name, where, _ in events]
    assert names[-3:] == [
        ("fdatasync", "f"), ("ftruncate", journal.JOURNAL_NAME),
        ("fsync", journal.JOURNAL_NAME)], names
    assert events[-3][2] == HEADER_SIZE + 2 * CIPHER_BLOCK_SIZE  # synced once cut back
    assert _read_all(tmp_path, "f") == synced


def test_a_record_that_waited_takes_its_sequence_number_after_the_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a worker's record waits for the rewind, the event loop (which never waits) makes
    records of its own: the waiting record must not carry the number one of those took, or a
    replay, which reads while the numbers go up by one, stops there and leaves the records
    after it (torn blocks of later writes) unapplied."""
    monkeypatch.setattr(journal, "REWIND_ABOVE", 64 * 1024)
    monkeypatch.setattr(journal, "RESERVE", 4096)
    monkeypatch.setattr(journal, "REWIND_WAIT_SECONDS", 60.0)
    log = WriteJournal(os.fsencode(tmp_path))
    header, data = bytes(HEADER_SIZE), os.urandom(CIPHER_BLOCK_SIZE)
    held = log.begin(b"a", header, HEADER_SIZE, data)  # in flight
    for _ in range(15):
        log.done(log.begin(b"b", header, HEADER_SIZE, data))  # returned: past 60 KiB
    waiter = threading.Thread(target=lambda: log.begin(b"w", header, HEADER_SIZE, data))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()  # waits for the write in flight
    mine = log.begin(b"m", header, HEADER_SIZE, data)  # the event loop: no wait
    log.done(held)
    log.done(mine)
    waiter.join(5)
    assert not waiter.is_alive()
    after = log.begin(b"n", header, HEADER_SIZE, data)
    assert after is not None
    raw = (tmp_path / journal.JOURNAL_NAME).read_bytes()
    walked = [r.path for r in journal.parse(raw)]
    assert walked[-2:] == [b"w", b"n"], walked  # the one after the waiter is read too
    log.close()
