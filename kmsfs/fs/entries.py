"""Directory-entry handlers and the complete :class:`KmsfsOps`.

Every handler that makes a name writes the long-name sidecar first and the entry second, so a
crash leaves at most an orphan sidecar (hidden, harmless), never an entry without its name.
Every entry is created with the caller's uid/gid and exactly the requested mode (the daemon runs
with umask 0; the kernel has already applied the caller's umask).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from kmsfs.crypto.symlinks import LONGLINK_DIR, LONGLINK_DIR_B, LONGLINK_TARGET_LEN, is_longlink
from kmsfs.errors import IntegrityError, KmsfsError
from kmsfs.fs import config as volconfig
from kmsfs.fs import dirs, journal
from kmsfs.fs.dirpool import POOL_DIR, POOL_DIR_B, DirPool
from kmsfs.fs.epoch_ciphers import (
    check_new_name,
    links_of_volume,
    retired_below,
    writing_epoch,
    xattrs_of_volume,
)
from kmsfs.fs.files import ContentKeys
from kmsfs.fs.handles import OpenFiles
from kmsfs.fs.inodes import InodeTable
from kmsfs.fs.journal import WriteJournal
from kmsfs.fs.longlinks import longlinks_dir, read_blob, remove_blob, write_blob
from kmsfs.fs.longpath import reach
from kmsfs.fs.names import (
    TEMP_PREFIX,
    DirNames,
    check_name,
    names_of_volume,
    remove_sidecar,
    undo_sidecar,
    write_sidecar,
)
from kmsfs.fs.operations import ContentOps, DirHandle, guard
from kmsfs.fs.posix import (
    own,
    rename_noreplace,
    renameat2,
    without_links,
)
from kmsfs.fs.xattrs import Xattrs
from kmsfs.keys import KeyDeriver

log = logging.getLogger(__name__)

RENAME_FLAGS = pyfuse3.RENAME_NOREPLACE | pyfuse3.RENAME_EXCHANGE


class KmsfsOps(ContentOps, pyfuse3.Operations):
    """The kmsfs file system over one ciphertext directory, keyed by one Domain's deriver."""

    supports_dot_lookup = False
    enable_writeback_cache = False  # opt-in per mount: -o writeback_cache (daemon.py)

    def __init__(
        self,
        cipherdir: Path,
        deriver: KeyDeriver,
        *,
        timeout: float = 1.0,
        keep_cache: bool = True,
        key_epochs: bool | None = None,
    ) -> None:
        """``key_epochs``: the volume's KeyEpochs flag; None reads it from its kmsfs.conf (the
        other flags that change what the handlers do are always read from there)."""
        super().__init__()
        root = os.fsencode(os.path.abspath(cipherdir))
        self.table = InodeTable(root, os.lstat(root).st_ino)
        config = volconfig.load(Path(cipherdir))
        self._deriver = deriver
        # Each directory's names are keyed with the epoch its IV names (new directories: the
        # current one); symlink targets and xattr values with the epoch their nonce names
        # (new ones: the current), xattr names with epoch 1 (docs/format.md, "Key epochs").
        self.names = DirNames(names_of_volume(deriver))
        self.links = links_of_volume(deriver)
        self.xattrs = Xattrs(
            xattrs_of_volume(deriver), long_names=config.has(volconfig.FLAG_LONG_XATTR_NAMES)
        )
        below = retired_below(deriver)
        if below > 1 and not config.has(volconfig.FLAG_SYMLINK_XATTR_EPOCHS):
            log.warning("this volume was made before symlink targets and xattr values followed "
                        "the key epochs, and its Domain retired the epochs below %d: symlinks and "
                        "xattr values still at them read EIO until 'kmsfs reencrypt --upgrade' "
                        "moves them", below)
        if key_epochs is None:
            key_epochs = config.has(volconfig.FLAG_KEY_EPOCHS)
        self.content_keys = ContentKeys(deriver, key_epochs)
        self.journal = _open_journal(root, self.content_keys)
        self.files = OpenFiles(self.content_keys, self.journal)
        self.limiter = trio.CapacityLimiter(8)
        self.dir_noatime = False  # -o noatime or nodiratime: listings leave atime alone
        # Hidden, but counted in the root's st_nlink by the backing file system (see _attrs).
        self.longlink_dir_exists = _is_dir(self.table.root_path + b"/" + LONGLINK_DIR_B)
        self.pool_dir_exists = os.path.isdir(self.table.root_path + b"/" + POOL_DIR_B)
        self.pool: DirPool | None = None  # see start_dir_pool
        self.timeout = timeout
        self.keep_cache = keep_cache
        # The answer to a lookup of a name that does not exist: inode 0, which the kernel keeps
        # as a negative entry for entry_timeout (an ENOENT error it would ask about again).
        self._no_entry = pyfuse3.EntryAttributes()
        self._no_entry.st_ino = 0
        self._no_entry.entry_timeout = timeout
        self._dirs: dict[int, DirHandle] = {}
        self._held_dir_fds = 0  # handles holding an fd (operations.MAX_HELD_DIR_FDS)
        self._next_dir = itertools.count(1)

    def make_longlinks_dir(self) -> None:
        """Make ``kmsfs.longlinks/`` in the ciphertext root now, before the mount serves (a
        read-write one), rather than at the volume's first long symlink: made then, it moved
        the mount root's mtime and ctime under a running ``tar -c`` ("file changed as we read
        it") for a symlink made in some subdirectory. A failure is only logged: the first long
        symlink makes it then, as before."""
        if self.longlink_dir_exists:
            return
        try:
            with longlinks_dir(self.table.root_path, create=True):
                self.longlink_dir_exists = True
        except OSError as exc:
            log.warning("%s: not made ahead (%s)", LONGLINK_DIR, exc.strerror or exc)

    def remove_blob_leftovers(self) -> None:
        """Remove what a daemon killed while writing a long-symlink blob left: its temporary
        file (``kmsfs.tmp.*`` in ``kmsfs.longlinks``). No symlink can name one (a blob gets
        its name once whole), and they piled up, one per such crash, reported by fsck alone.
        Read-write mounts, as they start; a failure is only logged (fsck still reports)."""
        if not self.longlink_dir_exists:
            return
        temp = os.fsencode(TEMP_PREFIX)
        try:
            with longlinks_dir(self.table.root_path) as blobs:
                for entry in os.scandir(blobs):
                    if entry.name.startswith(temp) and entry.is_file(follow_symlinks=False):
                        os.unlink(blobs + b"/" + entry.name)
                        log.info("removed %s/%s, a blob a crash left half written",
                                 LONGLINK_DIR, os.fsdecode(entry.name))
        except OSError as exc:
            log.warning("%s: leftovers not removed (%s)", LONGLINK_DIR, exc.strerror)

    def new_dir_epoch(self) -> int:
        """The epoch a new directory's names are keyed with
        (:func:`~kmsfs.fs.epoch_ciphers.writing_epoch`: EIO if it is retired)."""
        return writing_epoch(self._deriver, "no new directory")

    def start_dir_pool(self) -> None:
        """Keep new directories ready for mkdir (:mod:`kmsfs.fs.dirpool`), if this daemon can.

        Only as root (see the module), and not on a backing store that cannot be written: then
        mkdir makes each directory itself, as before.
        """
        if os.geteuid() != 0:
            return
        pool = DirPool(self.table.root_path, lambda: int(self._deriver.current_epoch))
        try:
            pool.open()
        except OSError as exc:
            pool.close()
            log.warning("no directories made ahead (%s): %s", POOL_DIR, exc.strerror)
            return
        self.pool_dir_exists = True
        pool.start()
        self.pool = pool

    def stop_dir_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def between_requests(self) -> bool:
        """Work for the pause after a reply (the daemon's spin calls it while it waits): mark
        the write journal's returned records done, then derive the key of a file just opened
        for reading (its READ is on its way) or else keys of files yet to be made. False if
        there was nothing to do."""
        settled = self.journal.settle() if self.journal is not None else False
        return self.files.key_one() or self.content_keys.derive_ahead() or settled

    # --- name resolution ----------------------------------------------------------------
    def _resolve(
        self, parent: int, name: bytes, new: bool = False
    ) -> tuple[bytes, bytes, Any]:
        """(directory path, ciphertext name, DiskName) of *name* in *parent*. With *new* (a
        name to be made there), EIO with a log line naming *parent* if its names are keyed with
        a retired epoch (:func:`~kmsfs.fs.epoch_ciphers.check_new_name`)."""
        check_name(name)
        dirpath = self.table.path(parent)
        try:
            dir_iv = self.names.dir_iv(parent, dirpath)
            if new:
                check_new_name(self._deriver, dir_iv)
        except IntegrityError as exc:
            raise self._integrity(parent, exc) from None
        disk = self.names.disk_name(dir_iv, name)
        return dirpath, os.fsencode(disk.name), disk

    def _entry(
        self, parent: int, cname: bytes, name: bytes, path: bytes, st: os.stat_result | None = None
    ) -> pyfuse3.EntryAttributes:
        if st is None:
            st = os.lstat(reach(path))
        ino = self.table.fuse_ino(st.st_ino)
        attrs = self._attrs(ino, st, path)
        self.table.remember(ino, parent, cname, name, 1)
        return attrs

    def _read_link(self, path: bytes) -> bytes:
        stored = os.fsdecode(os.readlink(reach(path)))
        return self.links.decrypt_from_disk(
            stored, lambda: read_blob(self.table.root_path, stored))

    def _hold_longlink(
        self, path: bytes
    ) -> tuple[tuple[int, bytes] | None, os.stat_result | None]:
        """((O_PATH fd, blob path) if *path* is a symlink with a long target, its stat).

        Held across the removal of the entry: the blob goes only if the fd then shows no link
        left (docs/format.md, "Symlinks"), so a hard link made meanwhile keeps it. Anything but
        a symlink needs no fd: one lstat answers (the common case, e.g. every file of rm -rf).
        Nor does a symlink whose ciphertext target is not as long as every long one's: reading
        a target moves its atime, which other hard links of the symlink show (ext4's do not).
        """
        try:
            st = os.lstat(reach(path))
        except FileNotFoundError:
            return None, None
        if not stat.S_ISLNK(st.st_mode) or st.st_size != LONGLINK_TARGET_LEN:
            return None, st
        try:
            fd = os.open(reach(path), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None, None
        try:
            st = os.fstat(fd)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(b"", dir_fd=fd)
                if is_longlink(os.fsdecode(target)):
                    return (fd, target), st
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        return None, st

    def _keep_removed(self, ino: int | None, fd: int | None, path: bytes) -> None:
        """Give the node *ino*, whose last link the table knew (at ciphertext *path*) just
        went, the O_PATH fd *fd* of its file (:meth:`InodeTable.hold`); close *fd* if there
        is nothing to give it to. The caller owns *fd* until this returns, on every path.

        Why: the kernel may have looked the name up just before the removal (an open(2) or
        stat(2) of a file another process is replacing by rename, as editors and config
        writers do), and then asks for the node by its number. ext4 gives that process the
        old file; without the fd no path reaches it (the daemon learns links by lookup only,
        and the file may have none left), and the open or stat failed with ENOENT."""
        if fd is None:
            return
        if ino is None:
            os.close(fd)
            return
        self.table.hold(ino, fd, path)

    def _drop_longlink(self, held: tuple[int, bytes] | None) -> None:
        """After the entry is gone: remove the blob if no link to the symlink is left."""
        if held is None:
            return
        fd, blob = held
        try:
            if os.fstat(fd).st_nlink == 0:
                remove_blob(self.table.root_path, blob)
        finally:
            os.close(fd)

    # --- lookup and forget --------------------------------------------------------------
    @guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        dirpath, cname, _ = self._resolve(parent_inode, name)
        path = dirpath + b"/" + cname
        try:
            st = os.lstat(reach(path))
        except FileNotFoundError:
            return self._no_entry
        return self._entry(parent_inode, cname, name, path, st)

    @guard
    async def forget(self, inode_list: Any) -> None:
        for ino, count in inode_list:
            self.table.forget(ino, count)
            if not self.table.known(ino):
                self.names.forget_dir(ino)

    # --- making entries -----------------------------------------------------------------
    @guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        dirpath, cname, disk = self._resolve(parent_inode, name, new=True)
        path = dirpath + b"/" + cname
        written = write_sidecar(dirpath, disk)
        base = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_CREAT
        try:
            fd = os.open(reach(path), base | os.O_EXCL, stat.S_IMODE(mode))
            created = True
        except FileExistsError:
            undo_sidecar(dirpath, disk, written)
            if flags & os.O_EXCL:
                raise
            fd, created = os.open(reach(path), os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW), False
        except BaseException:
            undo_sidecar(dirpath, disk, written)
            raise
        try:
            if created:
                own(fd, ctx.uid, ctx.gid, mode, dirpath)
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        attrs = self._entry(parent_inode, cname, name, path, st)
        fh = self.files.open(attrs.st_ino, path, flags, fd=fd)
        if not created and flags & os.O_TRUNC:
            of = self.files.handle(fh).file
            async with of.lock:
                of.content.truncate(0)
            attrs = self._attrs(attrs.st_ino, os.fstat(fd), None)
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.keep_cache), attrs

    async def _make(
        self, parent: int, name: bytes, make: Any, uid: int, gid: int, mode: int | None
    ) -> pyfuse3.EntryAttributes:
        """Create one non-regular entry: its sidecar first, then ``make(path, own_new)``.

        ``own_new(target)`` gives what *make* created the caller's ownership; *make* calls it
        before the entry gets its visible name where it can (a directory).
        """
        dirpath, cname, disk = self._resolve(parent, name, new=True)
        path = dirpath + b"/" + cname

        def own_new(target: bytes) -> None:
            own(target, uid, gid, mode, dirpath)

        written = write_sidecar(dirpath, disk)
        try:
            make(path, own_new)
        except BaseException:
            undo_sidecar(dirpath, disk, written)
            raise
        return self._entry(parent, cname, name, path)

    @guard
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        def make(path: bytes, own_new: Any) -> None:
            os.mknod(reach(path), mode, rdev)
            own_new(path)

        return await self._make(parent_inode, name, make, ctx.uid, ctx.gid, mode)

    @guard
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        def make(path: bytes, own_new: Any) -> None:
            dirs.make_dir(path, stat.S_IMODE(mode), self.new_dir_epoch(), prepare=own_new,
                          pool=self.pool)

        return await self._make(parent_inode, name, make, ctx.uid, ctx.gid, mode)

    @guard
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        try:
            disk_link = self.links.encrypt_to_disk(target)
        except ValueError:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG) from None

        def make(path: bytes, own_new: Any) -> None:
            blob = None
            if disk_link.long_content is not None:
                blob = write_blob(self.table.root_path, disk_link.target, disk_link.long_content)
                self.longlink_dir_exists = True
            try:
                os.symlink(disk_link.target, reach(path))
            except BaseException:
                if blob is not None:  # its name is random: nothing else can use it
                    remove_blob(self.table.root_path, blob)
                raise
            own_new(path)

        return await self._make(parent_inode, name, make, ctx.uid, ctx.gid, None)

    @guard
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        try:
            return self._read_link(self.table.path(inode))
        except IntegrityError as exc:
            raise self._integrity(inode, exc) from None

    @guard
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        src = self.table.path(inode)
        dirpath, cname, disk = self._resolve(new_parent_inode, new_name, new=True)
        path = dirpath + b"/" + cname
        written = write_sidecar(dirpath, disk)
        try:
            os.link(reach(src), reach(path), follow_symlinks=False)
        except BaseException:
            undo_sidecar(dirpath, disk, written)
            raise
        return self._entry(new_parent_inode, cname, new_name, path)

    # --- removing and moving entries ----------------------------------------------------
    @guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        dirpath, cname, _ = self._resolve(parent_inode, name)
        path = dirpath + b"/" + cname
        held, st = self._hold_longlink(path)
        # The file, if the kernel holds it and it keeps other links that the daemon may not
        # know: its node keeps an fd (_keep_removed). Not for a file's last link: a process
        # that looked it up just before (or holds an O_PATH fd) gets its attributes as the
        # removal left them (without_links), but ENOENT to an open, where ext4 gives it the
        # file being removed; an fd there cost rm -rf 10% (5,000 files on tmpfs, alternating
        # runs).
        known = self.table.at(parent_inode, cname)
        kept = None
        if known is not None and st is not None and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            kept = _open_path_fd(path)
        try:
            try:
                os.unlink(reach(path))
                remove_sidecar(dirpath, cname)
            finally:
                self._drop_longlink(held)  # its blob goes only if no link is left
            # Only a file with other links can go on being open by another name (the lstat
            # above counted them): rm -rf of files with one link each does no more than before.
            ino = known if st is not None and st.st_nlink > 1 else None
            self.table.drop_link(parent_inode, cname)
            if st is not None and st.st_nlink <= 1:
                # its last link (no await since the fstat): a file still open is anonymous now
                # A regular file's attributes stand as they were, and a FIFO's or a
                # socket's (held open, their data never reach the daemon); a symlink's size
                # would be its ciphertext's, which only its path could turn into the target's.
                gone = without_links(st) if _attrs_outlive_path(st) else None
                ino = self.table.removed(st.st_ino, gone)
                self.files.unlinked(ino)
            elif ino is not None:
                self._link_gone(ino, path)
            fd, kept = kept, None
            self._keep_removed(ino, fd, path)
        finally:
            if kept is not None:
                os.close(kept)

    @guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        dirpath, cname, _ = self._resolve(parent_inode, name)
        path = dirpath + b"/" + cname
        watch = dirs.RemovalWatch(path)
        try:
            # (an IV written again only if its own is gone: no name in it to protect)
            dirs.remove_empty_dir(path, int(self._deriver.current_epoch))
        finally:
            watch.close()
        remove_sidecar(dirpath, cname)
        self.table.drop_link(parent_inode, cname)
        self.names.forget_dir(self.table.removed(watch.before.st_ino, watch.after))

    @guard
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        if flags & ~RENAME_FLAGS or flags == RENAME_FLAGS:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old_dir, old_c, _ = self._resolve(parent_inode_old, name_old)
        # RENAME_EXCHANGE makes no name: the two entries keep theirs and swap what they hold
        new_dir, new_c, new_disk = self._resolve(
            parent_inode_new, name_new, new=not flags & pyfuse3.RENAME_EXCHANGE)
        old_path, new_path = old_dir + b"/" + old_c, new_dir + b"/" + new_c
        if flags & pyfuse3.RENAME_EXCHANGE:
            renameat2(old_path, new_path, flags)
            self.files.exchanged(old_path, new_path)
            self.table.exchange(
                (parent_inode_old, old_c), name_old, (parent_inode_new, new_c), name_new
            )
            return
        src = os.lstat(reach(old_path))
        held, dst = None, None
        if not flags & pyfuse3.RENAME_NOREPLACE:
            try:
                dst = os.lstat(reach(new_path))
            except FileNotFoundError:
                dst = None
            if dst is not None and dst.st_ino == src.st_ino:
                return  # two links to one inode: rename(2) does nothing
            if dst is not None and stat.S_ISLNK(dst.st_mode):
                held, _ = self._hold_longlink(new_path)
        kept = None  # an fd of the file renamed over, for its node (_keep_removed)
        try:
            # The file renamed over, if the kernel holds it: its node keeps an fd.
            if (
                dst is not None
                and stat.S_ISREG(dst.st_mode)
                and self.table.at(parent_inode_new, new_c) is not None
            ):
                kept = _open_path_fd(new_path)
            renamed_over = self._rename(
                (parent_inode_old, old_c, old_dir, old_path),
                (parent_inode_new, new_c, new_dir, new_path, new_disk),
                name_new, flags, src, dst,
            )
            fd, kept = kept, None
            self._keep_removed(renamed_over, fd, new_path)
        finally:
            self._drop_longlink(held)  # its blob goes only if no link is left
            if kept is not None:
                os.close(kept)

    def _rename(
        self,
        old: tuple[int, bytes, bytes, bytes],
        new: tuple[int, bytes, bytes, bytes, bytes],
        name_new: bytes,
        flags: int,
        src: os.stat_result,
        dst: os.stat_result | None,
    ) -> int | None:
        """The rename itself, once :meth:`rename` holds what the entry renamed over needs
        held; returns the node renamed over if it lost its last known link."""
        parent_inode_old, old_c, old_dir, old_path = old
        parent_inode_new, new_c, new_dir, new_path, new_disk = new
        # A file renamed over that keeps other links (see unlink).
        replaced = None
        if dst is not None and dst.st_nlink > 1 and not stat.S_ISDIR(dst.st_mode):
            replaced = self.table.at(parent_inode_new, new_c)
        # A directory renamed onto an empty one: the two are exchanged in one step, so the new
        # name is never missing, even across a crash (which can leave the replaced, empty
        # directory visible under the old name, as a worst case); it is then hidden and removed
        # (its IV cannot go before it is hidden: a crash would leave it visible without one).
        # Where the backing file system cannot exchange, it is hidden first instead.
        replaced_dir = dst is not None and stat.S_ISDIR(dst.st_mode) and stat.S_ISDIR(src.st_mode)
        leftovers = dirs.check_empty(new_path) if replaced_dir else []
        watch = dirs.RemovalWatch(new_path) if replaced_dir else None
        try:
            written = write_sidecar(new_dir, new_disk)
            hidden = None
            exchanged = False
            try:
                if replaced_dir:
                    exchanged = _exchange(old_path, new_path)
                    if not exchanged:
                        hidden = dirs.hide(new_path)
                if not exchanged:
                    renameat2(old_path, new_path, flags)
            except BaseException:
                if hidden is not None:
                    with contextlib.suppress(OSError):
                        rename_noreplace(hidden, new_path)
                undo_sidecar(new_dir, new_disk, written)
                raise
            if exchanged:
                hidden = dirs.hide(old_path)  # the replaced directory, now under the old name
            if hidden is not None:
                dirs.remove_hidden(hidden, leftovers)
        finally:
            if watch is not None:
                watch.close()
        self.files.moved(old_path, new_path)
        remove_sidecar(old_dir, old_c)
        self.table.move_link((parent_inode_old, old_c), (parent_inode_new, new_c), name_new)
        if dst is not None and (stat.S_ISDIR(dst.st_mode) or dst.st_nlink <= 1):
            gone_attrs = watch.after if watch is not None else None
            gone = self.table.removed(dst.st_ino, gone_attrs)  # renamed over its last link
            self.files.unlinked(gone)
            if replaced_dir:
                self.names.forget_dir(gone)
            return gone
        if replaced is not None:
            self._link_gone(replaced, new_path)
        return replaced

    def _link_gone(self, ino: int, path: bytes) -> None:
        """The link at ciphertext *path* of *ino*, which has others, is gone (its table entry
        dropped already). If *ino* is open and its write journal records named *path* (the path
        of the link the table learned first, or the one it was created or renamed at), they
        name another link the table knows from now on: a record naming a path that no longer
        holds its file is found only by a search of the whole volume at the next mount
        (kmsfs.fs.journal). With no other link known (the kernel never looked it up), the
        records keep naming *path*, and that search is what finds them."""
        if self.files.get_file(ino) is None:
            return  # not open: the next open takes a path from the table
        try:
            other = self.table.path(ino)
        except OSError:
            return
        self.files.link_gone(ino, path, other)


