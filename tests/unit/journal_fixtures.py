"""What the write-journal tests share: a software deriver, the "daemon died here" signal, and
the page size a kill cuts writes at."""

import hashlib
import hmac

from kmsfs.fs.files import ContentKeys

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
