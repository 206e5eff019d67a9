"""What the write-journal tests share: a software deriver, the "daemon died here" signal, and
the page size a kill cuts writes at."""

import hashlib
import hmac

import pytest

from kmsfs.fs import files
from kmsfs.fs.files import ContentKeys
from kmsfs.fs.journal import WriteJournal

#: A kill cuts a buffered write at a page boundary (kmsfs.fs.journal).
PAGE = 4096


class _Deriver:
    current_epoch = 1

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        return hmac.new(b"k" * 32, info, hashlib.sha256).digest()


class Killed(BaseException):
    """The daemon got SIGKILL: nothing after this point runs."""


def _keys() -> ContentKeys:
    return ContentKeys(_Deriver(), key_epochs=True)


def _die_at_first_page_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next data pwrite stops at its first page boundary, then the daemon dies; the journal
    never hears that the write ended."""
    real = files._pwrite_fully

    def cut(fd: int, view: memoryview, offset: int) -> None:
        boundary = (offset // PAGE + 1) * PAGE
        real(fd, view[: boundary - offset], offset)
        raise Killed

    monkeypatch.setattr(files, "_pwrite_fully", cut)
    monkeypatch.setattr(WriteJournal, "done", lambda self, at: None)
