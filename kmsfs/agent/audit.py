"""The HSM agent's audit log: every request, hash-chained, with checkpoints signed by an HSM.

Layout (docs/format.md, "Agent audit log"): one canonical-JSON object per line, ``\\n``-ended::

    {"seq":N,"prev":H,"time":T,"type":"event","who":..,"op":..,"domain":..|null,
     "decision":"allowed"|"refused","reason":..[,"detail":{..}]}
    {"seq":N,"prev":H,"time":T,"type":"checkpoint","hsm":ID,"signature":B64}

``prev`` is the hex SHA-256 of the previous line without its newline (64 zeros for seq 0), so a
record that is changed, removed, repeated or moved breaks the link of the record after it. The
chain alone can be rebuilt by whoever can write the file; a checkpoint's HSM signature over
``AGENT_AUDIT_CHECKPOINT || canonical(checkpoint without hsm and signature)`` covers its
``prev``, hence everything before it, and only an HSM of the store can make one. What the file
alone cannot show is a cut after the last checkpoint: the verifier reports that unsigned tail.

``hsm`` is not signed because the signer picks whichever HSM answers and only then says which
it was; it is a hint of which key to try, and a signature verifies under one key only.
"""

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kmsfs import atomicfile
from kmsfs.errors import FormatError, IntegrityError, KmsfsError
from kmsfs.model import contexts, fields
from kmsfs.model.canonical import b64decode, b64encode, canonical_bytes, parse_json
from kmsfs.model.publickeys import PublicKey

log = logging.getLogger(__name__)

Signer = Callable[[bytes], tuple[str, bytes]]
"""message -> (hsm id, signature): the agent signs with an HSM's key via HsmSession.sign."""

GENESIS_PREV = "0" * 64
EVENT = "event"
CHECKPOINT = "checkpoint"
DECISIONS = ("allowed", "refused")
_COMMON = frozenset({"seq", "prev", "time", "type"})
EVENT_KEYS = _COMMON | {"who", "op", "domain", "decision", "reason"}
CHECKPOINT_KEYS = _COMMON | {"hsm", "signature"}
UNSIGNED_KEYS = frozenset({"hsm", "signature"})
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_TIME_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
MAX_PROBLEMS = 100
LOG_MODE = 0o600  # who used which Domain is nobody else's business

_clock = time.monotonic  # module-level so tests can move time without sleeping


def line_hash(body: bytes) -> str:
    """The ``prev`` of the record after the line ``body`` (without its newline)."""
    return hashlib.sha256(body).hexdigest()


def signed_message(record: Mapping[str, Any]) -> bytes:
    """The exact bytes an HSM signs for a checkpoint."""
    payload = {k: v for k, v in record.items() if k not in UNSIGNED_KEYS}
    return contexts.message(contexts.AGENT_AUDIT_CHECKPOINT, canonical_bytes(payload))


def check_record(value: Any) -> dict[str, Any]:
    """Check one parsed record's fields and types; FormatError names the field."""
    data = fields.obj(value, "record")
    kind = data.get("type")
    if kind == EVENT:
        keys = EVENT_KEYS | ({"detail"} if "detail" in data else set())
    elif kind == CHECKPOINT:
        keys = CHECKPOINT_KEYS
    else:
        raise FormatError(f"record: field 'type': want event or checkpoint, have {kind!r:.30}")
    fields.exact_keys(data, set(keys), kind)
    if fields.integer(data, "seq", kind) < 0:
        raise FormatError(f"{kind}: field 'seq': want >= 0, have {data['seq']}")
    fields.hex_id(data["prev"], f"{kind}: field 'prev'")
    stamp = fields.string(data, "time", kind)
    try:
        if not _TIME_PATTERN.fullmatch(stamp):
            raise ValueError
        datetime.strptime(stamp, TIME_FORMAT)
    except ValueError:
        raise FormatError(
            f"{kind}: field 'time': want UTC YYYY-MM-DDTHH:MM:SSZ, have {stamp!r:.40}"
        ) from None
    if kind == CHECKPOINT:
        fields.hex_id(data["hsm"], "checkpoint: field 'hsm'")
        b64decode(data["signature"], "checkpoint: field 'signature'")
        return data
    for key in ("who", "op", "reason"):
        fields.string(data, key, kind)
    if data["domain"] is not None:
        fields.string(data, "domain", kind)
    if not isinstance(data["decision"], str) or data["decision"] not in DECISIONS:
        raise FormatError(
            f"event: field 'decision': want allowed or refused, have {data['decision']!r:.30}"
        )
    if "detail" in data:
        fields.obj(data["detail"], "event: field 'detail'")
    return data


