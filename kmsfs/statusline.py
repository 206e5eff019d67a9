"""One line of status on stderr, redrawn in place, for the commands' long jobs.

Drawn only when stderr is a terminal, so logs, pipes and tests never see control characters: a
carriage return, the text and an erase to the end of the line; erased before the result or an
error is printed. :class:`Steps` says which step runs (``kmsfs-admin init``: about a second per
HSM); :class:`kmsfs.fs.progress.Progress` draws a byte-counting bar on the same line. Neither
ever shows a PIN or a path to one.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO


class StatusLine:
    """The line itself: :meth:`_show` redraws it, :meth:`close` erases it."""

    def __init__(self, stream: TextIO | None = None, force: bool = False) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.on_terminal = force or (hasattr(self._stream, "isatty") and self._stream.isatty())
        self._drawn = False

    def _show(self, text: str) -> None:
        self._stream.write("\r" + text + "\033[K")
        self._stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the line so the next one (a result or an error) starts clean."""
        if self._drawn:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._drawn = False

    def __enter__(self) -> StatusLine:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class Steps(StatusLine):
    """``steps("HSM 3 of 16")`` redraws ``PREFIX: HSM 3 of 16 ...``; ``wanted=False`` (--json)
    draws nothing."""

    def __init__(self, prefix: str, stream: TextIO | None = None, wanted: bool = True) -> None:
        super().__init__(stream)
        self.enabled = wanted and self.on_terminal
        self._prefix = prefix

    def __call__(self, what: str) -> None:
        if self.enabled:
            self._show(f"{self._prefix}: {what} ...")

    def __enter__(self) -> Steps:
        return self
