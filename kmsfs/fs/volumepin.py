"""Which Domain each volume on this machine uses: a record kept outside the volume, trusted on
first use, so that a ``kmsfs.conf`` pointed at another Domain is refused (threat-model §1).

Nothing signs ``kmsfs.conf`` as a whole. Its bundle verifies, and its ``domain_name`` and
``domain_id`` must be the bundle's (:meth:`kmsfs.fs.config.VolumeConfig.validate`), but nothing
in it says that the volume belongs to *that* Domain: whoever can write CIPHERDIR can put in
the bundle of another Domain of the same store (public documents, and it verifies), and what
users write from then on is keyed with a Domain that others may be allowed to derive with
(through a kmsfs-hsmd policy, say). Two things outside the volume say which Domain it should
use: ``kmsfs mount --domain NAME`` (``-o domain=NAME``), the operator's word, and this record.
``kmsfs init`` and the first mount of a volume record its Domain (name and store root);
a later mount of that volume whose config names another Domain is refused with one line that
names the record, which an operator who bound the volume to another Domain on purpose removes
(as for :mod:`kmsfs.fs.seen`'s generations). A newer generation of the same Domain (a rewrap,
a rotation) is the same Domain: the record holds no generation or id.

Keyed on the ciphertext directory's real path (``os.path.realpath``), not on anything inside
the volume. Whoever can rewrite ``kmsfs.conf`` can rewrite any other file there too, the root
directory's IV (``kmsfs.diriv``) included: that breaks every name in the root, but on a volume
never mounted, or with an empty root, it breaks nothing, and a fresh IV would be a volume this
machine never saw, its swapped Domain trusted on first use again. What lives at a path changes
only through its parent directory, which that attacker need not be able to write (and as root
kmsfs uses a volume only where nobody else can: :func:`kmsfs.fs.volume.check_root_only`); a
whole other directory put there is still held to the record. The price: a volume moved or
renamed on purpose is recorded anew at its new path (first use again, or ``--domain``); a
record stays behind for a volume removed (a few hundred bytes); a volume reached by two paths
that realpath does not join (a bind mount) has a record per path. ``kmsfs init`` replaces the
record at its path: a new volume made there is the operator's doing.

One small JSON file per volume under ``state_dir()/volumes/`` (:func:`kmsfs.fs.seen.state_dir`),
named by a hash of the real path, written atomically; nothing secret (a path, a name, an id)::

    {"domain": "payroll", "root": "<root Trust id of its store>", "volume": "/srv/cipher/payroll"}
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs import seen

#: The state directory's subdirectory of these records.
RECORDS = "volumes"


@dataclass(frozen=True)
class Pin:
    """The Domain a volume of this machine uses: its name, and the root Trust of its store (two
    stores may each have a Domain ``payroll``)."""

    volume: str  # the ciphertext directory's real path
    domain: str
    root: str


def volume_key(cipherdir: Path) -> str:
    """What a volume is recorded under: its real path (module docstring)."""
    return os.path.realpath(cipherdir)


def volume_keys(cipherdir: Path) -> list[str]:
    """Its real path, and the path as given (absolute, not resolved) where that differs. Keyed
    on the real path alone, a symlink at the path the operator mounts, put there by whoever can
    write the directory above (a synced folder's other peer), led to a real path that had no
    record: trusted on first use again, and recorded."""
    real, given = volume_key(cipherdir), os.path.abspath(cipherdir)
    return [real] if given == real else [real, given]


def _record_of(key: str) -> Path:
    name = hashlib.sha256(os.fsencode(key)).hexdigest()[:32]
    return seen.state_dir() / RECORDS / f"{name}.json"


def record_path(cipherdir: Path) -> Path:
    """The record under the volume's real path."""
    return _record_of(volume_key(cipherdir))


def _load(key: str) -> Pin | None:
    path = _record_of(key)
    doc = seen.read_record(path)
    if doc is None:
        return None
    pin = Pin(doc.get("volume"), doc.get("domain"), doc.get("root"))
    if not (
        all(isinstance(v, str) and v for v in (pin.volume, pin.domain, pin.root))
        and pin.volume == key
    ):
        raise FormatError(f"{path}: not a record of the Domain of volume {key}; remove it")
    return pin


def load(cipherdir: Path) -> Pin | None:
    """The record of the volume at *cipherdir* (under its real path, else the path as given),
    or None if there is none. FormatError (naming the file) for one that is damaged or is
    another volume's."""
    for key in volume_keys(cipherdir):
        pin = _load(key)
        if pin is not None:
            return pin
    return None


def check(cipherdir: Path, domain: str, root: str | None, report_only: bool = False) -> None:
    """IntegrityError, one line naming the record and how to clear it, unless every record of
    the volume at *cipherdir* (:func:`volume_keys`) is Domain *domain* of the store with root
    Trust *root* (the verified Domain its config names).

    The records' directories are closed to others first (:func:`kmsfs.fs.seen.close_to_others`,
    IntegrityError for a symlink there or one owned by another user): read through a symlinked
    ``volumes/``, records were whatever its target held, and none could be written. Not with
    *report_only* (``kmsfs info``, a report that changes nothing on disk)."""
    if not report_only:
        seen.close_to_others(RECORDS)
    for key in volume_keys(cipherdir):
        pin = _load(key)
        if pin is None or (pin.domain, pin.root) == (domain, root):
            continue
        store = "" if pin.root == root else f" of another store (root Trust {str(root)[:12]})"
        raise IntegrityError(
            f"{cipherdir}: this machine uses the volume at {key} with Domain {pin.domain} (root "
            f"Trust {pin.root[:12]}), but its kmsfs.conf now names Domain {domain}{store} "
            "(changed by someone who can write it?); if the volume was bound to that Domain "
            f"on purpose, remove {_record_of(key)}"
        )


def remember(cipherdir: Path, domain: str, root: str | None, replace: bool = False) -> bool:
    """Record that the volume at *cipherdir* uses Domain *domain* of root *root*, if it has no
    record yet (or, with ``replace``, for ``kmsfs init``, whatever it had); True if written.
    Call it only with what :func:`check` accepted. As :func:`kmsfs.fs.seen.remember`, it first
    closes this user's state directories to others and writes through none they may change."""
    if not root:  # a bundle with no chain does not verify: nothing a mount used
        return False
    seen.close_to_others(RECORDS)
    written = False
    for key in volume_keys(cipherdir):
        if replace or _load(key) is None:
            seen.write_record(_record_of(key), {"domain": domain, "root": root, "volume": key})
            written = True
    return written
