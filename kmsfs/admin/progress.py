"""A one-line "what is happening now" on stderr, for slow admin commands (``init --hsms 16``
takes about a second per HSM).

The conventions of ``kmsfs``'s progress bar (kmsfs/fs/progress.py, which counts bytes): drawn
only when stderr is a terminal, so logs, pipes and tests never see control characters; a
carriage return and a redraw in place; erased before the result or an error is printed. It
shows step names only (never a PIN or a path to one).
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO


class Steps:
    """``steps("HSM 3 of 16")`` redraws ``PREFIX: HSM 3 of 16 ...``; ``close()`` erases it."""

    def __init__(self, prefix: str, stream: TextIO | None = None, wanted: bool = True) -> None:
        self._stream = stream if stream is not None else sys.stderr
        tty = hasattr(self._stream, "isatty") and self._stream.isatty()
        self.enabled = wanted and tty
        self._prefix = prefix
        self._drawn = False

    def __call__(self, what: str) -> None:
        if not self.enabled:
            return
        self._stream.write(f"\r{self._prefix}: {what} ...\033[K")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._drawn = False

    def __enter__(self) -> Steps:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
