"""The store: a directory of immutable, signed or content-addressed documents.

Layout (docs/operators.md describes it for operators)::

    STORE/store.json                          what the store pins: genesis and its successor
    STORE/hsms/<hsm-id>.json                  HSM records (self-signed)
    STORE/operators/<name>.json               operator records (self-signed)
    STORE/trusts/<trust-id>.json              Trust payloads (content-addressed)
    STORE/approvals/<trust-id>/<key-id>.json  one operator approval each
    STORE/seals/<trust-id>/<hsm-id>.json      HSM seals
    STORE/domains/<domain-id>.json            sealed Domains (content-addressed)
    STORE/private/                            secrets of this machine, mode 0700, never synced:
                                              SoftHSM config, tokens, PINs, HSM access, key files,
                                              its own pins (anchor.json) and the head of its
                                              line of Trusts (head.json)

Everything outside ``private/`` is public and verifiable; two copies merge by taking the union.
A document that does not parse, does not match its name, or fails its self-signature is reported
by its full path (the store's directory and the document: several stores may be in use), never
silently used. A store that cannot be written (a read-only mount) serves every read; a write
fails as a StoreError naming the store and what could not be written (:mod:`.writable`).
"""

import contextlib
import fcntl
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kmsfs import atomicfile as atomic
from kmsfs.errors import (
    AlreadyExistsError,
    FormatError,
    IntegrityError,
    KmsfsError,
    NotFoundError,
    StoreError,
    UsageError,
)
from kmsfs.model import fields
from kmsfs.model.canonical import canonical_bytes, parse_json
from kmsfs.model.domain import SealedDomain
from kmsfs.model.records import HsmRecord, OperatorRecord
from kmsfs.model.trust import Signature, Trust
from kmsfs.model.verify import Anchor
from kmsfs.store.writable import require_writable, writing

log = logging.getLogger(__name__)

STORE_FORMAT = 1
HEAD_FORMAT = 1
_WARNED: set[str] = set()
MAX_DOCUMENT_BYTES = 4 << 20
T = TypeVar("T")


