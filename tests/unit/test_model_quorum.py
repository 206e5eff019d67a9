"""The quorum matrix of one Trust (kmsfs/model/trust.py, verify.py; DESIGN §2.2, §2.3).

T2 of the shared world has five operators (alice..erin) and quorum 3; its predecessor is the
genesis (quorum 0), so only T2's own quorum is at stake here. Each "counts zero" test puts the
suspicious approval next to two genuine ones: if it were counted, the quorum would be met.
"""

import dataclasses
import itertools
from collections.abc import Sequence

import pytest

from kmsfs.errors import IntegrityError, QuorumNotMetError
from kmsfs.model import contexts
from kmsfs.model.trust import SealedTrust, Signature, Trust, quorum_result
from kmsfs.model.verify import verify_trust
from tests.unit.model_fixtures import (
    SoftOperator,
    make_hsm,
    make_operator,
    make_trust,
    seal_trust,
    world,
)


def t2() -> Trust:
    return world().t2.trust


def ops(*names: str) -> list[SoftOperator]:
    return [world().op(n) for n in names]


def approvals(*names: str) -> list[Signature]:
    return [o.approve(t2()) for o in ops(*names)]


def check(extra: Sequence[Signature] = (), base: Sequence[str] = ("alice", "bob")) -> None:
    """verify_trust on T2 with a valid seal and the approvals of ``base`` plus ``extra``."""
    sealed = SealedTrust(t2(), (*approvals(*base), *extra), world().t2.seal)
    verify_trust(sealed, world().genesis)


def assert_counts_zero(extra: Sequence[Signature]) -> None:
    """With alice and bob, ``extra`` would reach the quorum of 3 only if it counted."""
    with pytest.raises(QuorumNotMetError, match="signed by 2"):
        check(extra)
    result = quorum_result(t2(), [*approvals("alice", "bob"), *extra], t2().operators, 3)
    assert result.signed == {"alice", "bob"}


# -- the threshold --------------------------------------------------------------------------------


def test_two_of_three_is_not_enough() -> None:
    with pytest.raises(QuorumNotMetError, match="signed by 2"):
        check()


def test_three_is_enough() -> None:
    """The positive control: every "counts zero" test differs from this one in one approval."""
    check(approvals("carol"))
    check(approvals("erin"), base=("dave", "carol"))
    check(approvals("alice", "bob", "carol", "dave", "erin"), base=())


def test_a_seal_alone_is_never_enough() -> None:
    """A valid HSM seal with no approvals does not make a Trust valid."""
    with pytest.raises(QuorumNotMetError, match="signed by 0"):
        check(base=())


def test_quorum_result_reports_names_without_raising() -> None:
    result = quorum_result(t2(), approvals("alice", "carol"), t2().operators, 3)
    assert not result.met
    assert result.threshold == 3
    assert result.signed == {"alice", "carol"}
    assert result.unsigned == {"bob", "dave", "erin"}


# -- approvals that must count zero ---------------------------------------------------------------


def test_same_operator_three_times_counts_once() -> None:
    """One operator's approval stored three times is one approval."""
    assert_counts_zero(approvals("alice", "alice", "alice"))
    with pytest.raises(QuorumNotMetError, match="signed by 1"):
        check(approvals("alice", "alice"), base=("alice",))


def test_non_member_counts_zero() -> None:
    """A valid approval by a key outside the Trust counts zero."""
    mallory = world().mallory
    assert_counts_zero([mallory.approve(t2())])


def test_approval_of_another_trust_counts_zero() -> None:
    """An approval of another Trust counts zero, also when relabelled with this Trust's id."""
    other = dataclasses.replace(t2(), created="2024-06-01T00:00:00Z")
    genuine = world().op("carol").approve(other)
    assert genuine.subject != t2().id
    assert_counts_zero([genuine])
    assert_counts_zero([dataclasses.replace(genuine, subject=t2().id)])


@pytest.mark.parametrize(
    "context",
    [
        contexts.HSM_SEALS_TRUST,
        contexts.OPERATOR_RECORD,
        contexts.HSM_SEALS_DOMAIN,
        contexts.HSM_RECORD,
        b"",
    ],
    ids=["hsm-seals-trust", "operator-record", "hsm-seals-domain", "hsm-record", "no-context"],
)
def test_signature_under_another_context_counts_zero(context: bytes) -> None:
    """carol's signature of T2's bytes for another purpose is not an approval."""
    carol = world().op("carol")
    value = carol.sign(context, t2().signed_bytes())
    assert_counts_zero([Signature(t2().id, carol.key_id, value)])


@pytest.mark.parametrize("signer", ["erin", "mallory"])
def test_nobody_can_sign_as_another_operator(signer: str) -> None:
    """A signature by key A labelled with carol's key id counts zero (for carol and for A)."""
    w = world()
    forger = w.mallory if signer == "mallory" else w.op(signer)
    value = forger.sign(contexts.OPERATOR_APPROVES_TRUST, t2().signed_bytes())
    assert_counts_zero([Signature(t2().id, w.op("carol").key_id, value)])


