"""Records planted by a store writer are seen by the people approving (DESIGN.md §2.3).

Operator records are only self-signed, so whoever can write the store (here carol, one
dishonest operator) can put a key of her own under bob's name while she proposes a Trust, and
put bob's record back. The names then read as expected; before this was checked, alice's and
bob's approvals plus one forged as "bob" sealed a Trust that carol controls.
"""

import contextlib
import json
import shutil
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from kmsfs.model import contexts
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.records import OperatorRecord
from kmsfs.store.documents import Store
from tests.kms_helpers import Admin, one_error_line, self_signed, software_hsm, tree_snapshot


def _raw_public(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _plant_record(admin: Admin, name: str) -> tuple[OperatorRecord, PublicKey]:
    """Put a record of a key the store writer holds in place of operator *name*'s: (the real
    record, the planted key)."""
    store = Store(admin.store)
    real = store.operator(name)
    fake = ed25519.Ed25519PrivateKey.generate()
    planted = PublicKey("ed25519", _raw_public(fake))
    (admin.store / "operators" / f"{name}.json").unlink()
    store.save_operator(self_signed(
        OperatorRecord(name, planted, real.protection, real.created), fake, contexts.OPERATOR_RECORD
    ))
    return real, planted


@contextlib.contextmanager
def _planted_for_a_while(admin: Admin, name: str) -> Iterator[tuple[OperatorRecord, PublicKey]]:
    """:func:`_plant_record` for the block; the real record is put back after it."""
    path = admin.store / "operators" / f"{name}.json"
    saved = path.with_suffix(".saved")
    shutil.copy(path, saved)
    try:
        yield _plant_record(admin, name)
    finally:
        shutil.move(saved, path)


@pytest.fixture
def swapped(initialized: Admin) -> tuple[Admin, str]:
    """T1 (alice, bob, carol; quorum 2) sealed; T2 proposed while bob.json held carol's key."""
    admin = initialized
    admin.create_operators("alice", "bob", "carol")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    with _planted_for_a_while(admin, "bob"):
        t2 = admin.propose(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2, predecessor=t1)
    return admin, t2


def test_show_names_the_changed_key(swapped: tuple[Admin, str]) -> None:
    admin, t2 = swapped
    text = admin("trust", "show", t2).stdout
    assert "KEY CHANGE   operator bob:" in text
    info = json.loads(admin("--json", "trust", "show", t2).stdout)
    assert list(info["key_changes"]) == ["bob"]
    bob = next(o for o in info["operator_keys"] if o["name"] == "bob")
    assert bob["key_id"] == info["key_changes"]["bob"]["now"]
    assert bob["key_id"] != info["key_changes"]["bob"]["before"]


def test_the_real_operator_refuses_a_trust_with_another_key_under_his_name(
    swapped: tuple[Admin, str],
) -> None:
    admin, t2 = swapped
    before = tree_snapshot(admin.store)
    line = one_error_line(
        admin("trust", "sign", t2, "--as", "bob", "--pin-file", admin.pin_file("bob"), check=3)
    )
    assert "lists operator bob with key" in line and "not yours" in line
    assert tree_snapshot(admin.store) == before


def test_an_operator_whose_record_was_replaced_and_left_cannot_approve(
    initialized: Admin,
) -> None:
    """The store writer leaves the planted record in place, for a member new in T2, whose key
    no predecessor lists: nobody sees a key change, and the Trust names the planted key just
    as the record does. The operator's own signature is where it shows: it does not verify
    under that key. Saved anyway, it took the planted key's approval slot with junk, which the
    writer could then overwrite with a real signature of theirs and seal."""
    admin = initialized
    admin.create_operators("alice", "bob", "carol", "dave")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    _, planted = _plant_record(admin, "dave")
    t2 = admin.propose(
        ["hsm1", "hsm2"], ["alice", "bob", "carol", "dave"], 2, predecessor=t1
    )
    assert "KEY CHANGE" not in admin("trust", "show", t2).stdout

    def documents() -> dict[str, bytes]:  # SoftHSM rewrites token files at each login
        return {k: v for k, v in tree_snapshot(admin.store).items() if "tokens/" not in k}

    before = documents()
    line = one_error_line(
        admin("trust", "sign", t2, "--as", "dave", "--pin-file", admin.pin_file("dave"), check=3)
    )
    assert f"is not the key {planted.key_id[:12]}" in line and "operators/dave.json" in line
    assert documents() == before


def test_a_new_operator_listed_with_another_key_than_its_record_is_a_key_change(
    initialized: Admin,
) -> None:
    """dave is new in T2, so no predecessor lists him; the store writer plants a record of a
    key of theirs as dave's, proposes, and puts the real record back. dave's own signature is
    not needed for the quorum, so only the record can show it (review F2): it does, and the
    others sign only when they accept it by name."""
    admin = initialized
    admin.create_operators("alice", "bob", "carol", "dave")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    with _planted_for_a_while(admin, "dave") as (real, planted):
        t2 = admin.propose(["hsm1", "hsm2"], ["alice", "bob", "carol", "dave"], 2, predecessor=t1)
    text = admin("trust", "show", t2).stdout
    assert (
        f"KEY CHANGE   operator dave: {real.key.key_id[:12]} in operators/dave.json, "
        f"{planted.key_id[:12]} here" in text
    )
    info = json.loads(admin("--json", "trust", "show", t2).stdout)
    assert info["key_changes"] == {
        "dave": {"before": real.key.key_id, "now": planted.key_id, "known_from": "record"}
    }
    pin = admin.pin_file("alice")
    line = one_error_line(admin("trust", "sign", t2, "--as", "alice", "--pin-file", pin, check=3))
    assert f"dave: {real.key.key_id[:12]} -> {planted.key_id[:12]}" in line
    out = admin(
        "trust", "sign", t2, "--as", "alice", "--pin-file", pin, "--accept-key-change", "dave"
    ).stdout
    assert "alice signed trust" in out


def test_a_new_operator_whose_record_is_gone_is_a_key_change(initialized: Admin) -> None:
    """The store writer moves dave's record away while the proposal listing a key of theirs as
    dave's is shown and signed (review of the fix above: a missing record was no change)."""
    admin = initialized
    admin.create_operators("alice", "bob", "carol", "dave")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    t2 = admin.propose(["hsm1", "hsm2"], ["alice", "bob", "carol", "dave"], 2, predecessor=t1)
    now = Store(admin.store).operator("dave").key.key_id
    (admin.store / "operators" / "dave.json").unlink()
    text = admin("trust", "show", t2).stdout
    assert (f"KEY CHANGE   operator dave: no key in the predecessor nor in "
            f"operators/dave.json, {now[:12]} here") in text
    info = json.loads(admin("--json", "trust", "show", t2).stdout)
    assert info["key_changes"] == {"dave": {"before": None, "now": now, "known_from": None}}
    pin = admin.pin_file("alice")
    line = one_error_line(admin("trust", "sign", t2, "--as", "alice", "--pin-file", pin, check=3))
    assert f"dave: unknown -> {now[:12]}" in line
    admin("trust", "sign", t2, "--as", "alice", "--pin-file", pin, "--accept-key-change", "dave")


def test_new_operators_with_their_recorded_keys_are_no_key_change(initialized: Admin) -> None:
    """The ordinary ceremony: the genesis's successor (every operator new) and a successor
    adding dave, proposed from the records, sign and seal with no --accept option."""
    admin = initialized
    admin.create_operators("alice", "bob", "dave")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 2)
    t2 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "dave"], 2, predecessor=t1)
    for trust in (t1, t2):
        assert admin("--json", "trust", "show", trust).json["key_changes"] == {}


