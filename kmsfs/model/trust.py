"""Trusts: which HSMs and operators govern a set of Domains, and how many operators must agree.

A Trust is three kinds of immutable pieces, so that stores merge by union:

- the **payload** (a proposal), content-addressed: its id is the SHA-256 of its canonical bytes;
- **approvals**: one operator's Ed25519 signature over ``OPERATOR_APPROVES_TRUST || payload``;
- a **seal**: an HSM's signature over ``HSM_SEALS_TRUST || payload``, made only after the HSM's
  caller checked the quorum (and the predecessor's quorum).

A verifier never trusts the seal alone: it re-checks the quorum from the approvals (see
``verify.py``). Like TUF root rotation, a successor (``serial`` + 1, ``predecessor`` = the old
id) must meet both its own quorum and its predecessor's.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kmsfs.errors import FormatError, QuorumNotMetError
from kmsfs.model import contexts, fields
from kmsfs.model.canonical import b64decode, b64encode, canonical_bytes, digest
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.records import HsmRecord, check_name

FORMAT = 1


@dataclass(frozen=True)
class Member:
    """An operator as named inside a Trust: the name is a label, the key is what counts."""

    name: str
    key: PublicKey

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key.to_dict()}

    @classmethod
    def from_dict(cls, value: Any) -> "Member":
        data = fields.obj(value, "trust operator")
        fields.exact_keys(data, {"name", "key"}, "trust operator")
        member = cls(
            check_name(fields.string(data, "name", "trust operator"), "operator"),
            PublicKey.from_dict(data["key"], "trust operator key"),
        )
        if member.key.scheme != "ed25519":
            raise FormatError(f"trust operator {member.name}: want an ed25519 key")
        return member


@dataclass(frozen=True)
class Trust:
    """The signed content of a Trust."""

    serial: int
    predecessor: str | None
    hsms: tuple[HsmRecord, ...]
    operators: tuple[Member, ...]
    quorum: int
    created: str

    def __post_init__(self) -> None:
        if not self.hsms:
            raise FormatError("trust: want at least one HSM")
        fields.timestamp(self.created, "trust: created")
        hsm_ids = [h.id for h in self.hsms]
        if len(set(hsm_ids)) != len(hsm_ids):
            raise FormatError("trust: the same HSM is listed twice")
        keys = [m.key.key_id for m in self.operators]
        if len(set(keys)) != len(keys):
            raise FormatError("trust: the same operator key is listed twice")
        names = [m.name for m in self.operators]
        if len(set(names)) != len(names):
            raise FormatError("trust: the same operator name is listed twice")
        if self.serial < 1:
            raise FormatError(f"trust: serial want >= 1, have {self.serial}")
        if self.predecessor is None:
            if self.serial != 1:
                raise FormatError(f"trust: a root has serial 1, have {self.serial}")
        else:
            fields.hex_id(self.predecessor, "trust.predecessor")
            if self.serial < 2:
                raise FormatError("trust: a successor has serial >= 2")
        if self.operators:
            if not 1 <= self.quorum <= len(self.operators):
                raise FormatError(
                    f"trust: quorum want 1..{len(self.operators)} (the operator count), "
                    f"have {self.quorum}"
                )
        elif self.quorum != 0 or self.predecessor is not None:
            raise FormatError("trust: only a genesis root may have no operators (quorum 0)")

    @property
    def is_genesis(self) -> bool:
        return self.predecessor is None and not self.operators

    def payload(self) -> dict[str, Any]:
        return {
            "_type": "trust",
            "format": FORMAT,
            "serial": self.serial,
            "predecessor": self.predecessor,
            "hsms": [h.payload() for h in self.hsms],
            "operators": [m.to_dict() for m in self.operators],
            "quorum": self.quorum,
            "created": self.created,
        }

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.payload())

    @property
    def id(self) -> str:
        return digest(self.payload())

    def hsm(self, hsm_id: str) -> HsmRecord | None:
        return next((h for h in self.hsms if h.id == hsm_id), None)

    def tolerance(self) -> dict[str, int]:
        """How many dishonest operators the quorum resists.

        forgery: signers who collude to approve something (fewer than ``quorum`` achieve nothing);
        denial: signers who refuse to sign (the rest can still reach the quorum).
        """
        count = len(self.operators)
        return {"forgery": max(self.quorum - 1, 0), "denial": count - self.quorum}

    @classmethod
    def from_dict(cls, value: Any) -> "Trust":
        data = fields.obj(value, "trust")
        fields.type_and_format(data, "trust", FORMAT)
        keys = {
            "_type",
            "format",
            "serial",
            "predecessor",
            "hsms",
            "operators",
            "quorum",
            "created",
        }
        fields.exact_keys(data, keys, "trust")
        predecessor = data["predecessor"]
        if predecessor is not None:
            predecessor = fields.hex_id(predecessor, "trust.predecessor")
        return cls(
            serial=fields.integer(data, "serial", "trust"),
            predecessor=predecessor,
            hsms=tuple(HsmRecord.from_payload(h) for h in fields.array(data, "hsms", "trust")),
            operators=tuple(Member.from_dict(m) for m in fields.array(data, "operators", "trust")),
            quorum=fields.integer(data, "quorum", "trust"),
            created=fields.string(data, "created", "trust"),
        )


@dataclass(frozen=True)
class Signature:
    """A signature over a Trust or Domain payload by one key (an operator's or an HSM's)."""

    subject: str
    key_id: str
    value: bytes

    def to_dict(self, kind: str) -> dict[str, Any]:
        return {
            "_type": kind,
            "subject": self.subject,
            "key_id": self.key_id,
            "signature": b64encode(self.value),
        }

    @classmethod
    def from_dict(cls, value: Any, kind: str) -> "Signature":
        data = fields.obj(value, kind)
        fields.exact_keys(data, {"_type", "subject", "key_id", "signature"}, kind)
        if data["_type"] != kind:
            raise FormatError(f"want a {kind}, have _type {data['_type']!r:.40}")
        return cls(
            subject=fields.hex_id(data["subject"], f"{kind}.subject"),
            key_id=fields.hex_id(data["key_id"], f"{kind}.key_id"),
            value=b64decode(data["signature"], f"{kind}.signature"),
        )


@dataclass(frozen=True)
class QuorumResult:
    """Who of a group signed validly, computed without raising (like TUF's VerificationResult)."""

    threshold: int
    signed: frozenset[str]
    unsigned: frozenset[str]

    @property
    def met(self) -> bool:
        return len(self.signed) >= self.threshold


def valid_approvals(
    trust: Trust, approvals: Sequence[Signature], group: Sequence[Member]
) -> list[tuple[Member, Signature]]:
    """The approvals of ``trust`` that are valid signatures by a member of ``group``.

    An approval by a key outside ``group``, for another subject, or with a bad signature is
    left out. Keys decide, not names.
    """
    message = contexts.message(contexts.OPERATOR_APPROVES_TRUST, trust.signed_bytes())
    by_key = {m.key.key_id: m for m in group}
    valid = []
    for approval in approvals:
        member = by_key.get(approval.key_id)
        if member is None or approval.subject != trust.id:
            continue
        try:
            member.key.verify(approval.value, message)
        except Exception:  # a bad signature simply does not count
            continue
        valid.append((member, approval))
    return valid


def quorum_result(
    trust: Trust, approvals: list[Signature], group: tuple[Member, ...], threshold: int
) -> QuorumResult:
    """Which members of ``group`` validly approved ``trust``; each key counts at most once.

    An approval by a key outside ``group``, for another subject, or with a bad signature counts
    zero. Names are reported, keys decide.
    """
    signed = {member.name for member, _ in valid_approvals(trust, approvals, group)}
    names = frozenset(m.name for m in group)
    return QuorumResult(threshold, frozenset(signed), names - signed)


def verify_quorum(
    trust: Trust, approvals: list[Signature], group: tuple[Member, ...], threshold: int, whose: str
) -> QuorumResult:
    """Raise QuorumNotMetError("... signed by 2/3 ...") unless the threshold is met."""
    result = quorum_result(trust, approvals, group, threshold)
    if not result.met:
        raise QuorumNotMetError(
            f"trust {trust.id[:12]}: {whose} quorum not met: signed by {len(result.signed)}, "
            f"need {threshold} of {len(group)}"
        )
    return result


@dataclass(frozen=True)
class SealedTrust:
    """A Trust with the approvals collected and the HSM seal: what verifiers consume."""

    trust: Trust
    approvals: tuple[Signature, ...]
    seal: Signature

    @property
    def id(self) -> str:
        return self.trust.id

    def to_dict(self) -> dict[str, Any]:
        return {
            "trust": self.trust.payload(),
            "approvals": [a.to_dict("approval") for a in self.approvals],
            "seal": self.seal.to_dict("seal"),
        }

    @classmethod
    def from_dict(cls, value: Any) -> "SealedTrust":
        data = fields.obj(value, "sealed trust")
        fields.exact_keys(data, {"trust", "approvals", "seal"}, "sealed trust")
        approvals = fields.array(data, "approvals", "sealed trust")
        return cls(
            trust=Trust.from_dict(data["trust"]),
            approvals=tuple(Signature.from_dict(a, "approval") for a in approvals),
            seal=Signature.from_dict(data["seal"], "seal"),
        )
