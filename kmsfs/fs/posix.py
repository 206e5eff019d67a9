"""Small POSIX helpers the standard library lacks: renameat2, ownership of new entries, attrs.

``renameat2`` gives RENAME_NOREPLACE and RENAME_EXCHANGE atomically on the ciphertext file
system (ext4, xfs, btrfs, tmpfs); emulating them with a stat then a rename would race.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import stat
import time
from collections.abc import Iterator

import pyfuse3

from kmsfs.crypto.content import plain_size_lenient
from kmsfs.fs.longpath import forget, reach

AT_FDCWD = -100
RENAME_NOREPLACE = pyfuse3.RENAME_NOREPLACE
EXT4_MAX_BYTES = 2**44 - 4096
"""ext4's largest file (4 KiB blocks, extents); a bigger truncate or fallocate gets EFBIG."""
MAX_FILE_SIZE = plain_size_lenient(EXT4_MAX_BYTES)
"""Largest plaintext size whose ciphertext still fits in an ext4 file."""
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def open_regular(
    path: bytes | str, flags: int = os.O_RDONLY, mode: int = 0o600, dir_fd: int | None = None
) -> int:
    """``os.open`` of a file kmsfs expects to be regular: never following a symlink, never
    blocking (on a FIFO put in its place), and OSError(EINVAL) for anything but a regular file.

    *path* is used as given (callers :func:`~kmsfs.fs.longpath.reach` it, or pass *dir_fd*).
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def dir_no_follow(path: bytes) -> Iterator[bytes]:
    """The directory *path* as ``/proc/self/fd/N``, opened without following a symlink at its
    name (OSError ENOTDIR or ELOOP if one is there, or anything but a directory): for kmsfs's
    own directories in a ciphertext root (``kmsfs.longlinks``), where whoever can write the
    ciphertext can put a symlink, and the daemon or fsck would follow it out of the volume."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        yield b"/proc/self/fd/%d" % fd
    finally:
        os.close(fd)


