"""``kmsfs fsck``: check every byte of a ciphertext directory without mounting it (read-only).

What is checked, per docs/format.md: every directory's ``kmsfs.diriv``; every name (it decrypts
and is the canonical disk name; a long name has its sidecar and the sidecar matches); every
symlink target (long targets: the blob exists and matches); every ``user.*`` xattr of a file or
directory, the root included (its name decrypts, its value opens under it); every regular file's
header, size
(``plain_size`` must accept it) and each block's tag, with the key of the ``mk`` epoch its header
names (a file keyed with an epoch the Domain does not have is damage: no HSM can read it; so is
a directory whose names are keyed with a retired epoch, which only a rollback or a missed
``kmsfs reencrypt`` leaves). The
report counts files per key epoch, so an operator sees what ``kmsfs reencrypt`` has left to do.
Damage is reported by plaintext path, or by ciphertext path where the name itself (or its
directory's IV) is what is damaged, with the block number and plaintext offset. Leftovers that
lose no data (an orphan sidecar or symlink blob, a temporary file, the saved times of a killed
``kmsfs reencrypt``) are warnings, not damage. Files and directories are opened with O_NOATIME
where the kernel allows it (the owner, or root), so a check moves no plaintext atime. It refuses
a mounted volume, and a mount refuses to start while it runs (a shared lock:
:func:`kmsfs.fs.volume.lock_shared`): a file renamed under it between listing and reading
was reported as damage.

The core, :func:`check_tree`, takes a :class:`~kmsfs.keys.KeyDeriver`, so tests can pass the
software stand-in; :func:`fsck` opens the Domain from the volume config as ``mount`` does. Like
the format itself, fsck cannot see blocks dropped at the end of a file, or an older but intact
version of a block or of a whole file.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kmsfs.crypto import content
from kmsfs.crypto.epoch_nonces import EpochUnavailable
from kmsfs.crypto.names import (
    DIRIV_NAME,
    LONGNAME_SUFFIX,
    epoch_of,
    is_internal,
    is_sidecar,
    parse_dir_iv,
)
from kmsfs.crypto.symlinks import LONGLINK_DIR, is_longlink
from kmsfs.crypto.xattrs import USER_PREFIX, ForeignXattrName
from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs import config as volconfig
from kmsfs.fs import kms
from kmsfs.fs.dirpool import POOL_DIR, is_own_dir, is_ready_name, is_whole_at
from kmsfs.fs.epoch_ciphers import links_of_volume, retired_below, xattrs_of_volume
from kmsfs.fs.journal import JOURNAL_NAME, live_records
from kmsfs.fs.longpath import forget, reach
from kmsfs.fs.names import DirIvError, names_of_volume, read_dir_iv
from kmsfs.fs.posix import dir_no_follow, read_internal_file
from kmsfs.fs.progress import Progress
from kmsfs.fs.reencrypt_names import MARKER_NAME, is_rekey_of
from kmsfs.fs.reencrypt_resume import TIMES_XATTR
from kmsfs.fs.reencrypt_walk import REKEY_NAME, list_unread, open_dir_unread, open_unread
from kmsfs.fs.volume import lock_shared
from kmsfs.keys import KeyDeriver

MAX_BLOCK_PROBLEMS = 16
"""Bad blocks listed one by one per file; beyond that one summary line (a file of garbage)."""
_BATCH_BLOCKS = 64
"""Blocks read per read(2): 264 KiB, so large files are read in big sequential reads."""


@dataclass(frozen=True)
class Problem:
    """One finding. ``path`` is the plaintext path, None where it cannot be known."""

    kind: str
    cipher_path: str
    path: str | None
    detail: str
    block: int | None = None
    offset: int | None = None


@dataclass
class Report:
    clean: bool = True
    checked: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("directories", "files", "symlinks", "other", "names", "long_names", "hard_links",
             "blocks", "bytes", "xattrs"), 0)
    )
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    epochs: dict[int, int] = field(default_factory=dict)
    """Non-empty regular files (each inode once) per the ``mk`` epoch their header names."""
    name_epochs: dict[int, int] = field(default_factory=dict)
    """Directories (the root too) per the ``mk`` epoch their names are keyed with."""
    symlink_epochs: dict[int, int] = field(default_factory=dict)
    """Symlinks (each link) per the ``mk`` epoch their target is sealed with."""
    xattr_epochs: dict[int, int] = field(default_factory=dict)
    """``user.*`` xattr values per the ``mk`` epoch they are sealed with (each path of a
    hard-linked file: as ``checked``)."""
    current_epoch: int | None = None
    """The Domain's current epoch (what new data is keyed with), if the deriver tells."""

    def to_json(self) -> dict[str, Any]:
        return {
            "clean": not self.problems,
            "checked": dict(self.checked),
            "current_epoch": self.current_epoch,
            "epochs": {str(k): v for k, v in sorted(self.epochs.items())},
            "name_epochs": {str(k): v for k, v in sorted(self.name_epochs.items())},
            "symlink_epochs": {str(k): v for k, v in sorted(self.symlink_epochs.items())},
            "xattr_epochs": {str(k): v for k, v in sorted(self.xattr_epochs.items())},
            "problems": [asdict(p) for p in self.problems],
            "warnings": [asdict(p) for p in self.warnings],
        }


