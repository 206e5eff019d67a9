"""Ciphertext paths longer than PATH_MAX still reach the kernel, through /proc/self/fd.

A ciphertext name is longer than its plaintext name (AES-SIV adds 16 bytes, then base64 a
third), so a tree whose plaintext paths are well inside PATH_MAX (4096 bytes with the NUL) can
have ciphertext paths beyond it: with 20-byte names, from about 1,760 plaintext bytes on. The
kernel refuses such a path with ENAMETOOLONG, where ext4 would have served the user's path.

:func:`reach` returns a path that fits for any ciphertext path: the path itself when it fits
(all but very deep trees: one length check), else ``/proc/self/fd/N/NAME``, where N is an
``O_PATH`` descriptor of the parent directory (an *anchor*). The kernel follows that magic link
to the directory and resolves NAME there, so every syscall that takes a path takes this one,
with the same meaning, ``O_NOFOLLOW`` and ``AT_SYMLINK_NOFOLLOW`` included. An anchor too deep
to open by its own path is opened through an anchor of an ancestor, one PATH_MAX step at a time.

Rules for callers:

- Wrap the path given to the syscall, right where it is called, and use the result at once: it
  names a descriptor, so it is not a path to keep, compare, log or join (join first).
- After a rename, call :func:`forget` with both paths (:func:`kmsfs.fs.posix.renameat2`
  does): an anchor follows its directory, so one cached under the directory's old path would
  lead to it at the new one (and a rename may replace, or exchange, what the new path was).
  A directory is removed only after a rename to a random hidden name (kmsfs.fs.dirs), so no
  path of a removed directory is asked for again. The daemon is the only writer of its
  ciphertext tree, so renames it does not see do not happen while it is mounted.
- A process that is not the daemon cannot see a mount's renames: it calls :func:`forget`
  with no path before it walks a volume (``fsck.check_tree`` and ``journal.replay`` do).

Anchors are closed a generation late (by the next :func:`forget`, or when the cache fills
again), so the paths an operation got from :func:`reach` stay valid until it has used them,
even if a later :func:`reach` or rename of the same operation drops their anchor.
"""

from __future__ import annotations

import errno
import os
import threading

#: Linux's PATH_MAX counts the terminating NUL: a path is at most this many bytes minus one.
PATH_MAX = 4096
#: Room for ``/proc/self/fd/<fd>/`` in front of the rest of a path.
_PREFIX_ROOM = 32
#: Anchors kept at most before they are retired (each an open descriptor).
MAX_ANCHORS = 128
_ANCHOR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Anchors:
    """Cached O_PATH descriptors of deep ciphertext directories, by their ciphertext path."""

    def __init__(self) -> None:
        self._fds: dict[bytes, int] = {}
        self._retired: list[int] = []  # taken out when the cache filled; closed when it refills
        self._dropped: list[int] = []  # taken out by forget(); closed by the next forget()
        self._lock = threading.Lock()  # fsck and the daemon call from one thread; be safe anyway

    def reach(self, path: bytes) -> bytes:
        """*path*, or a path of the same object that fits in PATH_MAX (module docstring)."""
        if len(path) < PATH_MAX:
            return path
        parent, _, name = path.rpartition(b"/")
        if not parent or len(name) > PATH_MAX - _PREFIX_ROOM:
            return path  # not a path kmsfs builds: let the syscall refuse it
        with self._lock:
            return b"/proc/self/fd/%d/%s" % (self._anchor(parent), name)

    def _anchor(self, dirpath: bytes) -> int:
        fd = self._fds.get(dirpath)
        if fd is not None:
            return fd
        if len(self._fds) >= MAX_ANCHORS:
            self._retire()
        if len(dirpath) < PATH_MAX:
            where = dirpath
        else:
            # The nearest ancestor from which the rest fits, anchored itself (one step up).
            cut = dirpath.find(b"/", len(dirpath) - (PATH_MAX - _PREFIX_ROOM))
            if cut <= 0:
                raise OSError(errno.ENAMETOOLONG, "a ciphertext name is longer than PATH_MAX")
            where = b"/proc/self/fd/%d/%s" % (self._anchor(dirpath[:cut]), dirpath[cut + 1 :])
        fd = os.open(where, _ANCHOR_FLAGS)
        self._fds[dirpath] = fd
        return fd

    def _retire(self) -> None:
        for fd in self._retired:
            os.close(fd)
        self._retired = list(self._fds.values())
        self._fds.clear()

    def forget(self, *paths: bytes) -> None:
        """Drop the anchors of *paths* and of every directory below them (all, if none is
        given): they were renamed (module docstring)."""
        if not (self._fds or self._dropped):
            return
        with self._lock:
            for fd in self._dropped:
                os.close(fd)
            self._dropped = []
            for key in list(self._fds):
                if not paths or any(key == p or key.startswith(p + b"/") for p in paths):
                    self._dropped.append(self._fds.pop(key))

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._retired, *self._dropped]:
                os.close(fd)
            self._fds, self._retired, self._dropped = {}, [], []

    def __len__(self) -> int:
        return len(self._fds)


_ANCHORS = Anchors()


def reach(path: bytes) -> bytes:
    """*path* if it fits in PATH_MAX, else the same object through an anchor (module docstring)."""
    if len(path) < PATH_MAX:
        return path
    return _ANCHORS.reach(path)


def forget(*paths: bytes) -> None:
    """After a rename of *paths* (ciphertext paths, old or new): an anchor cached at or below
    one of them leads elsewhere now (module docstring)."""
    _ANCHORS.forget(*paths)
