"""``kmsfs reencrypt``, after the files: symlink targets and xattr values to the current epoch.

Both are AES-GCM sealed under the key of the ``mk`` epoch their nonce names
(:mod:`kmsfs.crypto.epoch_nonces`); each one below the current epoch is sealed again at it.

- An xattr value is replaced in place, one ``setxattr(XATTR_REPLACE)`` each: atomic per value,
  so a crash leaves every value whole under one epoch or the other. Its name stays as it is
  (xattr names are keyed with epoch 1: docs/format.md, "Key epochs").
- A symlink's target cannot change in place. A new symlink with the same owner and times is
  made under a temporary name beside each link of it (one inode, linked where the old one is
  linked) and renamed over it, as a file's rewrite is (:mod:`kmsfs.fs.reencrypt_rewrite`; a
  Ctrl-C waits for the last rename); a long target's new blob is written before the symlink
  that names it. A crash leaves at most temporary names, which the next run removes or, for a
  hard-linked symlink whose renames had begun, renames over the links still on the old inode
  (:func:`~kmsfs.fs.reencrypt_resume.rejoin`, by the old inode's number in their name).
- Last, the blobs no symlink names any more (those replaced, and what a crash left) are
  removed (:meth:`ValueRekeyer.remove_orphan_blobs`).

Directory times are kept as the files' rewrite keeps them (:class:`DirTimes`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from kmsfs.crypto.symlinks import LONGLINK_DIR_B, SymlinkCipher, is_longlink
from kmsfs.crypto.xattrs import USER_PREFIX, ForeignXattrName, XattrCipher
from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs.longlinks import longlinks_dir, read_blob, remove_blob, write_blob
from kmsfs.fs.longpath import reach
from kmsfs.fs.names import TEMP_PREFIX as BLOB_TEMP_PREFIX
from kmsfs.fs.reencrypt_resume import DirTimes
from kmsfs.fs.reencrypt_rewrite import abandon, rename_over, renames_cut_short
from kmsfs.fs.reencrypt_walk import TEMP_PREFIX, open_dir_unread, open_unread, owner_access

if TYPE_CHECKING:
    from kmsfs.fs.reencrypt import Summary


def _count(counts: dict[int, int], epoch: int, n: int = 1) -> None:
    counts[epoch] = counts.get(epoch, 0) + n
    if not counts[epoch]:
        del counts[epoch]


class ValueRekeyer:
    """Seals the symlink targets and xattr values of one volume again at epoch *current*.

    *fail(path, detail)* records what could not be moved; what moved, and the counts per epoch
    before and after, go into *summary* (the run's, as
    :class:`~kmsfs.fs.reencrypt_rewrite.Rewriter`'s bytes do). *retired(path, what, epoch)*
    hears of each value moved from an epoch below *retired_below* (only *links* and *xattrs*
    that read retired epochs open those: ``--upgrade``'s migration), so a run can list them.
    """

    def __init__(self, root: bytes, links: SymlinkCipher, xattrs: XattrCipher, current: int,
                 times: DirTimes, summary: Summary, fail: Callable[[bytes, str], None],
                 retired_below: int = 1,
                 retired: Callable[[bytes, str, int], None] = lambda p, w, e: None) -> None:
        self.root = root
        self.retired_below = retired_below
        self.retired = retired
        self.links = links
        self.xattrs = xattrs
        self.current = current
        self.times = times
        self.summary = summary
        self.fail = fail
        self.named: collections.Counter[str] = collections.Counter()
        """The targets the tree's symlinks have (after this run), with how many inodes have
        each: the blobs in use are those counted above 0."""
        self.unread = False
        """A symlink could not be read: it may name any blob."""

    # xattr values

    def reseal_xattrs(self, path: bytes) -> None:
        """Seal again each ``user.*`` value of the file or directory at *path* (one of its
        links) that is below the current epoch."""
        try:
            names = os.listxattr(reach(path), follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENOENT):  # no xattrs there; gone
                self.fail(path, f"extended attributes: {exc.strerror or exc}")
            return
        before = self.summary.xattrs_resealed
        for disk in names:
            raw = os.fsencode(disk)
            if raw.startswith(USER_PREFIX):
                self._reseal(path, raw)
        if self.summary.xattrs_resealed > before:
            self._fsync(path)  # durable before the run says so (and a retirement follows)

    def _fsync(self, path: bytes) -> None:
        try:
            is_dir = stat.S_ISDIR(os.lstat(reach(path)).st_mode)
            with owner_access(path, stat.S_IRUSR):
                fd = (open_dir_unread if is_dir else open_unread)(reach(path))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            self.fail(path, f"extended attributes not made durable: {exc.strerror or exc}")

    def _reseal(self, path: bytes, disk: bytes) -> None:
        # its owner (not root) may read and write it for the time of it: a write-only file's
        # values cannot be read, a read-only one's not written
        with owner_access(path, stat.S_IRUSR | stat.S_IWUSR):
            self._reseal_open(path, disk)

    def _reseal_open(self, path: bytes, disk: bytes) -> None:
        try:
            stored = os.getxattr(reach(path), disk, follow_symlinks=False)
            name = self.xattrs.plain_name(disk, stored)
            value, epoch = self.xattrs.open_with_epoch(disk, stored)
        except ForeignXattrName:
            return  # another program's: not ours to move
        except IntegrityError as exc:
            self.fail(path, f"extended attribute {os.fsdecode(disk)}: {exc}")
            return
        except OSError as exc:
            self.fail(path, f"extended attribute {os.fsdecode(disk)}: {exc.strerror or exc}")
            return
        _count(self.summary.xattr_epochs_before, epoch)
        if epoch >= self.current:
            _count(self.summary.xattr_epochs_after, epoch)
            return
        try:
            os.setxattr(reach(path), disk, self.xattrs.seal(disk, value, name),
                        os.XATTR_REPLACE, follow_symlinks=False)
        except (OSError, IntegrityError) as exc:
            _count(self.summary.xattr_epochs_after, epoch)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.fail(path, f"extended attribute {os.fsdecode(disk)}: {why}")
            return
        _count(self.summary.xattr_epochs_after, self.current)
        self.summary.xattrs_resealed += 1
        if epoch < self.retired_below:
            self.retired(path, f"xattr {os.fsdecode(name)} value", epoch)

    # symlinks

    def rewrite_symlink(self, paths: list[bytes], st: os.stat_result) -> None:
        """Give the symlink at *paths* (all links of one inode, *st* its lstat as the walk
        found it) a target sealed at the current epoch, if it is below it. (Reading a symlink
        may move its atime, as fsck's reading does; a rewritten one gets the walk's back.)"""
        first = paths[0]
        try:
            stored = os.fsdecode(os.readlink(reach(first)))
        except OSError as exc:
            self.unread = True
            self.fail(first, exc.strerror or str(exc))
            return
        self.named[stored] += 1
        try:
            target, epoch = self.links.open_from_disk(stored, lambda: read_blob(self.root, stored))
        except IntegrityError as exc:
            self.fail(first, str(exc))
            return
        _count(self.summary.symlink_epochs_before, epoch, len(paths))
        if epoch >= self.current:
            _count(self.summary.symlink_epochs_after, epoch, len(paths))
            return
        try:
            with contextlib.ExitStack() as opened:
                for d in sorted({os.path.dirname(p) for p in paths}):
                    opened.enter_context(owner_access(d, stat.S_IWUSR | stat.S_IXUSR))
                whole = self._replace(paths, st, target)
        except (OSError, FormatError, IntegrityError) as exc:
            _count(self.summary.symlink_epochs_after, epoch, len(paths))
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.fail(first, detail)
            return
        if whole:
            self.named[stored] -= 1  # no path of this inode names the old blob any more
        _count(self.summary.symlink_epochs_after, self.current, len(paths))
        self.summary.symlinks_rewritten += 1
        if epoch < self.retired_below:
            for path in paths:
                self.retired(path, "symlink target", epoch)

    def _replace(self, paths: list[bytes], st: os.stat_result, target: bytes) -> bool:
        """Put a new symlink of *target* at every path; True once all are renamed. After an
        error between two renames, the temporary names left (suffixed with the old inode's
        number, as a file's) stay for the next run to join (:func:`rejoin`): removed, they
        would leave the hard link split for good."""
        now = os.lstat(reach(paths[0]))
        if (now.st_dev, now.st_ino, now.st_size) != (st.st_dev, st.st_ino, st.st_size):
            raise FormatError("changed while the job ran (is the volume in use?)")
        disk = self.links.encrypt_to_disk(target)
        self.named[disk.target] += 1  # kept, whatever happens next
        blob = None
        if disk.long_content is not None:
            blob = write_blob(self.root, disk.target, disk.long_content)
        temps: list[bytes] = []
        pairs: list[tuple[bytes, bytes]] = []
        dirs = sorted({os.path.dirname(p) for p in paths})
        suffix = f"-{st.st_ino}"  # what a run after a crash matches it with (rejoin)
        try:
            for path in paths:
                d = os.path.dirname(path)
                temp = d + b"/" + os.fsencode(TEMP_PREFIX + secrets.token_hex(8) + suffix)
                self.times.touching(d)
                if not temps:
                    os.symlink(disk.target, reach(temp))
                    temps.append(temp)
                    self._keep_owner_times_and_xattrs(temp, paths[0], st)
                else:
                    os.link(reach(temps[0]), reach(temp), follow_symlinks=False)
                    temps.append(temp)
                pairs.append((temp, path))
            rename_over(pairs, temps, dirs)
        except BaseException as exc:
            renamed = abandon(temps, pairs)
            if not renamed and blob is not None:
                remove_blob(self.root, blob)
                self.named[disk.target] -= 1
            if renamed and isinstance(exc, OSError):
                raise renames_cut_short(exc, temps, pairs, "symlink") from exc
            raise
        finally:
            for d in dirs:
                self.times.restore_dir_times(d)
        return True

    def remove_orphan_blobs(self) -> None:
        """Remove each blob no symlink of the tree names (the walk found every one, and the
        volume is locked: no mount makes one meanwhile), and each half-written one: what a
        run or a mount killed between a blob and its symlink left, and the blobs this run's
        new symlinks replaced (removed only now: a copy of the tree that broke hard links
        leaves two symlinks naming one blob). Only names a blob or its temporary file can
        have; anything else is fsck's to report. Nothing, if a symlink could not be read."""
        if self.unread:
            return
        try:
            with longlinks_dir(self.root) as blobs:
                for name in os.listdir(blobs):
                    text = os.fsdecode(name)
                    orphan = is_longlink(text) and self.named[text] <= 0
                    if orphan or text.startswith(BLOB_TEMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(blobs + b"/" + os.fsencode(name))
                        self.summary.blobs_removed += 1
        except FileNotFoundError:
            return  # no long symlink ever made
        except OSError as exc:
            self.fail(self.root + b"/" + LONGLINK_DIR_B, f"blobs: {exc.strerror or exc}")

    @staticmethod
    def _keep_owner_times_and_xattrs(temp: bytes, old: bytes, st: os.stat_result) -> None:
        mine = os.lstat(reach(temp))
        if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
            try:
                os.chown(reach(temp), st.st_uid, st.st_gid, follow_symlinks=False)
            except PermissionError:
                raise FormatError(f"cannot keep owner {st.st_uid}:{st.st_gid} "
                                  "(run as root or as the owner)") from None
        # what the host set on it (a security label, trusted.*), where it lets us: a symlink
        # has no user.* xattrs (Linux refuses them)
        with contextlib.suppress(OSError):
            for name in os.listxattr(reach(old), follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.setxattr(reach(temp), name,
                                os.getxattr(reach(old), name, follow_symlinks=False),
                                follow_symlinks=False)
        # the times seen before this job read the target (readlink moves atime)
        os.utime(reach(temp), ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def symlink_epoch(root: bytes, links: SymlinkCipher, path: bytes) -> int | None:
    """The key epoch of the symlink at *path*, None if it does not open (for :func:`rejoin`,
    on a temporary name a killed run made, or on the path it was to replace: their atime, if
    the reading moved it, is put back)."""
    try:
        st = os.lstat(reach(path))
        stored = os.fsdecode(os.readlink(reach(path)))
        if os.lstat(reach(path)).st_atime_ns != st.st_atime_ns:  # the times a killed run set
            os.utime(reach(path), ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        return links.open_from_disk(stored, lambda: read_blob(root, stored))[1]
    except (OSError, IntegrityError):
        return None
