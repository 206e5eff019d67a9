"""The ciphertext tree as ``kmsfs reencrypt`` sees it, read without moving any atime.

Before it changes anything, the job walks the whole tree once (:func:`walk`): every regular
file, every directory, with a fingerprint of its plaintext entry names (what
:mod:`kmsfs.fs.reencrypt_resume` saves with a directory's times), and every temporary name a
killed run left (:data:`TEMP_PREFIX`). Then it reads each file's header for its key epoch
(:func:`read_header`, :func:`epoch_of`).

Files and directories are read with O_NOATIME where the kernel allows it, so a run moves no
plaintext atime (a plaintext atime is its ciphertext file's). ``kmsfs fsck`` opens files and
lists directories with the same helpers (:func:`open_unread`, :func:`open_dir_unread`,
:func:`list_unread`), for the same reason.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from kmsfs.crypto import content
from kmsfs.crypto.names import is_internal
from kmsfs.errors import FormatError
from kmsfs.fs.longpath import reach
from kmsfs.fs.posix import open_regular

TEMP_PREFIX = "kmsfs.tmp.reencrypt-"
"""Temporary names of this job: reserved (``kmsfs.``), so never a plaintext name. Followed by
16 hex digits, ``-`` and the inode number of the file being replaced."""
REKEY_NAME = "kmsfs.diriv.rekey"
"""A directory's IV at the epoch its names are moving to (:mod:`kmsfs.fs.reencrypt_names`)."""


def open_unread(path: bytes | str) -> int:
    """:func:`~kmsfs.fs.posix.open_regular` for reading, with O_NOATIME where the kernel allows
    it (the file's owner, or root): checking or re-keying a file is not reading it, and the
    plaintext atime is the ciphertext file's. *path* as for open_regular."""
    try:
        return open_regular(path, os.O_RDONLY | os.O_NOATIME)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
    return open_regular(path)


def open_dir_unread(path: bytes | str) -> int:
    """A directory fd to list (:func:`os.listdir`, :func:`os.scandir`) with O_NOATIME where
    the kernel allows it, so listing it leaves its atime alone (see :func:`open_unread`)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
    return os.open(path, flags)


def list_unread(path: bytes | str) -> list[bytes]:
    """The names in a directory, as bytes, without moving its atime."""
    fd = open_dir_unread(path)
    try:
        return [os.fsencode(name) for name in os.listdir(fd)]
    finally:
        os.close(fd)


@contextlib.contextmanager
def owner_access(path: bytes, bits: int) -> Iterator[None]:
    """Give this user the permission *bits* (``stat.S_IRUSR``; ``S_IWUSR | S_IXUSR``) on a
    *path* it owns but may not use that way, and take them back after: a user other than
    root re-keying their own volume meets read-only directories (0555) and write-only files
    (0200) of theirs, which only its owner's chmod opens. Root needs none; a path of another
    owner is left as it is (the operation then fails, and is reported, as before). Only
    ``st_ctime`` moves, and, if the job is killed meanwhile, the mode stays opened to its
    owner alone."""
    if os.geteuid() == 0:
        yield
        return
    st = os.lstat(reach(path))
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid() or stat.S_ISLNK(st.st_mode) or mode & bits == bits:
        yield
        return
    os.chmod(reach(path), mode | bits)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.chmod(reach(path), mode)


def read_header(path: bytes) -> bytes:
    """The first HEADER_SIZE bytes of a ciphertext file (fewer if it is shorter); OSError,
    without the path, for anything but a regular file (a FIFO put there never blocks)."""
    try:
        with owner_access(path, stat.S_IRUSR):  # a write-only file of this user's
            fd = open_unread(reach(path))
    except OSError as exc:  # the caller names the file, in its own terms
        raise type(exc)(exc.errno, exc.strerror) from None
    try:
        return os.pread(fd, content.HEADER_SIZE, 0)
    finally:
        os.close(fd)


def epoch_of(path: bytes) -> int | None:
    """The key epoch in a ciphertext file's header, None if it has none that parses."""
    try:
        return content.FileHeader.parse(read_header(path)).epoch
    except (OSError, FormatError):
        return None


@dataclass
class Inode:
    paths: list[bytes]
    st: os.stat_result
    header: content.FileHeader | None = None


@dataclass
class Tree:
    files: list[bytes]
    """Regular files."""
    temps: list[bytes]
    """Temporary files of an interrupted run."""
    dirs: dict[bytes, os.stat_result]
    prints: dict[bytes, str]
    """Directory -> fingerprint of its plaintext entry names (a hash of them, sorted)."""
    links: list[bytes] = field(default_factory=list)
    """Symlinks."""


def walk(root: bytes) -> Tree:
    """Every regular file, symlink, leftover temporary file and directory of the tree.

    Skips every reserved name (``kmsfs.diriv``, sidecars, ``kmsfs.conf``, ``kmsfs.longlinks/``)
    but long-name entries, which are ordinary entries under a hashed name.
    """
    tree = Tree([], [], {}, {})
    stack = [root]
    while stack:
        cdir = stack.pop()
        tree.dirs[cdir] = os.lstat(reach(cdir))
        shown: list[bytes] = []
        for name in sorted(list_unread(reach(cdir))):
            path = cdir + b"/" + name
            text = os.fsdecode(name)
            if text.startswith(TEMP_PREFIX):
                tree.temps.append(path)
                continue
            if is_internal(text):
                continue
            shown.append(name)
            st = os.lstat(reach(path))
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif stat.S_ISREG(st.st_mode):
                tree.files.append(path)
            elif stat.S_ISLNK(st.st_mode):
                tree.links.append(path)
        tree.prints[cdir] = fingerprint(shown)
    return tree


def fingerprint(shown: list[bytes]) -> str:
    """What :mod:`kmsfs.fs.reencrypt_resume` saves of a directory's entries with its times:
    a hash of its visible ciphertext names, sorted."""
    return hashlib.sha256(b"\0".join(shown)).hexdigest()[:32]


def fingerprint_now(d: bytes) -> str:
    """:func:`fingerprint` of directory *d* as it is now (the names :func:`walk` shows)."""
    shown = sorted(
        name for name in list_unread(reach(d))
        if not os.fsdecode(name).startswith(TEMP_PREFIX) and not is_internal(os.fsdecode(name))
    )
    return fingerprint(shown)
