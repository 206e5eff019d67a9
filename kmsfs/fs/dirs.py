"""Ciphertext directories, made and removed in an order no crash can break (docs/format.md).

Every name in a directory is encrypted with its IV (``kmsfs.diriv``), so a visible directory
without its IV could never be read again. So a new directory is made under a hidden
``kmsfs.tmp.*`` name, gets its IV (fsync'd), owner and mode there, and only then is renamed into
place; a directory being removed (rmdir, or a rename onto it) is first renamed to a hidden name,
then emptied and removed. A crash, of the daemon or of the machine, at any step leaves either
the state before or a hidden ``kmsfs.tmp.*`` directory holding nothing but internal names, which
fsck reports as a leftover and rmdir of its parent removes.

"Empty" follows the format: a directory that holds only internal names (its IV, an orphan
sidecar, temporary files, hidden directories that are empty in the same sense) lists as empty,
so it can be removed, as on ext4.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable

from kmsfs.atomicfile import fsync_dir
from kmsfs.crypto.names import is_internal
from kmsfs.fs.names import DIRIV, TEMP_PREFIX, temp_path, write_dir_iv
from kmsfs.fs.posix import rename_noreplace

log = logging.getLogger(__name__)

_HIDDEN = os.fsencode(TEMP_PREFIX)
#: Hidden directories nested deeper than this are not kmsfs's (it nests them at most twice).
MAX_HIDDEN_DEPTH = 8


def make_dir(path: bytes, mode: int, prepare: Callable[[bytes], None] | None = None) -> None:
    """Make the ciphertext directory *path* with its IV; FileExistsError if the name exists.

    *prepare* (ownership, say) runs on the directory before it gets its visible name, so a crash
    never leaves it visible with the daemon's owner either.
    """
    if os.path.lexists(path):  # fail before any work, as mkdir(2) would
        raise FileExistsError(errno.EEXIST, "file exists", path)
    temp = temp_path(os.path.dirname(path))
    os.mkdir(temp, 0o700)
    try:
        write_dir_iv(temp)
        fsync_dir(temp)  # the entry naming the IV, not only its bytes
        os.chmod(temp, mode)
        if prepare is not None:
            prepare(temp)
        rename_noreplace(temp, path)
    except BaseException:
        _remove_hidden(temp)
        raise


def check_empty(path: bytes) -> None:
    """ENOTEMPTY unless the directory holds only internal names (see the module docstring)."""
    if not _only_internal(path, 0):
        raise OSError(errno.ENOTEMPTY, "directory not empty")


def remove_empty_dir(path: bytes) -> None:
    """rmdir of a ciphertext directory that lists as empty; ENOTEMPTY (nothing changed) if not.

    Hidden first, then emptied and removed; if the removal fails, it gets its name back.
    """
    check_empty(path)
    hidden = hide(path)
    try:
        _remove_hidden(hidden)
    except BaseException:
        with contextlib.suppress(OSError):
            rename_noreplace(hidden, path)
        raise


def hide(path: bytes) -> bytes:
    """Rename *path* to a fresh hidden name in the same directory; return that name."""
    hidden = temp_path(os.path.dirname(path))
    rename_noreplace(path, hidden)
    return hidden


def remove_hidden(hidden: bytes) -> None:
    """Remove a directory :func:`hide` moved away (after a rename onto its old name).

    The rename it made way for is done, so a failure here only leaves a hidden leftover.
    """
    try:
        _remove_hidden(hidden)
    except OSError as exc:
        log.warning("could not remove hidden directory %r (%s); fsck reports it", hidden, exc)


def _only_internal(path: bytes, depth: int) -> bool:
    for entry in os.listdir(path):
        if not is_internal(os.fsdecode(entry)):
            return False
        child = path + b"/" + entry
        if stat.S_ISDIR(os.lstat(child).st_mode) and (
            not entry.startswith(_HIDDEN)
            or depth >= MAX_HIDDEN_DEPTH
            or not _only_internal(child, depth + 1)
        ):
            return False
    return True


def _remove_hidden(path: bytes) -> None:
    """Remove a directory holding only internal names: them, its IV last, then itself.

    If the directory itself cannot go, its IV is put back, so it stays readable.
    """
    for entry in os.listdir(path):
        if entry == DIRIV:
            continue
        child = path + b"/" + entry
        try:
            os.unlink(child)
        except IsADirectoryError:
            _remove_hidden(child)
        except FileNotFoundError:
            continue
        log.info("removed leftover %r", child)
    iv_path = path + b"/" + DIRIV
    try:
        with open(iv_path, "rb") as f:
            iv: bytes | None = f.read()
        os.unlink(iv_path)
    except FileNotFoundError:
        iv = None
    try:
        os.rmdir(path)
    except BaseException:
        if iv is not None:
            _restore_iv(iv_path, iv)
        raise


def _restore_iv(iv_path: bytes, iv: bytes) -> None:
    try:
        fd = os.open(iv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o440)
    except OSError as exc:
        log.error("could not put back directory IV %r (%s)", iv_path, exc)
        return
    try:
        os.write(fd, iv)
        os.fsync(fd)
    finally:
        os.close(fd)