def _join(parent: str | None, name: bytes | None) -> str | None:
    if parent is None or name is None:
        return None
    return parent.rstrip("/") + "/" + os.fsdecode(name)


class _Checker:
    def __init__(
        self, root: Path, deriver: KeyDeriver, advance: Callable[[int], None] | None
    ) -> None:
        self.root = root
        self.deriver = deriver
        # Each directory's names at its IV's epoch, symlink targets and xattr values at the
        # one their nonce names, xattr names at epoch 1 (docs/format.md, "Key epochs").
        self.names = names_of_volume(deriver)
        self.links = links_of_volume(deriver)
        self.xattr_cipher = xattrs_of_volume(deriver)
        self.advance = advance or (lambda n: None)
        self.report = Report()
        self.seen: set[tuple[int, int]] = set()
        self.blobs: set[str] = set()

    def _rel(self, path: Path) -> str:
        rel = str(path.relative_to(self.root))
        return "/" if rel == "." else rel

    def damage(self, kind: str, path: Path, plain: str | None, detail: str, **kw: Any) -> None:
        self.report.problems.append(Problem(kind, self._rel(path), plain, detail, **kw))

    def warn(self, kind: str, path: Path, plain: str | None, detail: str) -> None:
        self.report.warnings.append(Problem(kind, self._rel(path), plain, detail))

    def journal(self) -> None:
        """Live records: a daemon was killed in the middle of a write (or just after one,
        before it marked the record). The next mount puts back what it tore (or cuts off the
        torn end a write past the end left); until then, a block it names may show as damage.
        A file its owner may not write (mode 0444, as git makes its objects) is repaired only
        by a daemon running as root or as that owner (kmsfs.fs.journal._writable): said so."""
        try:
            live = live_records(os.fsencode(self.root))
        except OSError as exc:
            self.warn("journal", self.root / JOURNAL_NAME, None, f"unreadable: {exc.strerror}")
            return
        if live:
            files = sorted({os.fsdecode(r.path) for r in live})
            locked = [f"{name} (mode {mode:04o}, owner uid {uid})"
                      for name, mode, uid in (_read_only(self.root, f) for f in files) if name]
            needs = ""
            if locked:
                needs = ("; a mount that is not root can repair only files it owns, and "
                         f"{', '.join(locked)} must be repaired by one running as root or as "
                         "that owner")
            self.warn(
                "interrupted-write",
                self.root / JOURNAL_NAME,
                None,
                f"{len(live)} write(s) a killed daemon may have cut short, in {', '.join(files)}: "
                f"mount the volume once to put back the blocks they tore{needs}",
            )

    # directories and names

    def tree(self, top: Path, plain: str) -> None:
        """Check *top* and everything under it, depth first, in name order.

        With a stack rather than recursion: a tree as deep as PATH_MAX allows (2,000 levels
        of one-letter names) would pass Python's recursion limit."""
        stack = [self.directory(top, plain)]
        while stack:
            below = next(stack[-1], None)
            if below is None:
                stack.pop()
            else:
                stack.append(self.directory(*below))

    def directory(self, cdir: Path, plain: str | None) -> Iterator[tuple[Path, str | None]]:
        """Check one directory's names and entries; yields each subdirectory to check next."""
        self.report.checked["directories"] += 1
        try:
            dir_iv: bytes | None = read_dir_iv(os.fsencode(cdir))
        except DirIvError as exc:
            dir_iv = None
            self.damage("diriv", cdir / DIRIV_NAME, plain, f"{exc}: names in it cannot be read")
        if dir_iv is not None:
            epochs = self.report.name_epochs
            epochs[epoch_of(dir_iv)] = epochs.get(epoch_of(dir_iv), 0) + 1
            try:
                self.names.check(dir_iv)  # an epoch the Domain lacks
            except IntegrityError as exc:
                dir_iv = None
                self.damage("epoch", cdir / DIRIV_NAME, plain, f"{exc}: names in it cannot be read")
            else:
                self.retired_names(cdir, plain, dir_iv)
        try:
            entries = sorted(os.fsdecode(n) for n in list_unread(_reach(cdir)))
        except PermissionError as exc:  # as for files: a mode that shuts this user out
            self.warn("unchecked", cdir, plain, f"cannot list: {exc.strerror} (run fsck as root)")
            return
        except OSError as exc:
            self.damage("unreadable", cdir, plain, f"cannot list: {exc.strerror}")
            return
        present = set(entries)
        moving_to = None
        if REKEY_NAME in present and dir_iv is not None:
            moving_to = self.names_moving(cdir, plain, dir_iv)
        elif REKEY_NAME in present:
            self.warn("interrupted-reencrypt", cdir / REKEY_NAME, plain, "a kmsfs reencrypt "
                      "was cut short while moving this directory's names: run it again")
        for name in entries:
            path = cdir / name
            if name in (DIRIV_NAME, REKEY_NAME) or (
                cdir == self.root
                and name in (volconfig.CONFIG_NAME, LONGLINK_DIR, JOURNAL_NAME, POOL_DIR)
            ):
                continue
            if cdir == self.root and name == MARKER_NAME:
                self.warn("interrupted-reencrypt", path, None, "a kmsfs reencrypt was cut "
                          "short while moving names to a new key epoch: run it again (a "
                          "mount refuses the volume until then)")
                continue
            if is_sidecar(name):
                if name[: -len(LONGNAME_SUFFIX)] not in present:
                    self.warn("orphan-sidecar", path, None, "long-name sidecar without its entry")
                continue
            if is_internal(name):
                self.warn("leftover", path, None, "internal name the format does not use here")
                continue
            child = self.name(cdir, name, dir_iv, plain, moving_to)
            yield from self.entry(path, child)

    def retired_names(self, cdir: Path, plain: str | None, dir_iv: bytes) -> None:
        """Damage if *cdir*'s names are keyed with a retired epoch: after the retirement, a
        directory ``kmsfs reencrypt`` missed, or one whose ``kmsfs.diriv`` a writer of the
        ciphertext rolled back (the holder of that epoch's ``mk`` reads its names and can plant
        some). Its names are still read and checked."""
        epoch = epoch_of(dir_iv)
        below = retired_below(self.deriver)
        if epoch < below:
            self.damage("epoch", cdir / DIRIV_NAME, plain, f"names keyed with mk epoch {epoch}, "
                        f"which is retired (epochs below {below}): a directory kmsfs reencrypt "
                        "missed before the retirement, or one rolled back (its kmsfs.diriv); "
                        "the mount makes no new name in it, and kmsfs reencrypt moves its "
                        "names to the current epoch (check them)")

    def names_moving(self, cdir: Path, plain: str | None, dir_iv: bytes) -> bytes | None:
        """The IV a killed ``kmsfs reencrypt`` was moving *cdir*'s names to (some may be
        under its key already), with a warning; None if there is none that a run writes
        (:func:`~kmsfs.fs.reencrypt_names.is_rekey_of`: one that does not parse was written
        whole before any name moved; another directory's IV, or a lower epoch, was planted to
        pass names off under it, which is damage: the names are read under the IV alone)."""
        path = cdir / REKEY_NAME
        try:
            moving_to = parse_dir_iv(read_internal_file(os.fsencode(path), 64))
        except FormatError:
            self.warn("leftover", path, plain, "a kmsfs.diriv.rekey no name has moved to: "
                      "the next kmsfs reencrypt removes it")
            return None
        except OSError as exc:
            self.damage("unreadable", path, plain, f"cannot read: {exc.strerror}")
            return None
        if not is_rekey_of(dir_iv, moving_to):
            self.damage("rekey", path, plain, "not one kmsfs reencrypt writes (another IV, or "
                        "no higher key epoch): names are read under kmsfs.diriv alone, and the "
                        "next kmsfs reencrypt removes it")
            return None
        self.warn("interrupted-reencrypt", path, plain, "a kmsfs reencrypt was cut short "
                  "while moving this directory's names to a new key epoch: run it again")
        try:
            self.names.check(moving_to)
        except IntegrityError as exc:
            self.damage("epoch", path, plain, f"{exc}: names moved to it cannot be read")
            return None
        return moving_to

    def name(
        self, cdir: Path, disk: str, dir_iv: bytes | None, plain: str | None,
        moving_to: bytes | None = None,
    ) -> str | None:
        """Plaintext path of one entry, or None (and a problem) if its name does not decrypt
        (under *dir_iv*, or under *moving_to* in a directory a killed run left half moved)."""
        if dir_iv is None:
            return None
        self.report.checked["names"] += 1

        def read_sidecar() -> str:
            self.report.checked["long_names"] += 1
            try:
                sidecar = os.fsencode(cdir / (disk + LONGNAME_SUFFIX))
                return read_internal_file(sidecar, 4096).decode("ascii")
            except FileNotFoundError:
                raise IntegrityError(f"long name {disk}: sidecar is missing") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise IntegrityError(f"long name {disk}: unreadable sidecar ({exc})") from None

        try:
            try:
                return _join(plain, self.names.decrypt_from_disk(dir_iv, disk, read_sidecar))
            except IntegrityError:
                if moving_to is None:
                    raise
                return _join(plain, self.names.decrypt_from_disk(moving_to, disk, read_sidecar))
        except IntegrityError as exc:
            where = plain if plain is not None else "a directory whose path is unknown"
            self.damage("name", cdir / disk, None, f"{exc} (in {where})")
            return None

    def entry(self, path: Path, plain: str | None) -> Iterator[tuple[Path, str | None]]:
        try:
            st = os.lstat(_reach(path))
        except OSError as exc:
            self.damage("unreadable", path, plain, f"cannot stat: {exc.strerror}")
            return
        if stat.S_ISDIR(st.st_mode):
            self.xattrs(path, plain)
            yield path, plain
        elif stat.S_ISREG(st.st_mode):
            self.xattrs(path, plain)
            self.file(path, plain, st)
        elif stat.S_ISLNK(st.st_mode):
            self.symlink(path, plain)
        else:
            self.report.checked["other"] += 1

    def xattrs(self, path: Path, plain: str | None) -> None:
        """Every ``user.*`` attribute: its name decrypts (a long one, from its value) and its
        value opens under that name. Other namespaces are not kmsfs's and are left alone."""
        try:
            names = os.listxattr(_reach(path), follow_symlinks=False)
        except OSError:
            return  # a backing file system without xattrs has none to check
        for disk in names:
            raw = os.fsencode(disk)
            if disk == TIMES_XATTR:
                self.warn("interrupted-reencrypt", path, plain, "a killed kmsfs reencrypt saved "
                          "this directory's times here: run it again to put them back")
            if not raw.startswith(USER_PREFIX):
                continue
            self.report.checked["xattrs"] += 1
            try:
                stored = os.getxattr(_reach(path), raw, follow_symlinks=False)
                self.xattr_cipher.plain_name(raw, stored)
                epoch = self.xattr_cipher.open_with_epoch(raw, stored)[1]
                self.report.xattr_epochs[epoch] = self.report.xattr_epochs.get(epoch, 0) + 1
            except ForeignXattrName as exc:
                whose = ("another program's, or one of kmsfs's own damaged in place"
                         if exc.maybe_ours else "another program's?")
                self.warn("foreign-xattr", path, plain, f"extended attribute {disk} is not one "
                          f"kmsfs writes ({whose}); the mount does not show it")
            except IntegrityError as exc:
                kind = "epoch" if isinstance(exc, EpochUnavailable) else "xattr"
                self.damage(kind, path, plain, f"extended attribute {disk}: {exc}")
            except OSError as exc:
                self.damage("unreadable", path, plain, f"extended attribute {disk}: {exc.strerror}")

    # symlinks

    def symlink(self, path: Path, plain: str | None) -> None:
        self.report.checked["symlinks"] += 1
        target = os.fsdecode(os.readlink(_reach(path)))

        def read_blob() -> str:
            self.blobs.add(target)
            try:
                with dir_no_follow(os.fsencode(self.root / LONGLINK_DIR)) as blobs:
                    return read_internal_file(blobs + b"/" + os.fsencode(target), 8192).decode(
                        "ascii"
                    )
            except FileNotFoundError:
                raise IntegrityError(f"long symlink {target}: blob is missing") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise IntegrityError(f"long symlink {target}: unreadable blob ({exc})") from None

        try:
            epoch = self.links.open_from_disk(target, read_blob)[1]
        except IntegrityError as exc:
            kind = "epoch" if isinstance(exc, EpochUnavailable) else "symlink"
            self.damage(kind, path, plain, str(exc))
            return
        self.report.symlink_epochs[epoch] = self.report.symlink_epochs.get(epoch, 0) + 1

    def made_ahead(self) -> None:
        """``kmsfs.newdirs/`` holds only ready directories (each just its IV); anything else
        there (a half-made one a crash left, which the next mount removes) is a leftover."""
        pool = self.root / POOL_DIR
        if not os.path.lexists(pool):
            return
        try:
            fd = os.open(pool, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                self.warn("leftover", pool, None, "not the directory of directories made ahead")
            else:
                self.warn("made-ahead", pool, None, f"unreadable: {exc.strerror}")
            return
        try:
            if not is_own_dir(os.fstat(fd), 0):  # only a daemon run as root makes one
                self.warn("made-ahead", pool, None, "not root's own (owner or mode): mounts "
                          "will not use it; remove it")
            for name in sorted(os.fsencode(n) for n in os.listdir(fd)):
                if not (is_ready_name(name) and is_whole_at(fd, name, 0)):
                    self.warn("leftover", pool / os.fsdecode(name), None,
                              "not a whole directory made ahead for mkdir")
        finally:
            os.close(fd)

    def orphan_blobs(self) -> None:
        blob_dir = self.root / LONGLINK_DIR
        if not os.path.lexists(blob_dir):
            return
        try:
            with dir_no_follow(os.fsencode(blob_dir)) as blobs:
                names = sorted(os.fsdecode(n) for n in os.listdir(blobs))
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.ELOOP):  # never listed through a symlink
                self.warn("leftover", blob_dir, None, "not the directory of long symlink blobs")
            else:
                self.warn("orphan-blob", blob_dir, None, f"unreadable: {exc.strerror}")
            return
        for name in names:
            if name not in self.blobs:
                detail = "no symlink names this blob" if is_longlink(name) else "not a blob name"
                self.warn("orphan-blob", blob_dir / name, None, detail)

    # file contents

    def file(self, path: Path, plain: str | None, st: os.stat_result) -> None:
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in self.seen:
                self.report.checked["hard_links"] += 1
                return
            self.seen.add((st.st_dev, st.st_ino))
        self.report.checked["files"] += 1
        try:  # no following, no blocking on a FIFO put there since the walk
            with open(open_unread(_reach(path)), "rb") as f:
                self.contents(f, path, plain, st.st_size)
        except PermissionError as exc:  # run as a user the file's mode shuts out: not damage
            self.warn("unchecked", path, plain, f"cannot read: {exc.strerror} (run fsck as root)")
        except OSError as exc:
            self.damage("unreadable", path, plain, f"cannot read: {exc.strerror}")

    def contents(self, f: Any, path: Path, plain: str | None, size: int) -> None:
        if size == 0:
            return
        try:
            header = content.FileHeader.parse(f.read(content.HEADER_SIZE))
        except FormatError as exc:
            self.damage("header", path, plain, str(exc))
            return
        full, rest = divmod(size - content.HEADER_SIZE, content.CIPHER_BLOCK_SIZE)
        blocks = full + (1 if rest else 0)
        try:
            content.plain_size(size)
        except FormatError as exc:  # a fragment too short to be a block: truncated mid-block
            blocks = full
            self.damage("size", path, plain, f"{exc} (truncated?)",
                        block=full, offset=full * content.BLOCK_SIZE)
        epochs = self.report.epochs
        epochs[header.epoch] = epochs.get(header.epoch, 0) + 1
        try:
            key = self.deriver.derive(content.file_key_info(header.file_id), epoch=header.epoch)
        except IntegrityError as exc:
            self.damage("epoch", path, plain, f"keyed with mk epoch {header.epoch}: {exc}")
            self.advance(size)
            return
        cipher = content.ContentCipher(key, header)
        bad = 0
        n = 0
        while n < blocks:
            batch = f.read(content.CIPHER_BLOCK_SIZE * min(_BATCH_BLOCKS, blocks - n))
            if not batch:
                break
            for i in range(0, len(batch), content.CIPHER_BLOCK_SIZE):
                block = batch[i : i + content.CIPHER_BLOCK_SIZE]
                self.report.checked["blocks"] += 1
                try:
                    self.report.checked["bytes"] += len(cipher.decrypt_block(n, block))
                except IntegrityError:
                    bad += 1
                    if bad <= MAX_BLOCK_PROBLEMS:
                        self.damage("block", path, plain, "fails authentication"
                                    + (_TORN_END if n == blocks - 1 and size % 4096 == 0
                                       else ""),
                                    block=n, offset=n * content.BLOCK_SIZE)
                self.advance(len(block))
                n += 1
        if bad > MAX_BLOCK_PROBLEMS:
            self.damage("blocks", path, plain,
                        f"{bad - MAX_BLOCK_PROBLEMS} more blocks fail authentication "
                        f"({bad} of {blocks})")


