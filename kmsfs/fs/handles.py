"""Open files: one ciphertext fd, file key and lock per inode, shared by all its FUSE handles.

Sharing per inode (not per handle) matters for correctness: two handles writing the same file
must read-modify-write the same blocks under one lock, and a file unlinked while open stays
reachable through the fd held here. The file key is derived when the header is first needed,
or for a file opened for reading in the daemon's pause right after the open
(:meth:`OpenFiles.key_one`), and dropped when the last handle closes.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import logging
import os
from dataclasses import dataclass, field

import trio

from kmsfs.fs.files import ContentKeys, FileContent
from kmsfs.fs.journal import WriteJournal
from kmsfs.fs.longpath import reach

log = logging.getLogger(__name__)

#: Files opened for reading whose key :meth:`OpenFiles.key_one` has yet to derive. Newest
#: first; one an idle moment never reaches (a burst of opens) is keyed by its first read.
KEY_QUEUE_SIZE = 64


@dataclass(eq=False)
class OpenFile:
    """Per-inode state of a file that has at least one open handle (equal only to itself: the
    queue of files to key finds one by identity, not by comparing every field)."""

    ino: int
    content: FileContent
    writable: bool
    refs: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def fd(self) -> int:
        return self.content.fd


@dataclass
class Handle:
    file: OpenFile
    append: bool
    writable: bool


def open_cipher_fd(
    path: bytes, want_write: bool, noatime: bool = False, through_fd: bool = False
) -> tuple[int, bool]:
    """Open the ciphertext file read-write if possible (writes need reads for partial blocks).

    *noatime* (the mount's ``-o noatime``): reads through the fd leave atime alone. A path in
    the tree is opened without following a symlink; with *through_fd*, *path* is
    ``/proc/self/fd/N`` of an fd of the daemon's own for a file with no path left
    (:meth:`ContentOps._open_path`), a link to follow.
    """
    base = os.O_CLOEXEC | (0 if through_fd else os.O_NOFOLLOW)
    try:
        return open_quietly(path, os.O_RDWR | base, noatime), True
    except OSError as exc:
        if want_write or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return open_quietly(path, os.O_RDONLY | base, noatime), False


def keep_atime(fd: int) -> None:
    """Set O_NOATIME on an open file (:func:`open_quietly` for an fd made elsewhere)."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    with contextlib.suppress(PermissionError):
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NOATIME)


def open_quietly(path: bytes, flags: int, noatime: bool) -> int:
    """``os.open``, with O_NOATIME if *noatime* and the kernel allows it (the daemon owns the
    file or has CAP_FOWNER; otherwise reads move atime as they would without the option)."""
    if noatime:
        try:
            return os.open(reach(path), flags | os.O_NOATIME)
        except PermissionError as exc:
            if exc.errno != errno.EPERM:
                raise
    return os.open(reach(path), flags)


#: How much of a file opened for reading :func:`prefetch` asks the kernel to read at once: the
#: header, the first blocks, and all of a small file (the kernel's default readahead window).
PREFETCH_BYTES = 128 * 1024


def prefetch(fd: int) -> None:
    """Start reading the start of a ciphertext file in the background (POSIX_FADV_WILLNEED).

    The first read of a file needs its header (for the key) and its first block, and until now
    the disk read began only when that READ arrived. Started at open, it runs while the reply
    goes back and the kernel sends the READ: reading back the bench tree from a cold disk went
    from 1.10 s to 0.85 s (gocryptfs 0.98 s). A file whose pages are cached costs one syscall.
    Not for write-only opens: an append needs the header and the last block only.
    """
    with contextlib.suppress(OSError):  # advice only; a file system may not take it
        os.posix_fadvise(fd, 0, PREFETCH_BYTES, os.POSIX_FADV_WILLNEED)


