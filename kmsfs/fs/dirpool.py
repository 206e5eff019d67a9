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
the ready ones for its own use.

Only a daemon running as root uses the pool: moving a directory to another parent needs write
permission on the directory itself, which a new directory with a mode like 0555 would not give
its non-root owner. And the daemon, root, must never be steered by whoever else can write the
ciphertext root: ``kmsfs.newdirs/`` is used only if it is the daemon's own (owner, mode 0700 or
stricter), and everything in it is reached through its descriptor, never by path, so renaming
it away or planting symlinks changes nothing the daemon does.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kmsfs.atomicfile import fsync_dir
from kmsfs.crypto.names import DIRIV_NAME, epoch_of, parse_dir_iv
from kmsfs.errors import FormatError
from kmsfs.fs.names import DIR_FLAGS, DIRIV, TEMP_PREFIX, make_dir_with_iv
from kmsfs.fs.posix import read_internal_file, rename_noreplace

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


def is_own_dir(st: os.stat_result, owner: int) -> bool:
    """A directory of *owner* that nobody else may write into (the pool and each ready one)."""
    return stat.S_ISDIR(st.st_mode) and st.st_uid == owner and not st.st_mode & 0o022


def is_whole_at(pool_fd: int, name: bytes, owner: int) -> bool:
    """*name* in the pool open as *pool_fd* is a ready directory: *owner*'s, mode 0700,
    holding a well-formed IV and nothing else."""
    return _iv_alone(pool_fd, name, owner) is not None


def _iv_alone(pool_fd: int, name: bytes, owner: int | None) -> bytes | None:
    """The IV of *name*, if it is a directory holding a well-formed IV and nothing else; with
    *owner*, also *owner*'s and mode 0700 (None: whatever its owner and mode, as a mkdir left
    it). None if it is not."""
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=pool_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if owner is not None and (
            not is_own_dir(st, owner) or stat.S_IMODE(st.st_mode) != 0o700
        ):
            return None
        if os.listdir(fd) != [DIRIV_NAME]:
            return None
        return parse_dir_iv(read_internal_file(DIRIV, 64, dir_fd=fd))
    except (OSError, FormatError):
        return None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ReadyDir:
    """A directory taken from the pool: its name there, a descriptor of it, and one of the
    pool's directory (which stays open as long as the daemon serves)."""

    name: bytes
    fd: int
    pool_fd: int

    def place(self, new: bytes) -> None:
        """Rename it to the ciphertext path *new*; FileExistsError if that exists."""
        rename_noreplace(self.name, new, old_dir_fd=self.pool_fd)

    def discard(self) -> None:
        """Remove it (taken, but its mkdir failed before it was placed)."""
        with contextlib.suppress(OSError):
            os.unlink(DIRIV, dir_fd=self.fd)
        with contextlib.suppress(OSError):
            os.rmdir(self.name, dir_fd=self.pool_fd)


