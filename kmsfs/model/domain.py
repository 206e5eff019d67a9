"""Domains: a Trust plus the Domain keys, sealed by an HSM of that Trust.

``k`` (AES-256) and ``mk`` (256-bit generic secret) are generated inside an HSM. The Domain
carries ``E(Pk_i, k)`` for every HSM ``i`` of the Trust (RSA-OAEP) and ``E(k, mk)`` (AES key
wrap with padding, RFC 5649), so any HSM of the Trust, and only those, can bring ``mk`` back
inside itself. ``mk`` is a list of epochs so that rotation can add one without losing old data.

A rewrap makes a new Domain document (``generation`` + 1, ``previous`` = the old id) with a
fresh ``k`` for a successor Trust; ``mk`` is unchanged. The Domain's id is the SHA-256 of its
canonical payload; its seal is an HSM signature over ``HSM_SEALS_DOMAIN || payload``.

Key binding (format 2). The seal proves only that *some* HSM of the Trust signed the document,
not that the wrapped keys in it belong to this Domain: an HSM's PIN holder could seal a Domain
of another name that carries a copy of another Domain's wrapped ``k`` and ``mk`` (for an HSM
the two Trusts share), and an agent client allowed that name would then get the other Domain's
keys. So each ``mk`` epoch carries ``binding`` = HMAC-SHA256(mk, :func:`binding_info` of the
Domain's name, the epoch and the store's root Trust), computed inside the HSM when the epoch is
made. Only an HSM that can unwrap that ``mk`` can compute it, and every opening checks it
inside the HSM before deriving anything (``kmsfs.service.domains.DomainKeys``). Format 1
documents (made before) have no binding: they are refused until a rewrap binds them.

Retired epochs. Epochs are never removed (names, symlink targets and xattrs are keyed with
epoch 1 for a volume's life, and old data must stay readable until it is re-encrypted), so an
HSM removed from the Trust keeps the ``mk`` of every epoch it once held, and with it could make
file contents that verify. ``retired_below`` (a generation made by ``domain retire``, carried by
every later one) ends that: no file content keyed with an epoch below it is read or written
(``kmsfs.service.domains.DomainKeys``). It is in the payload only once it is above 1, so the
documents made before it keep their ids; a kmsfs that predates it refuses such a Domain rather
than ignore the retirement.
"""

from dataclasses import dataclass
from typing import Any

from kmsfs.errors import FormatError
from kmsfs.model import fields
from kmsfs.model.canonical import b64decode, b64encode, canonical_bytes, digest
from kmsfs.model.records import check_name
from kmsfs.model.trust import Signature

FORMAT = 2
"""Every ``mk`` epoch carries its binding."""
UNBOUND_FORMAT = 1
"""Made before key binding: no epoch carries one (readable, refused when opened)."""
BINDING_INFO_PREFIX = b"kmsfs/v1/domain-binding\x00"
"""Starts every :func:`binding_info`; no other key derivation may use it (the agent refuses
it from clients), or a client could compute a binding for a Domain of its choosing."""
BINDING_SIZE = 32
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


def binding_info(name: str, epoch: int, root: str) -> bytes:
    """What an ``mk`` epoch's binding is the HMAC of: the Domain's name, the epoch and the id
    of the root (genesis) Trust of the store, so a binding fits one Domain of one store."""
    check_name(name, "domain")
    fields.hex_id(root, "domain binding root")
    return BINDING_INFO_PREFIX + canonical_bytes({"domain": name, "epoch": epoch, "root": root})


