"""The pyfuse3 handlers: resolve the inode, call one synchronous helper, translate errors.

A passthrough over the ciphertext directory (pyfuse3's ``examples/passthroughfs.py`` shape):
FUSE inodes are backing inode numbers (:mod:`kmsfs.fs.inodes`), names are encrypted per
directory (:mod:`kmsfs.fs.names`), content goes through :mod:`kmsfs.fs.files`. Entry-level
handlers (create, link, rename...) live in :mod:`kmsfs.fs.entries`; this module has the
content, attribute, directory-listing and xattr handlers and the error boundary.

Only ``pyfuse3.FUSEError`` may leave a handler (:func:`guard`): an OSError becomes its errno,
an IntegrityError becomes EIO with one log line naming the plaintext path, anything else is EIO
with a logged traceback. Small syscalls run inline on the trio thread; reads and writes of
``THREAD_THRESHOLD`` bytes or more (but a lone request: ``INLINE_MAX``), fsync and big
directory listings run in worker threads.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio

from kmsfs.crypto.content import BLOCK_SIZE, cipher_size, plain_size_lenient
from kmsfs.crypto.symlinks import inline_target_length
from kmsfs.errors import AgentRefusedError, HsmError, IntegrityError, UsageError
from kmsfs.fs.files import BlockIntegrityError, ContentKeys, LongFill
from kmsfs.fs.handles import OpenFile, open_quietly
from kmsfs.fs.longpath import reach
from kmsfs.fs.posix import (
    MAX_FILE_SIZE,
    Caller,
    allowed_mode,
    entry_attrs,
    may_access,
    set_id_dropped,
    statvfs_data,
    touch_ctime,
)
from kmsfs.fs.volume import check_root_only
from kmsfs.fs.xattrs import HeldFile, foreign_name_errno
from kmsfs.fs.xattrs import Target as XattrTarget

log = logging.getLogger(__name__)

#: Reads and writes of this many bytes or more, and zero fills as long, go to a worker thread,
#: where they keep no other request waiting; except a lone request (below).
THREAD_THRESHOLD = 512 * 1024
#: The biggest request the kernel sends (libfuse's max_pages). A read this big or smaller runs
#: on the trio thread, and so does a write when no other request waits behind it and it only
#: adds blocks past the end (:meth:`ContentOps._inline_ok`): a lone ``dd`` or ``cp``. A worker
#: thread would only add a hop there, since its AEAD calls, 4 KiB each, hold the GIL (dd of 512
#: MiB on tmpfs, interleaved runs: 0.78 -> 0.96 of gocryptfs's MB/s).
INLINE_MAX = 1024 * 1024
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
ROOT_INODE = pyfuse3.ROOT_INODE
DOTS = 2  # "." and "..": the first two entries of every listing
#: A directory whose ciphertext st_size is at most this (a few hundred entries on ext4) is
#: listed on the trio thread: a worker-thread hop costs more than listing it.
SMALL_DIR_BYTES = 32 * 1024
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
#: The keyword arguments of os calls on an fd, and on a path (never through a symlink).
_BY_FD: dict[str, bool] = {}
_NO_FOLLOW = {"follow_symlinks": False}


def guard(fn: F) -> F:
    """The error boundary of every handler: nothing but FUSEError escapes."""

    @functools.wraps(fn)
    async def wrapper(self: Any, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except IntegrityError as exc:
            log.error("integrity: %s", exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except HsmError as exc:
            log.error("hsm: %s failed: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except AgentRefusedError as exc:  # the agent's policy (reloaded since the mount)
            log.error("%s refused: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(errno.EACCES) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


def _drop_set_id(target: bytes | int, caller: Caller) -> None:
    """What a truncate by *caller* does to the set-id bits on ext4: nothing if it holds
    CAP_FSETID, else :func:`set_id_dropped`. The kernel leaves it to us, as to any FUSE file
    system that takes FUSE_HANDLE_KILLPRIV (libfuse asks for it by default) or its V2
    (:mod:`kmsfs.fs.killpriv`); for open(O_TRUNC) it does in any case. *target*: an fd, or a
    path that is not a symlink."""
    nofollow = _BY_FD if isinstance(target, int) else _NO_FOLLOW
    st = os.stat(target, **nofollow)
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_ISUID | stat.S_ISGID) and not caller.fsetid:
        kept = set_id_dropped(mode, st.st_gid, caller)
        if kept != mode:
            os.chmod(target, kept, **nofollow)


def _caller(ctx: Any) -> Caller:
    return Caller(ctx.uid, ctx.gid, ctx.pid)


#: How many open directory handles hold an fd of their own at most (:meth:`opendir`).
MAX_HELD_DIR_FDS = 256


def _check_end(off: int, buf: bytes) -> None:
    """EFBIG if a write of *buf* at *off* would end past MAX_FILE_SIZE (before anything is
    written: nothing of it, as ext4 writes nothing at or past its limit)."""
    if off + len(buf) > MAX_FILE_SIZE:
        raise pyfuse3.FUSEError(errno.EFBIG)


@dataclass
class DirHandle:
    """An open directory: its inode, its ciphertext directory open as *fd* (None if it was
    already removed when opened), and the listing readdir took at offset 0."""

    ino: int
    entries: list[tuple[bytes, bytes]] | None = None
    fd: int | None = None


class ContentOps:
    """Mixin with attribute, content, directory and xattr handlers (see :class:`KmsfsOps`)."""

    # Provided by KmsfsOps.__init__ (declared for type checkers).
    table: Any
    names: Any
    links: Any
    xattrs: Any
    files: Any
    limiter: trio.CapacityLimiter
    dir_noatime: bool
    longlink_dir_exists: bool
    pool_dir_exists: bool
    timeout: float
    keep_cache: bool
    content_keys: ContentKeys
    _dirs: dict[int, DirHandle]
    _next_dir: Any
    _held_dir_fds: int = 0
    #: True if the kernel has a request ready for the daemon (the spin's poll of /dev/fuse,
    #: set by daemon.serve); a big request then leaves the trio thread for it.
    requests_waiting: Callable[[], bool] = staticmethod(lambda: False)  # type: ignore[assignment]

    # --- helpers ------------------------------------------------------------------------
    async def _run(self, size: int, fn: Callable[..., Any], *args: Any) -> Any:
        if size >= THREAD_THRESHOLD:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        return fn(*args)

    def _inline_ok(self, of: OpenFile, size: int, write_at: int | None = None) -> bool:
        """Whether a read or write of *size* bytes (THREAD_THRESHOLD or more) may run on the
        trio thread all the same: it is no bigger than one request, and, for a write at *write_at*,
        nothing else waits for the thread meanwhile (a read or stat behind a 1 MiB write waited
        for it, and behind a queue of them with ``-o writeback_cache``, for tens of ms) and it
        touches no block the file has. An overwrite gets a redo record, which may have to wait
        for a worker thread's records to return before it finds room in the write journal: only
        a worker thread may wait (:mod:`kmsfs.fs.journal`); on the trio thread it was refused
        with ENOSPC on a full disk, or grew the journal past its bound. A read runs inline even
        when a request waits: behind a sequential reader that is mostly its own next read
        (the kernel reads ahead while it replies), and a 1 MiB read takes under a millisecond."""
        if size > INLINE_MAX or of.lock.locked():
            return False
        if write_at is None:
            return True
        if self.requests_waiting():
            return False
        csize = of.content.cipher_size()
        psize = plain_size_lenient(csize)
        # The ciphertext must end where its last whole block does: a torn tail (a fragment
        # too short to be a block) is rewritten from the block before it, under a redo record.
        return write_at >= psize and psize % BLOCK_SIZE == 0 and csize == cipher_size(psize)

    def _integrity(self, ino: int, exc: IntegrityError) -> pyfuse3.FUSEError:
        where = self.table.plain_path(ino)
        if isinstance(exc, BlockIntegrityError):
            if exc.block < 0:
                log.error("integrity: %s header (%s)", where, exc)
            else:
                log.error("integrity: %s block %d (%s)", where, exc.block, exc)
        else:
            log.error("integrity: %s (%s)", where, exc)
        return pyfuse3.FUSEError(errno.EIO)

    def _symlink_size(self, path: bytes, st: os.stat_result) -> int:
        """The plaintext target's length: from the ciphertext target's length where that
        tells it (no readlink, so the symlink's atime stays), else by decrypting it."""
        size = inline_target_length(st.st_size)
        if size is not None:
            return size
        try:
            return len(self._read_link(path))
        except (IntegrityError, OSError):
            return 0

    def _attrs(self, ino: int, st: os.stat_result, path: bytes | None) -> pyfuse3.EntryAttributes:
        size = None
        if stat.S_ISLNK(st.st_mode) and path is not None:
            size = self._symlink_size(path, st)
        attrs = entry_attrs(st, ino, self.timeout, size)
        if ino == ROOT_INODE:
            # kmsfs.longlinks/ and kmsfs.newdirs/ are not subdirectories anyone can see. (A
            # backing file system that does not count subdirectories reports 1: nothing to
            # take away then.)
            hidden = self.longlink_dir_exists + self.pool_dir_exists
            if attrs.st_nlink >= 2 + hidden:
                attrs.st_nlink -= hidden
        return attrs

    def _warn_if_reachable(self) -> None:
        """The mount root's mode is the ciphertext root's: a chmod that lets other users in
        (as for allow_other) may let them reach the ciphertext, which a mount as root refuses
        (:func:`~kmsfs.fs.volume.check_root_only`). Say so now, not at the next mount."""
        try:
            check_root_only(Path(os.fsdecode(self.table.root_path)))
        except UsageError as exc:
            log.warning("%s; this mount goes on, the next one as root will refuse", exc)

    def _stat_ino(self, ino: int) -> tuple[os.stat_result, bytes | None]:
        of = self.files.get_file(ino)
        if of is not None:
            return os.fstat(of.fd), None
        try:
            path = self.table.path(ino)
        except FileNotFoundError:
            # Removed while open: a directory still open here answers from its fd, as a file
            # does (ext4 gives its attributes, 0 links, to fstat and to a listing of it); one
            # not open here (a removed working directory) with what its removal left.
            fd = self._held_dir_fd(ino)
            held = self.table.held(ino)  # a file removed after the kernel looked it up
            if fd is None and held is not None:
                fd = held[0]
            if fd is not None:
                return os.fstat(fd), None
            gone = self.table.gone_attrs(ino)
            if gone is None:
                raise
            return gone, None
        return os.lstat(reach(path)), path

    def _held_dir_fd(self, ino: int) -> int | None:
        """The fd of an open handle of directory *ino*, if any (only for one that has no path
        left: a scan of the open directories)."""
        for d in self._dirs.values():
            if d.ino == ino and d.fd is not None:
                return d.fd
        return None

    def _read_link(self, path: bytes) -> bytes:
        raise NotImplementedError

    # --- attributes ---------------------------------------------------------------------
    @guard
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        st, path = self._stat_ino(inode)
        return self._attrs(inode, st, path)

    @guard
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        """chown, chmod, utimens and truncate, with what the kernel leaves to the fs.

        The kernel has checked permissions (default_permissions comes with allow_other;
        without it only the mounting user gets in). Left to us: the set-id rules
        ext4 applies by the caller's groups (:func:`allowed_mode`), the ctime of chown(-1, -1)
        and of a kill-privileges request (both arrive with no field set), and EFBIG.
        """
        if fields.update_size:
            if attr.st_size > MAX_FILE_SIZE:
                raise pyfuse3.FUSEError(errno.EFBIG)
            await self._truncate(inode, attr.st_size)
        # By the open file's fd where there is one (chown, chmod and utimens of tar -x all
        # come through one), else by path, never following a symlink.
        of = self.files.get_file(inode)
        if of is None and self.table.held(inode) is not None:
            # Removed after the kernel looked it up (InodeTable.hold): through a handle of its
            # own, as a file open here goes.
            fh = await self._new_handle(inode, os.O_RDONLY)
            try:
                return self._setattr(inode, attr, fields, ctx, self.files.handle(fh).file)
            finally:
                self.files.release(fh)
        return self._setattr(inode, attr, fields, ctx, of)

    def _setattr(
        self, inode: int, attr: Any, fields: Any, ctx: Any, of: OpenFile | None
    ) -> pyfuse3.EntryAttributes:
        """setattr's changes but the size, through *of*'s fd if given, else by path."""
        target: bytes | int
        if of is not None:
            target, nofollow = of.fd, _BY_FD
        else:
            target, nofollow = reach(self.table.path(inode)), _NO_FOLLOW  # used at once
        changed = fields.update_size
        caller = _caller(ctx)
        if fields.update_size:
            _drop_set_id(target, caller)  # a file, never a symlink: it has a size
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            before = None
            if not fields.update_mode:
                before = os.stat(target, **nofollow)
                if stat.S_ISDIR(before.st_mode) or stat.S_ISLNK(before.st_mode):
                    before = None  # chown drops no set-id bit of these
            os.chown(target, uid, gid, **nofollow)
            if before is not None and before.st_mode & stat.S_ISGID and not caller.fsetid:
                # The kernel leaves the set-id rules of chown to us (FUSE_HANDLE_KILLPRIV, see
                # _drop_set_id); the backing chown by the daemon (root, CAP_FSETID) applied
                # only the rules of a caller that holds it.
                now = stat.S_IMODE(os.stat(target, **nofollow).st_mode)
                kept = set_id_dropped(stat.S_IMODE(before.st_mode), before.st_gid, caller)
                if kept != now:
                    os.chmod(target, kept, **nofollow)
            changed = True
        if fields.update_mode:
            mode = stat.S_IMODE(attr.st_mode)
            if mode & stat.S_ISGID:  # only then do the file's group and the caller count
                mode = allowed_mode(mode, os.stat(target, **nofollow).st_gid, caller)
            try:
                os.chmod(target, mode, **nofollow)
            except NotImplementedError:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP) from None
            if inode == ROOT_INODE and mode & 0o011:
                self._warn_if_reachable()
            changed = True
        if fields.update_atime or fields.update_mtime:
            if fields.update_atime and fields.update_mtime:
                times = (attr.st_atime_ns, attr.st_mtime_ns)
            else:
                st = os.stat(target, **nofollow)
                times = (
                    attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                    attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
                )
            os.utime(target, ns=times, **nofollow)
            changed = True
        if not changed:  # chown(-1, -1), or the kernel's request to drop set-id bits (a write)
            st = os.stat(target, **nofollow)
            mode = None
            if not stat.S_ISLNK(st.st_mode):
                mode = stat.S_IMODE(st.st_mode)
                if not stat.S_ISDIR(st.st_mode):
                    # ext4's rules for a chown, and for a write by a caller without CAP_FSETID,
                    # the only one the kernel sends this for: the same (set_id_dropped).
                    # FUSE_HANDLE_KILLPRIV leaves both to us (see _drop_set_id).
                    mode = set_id_dropped(mode, st.st_gid, caller)
            touch_ctime(target, mode)
        st = os.stat(target, **nofollow)
        return self._attrs(inode, st, None if of is not None else target)

    async def _truncate(self, ino: int, size: int) -> None:
        """truncate(2) by path or by handle: always through a handle of the inode's open
        file, under its lock, so it is ordered with every read and write of the file (as
        ext4's inode lock orders them) and its fd cannot be closed under it."""
        fh = await self._new_handle(ino, os.O_RDWR)
        try:
            of = self.files.handle(fh).file
            async with of.lock:
                await self._run(size, of.content.truncate, size)
        except IntegrityError as exc:
            raise self._integrity(ino, exc) from None
        finally:
            self.files.release(fh)

    @guard
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        st, _ = self._stat_ino(inode)
        return may_access(st, mode, ctx.uid, pyfuse3.get_sup_groups(ctx.pid) | {ctx.gid})

    @guard
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        return statvfs_data(self.table.root_path)

    @guard
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """fallocate(2) mode 0: grow the file to offset+length with encrypted zero blocks.

        A kmsfs file is never sparse (docs/format.md, "Holes and the rules for writers"), so
        allocating is writing zeros past the end (ENOSPC at once if the disk cannot hold them:
        :func:`~kmsfs.fs.files.check_room`); inside the file there is nothing to do. Other
        modes (keep size, punch or zero a range, collapse...) are EOPNOTSUPP. pyfuse3 3.5 does
        not dispatch FUSE_FALLOCATE, so the kernel answers EOPNOTSUPP itself and glibc's
        posix_fallocate falls back to writes, which end in the same file.
        """
        if mode != 0:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        if offset < 0 or length <= 0:
            raise pyfuse3.FUSEError(errno.EINVAL)
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise pyfuse3.FUSEError(errno.EFBIG)
        handle = self.files.handle(fh)
        if not handle.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        of = handle.file
        async with of.lock:
            size = of.content.plain_size()
            if end > size:
                try:
                    await self._run(end - size, of.content.truncate, end)
                except IntegrityError as exc:
                    raise self._integrity(of.ino, exc) from None

    # --- content ------------------------------------------------------------------------
    def _open_path(self, inode: int) -> tuple[bytes, bytes | None]:
        """(path, removed): the path to open *inode* by, and where it was removed from if that
        is not a path in the tree (None when it is). For a file that is open but has no name
        left (unlinked while open): its open fd through /proc, so that it can still be
        truncated or opened for write, as on ext4 (removed: b"", no journal needed). For a
        file removed after the kernel looked it up (:meth:`InodeTable.hold`): the fd the table
        holds, through /proc, and the ciphertext path of the link removed."""
        try:
            return self.table.path(inode), None
        except OSError:
            of = self.files.get_file(inode)
            if of is not None:
                return b"/proc/self/fd/%d" % of.content.fd, b""
            held = self.table.held(inode)
            if held is None:
                raise
            return b"/proc/self/fd/%d" % held[0], held[1]

    async def _new_handle(self, inode: int, flags: int) -> int:
        """A handle of *inode*'s open file (opened now if it has none). Not a handler: its
        callers (open, and truncates by setattr or open) are the error boundary."""
        swapped = self.files.needs_fd_swap(inode, flags)
        if swapped is not None and swapped.lock.locked():
            # Opening for write replaces the file's read-only fd: not under an operation
            # that is using the old one in a worker thread.
            async with swapped.lock:
                path, removed = self._open_path(inode)
                return self.files.open(inode, path, flags, removed=removed)
        path, removed = self._open_path(inode)
        return self.files.open(inode, path, flags, removed=removed)

    @guard
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        fh = await self._new_handle(inode, flags)
        if flags & os.O_TRUNC:
            # The kernel checked write permission; O_RDONLY|O_TRUNC truncates too (as on ext4).
            try:
                await self._truncate(inode, 0)
                _drop_set_id(self.files.handle(fh).file.content.fd, _caller(ctx))
            except BaseException:
                self.files.release(fh)
                raise
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.keep_cache)

    @guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        of = self.files.handle(fh).file
        if (size < THREAD_THRESHOLD and not of.lock.locked()) or (
            size >= THREAD_THRESHOLD and self._inline_ok(of, size)
        ):
            # Fast path: runs to completion without yielding, so no lock is needed.
            try:
                return of.content.read(off, size)
            except IntegrityError as exc:
                raise self._integrity(of.ino, exc) from None
        async with of.lock:
            try:
                return await self._run(size, of.content.read, off, size)
            except IntegrityError as exc:
                raise self._integrity(of.ino, exc) from None

    @guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Write *buf* at *off* (at the end for O_APPEND, unless the kernel caches writes and
        placed it itself).

        EFBIG for a write that would end past MAX_FILE_SIZE, as setattr and fallocate give:
        the kernel leaves that check to us (a FUSE mount's limit is 2**63), and without it a
        write at 2**44 tried to fill 16 TiB. With ``-o writeback_cache`` the kernel has taken
        the write into its cache already (pwrite succeeded, and st_size shows it while the
        kernel keeps the inode); its write-back arrives here and fails with EFBIG, which fsync
        reports (close says EIO), and nothing is written.
        """
        handle = self.files.handle(fh)
        of = handle.file
        _check_end(off, buf)
        work = len(buf)
        appends = handle.append and not self.enable_writeback_cache
        if (work < THREAD_THRESHOLD and not of.lock.locked()) or (
            work >= THREAD_THRESHOLD
            and self._inline_ok(of, work, of.content.plain_size() if appends else off)
        ):
            # Fast path: runs to completion without yielding, so no lock is needed. A write far
            # past the end (a long zero fill) is refused here, before it starts, and goes below.
            try:
                if appends:
                    off = of.content.plain_size()
                    _check_end(off, buf)
                return of.content.write(off, buf, max(THREAD_THRESHOLD - len(buf), 0))
            except LongFill as fill:
                work += fill.args[0]
            except IntegrityError as exc:
                raise self._integrity(of.ino, exc) from None
        async with of.lock:
            try:
                if appends:
                    off = of.content.plain_size()
                    _check_end(off, buf)
                return await self._run(work, of.content.write, off, buf)
            except IntegrityError as exc:
                raise self._integrity(of.ino, exc) from None

    async def flush(self, fh: int) -> None:
        """ENOSYS: the kernel then stops sending FLUSH (fc->no_flush) and close(2) saves a
        round trip. Nothing is lost: writes go straight to the ciphertext file, so there is
        nothing to flush here, and the kernel still writes back dirty (mmap) pages and reports
        their errors on close before it would have sent FLUSH."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        of = self.files.handle(fh).file
        async with of.lock:  # the fd must not be swapped (open for write) meanwhile
            await trio.to_thread.run_sync(of.content.fsync, datasync, limiter=self.limiter)

    @guard
    async def release(self, fh: int) -> None:
        """Closing the last handle closes the fd: never under an operation that holds the
        file's lock and may be using the fd in a worker thread (a path-based truncate of the
        same file, say); it waits for it. Every await that uses an OpenFile's fd holds its
        lock, so an unlocked file has no such user and is released at once."""
        of = self.files.file_of(fh)
        if of is not None and of.lock.locked():
            async with of.lock:
                self.files.release(fh)
        else:
            self.files.release(fh)

    # --- directories --------------------------------------------------------------------
    @guard
    async def opendir(self, inode: int, ctx: Any) -> int:
        """Opens the ciphertext directory, kept open until releasedir: readdir lists it
        through that fd, and it still answers fstat once the directory is removed (ext4 gives
        a removed directory's attributes, and an empty listing). The open is the one listing
        by path made anyway, moved here. A directory removed before it is opened (a removed
        cwd) has no fd, and lists as empty.

        At most :data:`MAX_HELD_DIR_FDS` handles hold one (and none when the daemon is out of
        fds): one fd a handle, so a process opening one directory a thousand times would
        otherwise use up the daemon's fds and fail every open on the mount (EMFILE). A handle
        past that lists through an fd of its own, opened for the listing, as before; removed
        while open, it lists as empty and answers fstat with what its removal left.
        """
        try:
            path = self.table.path(inode)
        except FileNotFoundError:
            fd = None
        else:
            fd = None
            if self._held_dir_fds < MAX_HELD_DIR_FDS:
                try:
                    fd = open_quietly(path, DIR_FLAGS, self.dir_noatime)
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                else:
                    self._held_dir_fds += 1
        fh = next(self._next_dir)
        self._dirs[fh] = DirHandle(inode, fd=fd)
        return fh

    @guard
    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        d = self._dirs[fh]
        try:
            dirpath = self.table.path(d.ino)
        except FileNotFoundError:
            return  # removed while open: no entries, not even "." and ".." (as on ext4)
        if start_id == 0 or d.entries is None:
            try:
                dir_iv = self.names.dir_iv(d.ino, dirpath)
            except IntegrityError as exc:
                raise self._integrity(d.ino, exc) from None
            plain = self.table.plain_path(d.ino)
            # Through the fd, not the path: a rename of the directory (or of a parent) while
            # a big one is listed in a worker thread must not make it list as empty.
            fd = d.fd if d.fd is not None else open_quietly(dirpath, DIR_FLAGS, self.dir_noatime)
            try:
                args = (dir_iv, b"/proc/self/fd/%d" % fd, plain, fd)
                if os.fstat(fd).st_size <= SMALL_DIR_BYTES:
                    d.entries = self.names.list_dir(*args)
                else:
                    d.entries = await trio.to_thread.run_sync(
                        self.names.list_dir, *args, limiter=self.limiter
                    )
            finally:
                if fd != d.fd:
                    os.close(fd)
                try:
                    dirpath = self.table.path(d.ino)  # where it is now
                except FileNotFoundError:
                    return  # removed meanwhile (empty, if big once)
            self.names.remember_listing(dir_iv, d.entries)
        entries = d.entries
        # Offsets 1 and 2 are "." and "..", as ext4 lists them; the kernel takes no lookup
        # reference on them, so they are not remembered either.
        for dot in range(start_id, DOTS):
            ino = d.ino if dot == 0 else self.table.parent(d.ino)
            path = self.table.path(ino)
            attrs = self._attrs(ino, os.lstat(reach(path)), path)
            if not pyfuse3.readdir_reply(token, b"." * (dot + 1), attrs, dot + 1):
                return
        for i in range(max(start_id - DOTS, 0), len(entries)):
            cname, pname = entries[i]
            path = dirpath + b"/" + cname
            try:
                st = os.lstat(reach(path))
            except FileNotFoundError:
                continue
            ino = self.table.fuse_ino(st.st_ino)
            if not pyfuse3.readdir_reply(token, pname, self._attrs(ino, st, path), i + 1 + DOTS):
                break
            self.table.remember(ino, d.ino, cname, pname, 1)

    @guard
    async def releasedir(self, fh: int) -> None:
        d = self._dirs.pop(fh, None)
        if d is not None and d.fd is not None:
            self._held_dir_fds -= 1
            os.close(d.fd)

    @guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """fsync of the ciphertext directory: the one this handle holds open (so a directory
        renamed over or removed since still answers, as on ext4), else the one at its path;
        with none left (removed before it was opened), nothing is left to sync: 0, as ext4."""
        d = self._dirs[fh]
        if d.fd is not None:
            await trio.to_thread.run_sync(os.fsync, d.fd, limiter=self.limiter)
            return
        try:
            path = self.table.path(d.ino)
            fd = os.open(reach(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            await trio.to_thread.run_sync(os.fsync, fd, limiter=self.limiter)
        finally:
            os.close(fd)

    # --- extended attributes ------------------------------------------------------------
    def _xattr_target(self, ino: int) -> XattrTarget:
        of = self.files.get_file(ino)
        if of is not None:
            return of.fd
        try:
            return reach(self.table.path(ino))  # used at once
        except FileNotFoundError:
            # Removed, yet open here (a directory) or held (a file looked up before): through
            # its fd, as ext4 answers whoever still has the file.
            fd = self._held_dir_fd(ino)
            if fd is not None:
                return fd
            held = self.table.held(ino)
            if held is None:
                raise
            return HeldFile(held[0])

    def _xattr_integrity(self, ino: int, exc: IntegrityError) -> pyfuse3.FUSEError:
        return self._integrity(ino, IntegrityError(f"xattr: {exc}"))

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        """Unless it took FUSE_HANDLE_KILLPRIV_V2 (:mod:`kmsfs.fs.killpriv`), the kernel asks for
        security.capability before every write(2): that answer (what Xattrs.get gives outside
        ``user.*``) comes without resolving the inode and without :func:`guard`'s extra
        coroutine, since it can raise nothing but FUSEError."""
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(foreign_name_errno(name))
        return await self._get_user_xattr(inode, name)

    @guard
    async def _get_user_xattr(self, inode: int, name: bytes) -> bytes:
        try:
            return self.xattrs.get(self._xattr_target(inode), name)
        except IntegrityError as exc:
            raise self._xattr_integrity(inode, exc) from None

    @guard
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self.xattrs.set(self._xattr_target(inode), name, value)

    @guard
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        def damaged(disk: bytes, exc: IntegrityError) -> None:
            where = self.table.plain_path(inode)
            log.error("integrity: %s: undecryptable xattr %r (%s)", where, disk, exc)

        return self.xattrs.list(self._xattr_target(inode), damaged)

    @guard
    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self.xattrs.remove(self._xattr_target(inode), name)
