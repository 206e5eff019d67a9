"""Crash-safe writes: temporary file, fsync, then link or rename, then fsync the directory.

Used by the store (immutable documents), the volume config and the single-file tools.

Documents are immutable, so ``write_new`` publishes with link(2), which fails if the name
exists: two admin commands racing to write the same name cannot overwrite each other, and a
content-addressed document written twice with the same bytes is simply already there.
"""

import contextlib
import os
import tempfile
from pathlib import Path

from kmsfs.errors import AlreadyExistsError


def fsync_dir(directory: Path | bytes) -> None:
    """Make a rename or link inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_with(directory: Path, data: bytes, mode: int, prefix: str = ".tmp-") -> Path:
    fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    return Path(name)


def write_new(
    path: Path, data: bytes, mode: int = 0o644, temp_prefix: str = ".tmp-", parents: bool = True
) -> bool:
    """Publish ``data`` at ``path`` unless it exists. Return True if written, False if the same
    bytes were already there; AlreadyExistsError if different bytes are.

    ``parents=False`` leaves a missing directory missing (FileNotFoundError): in a ciphertext
    tree a directory is never made without its IV."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_with(path.parent, data, mode, temp_prefix)
    try:
        os.link(temp, path)
    except FileExistsError:
        if path.read_bytes() == data:
            return False
        raise AlreadyExistsError(
            f"{path} already exists (documents are never overwritten)"
        ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
    fsync_dir(path.parent)
    return True


def replace(
    path: Path, data: bytes, mode: int = 0o644, temp_prefix: str = ".tmp-", parents: bool = True
) -> None:
    """Atomically replace ``path`` with ``data`` (for the few mutable files); ``parents`` as for
    :func:`write_new`."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_with(path.parent, data, mode, temp_prefix)
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise
    fsync_dir(path.parent)
