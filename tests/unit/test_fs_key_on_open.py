"""The key of a file opened for reading is derived in the pause after the open, without FUSE.

After the daemon answers an OPEN, the client has to turn the reply into a READ; the daemon
derives the file's key (an HSM call) meanwhile (OpenFiles.key_one, called from the spin's idle
hook), so the READ does not wait for it. What a user relies on: the read then returns the
file's bytes with no derivation of its own; only files opened to be read are keyed, and only
while they are open (an open and close with no read in between costs one HSM call at most, a
write-only open none); the header is read as the daemon's own read, so atime stays until a
user reads; and a failure there stays there: the read that needs the key reports it.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from kmsfs.crypto.content import HEADER_SIZE, ContentCipher
from kmsfs.errors import HsmError
from kmsfs.fs.files import BlockIntegrityError, ContentKeys, FileContent
from kmsfs.fs.handles import KEY_QUEUE_SIZE, OpenFiles

DATA = os.urandom(20_000)


class _Deriver:
    """Derives like an HSM would (HMAC), counts calls, and can fail."""

    current_epoch = 1

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        if self.fail:
            raise HsmError("token removed")
        self.calls += 1
        return hmac.new(b"k" * 32, info, hashlib.sha256).digest()


@pytest.fixture
def deriver() -> _Deriver:
    return _Deriver()


@pytest.fixture
def files(deriver: _Deriver) -> Iterator[OpenFiles]:
    opened = OpenFiles(ContentKeys(deriver, key_epochs=True))
    yield opened
    opened.close_all()


def _encrypted(path: Path, deriver: _Deriver, data: bytes = DATA) -> bytes:
    """Write *data* as the ciphertext file *path*; its path as bytes. Resets the call count."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if data:
            FileContent(fd, ContentKeys(deriver, key_epochs=True)).write(0, data)
    finally:
        os.close(fd)
    deriver.calls = 0
    return bytes(path)


def _read(files: OpenFiles, fh: int) -> bytes:
    return bytes(files.handle(fh).file.content.read(0, len(DATA) + 100))


@pytest.mark.parametrize("flags", [os.O_RDONLY, os.O_RDWR, os.O_RDWR | os.O_APPEND])
def test_the_pause_after_an_open_derives_the_key_and_the_read_derives_none(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles, flags: int
) -> None:
    fh = files.open(5, _encrypted(tmp_path / "f", deriver), flags)
    assert deriver.calls == 0  # not on the open's path either
    assert files.key_one() is True
    assert deriver.calls == 1
    assert _read(files, fh) == DATA
    assert deriver.calls == 1
    assert files.key_one() is False  # nothing left to do


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_TRUNC])
def test_opens_that_will_not_read_are_not_keyed_ahead(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles, flags: int
) -> None:
    files.open(5, _encrypted(tmp_path / "f", deriver), flags)
    assert files.key_one() is False
    assert deriver.calls == 0


def test_a_created_file_is_not_keyed_ahead(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles
) -> None:
    fd = os.open(tmp_path / "new", os.O_RDWR | os.O_CREAT, 0o600)
    files.open(5, bytes(tmp_path / "new"), os.O_RDWR, fd=fd)
    assert files.key_one() is False
    assert deriver.calls == 0


def test_a_file_closed_before_the_pause_and_an_empty_file_cost_no_derivation(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles
) -> None:
    fh = files.open(5, _encrypted(tmp_path / "f", deriver), os.O_RDONLY)
    files.release(fh)
    # Its fd number goes to the next file opened (write-only here: not keyed ahead).
    files.open(6, _encrypted(tmp_path / "g", deriver), os.O_WRONLY)
    assert files.key_one() is False
    files.open(7, _encrypted(tmp_path / "empty", deriver, b""), os.O_RDONLY)
    assert files.key_one() is False
    assert deriver.calls == 0


def test_a_file_busy_in_a_worker_thread_is_left_to_it(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles
) -> None:
    fh = files.open(5, _encrypted(tmp_path / "f", deriver), os.O_RDONLY)
    lock = files.handle(fh).file.lock

    async def busy() -> bool:
        lock.acquire_nowait()  # as a big read does while its worker thread runs
        try:
            return files.key_one()
        finally:
            lock.release()

    assert trio.run(busy) is False
    assert deriver.calls == 0
    assert _read(files, fh) == DATA
    assert deriver.calls == 1


def test_a_key_goes_with_the_last_close_even_while_the_file_waits_to_be_keyed(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles
) -> None:
    first = files.open(5, _encrypted(tmp_path / "a", deriver), os.O_RDONLY)
    files.open(6, _encrypted(tmp_path / "b", deriver), os.O_RDONLY)  # keyed first: newest
    assert _read(files, first) == DATA  # its own read derives its key
    content = weakref.ref(files.handle(first).file.content)
    header = files.handle(first).file.content._cipher.header  # type: ignore[union-attr]
    files.release(first)
    gc.collect()
    assert content() is None  # nothing holds the closed file, nor its key:
    # no cipher of it is left anywhere (one kept apart from its file survived the check above)
    assert not [o for o in gc.get_objects() if isinstance(o, ContentCipher)
                and o.header.file_id == header.file_id]
    assert files.key_one() is True  # the other one
    assert files.key_one() is False


def test_the_newest_open_is_keyed_first_and_a_burst_keeps_only_the_newest(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles
) -> None:
    count = KEY_QUEUE_SIZE + 3
    handles = [
        files.open(100 + i, _encrypted(tmp_path / f"f{i}", deriver), os.O_RDONLY)
        for i in range(count)
    ]
    assert files.key_one() is True
    assert files.handle(handles[-1]).file.content.load_key() is False  # already has its key
    keyed = 1 + sum(files.key_one() for _ in range(count))
    assert keyed == deriver.calls == KEY_QUEUE_SIZE
    assert files.handle(handles[0]).file.content.load_key() is True  # the oldest fell out
    assert all(_read(files, fh) == DATA for fh in handles)
    assert deriver.calls == KEY_QUEUE_SIZE + 3  # the ones left out: keyed by their read


def test_keying_ahead_leaves_atime_alone_and_a_read_still_moves_it(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles
) -> None:
    path = _encrypted(tmp_path / "f", deriver)
    old = os.stat(path).st_mtime - 3 * 86400  # relatime would move an atime this old
    os.utime(path, (old, os.stat(path).st_mtime))
    fh = files.open(5, path, os.O_RDONLY)
    assert files.key_one() is True
    assert os.stat(path).st_atime == old
    _read(files, fh)
    assert os.stat(path).st_atime > old


def test_a_failed_derivation_is_left_for_the_read_to_report(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles
) -> None:
    fh = files.open(5, _encrypted(tmp_path / "f", deriver), os.O_RDONLY)
    deriver.fail = True
    assert files.key_one() is False  # no exception in the daemon's wait
    with pytest.raises(HsmError, match="token removed"):
        _read(files, fh)
    deriver.fail = False
    assert _read(files, fh) == DATA


def test_a_damaged_header_is_left_for_the_read_to_report(
    tmp_path: Path, deriver: _Deriver, files: OpenFiles
) -> None:
    path = _encrypted(tmp_path / "f", deriver)
    with open(path, "r+b") as f:
        f.write(b"\xff" * HEADER_SIZE)
    fh = files.open(5, path, os.O_RDONLY)
    assert files.key_one() is False
    with pytest.raises(BlockIntegrityError, match="bad header"):
        _read(files, fh)
    assert deriver.calls == 0
