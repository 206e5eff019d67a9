"""Write journal records of a file whose path changed under them (DESIGN.md §2.5).

A record names a ciphertext path. An open file reached through another hard link keeps the
path of the link the inode table learned first, and when that link is removed (``rm a`` with
``b`` open), a record naming it was skipped by the replay (ENOENT, or another file there): the
block a kill tore stayed torn, and fsync'd data in it read as EIO. Two fixes, tested here:

- at the source, the removal of the link an open file's records name switches them to another
  link the daemon knows (KmsfsOps._link_gone);
- at the replay, a record whose path no longer holds its file is looked for by its header (the
  file's random id) with one walk of the tree, and applied to the one file that has it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from kmsfs.crypto.content import BLOCK_SIZE
from kmsfs.fs import journal
from kmsfs.fs.entries import KmsfsOps
from kmsfs.fs.files import BlockIntegrityError, ContentKeys, FileContent
from kmsfs.fs.journal import WriteJournal
from tests.integration.fs_helpers import SoftDeriver, make_volume
from tests.unit.journal_fixtures import Killed, _die_at_first_page_boundary, _keys

CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)
TWO_DAYS = 2 * 86400




def _read(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return bytes(FileContent(fd, _keys(), os.fsencode(path), None).read(offset, size))
    finally:
        os.close(fd)


def _torn_at(
    volume: Path, name: str, monkeypatch: pytest.MonkeyPatch, log: WriteJournal | None = None
) -> tuple[bytes, bytes, int]:
    """A file *name* of 4 blocks, then an overwrite of its block 1 cut by a kill: the record
    names *name*. Returns (old content, new block 1, the fd the daemon had open)."""
    log = log or WriteJournal(os.fsencode(volume))
    fd = os.open(volume / name, os.O_RDWR | os.O_CREAT, 0o600)
    content = FileContent(fd, _keys(), os.fsencode(volume / name), log)
    old = os.urandom(4 * BLOCK_SIZE)
    content.write(0, old)
    new = os.urandom(BLOCK_SIZE)
    with monkeypatch.context() as patch:
        _die_at_first_page_boundary(patch)
        with pytest.raises(Killed):
            content.write(BLOCK_SIZE, new)
    return old, new, fd


def _want(old: bytes, new: bytes) -> bytes:
    return old[:BLOCK_SIZE] + new + old[2 * BLOCK_SIZE :]


# --- the replay: a record found by its file's header ---------------------------------------


def test_a_record_whose_path_is_gone_is_replayed_into_the_file_with_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``ln a d/b; rm a`` while the record named a: the replay finds the file at d/b."""
    old, new, fd = _torn_at(tmp_path, "a", monkeypatch)
    os.close(fd)
    (tmp_path / "d").mkdir()
    os.link(tmp_path / "a", tmp_path / "d" / "b")
    os.unlink(tmp_path / "a")
    with pytest.raises(BlockIntegrityError):  # what the next mount would see without it
        _read(tmp_path / "d" / "b", BLOCK_SIZE, BLOCK_SIZE)
    caplog.set_level(logging.WARNING)

    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 1
    assert _read(tmp_path / "d" / "b", 0, 4 * BLOCK_SIZE) == _want(old, new)
    assert "found by its header at d/b" in caplog.text
    assert "not replayed" not in caplog.text


def test_an_older_shorter_copy_found_by_its_header_is_never_grown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sync tool's version of the file (one block, made before it grew) is all that is left
    with the header: the torn block was past its end, so the record is not for it, and writing
    the block there would grow it with a hole."""
    _, _, fd = _torn_at(tmp_path, "a", monkeypatch)
    os.close(fd)
    (tmp_path / ".stversions").mkdir()
    copy = tmp_path / ".stversions" / "a~20261129"
    with open(tmp_path / "a", "rb") as src:
        copy.write_bytes(src.read(18 + 4124))  # the header and block 0
    os.unlink(tmp_path / "a")
    before = copy.read_bytes()

    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 0
    assert copy.read_bytes() == before


def test_a_record_whose_path_holds_another_file_goes_to_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ln a b; mv other a``: the file at the record's path has another header; the one with
    the record's header gets the block, the other is left as it is."""
    old, new, fd = _torn_at(tmp_path, "a", monkeypatch)
    os.close(fd)
    os.link(tmp_path / "a", tmp_path / "b")
    other = FileContent(
        os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600), _keys(), b"", None
    )
    other.write(0, os.urandom(4 * BLOCK_SIZE))
    os.close(other.fd)
    os.rename(tmp_path / "other", tmp_path / "a")
    before = (tmp_path / "a").read_bytes()

    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 1
    assert _read(tmp_path / "b", 0, 4 * BLOCK_SIZE) == _want(old, new)
    assert (tmp_path / "a").read_bytes() == before


