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
under the new key stays, the others move. A directory that fails in step 2 (a rename refused)
is moved back to the old key; one whose names do not decrypt under either key keeps them as
they are (they were unreadable before), reported as failures.

The directory's times are saved durably before step 1 (``DirTimes.touching``; the root's
before the marker is written) and put back after step 3. The saved copy carries a fingerprint of
the entry names, which tells a later run whether a mount changed the directory since; the
renames change them, so it is brought up to date before step 3 (``DirTimes.names_moved``), and
while ``kmsfs.diriv.rekey`` is there (no mount can have run) a run trusts it as it is.
"""
from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from kmsfs.atomicfile import fsync_dir, replace
from kmsfs.crypto.names import (
    LONGNAME_SUFFIX,
    DiskName,
    VolumeNames,
    epoch_of,
    is_internal,
    is_sidecar,
    parse_dir_iv,
    with_epoch,
)
from kmsfs.errors import FormatError, IntegrityError, UsageError
from kmsfs.fs.longpath import reach
from kmsfs.fs.names import DIRIV, read_dir_iv, write_sidecar
from kmsfs.fs.posix import read_internal_file, rename_noreplace
from kmsfs.fs.reencrypt_resume import DirTimes
from kmsfs.fs.reencrypt_walk import REKEY_NAME, TEMP_PREFIX, list_unread, owner_access

REKEY = REKEY_NAME.encode()
MARKER_NAME = "kmsfs.rekeying"
"""In the volume root while some directory may hold names under two keys."""
MARKER = MARKER_NAME.encode()
_SIDECAR = LONGNAME_SUFFIX.encode()

Fail = Callable[[bytes, str], None]
Moved = Callable[[bytes, bytes], None]


def check_not_rekeying(cipherdir: Path) -> None:
    """UsageError if a ``kmsfs reencrypt`` was cut short while moving names to a new epoch:
    some directory may hold names under two keys, and a mount would show only part of it."""
    if os.path.lexists(Path(cipherdir) / MARKER_NAME):
        raise UsageError(
            f"{cipherdir}: a kmsfs reencrypt was cut short while moving names to a new key "
            f"epoch ({MARKER_NAME}): run 'kmsfs reencrypt {cipherdir}' again, then mount"
        )


def rekey_state(d: bytes) -> tuple[bytes, bytes | None]:
    """(the directory's IV, the IV its names are moving to, if a run left that half done).
    A ``kmsfs.diriv.rekey`` that does not parse was never acted on (it is written whole before
    any entry moves): it counts as none."""
    dir_iv = read_dir_iv(d)
    try:
        target: bytes | None = parse_dir_iv(read_internal_file(d + b"/" + REKEY, 64))
    except FileNotFoundError:
        target = None
    except (OSError, FormatError):
        target = None
    return dir_iv, target


class NameRekeyer:
    """Moves directories' names to epoch *current* (module docstring); *fail(path, detail)*
    reports what it leaves, *moved(old, new)* hears of each entry renamed (so paths reported
    earlier can follow), *times* keeps each directory's own times."""

    def __init__(self, root: bytes, names: VolumeNames, current: int, times: DirTimes,
                 fail: Fail, moved: Moved = lambda old, new: None) -> None:
        self.root = root
        self.names = names
        self.current = current
        self.times = times
        self.fail = fail
        self.moved = moved
        self.rekeyed = 0
        self.epochs_before: dict[int, int] = {}
        self.epochs_after: dict[int, int] = {}

    def run(self, dirs: Iterable[bytes]) -> None:
        """Re-key every directory of *dirs* (ciphertext paths, the root's included) whose
        names are below the current epoch, or left half done."""
        todo: list[bytes] = []
        for d in dirs:
            try:
                dir_iv, target = rekey_state(d)
            except IntegrityError as exc:
                self.fail(d, f"names not re-keyed: {exc}")
                continue
            epoch = epoch_of(dir_iv)
            self.epochs_before[epoch] = self.epochs_before.get(epoch, 0) + 1
            self.epochs_after[epoch] = self.epochs_after.get(epoch, 0) + 1
            if target is not None or epoch < self.current:
                todo.append(d)
        marker = self.root + b"/" + MARKER
        if not todo:
            if os.path.lexists(marker):  # a killed run's, with nothing left half done
                self._drop_marker(marker)
            return
        if not os.path.lexists(marker):
            self.times.touching(self.root)  # its times, before the marker moves them
            with owner_access(self.root, stat.S_IWUSR | stat.S_IXUSR):
                replace(Path(os.fsdecode(marker)), b"", 0o600, temp_prefix=TEMP_PREFIX,
                        parents=False)
                fsync_dir(self.root)
        half_done = False
        for d in sorted(todo, key=lambda p: p.count(b"/"), reverse=True):  # deepest first
            try:
                self._rekey(d)
            except (OSError, IntegrityError, FormatError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                self.fail(d, f"names not re-keyed: {why}")
            if os.path.lexists(reach(d + b"/" + REKEY)):
                half_done = True
        if not half_done:
            self._drop_marker(marker)

    def _drop_marker(self, marker: bytes) -> None:
        """Remove ``kmsfs.rekeying``, then put back the root's times it moved and drop their
        saved copy (last: a run cut short before finds it, and puts them back)."""
        with owner_access(self.root, stat.S_IWUSR | stat.S_IXUSR):
            os.unlink(marker)
            fsync_dir(self.root)
        self.times.done_with(self.root)

    def _rekey(self, d: bytes) -> None:
        """Move one directory's names to the current epoch (as many rounds as it takes: a run
        that was cut short moving them to an epoch that is no longer the current one first
        finishes that move)."""
        self.times.touching(d)
        with owner_access(d, stat.S_IWUSR | stat.S_IXUSR):
            while True:
                dir_iv, target = rekey_state(d)
                if target is None:
                    if epoch_of(dir_iv) >= self.current:
                        break
                    target = with_epoch(dir_iv, self.current)
                    self.names.check(dir_iv)  # refused or missing: before anything moves
                    self.names.check(target)
                    replace(Path(os.fsdecode(reach(d + b"/" + REKEY))), target, 0o440,
                            temp_prefix=TEMP_PREFIX, parents=False)
                    fsync_dir(reach(d))
                self._move_entries(d, dir_iv, target)
                _drop_orphan_sidecars(d)  # before the switch: a run cut short after it
                fsync_dir(reach(d))  # would find nothing left to do here
                self.times.names_moved(d)
                os.rename(reach(d + b"/" + REKEY), reach(d + b"/" + DIRIV))
                fsync_dir(reach(d))
                before, after = epoch_of(dir_iv), epoch_of(target)
                self.epochs_after[before] -= 1
                if not self.epochs_after[before]:
                    del self.epochs_after[before]
                self.epochs_after[after] = self.epochs_after.get(after, 0) + 1
            self.rekeyed += 1
        if d != self.root:  # the root's go once the marker has gone (_drop_marker)
            self.times.done_with(d)

    def _move_entries(self, d: bytes, old: bytes, new: bytes) -> None:
        """Step 2: every entry under *old*'s key gets its name under *new*'s. A rename that
        fails moves back the ones this call moved (the directory is whole again, at the old
        epoch) and raises."""
        moved: list[tuple[bytes, bytes, DiskName]] = []
        try:
            for cname in sorted(list_unread(reach(d))):
                disk = os.fsdecode(cname)
                if is_internal(disk):
                    continue
                plain = self._decrypt(d, new, disk)
                if plain is not None:
                    continue  # moved by a run that was cut short
                plain = self._decrypt(d, old, disk)
                if plain is None:
                    self.fail(d + b"/" + cname, "name does not decrypt under either key epoch: "
                              "left as it is (run kmsfs fsck)")
                    continue
                target = self.names.encrypt_to_disk(new, plain)
                new_name = os.fsencode(target.name)
                write_sidecar(d, target, TEMP_PREFIX)  # a leftover of the job's: the next
                # run removes it
                rename_noreplace(reach(d + b"/" + cname), reach(d + b"/" + new_name))
                moved.append((cname, new_name, target))
        except BaseException:
            self._move_back(d, moved)
            raise
        for old_name, new_name, _ in moved:
            self.moved(d + b"/" + old_name, d + b"/" + new_name)

    def _move_back(self, d: bytes, moved: list[tuple[bytes, bytes, DiskName]]) -> None:
        """Undo step 2 of this call; the directory is then wholly at the old epoch, and its
        ``kmsfs.diriv.rekey`` goes. If an entry cannot move back, the directory stays half
        done (the next run finishes it)."""
        try:
            for old_name, new_name, target in reversed(moved):
                os.rename(reach(d + b"/" + new_name), reach(d + b"/" + old_name))
                if target.sidecar is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(reach(d + b"/" + os.fsencode(target.sidecar)))
            os.unlink(reach(d + b"/" + REKEY))
            fsync_dir(reach(d))
        except OSError:
            pass

    def _decrypt(self, d: bytes, dir_iv: bytes, disk: str) -> bytes | None:
        def read_sidecar() -> str:
            return read_internal_file(
                d + b"/" + os.fsencode(disk) + _SIDECAR, 4096
            ).decode("ascii")

        try:
            return self.names.decrypt_from_disk(dir_iv, disk, read_sidecar)
        except (IntegrityError, OSError, UnicodeDecodeError):
            return None


def _drop_orphan_sidecars(d: bytes) -> None:
    """Remove the long-name sidecars whose entry is gone (the old ones of moved long names).
    No mount runs meanwhile, so none is a sidecar written ahead of its entry."""
    names = set(list_unread(reach(d)))
    for name in names:
        text = os.fsdecode(name)
        if is_sidecar(text) and name[: -len(_SIDECAR)] not in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(reach(d + b"/" + name))
