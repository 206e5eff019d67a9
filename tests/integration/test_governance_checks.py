"""Governance checks that each stand alone (DESIGN.md §2.2, §2.3, §2.6), on real SoftHSM2 tokens.

Each test here sets up a case where one check is the only defence, so that removing it shows:

- the agent's seal-trust writes only approvals that are valid signatures of members, even once
  the quorum is met by real ones (kmsfs.agent.service);
- a store document's content must match its file name: an operator record copied under another
  operator's name is refused (kmsfs.store.documents);
- an HSM's token must hold the key pair of the HSM's record (kmsfs.service.context);
- a Trust's quorums are checked before any HSM signs it, not only after (kmsfs.service.trusts).
"""

from __future__ import annotations

import base64
import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsfs.agent import protocol
from kmsfs.agent.policy import Peer, Policy
from kmsfs.agent.service import Agent
from kmsfs.errors import QuorumNotMetError
from kmsfs.model.trust import Member, Trust
from kmsfs.service import trusts
from kmsfs.service.context import Context, HsmSession, utc_now
from tests.kms_helpers import Admin, one_error_line, tree_snapshot

SEALER_POLICY = (
    '[[client]]\nname = "root"\nuids = [0]\ndomains = ["*"]\n'
    'allow = ["seal-trust", "seal-genesis-successor"]\n'
)


def _documents(admin: Admin) -> dict[str, bytes]:
    """The store as a failed command must leave it (SoftHSM rewrites token files at login)."""
    return {k: v for k, v in tree_snapshot(admin.store).items() if "tokens/" not in k}


# -- the agent writes only approvals by members -----------------------------------------------


@contextlib.contextmanager
def _agent(store: Path) -> Iterator[Agent]:
    """The real agent service, in this process, on the store's real tokens; uid 0 may seal."""
    agent = Agent(store, Policy.parse(SEALER_POLICY, "test-policy"), None)
    try:
        yield agent
    finally:
        agent.close()


def _forged(trust_id: str, key_id: str) -> dict[str, Any]:
    """An approval under ``key_id`` whose signature is not that key's: zero bytes."""
    return {
        "_type": "approval",
        "subject": trust_id,
        "key_id": key_id,
        "signature": base64.b64encode(bytes(64)).decode(),
    }


def test_agent_writes_no_forged_approval_when_the_real_ones_meet_the_quorum(
    admin: Admin, tmp_path: Path
) -> None:
    """alice and bob really approve (quorum 2 of alice, bob, carol met); the client adds a
    forged approval under carol's key id and one under dave's (an operator the Trust does not
    list). The seal is granted, and only alice's and bob's approvals reach the agent's store:
    users rely on every stored approval being a real one. Before, the test of forged approvals
    only had the quorum fail (nothing is written then); with the member filter gone, the
    forgeries were written once the quorum was met, and carol's forged file took her approval
    slot, so her later real approval was silently not saved."""
    admin("init", "--hsms", "1")
    admin.create_operators("alice", "bob", "carol", "dave")
    ops = admin.copy(tmp_path / "ops")  # the operators' copy: the agent's store sees no proposal
    ops_ctx, ctx = Context.at(ops.store), Context.at(admin.store)
    root = ops_ctx.store.anchor().root
    trust_id = ops.propose(["hsm1"], ["alice", "bob", "carol"], 2, predecessor=root)
    ops.sign(trust_id, "alice", "bob")
    carol = ops_ctx.store.operator("carol").key.key_id
    dave = ops_ctx.store.operator("dave").key.key_id
    real = [a.to_dict("approval") for a in ops_ctx.store.signatures("approval", trust_id)]
    assert len(real) == 2
    args = {
        "trust": ops_ctx.store.trust(trust_id).payload(),
        "approvals": [*real, _forged(trust_id, carol), _forged(trust_id, dave)],
        "chain": [link.to_dict() for link in trusts.verified_chain(ops_ctx, root)],
    }
    with _agent(admin.store) as agent:
        answer = agent.handle(Peer.local(0), protocol.Request(1, "seal-trust", args))
    assert answer["seal"]["subject"] == trust_id
    approvals = admin.store / "approvals" / trust_id
    alice, bob = (ops_ctx.store.operator(n).key.key_id for n in ("alice", "bob"))
    assert sorted(p.name for p in approvals.iterdir()) == sorted(
        [f"{alice}.json", f"{bob}.json"]
    )
    assert not (approvals / f"{carol}.json").exists()
    assert not (approvals / f"{dave}.json").exists()
    assert trusts.status(ctx, trust_id).own.signed == {"alice", "bob"}
    # carol's slot is free: her real approval, made later at the agent's store, is kept.
    admin.sign(trust_id, "carol")
    assert trusts.status(ctx, trust_id).own.signed == {"alice", "bob", "carol"}
    assert {a.key_id for a in ctx.store.signatures("approval", trust_id)} == {alice, bob, carol}
    admin("trust", "verify", trust_id)


# -- a document's content must match its file name -------------------------------------------


def test_an_operator_record_copied_under_another_name_is_refused(initialized: Admin) -> None:
    """mallory, who can write the store, copies her own (validly self-signed) operator record to
    operators/bob.json. Users rely on a name meaning that operator's key: a proposal naming bob
    must not list mallory's key as bob. Without the file-name check the copy read as bob's
    record and the proposal was written; now each command that reads it says which file is
    wrong, in one line, exits non-zero, and writes nothing."""
    admin = initialized
    admin.create_operators("alice", "bob", "mallory")
    operators = admin.store / "operators"
    shutil.copy(operators / "mallory.json", operators / "bob.json")
    before = _documents(admin)
    for args in (
        ["trust", "propose", "--quorum", "1", "--hsm", "hsm1", "--operator", "alice",
         "--operator", "bob"],
        ["operator", "list"],
    ):
        line = one_error_line(admin(*args, check=3))
        assert "operators/bob.json: content does not match its name" in line, line
    assert _documents(admin) == before


