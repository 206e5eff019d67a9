"""Domains: a Trust plus the Domain keys, sealed by an HSM of that Trust.

``k`` (AES-256) and ``mk`` (256-bit generic secret) are generated inside an HSM. The Domain
carries ``E(Pk_i, k)`` for every HSM ``i`` of the Trust (RSA-OAEP) and ``E(k, mk)`` (AES key
wrap with padding, RFC 5649), so any HSM of the Trust, and only those, can bring ``mk`` back
inside itself. ``mk`` is a list of epochs so that rotation can add one without losing old data.

A rewrap makes a new Domain document (``generation`` + 1, ``previous`` = the old id) with a
fresh ``k`` for a successor Trust; ``mk`` is unchanged. The Domain's id is the SHA-256 of its
canonical payload; its seal is an HSM signature over ``HSM_SEALS_DOMAIN || payload``.
"""

from dataclasses import dataclass
from typing import Any

from kmsfs.errors import FormatError
from kmsfs.model import fields
from kmsfs.model.canonical import b64decode, b64encode, canonical_bytes, digest
from kmsfs.model.records import check_name
from kmsfs.model.trust import Signature

FORMAT = 1
K_SCHEMES = ("rsa-oaep-sha1", "rsa-oaep-sha256")
MK_SCHEME = "aes-key-wrap-pad"


@dataclass(frozen=True)
class WrappedKey:
    """``k`` wrapped to one HSM's public wrapping key."""

    hsm: str
    scheme: str
    data: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"hsm": self.hsm, "scheme": self.scheme, "data": b64encode(self.data)}

    @classmethod
    def from_dict(cls, value: Any) -> "WrappedKey":
        data = fields.obj(value, "domain.k")
        fields.exact_keys(data, {"hsm", "scheme", "data"}, "domain.k")
        scheme = fields.string(data, "scheme", "domain.k")
        if scheme not in K_SCHEMES:
            raise FormatError(f"domain.k: unknown scheme {scheme!r:.40}")
        return cls(
            fields.hex_id(data["hsm"], "domain.k.hsm"), scheme, b64decode(data["data"], "domain.k")
        )


@dataclass(frozen=True)
class MasterKeyEpoch:
    """``mk`` of one epoch, wrapped by ``k``."""

    epoch: int
    data: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "scheme": MK_SCHEME, "data": b64encode(self.data)}

    @classmethod
    def from_dict(cls, value: Any) -> "MasterKeyEpoch":
        data = fields.obj(value, "domain.mk")
        fields.exact_keys(data, {"epoch", "scheme", "data"}, "domain.mk")
        if data["scheme"] != MK_SCHEME:
            raise FormatError(f"domain.mk: want scheme {MK_SCHEME}, have {data['scheme']!r:.40}")
        epoch = fields.integer(data, "epoch", "domain.mk")
        return cls(epoch, b64decode(data["data"], "domain.mk"))


@dataclass(frozen=True)
class Domain:
    """The signed content of a Domain."""

    name: str
    generation: int
    previous: str | None
    trust: str
    wrapped_k: tuple[WrappedKey, ...]
    master_keys: tuple[MasterKeyEpoch, ...]
    created: str

    def __post_init__(self) -> None:
        check_name(self.name, "domain")
        fields.hex_id(self.trust, "domain.trust")
        if (self.generation == 1) != (self.previous is None) or self.generation < 1:
            raise FormatError("domain: generation 1 has no previous, later ones have one")
        if not self.wrapped_k:
            raise FormatError("domain: want k wrapped to at least one HSM")
        hsms = [w.hsm for w in self.wrapped_k]
        if len(set(hsms)) != len(hsms):
            raise FormatError("domain: k is wrapped twice to the same HSM")
        epochs = [m.epoch for m in self.master_keys]
        if not epochs or epochs != list(range(1, len(epochs) + 1)):
            raise FormatError("domain: master key epochs want 1, 2, ... in order")

    @property
    def current_epoch(self) -> MasterKeyEpoch:
        return self.master_keys[-1]

    def epoch(self, number: int) -> MasterKeyEpoch | None:
        """``mk`` of epoch ``number``, if this Domain has it."""
        return self.master_keys[number - 1] if 1 <= number <= len(self.master_keys) else None

    def wrapped_for(self, hsm_id: str) -> WrappedKey | None:
        return next((w for w in self.wrapped_k if w.hsm == hsm_id), None)

    def payload(self) -> dict[str, Any]:
        return {
            "_type": "domain",
            "format": FORMAT,
            "name": self.name,
            "generation": self.generation,
            "previous": self.previous,
            "trust": self.trust,
            "k": [w.to_dict() for w in self.wrapped_k],
            "mk": [m.to_dict() for m in self.master_keys],
            "created": self.created,
        }

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.payload())

    @property
    def id(self) -> str:
        return digest(self.payload())

    @classmethod
    def from_dict(cls, value: Any) -> "Domain":
        data = fields.obj(value, "domain")
        fields.type_and_format(data, "domain", FORMAT)
        keys = {"_type", "format", "name", "generation", "previous", "trust", "k", "mk", "created"}
        fields.exact_keys(data, keys, "domain")
        previous = data["previous"]
        if previous is not None:
            previous = fields.hex_id(previous, "domain.previous")
        return cls(
            name=fields.string(data, "name", "domain"),
            generation=fields.integer(data, "generation", "domain"),
            previous=previous,
            trust=fields.hex_id(data["trust"], "domain.trust"),
            wrapped_k=tuple(WrappedKey.from_dict(w) for w in fields.array(data, "k", "domain")),
            master_keys=tuple(
                MasterKeyEpoch.from_dict(m) for m in fields.array(data, "mk", "domain")
            ),
            created=fields.string(data, "created", "domain"),
        )


@dataclass(frozen=True)
class SealedDomain:
    """A Domain with its HSM seal."""

    domain: Domain
    seal: Signature

    @property
    def id(self) -> str:
        return self.domain.id

    def to_dict(self) -> dict[str, Any]:
        return {"domain": self.domain.payload(), "seal": self.seal.to_dict("seal")}

    @classmethod
    def from_dict(cls, value: Any) -> "SealedDomain":
        data = fields.obj(value, "sealed domain")
        fields.exact_keys(data, {"domain", "seal"}, "sealed domain")
        return cls(Domain.from_dict(data["domain"]), Signature.from_dict(data["seal"], "seal"))
