"""The daemon (root) never changes a mode through a symlink.

Whoever can write the ciphertext tree (the owner of a volume that root mounts, say) can swap
an entry for a symlink between two of the daemon's calls on it. A chmod by path that followed
the link would give a file of root's the mode of the entry, set-user-ID bits included. These
tests make the swap happen at the worst moment and check the file the link leads to.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest

from kmsfs.fs import posix

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="own() gives ownership only as root")


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "shadow"
    path.write_bytes(b"root's secret")
    path.chmod(0o600)
    return path


def _swap_after_chown(monkeypatch: pytest.MonkeyPatch, entry: Path, victim: Path) -> None:
    """Right after the daemon's chown of *entry* (by path), put a symlink in its place."""
    real_chown = os.chown

    def chown_then_swap(target, uid, gid, **kw):  # type: ignore[no-untyped-def]
        real_chown(target, uid, gid, **kw)
        if os.fsdecode(target) == str(entry) and not entry.is_symlink():
            os.rename(entry, entry.with_name("moved"))
            entry.symlink_to(victim)

    monkeypatch.setattr(os, "chown", chown_then_swap)


@pytest.mark.parametrize(
    "call",
    [
        # set-id bits of a new FIFO, applied again after the chown that gives it its owner
        lambda fifo: posix.own(fifo, 1000, 1000, stat.S_IFIFO | 0o4755, os.path.dirname(fifo)),
        # the mode put back after a chown(-1, -1) that only moves the ctime
        lambda fifo: posix.touch_ctime(fifo, 0o4755),
    ],
    ids=["own", "touch_ctime"],
)
def test_a_mode_goes_to_the_entry_only(
    tmp_path: Path, victim: Path, monkeypatch: pytest.MonkeyPatch, call  # type: ignore[no-untyped-def]
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o644)
    _swap_after_chown(monkeypatch, fifo, victim)
    with contextlib.suppress(OSError, NotImplementedError):
        call(os.fsencode(fifo))
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
