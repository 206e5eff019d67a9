"""What was fsync'd survives kill -9 of the daemon (DESIGN.md 2.5)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def test_fsynced_data_survives_kill9(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    m = mount.mountpoint
    data = os.urandom(1_000_003)
    (m / "d").mkdir()
    fd = os.open(m / "d" / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    mount.kill9()
    with contextlib.suppress(OSError):  # the connection is gone; close may report it
        os.close(fd)
    mount.start()
    assert (m / "d" / "f").read_bytes() == data
    # The file is still writable and consistent after the crash.
    with open(m / "d" / "f", "r+b") as f:
        f.seek(4000)
        f.write(b"after")
    assert (m / "d" / "f").read_bytes()[4000:4005] == b"after"
