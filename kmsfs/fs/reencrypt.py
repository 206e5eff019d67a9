"""``kmsfs reencrypt``: re-key every file, name, symlink and xattr keyed with an older epoch.

After ``kmsfs-admin domain rotate``, new files get the new epoch, but a file written earlier is
still keyed with the old epoch, which an HSM removed before the rotation can still compute. This
offline job rewrites each such file with a fresh version 2 header at the Domain's current epoch
(a new random file id, so a new key, and every block re-encrypted), one file at a time, each
atomically (docs/format.md, "Key epochs").

First, as a mount does once it serves, it keeps the generation it keys files with in the
volume's ``kmsfs.conf`` and in this machine's record (:func:`kms.keep_newest_copy`,
:func:`kms.remember_in_use`), so that a store writer who then hides that generation cannot
bring the older one back for new files; if either cannot be written it refuses, before it
rewrites anything. Then it walks the ciphertext tree, moving no atime
(:mod:`kmsfs.fs.reencrypt_walk`), finishes what a killed run left
(:mod:`kmsfs.fs.reencrypt_resume`), reads every file's key epoch, and rewrites each file below
the current one (:mod:`kmsfs.fs.reencrypt_rewrite`), then seals every symlink target and
xattr value below it again (:mod:`kmsfs.fs.reencrypt_values`); last, it moves the names of every
directory below the current epoch to it (:mod:`kmsfs.fs.reencrypt_names`). What is at the
current epoch already is skipped: the job is resumable and idempotent. This module holds the
entry points, the job's three passes and its :class:`Summary`.

It refuses a volume that is mounted (a mount holds an exclusive flock on the ciphertext root
while it serves: :func:`kmsfs.fs.volume.lock_for_mount`), and holds the volume exclusively while
it runs (:func:`kmsfs.fs.volume.lock_exclusive`), so a mount refuses to start meanwhile.
"""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.atomicfile import fsync_dir
from kmsfs.crypto import content
from kmsfs.crypto.names import VolumeNames
from kmsfs.errors import FormatError, IntegrityError, KmsfsError, UsageError
from kmsfs.fs import config as volconfig
from kmsfs.fs import journal, kms
from kmsfs.fs.epoch_ciphers import links_of_volume, retired_below, xattrs_of_volume
from kmsfs.fs.files import ContentKeys
from kmsfs.fs.longpath import reach
from kmsfs.fs.names import names_of_volume
from kmsfs.fs.plainpath import plain_path
from kmsfs.fs.progress import Progress
from kmsfs.fs.reencrypt_names import NameRekeyer
from kmsfs.fs.reencrypt_resume import DirTimes, rejoin
from kmsfs.fs.reencrypt_rewrite import Rewriter
from kmsfs.fs.reencrypt_values import ValueRekeyer, symlink_epoch
from kmsfs.fs.reencrypt_walk import Inode, owner_access, read_header, walk
from kmsfs.fs.volume import check_root_only, lock_exclusive
from kmsfs.keys import KeyDeriver


@dataclass
class Failure:
    cipher_path: str
    detail: str
    path: str | None = None
    """The plaintext path, None if a name on the way does not decrypt."""


@dataclass
class RetiredMove:
    """A symlink target or xattr value this run sealed again at the current epoch, read at a
    retired one (only ``--upgrade``'s migration reads those): listed, since the holder of that
    epoch's ``mk`` could have forged it."""

    cipher_path: str
    what: str
    """``symlink target`` or ``xattr user.NAME value``."""
    epoch: int
    path: str | None = None
    """The plaintext path, None if a name on the way does not decrypt."""