# -- the token must hold the record's key pair -------------------------------------------------


def _point_access_at(admin: Admin, label: str, other: str) -> None:
    """HSM ``label``'s access file now opens ``other``'s token, with ``other``'s PIN: a token
    that answers, with keys that are not the record's (a swapped device, or a planted one)."""
    ctx = Context.at(admin.store)
    records = {ctx.store.hsm(i).label: ctx.store.hsm(i) for i in ctx.store.hsm_ids()}
    access = admin.store / "private" / "hsm-access"
    shutil.copy(access / f"{records[other].id}.json", access / f"{records[label].id}.json")


def test_an_hsm_whose_token_holds_another_key_pair_is_refused(initialized: Admin) -> None:
    """Users rely on "HSM hsm1 sealed this" meaning hsm1's key signed it. hsm1's access file
    opens hsm2's token here: the health check reports it and a seal by hsm1 is refused with the
    check's own reason, nothing written. Without the check the health check said ok and hsm2's
    key signed as hsm1 (refused only later, by a verifier, as a bad seal)."""
    admin = initialized
    admin.create_operators("alice")
    trust = admin.propose(["hsm1"], ["alice"], 1)
    admin.sign(trust, "alice")
    _point_access_at(admin, "hsm1", "hsm2")
    health = {row["label"]: row for row in admin("--json", "hsm", "health", check=4).json}
    assert health["hsm1"]["ok"] is False
    assert health["hsm1"]["problem"] == "the token holds other keys than this HSM's record"
    assert health["hsm2"]["ok"] is True
    before = _documents(admin)
    line = one_error_line(admin("trust", "seal", trust, "--hsm", "hsm1", check=4))
    assert "hsm1: the token holds other keys than this HSM's record" in line, line
    assert not (admin.store / "seals" / trust).exists()
    assert _documents(admin) == before


# -- the quorums are checked before an HSM signs ------------------------------------------------


@pytest.fixture
def governed(initialized: Admin) -> tuple[Admin, Context, str]:
    """T1: hsm1 + hsm2, alice, bob, carol, quorum 2, sealed; dave is an operator of no Trust."""
    initialized.create_operators("alice", "bob", "carol", "dave")
    t1 = initialized.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    return initialized, Context.at(initialized.store), t1


@pytest.fixture
def hsm_use(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Every HSM opened by trusts (its PIN used) and every message an HSM signed, recorded
    around the real calls (the tokens stay real)."""
    used: dict[str, list[str]] = {"opened": [], "signed": []}
    real_open: Callable[..., Any] = trusts.open_hsm
    real_sign = HsmSession.sign

    @contextlib.contextmanager
    def opening(ctx: Context, records: Any, *args: Any, **kwargs: Any) -> Iterator[HsmSession]:
        used["opened"].append(",".join(r.label for r in records))
        with real_open(ctx, records, *args, **kwargs) as hsm:
            yield hsm

    def signing(self: HsmSession, message: bytes) -> bytes:
        used["signed"].append(self.record.label)
        return real_sign(self, message)

    monkeypatch.setattr(trusts, "open_hsm", opening)
    monkeypatch.setattr(HsmSession, "sign", signing)
    return used


def _successor(ctx: Context, t1: str, names: list[str], quorum: int) -> str:
    old = ctx.store.trust(t1)
    members = tuple(Member(n, ctx.store.operator(n).key) for n in names)
    proposal = Trust(old.serial + 1, old.id, old.hsms, members, quorum, utc_now())
    ctx.store.save_trust(proposal)
    return proposal.id


@pytest.mark.parametrize(
    ("names", "quorum", "signers", "missing", "whose"),
    [
        # its own quorum short (3 of alice, bob, carol; 2 signed), its predecessor's met
        (["alice", "bob", "carol"], 3, ["alice", "bob"], "carol", "its own"),
        # its own quorum met (dave, 1 of 1), its predecessor's short (alice, 1 of T1's 2)
        (["dave"], 1, ["dave", "alice"], "bob", "predecessor"),
    ],
    ids=["own-quorum", "predecessor-quorum"],
)
def test_no_hsm_signs_a_trust_whose_quorum_is_not_met(
    governed: tuple[Admin, Context, str],
    hsm_use: dict[str, list[str]],
    names: list[str],
    quorum: int,
    signers: list[str],
    missing: str,
    whose: str,
) -> None:
    """Fewer than quorum operators cannot get a Trust sealed (DESIGN.md §2.3), and they cannot
    even make an HSM sign it: a PKCS#11 token signs whatever its PIN holder asks, so a seal
    made and then refused still exists (in a log, a crash, a half-written store). With the
    check before signing removed, the verify after the seal still refused, but only once the
    HSM had signed; here no HSM is even opened. The baseline: with the missing approval added,
    the same call seals, one HSM signature."""
    admin, ctx, t1 = governed
    trust_id = _successor(ctx, t1, names, quorum)
    admin.sign(trust_id, *signers)
    with pytest.raises(QuorumNotMetError, match=f"{whose}.* quorum not met"):
        trusts.seal(ctx, trust_id)
    assert hsm_use == {"opened": [], "signed": []}
    assert not (admin.store / "seals" / trust_id).exists()
    admin.sign(trust_id, missing)
    sealed = trusts.seal(ctx, trust_id)
    assert sealed.trust.id == trust_id
    assert len(hsm_use["opened"]) == 1 and len(hsm_use["signed"]) == 1
    assert (admin.store / "seals" / trust_id / f"{sealed.seal.key_id}.json").exists()
