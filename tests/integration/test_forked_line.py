"""A superseded Trust's old quorum cannot get a Domain's keys through a rival line (review).

A successor needs its predecessor's quorum, counted over the predecessor's operators, and a
Trust keeps that power once superseded. So after T2 removed carol from T1 (her key stolen),
carol's key and one dishonest operator still make T1's quorum: they approve a rival successor
R2 of T1 that lists an "HSM" whose keys they hold in software, seal it with that key, and add
R3 after it. Every link verifies. Rewrapped into that line, a Domain's fresh ``k`` would be
wrapped to their key, and ``mk`` theirs. A store that sealed (or verified) T2 holds it as the
head of its line, and nothing wraps a key on a rival line of it: not the store's commands, not
the agent (test_line_head.py: the head itself, a rollback, a fork after the head, trust pin).

Also here: the agent never seals a second successor of the genesis, ``fork`` or not, while
its store holds one that verifies (review: any client allowed ``seal-trust``, with no PIN,
could pin its own there).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from kmsfs.agent.policy import Peer
from kmsfs.agent.protocol import Request
from kmsfs.agent.service import Agent
from kmsfs.errors import UsageError
from kmsfs.model.canonical import b64encode
from kmsfs.model.domain import SealedDomain
from kmsfs.model.verify import Anchor
from kmsfs.service import domains, trusts
from kmsfs.service.context import Context
from tests.integration.line_helpers import Forked, documents, forked_line, operators_policy
from tests.kms_helpers import (
    Admin,
    drop_trusts,
    one_error_line,
    rogue_genesis_successor,
    tree_snapshot,
)


@pytest.fixture
def forked(tmp_path: Path) -> Forked:
    """T1 governs payroll, T2 removes carol (the store's head), and the rival line R2 -> R3
    of T1 that bob and carol's revoked key sealed (:func:`line_helpers.forked_line`)."""
    return forked_line(tmp_path)


def test_no_domain_key_is_wrapped_on_a_line_a_rival_of_removed_operators_forks(
    forked: Forked,
) -> None:
    """The store sealed T2, so T2 is the head of its line: the rival line R2 -> R3 is refused
    for every Domain key. (Before heads were kept this was the fork refusal, and the honest
    line was refused too while the rival was there: test_line_head.py has both now.)"""
    admin, _, t2, (r2, r3), _ = forked
    # The rival line verifies: a removed operator keeps its vote over successors of T1.
    admin("trust", "verify", r3)
    before = tree_snapshot(admin.store / "domains")
    for args in (["domain", "rewrap", "payroll", "--trust", r3],
                 ["domain", "create", "stolen", "--trust", r3]):
        line = one_error_line(admin(*args, check=2))
        assert f"trust {r3[:12]} is not on this store's line of Trusts: its link {r2[:12]} " \
            f"is a rival of {t2[:12]}" in line, line
        assert tree_snapshot(admin.store / "domains") == before
    # The honest line is the store's: the rival planted beside it does not block it.
    assert admin("--json", "domain", "rewrap", "payroll", "--trust", t2).json["generation"] == 2
    # And the rival line still gets nothing: payroll is T2's now.
    before = tree_snapshot(admin.store / "domains")
    one_error_line(admin("domain", "rewrap", "payroll", "--trust", r3, check=2))
    assert tree_snapshot(admin.store / "domains") == before
    assert domains.current(Context.at(admin.store), "payroll").trust.id == t2


def test_the_agent_wraps_no_domain_key_on_a_forked_line(forked: Forked) -> None:
    """A client allowed ``rewrap`` sends the rival chain: the agent's store holds T2 as its
    head, and refuses a chain off its line before it keeps any of it (a rival line kept
    would have blocked the honest rewrap before heads were kept); no generation is made."""
    admin, _, t2, (r2, r3), agent_store = forked
    ctx = Context.at(admin.store)
    bundle = domains.export_bundle(ctx, "payroll")
    chain = trusts.verified_chain(ctx, r3)
    agent = Agent(agent_store, operators_policy())
    peer = Peer.local(os.getuid())
    before = tree_snapshot(agent_store / "domains")
    try:
        with pytest.raises(UsageError, match=rf"its link {r2[:12]} is a rival of {t2[:12]}"):
            agent.handle(peer, Request(1, "rewrap", {
                "bundle": b64encode(bundle.to_bytes()), "trust": r3,
                "chain": [link.to_dict() for link in chain]}))
        with pytest.raises(UsageError, match="not on this store's line of Trusts"):
            agent.handle(peer, Request(2, "create-domain", {
                "name": "stolen", "trust": r3, "chain": [link.to_dict() for link in chain]}))
        # Nothing of the rival line was kept: the honest rewrap into T2 goes through.
        assert not (agent_store / "trusts" / f"{r2}.json").exists()
        honest = trusts.verified_chain(ctx, t2)
        assert tree_snapshot(agent_store / "domains") == before
        done = agent.handle(peer, Request(3, "rewrap", {
            "bundle": b64encode(bundle.to_bytes()), "trust": t2,
            "chain": [link.to_dict() for link in honest]}))
        made = SealedDomain.from_dict(done["domain"]).domain
        assert (made.generation, made.trust) == (2, t2)
    finally:
        agent.close()


def test_the_agent_never_seals_a_second_successor_of_the_genesis(tmp_path: Path) -> None:
    """The agent's store got the operators' sealed T1 by sync and has not pinned it yet (the
    guide's `trust pin` on the agent's host not run): a client allowed to seal there (even
    ``seal-genesis-successor``) with a key of its own, no operator of the store, asks for a
    rival successor of the genesis with ``fork``. Refused, nothing written; the operators' T1
    is then pinned as the guide says."""
    admin = Admin.under(tmp_path)
    admin("init", "--hsms", "2")
    agent_store = admin.copy(tmp_path / "agent-store").store
    admin.create_operators("alice", "bob")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 2)
    for sub in ("trusts", "approvals", "seals", "operators"):  # the sync (private/ excluded)
        shutil.copytree(admin.store / sub, agent_store / sub, dirs_exist_ok=True)
    actx = Context.at(agent_store)
    assert actx.store.anchor().successor is None
    genesis = trusts.verified_chain(actx, actx.store.anchor().root)[0]
    rogue, approval = rogue_genesis_successor(genesis, "alice")
    agent = Agent(agent_store, operators_policy())
    before = documents(agent_store)
    try:
        for fork in (True, False):
            with pytest.raises(UsageError, match=rf"another verified successor of the genesis "
                               rf"\({t1}\).*trust pin ID', then seal"):
                agent.handle(Peer.local(os.getuid()), Request(1, "seal-trust", {
                    "trust": rogue.payload(), "approvals": [approval.to_dict("approval")],
                    "chain": [genesis.to_dict()], "fork": fork}))
    finally:
        agent.close()
    assert documents(agent_store) == before
    assert Context.at(agent_store).store.anchor().successor is None
    Admin(agent_store, admin.pins)("trust", "pin", t1)
    assert Context.at(agent_store).store.anchor().successor == t1
    # Nor does a store's own `trust seal --fork` (an operators' second proposal), in a copy of
    # the operators' store with its pin taken out, as a store that got T1 by sync has none.
    there = admin.copy(tmp_path / "synced")
    Context.at(there.store).store.write_config(Anchor(genesis.id))
    second = there.propose(["hsm1", "hsm2"], ["alice", "bob"], 2, predecessor=genesis.id)
    there.sign(second, "alice", "bob")
    line = one_error_line(there("trust", "seal", second, "--fork", check=2))
    assert f"another verified successor of the genesis ({t1})" in line, line
    assert not (there.store / "seals" / second).exists()


