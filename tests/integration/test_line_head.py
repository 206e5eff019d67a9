"""The head of a store's line of Trusts, pinned in its private area (threat model, section 3,
"Forks"; kmsfs.model.line).

A superseded Trust keeps its quorum over its successors: after T2 removed carol from T1 (her
key stolen), carol's key and bob still make T1's quorum and seal a rival line R2 -> R3 of T1
that lists a software "HSM" of theirs (line_helpers.forked_line). Before heads were kept, a
store followed whatever its public documents held: whoever can write them deleted T2 and
planted R2, the store saw no fork and wrapped a Domain's fresh k to the rival's key (a
rollback); or planted R2 beside T2, and the honest line was refused as forked (a denial of
service). Now each store pins the newest Trust of its line it verified, forward only.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmsfs import exitcodes
from kmsfs.agent.policy import Peer
from kmsfs.agent.protocol import Request
from kmsfs.agent.service import Agent
from kmsfs.errors import ChainError, UsageError
from kmsfs.model.canonical import b64encode
from kmsfs.model.domain import SealedDomain
from kmsfs.service import domains, trusts
from kmsfs.service.context import Context
from tests.integration.line_helpers import (
    Forked,
    copy_trusts,
    documents,
    forked_line,
    operators_policy,
)
from tests.kms_helpers import Admin, drop_trusts, one_error_line


@pytest.fixture
def forked(tmp_path: Path) -> Forked:
    """T1 governs payroll, T2 removes carol (the operators' store sealed it: its head), and
    the rival line R2 -> R3 of T1 sealed with bob and carol's revoked key, planted there."""
    return forked_line(tmp_path)


def _head(store: Path) -> str | None:
    return Context.at(store).store.head()


def _rival_hsm(store: Path, rival: str) -> str:
    """The id of the software "HSM" (hsm3) the rival line lists."""
    (fake,) = [h for h in Context.at(store).store.trust(rival).hsms if h.label == "hsm3"]
    return fake.id


def _wrapped_for(store: Path) -> set[str]:
    """Every HSM any Domain document of *store* has a key wrapped for."""
    ctx = Context.at(store)
    return {w.hsm for i in ctx.store.domain_ids() for w in ctx.store.domain(i).domain.wrapped_k}


def test_a_rollback_to_the_rival_line_is_refused_and_wraps_no_key(forked: Forked) -> None:
    """The store saw T2 (its head); then whoever writes its public documents deletes T2 and
    leaves the rival line R2 -> R3, which no longer forks from anything the store holds.
    Create, rewrap, rotate (and kmsfs init of a volume) are refused with one line naming the
    lost head, exit 3, and nothing in the store changes; the rival's software HSM never gets
    a key."""
    admin, _, t2, (r2, r3), _ = forked
    assert _head(admin.store) == t2
    drop_trusts(admin.store, [t2])
    fake = _rival_hsm(admin.store, r2)
    admin("trust", "verify", r3)  # every link of the planted line verifies
    before = documents(admin.store)
    for args in (["domain", "rewrap", "payroll", "--trust", r3],
                 ["domain", "rewrap", "payroll", "--trust", r2],
                 ["domain", "rotate", "payroll"],
                 ["domain", "create", "stolen", "--trust", r3],
                 ["domain", "verify", "payroll"]):
        line = one_error_line(admin(*args, check=exitcodes.VERIFICATION))
        assert f"this store's head, trust {t2[:12]}" in line, (args, line)
        assert "lost the newest link of its line of Trusts (a rollback, or a sync from an " \
            "older copy); restore it from a sync or a backup" in line, line
        assert documents(admin.store) == before, args
    assert fake not in _wrapped_for(admin.store)
    # Nor is a volume bound to it: kmsfs init (as a mount) describes the Domain by the line.
    volume = admin.store.parent / "volume"
    volume.mkdir()
    made = subprocess.run([sys.executable, "-m", "kmsfs.fs.cli", "init", str(volume),
                           "--domain", "payroll"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KMSFS_STORE": str(admin.store)}, check=False)
    assert made.returncode == exitcodes.VERIFICATION, made.stderr
    assert f"this store's head, trust {t2[:12]}" in made.stderr
    assert list(volume.iterdir()) == []
    assert documents(admin.store) == before
    # trust list still works, so the operators can see it, and says what happened.
    listed = admin("trust", "list")
    assert f"this store's head, trust {t2[:12]}" in listed.stderr
    assert documents(admin.store) == before
    # The sync that restores T2 ends it: T2 is the head again, the rival line still refused.
    copy_trusts(forked[4], admin.store, [t2])  # the agent's store, copied after T2's seal
    admin("domain", "rewrap", "payroll", "--trust", t2)
    one_error_line(admin("domain", "rewrap", "payroll", "--trust", r3, check=2))
    assert fake not in _wrapped_for(admin.store)


def test_a_rival_planted_beside_the_head_no_longer_blocks_the_honest_line(
    forked: Forked,
) -> None:
    """The store holds T2 (its head) and the planted, sealed rival R2 of T1: a rewrap into T2
    works and wraps k to T2's HSMs only; a rotate after it too; T1's successor is T2, not the
    rival line's newest link; trust list still shows the rival, and which Trust is the head."""
    admin, t1, t2, (r2, r3), _ = forked
    # T1's successor is T2, never the rival line's newest link R3 (deeper than T2).
    assert admin("--json", "domain", "verify", "payroll").json["superseded_by"] == t2
    done = admin("--json", "domain", "rewrap", "payroll", "--trust", t2).json
    assert (done["generation"], done["trust"]) == (2, t2)
    t2_hsms = {h.id for h in Context.at(admin.store).store.trust(t2).hsms}
    made = domains.current(Context.at(admin.store), "payroll").sealed.domain
    assert {w.hsm for w in made.wrapped_k} == t2_hsms
    assert _rival_hsm(admin.store, r2) not in _wrapped_for(admin.store)
    admin("domain", "rotate", "payroll")
    listed = admin("--json", "trust", "list")
    rows = {r["id"]: r for r in listed.json}
    assert [i for i, r in rows.items() if r["head"]] == [t2]
    assert rows[t2]["rivals"] == [r2] and rows[r2]["rivals"] == [t2]
    assert (rows[t1]["line"], rows[r2]["line"], rows[r3]["line"]) == (
        "before-head", "rival", "rival")
    assert f"trusts {min(t2, r2)[:12]} and {max(t2, r2)[:12]} are sealed successors" \
        in listed.stderr
    table = admin("trust", "list").stdout
    (head_row,) = [x for x in table.splitlines() if x.startswith(t2[:12])]
    assert "head" in head_row
    (rival_row,) = [x for x in table.splitlines() if x.startswith(r2[:12])]
    assert "rival line" in rival_row
    shown = admin("--json", "trust", "show", t2).json
    assert shown["head"] is True and shown["line"] == "head"
    assert "NOT on this store's line" in admin("trust", "show", r3).stdout


@pytest.fixture
def fork_after_head(tmp_path: Path) -> tuple[Admin, Admin, str, str, str]:
    """The operators' store: T1 governs payroll; T2a and T2b are both sealed successors of T1
    (``--fork``). A replica copied while T1 was the newest (its head T1) gets both by sync:
    two sealed successors of its head. Returns (operators, replica, T1, T2a, T2b)."""
    admin = Admin.under(tmp_path)
    admin("init", "--hsms", "2")
    admin.create_operators("alice", "bob")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 1)
    admin("domain", "create", "payroll", "--trust", t1)
    replica = admin.copy(tmp_path / "replica")
    t2a = admin.sealed_trust(["hsm1", "hsm2"], ["alice"], 1, predecessor=t1)
    t2b = admin.sealed_trust(["hsm1"], ["bob"], 1, predecessor=t1, fork=True)
    copy_trusts(admin.store, replica.store, [t2a, t2b])
    return admin, replica, t1, t2a, t2b


def test_a_fork_after_the_head_is_still_refused(
    fork_after_head: tuple[Admin, Admin, str, str, str],
) -> None:
    """Two sealed successors of the replica's head are a fork it has not decided: its head
    stays, and no key is wrapped into either line until the operators pin one."""
    _, replica, t1, t2a, t2b = fork_after_head
    before = documents(replica.store)
    for trust, rival in ((t2a, t2b), (t2b, t2a)):
        line = one_error_line(replica("domain", "rewrap", "payroll", "--trust", trust,
                                      check=2))
        assert f"its link {trust[:12]} has the rival {rival[:12]}" in line, line
    assert documents(replica.store) == before
    assert _head(replica.store) == t1  # not moved into either line


def test_trust_pin_moves_the_head_forward_only(
    fork_after_head: tuple[Admin, Admin, str, str, str],
) -> None:
    """``trust pin`` settles the fork after the head by naming one line; it then refuses to
    move the head back, or sideways to the other line (exit 2, nothing written)."""
    admin, replica, t1, t2a, t2b = fork_after_head
    pinned = replica("--json", "trust", "pin", t2a).json
    assert (pinned["head"], pinned["head_moved"], pinned["already_pinned"]) == (t2a, True, True)
    assert _head(replica.store) == t2a
    before = documents(replica.store)
    backwards = one_error_line(replica("trust", "pin", t1, check=exitcodes.USAGE))
    assert f"trust {t1[:12]} comes before trust {t2a[:12]}, which this store's operators " \
        "chose last" in backwards
    assert "nothing written" in backwards
    sideways = one_error_line(replica("trust", "pin", t2b, check=exitcodes.USAGE))
    assert f"trust {t2b[:12]} is on another line (its link {t2b[:12]} is a rival of " \
        f"{t2a[:12]}) than trust {t2a[:12]}" in sideways and "nothing written" in sideways
    again = replica("trust", "pin", t2a)
    assert f"its head was trust {t2a[:12]} already" in again.stdout
    assert documents(replica.store) == before
    # The line pinned is the store's: a rewrap into it works, the other line is a rival.
    replica("domain", "rewrap", "payroll", "--trust", t2a)
    line = one_error_line(replica("domain", "create", "other", "--trust", t2b, check=2))
    assert f"its link {t2b[:12]} is a rival of {t2a[:12]}" in line, line
    # A successor of T2a the operators seal reaches the replica by sync: its head follows
    # at the next command (one sealed successor of the head: no fork), and pin says so.
    t3 = admin.sealed_trust(["hsm1", "hsm2"], ["alice"], 1, predecessor=t2a)
    copy_trusts(admin.store, replica.store, [t3])
    replica("domain", "verify", "payroll")
    assert _head(replica.store) == t3
    assert replica("--json", "trust", "pin", t3).json["head_moved"] is False


def test_a_store_without_a_head_gets_one_at_first_use_unless_its_line_forks(
    forked: Forked, tmp_path: Path,
) -> None:
    """A store made before heads were kept has no private/head.json. Where its line does not
    fork, the first command that reads it writes one at the newest Trust; where it forks,
    none is written and the store refuses both lines, as before heads were kept, until
    ``trust pin`` names one."""
    admin, _, t2, (r2, r3), _ = forked
    plain = admin.copy(tmp_path / "plain")
    drop_trusts(plain.store, [r2, r3])
    (plain.store / "private" / "head.json").unlink()
    plain("domain", "verify", "payroll")
    assert _head(plain.store) == t2
    # The operators' store, with both lines, made before heads were kept.
    (admin.store / "private" / "head.json").unlink()
    before = documents(admin.store)
    for trust, link, rival in ((t2, t2, r2), (r3, r2, t2)):
        line = one_error_line(admin("domain", "rewrap", "payroll", "--trust", trust, check=2))
        assert f"its link {link[:12]} has the rival {rival[:12]}" in line, line
    assert "rival line" not in admin("trust", "list").stdout
    assert documents(admin.store) == before  # no head written
    admin("trust", "pin", t2)
    assert _head(admin.store) == t2
    admin("domain", "rewrap", "payroll", "--trust", t2)


def test_the_agent_enforces_its_own_stores_head(forked: Forked) -> None:
    """The agent's store holds T2 as its head (copied after T2's seal). Its public documents
    rolled back to the rival line: every request that sends a chain, rotates or opens a
    Domain is refused (ChainError, the lost head named) and nothing is written. With T2 back
    and the rival planted beside it, the honest rewrap goes through and the rival chain is
    refused."""
    admin, _, t2, (r2, r3), agent_store = forked
    assert _head(agent_store) == t2
    ctx = Context.at(admin.store)
    bundle = b64encode(domains.export_bundle(ctx, "payroll").to_bytes())
    rival = [link.to_dict() for link in trusts.verified_chain(ctx, r3)]
    honest = [link.to_dict() for link in trusts.verified_chain(ctx, t2)]
    saved = agent_store.parent / "agent-t2"
    copy_trusts(agent_store, saved, [t2])
    drop_trusts(agent_store, [t2])
    copy_trusts(admin.store, agent_store, [r2, r3])
    peer = Peer.local(os.getuid())
    agent = Agent(agent_store, operators_policy())
    try:
        before = documents(agent_store)
        for number, (action, args) in enumerate((
            ("rewrap", {"bundle": bundle, "trust": r3, "chain": rival}),
            ("create-domain", {"name": "stolen", "trust": r3, "chain": rival}),
            ("rotate", {"bundle": bundle}),
            ("open-domain", {"bundle": bundle}),
        )):
            with pytest.raises(ChainError, match=rf"this store's head, trust {t2[:12]}.*"
                               "lost the newest link of its line of Trusts"):
                agent.handle(peer, Request(number, action, args))
            assert documents(agent_store) == before, action
        assert _rival_hsm(agent_store, r2) not in _wrapped_for(agent_store)
        copy_trusts(saved, agent_store, [t2])  # restored: T2 and the planted rival both
        with pytest.raises(UsageError, match=rf"its link {r2[:12]} is a rival of {t2[:12]}"):
            agent.handle(peer, Request(7, "rewrap", {"bundle": bundle, "trust": r3,
                                                     "chain": rival}))
        done = agent.handle(peer, Request(8, "rewrap", {"bundle": bundle, "trust": t2,
                                                        "chain": honest}))
        made = SealedDomain.from_dict(done["domain"]).domain
        assert (made.generation, made.trust) == (2, t2)
        assert _rival_hsm(agent_store, r2) not in _wrapped_for(agent_store)
    finally:
        agent.close()
