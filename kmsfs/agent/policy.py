"""Who may ask the agent for what: the policy file, default deny.

The agent is the policy enforcement point of the paper's server. A client is identified by the
kernel (the peer uid of a Unix socket, SO_PEERCRED) or by TLS (the SHA-256 fingerprint or the
subject common name of a client certificate that the configured CA signed); nothing a client
*says* about itself counts. A request is allowed only if some ``[[client]]`` entry matches the
peer, lists the action and, for actions on a Domain, the Domain's name (or ``"*"``)::

    [[client]]
    name = "payroll mounts"            # the audit log says which entry allowed a request
    uids = [0]                         # local peers by uid ...
    users = ["kmsfs"]                  # ... or by user name
    certs = ["sha256:3f1a..."]         # TLS peers by certificate fingerprint ...
    subjects = ["mount1.example.org"]  # ... or by subject CN
    domains = ["payroll"]              # Domain names, "*" for every Domain
    allow = ["derive"]                 # derive, create-domain, rewrap, rotate, retire,
                                       # seal-trust, seal-genesis-successor, health

``seal-genesis-successor`` is ``seal-trust`` for the one Trust that follows the genesis, kept
apart because the genesis has no operators: no quorum but the new Trust's own stands behind
it, and sealing it pins it in the agent's store for good. With ``seal-trust`` alone, any
client allowed it could have the agent seal and pin a first Trust whose only operator is a key
it made (review). Grant it for the ceremony only.

TOML, because people edit it and review its diffs; unknown keys and actions are refused when
the file is loaded, so a typo cannot silently widen or narrow what is allowed.
"""

from __future__ import annotations

import pwd
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsfs.agent.protocol import printable
from kmsfs.errors import AgentRefusedError, FormatError, UsageError

#: The action that seals the genesis's successor (``seal-trust`` of a Trust whose predecessor is
#: the store's root).
SEAL_GENESIS_SUCCESSOR = "seal-genesis-successor"
ACTIONS = (
    "derive", "create-domain", "rewrap", "rotate", "retire", "seal-trust",
    SEAL_GENESIS_SUCCESSOR, "health",
)
DOMAIN_ACTIONS = frozenset({"derive", "create-domain", "rewrap", "rotate", "retire"})
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_KEYS = {"name", "uids", "users", "certs", "subjects", "domains", "allow"}


@dataclass(frozen=True)
class Peer:
    """A connected client as the kernel or TLS vouches for it."""

    uid: int | None = None
    user: str | None = None
    fingerprint: str | None = None  # "sha256:<hex>" of the DER client certificate
    subject: str | None = None  # the certificate's subject commonName

    @classmethod
    def local(cls, uid: int) -> Peer:
        try:
            user: str | None = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = None
        return cls(uid=uid, user=user)

    def describe(self) -> str:
        """How the audit log and refusals name this peer."""
        if self.fingerprint is not None:
            # The common name is the client's own text: escaped and cut (a newline or a
            # ":sha256:..." of its own must not make it read as another client; review). The
            # fingerprint, last, is what names it.
            subject = self.subject
            shown = "?" if subject is None else printable(subject.replace(":", "\\x3a"), 64)
            return f"tls:{shown}:{self.fingerprint}"
        return f"uid={self.uid}({self.user or '?'})"


@dataclass(frozen=True)
class ClientRule:
    name: str
    uids: frozenset[int]
    users: frozenset[str]
    certs: frozenset[str]
    subjects: frozenset[str]
    domains: frozenset[str]
    allow: frozenset[str]

    def matches(self, peer: Peer) -> bool:
        if peer.fingerprint is not None:  # a TLS peer is never matched by uid
            return peer.fingerprint in self.certs or (
                peer.subject is not None and peer.subject in self.subjects
            )
        return (peer.uid is not None and peer.uid in self.uids) or (
            peer.user is not None and peer.user in self.users
        )

    def permits(self, action: str, domain: str | None) -> bool:
        if action not in self.allow:
            return False
        if action in DOMAIN_ACTIONS:
            return "*" in self.domains or (domain is not None and domain in self.domains)
        return True


@dataclass(frozen=True)
class Policy:
    rules: tuple[ClientRule, ...]
    source: str

    def client_name(self, peer: Peer) -> str | None:
        for rule in self.rules:
            if rule.matches(peer):
                return rule.name
        return None

    def allows_any(self, peer: Peer, action: str) -> bool:
        """Whether some entry matching *peer* lists *action*, for any Domain."""
        return any(rule.matches(peer) and action in rule.allow for rule in self.rules)

    def check(self, peer: Peer, action: str, domain: str | None = None) -> str:
        """The name of the rule that allows it; AgentRefusedError with the reason otherwise."""
        matching = [r for r in self.rules if r.matches(peer)]
        for rule in matching:
            if rule.permits(action, domain):
                return rule.name
        what = f"{action} for Domain {domain}" if domain is not None else action
        if not matching:
            reason = f"client {peer.describe()} is not in the agent's policy"
        else:
            reason = f"client {peer.describe()} may not {what}"
        raise AgentRefusedError(f"{reason} (policy {self.source})")

    @classmethod
    def parse(cls, text: str, source: str) -> Policy:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FormatError(f"{source}: not TOML ({exc})") from None
        unknown = set(data) - {"client"}
        if unknown:
            raise FormatError(f"{source}: unknown key {sorted(unknown)[0]!r} (want [[client]])")
        entries = data.get("client", [])
        if not isinstance(entries, list):
            raise FormatError(f"{source}: 'client' must be an array of tables ([[client]])")
        return cls(tuple(_rule(e, f"{source}: client {i + 1}") for i, e in enumerate(entries)),
                   source)

    @classmethod
    def load(cls, path: Path) -> Policy:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            # Not malformed: missing or unreadable (a mistyped --policy), a usage error.
            raise UsageError(f"{path}: cannot read the policy: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise FormatError(f"{path}: not UTF-8") from None
        return cls.parse(text, str(path))


def _strings(entry: dict[str, Any], key: str, where: str) -> frozenset[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise FormatError(f"{where}: {key!r} must be a list of non-empty strings")
    return frozenset(value)


def _rule(entry: Any, where: str) -> ClientRule:
    if not isinstance(entry, dict):
        raise FormatError(f"{where}: want a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise FormatError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    name = entry.get("name", where.rsplit(": ", 1)[-1])
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: 'name' must be a non-empty string")
    uids = entry.get("uids", [])
    if not isinstance(uids, list) or not all(
        isinstance(u, int) and not isinstance(u, bool) and 0 <= u < 2**32 for u in uids
    ):
        raise FormatError(f"{where}: 'uids' must be a list of user ids")
    certs = _strings(entry, "certs", where)
    for cert in certs:
        if not _FINGERPRINT.fullmatch(cert):
            raise FormatError(f"{where}: certificate {cert!r:.40} is not sha256:<64 hex digits>")
    allow = _strings(entry, "allow", where)
    for action in sorted(allow):
        if action not in ACTIONS:
            raise FormatError(f"{where}: unknown action {action!r} (want {', '.join(ACTIONS)})")
    rule = ClientRule(
        name=name,
        uids=frozenset(uids),
        users=_strings(entry, "users", where),
        certs=certs,
        subjects=_strings(entry, "subjects", where),
        domains=_strings(entry, "domains", where),
        allow=allow,
    )
    if not (rule.uids or rule.users or rule.certs or rule.subjects):
        raise FormatError(f"{where}: names no client (give uids, users, certs or subjects)")
    return rule