def test_others_approve_a_key_change_only_when_they_accept_it_by_name(
    swapped: tuple[Admin, str],
) -> None:
    admin, t2 = swapped
    pin = admin.pin_file("alice")
    line = one_error_line(admin("trust", "sign", t2, "--as", "alice", "--pin-file", pin, check=3))
    assert "changes the key of operator(s)" in line and "bob:" in line
    admin(
        "trust",
        "sign",
        t2,
        "--as",
        "alice",
        "--pin-file",
        pin,
        "--accept-key-change",
        "carol",
        check=3,
    )  # accepting another name is not enough
    out = admin(
        "trust", "sign", t2, "--as", "alice", "--pin-file", pin, "--accept-key-change", "bob"
    ).stdout
    assert "alice signed trust" in out


def test_a_successor_that_keeps_every_key_signs_without_questions(initialized: Admin) -> None:
    admin = initialized
    admin.create_operators("alice", "bob")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 1)
    t2 = admin.sealed_trust(["hsm1"], ["alice", "bob"], 1, signers=["alice"], predecessor=t1)
    assert "KEY CHANGE" not in admin("trust", "show", t2).stdout


def test_a_planted_hsm_record_under_a_known_label_is_refused(initialized: Admin) -> None:
    """The same store writer plants a self-signed HSM record labelled hsm2, keys in software:
    ``--hsm hsm2`` must not pick it (it sorted first by id, and its wrap key got ``k``)."""
    admin = initialized
    admin.create_operators("alice")
    store = Store(admin.store)
    real = next(store.hsm(i) for i in store.hsm_ids() if store.hsm(i).label == "hsm2")
    planted, sign = software_hsm("hsm2", real.created)
    store.save_hsm(self_signed(planted, sign, contexts.HSM_RECORD))
    before = sorted(p.name for p in (admin.store / "trusts").rglob("*"))
    line = one_error_line(
        admin(
            "trust",
            "propose",
            "--hsm",
            "hsm1",
            "--hsm",
            "hsm2",
            "--operator",
            "alice",
            "--quorum",
            "1",
            check=3,
        )
    )
    assert "2 HSM records in the store carry the label 'hsm2'" in line
    assert sorted(p.name for p in (admin.store / "trusts").rglob("*")) == before
    trust = admin.propose(["hsm1", real.id[:12]], ["alice"], 1)  # by id it is unambiguous
    assert real.id[:12] in admin("trust", "show", trust).stdout
