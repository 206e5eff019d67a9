"""A Domain bundle: the sealed Domain and its Trust chain, root first, in one document.

This is what ``domain export`` prints and what a CIPHERDIR's config carries, so a Domain can be
verified and used with no store documents at hand: only the pinned root id is needed from the
verifier's own configuration.
"""

from dataclasses import dataclass
from typing import Any

from kmsfs.model import fields
from kmsfs.model.canonical import canonical_bytes, parse_json
from kmsfs.model.domain import SealedDomain
from kmsfs.model.trust import SealedTrust

FORMAT = 1


@dataclass(frozen=True)
class DomainBundle:
    domain: SealedDomain
    chain: tuple[SealedTrust, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "_type": "domain-bundle",
            "format": FORMAT,
            "domain": self.domain.to_dict(),
            "chain": [t.to_dict() for t in self.chain],
        }

    def to_bytes(self) -> bytes:
        return canonical_bytes(self.to_dict())

    @classmethod
    def from_dict(cls, value: Any) -> "DomainBundle":
        data = fields.obj(value, "domain bundle")
        fields.type_and_format(data, "domain-bundle", FORMAT)
        fields.exact_keys(data, {"_type", "format", "domain", "chain"}, "domain bundle")
        chain = fields.array(data, "chain", "domain bundle")
        return cls(
            SealedDomain.from_dict(data["domain"]),
            tuple(SealedTrust.from_dict(t) for t in chain),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "DomainBundle":
        return cls.from_dict(parse_json(data))