@dataclass(frozen=True)
class MasterKeyEpoch:
    """``mk`` of one epoch, wrapped by ``k``, and its binding to the Domain (None: format 1)."""

    epoch: int
    data: bytes
    binding: bytes | None = None

    def __post_init__(self) -> None:
        if self.binding is not None and len(self.binding) != BINDING_SIZE:
            raise FormatError(f"domain.mk: want a {BINDING_SIZE}-byte binding")

    def to_dict(self) -> dict[str, Any]:
        value = {"epoch": self.epoch, "scheme": MK_SCHEME, "data": b64encode(self.data)}
        if self.binding is not None:
            value["binding"] = b64encode(self.binding)
        return value

    @classmethod
    def from_dict(cls, value: Any, bound: bool = True) -> "MasterKeyEpoch":
        data = fields.obj(value, "domain.mk")
        keys = {"epoch", "scheme", "data"}
        fields.exact_keys(data, keys | {"binding"} if bound else keys, "domain.mk")
        if data["scheme"] != MK_SCHEME:
            raise FormatError(f"domain.mk: want scheme {MK_SCHEME}, have {data['scheme']!r:.40}")
        epoch = fields.integer(data, "epoch", "domain.mk")
        binding = b64decode(data["binding"], "domain.mk.binding") if bound else None
        return cls(epoch, b64decode(data["data"], "domain.mk"), binding)


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
    retired_below: int = 1

    def __post_init__(self) -> None:
        check_name(self.name, "domain")
        fields.timestamp(self.created, f"domain {self.name}: created")
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
        if len({m.binding is None for m in self.master_keys}) != 1:
            raise FormatError("domain: either every mk epoch has a binding or none has")
        if not 1 <= self.retired_below <= len(epochs):
            raise FormatError(
                f"domain: retired_below wants 1 to the current epoch {len(epochs)}, "
                f"have {self.retired_below}"
            )

    @property
    def bound(self) -> bool:
        """True if every ``mk`` epoch carries its binding (format 2)."""
        return self.master_keys[0].binding is not None

    @property
    def current_epoch(self) -> MasterKeyEpoch:
        return self.master_keys[-1]

    def retired(self, number: int) -> bool:
        """True if file contents keyed with epoch ``number`` are refused (``retired_below``)."""
        return number < self.retired_below

    def epoch(self, number: int) -> MasterKeyEpoch | None:
        """``mk`` of epoch ``number``, if this Domain has it."""
        return self.master_keys[number - 1] if 1 <= number <= len(self.master_keys) else None

    def wrapped_for(self, hsm_id: str) -> WrappedKey | None:
        return next((w for w in self.wrapped_k if w.hsm == hsm_id), None)

    def payload(self) -> dict[str, Any]:
        retired = {"retired_below": self.retired_below} if self.retired_below > 1 else {}
        return {
            "_type": "domain",
            "format": FORMAT if self.bound else UNBOUND_FORMAT,
            "name": self.name,
            "generation": self.generation,
            "previous": self.previous,
            "trust": self.trust,
            "k": [w.to_dict() for w in self.wrapped_k],
            "mk": [m.to_dict() for m in self.master_keys],
            "created": self.created,
            **retired,
        }

    def signed_bytes(self) -> bytes:
        return canonical_bytes(self.payload())

    @property
    def id(self) -> str:
        return digest(self.payload())

    @classmethod
    def from_dict(cls, value: Any) -> "Domain":
        data = fields.obj(value, "domain")
        if isinstance(data, dict) and data.get("format") == UNBOUND_FORMAT:
            fields.type_and_format(data, "domain", UNBOUND_FORMAT)
        else:
            fields.type_and_format(data, "domain", FORMAT)
        bound = data["format"] == FORMAT
        keys = {"_type", "format", "name", "generation", "previous", "trust", "k", "mk", "created"}
        retired = "retired_below" in data if isinstance(data, dict) else False
        fields.exact_keys(data, keys | {"retired_below"} if retired else keys, "domain")
        retired_below = fields.integer(data, "retired_below", "domain") if retired else 1
        if retired and retired_below < 2:  # 1 is said by leaving it out: one payload, one id
            raise FormatError("domain: retired_below is written only above 1")
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
                MasterKeyEpoch.from_dict(m, bound) for m in fields.array(data, "mk", "domain")
            ),
            created=fields.string(data, "created", "domain"),
            retired_below=retired_below,
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
