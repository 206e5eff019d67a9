"""``kmsfs reencrypt``'s rewrite of one file under the new key, atomically.

Each file below the current epoch gets a fresh version 2 header at the Domain's current epoch
(a new random file id, so a new key, and every block re-encrypted):

1. decrypt with the old key and encrypt with the new one into
   ``kmsfs.tmp.reencrypt-<random>-<old inode number>`` in the file's own ciphertext directory
   (a reserved name: a mount hides it, fsck calls it a leftover), with the file's mode, owner,
   atime/mtime and every xattr copied (user xattrs are keyed with epoch 1 for the volume's life,
   so their stored bytes are copied as they are);
2. fsync it; for a hard-linked file, link it under a second temporary name (the same suffix)
   next to every other ciphertext path of the inode;
3. rename each temporary name over its path, then fsync each directory and put back the
   directory's own atime/mtime.

Every directory's times are saved before it first changes (:mod:`kmsfs.fs.reencrypt_resume`),
so a crash between these steps is finished by the next run.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from kmsfs.atomicfile import fsync_dir
from kmsfs.crypto import content
from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs.files import ContentKeys
from kmsfs.fs.longpath import reach
from kmsfs.fs.reencrypt_resume import DirTimes
from kmsfs.fs.reencrypt_walk import TEMP_PREFIX, Inode, open_unread, owner_access

if TYPE_CHECKING:
    from kmsfs.fs.reencrypt import Summary

_BATCH_BLOCKS = 64


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_xattrs(src: int, dst: int) -> None:
    """Every xattr of the ciphertext file, as stored. ``user.*`` ones are kmsfs's (bound to
    their encrypted name only; :mod:`kmsfs.fs.reencrypt_values` seals old ones again after):
    copying them fails loudly; others (security.*, set by the host) are copied where the host
    lets us."""
    for name in os.listxattr(src):
        try:
            os.setxattr(dst, name, os.getxattr(src, name))
        except OSError:
            if name.startswith("user."):
                raise


#: Signals a rename loop holds back (:func:`signals_deferred`): those that end the job.
DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP that arrive in the block take effect right after it, each
    as it would have, in the order they came: the renames that put a file's hard links on its
    new inode are not cut in the middle by Ctrl-C or ``systemctl stop`` (a kill -9 still can:
    the next run finishes them). A signal that comes a second time is not held again (the
    user insists: a directory fsync that hangs must not make the job unstoppable), and one
    the process ignores stays ignored. Only the main thread can; elsewhere the block runs as
    it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}

    def put_back() -> None:
        for sig, handler in previous.items():
            # None: a handler not set from Python, which cannot be put back; the default is
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        previous.clear()

    def hold(signum: int, _frame: Any) -> None:
        if signum in caught:  # a second time: taken now, once, and not again after the block
            caught.remove(signum)
            put_back()
            signal.raise_signal(signum)
            return
        caught.append(signum)

    for sig in DEFERRED_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            previous[sig] = signal.signal(sig, hold)
    try:
        yield
    finally:
        put_back()
        for sig in caught:  # the first whose handler raises ends this
            signal.raise_signal(sig)


def rename_over(pairs: list[tuple[bytes, bytes]], temps: list[bytes], dirs: Iterable[bytes],
                after: Callable[[bytes], None] = lambda d: None) -> None:
    """Rename each temporary name over its path (*pairs*: the links of one new inode), the
    directories fsync'd before (every new name durable before any path is replaced) and after
    (then *after(d)*). A Ctrl-C waits for the last rename (a split link otherwise). Each name
    renamed leaves *temps*: fewer *temps* than *pairs* tells :func:`abandon` that the
    renames had begun, so that the names left must stay for the next run's rejoin."""
    for d in dirs:
        fsync_dir(reach(d))
    with signals_deferred():  # milliseconds
        for temp, path in pairs:
            os.rename(reach(temp), reach(path))
            temps.remove(temp)
        for d in dirs:
            fsync_dir(reach(d))
            after(d)


