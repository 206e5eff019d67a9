"""Turning service results into rows (for tables) and objects (for --json), each with an id."""

from typing import Any

from kmsfs.model.domain import SealedDomain
from kmsfs.model.records import HsmRecord, OperatorRecord
from kmsfs.model.verify import VerifiedDomain
from kmsfs.service.trusts import TrustStatus


def hsm(record: HsmRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "label": record.label,
        "wrap": record.wrap_key.scheme,
        "sign": record.sign_key.scheme,
        "created": record.created,
    }


def operator(record: OperatorRecord) -> dict[str, Any]:
    return {
        "id": record.key.key_id,
        "name": record.name,
        "protection": record.protection,
        "created": record.created,
    }


def trust_row(status: TrustStatus) -> dict[str, Any]:
    t = status.trust
    own = status.own
    return {
        "id": t.id,
        "serial": t.serial,
        "quorum": f"{len(own.signed)}/{t.quorum} of {len(t.operators)}",
        "state": "sealed" if status.sealed_by else ("ready" if status.ready else "proposed"),
        "hsms": ",".join(h.label for h in t.hsms),
        "operators": ",".join(m.name for m in t.operators) or "-",
    }


def domain(sealed: SealedDomain) -> dict[str, Any]:
    d = sealed.domain
    return {
        "id": d.id,
        "name": d.name,
        "generation": d.generation,
        "trust": d.trust,
        "epochs": len(d.master_keys),
        "created": d.created,
    }


def verified_domain(verified: VerifiedDomain) -> dict[str, Any]:
    trust = verified.trust.trust
    return {
        **domain(verified.sealed),
        "verified": True,
        "chain": [link.id for link in verified.chain],
        "hsms": [h.label for h in trust.hsms],
        "operators": [m.name for m in trust.operators],
        "quorum": trust.quorum,
    }


def short(identifier: str) -> str:
    return identifier[:12]