@dataclass
class Summary:
    """What a run did. Counts are per inode (a hard-linked file counts once)."""

    current_epoch: int
    upgraded: bool = False
    flags_added: list[str] = field(default_factory=list)
    flags_pending: list[str] = field(default_factory=list)
    """Flags ``--upgrade`` has yet to add: SymlinkXattrEpochs, if the pass that moves symlink
    targets and xattr values did not move every one (the next ``--upgrade`` goes on)."""
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
    dirs_rekeyed: int = 0
    """Directories whose names moved to the current epoch (or finished moving)."""
    name_epochs_before: dict[int, int] = field(default_factory=dict)
    """Directories per the epoch their names are keyed with, before and after the run."""
    name_epochs_after: dict[int, int] = field(default_factory=dict)
    retired_dirs: list[str] = field(default_factory=list)
    """Directories whose names moved from a retired epoch (plaintext paths; the ciphertext
    path, after ``(ciphertext) ``, where a name on the way does not decrypt): after a
    retirement, one a run missed or one whose ``kmsfs.diriv`` was rolled back."""
    symlinks_rewritten: int = 0
    """Symlinks (each inode once) whose target was sealed again at the current epoch."""
    symlink_epochs_before: dict[int, int] = field(default_factory=dict)
    """Symlinks (each link) per the epoch their target is sealed with, before and after."""
    symlink_epochs_after: dict[int, int] = field(default_factory=dict)
    blobs_removed: int = 0
    """Long-symlink blobs no symlink names any more, removed: those of the symlinks this run
    replaced, and what a crash left (one no symlink named, or one half written)."""
    xattrs_resealed: int = 0
    """``user.*`` xattr values sealed again at the current epoch."""
    xattr_epochs_before: dict[int, int] = field(default_factory=dict)
    """xattr values per the epoch they are sealed with, before and after the run."""
    xattr_epochs_after: dict[int, int] = field(default_factory=dict)
    retired_values: list[RetiredMove] = field(default_factory=list)
    """Symlink targets and xattr values moved from a retired epoch (the migration only)."""
    failed: list[Failure] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "current_epoch": self.current_epoch,
            "upgraded": self.upgraded,
            "flags_added": list(self.flags_added),
            "flags_pending": list(self.flags_pending),
            "rewritten": self.rewritten,
            "skipped": self.skipped,
            "empty": self.empty,
            "extra_links": self.extra_links,
            "temp_removed": self.temp_removed,
            "links_rejoined": self.links_rejoined,
            "bytes": self.bytes,
            "epochs_before": _by_epoch(self.epochs_before),
            "epochs_after": _by_epoch(self.epochs_after),
            "dirs_rekeyed": self.dirs_rekeyed,
            "name_epochs_before": _by_epoch(self.name_epochs_before),
            "name_epochs_after": _by_epoch(self.name_epochs_after),
            "retired_dirs": list(self.retired_dirs),
            "symlinks_rewritten": self.symlinks_rewritten,
            "symlink_epochs_before": _by_epoch(self.symlink_epochs_before),
            "symlink_epochs_after": _by_epoch(self.symlink_epochs_after),
            "blobs_removed": self.blobs_removed,
            "xattrs_resealed": self.xattrs_resealed,
            "xattr_epochs_before": _by_epoch(self.xattr_epochs_before),
            "xattr_epochs_after": _by_epoch(self.xattr_epochs_after),
            "retired_values": [{"path": m.path, "cipher_path": m.cipher_path, "what": m.what,
                                "epoch": m.epoch} for m in self.retired_values],
            "failed": [{"path": f.path, "cipher_path": f.cipher_path, "detail": f.detail}
                       for f in self.failed],
        }


def _by_epoch(counts: dict[int, int]) -> dict[str, int]:
    return {str(k): v for k, v in sorted(counts.items())}