def test_hard_links_of_the_file_found_count_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new, fd = _torn_at(tmp_path, "a", monkeypatch)
    os.close(fd)
    os.link(tmp_path / "a", tmp_path / "b")
    os.link(tmp_path / "a", tmp_path / "c")
    os.unlink(tmp_path / "a")
    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 1
    assert _read(tmp_path / "c", 0, 4 * BLOCK_SIZE) == _want(old, new)


def test_a_header_found_in_two_files_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy in the ciphertext tree has the same header: which one the write was for cannot
    be told, so neither is touched."""
    os.close(_torn_at(tmp_path, "a", monkeypatch)[2])
    os.rename(tmp_path / "a", tmp_path / "b")
    shutil.copyfile(tmp_path / "b", tmp_path / "copy")
    b, copy = (tmp_path / "b").read_bytes(), (tmp_path / "copy").read_bytes()

    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 0
    assert (tmp_path / "b").read_bytes() == b
    assert (tmp_path / "copy").read_bytes() == copy
    assert "for a not replayed" in caplog.text
    assert "2 files elsewhere have it" in caplog.text


def test_a_header_found_nowhere_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The file is gone (its last link removed): nothing is written anywhere."""
    caplog.set_level(logging.INFO)
    os.close(_torn_at(tmp_path, "a", monkeypatch)[2])
    os.unlink(tmp_path / "a")
    bystander = FileContent(
        os.open(tmp_path / "z", os.O_RDWR | os.O_CREAT, 0o600), _keys(), b"", None
    )
    bystander.write(0, os.urandom(2 * BLOCK_SIZE))
    before = (tmp_path / "z").read_bytes()

    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 0
    assert (tmp_path / "z").read_bytes() == before
    assert "for a not replayed" in caplog.text
    assert "or anywhere else: the file is gone" in caplog.text
    # Not a warning: nothing is lost that was not removed on purpose (found by review).
    gone = [r.levelno for r in caplog.records if "the file is gone" in r.getMessage()]
    assert gone and set(gone) == {logging.INFO}


def test_a_header_found_nowhere_is_a_warning_if_part_of_the_tree_was_not_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """"The file is gone" is INFO only when the search read everything: a file in a directory
    it could not read may be the record's, and is left unrepaired (found by review)."""
    caplog.set_level(logging.INFO)
    os.close(_torn_at(tmp_path, "a", monkeypatch)[2])
    os.unlink(tmp_path / "a")
    (tmp_path / "unreadable").mkdir()
    real = journal._open_dir_unread

    def refusing(root_fd: int, below: bytes) -> int:
        if below == b"unreadable":
            raise PermissionError(13, "Permission denied")
        return real(root_fd, below)

    monkeypatch.setattr(journal, "_open_dir_unread", refusing)
    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 0
    gone = [r.levelno for r in caplog.records if "the file is gone" in r.getMessage()]
    assert gone and set(gone) == {logging.WARNING}


