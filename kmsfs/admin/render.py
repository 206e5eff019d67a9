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
    """One trust of ``trust list --json``: data, with the types ``trust show --json`` gives
    the same fields (``quorum`` a number, ``hsms`` and ``operators`` arrays)."""
    t = status.trust
    return {
        "id": t.id,
        "serial": t.serial,
        "state": status.state,
        "sealed_by": status.sealed_by,
        "lost_to": status.lost_to,
        "rivals": list(status.rivals),
        "head": status.line == "head",
        "line": status.line,
        "approval_count": len(status.own.signed),
        "quorum": t.quorum,
        "operator_count": len(t.operators),
        "hsms": [{"id": h.id, "label": h.label} for h in t.hsms],
        "operators": [m.name for m in t.operators],
    }


TRUST_COLUMNS = ["id", "serial", "state", "approvals", "hsms", "operators"]
#: What the state column adds for the store's head, and for a Trust on another line than it
#: (kmsfs.model.line): what operators look for after a fork or a rollback.
LINE_NOTES = {"head": "head", "rival": "rival line"}


def trust_cells(row: dict[str, Any]) -> dict[str, Any]:
    """A ``trust_row`` for the table: "2 signed, 2 of 3 needed" rather than "2/2 of 3"."""
    state = f"dead (lost to {short(row['lost_to'])})" if row["lost_to"] else (
        f"sealed, forked (rival {','.join(short(r) for r in row['rivals'])})"
        if row["rivals"] else row["state"])
    if row.get("line") in LINE_NOTES:
        state = f"{state}, {LINE_NOTES[row['line']]}"
    return {
        "id": short(row["id"]),
        "serial": row["serial"],
        "state": state,
        "approvals": f"{row['approval_count']} signed, {row['quorum']} of "
        f"{row['operator_count']} needed",
        "hsms": ",".join(h["label"] for h in row["hsms"]),
        "operators": ",".join(row["operators"]) or "-",
    }


def domain(sealed: SealedDomain) -> dict[str, Any]:
    d = sealed.domain
    return {
        "id": d.id,
        "name": d.name,
        "generation": d.generation,
        "trust": d.trust,
        "epochs": len(d.master_keys),
        "retired_below": d.retired_below,
        "key_binding": d.bound,
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
