"""The write journal's replay never leaves the ciphertext directory (docs/threat-model.md, §1).

A cryptography review found that the replay, run as root before a mount serves, followed a
symlink in a directory of a record's path (only the last name was opened O_NOFOLLOW): a symlink
planted in the ciphertext directory and a crafted record in ``kmsfs.journal`` made it write a
block into a file outside the volume (one with the record's header whose block was damaged: a
copy of the volume elsewhere, say). Now every path the replay opens, a record's or one its
search by header lists, is resolved below a descriptor of the root following no symlink
(kmsfs.fs.longpath.open_dir_beneath: openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, or one
O_NOFOLLOW | O_DIRECTORY open per directory on a kernel without it). A record whose path
crosses a symlink is skipped with a log line naming it; the rest of the journal is replayed.

The unit-level tests run each case through both resolvers; the mounts run the real daemon
(kill -9 included) with the default one, and a deep tree with both.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs.crypto.content import (
    BLOCK_SIZE,
    CIPHER_BLOCK_SIZE,
    HEADER_SIZE,
    ContentCipher,
    FileHeader,
    cipher_offset,
)
from kmsfs.errors import IntegrityError
from kmsfs.fs import journal, longpath
from kmsfs.fs.files import BlockIntegrityError, FileContent
from kmsfs.fs.journal import WriteJournal, live_records
from kmsfs.fs.longpath import PATH_MAX, SymlinkOnPath, open_dir_beneath, reach
from tests.integration import test_fs_journal_links_mount
from tests.integration.test_fs_integrity import cipher_path
from tests.unit.journal_fixtures import Killed, _die_at_first_page_boundary, _keys

#: A name like a ciphertext one, for the planted symlink (the reviewer's).
PLANTED = "AAAAAAAAAAAAAAAAAAAAAAAAA"


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each case with openat2, then with the walk a kernel without it gets; checks at the end
    that the one named was the one used."""
    calls: list[bytes] = []
    real = longpath._openat2
    if request.param == "openat2":
        if not longpath._have_openat2:
            pytest.skip("no openat2 on this kernel or architecture")

        def spied(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
            calls.append(path)
            return real(dir_fd, path, flags, resolve)

        monkeypatch.setattr(longpath, "_openat2", spied)
    else:
        def refused(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
            calls.append(path)
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(longpath, "_openat2", refused)
        monkeypatch.setattr(longpath, "_have_openat2", True)  # learns ENOSYS on first use
    yield request.param
    assert calls, f"{request.param}: the replay resolved no path through open_dir_beneath"
    if request.param == "walk":
        assert len(calls) == 1  # ENOSYS once, then the walk only




def _torn(volume: Path, path: bytes, fd: int) -> tuple[bytes, bytes]:
    """Four blocks written to the file open as *fd* (at *path*), then an overwrite of block 1
    cut by a kill, with its record in *volume*'s journal. Returns (old content, new block)."""
    old = os.urandom(4 * BLOCK_SIZE)
    FileContent(fd, _keys(), path, None).write(0, old)  # unrecorded: the overwrite's is record 1
    log = WriteJournal(os.fsencode(volume))
    content = FileContent(fd, _keys(), path, log)
    new = os.urandom(BLOCK_SIZE)
    with pytest.MonkeyPatch.context() as patch:
        _die_at_first_page_boundary(patch)
        with pytest.raises(Killed):
            content.write(BLOCK_SIZE, new)
    return old, new


def _read(path: bytes, size: int = 4 * BLOCK_SIZE) -> bytes:
    fd = os.open(reach(path), os.O_RDONLY)
    try:
        return bytes(FileContent(fd, _keys(), path, None).read(0, size))
    finally:
        os.close(fd)


def _cipher(header: FileHeader) -> ContentCipher:
    return _keys().cipher(header)


def _victim(outside: Path) -> tuple[Path, bytes, bytes, bytes]:
    """The reviewer's target: a file outside the volume whose block 0 is damaged, and an
    authentic block 0 of it for a record. Returns (file, its bytes, header, the block)."""
    header = FileHeader.new(1)
    cipher = _cipher(header)
    old_block = cipher.encrypt_block(0, b"OLD version of the data")
    new_block = cipher.encrypt_block(0, b"new version of the data")
    victim = outside / "file"
    victim.write_bytes(header.pack() + new_block[:10] + b"\xff" + new_block[11:])
    return victim, victim.read_bytes(), header.pack(), old_block


def _append_record(volume: Path, path: bytes, header: bytes, block: bytes) -> None:
    """A crafted live record for block 0: after the journal's live ones, or alone."""
    journal_path = volume / journal.JOURNAL_NAME
    raw = journal_path.read_bytes() if journal_path.exists() else b""
    records = journal.parse(raw)
    if not records:
        raw = b""  # records marked done (or nothing): ours starts the journal again
    sequence = records[-1].sequence + 1 if records else 1
    # Right after the last record, not after the zeros of the mount's reserve (a reader
    # stops at those).
    end = sum(len(journal.encode(r.sequence, r.path, r.header, r.offset, r.data,
                                 journal.TAIL if r.tail else journal.LIVE)) for r in records)
    assert journal.parse(raw[:end]) == records
    journal_path.write_bytes(
        raw[:end] + journal.encode(sequence, path, header, cipher_offset(0), block)
    )


def _deep_dirs(top: Path, below: int) -> tuple[bytes, int]:
    """Directories of 200-byte names under *top* until the path below it passes *below* bytes
    (longer than PATH_MAX paths do not fit: made through descriptors). Returns (the path below
    *top*, a descriptor of the deepest)."""
    at = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    rel = b""
    while len(rel) < below:
        name = b"d" * 199 + str(len(rel) // 200 % 10).encode()
        os.mkdir(name, dir_fd=at)
        deeper = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=at)
        os.close(at)
        at, rel = deeper, rel + name + b"/"
    return rel.rstrip(b"/"), at


# --- the reviewer's attack, at the replay -------------------------------------------------


@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_the_reviewers_record_writes_nothing_outside_the_volume(
    tmp_path: Path, resolver: str, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The reproducer of the review: a symlink planted in the ciphertext root leads to a file
    of another volume whose block 0 is damaged; a record names a path through it with an
    authentic block 0. The replay leaves that file as it was, names the record in its log,
    and still puts back an honest torn block recorded in the same journal."""
    volume, outside = tmp_path / "vol", tmp_path / "elsewhere"
    volume.mkdir()
    outside.mkdir()
    victim, before, header, block = _victim(outside)
    os.symlink(outside if target == "absolute" else "../elsewhere", volume / PLANTED)
    fd = os.open(volume / "honest", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        old, new = _torn(volume, os.fsencode(volume / "honest"), fd)
    finally:
        os.close(fd)
    _append_record(volume, PLANTED.encode() + b"/file", header, block)
    caplog.set_level(logging.WARNING)

    assert journal.replay(os.fsencode(volume), _cipher) == 1  # the honest block only
    assert victim.read_bytes() == before
    assert f"record 2 for {PLANTED}/file not replayed" in caplog.text
    assert f"a symlink on the path, at {PLANTED}" in caplog.text
    assert _read(os.fsencode(volume / "honest")) == old[:BLOCK_SIZE] + new + old[2 * BLOCK_SIZE :]
    assert (volume / journal.JOURNAL_NAME).stat().st_size == 0


@pytest.mark.parametrize("depth", ["shallow", "beyond PATH_MAX"])
def test_a_symlink_deeper_in_a_records_path_is_not_followed(
    tmp_path: Path, resolver: str, depth: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The symlink in place of a directory further down (past PATH_MAX too, where the path is
    resolved in pieces): not followed, and the log names where it is."""
    volume, outside = tmp_path / "vol", tmp_path / "elsewhere"
    volume.mkdir()
    outside.mkdir()
    victim, before, header, block = _victim(outside)
    if depth == "shallow":
        (volume / "a" / "b").mkdir(parents=True)
        rel = b"a/b"
    else:
        rel, at = _deep_dirs(volume, 2 * PATH_MAX)
        os.close(at)
    link = rel + b"/" + PLANTED.encode()
    os.symlink(outside, reach(os.fsencode(volume) + b"/" + link))
    _append_record(volume, link + b"/file", header, block)
    caplog.set_level(logging.WARNING)

    assert journal.replay(os.fsencode(volume), _cipher) == 0
    assert victim.read_bytes() == before
    assert "record 1 for " in caplog.text and "not replayed" in caplog.text
    assert f"a symlink on the path, at {os.fsdecode(link)})" in caplog.text


def test_a_symlink_to_a_directory_of_the_volume_is_not_followed_either(
    tmp_path: Path, resolver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The daemon's own records never cross a ciphertext symlink (the kernel resolves the
    plaintext ones above it), so a record that does is not the daemon's, wherever it leads."""
    volume = tmp_path / "vol"
    (volume / "real").mkdir(parents=True)
    fd = os.open(volume / "real" / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _torn(volume, os.fsencode(volume / "real" / "f"), fd)
    finally:
        os.close(fd)
    good = journal.parse((volume / journal.JOURNAL_NAME).read_bytes())[-1]
    os.symlink("real", volume / "alias")
    (volume / journal.JOURNAL_NAME).write_bytes(
        journal.encode(1, b"alias/f", good.header, good.offset, good.data)
    )
    caplog.set_level(logging.WARNING)

    assert journal.replay(os.fsencode(volume), _cipher) == 0
    assert "record 1 for alias/f not replayed (a symlink on the path, at alias)" in caplog.text
    with pytest.raises(BlockIntegrityError):
        _read(os.fsencode(volume / "real" / "f"))


# --- the search by header ------------------------------------------------------------------


def test_the_search_by_header_never_enters_a_symlink(
    tmp_path: Path, resolver: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A record whose path is empty sends the replay looking for its header through the
    tree. A symlink planted there (to a directory holding a file with that header) is not
    entered; nor is a directory swapped for one between its listing and its opening (the
    search lists a directory, then opens each subdirectory it found)."""
    volume, outside = tmp_path / "vol", tmp_path / "elsewhere"
    volume.mkdir()
    outside.mkdir()
    victim, before, header, block = _victim(outside)
    os.symlink(outside, volume / PLANTED)  # listed as a symlink: never a directory to enter
    (volume / "swapped").mkdir()
    _append_record(volume, b"gone", header, block)  # nothing at "gone": searched for
    real_scandir = os.scandir

    class Listed(list[Any]):
        def __enter__(self) -> Listed:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def scandir_then_swap(fd: Any) -> Any:
        with real_scandir(fd) as it:
            listed = Listed(it)
        if (volume / "swapped").is_dir() and not (volume / "swapped").is_symlink():
            os.rename(volume / "swapped", tmp_path / "moved-away")
            os.symlink(outside, volume / "swapped")
        return listed

    caplog.set_level(logging.INFO)
    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", scandir_then_swap)
        assert journal.replay(os.fsencode(volume), _cipher) == 0
    assert (volume / "swapped").is_symlink()  # the swap happened, after the root's listing

    assert victim.read_bytes() == before
    assert "record 1 for gone not replayed" in caplog.text
    assert "the file is gone" in caplog.text
    assert journal.find_headers(os.fsencode(volume), {header}) == {}


def test_a_file_moved_deep_is_still_found_by_its_header(
    tmp_path: Path, resolver: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Honest use of the search: the record names a path the file no longer has (``ln a
    DEEP/b; rm a``), its new one is past PATH_MAX; the search reaches it below the root."""
    volume = tmp_path / "vol"
    volume.mkdir()
    fd = os.open(volume / "a", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        old, new = _torn(volume, os.fsencode(volume / "a"), fd)
    finally:
        os.close(fd)
    rel, at = _deep_dirs(volume, 2 * PATH_MAX)
    try:
        os.link(volume / "a", b"b", dst_dir_fd=at)
    finally:
        os.close(at)
    os.unlink(volume / "a")
    caplog.set_level(logging.WARNING)

    assert journal.replay(os.fsencode(volume), _cipher) == 1
    moved = os.fsencode(volume) + b"/" + rel + b"/b"
    assert _read(moved) == old[:BLOCK_SIZE] + new + old[2 * BLOCK_SIZE :]
    assert f"found by its header at {os.fsdecode(rel)}/b" in caplog.text
    assert "not replayed" not in caplog.text


# --- honest replay, deep --------------------------------------------------------------------


def test_a_torn_block_of_a_file_past_path_max_is_put_back(tmp_path: Path, resolver: str) -> None:
    """A record's path longer than PATH_MAX (kmsfs.fs.longpath) is resolved in pieces, each
    below the last, and its file repaired."""
    volume = tmp_path / "vol"
    volume.mkdir()
    rel, at = _deep_dirs(volume, 3 * PATH_MAX)
    try:
        fd = os.open(b"f", os.O_RDWR | os.O_CREAT, 0o600, dir_fd=at)
    finally:
        os.close(at)
    path = os.fsencode(volume) + b"/" + rel + b"/f"
    try:
        old, new = _torn(volume, path, fd)
    finally:
        os.close(fd)
    assert len(live_records(os.fsencode(volume))[-1].path) > 3 * PATH_MAX

    assert journal.replay(os.fsencode(volume), _cipher) == 1
    assert _read(path) == old[:BLOCK_SIZE] + new + old[2 * BLOCK_SIZE :]


def test_open_dir_beneath_refuses_what_is_not_a_path_below_the_root(tmp_path: Path) -> None:
    root = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    (tmp_path / "d").mkdir()
    os.symlink("d", tmp_path / "s")
    try:
        for bad in (b"/etc", b"d/../..", b"..", b"d/\0x"):
            with pytest.raises(OSError) as caught:
                open_dir_beneath(root, bad)
            assert caught.value.errno == errno.EINVAL
        with pytest.raises(SymlinkOnPath) as link:
            open_dir_beneath(root, b"s")  # the last name is not followed either
        assert link.value.errno == errno.ELOOP and link.value.where == b"s"
        for fine in (b"", b".", b"d", b"./d/"):
            os.close(open_dir_beneath(root, fine))
    finally:
        os.close(root)


# --- real mounts ---------------------------------------------------------------------------

tearing = test_fs_journal_links_mount.tearing  # the fixture: a stub daemon that tears and dies



def test_a_mount_given_the_reviewers_record_writes_nothing_outside_and_serves(  # type: ignore[no-untyped-def]
    volume: Path, mounter, tmp_path: Path
) -> None:
    """The attack against a real daemon: a copy of one of the volume's files elsewhere, with
    block 0 damaged; a symlink to its directory planted in the ciphertext root; a record
    through it with the file's authentic block 0. The mount replays, skips that record with a
    log line, serves, and the copy outside is untouched."""
    mount = mounter(volume)
    data = os.urandom(2 * BLOCK_SIZE)
    (mount.mountpoint / "f").write_bytes(data)
    mount.stop()
    raw = cipher_path(volume, "f").read_bytes()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    copy = bytearray(raw)
    copy[HEADER_SIZE + 40] ^= 1  # its block 0 damaged: what a record may put back
    (outside / "file").write_bytes(copy)
    os.symlink(outside, volume / PLANTED)
    block0 = raw[HEADER_SIZE : HEADER_SIZE + CIPHER_BLOCK_SIZE]
    _append_record(volume, PLANTED.encode() + b"/file", raw[:HEADER_SIZE], block0)

    mount.start()
    assert (outside / "file").read_bytes() == bytes(copy)
    assert (mount.mountpoint / "f").read_bytes() == data
    log = mount.log()
    assert f"record 1 for {PLANTED}/file not replayed (a symlink on the path, at {PLANTED})" in log
    assert "put back" not in log
    assert b"KJR1" not in (volume / journal.JOURNAL_NAME).read_bytes()  # emptied (its reserve)


@pytest.mark.parametrize("resolution", ["openat2", "walk"])
def test_a_torn_write_deep_in_the_tree_is_put_back_after_kill9(  # type: ignore[no-untyped-def]
    volume: Path, mounter, tearing: Path, monkeypatch: pytest.MonkeyPatch, resolution: str
) -> None:
    """Honest replay through a real daemon killed in the middle of an overwrite, of a file
    whose ciphertext path is far past PATH_MAX (its plaintext path is not): the next mount
    resolves the record's path below the root, in pieces, and puts the torn block back."""
    if resolution == "walk":
        monkeypatch.setenv("KMSFS_TEST_NO_OPENAT2", "1")
    elif not longpath._have_openat2:
        pytest.skip("no openat2 on this kernel or architecture")
    mount = mounter(volume)
    m = mount.mountpoint
    deep = m
    while len(str(deep)) - len(str(m)) < 1500:  # 8-byte names: ~4 times that in ciphertext
        deep = deep / f"ddddddd{len(deep.parts) % 10}"
        deep.mkdir()
    old = bytes(range(256)) * 64
    (deep / "f").write_bytes(old)
    fd = os.open(deep / "f", os.O_RDWR)
    os.fsync(fd)
    tearing.touch()
    try:
        with contextlib.suppress(OSError):  # the daemon is gone: ENOTCONN or the like
            os.pwrite(fd, b"N" * 100, 4000)  # blocks 0 and 1: the daemon dies inside block 0
        with contextlib.suppress(OSError):
            os.close(fd)
    finally:
        tearing.unlink()
    mount.kill9()
    records = live_records(os.fsencode(volume))
    assert records and len(records[-1].path) > PATH_MAX

    mount.start()
    # Block 0 gets the write whole (put back from the record); block 1 was never reached.
    assert (deep / "f").read_bytes() == old[:4000] + b"N" * 96 + old[4096:]
    log = mount.log()
    assert "block(s) torn by an interrupted write put back" in log
    assert "not replayed" not in log


def test_the_victim_is_one_a_followed_record_would_repair(tmp_path: Path) -> None:
    """The file the tests put outside is one a record followed there would change: its block
    0 does not authenticate, the record's does (else the tests above would prove nothing)."""
    victim, _, header, block = _victim(tmp_path)
    cipher = _cipher(FileHeader.parse(header))
    assert cipher.decrypt_block(0, block) == b"OLD version of the data"
    with pytest.raises(IntegrityError):
        cipher.decrypt_block(0, victim.read_bytes()[HEADER_SIZE:])
