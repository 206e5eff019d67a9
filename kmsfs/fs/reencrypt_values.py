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
  that names it, and the old blob removed after the last rename. A crash leaves at most
  temporary names (the next run removes them) and, between the renames of a hard-linked
  symlink, its links split in two symlinks with the same target; the old blob a crash leaves
  is an orphan, removed at the end of the next run (:meth:`ValueRekeyer.remove_orphan_blobs`).

Directory times are kept as the files' rewrite keeps them (:class:`DirTimes`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable

from kmsfs.atomicfile import fsync_dir
from kmsfs.crypto.symlinks import LONGLINK_DIR_B, SymlinkCipher, is_longlink
from kmsfs.crypto.xattrs import USER_PREFIX, ForeignXattrName, XattrCipher
from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs.longlinks import longlinks_dir, remove_blob, write_blob
from kmsfs.fs.longpath import reach
from kmsfs.fs.names import TEMP_PREFIX as BLOB_TEMP_PREFIX
from kmsfs.fs.posix import read_internal_file
from kmsfs.fs.reencrypt_resume import DirTimes
from kmsfs.fs.reencrypt_rewrite import signals_deferred
from kmsfs.fs.reencrypt_walk import TEMP_PREFIX, owner_access


def _count(counts: dict[int, int], epoch: int, n: int = 1) -> None:
    counts[epoch] = counts.get(epoch, 0) + n
    if not counts[epoch]:
        del counts[epoch]


