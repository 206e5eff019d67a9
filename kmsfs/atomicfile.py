"""Crash-safe writes: temporary file, fsync, then link or rename, then fsync the directory.

Used by the store (immutable documents), the volume config and the single-file tools.

Documents are immutable, so ``write_new`` publishes with link(2), which fails if the name
exists: two admin commands racing to write the same name cannot overwrite each other, and a
content-addressed document written twice with the same bytes is simply already there.
"""

import contextlib
import os
import stat
import tempfile
from pathlib import Path

from kmsfs.errors import AlreadyExistsError, FormatError

_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def read_regular(path: Path, limit: int = -1) -> bytes:
    """The bytes (at most *limit*) of the regular file *path*; FileNotFoundError if nothing is
    there, FormatError if something else is.

    A FIFO planted where a document belongs (``rsync -a`` of a hostile replica copies one)
    hung every command that read it, and a symbolic link there read whatever it points to.
    Neither is followed nor opened: the final component is looked at with lstat, then opened
    with O_NOFOLLOW and O_NONBLOCK and checked again (it may have been swapped meanwhile)."""
    kind = stat.S_IFMT(os.lstat(path).st_mode)
    if kind == stat.S_IFREG:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as handle:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind == stat.S_IFREG:
                return handle.read(limit)
    raise FormatError(f"{path}: {kind_of(kind)} where a regular file belongs; remove it")


def kind_of(mode: int) -> str:
    """What a file of *mode* is, for a message: "a FIFO", "a symbolic link", ..."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


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
    if _already(path, data):  # no temporary file made and removed: directory times stay
        return False
    made = make_parents(path.parent) if parents else []
    try:
        temp = _temp_with(path.parent, data, mode, temp_prefix)
        try:
            os.link(temp, path)
        except FileExistsError:  # published meanwhile by another process
            if read_regular(path, len(data) + 1) == data:
                return False
            raise AlreadyExistsError(
                f"{path} already exists (documents are never overwritten)"
            ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
    except BaseException:
        _remove_empty(made)
        raise
    fsync_dir(path.parent)
    return True


def _remove_empty(made: list[Path]) -> None:
    """Take away the directories a failed write made for its file (deepest first), so a full
    disk leaves no empty ``approvals/<id>/`` behind (review): one another process has put
    something in meanwhile stays."""
    for directory in reversed(made):
        try:
            os.rmdir(directory)
        except OSError:
            return


def _already(path: Path, data: bytes) -> bool:
    """True if *path* holds *data*; False if there is nothing there; AlreadyExistsError if
    other bytes are (documents are never overwritten)."""
    try:
        if read_regular(path, len(data) + 1) == data:
            return True
    except FileNotFoundError:
        return False
    raise AlreadyExistsError(f"{path} already exists (documents are never overwritten)")


def make_parents(directory: Path, mode: int = 0o755) -> list[Path]:
    """``mkdir -p`` that gives every directory it makes *mode* (less the umask), whatever the
    process umask. Not ``Path.mkdir(parents=True)``: the mount daemon runs with umask 0 (the
    modes of what it makes for users arrive final), and under it that made this machine's
    state directories (:mod:`kmsfs.fs.seen`) writable by every user. Returns the directories
    it made, outermost first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    made = []
    for each in reversed(missing):
        try:
            os.mkdir(each, mode)
        except FileExistsError:  # made meanwhile by another process
            continue
        made.append(each)
    return made


def replace(
    path: Path, data: bytes, mode: int = 0o644, temp_prefix: str = ".tmp-", parents: bool = True
) -> None:
    """Atomically replace ``path`` with ``data`` (for the few mutable files); ``parents`` as for
    :func:`write_new`."""
    made = make_parents(path.parent) if parents else []
    try:
        temp = _temp_with(path.parent, data, mode, temp_prefix)
        try:
            os.replace(temp, path)
        except BaseException:
            os.unlink(temp)
            raise
    except BaseException:
        _remove_empty(made)
        raise
    fsync_dir(path.parent)