class DirPool:
    """Ready directories in ``<root>/kmsfs.newdirs`` and the thread that makes them.

    :meth:`take` runs on the daemon's request thread and never blocks: with nothing ready it
    returns None and mkdir does the fsyncs itself. The thread makes each directory with its
    names keyed at ``epoch()`` (the Domain's current epoch, which a rotation moves): one made
    before a rotation is never handed out; :meth:`take` sets it aside for the thread to remove.
    """

    def __init__(self, root: bytes, epoch: Callable[[], int], size: int = POOL_SIZE) -> None:
        self.path = root + b"/" + POOL_DIR_B
        self.size = size
        self._epoch = epoch
        self._ready: collections.deque[tuple[bytes, int]] = collections.deque()
        self._stale: collections.deque[bytes] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1

    def open(self) -> None:
        """Make ``kmsfs.newdirs/`` if needed, remove what a crash left, keep the ready ones.

        What a crash leaves: half-made directories (temporary names), and ready ones a mkdir
        had taken and given its caller's mode and owner but not yet placed. Only the daemon
        writes in the pool (its own directory, checked below), so such a directory holding
        its IV and nothing else is kmsfs's own leftover; anything else in it stays, logged.

        OSError if it cannot be made or opened (a read-only backing store, say), or if it is
        not the daemon's own (EPERM).
        """
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            pass
        else:
            fsync_dir(os.path.dirname(self.path))
        self._fd = os.open(self.path, DIR_FLAGS)
        if not is_own_dir(os.fstat(self._fd), os.geteuid()):
            raise OSError(errno.EPERM, "not the daemon's own directory (owner or mode)")
        with os.scandir(self._fd) as it:
            found = sorted(os.fsencode(entry.name) for entry in it)
        owner = os.geteuid()
        for name in found:
            if name.startswith(_TEMP):
                self._remove(name)
                continue
            dir_iv = _iv_alone(self._fd, name, owner) if is_ready_name(name) else None
            if dir_iv is not None:
                self._ready.append((name, epoch_of(dir_iv)))
            elif is_ready_name(name) and _iv_alone(self._fd, name, None) is not None:
                # Taken by a mkdir that the daemon's death cut short after its chmod (or the
                # chown to its caller) and before its rename into place: never visible.
                self._remove(name)
            else:
                log.warning("%r: not kmsfs's; fsck reports it", self.path + b"/" + name)

    def start(self) -> None:
        """Start the thread that keeps :attr:`size` directories ready."""
        self._thread = threading.Thread(target=self._fill, name="kmsfs-dirpool", daemon=True)
        self._thread.start()

    def take(self, epoch: int) -> ReadyDir | None:
        """A ready directory (mode 0700, owned by the daemon) whose names are keyed at
        *epoch*, opened; or None. Ready ones of another epoch (made before a rotation) are
        passed over, and left to the thread to remove."""
        self._wake.set()
        while True:
            try:
                name, made_at = self._ready.popleft()
            except IndexError:
                return None
            if made_at != epoch:
                self._stale.append(name)
                continue
            try:
                return ReadyDir(name, os.open(name, DIR_FLAGS, dir_fd=self._fd), self._fd)
            except OSError as exc:  # removed by hand meanwhile: the next one, or none
                log.warning("%r: %s", self.path + b"/" + name, exc.strerror)

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
            while self._stale:
                self._remove(self._stale.popleft())
            if len(self._ready) >= self.size:
                self._wake.wait()
                self._wake.clear()
                continue
            epoch = self._epoch()
            try:
                name = self._make_one(epoch)
            except OSError as exc:
                log.warning("could not make a directory ahead (%s); mkdir makes its own", exc)
                self._stop.wait(RETRY_SECONDS)
                continue
            self._ready.append((name, epoch))

    def _make_one(self, epoch: int) -> bytes:
        """One directory with its IV (at *epoch*) fsync'd, and the entry naming the IV; its
        ready name."""
        name = secrets.token_hex(8).encode()
        temp = _TEMP + name
        os.close(make_dir_with_iv(temp, epoch, dir_fd=self._fd))
        try:
            os.rename(temp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except BaseException:
            self._remove(temp)
            raise
        return name

    def _remove(self, name: bytes) -> None:
        """Remove a half-made directory *name* (its IV, then itself); one holding more stays."""
        try:
            fd = os.open(name, DIR_FLAGS, dir_fd=self._fd)
        except OSError:
            log.warning("%r: not kmsfs's; fsck reports it", self.path + b"/" + name)
            return
        try:
            if os.listdir(fd) not in ([], [DIRIV_NAME]):
                log.warning("%r holds more than an IV; fsck reports it", self.path + b"/" + name)
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(DIRIV, dir_fd=fd)
        finally:
            os.close(fd)
        try:
            os.rmdir(name, dir_fd=self._fd)
        except OSError as exc:
            log.warning("could not remove %r (%s); fsck reports it", self.path + b"/" + name, exc)
