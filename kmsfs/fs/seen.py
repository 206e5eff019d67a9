"""What this machine has mounted: the newest generation of each Domain, kept outside the store
and the volume, so that rolling both back is refused (docs/threat-model.md §2).

A store writer can hide a Domain's newer generations, and the volume's own copy
(``kmsfs.conf``, kept current by every read-write mount) stops that only while nobody writes
the ciphertext directory too. This record is the client's, like TUF's trusted metadata: a
mount refuses a Domain older than the one this machine (or this user) last mounted, with one
line that names the record, which an operator who restored the store on purpose removes.

One small JSON file per Domain under :func:`state_dir`, named by a hash of the store's root
Trust id and the Domain name (two stores may each have a Domain ``payroll``)::

    {"domain": "payroll", "domain_id": "<id>", "generation": 3, "root": "<root trust id>"}

Written atomically; it holds nothing secret (ids and a number).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kmsfs import atomicfile
from kmsfs.errors import FormatError, IntegrityError

STATE_ENV = "KMSFS_STATE_DIR"
SYSTEM_STATE_DIR = Path("/var/lib/kmsfs/state")
MAX_RECORD_SIZE = 4096


def state_dir() -> Path:
    """``$KMSFS_STATE_DIR``; else /var/lib/kmsfs/state for root; else
    ``$XDG_STATE_HOME/kmsfs`` (``~/.local/state/kmsfs``)."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    if os.geteuid() == 0:
        return SYSTEM_STATE_DIR
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kmsfs"


@dataclass(frozen=True)
class Seen:
    """The newest generation of one Domain of one store that a mount here has used."""

    domain: str
    root: str
    generation: int
    domain_id: str


def record_path(root: str, domain: str) -> Path:
    key = hashlib.sha256(root.encode() + b"\0" + domain.encode()).hexdigest()[:32]
    return state_dir() / "domains" / f"{key}.json"


def load(root: str, domain: str) -> Seen | None:
    """The record of *domain* of the store with root Trust *root*, or None if there is none.
    FormatError (naming the file) for one that is damaged or names another Domain."""
    path = record_path(root, domain)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = json.loads(data) if len(data) <= MAX_RECORD_SIZE else None
        seen = Seen(doc["domain"], doc["root"], doc["generation"], doc["domain_id"])
        valid = (
            isinstance(seen.generation, int)
            and not isinstance(seen.generation, bool)
            and seen.generation >= 1
            and isinstance(seen.domain_id, str)
            and (seen.domain, seen.root) == (domain, root)
        )
    except (ValueError, TypeError, KeyError):
        valid = False
    if not valid:
        raise FormatError(f"{path}: not a record of Domain {domain}'s newest generation; remove it")
    return seen


def check(root: str, domain: str, generation: int) -> None:
    """IntegrityError unless *generation* is at least the newest one mounted here."""
    seen = load(root, domain)
    if seen is not None and generation < seen.generation:
        raise IntegrityError(
            f"Domain {domain}: this machine has mounted its generation {seen.generation}, but "
            f"the store and the volume offer only generation {generation} (rolled back?); if "
            f"the store was restored on purpose, remove {record_path(root, domain)}"
        )


def remember(root: str, domain: str, generation: int, domain_id: str) -> bool:
    """Record *generation* if it is newer than the record (or there is none); True if written."""
    seen = load(root, domain)
    if seen is not None and generation <= seen.generation:
        return False
    record = {"domain": domain, "domain_id": domain_id, "generation": generation, "root": root}
    data = (json.dumps(record, sort_keys=True, indent=2) + "\n").encode()
    atomicfile.replace(record_path(root, domain), data, mode=0o644)
    return True