def read_internal_file(path: bytes | str, limit: int, dir_fd: int | None = None) -> bytes:
    """Up to *limit* bytes of the regular file *path* (an IV, a sidecar, a long-symlink blob).

    Whoever can write the ciphertext can put a FIFO, a symlink or a device at such a name; a
    plain open() would follow the symlink or block on the FIFO, and on the trio thread that
    freezes every request of the mount. So: no following, no blocking, and anything but a
    regular file is OSError(EINVAL), which callers report as damage of that one path. With
    *dir_fd*, *path* is a name in that directory.
    """
    try:
        where = reach(path) if isinstance(path, bytes) and dir_fd is None else path
        fd = open_regular(where, dir_fd=dir_fd)
    except OSError as exc:  # the caller names the file, in its own terms
        raise type(exc)(exc.errno, exc.strerror) from None
    try:
        chunks: list[bytes] = []
        left = limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))  # a big limit allocates nothing up front
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def pwrite_fully(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite all of *data* at *offset*, going on after a short write (OSError on failure)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def renameat2(old: bytes, new: bytes, flags: int, old_dir_fd: int | None = None) -> None:
    """rename(2) with flags; EINVAL if the C library or the file system cannot do them.

    With *old_dir_fd*, *old* is a name in the directory open as that descriptor: the entry
    the daemon opened that directory for, whatever has happened to its path since
    (kmsfs.fs.dirpool).
    """
    src_fd, src = (AT_FDCWD, reach(old)) if old_dir_fd is None else (old_dir_fd, old)
    if flags == 0:
        os.rename(src, reach(new), src_dir_fd=old_dir_fd)
    elif _renameat2 is None:
        raise OSError(errno.EINVAL, "renameat2 is not available")
    elif _renameat2(src_fd, src, AT_FDCWD, reach(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if old_dir_fd is None:
        forget(old, new)  # anchors at or below either lead elsewhere now
    else:
        forget(new)


def rename_noreplace(old: bytes, new: bytes, old_dir_fd: int | None = None) -> None:
    """rename(2) that fails with EEXIST instead of replacing *new* (an empty directory, say);
    *old_dir_fd* as for :func:`renameat2`.

    Where the file system has no RENAME_NOREPLACE, a check then a rename: the daemon is the only
    writer of its ciphertext tree, so nothing can make *new* in between.
    """
    try:
        renameat2(old, new, RENAME_NOREPLACE, old_dir_fd)
        return
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    if os.path.lexists(reach(new)):
        raise FileExistsError(errno.EEXIST, "file exists", new)
    renameat2(old, new, 0, old_dir_fd)


def own(target: bytes | int, uid: int, gid: int, mode: int | None, parent: bytes) -> None:
    """Give a new entry the caller's uid/gid (we run as root), then re-apply set-id bits.

    As on ext4, an entry made in a set-group-ID directory (*parent*, the backing directory,
    whose mode and group are the plaintext ones) takes that directory's group, and a new
    directory there is set-group-ID itself. The kernel has already dropped S_ISGID from a
    non-directory made there by a caller outside the group. chown clears S_ISUID/S_ISGID, so a
    mode carrying them is applied again afterwards.

    A file, FIFO or symlink made for a caller with the daemon's own uid and gid (root, as for
    tar -x run by root) needs nothing: the backing file system made it with them, or with the
    set-group-ID directory's group, just as this would. That saves a stat and a chown per new
    file. Not a directory: :meth:`~kmsfs.fs.entries.KmsfsOps.mkdir` sets its mode after
    making it, which drops the set-group-ID bit that the directory inherited.
    """
    euid = os.geteuid()
    if euid != 0:
        return
    if uid == euid and gid == os.getegid() and not (mode is not None and stat.S_ISDIR(mode)):
        return
    parent_st = os.stat(reach(parent))
    if parent_st.st_mode & stat.S_ISGID:
        gid = parent_st.st_gid
        if mode is not None and stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    if isinstance(target, int):
        os.fchown(target, uid, gid)
        if mode is not None and mode & 0o6000:
            os.fchmod(target, mode & 0o7777)
    else:  # never through a symlink: whoever can write the tree could have put one there
        os.chown(reach(target), uid, gid, follow_symlinks=False)
        if mode is not None and mode & 0o6000:
            os.chmod(reach(target), mode & 0o7777, follow_symlinks=False)


#: CAP_FSETID's bit in the capability sets of /proc/PID/status (linux/capability.h).
CAP_FSETID = 4


class Caller:
    """The process behind a request, as far as ext4's set-id rules go: its groups, and
    whether it holds CAP_FSETID (which, not being root, is what keeps set-id bits: a root
    process that dropped it loses them as any user does).

    Both come from /proc/PID/status (the FUSE request's pid is the calling thread, whose
    capabilities are the ones that count), read once and only when a rule needs them: most
    requests touch no file with a set-id bit. A caller gone by then counts as having the
    capability if root, and as in its fsgid's group only.

    The capability sets there are the caller's in its own user namespace: any user who
    makes one (``unshare -Ur``) shows them all, and has none of them where the file system
    is. So they count only for a caller in the daemon's user namespace; elsewhere it has no
    CAP_FSETID, as the kernel's capable() finds.
    """

    def __init__(self, uid: int, gid: int, pid: int) -> None:
        self.uid = uid
        self.gid = gid
        self.pid = pid

    @functools.cached_property
    def _status(self) -> tuple[set[int], bool]:
        groups, capabilities = {self.gid}, None
        try:
            with open(f"/proc/{self.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Groups:"):
                        groups.update(int(g) for g in line.split()[1:])
                    elif line.startswith(b"CapEff:"):
                        capabilities = int(line.split()[1], 16)
            if capabilities is None:
                raise ValueError("no CapEff line")
            fsetid = bool(capabilities >> CAP_FSETID & 1) and _same_user_namespace(self.pid)
        except (OSError, ValueError, IndexError):
            return {self.gid}, self.uid == 0
        return groups, fsetid

    @property
    def groups(self) -> set[int]:
        """The fsgid and the supplementary groups."""
        return self._status[0]

    @property
    def fsetid(self) -> bool:
        """Whether CAP_FSETID is in the effective set."""
        return self._status[1]


def _same_user_namespace(pid: int) -> bool:
    """Whether process *pid* is in this process's user namespace (OSError if it is gone)."""
    theirs = os.stat(f"/proc/{pid}/ns/user")
    ours = os.stat("/proc/self/ns/user")
    return (theirs.st_ino, theirs.st_dev) == (ours.st_ino, ours.st_dev)


def allowed_mode(mode: int, file_gid: int, caller: Caller) -> int:
    """The mode a setattr by *caller* may leave: only a member of the file's group or a
    holder of CAP_FSETID keeps S_ISGID (ext4's rule for chmod, and for the set-id bits
    dropped on chown and write). Reads the caller's credentials only if the answer depends
    on them."""
    if mode & stat.S_ISGID and file_gid not in caller.groups and not caller.fsetid:
        return mode & ~stat.S_ISGID
    return mode


def set_id_dropped(mode: int, file_gid: int, caller: Caller) -> int:
    """The mode ext4 leaves a file (not a directory) after a chown by *caller*, or after a
    write or truncate by a caller without CAP_FSETID (the kernel's should_remove_suid):
    set-user-ID goes, and set-group-ID if group-execute is on; a caller outside the file's
    group *file_gid* (its group before a chown) also loses set-group-ID unless it holds
    CAP_FSETID (:func:`allowed_mode`)."""
    mode &= ~stat.S_ISUID
    if mode & stat.S_IXGRP:
        mode &= ~stat.S_ISGID
    return allowed_mode(mode, file_gid, caller)


def touch_ctime(target: bytes | int, mode: int | None) -> None:
    """Update only the ctime (chown to -1, -1), keeping or setting the permission bits *mode*.

    For a chown(-1, -1), or the kernel asking to drop set-id bits when there is nothing it
    knows to drop: ext4 updates the ctime in both cases. The backing chown may clear set-id
    bits itself, so *mode* (None for a symlink) is applied again if it differs.
    """
    nofollow: dict[str, bool] = {}
    if not isinstance(target, int):
        target, nofollow = reach(target), {"follow_symlinks": False}
    os.chown(target, -1, -1, **nofollow)
    if mode is not None and stat.S_IMODE(os.stat(target, **nofollow).st_mode) != mode:
        os.chmod(target, mode, **nofollow)


#: ext4 stores a symlink target of fewer bytes than this inside the inode (no block).
EXT4_INLINE_SYMLINK = 60


def without_links(st: os.stat_result) -> os.stat_result:
    """*st* (taken before an unlink) as fstat gives it once the last link is gone: 0 links,
    changed now. What the daemon answers for a removed file it holds no fd of: a process may
    still reach it by an O_PATH fd, which sends no OPEN (ext4 answers its fstat so)."""
    now = time.time_ns()
    head = list(st[:10])
    head[3], head[9] = 0, now // 1_000_000_000  # st_nlink, st_ctime (whole seconds)
    rest = {name: getattr(st, name) for name in _STAT_EXTRA}
    rest.update(st_ctime=now / 1e9, st_ctime_ns=now)
    return os.stat_result(head, rest)


#: The fields of os.stat_result past its first ten that the daemon's answers use.
_STAT_EXTRA = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
               "st_blksize", "st_blocks", "st_rdev")


def entry_attrs(
    st: os.stat_result, ino: int, timeout: float, size: int | None = None
) -> pyfuse3.EntryAttributes:
    """EntryAttributes for a ciphertext stat: regular files get their plaintext size.

    *size* overrides the size (symlinks: the plaintext target length, found by the caller).
    """
    e = pyfuse3.EntryAttributes()  # generation 0, as a new one has
    e.st_ino = ino
    e.entry_timeout = timeout
    e.attr_timeout = timeout
    mode = st.st_mode
    e.st_mode = mode
    e.st_nlink = st.st_nlink
    e.st_uid = st.st_uid
    e.st_gid = st.st_gid
    e.st_rdev = st.st_rdev
    e.st_blksize = 4096
    if size is None and stat.S_ISREG(mode):
        size = plain_size_lenient(st.st_size)
        e.st_size = size
        # What ext4 allocates for the plaintext (blocks of 4 KiB), never more than the
        # ciphertext takes: a file of exactly 4096 bytes uses 8 sectors, not 16.
        e.st_blocks = min(st.st_blocks, (size + 4095) // 4096 * 8)
    elif size is None:
        e.st_size = st.st_size
        e.st_blocks = st.st_blocks
    else:
        e.st_size = size
        # ext4 keeps a symlink target shorter than 60 bytes in the inode, a longer one in one
        # 4 KiB block; the backing symlink holds the longer encrypted target instead.
        inline = size < EXT4_INLINE_SYMLINK
        e.st_blocks = (0 if inline else 8) if stat.S_ISLNK(mode) else st.st_blocks
    e.st_atime_ns = st.st_atime_ns
    e.st_mtime_ns = st.st_mtime_ns
    e.st_ctime_ns = st.st_ctime_ns
    return e


def statvfs_data(path: bytes) -> pyfuse3.StatvfsData:
    sv = os.statvfs(reach(path))
    out = pyfuse3.StatvfsData()
    for name in (
        "f_bsize",
        "f_frsize",
        "f_blocks",
        "f_bfree",
        "f_bavail",
        "f_files",
        "f_ffree",
        "f_favail",
    ):
        setattr(out, name, getattr(sv, name))
    out.f_namemax = 255
    return out


def may_access(st: os.stat_result, mode: int, uid: int, gids: set[int]) -> bool:
    """access(2) semantics for the access handler (unused with default_permissions)."""
    if uid == 0:
        return not (mode & os.X_OK) or bool(st.st_mode & 0o111) or stat.S_ISDIR(st.st_mode)
    if st.st_uid == uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in gids:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    return (mode & bits) == mode
