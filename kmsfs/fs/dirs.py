"""Ciphertext directories, made and removed in an order no crash can break (docs/format.md).

Every name in a directory is encrypted with its IV (``kmsfs.diriv``), so a visible directory
without its IV could never be read again. So a new directory is made under a hidden
``kmsfs.tmp.*`` name, gets its IV (fsync'd), owner and mode there, and only then is renamed into
place; a directory being removed (rmdir, or a rename onto it, which first exchanges the two so
the new name is never missing) is renamed to a hidden name, then emptied and removed. A crash,
of the daemon or of the machine, at any step leaves either the state before or a hidden
``kmsfs.tmp.*`` directory holding nothing but internal names, which fsck reports as a leftover
and rmdir of its parent removes (after a crash inside a rename onto an empty directory, that one
can also be left visible, empty, under the old name).

"Empty" follows the format: a directory that holds only internal names (its IV, an orphan
sidecar, temporary files, hidden directories that are empty in the same sense) lists as empty,
so it can be removed, as on ext4.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Callable

from kmsfs.crypto.names import is_internal
from kmsfs.fs.dirpool import DirPool
from kmsfs.fs.longpath import reach
from kmsfs.fs.names import DIRIV, TEMP_PREFIX, make_dir_with_iv, temp_path, write_dir_iv
from kmsfs.fs.posix import rename_noreplace

log = logging.getLogger(__name__)

_HIDDEN = os.fsencode(TEMP_PREFIX)
#: Hidden directories nested deeper than this are not kmsfs's (it nests them at most twice).
MAX_HIDDEN_DEPTH = 8


def make_dir(
    path: bytes,
    mode: int,
    epoch: int,
    prepare: Callable[[int], None] | None = None,
    pool: DirPool | None = None,
) -> None:
    """Make the ciphertext directory *path* with its IV, its names keyed at *epoch* (the
    Domain's current one); FileExistsError if the name exists.

    *prepare* (ownership, say) runs on a descriptor of the directory before it gets its visible
    name, so a crash never leaves it visible with the daemon's owner either. A directory from
    *pool* has its IV on disk already; without one ready, the IV is written and fsync'd here.
    Mode, owner and times are set through the descriptor: whoever can write the parent could
    swap the hidden name for a symlink, and the daemon must not chmod what that leads to.
    """
    if os.path.lexists(reach(path)):  # fail before any work, as mkdir(2) would
        raise FileExistsError(errno.EEXIST, "file exists", path)
    ready = pool.take(epoch) if pool is not None else None
    if ready is not None:
        fd = ready.fd
    else:
        temp = temp_path(os.path.dirname(path))
        fd = make_dir_with_iv(temp, epoch)
    try:
        os.chmod(fd, mode)
        if prepare is not None:
            prepare(fd)
        if ready is None:
            rename_noreplace(temp, path)
        else:
            ready.place(path)
    except BaseException:
        with contextlib.suppress(OSError):
            if ready is None:
                _remove_hidden(temp)
            else:
                ready.discard()
        raise
    else:
        # After the rename, which moves the ctime alone: a new directory's atime, mtime and
        # ctime are one time, as on ext4 (and one from the pool was made a while ago).
        with contextlib.suppress(OSError):
            os.utime(fd)
    finally:
        os.close(fd)


def check_empty(path: bytes) -> list[tuple[bytes, bool]]:
    """ENOTEMPTY unless the directory holds only internal names (see the module docstring).

    Returns them, as (name, is a directory), for :func:`remove_hidden`.
    """
    entries = _internal_entries(path, 0)
    if entries is None:
        raise OSError(errno.ENOTEMPTY, "directory not empty")
    return entries


def remove_empty_dir(path: bytes, epoch: int) -> None:
    """rmdir of a ciphertext directory that lists as empty; ENOTEMPTY (nothing changed) if not.

    Hidden first, then emptied and removed; if the removal fails, it gets its name back (with a
    new IV, at *epoch*, if its own is gone: it holds no name the IV could have encrypted).
    """
    entries = check_empty(path)
    hidden = hide(path)
    try:
        _remove_hidden(hidden, entries)
    except BaseException:
        with contextlib.suppress(OSError):
            if not os.path.lexists(reach(hidden + b"/" + DIRIV)):
                write_dir_iv(hidden, epoch)
            rename_noreplace(hidden, path)
        raise


class RemovalWatch:
    """A directory about to be removed, held by an O_PATH fd: its attributes before
    (``before``) and, after :meth:`close`, as its removal left them (``after``: 0 links, the
    ctime of the removal), which the kernel may still ask for (a removed working directory).
    """

    def __init__(self, path: bytes) -> None:
        fd = os.open(reach(path), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            self.before = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd
        self.after: os.stat_result | None = None

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self.after = os.fstat(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None


def hide(path: bytes) -> bytes:
    """Rename *path* to a fresh hidden name in the same directory; return that name."""
    hidden = temp_path(os.path.dirname(path))
    rename_noreplace(path, hidden)
    return hidden


def remove_hidden(hidden: bytes, entries: list[tuple[bytes, bool]]) -> None:
    """Remove a directory :func:`hide` moved away after a rename onto its old name; *entries*
    are what :func:`check_empty` found in it.

    The rename it made way for is done, so a failure here only leaves a hidden leftover.
    """
    try:
        _remove_hidden(hidden, entries)
    except OSError as exc:
        log.warning("could not remove hidden directory %r (%s); fsck reports it", hidden, exc)


def _internal_entries(path: bytes, depth: int) -> list[tuple[bytes, bool]] | None:
    """(name, is a directory) of every entry, or None if one is not kmsfs's own."""
    out = []
    with os.scandir(reach(path)) as it:
        for entry in it:
            if not is_internal(os.fsdecode(entry.name)):
                return None
            is_dir = entry.is_dir(follow_symlinks=False)
            if is_dir and (
                not entry.name.startswith(_HIDDEN)
                or depth >= MAX_HIDDEN_DEPTH
                or _internal_entries(path + b"/" + entry.name, depth + 1) is None
            ):
                return None
            out.append((entry.name, is_dir))
    return out


def _remove_hidden(path: bytes, entries: list[tuple[bytes, bool]] | None = None) -> None:
    """Remove a directory holding only internal names: them, its IV last, then itself."""
    if entries is None:
        entries = _internal_entries(path, 0) or []
    for name, is_dir in entries:
        if name == DIRIV:
            continue
        child = path + b"/" + name
        if is_dir:
            _remove_hidden(child)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(reach(child))
        log.info("removed leftover %r", child)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(reach(path + b"/" + DIRIV))
    os.rmdir(reach(path))