#: What fsck adds to a failing last block of a file that ends at a page boundary: where a kill
#: stops a write, so most likely a write past the end cut short (by a daemon without tail
#: records: a mount with them cuts such an end off, if its record says so).
_TORN_END = (" (the file's last block, ending at a 4096-byte boundary: probably a write past "
             "the end cut short by a killed daemon; truncating the file to the block's start "
             "keeps everything before it)")


def _read_only(root: Path, relative: str) -> tuple[str, int, int]:
    """(*relative*, mode, owner) if the file there is one its owner may not write, else ""."""
    try:
        st = os.lstat(root / relative)
    except (OSError, ValueError):
        return "", 0, 0
    if not stat.S_ISREG(st.st_mode) or st.st_mode & stat.S_IWUSR:
        return "", 0, 0
    return relative, stat.S_IMODE(st.st_mode), st.st_uid


def _reach(path: Path) -> bytes:
    """*path* for a syscall, even if its ciphertext path is longer than PATH_MAX."""
    return reach(os.fsencode(path))


def check_tree(
    cipherdir: Path, deriver: KeyDeriver, advance: Callable[[int], None] | None = None
) -> Report:
    """Check a whole ciphertext tree with ``deriver``'s keys; never writes anything."""
    forget()  # anchors cached before (a mount in between may have moved their directories)
    checker = _Checker(Path(cipherdir), deriver, advance)
    checker.report.current_epoch = getattr(deriver, "current_epoch", None)
    checker.journal()
    checker.xattrs(checker.root, "/")  # entry() checks those of every other directory
    checker.tree(checker.root, "/")
    checker.orphan_blobs()
    checker.made_ahead()
    checker.report.clean = not checker.report.problems
    return checker.report