class ValueRekeyer:
    """Seals the symlink targets and xattr values of one volume again at epoch *current*.

    *fail(path, detail)* records what could not be moved; the counts per epoch, before and
    after, are in ``symlink_epochs_*`` and ``xattr_epochs_*``.
    """

    def __init__(self, root: bytes, links: SymlinkCipher, xattrs: XattrCipher, current: int,
                 times: DirTimes, fail: Callable[[bytes, str], None]) -> None:
        self.root = root
        self.links = links
        self.xattrs = xattrs
        self.current = current
        self.times = times
        self.fail = fail
        self.symlinks_rewritten = 0
        self.blobs_removed = 0
        self.xattrs_resealed = 0
        self.symlink_epochs_before: dict[int, int] = {}
        self.symlink_epochs_after: dict[int, int] = {}
        self.xattr_epochs_before: dict[int, int] = {}
        self.xattr_epochs_after: dict[int, int] = {}

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
        for disk in names:
            raw = os.fsencode(disk)
            if raw.startswith(USER_PREFIX):
                self._reseal(path, raw)

    def _reseal(self, path: bytes, disk: bytes) -> None:
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
        _count(self.xattr_epochs_before, epoch)
        if epoch >= self.current:
            _count(self.xattr_epochs_after, epoch)
            return
        try:
            with owner_access(path, stat.S_IWUSR):
                os.setxattr(reach(path), disk, self.xattrs.seal(disk, value, name),
                            os.XATTR_REPLACE, follow_symlinks=False)
        except (OSError, IntegrityError) as exc:
            _count(self.xattr_epochs_after, epoch)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.fail(path, f"extended attribute {os.fsdecode(disk)}: {why}")
            return
        _count(self.xattr_epochs_after, self.current)
        self.xattrs_resealed += 1

    # symlinks

    def rewrite_symlink(self, paths: list[bytes], st: os.stat_result) -> None:
        """Give the symlink at *paths* (all links of one inode, *st* its lstat as the walk
        found it) a target sealed at the current epoch, if it is below it."""
        first = paths[0]
        try:
            stored = os.fsdecode(os.readlink(reach(first)))
            target, epoch = self.links.open_from_disk(stored, lambda: self._read_blob(stored))
        except IntegrityError as exc:
            self.fail(first, str(exc))
            return
        except OSError as exc:
            self.fail(first, exc.strerror or str(exc))
            return
        _count(self.symlink_epochs_before, epoch, len(paths))
        if epoch >= self.current:
            _count(self.symlink_epochs_after, epoch, len(paths))
            return
        try:
            with contextlib.ExitStack() as opened:
                for d in sorted({os.path.dirname(p) for p in paths}):
                    opened.enter_context(owner_access(d, stat.S_IWUSR | stat.S_IXUSR))
                self._replace(paths, st, target, stored)
        except (OSError, FormatError, IntegrityError) as exc:
            _count(self.symlink_epochs_after, epoch, len(paths))
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self.fail(first, detail)
            return
        _count(self.symlink_epochs_after, self.current, len(paths))
        self.symlinks_rewritten += 1

    def _read_blob(self, stored: str) -> str:
        try:
            with longlinks_dir(self.root) as blobs:
                return read_internal_file(blobs + b"/" + os.fsencode(stored), 8192).decode("ascii")
        except (OSError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"long symlink {stored}: unreadable blob ({exc})") from None

    def _replace(self, paths: list[bytes], st: os.stat_result, target: bytes,
                 old_stored: str) -> None:
        now = os.lstat(reach(paths[0]))
        if (now.st_dev, now.st_ino, now.st_size) != (st.st_dev, st.st_ino, st.st_size):
            raise FormatError("changed while the job ran (is the volume in use?)")
        disk = self.links.encrypt_to_disk(target)
        blob = None
        if disk.long_content is not None:
            blob = write_blob(self.root, disk.target, disk.long_content)
        temps: list[bytes] = []
        renamed = False
        dirs = sorted({os.path.dirname(p) for p in paths})
        try:
            for i, path in enumerate(paths):
                d = os.path.dirname(path)
                temp = d + b"/" + os.fsencode(TEMP_PREFIX + secrets.token_hex(8))
                self.times.touching(d)
                if i == 0:
                    os.symlink(disk.target, reach(temp))
                    temps.append(temp)
                    self._keep_owner_and_times(temp, st)
                else:
                    os.link(reach(temps[0]), reach(temp), follow_symlinks=False)
                    temps.append(temp)
            for d in dirs:
                fsync_dir(reach(d))  # every new name is durable before any path is replaced
            with signals_deferred():  # a Ctrl-C waits for the last link (no split link)
                for temp, path in zip(list(temps), paths, strict=True):
                    os.rename(reach(temp), reach(path))
                    temps.remove(temp)
                    renamed = True
            for d in dirs:
                fsync_dir(reach(d))
        except BaseException:
            for temp in temps:
                with contextlib.suppress(OSError):
                    os.unlink(reach(temp))
            if blob is not None and not renamed:
                remove_blob(self.root, blob)
            raise
        finally:
            for d in dirs:
                self.times.restore_dir_times(d)
        if is_longlink(old_stored) and old_stored != disk.target:
            remove_blob(self.root, os.fsencode(old_stored))

    def remove_orphan_blobs(self, links: list[bytes]) -> None:
        """Remove each blob no symlink of the tree names (*links*: every symlink path), and
        each half-written one: what a run or a mount killed between a blob and its symlink
        left. Only names a blob or its temporary file can have; anything else is fsck's to
        report. The volume is locked: no mount makes a symlink meanwhile."""
        named = set()
        for link in links:
            try:
                named.add(os.fsdecode(os.readlink(reach(link))))
            except OSError:
                return  # a symlink not read may name any blob: keep them all
        try:
            with longlinks_dir(self.root) as blobs:
                for name in os.listdir(blobs):
                    text = os.fsdecode(name)
                    orphan = is_longlink(text) and text not in named
                    if orphan or text.startswith(BLOB_TEMP_PREFIX):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(blobs + b"/" + os.fsencode(name))
                        self.blobs_removed += 1
        except FileNotFoundError:
            return  # no long symlink ever made
        except OSError as exc:
            self.fail(self.root + b"/" + LONGLINK_DIR_B, f"blobs: {exc.strerror or exc}")

    @staticmethod
    def _keep_owner_and_times(temp: bytes, st: os.stat_result) -> None:
        mine = os.lstat(reach(temp))
        if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
            try:
                os.chown(reach(temp), st.st_uid, st.st_gid, follow_symlinks=False)
            except PermissionError:
                raise FormatError(f"cannot keep owner {st.st_uid}:{st.st_gid} "
                                  "(run as root or as the owner)") from None
        # the times seen before this job read the target (readlink moves atime)
        os.utime(reach(temp), ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
