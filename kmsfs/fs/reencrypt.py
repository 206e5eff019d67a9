"""``kmsfs reencrypt``: rewrite every file keyed with an older ``mk`` epoch at the current one.

After ``kmsfs-admin domain rotate``, new files get the new epoch, but a file written earlier is
still keyed with the old epoch, which an HSM removed before the rotation can still compute. This
offline job rewrites each such file with a fresh version 2 header at the Domain's current epoch
(a new random file id, so a new key, and every block re-encrypted), one file at a time, each
atomically (docs/format.md, "Key epochs"):

1. decrypt with the old key and encrypt with the new one into ``kmsfs.tmp.reencrypt-<random>``
   in the file's own ciphertext directory (a reserved name: a mount hides it, fsck calls it a
   leftover), with the file's mode, owner, atime/mtime and every xattr copied (user xattrs are
   keyed with epoch 1 for the volume's life, so their stored bytes are copied as they are);
2. fsync it; for a hard-linked file, link it under a second temporary name next to every other
   ciphertext path of the inode;
3. rename each temporary name over its path, then fsync each directory and put back the
   directory's own atime/mtime.

A crash leaves every path readable (each is either the old file or the new one, with the same
plaintext); for a hard-linked file, at worst some paths hold the new inode and some the old one,
so the link is split in two files of equal content. Temporary names left behind are removed by
the next run, which also skips every file already at the current epoch: the job is resumable and
idempotent. It refuses a volume that is mounted (a mount holds a shared flock on the ciphertext
root; see :func:`kmsfs.fs.volume.lock_exclusive`), and holds the volume exclusively while it
runs, so a mount refuses to start meanwhile.
"""

from __future__ import annotations

import contextlib
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
from kmsfs.errors import FormatError, IntegrityError, UsageError
from kmsfs.fs import config as volconfig
from kmsfs.fs import journal, kms
from kmsfs.fs.files import ContentKeys
from kmsfs.fs.longpath import reach
from kmsfs.fs.posix import read_internal_file
from kmsfs.fs.progress import Progress
from kmsfs.fs.volume import check_root_only, lock_exclusive
from kmsfs.keys import KeyDeriver

TEMP_PREFIX = "kmsfs.tmp.reencrypt-"
"""Temporary names of this job: reserved (``kmsfs.``), so never a plaintext name."""
_BATCH_BLOCKS = 64


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


def _walk(root: bytes) -> tuple[list[bytes], list[bytes], dict[bytes, os.stat_result]]:
    """(regular file paths, leftover temporary files, directory -> its stat) of the tree.

    Skips every reserved name (``kmsfs.diriv``, sidecars, ``kmsfs.conf``, ``kmsfs.longlinks/``)
    but long-name entries, which are ordinary entries under a hashed name.
    """
    files: list[bytes] = []
    temps: list[bytes] = []
    dirs: dict[bytes, os.stat_result] = {}
    stack = [root]
    while stack:
        cdir = stack.pop()
        dirs[cdir] = os.lstat(reach(cdir))
        for name in sorted(os.listdir(reach(cdir))):
            path = cdir + b"/" + name
            text = os.fsdecode(name)
            if text.startswith(TEMP_PREFIX):
                temps.append(path)
                continue
            if is_internal(text):
                continue
            st = os.lstat(reach(path))
            if stat.S_ISDIR(st.st_mode):
                stack.append(path)
            elif stat.S_ISREG(st.st_mode):
                files.append(path)
    return files, temps, dirs


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
        self.dir_times: dict[bytes, os.stat_result] = {}

    def rel(self, path: bytes) -> str:
        return os.fsdecode(os.path.relpath(path, self.root))

    def fail(self, path: bytes, detail: str) -> None:
        self.summary.failed.append(Failure(self.rel(path), detail))

    # pass 1: find inodes and their epochs

    def scan(self) -> list[_Inode]:
        journal.replay(self.root, self.keys.cipher)  # blocks a killed daemon tore, put back
        files, temps, self.dir_times = _walk(self.root)
        for temp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(reach(temp))
            self.summary.temp_removed += 1
        touched = {os.path.dirname(t) for t in temps}
        for d in touched:
            fsync_dir(reach(d))
            self._restore_dir_times(d)
        inodes: dict[tuple[int, int], _Inode] = {}
        order: list[_Inode] = []
        for path in files:
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
                raw = read_internal_file(reach(node.paths[0]), content.HEADER_SIZE)
                node.header = content.FileHeader.parse(raw)
            except (OSError, FormatError) as exc:
                self.fail(node.paths[0], f"unreadable header: {exc}")
                continue
            epochs[node.header.epoch] = epochs.get(node.header.epoch, 0) + 1
        self.summary.epochs_after = dict(epochs)
        return order

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
        src = os.open(reach(src_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        temps: list[bytes] = []
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
            temp = os.path.dirname(src_path) + b"/" + os.fsencode(TEMP_PREFIX +
                                                                secrets.token_hex(8))
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
                link = os.path.dirname(other) + b"/" + os.fsencode(TEMP_PREFIX +
                                                                  secrets.token_hex(8))
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

    def _restore_dir_times(self, d: bytes) -> None:
        st = self.dir_times.get(d)
        if st is not None:
            with contextlib.suppress(OSError):
                os.utime(reach(d), ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


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
    is False. ``total`` is told the ciphertext bytes to rewrite once they are known.
    """
    cipherdir = Path(cipherdir)
    if not cipherdir.is_dir():
        raise UsageError(f"{cipherdir}: no such directory")
    check_root_only(cipherdir)
    lock = lock_exclusive(cipherdir)
    try:
        config = volconfig.load(cipherdir)
        added: list[str] = []
        if upgrade:
            added = upgrade_config(cipherdir)
        elif not config.has(volconfig.FLAG_KEY_EPOCHS):
            raise _no_flag(cipherdir)
        job = _Job(cipherdir, deriver, advance)
        job.summary.upgraded = bool(added)
        job.summary.flags_added = added
        nodes = job.scan()
        if total is not None:
            total(sum(n.st.st_size for n in nodes
                      if n.header is not None and n.header.epoch < job.current))
        job.run(nodes)
        return job.summary
    finally:
        os.close(lock)


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

