"""Access times through a real mount: ``-o noatime`` (and ``nodiratime``) keep reads and
listings from moving atime; without it a read moves it as on ext4 (relatime: an atime older
than mtime is brought up to date). The kernel leaves atime to the daemon, whose reads of the
ciphertext are what would move it.

Each read is made on a fresh mount, so that it reaches the daemon rather than the page cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

OLD = 1_000_000_000  # 1 s after the epoch: older than any mtime, so relatime would move it


@pytest.fixture
def prepared(volume: Path, mounter: Callable[..., object]) -> Path:
    """A volume holding ``d/f`` (5000 bytes), both with an atime of OLD, then unmounted."""
    m = mounter(volume, "setup")
    mp = m.mountpoint  # type: ignore[attr-defined]
    (mp / "d").mkdir()
    (mp / "d" / "f").write_bytes(b"x" * 5000)
    for path in (mp / "d" / "f", mp / "d"):
        os.utime(path, ns=(OLD, 2 * OLD))
    m.stop()  # type: ignore[attr-defined]
    return volume


def _read_and_list(mp: Path) -> tuple[int, int]:
    assert (mp / "d" / "f").read_bytes() == b"x" * 5000
    assert os.listdir(mp / "d") == ["f"]
    return os.stat(mp / "d" / "f").st_atime_ns, os.stat(mp / "d").st_atime_ns


def test_noatime_keeps_atime_on_reads_and_listings(
    prepared: Path, mounter: Callable[..., object]
) -> None:
    m = mounter(prepared, "quiet", options=("noatime",))
    assert _read_and_list(m.mountpoint) == (OLD, OLD)  # type: ignore[attr-defined]


def test_nodiratime_keeps_only_directories_atime(
    prepared: Path, mounter: Callable[..., object]
) -> None:
    m = mounter(prepared, "nodir", options=("nodiratime",))
    file_atime, dir_atime = _read_and_list(m.mountpoint)  # type: ignore[attr-defined]
    assert file_atime > OLD and dir_atime == OLD


def test_without_the_option_reads_and_listings_move_atime(
    prepared: Path, mounter: Callable[..., object]
) -> None:
    m = mounter(prepared, "plain")
    file_atime, dir_atime = _read_and_list(m.mountpoint)  # type: ignore[attr-defined]
    assert file_atime > OLD and dir_atime > OLD
