"""What this machine has mounted: the newest generation of each Domain, kept outside the store
and the volume, so that rolling both back is refused (docs/threat-model.md §2).

A store writer can hide a Domain's newer generations, and the volume's own copy
(``kmsfs.conf``, kept current by every read-write mount) stops that only while nobody writes
the ciphertext directory too. This record is the client's, like TUF's trusted metadata: a
mount refuses a Domain older than the one this machine (or this user) last mounted, with one
line that names the record, which an operator who restored the store on purpose removes.

One small JSON file per Domain under :func:`state_dir`, named by a hash of the store's root
Trust id and the Domain name (two stores may each have a Domain ``payroll``)::

    {"domain": "payroll", "domain_id": "<id>", "generation": 3, "root": "<root trust id>",
     "trust": "<id of the Trust that governs that generation>"}

Refused, besides an older generation: the same generation with another id (a rival), and a
Domain whose Trust chain does not hold the recorded Trust. A Trust that removed an HSM is a
successor of the one before; an HSM it removed can still seal a Domain under that older Trust,
with any generation number it likes, so a number alone is not enough: the newest Trust this
machine used must be on the chain of what it is offered.

Written atomically; it holds nothing secret (ids and a number).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsfs import atomicfile
from kmsfs.errors import FormatError, IntegrityError

STATE_ENV = "KMSFS_STATE_DIR"
SYSTEM_STATE_DIR = Path("/var/lib/kmsfs/state")
MAX_RECORD_SIZE = 4096

log = logging.getLogger(__name__)


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
    trust: str


#: The state directory's subdirectory of these records (one per Domain of a store).
RECORDS = "domains"


def record_path(root: str, domain: str) -> Path:
    key = hashlib.sha256(root.encode() + b"\0" + domain.encode()).hexdigest()[:32]
    return state_dir() / RECORDS / f"{key}.json"


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in one record file of the state directory (this module's, or
    :mod:`kmsfs.fs.volumepin`'s); None if there is no such file, and an empty dict for one
    that is not a JSON object of at most MAX_RECORD_SIZE bytes (the caller says what it should
    have held). FormatError, naming the file, if it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_SIZE + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        doc = json.loads(data) if len(data) <= MAX_RECORD_SIZE else None
    except (ValueError, RecursionError):  # RecursionError: [[[[... nested past the parser
        return {}
    return doc if isinstance(doc, dict) else {}


def write_record(path: Path, record: dict[str, object]) -> None:
    """Write one record atomically (temporary file, fsync, rename), readable by all: it holds
    nothing secret. Call :func:`close_to_others` first."""
    data = (json.dumps(record, sort_keys=True, indent=2) + "\n").encode()
    atomicfile.replace(path, data, mode=0o644)


def load(root: str, domain: str) -> Seen | None:
    """The record of *domain* of the store with root Trust *root*, or None if there is none.
    FormatError (naming the file) for one that is damaged or names another Domain."""
    path = record_path(root, domain)
    doc = read_record(path)
    if doc is None:
        return None
    try:
        seen = Seen(doc["domain"], doc["root"], doc["generation"], doc["domain_id"], doc["trust"])
        valid = (
            isinstance(seen.generation, int)
            and not isinstance(seen.generation, bool)
            and seen.generation >= 1
            and isinstance(seen.domain_id, str)
            and isinstance(seen.trust, str)
            and (seen.domain, seen.root) == (domain, root)
        )
    except (TypeError, KeyError):
        valid = False
    if not valid:
        raise FormatError(f"{path}: not a record of Domain {domain}'s newest generation; remove it")
    return seen


@dataclass(frozen=True)
class Offered:
    """What a verifier is about to use: a Domain generation and its verified Trust chain."""

    root: str
    domain: str
    generation: int
    domain_id: str
    chain: tuple[str, ...]  # Trust ids, root first; the last governs the Domain

    @property
    def trust(self) -> str:
        return self.chain[-1]


def check(offered: Offered) -> None:
    """IntegrityError unless *offered* is at least the newest generation mounted here and
    comes from it: not older, not a rival of the same number, and under the Trust recorded
    or one descending from it."""
    seen = load(offered.root, offered.domain)
    if seen is None:
        return
    where = record_path(offered.root, offered.domain)
    name = offered.domain
    if offered.generation < seen.generation:
        raise IntegrityError(
            f"Domain {name}: this machine has mounted its generation {seen.generation}, but "
            f"only generation {offered.generation} is offered (by the store, and the volume's "
            f"copy if a volume is used: rolled back?); if the store was restored on purpose, "
            f"remove {where}"
        )
    if offered.generation == seen.generation and offered.domain_id != seen.domain_id:
        raise IntegrityError(
            f"Domain {name}: generation {offered.generation} offered is {offered.domain_id[:12]}, "
            f"but this machine mounted {seen.domain_id[:12]} as that generation (a rival "
            f"generation?); if the store was restored on purpose, remove {where}"
        )
    if seen.trust not in offered.chain:
        raise IntegrityError(
            f"Domain {name}: generation {offered.generation} is governed by Trust "
            f"{offered.trust[:12]}, which does not descend from Trust {seen.trust[:12]} this "
            f"machine last used (sealed by an HSM that Trust removed?); if the store was "
            f"restored on purpose, remove {where}"
        )


def remember(offered: Offered) -> bool:
    """Record *offered* if it is newer than the record (or there is none); True if written.
    Call it only with what :func:`check` accepted. Every call first closes this user's state
    directories to others (:func:`close_to_others`), and refuses to write through a state
    directory that others may change."""
    close_to_others(RECORDS)
    seen = load(offered.root, offered.domain)
    if seen is not None and offered.generation <= seen.generation:
        return False
    write_record(record_path(offered.root, offered.domain), {
        "domain": offered.domain,
        "domain_id": offered.domain_id,
        "generation": offered.generation,
        "root": offered.root,
        "trust": offered.trust,
    })
    return True


def close_to_others(records: str) -> None:
    """Take write permission for others off this user's state directories, top down (for
    the system one, /var/lib/kmsfs above it too), down to its subdirectory *records* (this
    module's ``domains``, :mod:`kmsfs.fs.volumepin`'s ``volumes``): whoever may write there
    may remove a record, and with it the refusal of a rolled-back Domain or of a volume
    pointed at another Domain. Mounts of earlier versions made them 0777
    (:func:`kmsfs.atomicfile.make_parents`).

    Below the state directory (which may itself be a symlink: the state kept elsewhere),
    each directory is opened without following a symlink, through its parent's descriptor,
    and changed through its own: a directory that others could still swap (for a symlink to
    a file of root's, say) is never reached by path. IntegrityError, before anything is
    written, for a symlink below the state directory or a directory others may write that is
    not this user's to close."""
    top = state_dir()
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    if top == SYSTEM_STATE_DIR:  # /var/lib/kmsfs first: it holds the state directory's name
        _close_one(top.parent, flags & ~os.O_NOFOLLOW)
    parent: int | None = None
    try:
        for directory in (top, top / records):
            try:
                if parent is None:  # the top may be a symlink (the state kept elsewhere)
                    fd = os.open(directory, flags & ~os.O_NOFOLLOW)
                else:
                    fd = os.open(directory.name, flags, dir_fd=parent)
            except FileNotFoundError:
                return  # made later, 0755 (atomicfile.make_parents)
            except OSError as exc:  # ELOOP, ENOTDIR: a symlink or a file in its place
                raise IntegrityError(
                    f"{directory}: not a directory of its own ({exc.strerror}); this machine's "
                    "record of the Domains it mounted is not written through it"
                ) from None
            if parent is not None:
                os.close(parent)
            parent = fd
            _close_fd(fd, directory)
    finally:
        if parent is not None:
            os.close(parent)


def _close_one(directory: Path, flags: int) -> None:
    """:func:`_close_fd` on *directory*, if it exists."""
    try:
        fd = os.open(directory, flags)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise IntegrityError(f"{directory}: not a directory ({exc.strerror})") from None
    try:
        _close_fd(fd, directory)
    finally:
        os.close(fd)


def _close_fd(fd: int, directory: Path) -> None:
    """Take write permission for others off the directory open as *fd*, which must be this
    user's: IntegrityError if it is another's, whatever its mode (its owner may remove records
    there, or make it writable again: a local user who made ``volumes/`` in a state directory
    an earlier version had left 0777 kept it)."""
    st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid():
        raise IntegrityError(
            f"{directory}: owned by uid {st.st_uid}, not by this user ({os.geteuid()}), who "
            "could remove this machine's records of what it mounted; remove it, or give it to "
            "this user (chown)"
        )
    if not mode & 0o022:
        return
    if st.st_uid != os.geteuid():
        raise IntegrityError(
            f"{directory}: writable by other users and owned by uid {st.st_uid}, so anyone "
            "could remove this machine's record of the Domains it mounted; make it writable by "
            "its owner only (chmod go-w)"
        )
    os.fchmod(fd, mode & ~0o022)
    log.warning("%s was writable by other users (mode %04o); now %04o",
                directory, mode, mode & ~0o022)
