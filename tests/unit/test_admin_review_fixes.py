"""Review fixes of kmsfs-admin, without tokens: a dead proposal of the genesis's successor,
duplicates on the command line, and names quoted as typed. (The real CLI on SoftHSM2 tokens:
tests/integration/test_trust_dead_proposals.py.)"""

from pathlib import Path

import pytest

from kmsfs.admin import cli, render
from kmsfs.errors import NotFoundError, UsageError
from kmsfs.model.trust import Trust
from kmsfs.model.verify import Anchor
from kmsfs.service import trusts
from kmsfs.service.context import Context
from tests.unit.model_fixtures import make_hsm, make_operator, make_trust


class NoPin:
    """A PIN source that fails the test if anything asks it for the PIN."""

    def read(self) -> str:
        raise AssertionError("the PIN was asked for")


def _store(tmp_path: Path) -> tuple[Context, Trust, Trust, Trust]:
    """A store with genesis G and two proposals of its successor, A (pinned) and B."""
    hsm1, hsm2 = make_hsm("hsm1"), make_hsm("hsm2")
    alice, bob = make_operator("alice"), make_operator("bob")
    genesis = make_trust([hsm1, hsm2])
    a = make_trust([hsm1, hsm2], [alice, bob], 2, genesis, created="2024-01-01T00:00:01Z")
    b = make_trust([hsm1, hsm2], [alice, bob], 2, genesis, created="2024-01-01T00:00:02Z")
    ctx = Context.at(tmp_path / "store")
    for trust in (genesis, a, b):
        ctx.store.save_trust(trust)
    for op in (alice, bob):
        ctx.store.save_operator(op.record())
    ctx.store.write_config(Anchor(genesis.id, a.id), new=True)
    return ctx, genesis, a, b


def test_a_rival_of_the_pinned_successor_is_dead(tmp_path: Path) -> None:
    ctx, genesis, a, b = _store(tmp_path)
    assert trusts.lost_to(ctx, b) == a.id
    assert trusts.lost_to(ctx, a) is None  # the pinned one itself
    assert trusts.lost_to(ctx, genesis) is None
    status = trusts.status(ctx, b.id)
    assert (status.state, status.lost_to, status.ready) == ("dead", a.id, False)
    assert status.to_dict()["state"] == "dead" and status.to_dict()["lost_to"] == a.id
    assert trusts.status(ctx, a.id).state == "proposed"  # not sealed in this stand-in
    row = render.trust_row(status)
    assert row["state"] == "dead" and row["lost_to"] == a.id
    assert render.trust_cells(row)["state"] == f"dead (lost to {a.id[:12]})"
    assert not cli._awaits(status, "alice")
    assert cli._awaits(trusts.status(ctx, a.id), "alice")


def test_an_unpinned_genesis_has_no_dead_proposal(tmp_path: Path) -> None:
    ctx, genesis, a, b = _store(tmp_path)
    ctx.store.write_config(Anchor(genesis.id, None))
    assert trusts.lost_to(ctx, a) is None and trusts.lost_to(ctx, b) is None


def test_signing_a_dead_proposal_is_refused_before_the_pin(tmp_path: Path) -> None:
    ctx, _, a, b = _store(tmp_path)
    with pytest.raises(UsageError, match=f"trust {b.id[:12]} can never be sealed.*{a.id[:12]}"):
        trusts.approve(ctx, b.id, "alice", NoPin())  # type: ignore[arg-type]
    assert ctx.store.signatures("approval", b.id) == []


def test_the_seal_refusal_advises_only_what_seal_or_propose_can_do(tmp_path: Path) -> None:
    ctx, genesis, a, b = _store(tmp_path)
    anchor = ctx.store.anchor()
    with pytest.raises(UsageError) as sealing:
        trusts._check_genesis_successor(anchor, genesis.id, b.id)
    assert "give --predecessor" not in str(sealing.value)
    assert "already has its successor" in str(sealing.value)
    with pytest.raises(UsageError, match="give --predecessor"):
        trusts._check_genesis_successor(anchor, genesis.id)  # proposing: the option helps
    trusts._check_genesis_successor(anchor, genesis.id, a.id)  # sealing the pinned one again


def test_only_pending_identical_proposals_are_duplicates(tmp_path: Path) -> None:
    ctx, genesis, a, b = _store(tmp_path)
    ctx.store.write_config(Anchor(genesis.id, None))  # both pending
    assert [s.trust.id for s in trusts.pending_duplicates(ctx, b)] == [a.id]
    ctx.store.write_config(Anchor(genesis.id, a.id))  # B dead; A the pinned one
    assert trusts.pending_duplicates(ctx, a) == []


@pytest.mark.parametrize("option", ["--hsm", "--operator"])
def test_a_repeated_value_is_a_usage_error(option: str) -> None:
    cli._refuse_repeats(option, ["a", "b"])
    with pytest.raises(UsageError, match=f"^{option} a is given twice$"):
        cli._refuse_repeats(option, ["a", "b", "a"])


def test_a_name_is_quoted_as_typed_with_a_case_hint(tmp_path: Path) -> None:
    ctx = Context.at(tmp_path / "store")
    ctx.store.save_hsm(make_hsm("hsm1").record)
    ids = ctx.store.hsm_ids()
    with pytest.raises(NotFoundError) as wrong_case:
        ctx.store.resolve("HSM", "HSM1", ids)
    assert "no HSM 'HSM1'" in str(wrong_case.value)
    assert "names are case-sensitive; did you mean hsm1?" in str(wrong_case.value)
    with pytest.raises(NotFoundError) as other:
        ctx.store.resolve("HSM", "hsm9", ids)
    assert "did you mean" not in str(other.value)
    with pytest.raises(NotFoundError, match="no trust 'ABCDEF'"):
        ctx.store.resolve("trust", "ABCDEF", ["0123"])
    assert ctx.store.resolve("HSM", ids[0][:8].upper(), ids) == ids[0]  # ids: any case
