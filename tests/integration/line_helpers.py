"""A rival line of Trusts made by a superseded Trust's old quorum (test_forked_line.py,
test_line_head.py), and what the tests of it share."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kmsfs.agent.policy import Policy
from kmsfs.model import contexts
from kmsfs.model.trust import Signature, Trust
from kmsfs.service import hsms
from kmsfs.service.context import Context, utc_now
from tests.kms_helpers import Admin, software_hsm, tree_snapshot

ALL_ACTIONS = (
    '["create-domain", "rewrap", "rotate", "retire", "seal-trust", "seal-genesis-successor",'
    ' "derive"]'
)

#: What forked_line returns: the operators' Admin, T1, T2, [R2, R3], the agent's store.
Forked = tuple[Admin, str, str, list[str], Path]


def operators_policy() -> Policy:
    """An agent policy under which this process's user may do everything."""
    return Policy.parse(
        f'[[client]]\nname = "operators"\nuids = [{os.getuid()}]\ndomains = ["*"]\n'
        f"allow = {ALL_ACTIONS}\n",
        "policy.toml",
    )


def forked_line(tmp_path: Path) -> Forked:
    """T1 = {alice, bob, carol} 2 of 3 governs payroll; T2 = {alice, bob, dave} removes carol;
    an agent's store copied after T2's seal (its head is T2); then bob and carol's revoked key
    seal the rival line R2 -> R3 of T1 in the operators' store (R2 and R3 list hsm1 and a
    software "HSM", hsm3, whose keys they hold). The operators' store sealed T2: its head."""
    admin = Admin.under(tmp_path)
    admin("init", "--hsms", "2")
    admin.create_operators("alice", "bob", "carol", "dave")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    admin("domain", "create", "payroll", "--trust", t1)
    t2 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "dave"], 2,
                            signers=["alice", "bob"], predecessor=t1)
    agent_store = admin.copy(tmp_path / "agent-store").store
    ctx = Context.at(admin.store)
    hsm1 = hsms.resolve_hsm(ctx, "hsm1")
    fake, fake_key = software_hsm("hsm3")
    members = {m.name: m for m in ctx.store.trust(t1).operators}
    rogue: list[str] = []
    predecessor, serial = t1, 3
    for _ in range(2):
        trust = Trust(serial, predecessor, (hsm1, fake), (members["bob"], members["carol"]), 2,
                      utc_now())
        ctx.store.save_trust(trust)
        for name in ("bob", "carol"):  # carol's key: removed by T2, still T1's
            admin("trust", "sign", trust.id, "--as", name, "--pin-file", admin.pin_file(name),
                  "--accept-hsm-change", "hsm3")  # theirs: they know what they approve
        seal = fake_key.sign(contexts.message(contexts.HSM_SEALS_TRUST, trust.signed_bytes()))
        ctx.store.save_signature("seal", Signature(trust.id, fake.id, seal))
        rogue.append(trust.id)
        predecessor, serial = trust.id, serial + 1
    return admin, t1, t2, rogue, agent_store


def documents(store: Path) -> dict[str, bytes]:
    """The store's files but its lock (which the first locked request makes)."""
    return {k: v for k, v in tree_snapshot(store).items() if k != ".lock"}


def copy_trusts(source: Path, target: Path, ids: list[str]) -> None:
    """Put the Trusts *ids* of *source* (documents, approvals, seals) into *target*: a sync,
    or whoever writes *target*'s public documents planting them."""
    for trust_id in ids:
        (target / "trusts").mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / "trusts" / f"{trust_id}.json", target / "trusts")
        for kind in ("approvals", "seals"):
            if (source / kind / trust_id).is_dir():
                shutil.copytree(source / kind / trust_id, target / kind / trust_id,
                                dirs_exist_ok=True)