def _attrs_outlive_path(st: os.stat_result) -> bool:
    """Whether a node's attributes as its last link's removal left them are what fstat of it
    gives from then on: a regular file, a FIFO or a socket. An unlinked FIFO held open
    answered fstat with ENOENT (ext4 answers; found by review)."""
    return stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)


def _open_path_fd(path: bytes) -> int | None:
    """An O_PATH fd of the regular file at ciphertext *path* (never through a symlink), for
    its node to keep once the entry goes (:meth:`KmsfsOps._keep_removed`); None if there is
    no regular file there any more."""
    try:
        fd = os.open(reach(path), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _exchange(a: bytes, b: bytes) -> bool:
    """Swap two names atomically; False (nothing done) if the file system cannot."""
    try:
        renameat2(a, b, pyfuse3.RENAME_EXCHANGE)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        return False
    return True


def _is_dir(path: bytes) -> bool:
    """A directory at *path* itself (a symlink to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _open_journal(root: bytes, keys: ContentKeys) -> WriteJournal | None:
    """Replay what a killed daemon left in the write journal, then open it for this mount.

    Before anything is served, so no read sees a block an interrupted write tore. A backing
    directory that cannot be written (a read-only copy) gets no journal: nothing is written
    there anyway, and what the journal holds waits for a mount that can repair it.
    """
    try:
        journal.replay(root, keys.cipher)
        return WriteJournal(root)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ELOOP, errno.EISDIR):  # a FIFO, a link, a dir
            where = os.fsdecode(root + b"/" + journal.JOURNAL_NAME.encode())
            raise KmsfsError(
                f"{where}: {exc.strerror}, not kmsfs's write journal: move it away"
            ) from None
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        log.warning("write journal: %s; overwrites are not protected on this mount", exc.strerror)
        return None
