"""HSMs that a store writer lists in a proposal are seen by the people approving (review F2).

A Trust carries its HSMs' public keys. Whoever can write the store (here carol, one dishonest
operator) can write a proposal straight into ``trusts/`` that lists ``hsm2``, with the real
hsm2's ``created``, but with keys she holds in software. ``trust show`` printed the new short id
and nothing else; alice and bob signed, it sealed, and a rewrap wrapped the Domain's ``k`` to
carol's key. The operator-key counterpart is tests/integration/test_operator_key_swap.py.
"""

import json

import pytest

from kmsfs.model.records import HsmRecord
from kmsfs.model.trust import Trust
from kmsfs.service.context import utc_now
from kmsfs.store.documents import Store
from tests.kms_helpers import Admin, one_error_line, software_hsm, tree_snapshot


def _written_successor(admin: Admin, predecessor: str, hsms: tuple[HsmRecord, ...]) -> str:
    """A proposal succeeding *predecessor* with its operators and quorum but *hsms*, written
    straight into ``trusts/`` (no ``trust propose``): its id."""
    store = Store(admin.store)
    old = store.trust(predecessor)
    trust = Trust(old.serial + 1, predecessor, hsms, old.operators, old.quorum, utc_now())
    assert store.save_trust(trust)
    return trust.id


def _documents(admin: Admin) -> dict[str, bytes]:
    return {k: v for k, v in tree_snapshot(admin.store).items() if "tokens/" not in k}


@pytest.fixture
def swapped(initialized: Admin) -> tuple[Admin, str, str, str]:
    """T1 (hsm1, hsm2; alice, bob, carol; quorum 2) sealed; T2 written by carol, listing hsm2
    with keys in software. Returns the Admin, T2, the real hsm2's id and the fake's."""
    admin = initialized
    admin.create_operators("alice", "bob", "carol")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    old = Store(admin.store).trust(t1)
    real = next(h for h in old.hsms if h.label == "hsm2")
    fake = software_hsm("hsm2", real.created)[0]
    hsms = tuple(fake if h.label == "hsm2" else h for h in old.hsms)
    return admin, _written_successor(admin, t1, hsms), real.id, fake.id


def test_show_names_the_swapped_hsm(swapped: tuple[Admin, str, str, str]) -> None:
    admin, t2, real, fake = swapped
    text = admin("trust", "show", t2).stdout
    assert f"HSM CHANGE   hsm2: {real[:12]} in the predecessor, {fake[:12]} here" in text
    info = json.loads(admin("--json", "trust", "show", t2).stdout)
    assert info["hsm_changes"] == {
        "hsm2": {"before": real, "now": fake, "known_from": "predecessor"}
    }
    assert info["key_changes"] == {}


def test_approvers_sign_a_swapped_hsm_only_when_they_accept_it_by_label(
    swapped: tuple[Admin, str, str, str],
) -> None:
    """Refused before the PIN is read (the variable named for it is not even set), nothing
    written; accepting another label is not enough."""
    admin, t2, real, fake = swapped
    before = _documents(admin)
    no_pin = ["--pin-env", "KMSFS_TEST_PIN_NEVER_SET"]
    line = one_error_line(admin("trust", "sign", t2, "--as", "alice", *no_pin, check=3))
    assert "--accept-hsm-change LABEL" in line and f"hsm2: {real[:12]} -> {fake[:12]}" in line
    line = one_error_line(
        admin("trust", "sign", t2, "--as", "bob", *no_pin, "--accept-hsm-change", "hsm1", check=3)
    )
    assert "hsm2:" in line
    assert _documents(admin) == before
    pin = admin.pin_file("alice")
    out = admin(
        "trust", "sign", t2, "--as", "alice", "--pin-file", pin, "--accept-hsm-change", "hsm2"
    ).stdout
    assert "alice signed trust" in out


def test_a_new_hsm_that_no_record_knows_is_flagged(initialized: Admin) -> None:
    """A successor that adds an HSM the store never enrolled (no record in ``hsms/``)."""
    admin = initialized
    admin.create_operators("alice", "bob")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 1)
    old = Store(admin.store).trust(t1)
    new = software_hsm("hsm3")[0]
    t2 = _written_successor(admin, t1, (*old.hsms, new))
    text = admin("trust", "show", t2).stdout
    assert f"HSM CHANGE   hsm3: {new.id[:12]} is an HSM that neither the predecessor" in text
    info = json.loads(admin("--json", "trust", "show", t2).stdout)
    assert info["hsm_changes"] == {"hsm3": {"before": None, "now": new.id, "known_from": None}}
    pin = admin.pin_file("alice")
    line = one_error_line(admin("trust", "sign", t2, "--as", "alice", "--pin-file", pin, check=3))
    assert f"hsm3: unknown -> {new.id[:12]}" in line
    admin("trust", "sign", t2, "--as", "alice", "--pin-file", pin, "--accept-hsm-change", "hsm3")
    admin("trust", "seal", t2, "--hsm", "hsm1")


def test_a_planted_hsm_under_the_label_of_a_recorded_new_hsm_is_flagged(
    initialized: Admin,
) -> None:
    """hsm3 is enrolled (``hsm create``) to be added, which its predecessor cannot vouch for;
    a proposal written with keys in software as hsm3 is told apart by the store's record."""
    admin = initialized
    admin.create_operators("alice", "bob")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 1)
    real = admin("--json", "hsm", "create", "--label", "hsm3").json["id"]
    old = Store(admin.store).trust(t1)
    fake = software_hsm("hsm3")[0]
    t2 = _written_successor(admin, t1, (*old.hsms, fake))
    text = admin("trust", "show", t2).stdout
    assert f"HSM CHANGE   hsm3: {real[:12]} in the store's record, {fake.id[:12]} here" in text
    pin = admin.pin_file("bob")
    line = one_error_line(admin("trust", "sign", t2, "--as", "bob", "--pin-file", pin, check=3))
    assert f"hsm3: {real[:12]} -> {fake.id[:12]}" in line


def test_the_ordinary_ceremony_needs_no_option(initialized: Admin) -> None:
    """Genesis, its successor, a successor adding an HSM made with ``hsm create`` and proposed
    by label, and one that drops an HSM: proposed, signed and sealed with no --accept option,
    and ``trust show`` has no HSM CHANGE line for any of them."""
    admin = initialized
    admin.create_operators("alice", "bob")
    genesis = admin("--json", "trust", "list").json[0]["id"]
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 2)
    admin("hsm", "create", "--label", "hsm3")
    t2 = admin.sealed_trust(["hsm1", "hsm2", "hsm3"], ["alice", "bob"], 2, predecessor=t1)
    t3 = admin.sealed_trust(["hsm2", "hsm3"], ["alice", "bob"], 2, predecessor=t2)
    for trust in (genesis, t1, t2, t3):
        assert "HSM CHANGE" not in admin("trust", "show", trust).stdout
        assert admin("--json", "trust", "show", trust).json["hsm_changes"] == {}
    admin("trust", "verify", t3)