def test_one_walk_serves_every_record_whose_path_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two files torn (two daemons' worth of writes in flight), both moved: one walk."""
    log = WriteJournal(os.fsencode(tmp_path))
    old1, new1, fd1 = _torn_at(tmp_path, "a", monkeypatch, log)
    old2, new2, fd2 = _torn_at(tmp_path, "b", monkeypatch, log)
    os.close(fd1)
    os.close(fd2)
    (tmp_path / "d").mkdir()
    os.rename(tmp_path / "a", tmp_path / "d" / "a1")
    os.rename(tmp_path / "b", tmp_path / "d" / "b1")
    walks: list[set[bytes]] = []
    real = journal.find_headers

    def counted(root: bytes, headers: set[bytes], *rest: Any) -> dict[bytes, list[bytes]]:
        walks.append(headers)
        return real(root, headers, *rest)

    monkeypatch.setattr(journal, "find_headers", counted)
    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 2
    assert len(walks) == 1 and len(walks[0]) == 2
    assert _read(tmp_path / "d" / "a1", 0, 4 * BLOCK_SIZE) == _want(old1, new1)
    assert _read(tmp_path / "d" / "b1", 0, 4 * BLOCK_SIZE) == _want(old2, new2)


def test_a_record_found_by_its_header_keeps_its_place_newest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two live records of block 1: an older returned write (A) naming the file's path, and the
    torn one (B) naming a path the file no longer has (a rename that landed while its record was
    made). B must be applied first, as the newest: applying records found by header after the
    others would put the older A back into the torn block."""
    log = WriteJournal(os.fsencode(tmp_path))
    fd = os.open(tmp_path / "p", os.O_RDWR | os.O_CREAT, 0o600)
    content = FileContent(fd, _keys(), os.fsencode(tmp_path / "p"), log)
    old = os.urandom(4 * BLOCK_SIZE)
    content.write(0, old)
    a, b = b"A" * BLOCK_SIZE, b"B" * BLOCK_SIZE
    with monkeypatch.context() as patch:
        patch.setattr(WriteJournal, "done", lambda self, at: None)
        content.write(BLOCK_SIZE, a)  # returned; its record stays live (not marked yet)
    content.moved(os.fsencode(tmp_path / "p"), os.fsencode(tmp_path / "q"))  # no q on disk
    with monkeypatch.context() as patch:
        _die_at_first_page_boundary(patch)
        with pytest.raises(Killed):
            content.write(BLOCK_SIZE, b)
    os.close(fd)
    redo = [r for r in journal.live_records(os.fsencode(tmp_path)) if not r.tail]
    assert [r.path for r in redo] == [b"p", b"q"]

    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 1
    assert _read(tmp_path / "p", BLOCK_SIZE, BLOCK_SIZE) == b


def test_no_walk_when_every_record_holds_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The search costs nothing after an ordinary crash."""
    old, new, fd = _torn_at(tmp_path, "a", monkeypatch)
    os.close(fd)

    def no_walk(*args: Any) -> Any:
        raise AssertionError("the tree was walked")

    monkeypatch.setattr(journal, "find_headers", no_walk)
    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 1
    assert _read(tmp_path / "a", 0, 4 * BLOCK_SIZE) == _want(old, new)


def test_the_walk_moves_no_atime_and_skips_the_volumes_own_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading every file's header is not a read by a user (plaintext atimes are the
    ciphertext's); a ``kmsfs.*`` name (a temporary copy, say) is not a file of the volume."""
    old, new, fd = _torn_at(tmp_path, "a", monkeypatch)
    os.close(fd)
    (tmp_path / "d").mkdir()
    os.rename(tmp_path / "a", tmp_path / "d" / "b")
    shutil.copyfile(tmp_path / "d" / "b", tmp_path / "kmsfs.tmp.copy")  # not a second match
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "z").write_bytes(os.urandom(100))
    watched = [tmp_path / "e" / "z", tmp_path / "e", tmp_path / "d"]
    for path in watched:  # long ago: relatime would move them on any read
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns - TWO_DAYS * 10**9, st.st_mtime_ns))
    before = [path.stat().st_atime_ns for path in watched]

    assert journal.replay(os.fsencode(tmp_path), _keys().cipher) == 1
    assert [path.stat().st_atime_ns for path in watched] == before
    assert _read(tmp_path / "d" / "b", 0, 4 * BLOCK_SIZE) == _want(old, new)


# --- the source: the removal of the link a record names -------------------------------------


def _relative(ops: KmsfsOps, path: bytes) -> bytes:
    return os.path.relpath(path, ops.table.root_path)


async def _remove_a(ops: KmsfsOps, removal: str) -> None:
    """Remove the link ``a`` in the root: ``rm a``, or ``mv x a`` over it."""
    root = pyfuse3.ROOT_INODE
    if removal == "unlink":
        await ops.unlink(root, b"a", CTX)
    else:
        x, _ = await ops.create(root, b"x", 0o100644, os.O_RDWR | os.O_CREAT, CTX)
        await ops.release(x.fh)
        await ops.rename(root, b"x", root, b"a", 0, CTX)


@pytest.mark.parametrize("removal", ["unlink", "renamed over"])
def test_removing_the_link_records_name_switches_them_to_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, removal: str
) -> None:
    """The reviewer's case: ``ln a b``, open b (records name a, the link the table learned
    first), ``rm a`` (or ``mv x a``): the next record names b."""
    ops = KmsfsOps(make_volume(tmp_path / "c"), SoftDeriver())
    monkeypatch.setattr(WriteJournal, "done", lambda self, at: None)  # every record stays live
    root = pyfuse3.ROOT_INODE

    async def main() -> tuple[bytes, bytes]:
        info, attrs = await ops.create(root, b"a", 0o100644, os.O_RDWR | os.O_CREAT, CTX)
        await ops.write(info.fh, 0, os.urandom(4 * BLOCK_SIZE))
        await ops.release(info.fh)
        await ops.link(attrs.st_ino, root, b"b", CTX)
        b = await ops.lookup(root, b"b", CTX)
        fh = (await ops.open(b.st_ino, os.O_RDWR, CTX)).fh
        a_path = ops.table.path(b.st_ino)
        await ops.write(fh, 4000, b"before")
        await _remove_a(ops, removal)
        await ops.write(fh, 4000, b"after")
        b_path = ops.table.path(b.st_ino)
        await ops.release(fh)
        return a_path, b_path

    a_path, b_path = trio.run(main)
    assert a_path != b_path and os.path.exists(b_path)
    records = [r for r in journal.live_records(ops.table.root_path) if not r.tail]
    assert [r.path for r in records] == [_relative(ops, a_path), _relative(ops, b_path)]