class Store:
    """One store directory. Cheap to construct; every read re-reads and re-checks the disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # -- identity ---------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "store.json"

    @property
    def private(self) -> Path:
        return self.root / "private"

    @property
    def own_pins_path(self) -> Path:
        """This store's own copy of its pins, in the private area that is never synced."""
        return self.private / "anchor.json"

    @property
    def head_path(self) -> Path:
        """The head of this store's line of Trusts (:mod:`kmsfs.model.line`), in the private
        area: whoever can write the public documents must not be able to move it."""
        return self.private / "head.json"

    def exists(self) -> bool:
        return self.config_path.exists()

    def make_root(self, parents_mode: int | None = None) -> list[Path]:
        """Make the store's directory for ``init``: an existing empty one, or a new one in an
        existing directory. A missing parent is refused: a mistyped ``--store`` made a store
        wherever it pointed, every missing directory on the way included. The tool's own
        default path (no ``--store``, no ``KMSFS_STORE``) is no typo: *parents_mode* given,
        its missing parents are made with that mode (a new user has no ~/.local/share/kmsfs,
        and the first ``kmsfs-admin init`` failed on it; review). Returns the directories it
        made, deepest last, for an init that fails to take away again."""
        parent = self.root.absolute().parent
        made: list[Path] = []
        if not parent.is_dir() and parents_mode is not None:
            missing = [p for p in (parent, *parent.parents) if not p.exists()]
            try:
                with writing(parent, "the store's parent directory"):
                    for directory in reversed(missing):
                        directory.mkdir(mode=parents_mode)
                        made.append(directory)
                        os.chmod(directory, parents_mode)  # whatever the umask
            except BaseException:
                for directory in reversed(made):
                    with contextlib.suppress(OSError):
                        directory.rmdir()
                raise
        if not parent.is_dir():
            raise NotFoundError(
                f"{parent}: no such directory, so no store can be made at {self.root} "
                "(check --store or KMSFS_STORE; make the directory first if it is right)"
            )
        with writing(self.root, "the store directory"):
            self.root.mkdir(exist_ok=True)
            os.chmod(self.root, 0o755)
        return made

    def require_writable(self, what: str) -> None:
        """StoreError (exit 6) unless *what* could be written into this store. For commands
        that record something (an approval, a seal, a Domain): call it before a PIN is asked
        for or used, so a read-only store refuses before any token signs."""
        require_writable(self.root, what)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the store's lock (flock on STORE/.lock) for a check-then-write sequence.

        Documents are immutable and published atomically, so plain writes need no lock. But
        "no successor is pinned yet, seal this one, pin it" and "no Domain has this name yet,
        create it" are decisions on what is *absent*: two agents' threads or two kmsfs-admin
        processes would both decide yes. flock excludes other open file descriptions, so it
        serializes threads of one process as well as processes.
        """
        try:
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"{self.root}: cannot lock the store: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def anchor(self) -> Anchor:
        """What this store pins: its genesis and, once sealed here, the genesis's successor.

        store.json sits among the documents, which are synced; a plain ``rsync -a`` or ``git
        pull`` of another store replaced it, and with it the root every chain is verified back
        to: another store's Domains then verified here and this store's own did not (review).
        So the pins are also kept in the private area, which is never synced, and that copy is
        the one that counts: a store.json that differs from it is named in a warning and
        otherwise ignored. A store without a private area (a copy kept only to verify) has
        store.json alone. A store made before kmsfs kept that copy gets it at its first use."""
        if not self.exists():
            raise StoreError(
                f"{self.root} is not a kmsfs store (no store.json); run kmsfs-admin init"
            )
        own = self._own_anchor()
        if own is None:
            public = self._read(self.config_path, _parse_anchor)  # errors name store.json
            if self.private.is_dir() and os.access(self.private, os.W_OK | os.X_OK):
                with contextlib.suppress(KmsfsError):  # first use since the copy is kept
                    self._write_own_pins(_anchor_bytes(public))
            return public
        try:
            public = self._read(self.config_path, _parse_anchor)
        except KmsfsError as exc:  # damaged by a sync: the own copy serves all the same
            self._warn_once(f"{exc}: ignored, this store's own pins ({self.own_pins_path}) "
                            f"serve; put it back with: {self._put_back()}")
            return own
        if own != public:
            newer = own.root == public.root and own.successor is None and public.successor
            self._warn_once(
                f"{self.config_path} pins {_describe(public)}, not this store's own pins "
                f"({self.own_pins_path}: {_describe(own)}): a copy or sync replaced it, and it "
                "is ignored; "
                + (f"if that successor is this store's, pin it with 'kmsfs-admin trust pin "
                   f"{public.successor}'; otherwise " if newer else "")
                + f"put it back with: {self._put_back()}"
            )
        return own

    def head(self) -> str | None:
        """The Trust this store pins as the head of its line (kmsfs.service.trusts.line); None
        where there is none this process can read (a store made before heads were kept, or
        whose line forked before it kept one; a copy without a private area; a user who may
        read the documents but not the private area). A damaged file is a FormatError naming
        it: ignoring it would undo the pin."""
        found = self._head_record()
        return None if found is None else found[0]

    def decided(self) -> str | None:
        """The newest Trust of this store's line that its operators chose themselves (sealed in
        this store, named to ``trust pin``, or the genesis at ``init``): the head may have
        moved past it by itself (:func:`kmsfs.service.trusts.resolve_line`), and only up to
        it does the store's line decide a fork. None where there is no head file."""
        found = self._head_record()
        return None if found is None else found[1]

    def _head_record(self) -> tuple[str, str] | None:
        """(head, decided) from the head file; None as for :meth:`head`."""
        return self._read_private(self.head_path, _parse_head)

    def set_head(
        self, head: str, expect: str | None, *, decided: str | None = None, required: bool = False
    ) -> bool:
        """Make *head* this store's head if the head on disk is still *expect* (what the
        caller decided from: two processes moving it at once must not move it back); True
        if written. *decided* (:meth:`decided`): the Trust the operators chose, if this move
        is theirs; None keeps the one on disk (a head that moved by itself), or takes *head*
        where there is none. Where the private area cannot be written (a read-only copy,
        another user's store) nothing is written and False returned, unless *required*
        (``trust pin``: a StoreError then, as for its other pin)."""
        if not self.private.is_dir() or not os.access(self.private, os.W_OK | os.X_OK):
            if required:
                raise StoreError(
                    f"{self.head_path}: cannot write the head of the store's line of Trusts: "
                    "its private area is missing or not writable by this user"
                )
            return False
        with writing(self.head_path, "the head of the store's line of Trusts"):
            # Its own lock file, not the store's lock (callers may hold that one), and a
            # regular file opened for writing (flock on NFS is a POSIX lock, which needs one).
            lock = self.head_path.with_name("head.json.lock")
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                self._owned_by_private(lock)
                fcntl.flock(fd, fcntl.LOCK_EX)
                if self.head() != expect:
                    return False
                if decided is None:
                    decided = self.decided() or head
                data = _document_bytes(
                    {"_type": "head", "format": HEAD_FORMAT, "head": head, "decided": decided}
                )
                atomic.replace(self.head_path, data, mode=0o600)
                self._owned_by_private(self.head_path)
            finally:
                os.close(fd)
        return True

    def _owned_by_private(self, path: Path) -> None:
        """*path*, in the private area, owned by whoever owns the area: root reading or
        pinning a user's store made it root's, and the user's own commands then failed on it."""
        owner = os.stat(self.private)
        if os.geteuid() == 0 and owner.st_uid != 0:
            os.chown(path, owner.st_uid, owner.st_gid)

    def _own_anchor(self) -> Anchor | None:
        """The store's own copy of its pins; None where there is none this process can read
        (a store made before it was kept, a copy without a private area, a user who may read
        the store's documents but not its private area)."""
        return self._read_private(self.own_pins_path, _parse_anchor)

    def _read_private(self, path: Path, parse: Callable[[Any], T]) -> T | None:
        """A file of the private area, parsed; None where there is none, or none this process
        may read (another user than the area's owner, who may still read the documents). A
        damaged file is a FormatError naming it: ignoring it would undo what it pins."""
        try:
            return self._read(path, parse)
        except NotFoundError:
            return None
        except StoreError:
            if not os.access(self.private, os.R_OK | os.X_OK) or not os.access(path, os.R_OK):
                return None
            raise

    def _put_back(self) -> str:
        return f"install -m 0644 {self.own_pins_path} {self.config_path}"

    def _warn_once(self, message: str) -> None:
        """Each warning about store.json once per process: a listing reads the pins once per
        Domain, and an agent or a mount reads them for as long as it runs."""
        if message not in _WARNED:
            _WARNED.add(message)
            log.warning("%s", message)

    def pinned_root(self) -> str:
        return self.anchor().root

    def write_config(self, anchor: Anchor, *, new: bool = False) -> None:
        """Write the pins: store.json and the store's own copy in the private area (where there
        is one). At init the own copy comes first, since store.json comes last (no store.json,
        no store); when pinning store.json comes first, so that a pin whose write failed (the
        command exits 6) is not in effect: the own copy is what counts."""
        data = _anchor_bytes(anchor)
        own = self.private.is_dir()
        if new and own:
            self._write_own_pins(data)
        with writing(self.config_path, "the store's pins"):
            if new:
                atomic.write_new(self.config_path, data)
            else:
                atomic.replace(self.config_path, data)
        if own and not new:
            self._write_own_pins(data)

    def _write_own_pins(self, data: bytes) -> None:
        """Write the own copy, owned by whoever owns the private area: root reading or pinning
        a user's store made it root's, and the user's own commands then failed on it."""
        with writing(self.own_pins_path, "the store's own pins"):
            atomic.replace(self.own_pins_path, data, mode=0o600)
            self._owned_by_private(self.own_pins_path)

    # -- generic I/O ------------------------------------------------------------------------

    def _read(self, path: Path, parse: Callable[[Any], T]) -> T:
        """Read and parse one document; any problem is reported with the document's full path
        (a path relative to the store did not say which store)."""
        where = str(path)
        try:
            data = atomic.read_regular(path, MAX_DOCUMENT_BYTES + 1)
        except FileNotFoundError:
            raise NotFoundError(f"{where}: no such document") from None
        except OSError as exc:
            raise StoreError(f"{where}: {exc.strerror}") from exc
        if len(data) > MAX_DOCUMENT_BYTES:
            raise FormatError(f"{where}: document larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return parse(parse_json(data))
        except KmsfsError as exc:
            raise type(exc)(f"{where}: {exc}") from exc

    def _read_named(
        self, path: Path, from_dict: Callable[[Any], T], name_of: Callable[[T], str], want: str
    ) -> T:
        """Read a document whose file name is its id (or name): the two must agree, so a
        document changed or moved after it was written is caught here, by path."""

        def parse(raw: Any) -> T:
            document = from_dict(raw)
            if name_of(document) != want:
                raise IntegrityError("content does not match its name (changed after writing?)")
            return document

        return self._read(path, parse)

    def _write(self, path: Path, document: dict[str, Any]) -> bool:
        data = _document_bytes(document)
        if len(data) > MAX_DOCUMENT_BYTES:  # never write what this store would refuse to read
            raise FormatError(
                f"{path}: document of {len(data)} bytes, the limit is {MAX_DOCUMENT_BYTES}"
            )
        self._refuse_links_on_the_way(path.parent)
        with writing(path, "the document"):
            written = atomic.write_new(path, data)
        log.debug("%s %s", "wrote" if written else "already there:", path)
        return written

    def _refuse_links_on_the_way(self, directory: Path) -> None:
        """Documents go into the store's own directories only. A directory of a synced
        replica that is a symbolic link (``rsync -a`` copies them) took ``trust sign``'s
        approval wherever it pointed, written as root (review)."""
        here = self.root
        for part in directory.relative_to(self.root).parts:
            here = here / part
            try:
                is_link = stat.S_ISLNK(os.lstat(here).st_mode)
            except FileNotFoundError:
                return  # made by the write, as a directory
            if is_link:
                raise StoreError(
                    f"{here}: a symbolic link inside the store, where a directory of its own "
                    "belongs; remove it"
                )

    @staticmethod
    def _names(directory: Path, suffix: str = ".json") -> Iterator[str]:
        try:
            entries = sorted(os.listdir(directory))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"{directory}: {exc.strerror}") from exc
        for entry in entries:
            if entry.endswith(suffix) and not entry.startswith("."):
                yield entry[: -len(suffix)]

    # -- HSMs and operators -----------------------------------------------------------------

    def save_hsm(self, record: HsmRecord) -> None:
        self._write(self.root / "hsms" / f"{record.id}.json", record.to_dict())

    def hsm(self, hsm_id: str) -> HsmRecord:
        path = self.root / "hsms" / f"{hsm_id}.json"
        return self._read_named(path, HsmRecord.from_dict, lambda r: r.id, hsm_id)

    def hsm_ids(self) -> list[str]:
        return list(self._names(self.root / "hsms"))

    def save_operator(self, record: OperatorRecord) -> None:
        self._write(self.root / "operators" / f"{record.name}.json", record.to_dict())

    def operator(self, name: str) -> OperatorRecord:
        path = self.root / "operators" / f"{name}.json"
        try:
            return self._read_named(path, OperatorRecord.from_dict, lambda r: r.name, name)
        except NotFoundError:
            raise NotFoundError(f"no operator named {name!r} in {self.root}") from None

    def operator_names(self) -> list[str]:
        return list(self._names(self.root / "operators"))

    # -- Trusts ----------------------------------------------------------------------------

    def save_trust(self, trust: Trust) -> bool:
        """Write ``trust``; False if a document of its id was already there (the same one)."""
        return self._write(self.root / "trusts" / f"{trust.id}.json", trust.payload())

    def trust(self, trust_id: str) -> Trust:
        path = self.root / "trusts" / f"{trust_id}.json"
        return self._read_named(path, Trust.from_dict, lambda t: t.id, trust_id)

    def trust_ids(self) -> list[str]:
        return list(self._names(self.root / "trusts"))

    def save_signature(
        self, kind: str, signature: Signature, valid: Callable[[Signature], bool] | None = None
    ) -> bool:
        """Write an approval or seal at its signer's name; True if written.

        With ``valid`` (the caller's check of a signature by this signer): another document
        already at that name which ``valid`` accepts is kept (RSA-PSS signatures differ at each
        signing), and one it refuses, or that does not parse, is replaced. Signatures are
        named by their signer, so a bad one a replica planted at the name first kept the real
        one out: an operator's token signed and the approval was lost, a revocation's seal
        could never be written (review)."""
        folder = {"approval": "approvals", "seal": "seals"}[kind]
        path = self.root / folder / signature.subject / f"{signature.key_id}.json"
        self._clear_planted_slot(path, kind)
        try:
            return self._write(path, signature.to_dict(kind))
        except AlreadyExistsError:
            if valid is None:
                raise
        try:
            there = self._read(path, lambda raw: Signature.from_dict(raw, kind))
            keep = there.subject == signature.subject and there.key_id == signature.key_id and (
                valid(there))
        except KmsfsError:
            keep = False
        if keep:
            return False
        log.warning("%s: a %s that does not verify was there (planted?): replaced", path, kind)
        with writing(path, "the document"):
            atomic.replace(path, _document_bytes(signature.to_dict(kind)))
        return True

    def _clear_planted_slot(self, path: Path, kind: str) -> None:
        """Remove what a sync planted where signature *path* or its folder (``approvals/<id>``,
        ``seals/<id>``) belongs: anything but a directory there, anything but a regular file
        here (a FIFO, a symbolic link, a directory; an empty one, else refused naming it). It
        is no signature, and it made ``trust sign`` and ``trust seal`` fail after the token or
        HSM had signed, so that a revocation could never be sealed in that store (review).
        Nothing is followed: a link is removed, never written through."""
        for place, belongs in ((path.parent, stat.S_ISDIR), (path, stat.S_ISREG)):
            try:
                mode = os.lstat(place).st_mode
            except FileNotFoundError:
                continue
            if belongs(mode):
                continue
            what, a_kind = atomic.kind_of(mode), _with_article(kind)
            with writing(place, f"{what} planted where {a_kind} belongs"):
                if stat.S_ISDIR(mode):
                    try:
                        os.rmdir(place)
                    except OSError:
                        raise StoreError(
                            f"{place}: a directory where {a_kind} belongs, and not empty; "
                            "remove it"
                        ) from None
                else:
                    os.unlink(place)
            log.warning("%s: %s where %s belongs (planted?): removed", place, what, a_kind)

    def signatures(self, kind: str, subject: str) -> list[Signature]:
        """Every approval or seal stored for ``subject`` that parses as one.

        One that does not (not JSON, another document, a FIFO or link where a file belongs,
        content that does not match its name) is left out with a warning naming it: it cannot
        be a valid signature, so counting a quorum without it loses nothing, while an error
        let whoever can write the store (a replica's sync) stop every command that reads the
        Trust by planting one (review). Signatures that parse but do not verify are left out
        by the quorum count itself."""
        folder = self.root / {"approval": "approvals", "seal": "seals"}[kind] / subject
        result: list[Signature] = []
        with contextlib.suppress(FileNotFoundError):
            mode = os.lstat(folder).st_mode
            if not stat.S_ISDIR(mode):  # a link is not followed: as planted files, below
                self._warn_once(f"{folder}: {atomic.kind_of(mode)} where a directory of "
                                f"{kind}s belongs; left out: remove it")
                return result
        for key_id in self._names(folder):

            def parse(raw: Any, key_id: str = key_id) -> Signature:
                signature = Signature.from_dict(raw, kind)
                if signature.key_id != key_id or signature.subject != subject:
                    raise IntegrityError("content does not match its name")
                return signature

            try:
                result.append(self._read(folder / f"{key_id}.json", parse))
            except (FormatError, IntegrityError) as exc:
                self._warn_once(f"{exc}; left out: it cannot be {_with_article(kind)}")
        return result

    # -- Domains ---------------------------------------------------------------------------

    def save_domain(self, sealed: SealedDomain) -> None:
        self._write(self.root / "domains" / f"{sealed.id}.json", sealed.to_dict())

    def domain(self, domain_id: str) -> SealedDomain:
        path = self.root / "domains" / f"{domain_id}.json"
        return self._read_named(path, SealedDomain.from_dict, lambda d: d.id, domain_id)

    def domain_ids(self) -> list[str]:
        return list(self._names(self.root / "domains"))

    # -- prefixes --------------------------------------------------------------------------

    def resolve(self, kind: str, ref: str, ids: list[str]) -> str:
        """Expand a unique prefix (at least 4 hex digits) of an id, as git does.

        Ids are hex, so the prefix is matched in lower case; errors quote ``ref`` as typed
        (``--hsm HSM1`` was reported as "no HSM 'hsm1'", the name that does exist)."""
        typed = ref.strip()
        prefix = typed.lower()
        if kind == "HSM" and not all(c in "0123456789abcdef" for c in prefix):
            # Not an id, so a label (tried first, kmsfs.service.hsms) that is not there:
            # "hs1" was a usage error and "hsm9" a missing one, both typed as labels (review).
            raise NotFoundError(
                f"no {kind} {typed!r} in {self.root}{self._case_hint(kind, typed)}"
            )
        if len(prefix) < 4:
            # A bad argument (exit 2), not a document the store lacks (exit 6): no id that
            # short is looked up, so nothing can be missing yet.
            raise UsageError(
                f"{kind} id {typed!r}: give at least 4 hex digits{self._case_hint(kind, typed)}"
            )
        matches = [i for i in ids if i.startswith(prefix)]
        if not matches:
            raise NotFoundError(f"no {kind} {typed!r} in {self.root}{self._case_hint(kind, typed)}")
        if len(matches) > 1:
            raise NotFoundError(
                f"{kind} {typed!r} is ambiguous ({len(matches)} match); give more digits"
            )
        return matches[0]

    def _case_hint(self, kind: str, typed: str) -> str:
        """For an HSM (named by label before an id is tried, kmsfs.service.hsms): the labels
        that differ from ``typed`` only in case, as a hint. Not a match: labels are compared
        exactly (``hsm create`` lets hsm1 and HSM1 both exist), so taking one would make a
        name mean two HSMs."""
        if kind != "HSM":
            return ""
        near = []
        for hsm_id in self.hsm_ids():
            with contextlib.suppress(KmsfsError):  # a damaged record: reported where used
                label = self.hsm(hsm_id).label
                if label.lower() == typed.lower() and label != typed:
                    near.append(label)
        if not near:
            return ""
        return f" (names are case-sensitive; did you mean {' or '.join(sorted(near))}?)"