class _Job:
    def __init__(self, root: Path, deriver: KeyDeriver,
                 advance: Callable[[int], None] | None, read_retired: bool = False) -> None:
        self.root = os.fsencode(os.path.abspath(root))
        self.deriver = deriver
        self.current = int(deriver.current_epoch)
        self.keys = ContentKeys(deriver, key_epochs=True)
        self.advance = advance or (lambda n: None)
        self.summary = Summary(self.current)
        self.times = DirTimes()
        """The directories' own times: put back after each change, and at the end."""
        self.rewriter = Rewriter(self.keys, self.current, self.times, self.summary, self.advance)
        self._names: VolumeNames | None = None
        self.dirs: dict[bytes, os.stat_result] = {}
        """Every directory of the tree, with its lstat, as the walk found them."""
        self.read_retired = read_retired
        """Move symlink targets and xattr values of retired epochs too (``--upgrade`` on a
        volume without SymlinkXattrEpochs: the migration)."""
        self.retired_below = retired_below(deriver)
        self.symlinks: list[Inode] = []
        """Every symlink inode of the tree, with its links, as the walk found them."""

    def rel(self, path: bytes) -> str:
        return os.fsdecode(os.path.relpath(path, self.root))

    def plain(self, path: bytes) -> str | None:
        """The plaintext path of ciphertext *path*, None if a name on the way does not
        decrypt."""
        if path == self.root:
            return "/"
        if self._names is None:  # keys derived at the first report that needs them
            self._names = names_of_volume(self.deriver)
        return plain_path(self.root, os.fsencode(self.rel(path)), self._names)

    def fail(self, path: bytes, detail: str) -> None:
        self.summary.failed.append(Failure(self.rel(path), detail, self.plain(path)))

    def retired_value(self, path: bytes, what: str, epoch: int) -> None:
        self.summary.retired_values.append(
            RetiredMove(self.rel(path), what, epoch, self.plain(path)))

    def retired_dir(self, d: bytes) -> None:
        plain = self.plain(d)
        self.summary.retired_dirs.append(
            plain if plain is not None else f"(ciphertext) {self.rel(d)}")

    def moved(self, d: bytes, renamed: dict[bytes, bytes]) -> None:
        """Entries of directory *d* got their names under a new key (old name -> new name):
        failures reported at or below them name them by the new ones (the ciphertext paths a
        user finds after the run). Once per directory: a pass over the failures each."""
        if not self.summary.failed and not self.summary.retired_values:
            return
        prefix = "" if d == self.root else self.rel(d) + "/"
        names = {os.fsdecode(old): os.fsdecode(new) for old, new in renamed.items()}
        for reported in (*self.summary.failed, *self.summary.retired_values):
            path = reported.cipher_path
            if not path.startswith(prefix):
                continue
            head, slash, rest = path[len(prefix):].partition("/")
            if head in names:
                reported.cipher_path = prefix + names[head] + slash + rest

    # pass 1: find inodes and their epochs

    def scan(self) -> list[Inode]:
        journal.replay(self.root, self.keys.cipher)  # blocks a killed daemon tore, put back
        tree = walk(self.root)
        self.dirs = dict(tree.dirs)
        self.times.found(tree)
        links = links_of_volume(self.deriver, read_retired=True)  # epochs compared, not served
        temps, rejoined = rejoin(
            tree.temps, tree.files + tree.links, self.times,
            lambda path: symlink_epoch(self.root, links, path)) if tree.temps else ([], 0)
        self.summary.links_rejoined += rejoined
        for temp in temps:
            self.times.touching(os.path.dirname(temp))
            with owner_access(os.path.dirname(temp), stat.S_IWUSR | stat.S_IXUSR), \
                    contextlib.suppress(FileNotFoundError):
                os.unlink(reach(temp))
            self.summary.temp_removed += 1
        touched = {os.path.dirname(t) for t in tree.temps}
        for d in touched:
            fsync_dir(reach(d))
            self.times.restore_dir_times(d)
        order = _by_inode(tree.files)
        self.symlinks = _by_inode(tree.links)
        epochs = self.summary.epochs_before
        for node in order:
            if node.st.st_size == 0:
                self.summary.empty += 1
                continue
            try:  # no following, no blocking on a FIFO put there since the walk
                node.header = content.FileHeader.parse(read_header(node.paths[0]))
            except (OSError, FormatError) as exc:
                self.fail(node.paths[0], f"unreadable header: {exc}")
                continue
            epochs[node.header.epoch] = epochs.get(node.header.epoch, 0) + 1
        self.summary.epochs_after = dict(epochs)
        return order

    # pass 2: rewrite

    def run(self, nodes: list[Inode]) -> None:
        for node in nodes:
            header = node.header
            if header is None:
                continue
            if header.epoch >= self.current:
                self.summary.skipped += 1
                continue
            try:
                self.rewriter.rewrite(node, header)
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

    # pass 2, second half: symlink targets and xattr values (by the walk's paths too)

    def rekey_values(self, nodes: list[Inode]) -> None:
        values = ValueRekeyer(self.root, links_of_volume(self.deriver, self.read_retired),
                              xattrs_of_volume(self.deriver, self.read_retired), self.current,
                              self.times, self.summary, self.fail, self.retired_below,
                              self.retired_value)
        for node in nodes:
            values.reseal_xattrs(node.paths[0])
        for d in self.dirs:
            values.reseal_xattrs(d)
        for link in self.symlinks:
            values.rewrite_symlink(link.paths, link.st)
        values.remove_orphan_blobs()

    # pass 3: names (after the files, whose paths are the walk's: it renames entries)

    def rekey_names(self) -> None:
        rekeyer = NameRekeyer(self.root, names_of_volume(self.deriver),
                              self.current, self.times, self.fail, self.moved, self.dirs,
                              self.retired_below, self.retired_dir)
        rekeyer.run(list(self.dirs))
        self.summary.dirs_rekeyed = rekeyer.rekeyed
        self.summary.name_epochs_before = rekeyer.epochs_before
        self.summary.name_epochs_after = rekeyer.epochs_after


def _by_inode(paths: list[bytes]) -> list[Inode]:
    """The inodes of *paths* in the order first met, each with all its paths."""
    inodes: dict[tuple[int, int], Inode] = {}
    order: list[Inode] = []
    for path in paths:
        st = os.lstat(reach(path))
        key = (st.st_dev, st.st_ino)
        if key in inodes:
            inodes[key].paths.append(path)
            continue
        node = inodes[key] = Inode([path], st)
        order.append(node)
    return order


#: Flags a volume made before them can take as it is: they change what is written from then
#: on, and nothing already on disk needs them.
UPGRADE_FLAGS = (volconfig.FLAG_KEY_EPOCHS, volconfig.FLAG_LONG_XATTR_NAMES,
                 volconfig.FLAG_NAME_EPOCHS, volconfig.FLAG_SYMLINK_XATTR_EPOCHS)


