"""The stderr progress bar: silent unless asked for a terminal and a big enough job."""

import io

from kmsfs.fs import progress
from kmsfs.fs.progress import Progress


def test_silent_when_not_a_terminal_or_small() -> None:
    out = io.StringIO()
    bar = Progress("x", 1 << 30, stream=out)
    bar.advance(1 << 30)
    bar.close()
    assert out.getvalue() == "" and not bar.enabled and bar.done == 1 << 30
    assert not Progress("x", progress.MIN_BYTES - 1, stream=out, force=True).enabled


def test_draws_and_erases(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(progress, "_INTERVAL", 0.0)
    out = io.StringIO()
    bar = Progress("kmsfs: encrypt", 8 << 20, stream=out, force=True)
    bar.advance(4 << 20)
    assert "50%" in out.getvalue() and "4.0 MiB / 8.0 MiB" in out.getvalue()
    bar.close()
    assert out.getvalue().endswith("\r\033[K") and "\n" not in out.getvalue()
    pipe = Progress("kmsfs: decrypt", None, stream=io.StringIO(), force=True)
    pipe.advance(1)  # unknown total: nothing until MIN_BYTES have gone by
    assert pipe._stream.getvalue() == ""  # type: ignore[attr-defined]