def _document_bytes(document: dict[str, Any]) -> bytes:
    """A document as the store writes it: its canonical JSON and a newline."""
    return canonical_bytes(document) + b"\n"


def _anchor_bytes(anchor: Anchor) -> bytes:
    return _document_bytes({"_type": "store", "format": STORE_FORMAT, "root": anchor.root,
                            "successor": anchor.successor})


def _describe(anchor: Anchor) -> str:
    successor = anchor.successor[:12] if anchor.successor else "none"
    return f"root {anchor.root[:12]}, successor {successor}"


def _parse_anchor(raw: Any) -> Anchor:
    data = fields.obj(raw, "store")
    fields.type_and_format(data, "store", STORE_FORMAT)
    fields.exact_keys(data, {"_type", "format", "root", "successor"}, "store")
    successor = data["successor"]
    if successor is not None:
        successor = fields.hex_id(successor, "store.successor")
    return Anchor(fields.hex_id(data["root"], "store.root"), successor)


def _parse_head(raw: Any) -> tuple[str, str]:
    data = fields.obj(raw, "head")
    fields.type_and_format(data, "head", HEAD_FORMAT)
    fields.exact_keys(data, {"_type", "format", "head", "decided"}, "head")
    return fields.hex_id(data["head"], "head.head"), fields.hex_id(data["decided"], "head.decided")


def _with_article(kind: str) -> str:
    """"an approval", "a seal"."""
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