@dataclass(frozen=True)
class AuditReport:
    """What :func:`verify_log` found. ``records`` counts every line, checkpoints included;
    ``checkpoints`` counts the valid ones; ``unsigned_tail`` is the records after the last."""

    records: int
    checkpoints: int
    last_signed_seq: int | None
    unsigned_tail: int
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "last_signed_seq": self.last_signed_seq,
            "unsigned_tail": self.unsigned_tail,
            "problems": list(self.problems),
        }


@dataclass
class _Walk:
    """Walks the lines of a log in order, checking each against the one before. Pure: lines
    in, findings out. With ``hsms`` (the verifier, and the writer as ``kmsfs-hsmd`` starts it)
    it checks checkpoint signatures too; without (a writer given no keys) only the chain and
    the form of checkpoints."""

    hsms: Mapping[str, PublicKey] | None
    records: int = 0
    checkpoints: int = 0
    last_signed_seq: int | None = None
    unsigned_tail: int = 0
    problems: list[str] = field(default_factory=list)
    omitted: int = 0
    next_seq: int = 0
    prev: str = GENESIS_PREV

    def feed(self, raw: bytes) -> None:
        index = self.records
        self.records += 1
        self.unsigned_tail += 1
        body = raw.removesuffix(b"\n")
        issues = [] if raw.endswith(b"\n") else ["no newline at the end (a torn write or a cut)"]
        record: dict[str, Any] | None = None
        try:
            value = parse_json(body)
            record = check_record(value)
            if canonical_bytes(value) != body:  # one spelling, so a record has one hash
                issues.append("not in canonical form")
        except KmsfsError as exc:
            issues.append(str(exc))
            self.next_seq += 1
        if record is not None:
            issues += self._link(index, record)
            if record["type"] == CHECKPOINT and self.hsms is not None:
                issues += self._signature(record)
        if issues:
            self._problem(f"record {index} (line {index + 1}): {'; '.join(issues)}")
        elif record is not None and record["type"] == CHECKPOINT:
            self.checkpoints += 1
            self.last_signed_seq = record["seq"]
            self.unsigned_tail = 0
        self.prev = line_hash(body)

    def _link(self, index: int, record: dict[str, Any]) -> list[str]:
        issues = []
        seq, want = record["seq"], self.next_seq
        if seq > want:
            issues.append(f"seq {seq}, want {want}: {seq - want} record(s) missing before it")
        elif seq < want:
            issues.append(f"seq {seq}, want {want}: a repeated or reordered record")
        if record["prev"] != self.prev:
            if index == 0:
                issues.append(
                    "prev of the first record is not 64 zeros (records cut from the start?)"
                )
            else:
                issues.append(
                    f"prev is not the hash of record {index - 1}: record {index - 1} "
                    "was changed, or records were removed or reordered"
                )
        self.next_seq = seq + 1
        return issues

    def _signature(self, record: dict[str, Any]) -> list[str]:
        assert self.hsms is not None
        hsm = record["hsm"]
        key = self.hsms.get(hsm)
        if key is None:
            return [
                f"checkpoint signed by HSM {hsm[:12]}, which is in no trust of the store that "
                "verifies"
            ]
        try:
            key.verify(b64decode(record["signature"], "signature"), signed_message(record))
        except KmsfsError:
            return [
                f"bad checkpoint signature (HSM {hsm[:12]}): this checkpoint or the chain "
                "before it was changed"
            ]
        return []

    def _problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.omitted += 1

    def walk(self, lines: Iterable[bytes]) -> "_Walk":
        for raw in lines:
            self.feed(raw)
        return self

    def report(self) -> AuditReport:
        more = [f"... and {self.omitted} more problems"] if self.omitted else []
        return AuditReport(
            self.records,
            self.checkpoints,
            self.last_signed_seq,
            self.unsigned_tail,
            self.problems + more,
        )


