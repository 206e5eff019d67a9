"""``kmsfs reencrypt``'s second pass: move every directory's names to the Domain's current epoch.

A directory's names are encrypted with the name key of the ``mk`` epoch its ``kmsfs.diriv``
names (docs/format.md, "Directory IV"): an HSM removed before a rotation still computes the name
key of the old epoch, so until its directories move, it reads their names. After the files, the
job re-keys each directory below the current epoch, deepest first (renaming a directory's
entries moves the ciphertext paths below them, which are then done), in three steps:

1. write ``kmsfs.diriv.rekey``: the directory's IV at the current epoch (atomically, fsync'd);
2. rename each entry whose name decrypts under the old epoch to its name under the new one (a
   long name gets its new sidecar first; the old one goes in step 3);
3. remove the sidecars whose entry is gone, fsync the directory, rename
   ``kmsfs.diriv.rekey`` over ``kmsfs.diriv``, fsync the directory, and put back its own times.

In between, a directory holds names under both keys, which no mount serves: before the first
step of the first directory the job writes ``kmsfs.rekeying`` in the volume root (fsync'd), and
a mount refuses a volume that has it (:func:`check_not_rekeying`). It is removed once no
directory is left half done. The next run finishes a half-done directory: an entry already
under the new key stays, the others move. A directory that fails in step 2 (a rename refused,
a sidecar that cannot be read, Ctrl-C) is moved back to the old key if this run began it, and
left half done for the next run if a run before began it; an entry whose name decrypts under
neither key keeps it (it was unreadable before), reported as a failure.

The directory's times are saved durably before step 1 (``DirTimes.touching``; the root's
before the marker is written) and put back after step 3. The saved copy carries a fingerprint of
the entry names, which tells a later run whether a mount changed the directory since; the
renames change them, so it is brought up to date before step 3 (``DirTimes.names_moved``), and
while ``kmsfs.diriv.rekey`` is there (no mount can have run) a run trusts it as it is.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from kmsfs.atomicfile import fsync_dir, replace
from kmsfs.crypto.names import (
    LONGNAME_SUFFIX,
    MAX_NAME_BYTES,
    DiskName,
    VolumeNames,
    epoch_of,
    is_internal,
    is_sidecar,
    iv_of,
    parse_dir_iv,
    with_epoch,
)
from kmsfs.errors import FormatError, IntegrityError, KmsfsError, UsageError
from kmsfs.fs.longpath import reach
from kmsfs.fs.names import DIRIV, read_dir_iv, sidecar_of, write_sidecar
from kmsfs.fs.posix import read_internal_file, rename_noreplace
from kmsfs.fs.reencrypt_resume import DirTimes
from kmsfs.fs.reencrypt_walk import REKEY_NAME, TEMP_PREFIX, list_unread, owner_access

REKEY = REKEY_NAME.encode()
MARKER_NAME = "kmsfs.rekeying"
"""In the volume root while some directory may hold names under two keys."""
MARKER = MARKER_NAME.encode()
_SIDECAR = LONGNAME_SUFFIX.encode()

log = logging.getLogger(__name__)

Fail = Callable[[bytes, str], None]
Moved = Callable[[bytes, dict[bytes, bytes]], None]
#: What a second entry of one name gets after it (:meth:`NameRekeyer._move_entries`).
CONFLICT_SUFFIX = b".kmsfs-conflict-"


def check_not_rekeying(cipherdir: Path) -> None:
    """UsageError if a ``kmsfs reencrypt`` was cut short while moving names to a new epoch:
    some directory may hold names under two keys, and a mount would show only part of it."""
    if os.path.lexists(Path(cipherdir) / MARKER_NAME):
        raise UsageError(
            f"{cipherdir}: a kmsfs reencrypt was cut short while moving names to a new key "
            f"epoch ({MARKER_NAME}): run 'kmsfs reencrypt {cipherdir}' again, then mount"
        )


def is_rekey_of(dir_iv: bytes, target: bytes) -> bool:
    """Whether *target* is a ``kmsfs.diriv.rekey`` a run writes for a directory with
    *dir_iv*: its own IV, at a higher epoch."""
    return iv_of(target) == iv_of(dir_iv) and epoch_of(dir_iv) < epoch_of(target)


def rekey_state(d: bytes) -> tuple[bytes, bytes | None]:
    """(the directory's IV, the IV a run cut short was moving its names to, if any).

    A ``kmsfs.diriv.rekey`` counts only if it is what a run writes: the same IV, at an epoch
    above the directory's. Anything else there (one that does not parse, a copy of another
    directory's IV a writer of the ciphertext planted to move these names under it) was never
    acted on, and is removed: OSError if it cannot be. (One at an epoch the Domain lacks counts:
    names may have moved to it; :meth:`VolumeNames.check` then refuses to go on.)"""
    dir_iv = read_dir_iv(d)
    rekey = d + b"/" + REKEY
    try:
        target = parse_dir_iv(read_internal_file(rekey, 64))
    except FileNotFoundError:
        return dir_iv, None
    except FormatError:
        target = None
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # EIO, EACCES: it may be a run's; the directory waits
            raise OSError(exc.errno, f"{REKEY_NAME}: {exc.strerror}") from None
        target = None  # not a regular file: no run wrote it
    if target is not None and is_rekey_of(dir_iv, target):
        return dir_iv, target
    log.warning("%r: not a kmsfs.diriv.rekey a run wrote: removed", rekey)
    try:
        os.unlink(reach(rekey))
    except OSError as exc:
        raise NotARekey(exc.errno, f"{REKEY_NAME} is not kmsfs's and cannot be removed "
                        f"({exc.strerror}): remove it by hand") from None
    return dir_iv, None


class NotARekey(OSError):
    """A ``kmsfs.diriv.rekey`` no run wrote, which cannot be removed: no name moved to it."""


class NameRekeyer:
    """Moves directories' names to epoch *current* (module docstring); *fail(path, detail)*
    reports what it leaves, *moved(directory, {old name: new name})* hears of the entries
    each directory renamed (so paths reported earlier can follow), *times* keeps each
    directory's own times. *found* is each directory's lstat from the walk: one that is no
    longer the same directory (swapped since, or reached through a symlink put on the way) is
    left alone. *retired(directory)* hears of each directory whose names it moved from an epoch
    below *retired_below* (the run lists them: after a retirement, one a run missed or one
    rolled back, whose names the holder of that epoch's ``mk`` could have planted)."""

    def __init__(self, root: bytes, names: VolumeNames, current: int, times: DirTimes,
                 fail: Fail, moved: Moved = lambda d, renamed: None,
                 found: dict[bytes, os.stat_result] | None = None,
                 retired_below: int = 1,
                 retired: Callable[[bytes], None] = lambda d: None) -> None:
        self.root = root
        self.retired_below = retired_below
        self.retired = retired
        self.names = names
        self.current = current
        self.times = times
        self.fail = fail
        self.moved = moved
        self.found = found or {}
        self.rekeyed = 0
        self.epochs_before: dict[int, int] = {}
        self.epochs_after: dict[int, int] = {}

    def run(self, dirs: Iterable[bytes]) -> None:
        """Re-key every directory of *dirs* (ciphertext paths, the root's included) whose
        names are below the current epoch, or left half done."""
        todo: list[bytes] = []
        half_done = False
        for d in dirs:
            try:
                dir_iv, target = rekey_state(d)
            except (OSError, IntegrityError) as exc:
                self.fail(d, f"names not re-keyed: {_why(exc)}")
                # a .rekey it could not read may be a run's: the marker stays for it
                half_done |= not isinstance(exc, NotARekey) and os.path.lexists(
                    reach(d + b"/" + REKEY))
                continue
            epoch = epoch_of(dir_iv)
            self.epochs_before[epoch] = self.epochs_before.get(epoch, 0) + 1
            self.epochs_after[epoch] = self.epochs_after.get(epoch, 0) + 1
            if target is not None or epoch < self.current:
                todo.append(d)
        marker = self.root + b"/" + MARKER
        if todo and not os.path.lexists(marker):
            self.times.touching(self.root)  # its times, before the marker moves them
            with owner_access(self.root, stat.S_IWUSR | stat.S_IXUSR):
                replace(Path(os.fsdecode(marker)), b"", 0o600, temp_prefix=TEMP_PREFIX,
                        parents=False)
                fsync_dir(self.root)
        for d in sorted(todo, key=lambda p: p.count(b"/"), reverse=True):  # deepest first
            if not self._still_found(d):
                self.fail(d, "names not re-keyed: not the directory the walk found (swapped "
                          "since?)")
                continue  # nothing done there, and its path leads elsewhere: not even times
            try:
                self._rekey(d)
            except (OSError, IntegrityError, FormatError) as exc:
                self.fail(d, f"names not re-keyed: {_why(exc)}")
                if d != self.root:  # its path moves with its parent's names: times now
                    self.times.done_with(d)
            if os.path.lexists(reach(d + b"/" + REKEY)):
                half_done = True
        if not half_done and os.path.lexists(marker):
            self._drop_marker(marker)

    def _drop_marker(self, marker: bytes) -> None:
        """Remove ``kmsfs.rekeying``, then put back the root's times it moved and drop their
        saved copy (last: a run cut short before finds it, and puts them back)."""
        self.times.touching(self.root)  # a rerun that found nothing left but the marker
        with owner_access(self.root, stat.S_IWUSR | stat.S_IXUSR):
            try:
                os.unlink(marker)
            except IsADirectoryError:
                raise KmsfsError(f"{os.fsdecode(marker)}: not kmsfs's (a directory): remove "
                                 "it by hand; every name has moved") from None
            fsync_dir(self.root)
        self.times.done_with(self.root)

    def _still_found(self, d: bytes) -> bool:
        """Whether *d* is still the directory the walk found there (same device and inode, not
        a symlink): one swapped since, or reached through a symlink put on the way, is not."""
        was = self.found.get(d)
        if was is None:
            return True
        try:
            now = os.lstat(reach(d))
        except OSError:
            return False
        return stat.S_ISDIR(now.st_mode) and (now.st_dev, now.st_ino) == (was.st_dev, was.st_ino)

    def _rekey(self, d: bytes) -> None:
        """Move one directory's names to the current epoch (as many rounds as it takes: a run
        that was cut short moving them to an epoch that is no longer the current one first
        finishes that move)."""
        self.times.touching(d)
        first: int | None = None  # the epoch its names were keyed with before this run
        with owner_access(d, stat.S_IWUSR | stat.S_IXUSR):
            while True:
                dir_iv, target = rekey_state(d)
                if first is None:
                    first = epoch_of(dir_iv)
                fresh = target is None
                if target is None:
                    if epoch_of(dir_iv) >= self.current:
                        break
                    target = with_epoch(dir_iv, self.current)
                    self.names.check(dir_iv)  # an epoch the Domain lacks: before anything moves
                self.names.check(target)
                if fresh:
                    replace(Path(os.fsdecode(reach(d + b"/" + REKEY))), target, 0o440,
                            temp_prefix=TEMP_PREFIX, parents=False)
                    fsync_dir(reach(d))
                seconds = self._move_entries(d, dir_iv, target, fresh)
                _drop_orphan_sidecars(d)  # before the switch: a run cut short after it
                fsync_dir(reach(d))  # would find nothing left to do here
                self.times.names_moved(d)
                os.rename(reach(d + b"/" + REKEY), reach(d + b"/" + DIRIV))
                fsync_dir(reach(d))
                for name, detail in seconds:  # now that their names read (plaintext paths)
                    self.fail(d + b"/" + name, detail)
                before, after = epoch_of(dir_iv), epoch_of(target)
                self.epochs_after[before] -= 1
                if not self.epochs_after[before]:
                    del self.epochs_after[before]
                self.epochs_after[after] = self.epochs_after.get(after, 0) + 1
            self.rekeyed += 1
        if first is not None and first < self.retired_below:
            self.retired(d)  # by the path it has now (its parent's names move later)
        if d != self.root:  # the root's go once the marker has gone (_drop_marker)
            self.times.done_with(d)

    def _move_entries(
        self, d: bytes, old: bytes, new: bytes, fresh: bool
    ) -> list[tuple[bytes, str]]:
        """Step 2: every entry under *old*'s key gets its name under *new*'s. Returns what
        to report once the directory has switched: (name, detail) of each second entry of one
        name (:meth:`_second_of`).

        If anything fails (a rename refused, a sidecar that cannot be read, Ctrl-C) in a
        directory whose ``kmsfs.diriv.rekey`` this call wrote (*fresh*), the entries it moved
        go back and the ``.rekey`` goes: the directory is whole at its old epoch again. One a
        run cut short had begun holds names it moved, which only the new key reads: it stays
        half moved (and the marker with it), for the next run to finish."""
        moved: list[tuple[bytes, bytes, DiskName]] = []
        seconds: list[tuple[bytes, str]] = []
        try:
            for cname in sorted(list_unread(reach(d))):
                disk = os.fsdecode(cname)
                if is_internal(disk):
                    continue
                if self._decrypt(d, new, disk) is not None:
                    continue  # moved by a run that was cut short
                plain = self._decrypt(d, old, disk)
                if plain is None:
                    self.fail(d + b"/" + cname, "name does not decrypt under either key epoch: "
                              "left as it is (run kmsfs fsck)")
                    continue
                target = self.names.encrypt_to_disk(new, plain)
                if os.path.lexists(reach(d + b"/" + os.fsencode(target.name))):
                    target, second = self._second_of(d, old, new, plain, target)
                    seconds.append((os.fsencode(target.name), f"two entries were named "
                                    f"{os.fsdecode(plain)!r} (one written while names were "
                                    f"half moved): the second shows as "
                                    f"{os.fsdecode(second)!r}"))
                new_name = os.fsencode(target.name)
                moved.append((cname, new_name, target))  # before: a Ctrl-C may land after
                write_sidecar(d, target, TEMP_PREFIX)  # (a temporary left: the next run's)
                try:
                    rename_noreplace(reach(d + b"/" + cname), reach(d + b"/" + new_name))
                except OSError as exc:
                    raise OSError(exc.errno, f"{exc.strerror} (renaming {disk})") from None
        except BaseException:
            if fresh:
                self._move_back(d, moved)
            elif moved:  # they stay moved (the directory is left half moved)
                self.moved(d, {old_name: new_name for old_name, new_name, _ in moved})
            raise
        if moved:
            self.moved(d, {old_name: new_name for old_name, new_name, _ in moved})
        return seconds

    def _second_of(
        self, d: bytes, old: bytes, new: bytes, plain: bytes, taken: DiskName
    ) -> tuple[DiskName, bytes]:
        """(disk name, plaintext) for an entry whose name under the new key is taken already:
        by the entry a run cut short had moved there, and this one written under the old key
        since (a mount between, with ``kmsfs.rekeying`` removed by hand, found the name free).
        Both stay: this one as ``NAME.kmsfs-conflict-N``, a name free under both keys;
        anything else in the way fails the directory."""
        if self._decrypt(d, new, taken.name) != plain:
            raise FileExistsError(errno.EEXIST, f"{taken.name} exists and is not this entry")
        for n in range(1, 1000):
            suffix = CONFLICT_SUFFIX + str(n).encode()
            second = _shortened(plain, MAX_NAME_BYTES - len(suffix)) + suffix
            target = self.names.encrypt_to_disk(new, second)
            if not any(os.path.lexists(reach(d + b"/" + os.fsencode(t.name)))
                       for t in (target, self.names.encrypt_to_disk(old, second))):
                return target, second
        raise FileExistsError(errno.EEXIST, "no free name for a second entry of one name")

    def _move_back(self, d: bytes, moved: list[tuple[bytes, bytes, DiskName]]) -> None:
        """Undo step 2 of a fresh start (:meth:`_move_entries`): each entry moved goes back,
        then ``kmsfs.diriv.rekey``. If one cannot, the directory stays half moved (with its
        ``.rekey``, so the marker stays too) and the next run finishes it."""
        try:
            for old_name, new_name, target in reversed(moved):
                new_path, old_path = reach(d + b"/" + new_name), reach(d + b"/" + old_name)
                if os.path.lexists(new_path) and not os.path.lexists(old_path):
                    os.rename(new_path, old_path)
                if target.sidecar is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(reach(d + b"/" + os.fsencode(target.sidecar)))
            os.unlink(reach(d + b"/" + REKEY))
            fsync_dir(reach(d))
        except OSError as exc:
            log.warning("%r: names left half moved (%s): the next kmsfs reencrypt finishes",
                        d, exc.strerror)

    def _decrypt(self, d: bytes, dir_iv: bytes, disk: str) -> bytes | None:
        """The plaintext of entry *disk* under *dir_iv*'s key, or None if it does not decrypt
        (or its sidecar is missing or not a regular file: unreadable to a mount too). Any other
        failure to read a sidecar (EIO, EMFILE) raises: the name may be fine, and moving its
        directory without it would strand it."""

        try:
            return self.names.decrypt_from_disk(dir_iv, disk, lambda: sidecar_of(d, disk))
        except (IntegrityError, UnicodeDecodeError):
            return None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EINVAL):
                return None
            raise


def _shortened(name: bytes, limit: int) -> bytes:
    """*name* cut to at most *limit* bytes, at a character boundary if it is UTF-8."""
    if len(name) <= limit:
        return name
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return name[:limit]
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")


def _why(exc: BaseException) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _drop_orphan_sidecars(d: bytes) -> None:
    """Remove the long-name sidecars whose entry is gone (the old ones of moved long names).
    No mount runs meanwhile, so none is a sidecar written ahead of its entry."""
    names = set(list_unread(reach(d)))
    for name in names:
        text = os.fsdecode(name)
        if is_sidecar(text) and name[: -len(_SIDECAR)] not in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(reach(d + b"/" + name))
