"""``kmsfs reencrypt``: rewrite every file keyed with an older ``mk`` epoch at the current one.

After ``kmsfs-admin domain rotate``, new files get the new epoch, but a file written earlier is
still keyed with the old epoch, which an HSM removed before the rotation can still compute. This
offline job rewrites each such file with a fresh version 2 header at the Domain's current epoch
(a new random file id, so a new key, and every block re-encrypted), one file at a time, each
atomically (docs/format.md, "Key epochs").

First, as a mount does once it serves, it keeps the generation it keys files with in the
volume's ``kmsfs.conf`` and in this machine's record (:func:`kms.keep_newest_copy`,
:func:`kms.remember_in_use`), so that a store writer who then hides that generation cannot
bring the older one back for new files; if either cannot be written it refuses, before it
rewrites anything. Then, for each file:

1. decrypt with the old key and encrypt with the new one into
   ``kmsfs.tmp.reencrypt-<random>-<old inode number>`` in the file's own ciphertext directory
   (a reserved name: a mount hides it, fsck calls it a leftover), with the file's mode, owner,
   atime/mtime and every xattr copied (user xattrs are keyed with epoch 1 for the volume's life,
   so their stored bytes are copied as they are);
2. fsync it; for a hard-linked file, link it under a second temporary name (the same suffix)
   next to every other ciphertext path of the inode;
3. rename each temporary name over its path, then fsync each directory and put back the
   directory's own atime/mtime.

Before the first change to a directory's entries, its atime/mtime and a fingerprint of its
plaintext entries are saved, durably, in a ``trusted.kmsfs.reencrypt-times`` xattr on the
directory itself (which changes only its ctime; the mount shows ``user.*`` xattrs only); the run
puts the times back and removes the xattr at its end. Files and directories are read with
O_NOATIME where the kernel allows it, so a run moves no plaintext atime.

A crash (kill -9) leaves every path readable: each is either the old file or the new one, with
the same plaintext. The next run finishes what the killed one left: a hard-linked file whose
renames it cut short (some paths on the new inode, some still on the old one, which the suffix
names) gets its remaining renames, if the old inode is unchanged (same size, mtime, mode and
owner, still at the older epoch); every other temporary name is removed; a directory whose
saved entries still match gets its saved times back. Files already at the current epoch are
skipped: the job is resumable and idempotent. Left as they are: a link whose old inode changed
in between (a mount wrote to it) stays split in two files of equal content, and, unless the job
runs as root (``trusted.*`` xattrs) on a file system with xattrs, the times of the directories
the killed run changed stay moved.

It refuses a volume that is mounted (a mount holds an exclusive flock on the ciphertext root
while it serves: :func:`kmsfs.fs.volume.lock_for_mount`), and holds the volume exclusively while
it runs (:func:`kmsfs.fs.volume.lock_exclusive`), so a mount refuses to start meanwhile.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.atomicfile import fsync_dir
from kmsfs.crypto import content
from kmsfs.crypto.names import is_internal
from kmsfs.errors import FormatError, IntegrityError, KmsfsError, UsageError
from kmsfs.fs import config as volconfig
from kmsfs.fs import journal, kms
from kmsfs.fs.files import ContentKeys
from kmsfs.fs.longpath import reach
from kmsfs.fs.posix import open_regular
from kmsfs.fs.progress import Progress
from kmsfs.fs.volume import check_root_only, lock_exclusive
from kmsfs.keys import KeyDeriver

TEMP_PREFIX = "kmsfs.tmp.reencrypt-"
"""Temporary names of this job: reserved (``kmsfs.``), so never a plaintext name. Followed by
16 hex digits, ``-`` and the inode number of the file being replaced."""
TIMES_XATTR = "trusted.kmsfs.reencrypt-times"
"""On a directory whose entries a run is changing: ``<atime_ns> <mtime_ns> <fingerprint>``
(ASCII), its times from before and a hash of its plaintext entry names (module docstring)."""
_BATCH_BLOCKS = 64


def open_unread(path: bytes | str) -> int:
    """:func:`~kmsfs.fs.posix.open_regular` for reading, with O_NOATIME where the kernel allows
    it (the file's owner, or root): checking or re-keying a file is not reading it, and the
    plaintext atime is the ciphertext file's. *path* as for open_regular."""
    try:
        return open_regular(path, os.O_RDONLY | os.O_NOATIME)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
    return open_regular(path)


def open_dir_unread(path: bytes | str) -> int:
    """A directory fd to list (:func:`os.listdir`, :func:`os.scandir`) with O_NOATIME where
    the kernel allows it, so listing it leaves its atime alone (see :func:`open_unread`)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
    return os.open(path, flags)


def list_unread(path: bytes | str) -> list[bytes]:
    """The names in a directory, as bytes, without moving its atime."""
    fd = open_dir_unread(path)
    try:
        return [os.fsencode(name) for name in os.listdir(fd)]
    finally:
        os.close(fd)


def _read_header(path: bytes) -> bytes:
    """The first HEADER_SIZE bytes of a ciphertext file (fewer if it is shorter); OSError,
    without the path, for anything but a regular file (a FIFO put there never blocks)."""
    try:
        fd = open_unread(reach(path))
    except OSError as exc:  # the caller names the file, in its own terms
        raise type(exc)(exc.errno, exc.strerror) from None
    try:
        return os.pread(fd, content.HEADER_SIZE, 0)
    finally:
        os.close(fd)


def _epoch_of(path: bytes) -> int | None:
    """The key epoch in a ciphertext file's header, None if it has none that parses."""
    try:
        return content.FileHeader.parse(_read_header(path)).epoch
    except (OSError, FormatError):
        return None


@dataclass
class Failure:
    cipher_path: str
    detail: str


@dataclass
class Summary:
    """What a run did. Counts are per inode (a hard-linked file counts once)."""

    current_epoch: int
    upgraded: bool = False
    flags_added: list[str] = field(default_factory=list)
    rewritten: int = 0
    skipped: int = 0
    """Non-empty files already at (or above) the current epoch."""
    empty: int = 0
    """Empty files: no header, nothing to re-key (their first write gets the current epoch)."""
    extra_links: int = 0
    """Further ciphertext paths of rewritten hard-linked files, linked to the new inode."""
    temp_removed: int = 0
    """Temporary files of an interrupted run, removed first."""
    links_rejoined: int = 0
    """Paths of a hard-linked file an interrupted run had left on the old inode, renamed to the
    new one (the renames it did not get to)."""
    bytes: int = 0
    """Ciphertext bytes written."""
    epochs_before: dict[int, int] = field(default_factory=dict)
    epochs_after: dict[int, int] = field(default_factory=dict)
    failed: list[Failure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "current_epoch": self.current_epoch,
            "upgraded": self.upgraded,
            "flags_added": list(self.flags_added),
            "rewritten": self.rewritten,
            "skipped": self.skipped,
            "empty": self.empty,
            "extra_links": self.extra_links,
            "temp_removed": self.temp_removed,
            "links_rejoined": self.links_rejoined,
            "bytes": self.bytes,
            "epochs_before": {str(k): v for k, v in sorted(self.epochs_before.items())},
            "epochs_after": {str(k): v for k, v in sorted(self.epochs_after.items())},
            "failed": [{"cipher_path": f.cipher_path, "detail": f.detail} for f in self.failed],
        }


@dataclass
class _Inode:
    paths: list[bytes]
    st: os.stat_result
    header: content.FileHeader | None = None


@dataclass
class _Tree:
    files: list[bytes]
    """Regular files."""
    temps: list[bytes]
    """Temporary files of an interrupted run."""
    dirs: dict[bytes, os.stat_result]
    prints: dict[bytes, str]
    """Directory -> fingerprint of its plaintext entry names (a hash of them, sorted)."""


def _walk(root: bytes) -> _Tree:
    """Every regular file, leftover temporary file and directory of the tree.

    Skips every reserved name (``kmsfs.diriv``, sidecars, ``kmsfs.conf``, ``kmsfs.longlinks/``)
    but long-name entries, which are ordinary entries under a hashed name.
    """
    tree = _Tree([], [], {}, {})
    stack = [root]
    while stack:
        cdir = stack.pop()
        tree.dirs[cdir] = os.lstat(reach(cdir))
        shown: list[bytes] = []
        for name in sorted(list_unread(reach(cdir))):
            path = cdir + b"/" + name
            text = os.fsdecode(name)
            if text.startswith(TEMP_PREFIX):
                tree.temps.append(path)
                continue
            if is_internal(text):
                continue
            shown.append(name)
            st = os.lstat(reach(path))
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif stat.S_ISREG(st.st_mode):
                tree.files.append(path)
        tree.prints[cdir] = hashlib.sha256(b"\0".join(shown)).hexdigest()[:32]
    return tree


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_xattrs(src: int, dst: int) -> None:
    """Every xattr of the ciphertext file, as stored. ``user.*`` ones are kmsfs's (encrypted
    with an epoch-1 key, bound to their encrypted name only): copying them fails loudly; others
    (security.*, set by the host) are copied where the host lets us."""
    for name in os.listxattr(src):
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError:
            if name.startswith("user."):
                raise


class _Job:
    def __init__(self, root: Path, deriver: KeyDeriver,
                 advance: Callable[[int], None] | None) -> None:
        self.root = os.fsencode(os.path.abspath(root))
        self.deriver = deriver
        self.current = int(deriver.current_epoch)
        self.keys = ContentKeys(deriver, key_epochs=True)
        self.advance = advance or (lambda n: None)
        self.summary = Summary(self.current)
        self.dir_times: dict[bytes, tuple[int, int]] = {}
        """Directory -> (atime_ns, mtime_ns) to put back: as found, or as a killed run saved."""
        self.prints: dict[bytes, str] = {}
        self.marked: set[bytes] = set()
        """Directories whose TIMES_XATTR holds their saved times: put back and dropped last."""
        self.can_mark = True

    def rel(self, path: bytes) -> str:
        return os.fsdecode(os.path.relpath(path, self.root))

    def fail(self, path: bytes, detail: str) -> None:
        self.summary.failed.append(Failure(self.rel(path), detail))

    # pass 1: find inodes and their epochs

    def scan(self) -> list[_Inode]:
        journal.replay(self.root, self.keys.cipher)  # blocks a killed daemon tore, put back
        tree = _walk(self.root)
        self.prints = tree.prints
        self.dir_times = {d: (st.st_atime_ns, st.st_mtime_ns) for d, st in tree.dirs.items()}
        for d in tree.dirs:
            self._saved_times(d)
        temps = self._rejoin(tree.temps, tree.files) if tree.temps else []
        for temp in temps:
            self._touching(os.path.dirname(temp))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(reach(temp))
            self.summary.temp_removed += 1
        touched = {os.path.dirname(t) for t in tree.temps}
        for d in touched:
            fsync_dir(reach(d))
            self._restore_dir_times(d)
        inodes: dict[tuple[int, int], _Inode] = {}
        order: list[_Inode] = []
        for path in tree.files:
            st = os.lstat(reach(path))
            key = (st.st_dev, st.st_ino)
            if key in inodes:
                inodes[key].paths.append(path)
                continue
            node = _Inode([path], st)
            inodes[key] = node
            order.append(node)
        epochs = self.summary.epochs_before
        for node in order:
            if node.st.st_size == 0:
                self.summary.empty += 1
                continue
            try:  # no following, no blocking on a FIFO put there since the walk
                node.header = content.FileHeader.parse(_read_header(node.paths[0]))
            except (OSError, FormatError) as exc:
                self.fail(node.paths[0], f"unreadable header: {exc}")
                continue
            epochs[node.header.epoch] = epochs.get(node.header.epoch, 0) + 1
        self.summary.epochs_after = dict(epochs)
        return order

    # what a killed run left

    def _saved_times(self, d: bytes) -> None:
        """Take the times a killed run saved on *d* as the ones to put back, if its entries
        are still those it saw; a marker they no longer match (a mount changed the directory
        since, so its times are the mount's) is dropped."""
        try:
            raw = os.getxattr(reach(d), TIMES_XATTR, follow_symlinks=False)
        except OSError:
            return  # none (ENODATA); or no xattrs here, or not root (trusted.* is not seen)
        fields = raw.split(b" ")
        if len(fields) == 3 and fields[0].isdigit() and fields[1].isdigit() and (
            fields[2].decode("ascii", "replace") == self.prints[d]
        ):
            self.dir_times[d] = (int(fields[0]), int(fields[1]))
            self.marked.add(d)
        else:
            with contextlib.suppress(OSError):
                os.removexattr(reach(d), TIMES_XATTR, follow_symlinks=False)

    def _rejoin(self, temps: list[bytes], files: list[bytes]) -> list[bytes]:
        """Finish the renames of each hard-linked file a killed run left half done; returns
        the temporary names left to remove."""
        stats = {path: os.lstat(reach(path)) for path in files}
        by_inode: dict[tuple[int, int], list[bytes]] = {}
        for path, st in stats.items():
            by_inode.setdefault((st.st_dev, st.st_ino), []).append(path)
        left: list[bytes] = []
        done: set[bytes] = set()
        for temp in temps:
            target = self._pending(temp, stats, by_inode, done)
            if target is None:
                left.append(temp)
                continue
            self._touching(os.path.dirname(temp))
            os.rename(reach(temp), reach(target))
            done.add(target)
            self.summary.links_rejoined += 1
        return left

    def _pending(self, temp: bytes, stats: dict[bytes, os.stat_result],
                 by_inode: dict[tuple[int, int], list[bytes]], done: set[bytes]) -> bytes | None:
        """The path *temp* was to be renamed over, if a killed run had begun the renames of
        its file and that path still holds the old inode, unchanged; else None."""
        _, dash, number = os.fsdecode(os.path.basename(temp))[len(TEMP_PREFIX):].partition("-")
        if not dash or not number.isdigit():
            return None  # not linked yet, or named by an older kmsfs
        try:
            new = os.lstat(reach(temp))
        except OSError:
            return None
        if not stat.S_ISREG(new.st_mode) or not by_inode.get((new.st_dev, new.st_ino)):
            return None  # no path has the new inode yet: the renames had not begun
        where = os.path.dirname(temp)
        for path in by_inode.get((new.st_dev, int(number)), []):
            old = stats[path]
            if path in done or os.path.dirname(path) != where:
                continue
            if (old.st_mode, old.st_uid, old.st_gid, old.st_size, old.st_mtime_ns) != (
                new.st_mode, new.st_uid, new.st_gid, new.st_size, new.st_mtime_ns
            ):
                continue  # changed since (a mount wrote to it): the link stays split
            old_epoch, new_epoch = _epoch_of(path), _epoch_of(temp)
            if old_epoch is not None and new_epoch is not None and old_epoch < new_epoch:
                return path
        return None

    # directory times

    def _touching(self, d: bytes) -> None:
        """Save *d*'s times durably (TIMES_XATTR) before this run first changes its entries,
        so that a run after a crash puts them back. Only root may write ``trusted.*``; without
        it (or without xattrs) a crash can leave the times moved."""
        if d in self.marked or not self.can_mark:
            return
        atime, mtime = self.dir_times[d]
        value = f"{atime} {mtime} {self.prints[d]}".encode("ascii")
        try:
            os.setxattr(reach(d), TIMES_XATTR, value, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            self.can_mark = False
            return
        fsync_dir(reach(d))
        self.marked.add(d)

    def _restore_dir_times(self, d: bytes) -> None:
        times = self.dir_times.get(d)
        if times is not None:
            with contextlib.suppress(OSError):
                os.utime(reach(d), ns=times, follow_symlinks=False)

    def finish(self) -> None:
        """Put back the times of every directory this run (or a killed one) changed, then drop
        the saved copy: last, so a crash before it leaves the copy for the next run."""
        for d in sorted(self.marked):
            self._restore_dir_times(d)
            with contextlib.suppress(OSError):
                os.removexattr(reach(d), TIMES_XATTR, follow_symlinks=False)
                fsync_dir(reach(d))
        self.marked.clear()

    # pass 2: rewrite

    def run(self, nodes: list[_Inode]) -> None:
        for node in nodes:
            header = node.header
            if header is None:
                continue
            if header.epoch >= self.current:
                self.summary.skipped += 1
                continue
            try:
                self.rewrite(node, header)
            except (IntegrityError, FormatError) as exc:
                self.fail(node.paths[0], str(exc))
                continue
            except OSError as exc:
                self.fail(node.paths[0], f"{exc.strerror or exc}")
                continue
            after = self.summary.epochs_after
            after[header.epoch] -= 1
            if not after[header.epoch]:
                del after[header.epoch]
            after[self.current] = after.get(self.current, 0) + 1
            self.summary.rewritten += 1
            self.summary.extra_links += len(node.paths) - 1

    def rewrite(self, node: _Inode, old: content.FileHeader) -> None:
        src_path = node.paths[0]
        # no following, no blocking on a FIFO put there since the scan, no atime moved
        src = open_unread(reach(src_path))
        temps: list[bytes] = []
        made: set[bytes] = set()
        try:
            st = os.fstat(src)
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != (
                node.st.st_dev, node.st.st_ino, node.st.st_size, node.st.st_mtime_ns
            ):
                raise FormatError("changed while the job ran (is the volume in use?)")
            content.plain_size(st.st_size)  # a torn file: leave it to fsck
            try:
                old_cipher = self.keys.cipher(old)
            except IntegrityError as exc:
                raise IntegrityError(
                    f"keyed with mk epoch {old.epoch}, which the Domain does not have ({exc})"
                ) from None
            new = content.FileHeader.new(self.current)
            new_cipher = self.keys.cipher(new)
            suffix = f"-{st.st_ino}"  # what a run after a crash matches it with (_pending)
            temp = os.path.dirname(src_path) + b"/" + os.fsencode(
                TEMP_PREFIX + secrets.token_hex(8) + suffix)
            self._touching(os.path.dirname(temp))
            made.add(os.path.dirname(temp))
            dst = os.open(reach(temp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
            temps.append(temp)
            try:
                self._copy_blocks(src, dst, old_cipher, new_cipher, new, st.st_size)
                _copy_xattrs(src, dst)
                mine = os.fstat(dst)
                if (mine.st_uid, mine.st_gid) != (st.st_uid, st.st_gid):
                    try:
                        os.fchown(dst, st.st_uid, st.st_gid)
                    except PermissionError:
                        raise FormatError(
                            f"cannot keep owner {st.st_uid}:{st.st_gid} "
                            "(run as root or as the owner)"
                        ) from None
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                # the times seen before this job read the file (reading moves atime)
                os.utime(dst, ns=(node.st.st_atime_ns, node.st.st_mtime_ns))
                os.fsync(dst)
            finally:
                os.close(dst)
            pairs = [(temp, src_path)]
            for other in node.paths[1:]:
                link = os.path.dirname(other) + b"/" + os.fsencode(
                    TEMP_PREFIX + secrets.token_hex(8) + suffix)
                self._touching(os.path.dirname(link))
                made.add(os.path.dirname(link))
                os.link(reach(temp), reach(link), follow_symlinks=False)
                temps.append(link)
                pairs.append((link, other))
            dirs = {os.path.dirname(p) for p in node.paths}
            for d in dirs:
                fsync_dir(reach(d))  # every new name is durable before any path is replaced
            for t, p in pairs:
                os.rename(reach(t), reach(p))
                temps.remove(t)
            for d in dirs:
                fsync_dir(reach(d))
                self._restore_dir_times(d)
        except BaseException:
            for t in temps:
                with contextlib.suppress(OSError):
                    os.unlink(reach(t))
            for d in made:
                self._restore_dir_times(d)
            raise
        finally:
            os.close(src)

    def _copy_blocks(self, src: int, dst: int, old_cipher: content.ContentCipher,
                     new_cipher: content.ContentCipher, new: content.FileHeader,
                     size: int) -> None:
        _write_all(dst, new.pack())
        self.summary.bytes += content.HEADER_SIZE
        offset, block = content.HEADER_SIZE, 0
        step = content.CIPHER_BLOCK_SIZE * _BATCH_BLOCKS
        while offset < size:
            raw = os.pread(src, min(step, size - offset), offset)
            if not raw:
                raise FormatError(f"short read at offset {offset}")
            try:
                plain = old_cipher.decrypt_blocks(block, raw)
            except IntegrityError:
                plain = self._which_block(old_cipher, block, raw)
            out = new_cipher.encrypt_blocks(block, plain)
            _write_all(dst, out)
            self.summary.bytes += len(out)
            self.advance(len(raw))
            offset += len(raw)
            block += -(-len(raw) // content.CIPHER_BLOCK_SIZE)

    @staticmethod
    def _which_block(cipher: content.ContentCipher, first: int, raw: bytes) -> bytearray:
        """Name the block that fails (raises), so the failure says where the damage is."""
        cbs = content.CIPHER_BLOCK_SIZE
        for i in range(-(-len(raw) // cbs)):
            try:
                cipher.decrypt_block(first + i, raw[i * cbs : (i + 1) * cbs])
            except IntegrityError:
                n = first + i
                raise IntegrityError(
                    f"block {n} (plaintext offset {n * content.BLOCK_SIZE}) fails "
                    "authentication: not rewritten (see kmsfs fsck)"
                ) from None
        raise IntegrityError(f"blocks from {first} fail authentication")  # not reached



#: Flags a volume made before them can take as it is: they change what is written from then
#: on, and nothing already on disk needs them.
UPGRADE_FLAGS = (volconfig.FLAG_KEY_EPOCHS, volconfig.FLAG_LONG_XATTR_NAMES)


def upgrade_config(cipherdir: Path) -> list[str]:
    """Add the missing UPGRADE_FLAGS to the volume config (written atomically); the ones added."""
    config = volconfig.load(Path(cipherdir))
    added = [flag for flag in UPGRADE_FLAGS if not config.has(flag)]
    if added:
        from dataclasses import replace

        volconfig.save(Path(cipherdir), replace(
            config, feature_flags=(*config.feature_flags, *added)))
    return added


def _no_flag(cipherdir: Path) -> UsageError:
    return UsageError(
        f"{cipherdir}: volume has no KeyEpochs flag (it writes epoch 1 only): run "
        "'kmsfs reencrypt --upgrade' to add it (kmsfs older than the flag will then refuse "
        "to mount the volume)"
    )


def reencrypt_tree(
    cipherdir: Path,
    deriver: KeyDeriver,
    *,
    upgrade: bool = False,
    advance: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
) -> Summary:
    """Re-key every file below the deriver's current epoch (module docstring).

    UsageError (one line) if the volume is mounted, or lacks the KeyEpochs flag and ``upgrade``
    is False; a one-line KmsfsError, before anything is rewritten, if the generation in use
    cannot be recorded (:func:`_record_in_use`). ``total`` is told the ciphertext bytes to
    rewrite once they are known.
    """
    cipherdir = Path(cipherdir)
    if not cipherdir.is_dir():
        raise UsageError(f"{cipherdir}: no such directory")
    check_root_only(cipherdir)
    lock = lock_exclusive(cipherdir)
    try:
        config = volconfig.load(cipherdir)
        if not upgrade and not config.has(volconfig.FLAG_KEY_EPOCHS):
            raise _no_flag(cipherdir)
        root = os.lstat(cipherdir)  # rewriting kmsfs.conf moves the (plaintext) root's times
        try:
            _record_in_use(cipherdir, deriver)
            added = upgrade_config(cipherdir) if upgrade else []
        finally:
            now = os.lstat(cipherdir)
            if (now.st_atime_ns, now.st_mtime_ns) != (root.st_atime_ns, root.st_mtime_ns):
                with contextlib.suppress(OSError):
                    os.utime(cipherdir, ns=(root.st_atime_ns, root.st_mtime_ns))
        job = _Job(cipherdir, deriver, advance)
        job.summary.upgraded = bool(added)
        job.summary.flags_added = added
        try:
            nodes = job.scan()
            if total is not None:
                total(sum(n.st.st_size for n in nodes
                          if n.header is not None and n.header.epoch < job.current))
            job.run(nodes)
        finally:
            job.finish()
        return job.summary
    finally:
        os.close(lock)


def _record_in_use(cipherdir: Path, deriver: KeyDeriver) -> None:
    """Record the Domain generation *deriver* serves, as a mount does once it serves: in the
    volume's ``kmsfs.conf`` (:func:`kms.keep_newest_copy`) and in this machine's record
    (:func:`kms.remember_in_use`). Files re-keyed at its epoch must not be left to a store
    writer who then hides it: a mount would fall back to the older generation, fail to read
    them, and write new files at the old epoch again. Called with the volume locked; an
    agent's deriver (and the tests' software one) records nothing. A record that cannot be
    written is a one-line error: the job has rewritten nothing yet."""
    records = (
        (f"the Domain generation in use in {cipherdir / volconfig.CONFIG_NAME}",
         lambda: kms.keep_newest_copy(cipherdir, deriver)),
        ("the Domain generation this machine uses", lambda: kms.remember_in_use(deriver)),
    )
    for what, record in records:
        try:
            record()
        except (OSError, KmsfsError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            kind = type(exc) if isinstance(exc, KmsfsError) else KmsfsError
            raise kind(f"{cipherdir}: cannot record {what}: {why}; nothing re-encrypted") from None


def reencrypt(
    store: Path, cipherdir: Path, agent: kms.AgentOptions | None = None, upgrade: bool = False
) -> Summary:
    """Open the volume's Domain as ``mount`` does (verified against the store), then re-key."""
    cipherdir = Path(cipherdir)
    if not cipherdir.is_dir():
        raise UsageError(f"{cipherdir}: no such directory")
    check_root_only(cipherdir)
    os.close(lock_exclusive(cipherdir))  # refuse a mounted volume before opening an HSM
    config = volconfig.load(cipherdir)
    if not upgrade and not config.has(volconfig.FLAG_KEY_EPOCHS):
        raise _no_flag(cipherdir)
    kms.check_bundle(
        store, config.domain_bundle, str(cipherdir), want_id=config.domain_id, agent=agent
    )
    holder: list[Progress] = []

    def total(n: int) -> None:
        holder.append(Progress("kmsfs: reencrypt", n))

    def advance(n: int) -> None:
        if holder:
            holder[0].advance(n)

    with kms.open_deriver(store, config.domain_bundle, agent) as deriver:
        kms.check_in_use(deriver)  # it rewrites data: never to a generation rolled back
        try:
            return reencrypt_tree(cipherdir, deriver, upgrade=upgrade, advance=advance,
                                  total=total)
        finally:
            if holder:
                holder[0].close()

