"""Creating and checking a ciphertext directory (a *volume*) and its mount point.

Every check here runs before anything is mounted or written, and fails with one
:class:`~kmsfs.errors.KmsfsError` line that names the path, so ``kmsfs`` can print it as is.
"""

from __future__ import annotations

import os
from pathlib import Path

from kmsfs.errors import KmsfsError, UsageError
from kmsfs.fs import config as volconfig
from kmsfs.fs.config import VolumeConfig
from kmsfs.fs.names import read_dir_iv, write_dir_iv


def create_volume(cipherdir: Path, config: VolumeConfig) -> None:
    """Make a new volume: CIPHERDIR must be missing or empty; writes the root IV and config."""
    cipherdir = Path(cipherdir)
    config.validate()
    if cipherdir.exists():
        if not cipherdir.is_dir():
            raise UsageError(f"{cipherdir}: not a directory")
        if any(cipherdir.iterdir()):
            raise UsageError(f"{cipherdir}: not empty (a new volume needs an empty directory)")
    else:
        cipherdir.mkdir(mode=0o700, parents=False)
    write_dir_iv(os.fsencode(cipherdir))
    volconfig.save(cipherdir, config)


def open_volume(cipherdir: Path) -> VolumeConfig:
    """Load and validate the config and the root directory IV of an existing volume."""
    cipherdir = Path(cipherdir)
    if not cipherdir.is_dir():
        raise UsageError(f"{cipherdir}: no such directory")
    config = volconfig.load(cipherdir)
    try:
        read_dir_iv(os.fsencode(cipherdir))
    except KmsfsError as exc:
        raise KmsfsError(f"{cipherdir}: {exc}") from None
    return config


def check_mountpoint(mountpoint: Path) -> None:
    """The mount point must be an existing, empty directory that is not already a mount."""
    mountpoint = Path(mountpoint)
    if not mountpoint.exists():
        raise UsageError(f"mount point {mountpoint}: no such directory")
    if not mountpoint.is_dir():
        raise UsageError(f"mount point {mountpoint}: not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"mount point {mountpoint}: already a mount point")
    try:
        if any(mountpoint.iterdir()):
            raise UsageError(f"mount point {mountpoint}: not empty")
    except PermissionError:
        raise UsageError(f"mount point {mountpoint}: not readable") from None
