"""What a killed ``kmsfs reencrypt`` leaves behind, and how the next run finishes it.

Before the first change to a directory's entries, its atime/mtime and a fingerprint of its
ciphertext entry names are saved, durably, in a ``trusted.kmsfs.reencrypt-times`` xattr on the
directory itself (which changes only its ctime; the mount shows ``user.*`` xattrs only); the run
puts the times back and removes the xattr at its end (:class:`DirTimes`).

A crash (kill -9) leaves every path readable: each is either the old file or the new one, with
the same plaintext. The next run finishes what the killed one left: a hard-linked file (or
symlink) whose renames it cut short (some paths on the new inode, some still on the old one,
which the suffix names) gets its remaining renames, if the old inode is unchanged (same size,
mtime, mode and owner, still at the older epoch: a file's header, a symlink's target)
(:func:`rejoin`); every other temporary name is removed; a
directory whose saved entries still match gets its saved times back. Files already at the
current epoch are skipped: the job is resumable and idempotent. Left as they are: a link whose
old inode changed in between (a mount wrote to it) stays split in two files of equal content,
and, unless the job runs as root (``trusted.*`` xattrs) on a file system with xattrs, the times
of the directories the killed run changed stay moved.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable

from kmsfs.atomicfile import fsync_dir
from kmsfs.fs.longpath import reach
from kmsfs.fs.reencrypt_walk import (
    REKEY_NAME,
    TEMP_PREFIX,
    Tree,
    epoch_of,
    fingerprint_now,
    owner_access,
)

TIMES_XATTR = "trusted.kmsfs.reencrypt-times"
"""On a directory whose entries a run is changing: ``<atime_ns> <mtime_ns> <fingerprint>``
(ASCII), its times from before and a hash of its ciphertext entry names (module docstring)."""


class DirTimes:
    """The directories' own atime/mtime: as the walk found them (or as a killed run saved
    them), saved durably before this run first changes a directory, and put back after."""

    def __init__(self) -> None:
        self.dir_times: dict[bytes, tuple[int, int]] = {}
        """Directory -> (atime_ns, mtime_ns) to put back: as found, or as a killed run saved."""
        self.prints: dict[bytes, str] = {}
        self.marked: set[bytes] = set()
        """Directories whose TIMES_XATTR holds their saved times: put back and dropped last."""
        self.can_mark = True

    def found(self, tree: Tree) -> None:
        """Take the times of every directory of the walked *tree* as the ones to put back, or
        the times a killed run saved on it (:meth:`_saved_times`)."""
        self.prints = tree.prints
        self.dir_times = {d: (st.st_atime_ns, st.st_mtime_ns) for d, st in tree.dirs.items()}
        for d in tree.dirs:
            self._saved_times(d)

    def _saved_times(self, d: bytes) -> None:
        """Take the times a killed run saved on *d* as the ones to put back, if its entries
        are still those it saw; a marker they no longer match (a mount changed the directory
        since, so its times are the mount's) is dropped. A directory whose names a killed run
        was moving to another key (``kmsfs.diriv.rekey``) had names that changed, and no mount
        since (one refuses the volume then): its saved times stand."""
        try:
            raw = os.getxattr(reach(d), TIMES_XATTR, follow_symlinks=False)
        except OSError:
            return  # none (ENODATA); or no xattrs here, or not root (trusted.* is not seen)
        fields = raw.split(b" ")
        if len(fields) == 3 and fields[0].isdigit() and fields[1].isdigit() and (
            fields[2].decode("ascii", "replace") == self.prints[d]
            or os.path.lexists(reach(d + b"/" + REKEY_NAME.encode()))
        ):
            self.dir_times[d] = (int(fields[0]), int(fields[1]))
            self.marked.add(d)
        else:
            with contextlib.suppress(OSError):
                os.removexattr(reach(d), TIMES_XATTR, follow_symlinks=False)

    def touching(self, d: bytes) -> None:
        """Save *d*'s times durably (TIMES_XATTR) before this run first changes its entries,
        so that a run after a crash puts them back. Only root may write ``trusted.*``; without
        it (or without xattrs) a crash can leave the times moved."""
        if d in self.marked or not self.can_mark:
            return
        try:
            self._save(d)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self.can_mark = False
            return
        self.marked.add(d)

    def _save(self, d: bytes) -> None:
        """Write *d*'s saved times and entry fingerprint (TIMES_XATTR), durably."""
        atime, mtime = self.dir_times[d]
        value = f"{atime} {mtime} {self.prints[d]}".encode("ascii")
        os.setxattr(reach(d), TIMES_XATTR, value, follow_symlinks=False)
        fsync_dir(reach(d))

    def names_moved(self, d: bytes) -> None:
        """*d*'s entries have their names under a new key: the saved copy of its times is to
        match them from now on (as a killed run's next run will find them)."""
        self.prints[d] = fingerprint_now(d)
        if d in self.marked:
            self._save(d)

    def restore_dir_times(self, d: bytes) -> None:
        times = self.dir_times.get(d)
        if times is not None:
            with contextlib.suppress(OSError):
                os.utime(reach(d), ns=times, follow_symlinks=False)

    def done_with(self, d: bytes) -> None:
        """Put back *d*'s times now and drop their saved copy: the names pass is done with
        it, and renames in its parent are about to move its path."""
        self.restore_dir_times(d)
        if d in self.marked:
            with contextlib.suppress(OSError):
                os.removexattr(reach(d), TIMES_XATTR, follow_symlinks=False)
                fsync_dir(reach(d))
            self.marked.discard(d)

    def finish(self) -> None:
        """Put back the times of every directory this run (or a killed one) changed, then drop
        the saved copy: last, so a crash before it leaves the copy for the next run."""
        for d in sorted(self.marked):
            self.restore_dir_times(d)
            with contextlib.suppress(OSError):
                os.removexattr(reach(d), TIMES_XATTR, follow_symlinks=False)
                fsync_dir(reach(d))
        self.marked.clear()


def rejoin(temps: list[bytes], files: list[bytes], times: DirTimes,
           link_epoch: Callable[[bytes], int | None] = lambda path: None,
           ) -> tuple[list[bytes], int]:
    """Finish the renames of each hard-linked file or symlink a killed run left half done;
    returns the temporary names left to remove, and the number of paths renamed (rejoined).
    *files* are the tree's regular files and symlinks; *link_epoch(path)* the key epoch of a
    symlink's target (None if it does not open)."""
    stats = {path: os.lstat(reach(path)) for path in files}
    by_inode: dict[tuple[int, int], list[bytes]] = {}
    for path, st in stats.items():
        by_inode.setdefault((st.st_dev, st.st_ino), []).append(path)
    left: list[bytes] = []
    done: set[bytes] = set()
    for temp in temps:
        target = _pending(temp, stats, by_inode, done, link_epoch)
        if target is None:
            left.append(temp)
            continue
        times.touching(os.path.dirname(temp))
        with owner_access(os.path.dirname(temp), stat.S_IWUSR | stat.S_IXUSR):
            os.rename(reach(temp), reach(target))  # within one directory (the same suffix)
        done.add(target)
    return left, len(done)


def _pending(temp: bytes, stats: dict[bytes, os.stat_result],
             by_inode: dict[tuple[int, int], list[bytes]], done: set[bytes],
             link_epoch: Callable[[bytes], int | None]) -> bytes | None:
    """The path *temp* was to be renamed over, if a killed run had begun the renames of
    its file (or symlink) and that path still holds the old inode, unchanged; else None."""
    _, dash, number = os.fsdecode(os.path.basename(temp))[len(TEMP_PREFIX):].partition("-")
    if not dash or not number.isdigit():
        return None  # not linked yet, or named by an older kmsfs
    try:
        new = os.lstat(reach(temp))
    except OSError:
        return None
    kind = stat.S_IFMT(new.st_mode)
    if kind not in (stat.S_IFREG, stat.S_IFLNK) or not by_inode.get((new.st_dev, new.st_ino)):
        return None  # no path has the new inode yet: the renames had not begun
    epoch = epoch_of if kind == stat.S_IFREG else link_epoch
    where = os.path.dirname(temp)
    for path in by_inode.get((new.st_dev, int(number)), []):
        old = stats[path]
        if path in done or os.path.dirname(path) != where:
            continue
        if (old.st_mode, old.st_uid, old.st_gid, old.st_size, old.st_mtime_ns) != (
            new.st_mode, new.st_uid, new.st_gid, new.st_size, new.st_mtime_ns
        ):
            continue  # changed since (a mount wrote to it): the link stays split
        old_epoch, new_epoch = epoch(path), epoch(temp)
        if old_epoch is not None and new_epoch is not None and old_epoch < new_epoch:
            return path
    return None