def test_a_generation_made_on_the_rival_line_elsewhere_is_neither_imported_nor_rotated(
    forked: Forked, tmp_path: Path,
) -> None:
    """A replica copied before T2 (its head T1) gets the rival line and never T2: it sees no
    fork and follows R2 -> R3 (trust on first use, the documented limit), and rewraps payroll
    into R3. The operators' store, whose head is T2, does not take that generation in. Once
    T2 reaches the replica, its head (R3 by then, moved there by itself) does not make the
    rival line its own: the operators chose only up to T1, so the fork is refused there as
    before heads were kept, and no key epoch is added under the rival's k (review of the
    day: with the head alone deciding, the rotate was allowed). Its operators then pin T2,
    and the rival line is a rival."""
    admin, t1, t2, (r2, r3), _ = forked
    replica = admin.copy(tmp_path / "replica")
    drop_trusts(replica.store, [t2])
    assert Context.at(replica.store).store.set_head(t1, expect=t2, decided=t1)  # before T2
    replica("domain", "rewrap", "payroll", "--trust", r3)
    assert Context.at(replica.store).store.head() == r3
    bundle = replica.export("payroll", tmp_path / "payroll.json")
    before = tree_snapshot(admin.store / "domains")
    line = one_error_line(admin("domain", "import", str(bundle), check=2))
    assert "not on this store's line of Trusts" in line and "take in a Domain generation" in line
    assert tree_snapshot(admin.store / "domains") == before
    for kind in ("trusts", "approvals", "seals"):  # the sync brings T2
        shutil.copytree(admin.store / kind, replica.store / kind, dirs_exist_ok=True)
    rows = {r["id"]: r for r in replica("--json", "trust", "list").json}
    assert rows[r3]["head"] and rows[t2]["line"] == "rival" and rows[t2]["rivals"] == [r2]
    before = tree_snapshot(replica.store / "domains")
    line = one_error_line(replica("domain", "rotate", "payroll", check=2))
    assert f"its link {r2[:12]} has the rival {t2[:12]}" in line and "forks" in line, line
    assert tree_snapshot(replica.store / "domains") == before
    # The replica's operators choose the honest line by naming T2: no file to remove.
    pinned = replica("--json", "trust", "pin", t2).json
    assert (pinned["head"], pinned["head_moved"]) == (t2, True)
    line = one_error_line(replica("domain", "rotate", "payroll", check=2))
    assert "not on this store's line of Trusts" in line and "add a key epoch" in line, line
    assert tree_snapshot(replica.store / "domains") == before
