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

A path from :func:`reach` means what the path means: the kernel follows a symlink in any of its
directories (``O_NOFOLLOW`` guards the last name only). Code that opens a path it *read from
the volume*, before the daemon serves (the write journal's records), uses
:func:`open_dir_beneath` instead: a descriptor of a directory below the root's descriptor,
reached without following any symlink, however long the path (docs/threat-model.md, §1).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
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


# --- below a root, following no symlink -----------------------------------------------------

#: openat2(2)'s resolve flags (linux/openat2.h).
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: openat2's number: one for every architecture since Linux 5.1 unified new system calls, but
#: for those that offset theirs (alpha, mips): they take the walk (:func:`_walk`).
_SYS_OPENAT2 = 437 if platform.machine() in {
    "x86_64", "i386", "i486", "i586", "i686", "aarch64", "arm64", "armv6l", "armv7l", "armv8l",
    "riscv64", "ppc64", "ppc64le", "s390x", "loongarch64",
} else None
_STEP_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class SymlinkOnPath(OSError):
    """ELOOP: a directory on a path below the root is a symlink, which is not followed.
    ``where`` is the path (below the root) of that symlink."""

    def __init__(self, where: bytes) -> None:
        super().__init__(errno.ELOOP, f"a symlink on the path, at {os.fsdecode(where)}")
        self.where = where


def _openat2(dir_fd: int, path: bytes, flags: int, resolve: int) -> int:
    """openat2(2) (Python 3.11 has no binding); OSError as os.open raises it."""
    how = _OpenHow(flags, 0, resolve)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(path),
        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(fd)


#: False once the kernel said it has no openat2 (ENOSYS: before 5.6, or a seccomp filter).
_have_openat2 = _SYS_OPENAT2 is not None


def open_dir_beneath(root_fd: int, relative: bytes, flags: int = os.O_PATH) -> int:
    """A new descriptor (*flags* | O_DIRECTORY | O_CLOEXEC) of the directory *relative* below
    the directory open as *root_fd*, reached without following a symlink, its own name
    included, and without leaving the root: :class:`SymlinkOnPath` (ELOOP) if one of its
    directories is a symlink; ENOTDIR, ENOENT and the like as open(2) gives them.

    *relative* is names joined by ``/`` (``b""`` or ``.`` names the root itself); an absolute
    path, a ``..`` or a NUL byte is OSError(EINVAL). openat2(RESOLVE_BENEATH |
    RESOLVE_NO_SYMLINKS) resolves it, in pieces that fit in PATH_MAX (a ciphertext path can be
    longer, module docstring); a kernel without openat2 gets one ``openat(O_NOFOLLOW |
    O_DIRECTORY)`` per name. Either way each step starts from the descriptor of the last, so a
    directory renamed or swapped for a symlink meanwhile cannot lead outside."""
    global _have_openat2
    if relative.startswith(b"/") or b"\0" in relative:
        raise OSError(errno.EINVAL, "not a path below the root")
    names = [name for name in relative.split(b"/") if name not in (b"", b".")]
    if b".." in names:
        raise OSError(errno.EINVAL, "not a path below the root")
    flags |= os.O_DIRECTORY | os.O_CLOEXEC
    if not names:
        return os.open(b".", flags, dir_fd=root_fd)
    pieces: list[list[bytes]] = [[]]
    length = 0
    for name in names:  # each piece at most PATH_MAX - 1 bytes, as a path must be
        if pieces[-1] and length + 1 + len(name) >= PATH_MAX:
            pieces.append([])
            length = -1
        pieces[-1].append(name)
        length += 1 + len(name)
    fd, done = root_fd, 0
    try:
        for i, piece in enumerate(pieces):
            step = flags if i == len(pieces) - 1 else _STEP_FLAGS
            opened = None
            if _have_openat2:
                try:
                    opened = _openat2(
                        fd, b"/".join(piece), step, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
                    )
                except OSError as exc:
                    if exc.errno == errno.ENOSYS:
                        _have_openat2 = False
                    elif exc.errno not in (errno.ELOOP, errno.EPERM, errno.EAGAIN):
                        raise
                    # ELOOP: the walk names the symlink; EPERM: a seccomp filter (or
                    # O_NOATIME, which the walk meets as well); EAGAIN: a race it may not meet
            if opened is None:
                opened = _walk(fd, piece, names[:done], step)
            if fd != root_fd:
                os.close(fd)
            fd, done = opened, done + len(piece)
    except BaseException:
        if fd != root_fd:
            os.close(fd)
        raise
    return fd


def _walk(dir_fd: int, names: list[bytes], above: list[bytes], flags: int) -> int:
    """The directory *names* below *dir_fd* (itself at *above* below the root), one
    ``openat(O_NOFOLLOW | O_DIRECTORY)`` per name, the last with *flags*."""
    fd = dir_fd
    try:
        for i, name in enumerate(names):
            step = (flags if i == len(names) - 1 else _STEP_FLAGS) | os.O_NOFOLLOW
            try:
                opened = os.open(name, step, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(name, fd):
                    raise SymlinkOnPath(b"/".join([*above, *names[: i + 1]])) from None
                raise
            if fd != dir_fd:
                os.close(fd)
            fd = opened
    except BaseException:
        if fd != dir_fd:
            os.close(fd)
        raise
    return fd


def _is_symlink(name: bytes, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
