"""Opening a file for reading starts reading its ciphertext's start (kmsfs.fs.handles.prefetch).

The first READ of a file needs its header and first block from the disk; asking for them at
open overlaps that disk read with the OPEN reply and the READ request. What must hold: every
open that will read asks once, for the file's start; opens that will not read (write-only,
truncating, a create's fresh file) do not; and a file system that refuses the advice still
opens the file.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
from pathlib import Path

import pytest

from kmsfs.fs import handles
from kmsfs.fs.files import ContentKeys
from kmsfs.fs.handles import PREFETCH_BYTES, OpenFiles


class _Deriver:
    current_epoch = 1

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        return hmac.new(b"k" * 32, info, hashlib.sha256).digest()


@pytest.fixture
def advice(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int, int]]:
    calls: list[tuple[int, int, int, int]] = []

    def record(fd: int, offset: int, length: int, what: int) -> None:
        calls.append((fd, offset, length, what))

    monkeypatch.setattr(handles.os, "posix_fadvise", record)
    return calls


def _files() -> OpenFiles:
    return OpenFiles(ContentKeys(_Deriver(), key_epochs=True))


@pytest.mark.parametrize(
    ("flags", "reads"),
    [
        (os.O_RDONLY, True),
        (os.O_RDWR, True),
        (os.O_RDWR | os.O_APPEND, True),
        (os.O_WRONLY, False),
        (os.O_WRONLY | os.O_APPEND, False),
        (os.O_RDWR | os.O_TRUNC, False),
    ],
)
def test_only_an_open_that_will_read_the_start_asks_for_it_once(
    tmp_path: Path, advice: list[tuple[int, int, int, int]], flags: int, reads: bool
) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(50_000))
    files = _files()
    fh = files.open(7, bytes(path), flags)
    fd = files.handle(fh).file.fd
    assert advice == ([(fd, 0, PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)] if reads else [])
    files.open(7, bytes(path), os.O_RDONLY)  # a second handle shares the fd: nothing new
    assert len(advice) == int(reads)
    files.close_all()


def test_a_created_file_asks_nothing(
    tmp_path: Path, advice: list[tuple[int, int, int, int]]
) -> None:
    fd = os.open(tmp_path / "new", os.O_RDWR | os.O_CREAT, 0o600)
    files = _files()
    files.open(7, bytes(tmp_path / "new"), os.O_RDWR, fd=fd)
    assert advice == []
    files.close_all()


def test_a_file_system_that_refuses_the_advice_still_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: int) -> None:
        raise OSError(errno.ESPIPE, "no advice here")

    monkeypatch.setattr(handles.os, "posix_fadvise", refuse)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    files = _files()
    fh = files.open(7, bytes(path), os.O_RDONLY)
    assert os.pread(files.handle(fh).file.fd, 100, 0) == b"x" * 100
    files.close_all()