@pytest.mark.parametrize("value", [b"", b"\x00" * 64, b"\xff" * 64, b"\x00" * 65])
def test_garbage_signature_counts_zero(value: bytes) -> None:
    assert_counts_zero([Signature(t2().id, world().op("carol").key_id, value)])


# -- a Trust changed after it was signed ----------------------------------------------------------


def _changed_trusts() -> dict[str, Trust]:
    w = world()
    trust = t2()
    swapped = (*trust.operators[:4], dataclasses.replace(trust.operators[4], key=w.mallory.key))
    return {
        "quorum-lowered": dataclasses.replace(trust, quorum=2),
        "operator-key-swapped": dataclasses.replace(trust, operators=swapped),
        "operator-removed": dataclasses.replace(trust, operators=trust.operators[:4]),
        "hsm-added": dataclasses.replace(trust, hsms=(*trust.hsms, w.outsider.record)),
        "hsm-removed": dataclasses.replace(trust, hsms=trust.hsms[:1]),
        "created-changed": dataclasses.replace(trust, created="2099-01-01T00:00:00Z"),
    }


CHANGES = list(_changed_trusts())


@pytest.mark.parametrize("change", CHANGES)
def test_changed_trust_with_old_approvals_and_fresh_seal_fails(change: str) -> None:
    """Old approvals (relabelled to the new id) do not cover a changed payload, even when an
    HSM's PIN holder seals the changed Trust."""
    changed = _changed_trusts()[change]
    assert changed.id != t2().id
    old = [dataclasses.replace(a, subject=changed.id) for a in world().t2.approvals]
    sealed = SealedTrust(changed, tuple(old), world().h1.seal_trust(changed))
    with pytest.raises(QuorumNotMetError, match="signed by 0"):
        verify_trust(sealed, world().genesis)


@pytest.mark.parametrize("change", CHANGES)
def test_changed_trust_with_old_approvals_and_old_seal_fails(change: str) -> None:
    """Reusing the approvals and seal verbatim on a changed Trust fails."""
    changed = _changed_trusts()[change]
    sealed = SealedTrust(changed, world().t2.approvals, world().t2.seal)
    with pytest.raises(IntegrityError):
        verify_trust(sealed, world().genesis)


@pytest.mark.parametrize("change", CHANGES)
def test_changed_trust_with_old_seal_relabelled_fails(change: str) -> None:
    """Fresh approvals of the changed Trust do not make the old seal cover it."""
    changed = _changed_trusts()[change]
    members = [o for o in world().ops if any(m.key == o.key for m in changed.operators)]
    fresh = tuple(o.approve(changed) for o in members)
    seal = dataclasses.replace(world().t2.seal, subject=changed.id)
    if changed.hsm(seal.key_id) is None:  # hsm-removed dropped the sealer: seal with the other
        seal = dataclasses.replace(seal, key_id=world().h1.id)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_trust(SealedTrust(changed, fresh, seal), world().genesis)


# -- the seal -------------------------------------------------------------------------------------


def test_seal_by_hsm_outside_the_trust_fails() -> None:
    """A full quorum plus a seal by an HSM that is not in the Trust is rejected."""
    w = world()
    full = tuple(approvals("alice", "bob", "carol"))
    outside = SealedTrust(t2(), full, w.outsider.seal_trust(t2()))
    with pytest.raises(IntegrityError, match="not in trust"):
        verify_trust(outside, w.genesis)
    as_h1 = dataclasses.replace(w.outsider.seal_trust(t2()), key_id=w.h1.id)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_trust(SealedTrust(t2(), full, as_h1), w.genesis)


def test_seal_by_hsm_of_the_trust_over_another_trust_fails() -> None:
    """h1 is in T2, but its seal of another Trust does not seal T2."""
    w = world()
    other = make_trust(w.hsms, w.ops, 3, w.genesis, created="2024-06-01T00:00:00Z")
    full = tuple(approvals("alice", "bob", "carol"))
    relabelled = w.h1.seal_trust(other, subject=t2().id)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_trust(SealedTrust(t2(), full, relabelled), w.genesis)
    with pytest.raises(IntegrityError, match="another trust"):
        verify_trust(SealedTrust(t2(), full, w.h1.seal_trust(other)), w.genesis)


# -- tolerance ------------------------------------------------------------------------------------


def test_tolerance_five_operators_quorum_three() -> None:
    assert t2().tolerance() == {"forgery": 2, "denial": 2}


def test_tolerance_one_of_one() -> None:
    solo = make_trust([make_hsm("solo")], [make_operator("solo")], 1, world().genesis)
    assert solo.tolerance() == {"forgery": 0, "denial": 0}
    assert world().genesis.trust.tolerance() == {"forgery": 0, "denial": 0}


def test_tolerance_matches_what_verification_accepts() -> None:
    """Any `forgery` operators together fail; any quorum-sized group succeeds, even when
    `denial` operators refuse to sign."""
    w = world()
    tolerance = t2().tolerance()
    for group in itertools.combinations(w.ops, tolerance["forgery"]):
        with pytest.raises(QuorumNotMetError):
            verify_trust(seal_trust(t2(), group, w.h1), w.genesis)
    for group in itertools.combinations(w.ops, len(w.ops) - tolerance["denial"]):
        verify_trust(seal_trust(t2(), group, w.h1), w.genesis)