class OpenFiles:
    """FUSE file handles -> :class:`Handle`, and inode -> :class:`OpenFile` (trio thread)."""

    def __init__(self, keys: ContentKeys, journal: WriteJournal | None = None) -> None:
        self._keys = keys
        self._journal = journal  # records overwrites (kmsfs.fs.journal); None: not recorded
        self.noatime = False  # the mount's -o noatime: no read moves a file's atime
        self._by_ino: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._next = itertools.count(1)
        self._to_key: collections.deque[OpenFile] = collections.deque(maxlen=KEY_QUEUE_SIZE)

    def moved(self, old: bytes, new: bytes) -> None:
        """A rename: open files at or under ciphertext path *old* are now under *new*, and
        their journal records must say so (a record naming the old path is not replayed)."""
        for of in self._by_ino.values():
            of.content.moved(old, new)

    def exchanged(self, a: bytes, b: bytes) -> None:
        """RENAME_EXCHANGE of ciphertext paths *a* and *b*."""
        for of in self._by_ino.values():
            of.content.exchanged(a, b)

    def link_gone(self, ino: int, gone: bytes, other: bytes) -> None:
        """The link at ciphertext path *gone* of the open file *ino* was removed (unlink, or a
        rename over it) and *other* is one it still has: if its journal records named *gone*,
        they name *other* from now on (a record naming a path that no longer holds the file
        is found only by a search of the whole volume, kmsfs.fs.journal)."""
        of = self._by_ino.get(ino)
        if of is not None:
            of.content.moved(gone, other)

    def unlinked(self, ino: int) -> None:
        """The last link of *ino* is gone: if it is open, its writes need no journal records
        any more (after a crash the file is gone too, and a record naming its old path would
        only cost the next mount a walk of the whole volume, kmsfs.fs.journal)."""
        of = self._by_ino.get(ino)
        if of is not None:
            of.content.forget_journal()

    def get_file(self, ino: int) -> OpenFile | None:
        return self._by_ino.get(ino)

    def handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, "bad file handle") from None

    def open(
        self,
        ino: int,
        path: bytes,
        flags: int,
        fd: int | None = None,
        removed: bytes | None = None,
    ) -> int:
        """Register a new handle of *ino*; *fd* (from create) is adopted if given.

        *removed* not None: *path* is ``/proc/self/fd/N`` of the daemon's own fd of a file with
        no path in the tree left, and *removed* the ciphertext path of the link it was removed
        from (:meth:`ContentOps._open_path`). Journal records then name that path if the file
        still has other links (a replay finds it there by its header, kmsfs.fs.journal); one
        with none left writes no records (after a crash it is gone too)."""
        want_write = (flags & os.O_ACCMODE) != os.O_RDONLY
        reading = False
        through_fd = removed is not None
        of = self._by_ino.get(ino)
        if of is None:
            if fd is None:
                fd, writable = open_cipher_fd(path, want_write, self.noatime, through_fd)
                if flags & os.O_ACCMODE != os.O_WRONLY and not flags & os.O_TRUNC:
                    prefetch(fd)
                    reading = True
            else:
                writable = True
                if self.noatime:
                    keep_atime(fd)
            journal, named = self._journal, path
            if removed is not None:
                named = removed
                if not removed or os.fstat(fd).st_nlink == 0:
                    journal = None
            of = OpenFile(ino, FileContent(fd, self._keys, named, journal), writable)
            self._by_ino[ino] = of
            if reading:
                self._to_key.append(of)
        else:
            if fd is not None:
                os.close(fd)
            if want_write and not of.writable:
                new_fd, _ = open_cipher_fd(path, True, self.noatime, through_fd)
                os.close(of.content.fd)
                of.content.fd = new_fd
                of.writable = True
        of.refs += 1
        fh = next(self._next)
        self._handles[fh] = Handle(of, bool(flags & os.O_APPEND), want_write)
        return fh

    def key_one(self) -> bool:
        """Derive the key of the newest file opened for reading that is still open and has
        none yet (the daemon calls this while it waits for the next request); False if
        there was none. A failure is left to that file's first read to report."""
        while self._to_key:
            of = self._to_key.pop()
            if of.refs <= 0 or of.lock.locked():
                continue  # closed, or busy in a worker thread (which loads the key itself)
            try:
                return of.content.load_key()
            except Exception as exc:  # an HSM or agent failure, a bad epoch: the read says
                log.debug("deriving the key of an opened file failed: %s", exc)
                return False
        return False

    def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            return
        of = handle.file
        of.refs -= 1
        if of.refs <= 0:
            del self._by_ino[of.ino]
            os.close(of.content.fd)
            if of in self._to_key:  # its key goes with its last handle
                # Tested first: remove() of a missing file formats its repr for the ValueError,
                # which cost 15 us in each release (nearly every file has left the queue).
                self._to_key.remove(of)

    def needs_fd_swap(self, ino: int, flags: int) -> OpenFile | None:
        """The open file whose read-only fd :meth:`open` would replace for a writer, if any."""
        of = self._by_ino.get(ino)
        want_write = (flags & os.O_ACCMODE) != os.O_RDONLY
        return of if of is not None and want_write and not of.writable else None

    def file_of(self, fh: int) -> OpenFile | None:
        handle = self._handles.get(fh)
        return handle.file if handle is not None else None

    def close_all(self) -> None:
        for of in self._by_ino.values():
            with contextlib.suppress(OSError):
                os.close(of.content.fd)
        self._by_ino.clear()
        self._handles.clear()
        self._to_key.clear()