def upgrade_config(cipherdir: Path, flags: tuple[str, ...] = UPGRADE_FLAGS) -> list[str]:
    """Add the missing *flags* to the volume config (written atomically); the ones added."""
    config = volconfig.load(Path(cipherdir))
    added = [flag for flag in flags if not config.has(flag)]
    if added:
        from dataclasses import replace

        volconfig.save(Path(cipherdir), replace(
            config, feature_flags=(*config.feature_flags, *added)))
    return added


#: Flags a volume must have before a run (else --upgrade adds them first): KeyEpochs for
#: version 2 headers, NameEpochs for a ``kmsfs.diriv`` after epoch 1.
NEEDED_FLAGS = (volconfig.FLAG_KEY_EPOCHS, volconfig.FLAG_NAME_EPOCHS,
                volconfig.FLAG_SYMLINK_XATTR_EPOCHS)


def _missing_flag(config: volconfig.VolumeConfig) -> str | None:
    return next((flag for flag in NEEDED_FLAGS if not config.has(flag)), None)


def _no_flag(cipherdir: Path, flag: str) -> UsageError:
    return UsageError(
        f"{cipherdir}: volume has no {flag} flag (made before it): run "
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
        if not upgrade and (flag := _missing_flag(config)) is not None:
            raise _no_flag(cipherdir, flag)
        # The migration: a volume made before SymlinkXattrEpochs had every symlink target and
        # xattr value at epoch 1, which its Domain may have retired since, so --upgrade reads
        # values of retired epochs there (and lists what it moves). On a volume that has the
        # flag, one can only be a forgery by the holder of a retired mk (or one a run missed
        # before the retirement, lost for good): refused, as by the mount.
        migrating = upgrade and not config.has(volconfig.FLAG_SYMLINK_XATTR_EPOCHS)
        first = tuple(f for f in UPGRADE_FLAGS if f != volconfig.FLAG_SYMLINK_XATTR_EPOCHS)

        def record_and_upgrade() -> list[str]:
            _record_in_use(cipherdir, deriver)
            return upgrade_config(cipherdir, first) if upgrade else []

        added = _keeping_root_times(cipherdir, record_and_upgrade)
        job = _Job(cipherdir, deriver, advance, read_retired=migrating)
        job.summary.upgraded = bool(added)
        job.summary.flags_added = added
        try:
            nodes = job.scan()
            if total is not None:
                total(sum(n.st.st_size for n in nodes
                          if n.header is not None and n.header.epoch < job.current))
            job.run(nodes)
            failed = len(job.summary.failed)
            job.rekey_values(nodes)
            if migrating:
                _end_migration(cipherdir, job.summary, len(job.summary.failed) > failed)
            job.times.finish()  # by the paths the walk found, before names move them
            job.rekey_names()
        finally:
            job.times.finish()
        return job.summary
    finally:
        os.close(lock)


def _keeping_root_times(cipherdir: Path, write: Callable[[], list[str]]) -> list[str]:
    """Run *write* (which replaces ``kmsfs.conf``), with write access to the root for the time
    of it (its owner may have made it read-only), and put back the root's atime and mtime it
    moved (the plaintext root's)."""
    root = os.lstat(cipherdir)
    try:
        with owner_access(os.fsencode(cipherdir), stat.S_IWUSR | stat.S_IXUSR):
            return write()
    finally:
        now = os.lstat(cipherdir)
        if (now.st_atime_ns, now.st_mtime_ns) != (root.st_atime_ns, root.st_mtime_ns):
            with contextlib.suppress(OSError):
                os.utime(cipherdir, ns=(root.st_atime_ns, root.st_mtime_ns))


def _end_migration(cipherdir: Path, summary: Summary, values_failed: bool) -> None:
    """Add SymlinkXattrEpochs once the pass that moves symlink targets and xattr values has
    moved every one: from then on no run reads a retired epoch's. Not before (a run killed in
    that pass, or one that left some, is taken up by the next ``--upgrade``, which reads them
    again): the flag changes nothing a mount or a run reads (values of epoch 2 and up name
    their epoch in their nonce, with or without it)."""
    flag = volconfig.FLAG_SYMLINK_XATTR_EPOCHS
    if values_failed:
        summary.flags_pending.append(flag)
        return
    added = _keeping_root_times(cipherdir, lambda: upgrade_config(cipherdir, (flag,)))
    summary.flags_added.extend(added)
    summary.upgraded = summary.upgraded or bool(added)


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
    if not upgrade and (flag := _missing_flag(config)) is not None:
        raise _no_flag(cipherdir, flag)
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
        except BaseException as exc:
            # Cut short while it rewrote (Ctrl-C, SIGTERM, an error): the CLI then says to
            # run it again; before this point nothing of the volume was touched.
            exc.kmsfs_rewriting = True  # type: ignore[attr-defined]
            raise
        finally:
            if holder:
                holder[0].close()