def _ciphertext_bytes(cipherdir: Path) -> int:
    """Bytes of all regular files, for the progress bar; any depth (a stack, and reach)."""
    total = 0
    stack = [os.fsencode(cipherdir)]
    while stack:
        top = stack.pop()
        try:
            fd = open_dir_unread(reach(top))  # listing it must not move its atime either
        except OSError:
            continue
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(top + b"/" + os.fsencode(entry.name))
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def fsck(store: Path, cipherdir: Path, agent: kms.AgentOptions | None = None) -> Report:
    """Open the volume's Domain as ``mount`` does (verified against the store), then check."""
    cipherdir = Path(cipherdir)
    if not cipherdir.is_dir():
        raise FormatError(f"{cipherdir}: no such directory")
    config = volconfig.load(cipherdir)
    kms.check_bundle(
        store, config.domain_bundle, str(cipherdir), want_id=config.domain_id, agent=agent
    )
    lock_fd = lock_shared(cipherdir)  # no mount changes the tree while it is read
    try:
        probe = Progress("kmsfs: fsck", None)
        progress = (
            Progress("kmsfs: fsck", _ciphertext_bytes(cipherdir)) if probe.enabled else probe
        )
        with kms.open_deriver(store, config.domain_bundle, agent) as deriver:
            try:
                return check_tree(cipherdir, deriver, progress.advance)
            finally:
                progress.close()
    finally:
        os.close(lock_fd)
