"""HSM and operator records: who holds which public keys.

Both are self-signed (the record's own signing key signs it), which proves that whoever wrote
the record holds the private key, and binds an HSM's wrapping key to its signing key. A record
is identified by the SHA-256 of its public keys (an HSM) or by its name (an operator).

Layout of either file::

    {"signed": {...payload...}, "signature": "<base64>"}
"""

import re
from dataclasses import dataclass, field
from typing import Any

from kmsfs.errors import FormatError
from kmsfs.model import contexts, fields
from kmsfs.model.canonical import b64decode, b64encode, canonical_bytes, digest
from kmsfs.model.publickeys import SIGNING_SCHEMES, WRAPPING_SCHEMES, PublicKey

FORMAT = 1
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
OPERATOR_PROTECTIONS = ("token", "passphrase")


def check_name(name: str, what: str) -> str:
    """Names become file names in the store: keep them short, plain and unambiguous."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise FormatError(
            f"{what} name {name!r:.70}: want 1-64 of A-Z a-z 0-9 . _ - (not starting with . _ -)"
        )
    return name


@dataclass(frozen=True)
class HsmRecord:
    """An HSM's public half: a wrapping key (RSA-OAEP) and a signing key."""

    label: str
    wrap_key: PublicKey
    sign_key: PublicKey
    created: str
    signature: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        check_name(self.label, "HSM")
        fields.timestamp(self.created, f"HSM {self.label}: created")
        if self.wrap_key.scheme not in WRAPPING_SCHEMES:
            raise FormatError(f"HSM {self.label}: wrap key scheme {self.wrap_key.scheme}")
        if self.sign_key.scheme not in SIGNING_SCHEMES:
            raise FormatError(f"HSM {self.label}: sign key scheme {self.sign_key.scheme}")

    def payload(self) -> dict[str, Any]:
        return {
            "_type": "hsm",
            "format": FORMAT,
            "label": self.label,
            "wrap_key": self.wrap_key.to_dict(),
            "sign_key": self.sign_key.to_dict(),
            "created": self.created,
        }

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.payload())

    @property
    def id(self) -> str:
        """SHA-256 over the two public keys only: the same token is the same HSM, whatever its
        label or enrolment time."""
        return digest({"wrap_key": self.wrap_key.to_dict(), "sign_key": self.sign_key.to_dict()})

    def verify_self_signature(self) -> None:
        self.sign_key.verify(
            self.signature, contexts.message(contexts.HSM_RECORD, self.signed_bytes())
        )

    def to_dict(self) -> dict[str, Any]:
        return {"signed": self.payload(), "signature": b64encode(self.signature)}

    @classmethod
    def from_payload(cls, value: Any, signature: bytes = b"") -> "HsmRecord":
        data = fields.obj(value, "hsm")
        fields.type_and_format(data, "hsm", FORMAT)
        fields.exact_keys(
            data, {"_type", "format", "label", "wrap_key", "sign_key", "created"}, "hsm"
        )
        return cls(
            label=fields.string(data, "label", "hsm"),
            wrap_key=PublicKey.from_dict(data["wrap_key"], "hsm.wrap_key"),
            sign_key=PublicKey.from_dict(data["sign_key"], "hsm.sign_key"),
            created=fields.string(data, "created", "hsm"),
            signature=signature,
        )

    @classmethod
    def from_dict(cls, value: Any) -> "HsmRecord":
        data = fields.obj(value, "hsm record")
        fields.exact_keys(data, {"signed", "signature"}, "hsm record")
        record = cls.from_payload(data["signed"], b64decode(data["signature"], "hsm.signature"))
        record.verify_self_signature()
        return record


@dataclass(frozen=True)
class OperatorRecord:
    """An operator: a name, an Ed25519 public key, and how the private half is protected."""

    name: str
    key: PublicKey
    protection: str
    created: str
    signature: bytes = field(default=b"", compare=False)

    def __post_init__(self) -> None:
        check_name(self.name, "operator")
        fields.timestamp(self.created, f"operator {self.name}: created")
        if self.key.scheme != "ed25519":
            raise FormatError(f"operator {self.name}: want an ed25519 key, have {self.key.scheme}")
        if self.protection not in OPERATOR_PROTECTIONS:
            raise FormatError(f"operator {self.name}: unknown protection {self.protection!r:.30}")

    def payload(self) -> dict[str, Any]:
        return {
            "_type": "operator",
            "format": FORMAT,
            "name": self.name,
            "key": self.key.to_dict(),
            "protection": self.protection,
            "created": self.created,
        }

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.payload())

    def verify_self_signature(self) -> None:
        self.key.verify(
            self.signature, contexts.message(contexts.OPERATOR_RECORD, self.signed_bytes())
        )

    def to_dict(self) -> dict[str, Any]:
        return {"signed": self.payload(), "signature": b64encode(self.signature)}

    @classmethod
    def from_dict(cls, value: Any) -> "OperatorRecord":
        data = fields.obj(value, "operator record")
        fields.exact_keys(data, {"signed", "signature"}, "operator record")
        payload = fields.obj(data["signed"], "operator")
        fields.type_and_format(payload, "operator", FORMAT)
        fields.exact_keys(
            payload, {"_type", "format", "name", "key", "protection", "created"}, "operator"
        )
        record = cls(
            name=fields.string(payload, "name", "operator"),
            key=PublicKey.from_dict(payload["key"], "operator.key"),
            protection=fields.string(payload, "protection", "operator"),
            created=fields.string(payload, "created", "operator"),
            signature=b64decode(data["signature"], "operator.signature"),
        )
        record.verify_self_signature()
        return record
