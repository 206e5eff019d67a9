"""A one-line progress bar on stderr, for long ``encrypt``, ``decrypt``, ``fsck`` and
``reencrypt`` runs.

Drawn only when stderr is a terminal and the job is big enough to be worth watching, so logs,
pipes and tests never see control characters (:class:`kmsfs.statusline.StatusLine`), at most
ten times a second.
"""

from __future__ import annotations

import time
from typing import TextIO

from kmsfs.statusline import StatusLine

MIN_BYTES = 4 * 1024 * 1024
"""Below this (when the total is known) a bar would only flicker."""
_INTERVAL = 0.1
_WIDTH = 24


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


class Progress(StatusLine):
    """Counts bytes done; ``total`` may be None for a pipe (then bytes and rate only)."""

    def __init__(
        self, label: str, total: int | None, stream: TextIO | None = None, force: bool = False
    ) -> None:
        super().__init__(stream, force)
        self._label, self._total = label, total
        self.enabled = self.on_terminal and (total is None or total >= MIN_BYTES)
        self._done = 0
        self._start = self._last = time.monotonic()

    @property
    def done(self) -> int:
        """Bytes counted so far."""
        return self._done

    def advance(self, n: int) -> None:
        self._done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= _INTERVAL and (self._total is not None or self._done >= MIN_BYTES):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self._done / max(now - self._start, 1e-6) / 1e6
        if self._total:
            frac = min(self._done / self._total, 1.0)
            bar = "#" * int(frac * _WIDTH)
            text = (
                f"{self._label} [{bar:<{_WIDTH}}] {frac:4.0%} "
                f"{_mib(self._done)} / {_mib(self._total)}  {rate:.0f} MB/s"
            )
        else:
            text = f"{self._label} {_mib(self._done)}  {rate:.0f} MB/s"
        self._show(text)
