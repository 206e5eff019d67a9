"""New ciphertext directories made ahead of time, so mkdir waits for a rename, not two fsyncs.

A directory may get a visible name only once its IV is on disk (:mod:`kmsfs.fs.dirs`): mkdir
fsyncs the IV and the directory naming it first. On a disk those two fsyncs are most of a
mkdir (about 0.3 ms each here), and ``tar -x`` of a tree with 350 directories waited 0.2 s
for them. So a thread keeps :data:`POOL_SIZE` directories ready in ``kmsfs.newdirs/`` in the
ciphertext root, each with its IV already fsync'd; mkdir takes one, gives it its mode, owner
and times, and renames it into place. The crash argument does not change: whatever name a
directory has, its IV reached the disk before it was given that name.

In ``kmsfs.newdirs/`` a directory is made as ``kmsfs.tmp.<16 hex>`` and renamed to
``<16 hex>`` once its IV and the entry naming it are fsync'd; only those are ever handed out.
A mount removes the ``kmsfs.tmp.*`` ones a crash left (they hold nothing but an IV) and keeps
the ready ones for its own use. Only a daemon running as root uses the pool: moving a directory
to another parent needs write permission on the directory itself, which a new directory with a
mode like 0555 would not give its non-root owner.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import secrets
import threading

from kmsfs.atomicfile import fsync_dir
from kmsfs.crypto.names import DIRIV_NAME
from kmsfs.fs.names import DIRIV, TEMP_PREFIX, DirIvError, read_dir_iv, write_dir_iv

log = logging.getLogger(__name__)

#: The pool's directory in the ciphertext root (docs/format.md, "Reserved names").
POOL_DIR = "kmsfs.newdirs"
POOL_DIR_B = POOL_DIR.encode()
#: Directories kept ready. ``tar -x`` of a source tree makes one every few ms at most, and the
#: thread makes one in about 1 ms, so a burst of this many is absorbed and the rest kept up with.
POOL_SIZE = 16
#: After a failure to make one (ENOSPC, say), the thread waits this long before it tries again.
RETRY_SECONDS = 5.0
#: How long closing waits for the thread to finish the directory it is making.
JOIN_SECONDS = 10.0

_READY_NAME = re.compile(rb"[0-9a-f]{16}")
_TEMP = TEMP_PREFIX.encode()


def is_ready_name(name: bytes) -> bool:
    """True for the name of a ready directory in the pool (``<16 hex>``)."""
    return _READY_NAME.fullmatch(name) is not None


class DirPool:
    """Ready directories (paths under ``<root>/kmsfs.newdirs``) and the thread that makes them.

    :meth:`take` runs on the daemon's request thread and never blocks: with nothing ready it
    returns None and mkdir does the fsyncs itself.
    """

    def __init__(self, root: bytes, size: int = POOL_SIZE) -> None:
        self.path = root + b"/" + POOL_DIR_B
        self.size = size
        self._ready: collections.deque[bytes] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1

    def open(self) -> None:
        """Make ``kmsfs.newdirs/`` if needed, remove what a crash left, keep the ready ones.

        OSError if the directory cannot be made or opened (a read-only backing store, say).
        """
        root = os.path.dirname(self.path)
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            pass
        else:
            fsync_dir(root)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.scandir(self.path) as it:
            found = sorted((entry.name, entry.is_dir(follow_symlinks=False)) for entry in it)
        for name, is_dir in found:
            if is_dir and name.startswith(_TEMP):
                self._remove(name)
            elif is_dir and is_ready_name(name) and is_whole(self.path + b"/" + name):
                self._ready.append(self.path + b"/" + name)
            else:
                log.warning("%r: not kmsfs's; fsck reports it", self.path + b"/" + name)

    def start(self) -> None:
        """Start the thread that keeps :attr:`size` directories ready."""
        self._thread = threading.Thread(target=self._fill, name="kmsfs-dirpool", daemon=True)
        self._thread.start()

    def take(self) -> bytes | None:
        """The path of a ready directory (mode 0700, owned by the daemon), or None."""
        try:
            path = self._ready.popleft()
        except IndexError:
            path = None
        self._wake.set()
        return path

    def close(self) -> None:
        """Stop the thread; what is ready stays for the next mount."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(JOIN_SECONDS)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _fill(self) -> None:
        while not self._stop.is_set():
            if len(self._ready) >= self.size:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                name = self._make_one()
            except OSError as exc:
                log.warning("could not make a directory ahead (%s); mkdir makes its own", exc)
                self._stop.wait(RETRY_SECONDS)
                continue
            self._ready.append(self.path + b"/" + name)

    def _make_one(self) -> bytes:
        """One directory with its IV fsync'd, and the entry naming the IV; its ready name."""
        name = secrets.token_hex(8).encode()
        temp = _TEMP + name
        os.mkdir(temp, 0o700, dir_fd=self._fd)
        try:
            write_dir_iv(temp, dir_fd=self._fd)
            fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._fd)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except BaseException:
            self._remove(temp)
            raise
        return name

    def _remove(self, name: bytes) -> None:
        """Remove a half-made directory *name* (its IV, then itself); one holding more stays."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=self._fd)
        except FileNotFoundError:
            return
        try:
            inside = os.listdir(fd)
        finally:
            os.close(fd)
        if inside not in ([], [DIRIV_NAME]):
            log.warning("%r holds more than an IV; fsck reports it", self.path + b"/" + name)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name + b"/" + DIRIV, dir_fd=self._fd)
        try:
            os.rmdir(name, dir_fd=self._fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %r (%s); fsck reports it", self.path + b"/" + name, exc)


def is_whole(path: bytes) -> bool:
    """A ready directory: it holds a well-formed IV and nothing else."""
    try:
        if os.listdir(path) != [DIRIV]:
            return False
        read_dir_iv(path)
    except (OSError, DirIvError):
        return False
    return True
