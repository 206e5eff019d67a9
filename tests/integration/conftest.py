"""Fixtures for real FUSE mounts (see fs_helpers.py); every mount is torn down even on failure."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fs_helpers import Mount, make_volume

INSTALL = Path(__file__).resolve().parents[2] / "tools" / "install-system.sh"


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    return make_volume(tmp_path / "cipher")


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[object]:
    """Factory: ``mounter(cipherdir)`` -> a started :class:`Mount`; all stopped at teardown."""
    mounts: list[Mount] = []

    def start(cipherdir: Path, name: str = "mnt", options: tuple[str, ...] = (),
              mountpoint: Path | None = None) -> Mount:
        m = Mount(cipherdir, mountpoint or tmp_path / name, tmp_path / f"{name}.log", options)
        mounts.append(m)
        return m.start()

    yield start
    for m in mounts:
        m.stop()


@pytest.fixture
def mnt(volume: Path, mounter) -> Mount:  # type: ignore[no-untyped-def]
    return mounter(volume)


@pytest.fixture(scope="module")
def installed() -> Iterator[None]:
    """tools/install-system.sh for the systemd tests: the links in /usr/local/bin and /usr/sbin
    (kmsfs-hsmd among them) and the units their ExecStart lines need; undone afterwards unless
    kmsfs was installed before."""
    already = Path("/usr/local/bin/kmsfs").exists()
    subprocess.run([str(INSTALL)], check=True, capture_output=True)
    yield
    if not already:
        subprocess.run([str(INSTALL), "--uninstall"], check=True)