def abandon(temps: list[bytes], pairs: list[tuple[bytes, bytes]]) -> bool:
    """After an error making a new inode's links (*temps*, meant for *pairs*): True if the
    renames had begun, and then the names left stay: once a path has the new inode, they are
    what joins the other paths to it (the next run's rejoin renames them; removed, the hard
    link stayed split for good, fsck calling it clean: found by review). Else every temporary
    name is removed, and False."""
    if len(temps) < len(pairs):
        return True
    for temp in temps:
        with contextlib.suppress(OSError):
            os.unlink(reach(temp))
    return False


def renames_cut_short(exc: OSError, temps: list[bytes], pairs: list[tuple[bytes, bytes]],
                      what: str) -> FormatError:
    """The one-line failure of an inode whose renames an OSError cut short (:func:`abandon`)."""
    return FormatError(
        f"{exc.strerror or exc} while renaming its hard links onto the new {what}: "
        f"{len(temps)} of {len(pairs)} still to do, which the next 'kmsfs reencrypt' does"
    )


class Rewriter:
    """Rewrites files at epoch *current* with *keys*, one at a time, keeping the directories'
    own times (*times*); adds the ciphertext bytes it writes to ``summary.bytes`` and tells
    *advance* the bytes it reads."""

    def __init__(self, keys: ContentKeys, current: int, times: DirTimes, summary: Summary,
                 advance: Callable[[int], None]) -> None:
        self.keys = keys
        self.current = current
        self.times = times
        self.summary = summary
        self.advance = advance

    def rewrite(self, node: Inode, old: content.FileHeader) -> None:
        """Rewrite one file (all its hard links). A user other than root gets the access it
        needs to its own read-only directories and write-only files for the time of the
        rewrite (:func:`~kmsfs.fs.reencrypt_walk.owner_access`)."""
        with contextlib.ExitStack() as opened:
            for d in sorted({os.path.dirname(p) for p in node.paths}):
                opened.enter_context(owner_access(d, stat.S_IWUSR | stat.S_IXUSR))
            self._rewrite(node, old)

    def _rewrite(self, node: Inode, old: content.FileHeader) -> None:
        src_path = node.paths[0]
        # no following, no blocking on a FIFO put there since the scan, no atime moved
        with owner_access(src_path, stat.S_IRUSR):
            src = open_unread(reach(src_path))
        temps: list[bytes] = []
        pairs: list[tuple[bytes, bytes]] = []
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
                raise IntegrityError(f"keyed with mk epoch {old.epoch}: {exc}") from None
            new = content.FileHeader.new(self.current)
            new_cipher = self.keys.cipher(new)
            suffix = f"-{st.st_ino}"  # what a run after a crash matches it with (reencrypt_resume)
            temp = os.path.dirname(src_path) + b"/" + os.fsencode(
                TEMP_PREFIX + secrets.token_hex(8) + suffix)
            self.times.touching(os.path.dirname(temp))
            made.add(os.path.dirname(temp))
            dst = os.open(reach(temp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                          | os.O_CLOEXEC, 0o600)
            temps.append(temp)
            try:
                self._copy_blocks(src, dst, old_cipher, new_cipher, new, st.st_size)
                with owner_access(src_path, stat.S_IRUSR):  # a write-only file's too
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
            pairs.append((temp, src_path))
            for other in node.paths[1:]:
                link = os.path.dirname(other) + b"/" + os.fsencode(
                    TEMP_PREFIX + secrets.token_hex(8) + suffix)
                self.times.touching(os.path.dirname(link))
                made.add(os.path.dirname(link))
                os.link(reach(temp), reach(link), follow_symlinks=False)
                temps.append(link)
                pairs.append((link, other))
            rename_over(pairs, temps, {os.path.dirname(p) for p in node.paths},
                        self.times.restore_dir_times)
        except BaseException as exc:
            renamed = abandon(temps, pairs)  # (an OSError in the renames, or a signal before)
            for d in made:
                self.times.restore_dir_times(d)
            if renamed and isinstance(exc, OSError):
                raise renames_cut_short(exc, temps, pairs, "file") from exc
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