def test_a_write_torn_after_rm_of_the_first_link_is_put_back_by_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's reproduction in process: write a, ln a b, open b, fsync, rm a, a torn
    overwrite. The replay puts the block back at b's path, with no walk of the tree."""
    volume = make_volume(tmp_path / "c")
    ops = KmsfsOps(volume, SoftDeriver())
    root = pyfuse3.ROOT_INODE
    old = os.urandom(4 * BLOCK_SIZE)

    async def main() -> int:
        info, attrs = await ops.create(root, b"a", 0o100644, os.O_RDWR | os.O_CREAT, CTX)
        await ops.write(info.fh, 0, old)
        await ops.release(info.fh)
        ops.between_requests()  # the daemon's pause: the first write's tail record is done
        await ops.link(attrs.st_ino, root, b"b", CTX)
        b = await ops.lookup(root, b"b", CTX)
        fh = (await ops.open(b.st_ino, os.O_RDWR, CTX)).fh
        await ops.fsync(fh, False)
        await ops.unlink(root, b"a", CTX)
        with monkeypatch.context() as patch:
            _die_at_first_page_boundary(patch)
            with pytest.raises(Killed):
                await ops.write(fh, 4000, b"N" * 100)
        return b.st_ino

    trio.run(main)

    def no_walk(*args: Any) -> Any:
        raise AssertionError("the tree was walked")

    monkeypatch.setattr(journal, "find_headers", no_walk)
    assert journal.replay(os.fsencode(volume), ContentKeys(SoftDeriver(), True).cipher) == 1
    ops2 = KmsfsOps(volume, SoftDeriver())

    async def read_back() -> bytes:
        b = await ops2.lookup(root, b"b", CTX)
        fh = (await ops2.open(b.st_ino, os.O_RDONLY, CTX)).fh
        return bytes(await ops2.read(fh, 0, len(old)))

    # Block 0 (cut at the page boundary) is put back whole; block 1 was never reached.
    assert trio.run(read_back) == old[:4000] + b"N" * 96 + old[BLOCK_SIZE:]


def test_removing_a_link_of_a_closed_file_does_no_more_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rm -rf must not get slower: a removed link of a file that is not open looks for no
    other path (a guard of the cost, not of the fix)."""
    ops = KmsfsOps(make_volume(tmp_path / "c"), SoftDeriver())
    root = pyfuse3.ROOT_INODE

    async def main() -> None:
        info, attrs = await ops.create(root, b"a", 0o100644, os.O_RDWR | os.O_CREAT, CTX)
        await ops.release(info.fh)
        await ops.link(attrs.st_ino, root, b"b", CTX)
        real = ops.table.path

        def path(ino: int) -> bytes:
            assert ino != attrs.st_ino, "looked for another path of a closed file"
            return real(ino)

        with monkeypatch.context() as patch:
            patch.setattr(ops.table, "path", path)
            await ops.unlink(root, b"a", CTX)

    trio.run(main)


@pytest.mark.parametrize("removal", ["unlink", "renamed over"])
def test_an_open_file_whose_last_link_is_gone_writes_no_more_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, removal: str
) -> None:
    """After a crash such a file is gone, so a record of it can only send the next mount on a
    walk of the whole volume for a header it cannot find (a file deleted while open, an
    editor's save by rename over the old file)."""
    ops = KmsfsOps(make_volume(tmp_path / "c"), SoftDeriver())
    monkeypatch.setattr(WriteJournal, "done", lambda self, at: None)  # every record stays live
    root = pyfuse3.ROOT_INODE

    async def main() -> None:
        info, _ = await ops.create(root, b"a", 0o100644, os.O_RDWR | os.O_CREAT, CTX)
        await ops.write(info.fh, 0, os.urandom(4 * BLOCK_SIZE))
        await ops.write(info.fh, 4000, b"before")  # an overwrite: recorded
        await _remove_a(ops, removal)
        await ops.write(info.fh, 4000, b"after")  # the file has no link: not recorded
        await ops.release(info.fh)

    trio.run(main)
    assert len([r for r in journal.live_records(ops.table.root_path) if not r.tail]) == 1