def verify_log(path: Path, hsms: Mapping[str, PublicKey]) -> AuditReport:
    """Check the whole chain and every checkpoint against ``hsms`` (HSM id -> signing key).
    Never raises for what is in the file (only OSError if it cannot be read)."""
    with open(path, "rb") as handle:
        return _Walk(hsms).walk(handle).report()


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line index, record or None, why not) for each line, unverified: for display only."""
    with open(path, "rb") as handle:
        for index, raw in enumerate(handle):
            try:
                yield index, check_record(parse_json(raw.removesuffix(b"\n"))), None
            except KmsfsError as exc:
                yield index, None, str(exc)


def _utc_now() -> str:
    return datetime.now(UTC).strftime(TIME_FORMAT)


class AuditLog:
    """The writer. One per file: an exclusive flock keeps a second agent from forking the
    chain. Appends are serialized by a lock; each is one os.write of a whole line on an
    O_APPEND fd, so a crashed agent leaves whole records (a crash of the machine can still
    tear the last line, and the next start refuses the log until someone looks). Records
    reach the disk at each checkpoint (fsync), not at each append: durability is paid once
    per checkpoint, and kill -9 of the agent loses nothing already written."""

    def __init__(
        self,
        path: Path,
        signer: Signer | None,
        *,
        checkpoint_every: int = 1000,
        checkpoint_seconds: float = 60.0,
        keys: Mapping[str, PublicKey] | None = None,
    ) -> None:
        """*keys*: the store's HSM signing keys, to check the checkpoints already in the log
        before extending it (without them, only the chain and the form are checked)."""
        if checkpoint_every < 1 or not checkpoint_seconds > 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_seconds > 0")
        self.path = Path(path)
        self._signer = signer
        self._every = checkpoint_every
        self._seconds = checkpoint_seconds
        self._lock = threading.Lock()
        self._keys = keys
        self._fd = -1
        walk = self._attach()
        if walk.unsigned_tail and signer is not None:
            with self._lock:
                self._note_adopted(walk)

    def _attach(self) -> "_Walk":
        """Open (or create) the file at ``self.path``, verify what it holds, and continue its
        chain; the fd before (if any) is the caller's to close."""
        fd = self._open()
        self._fd = fd
        try:
            walk = self._scan()
        except BaseException:
            os.close(fd)
            raise
        self._seq, self._prev = walk.next_seq, walk.prev
        self._size = os.fstat(fd).st_size
        self._unsigned = walk.unsigned_tail  # records after the last checkpoint
        self._pending = walk.unsigned_tail  # records since the last checkpoint attempt
        self._last_attempt = _clock()
        return walk

    def reopen(self) -> bool:
        """Continue in a new file if the log was moved aside (log rotation, then SIGHUP).

        The old file gets a checkpoint over its tail and is closed; the file now at ``path``
        (made if missing, or one an operator created empty) is verified and extended as at
        start. Its first record says where it continues from (the old file's last seq and
        head, ``detail``), so an auditor can chain the files; each verifies on its own. False
        (nothing done) if ``path`` is still the open file. If the new file cannot be used
        (unwritable, damaged) the log goes on in the old one and the error is raised.
        """
        with self._lock:
            self._header()  # refuses a closed log
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.stat(self.path), os.fstat(self._fd)):
                    return False
            try:
                self._checkpoint_locked()
            except OSError as exc:
                log.warning("%s: checkpoint not written (%s)", self.path, exc.strerror or exc)
            old = (self._fd, self._seq, self._prev, self._size, self._unsigned, self._pending)
            previous = {"seq": old[1] - 1, "head": old[2]}
            try:
                walk = self._attach()
            except BaseException:
                self._fd, self._seq, self._prev, self._size, self._unsigned, self._pending = old
                raise
            try:  # the link to the old file first: a new file without it is not kept
                self._append_locked(
                    "kmsfs-hsmd",
                    "reopen",
                    None,
                    True,
                    f"continues the log moved aside after its seq {previous['seq']}",
                    {"previous": previous},
                )
                if walk.unsigned_tail and self._signer is not None:
                    self._note_adopted(walk)
            except BaseException:
                new_fd, empty = self._fd, self._size == 0
                self._fd, self._seq, self._prev, self._size, self._unsigned, self._pending = old
                if empty:
                    with contextlib.suppress(OSError):
                        os.unlink(self.path)
                os.close(new_fd)
                raise
            os.close(old[0])
            return True

    def _note_adopted(self, walk: _Walk) -> None:
        """Say (under the lock), in the record the next checkpoint signs, that the records after
        the last checkpoint were found unsigned, not written by this process. After a crash that is
        expected; after a change to the file (records removed, the chain rebuilt, checkpoints
        stripped) it is the only trace, and without it the next checkpoint would vouch for
        the change as if this agent had written it."""
        first = walk.next_seq - walk.unsigned_tail
        self._append_locked(
            "kmsfs-hsmd",
            "start",
            None,
            True,
            f"{walk.unsigned_tail} record(s) before this one (seq {first} to "
            f"{walk.next_seq - 1}) were not signed when the agent started: a crash, or a "
            "change to the file",
        )

    def _open(self) -> int:
        """The log file, locked: made 0600 if missing; else it must be a regular file (not
        through a symlink) of this process's user, and is made 0600 if it was not (a file
        made by logrotate's ``create``)."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, LOG_MODE)
            created = True
        except FileExistsError:
            try:
                fd = os.open(self.path, flags | os.O_NONBLOCK)  # a FIFO must not block
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise KmsfsError(f"{self.path}: a symlink, not the audit log") from None
                raise
            created = False
        try:
            if not created:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise KmsfsError(f"{self.path}: not a regular file")
                if st.st_uid != os.geteuid():
                    raise KmsfsError(f"{self.path}: owned by uid {st.st_uid}, not this agent's")
                if stat.S_IMODE(st.st_mode) != LOG_MODE:
                    os.fchmod(fd, LOG_MODE)
                os.set_blocking(fd, True)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if created:
                atomicfile.fsync_dir(self.path.parent)
        except BlockingIOError:
            os.close(fd)
            raise KmsfsError(f"{self.path}: in use by another process (locked)") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _scan(self) -> _Walk:
        """Verify the existing chain through our own fd: the agent must refuse to start rather
        than extend a broken log, since every later checkpoint would vouch for the damage."""
        with os.fdopen(os.dup(self._fd), "rb") as handle:  # the dup shares the flock
            handle.seek(0)
            walk = _Walk(self._keys).walk(handle)
        if walk.problems:
            more = f" (and {len(walk.problems) - 1} more)" if len(walk.problems) > 1 else ""
            raise IntegrityError(
                f"{self.path}: {walk.problems[0]}{more}; refusing to extend a damaged audit log"
            )
        return walk

    def append(
        self,
        *,
        who: str,
        op: str,
        domain: str | None,
        allowed: bool,
        reason: str,
        detail: dict[str, Any] | None = None,
    ) -> int:
        """Record one decision; return its seq. FormatError for fields the format refuses."""
        with self._lock:
            return self._append_locked(who, op, domain, allowed, reason, detail)

    def _append_locked(
        self,
        who: str,
        op: str,
        domain: str | None,
        allowed: bool,
        reason: str,
        detail: dict[str, Any] | None = None,
    ) -> int:
        if not isinstance(allowed, bool):
            raise FormatError(f"event: allowed: want bool, have {type(allowed).__name__}")
        event: dict[str, Any] = {
            "type": EVENT,
            "who": who,
            "op": op,
            "domain": domain,
            "decision": "allowed" if allowed else "refused",
            "reason": reason,
        }
        if detail is not None:
            event["detail"] = detail
        seq = self._write({**self._header(), **event})
        if self._pending >= self._every or _clock() - self._last_attempt >= self._seconds:
            try:
                self._checkpoint_locked()
            except OSError as exc:  # the event is written; say so rather than fail it
                log.warning("%s: checkpoint not written (%s)", self.path, exc)
        return seq

    def checkpoint(self) -> None:
        """Have the signer sign the current head, append that record and fsync. A signer
        failure is a warning: the log stays valid, its tail unsigned until the next one."""
        with self._lock:
            self._header()  # refuses a closed log
            try:
                self._checkpoint_locked()
            except OSError as exc:  # a full disk: the log stays whole, its tail unsigned
                log.warning("%s: checkpoint not written (%s)", self.path, exc.strerror or exc)

    def close(self) -> None:
        """A final checkpoint if any record is unsigned, then release the file. Idempotent."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                self._checkpoint_locked()
            finally:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _header(self) -> dict[str, Any]:
        if self._fd < 0:
            raise ValueError(f"{self.path}: the audit log is closed")
        return {"seq": self._seq, "prev": self._prev, "time": _utc_now()}

    def _checkpoint_locked(self) -> None:
        self._pending = 0
        self._last_attempt = _clock()
        if self._signer is not None and self._unsigned > 0:
            record = {**self._header(), "type": CHECKPOINT}
            try:
                hsm_id, signature = self._signer(signed_message(record))
                record["hsm"] = fields.hex_id(hsm_id, "signer's HSM id")
                if not isinstance(signature, bytes):
                    raise FormatError(f"signer returned a {type(signature).__name__}")
                record["signature"] = b64encode(signature)
            except Exception as exc:  # an absent HSM must not take the agent down
                log.warning(
                    "%s: checkpoint not signed, %d record(s) stay unsigned (%s)",
                    self.path,
                    self._unsigned,
                    exc,
                )
            else:
                try:
                    seq = self._write(record)
                except OSError:
                    with contextlib.suppress(OSError):  # what is written still reaches the disk
                        os.fsync(self._fd)
                    raise
                self._unsigned = self._pending = 0
                log.info(
                    "%s: checkpoint seq %d head %s by HSM %s",
                    self.path,
                    seq,
                    record["prev"],
                    record["hsm"][:12],
                )
        os.fsync(self._fd)

    def _write(self, record: dict[str, Any]) -> int:
        """Append one record as one write; on failure cut the file back to its last whole
        line, so a full disk costs the record, never the log."""
        body = canonical_bytes(check_record(record))  # never write what verify would refuse
        line = body + b"\n"
        try:
            view = memoryview(line)
            while view:  # a short write is retried, so a full disk says ENOSPC, not "short"
                view = view[os.write(self._fd, view) :]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(line)
        self._seq += 1
        self._prev = line_hash(body)
        self._unsigned += 1
        self._pending += 1
        return int(record["seq"])
