"""The quorum matrix (DESIGN.md §2.2, §2.3): 5 operators, quorum 3, real tokens, real CLI.

Dishonest parties are simulated with what they would really hold: an operator's own token and
PIN, or an HSM's PIN (which lets them make the HSM sign anything), and write access to the store.
"""

import json
from pathlib import Path

import pytest

from kmsfs import exitcodes
from kmsfs.model import contexts
from kmsfs.model.trust import Member, Signature, Trust
from kmsfs.service import operators
from kmsfs.service.context import Context, open_hsm
from tests.kms_helpers import Admin, drop_rivals, hsm_seal, one_error_line

# Each test proposes a different HSM list: identical proposals made in the same second are
# the same content-addressed document.
MEMBERS = ["alice", "bob", "carol", "dave", "erin"]


@pytest.fixture(scope="module")
def matrix(ceremony: Admin) -> Admin:
    """The ceremony's store with ``base``, the genesis's pinned successor, governed by all five."""
    ceremony.create_operators("mallory")  # exists in the store, member of no trust below
    ceremony.base = ceremony.sealed_trust(["hsm1", "hsm2", "hsm3"], MEMBERS, 3)  # type: ignore[attr-defined]
    return ceremony


def _base(admin: Admin) -> str:
    return admin.base  # type: ignore[attr-defined,no-any-return]


def _ctx(admin: Admin) -> Context:
    return Context.at(admin.store)


def _forge_approval(admin: Admin, trust_id: str, signer: str, claimed: str | None = None) -> None:
    """``signer`` signs with their own token; the approval may claim another's key id."""
    ctx = _ctx(admin)
    record = ctx.store.operator(signer)
    value = operators.sign_as(
        ctx,
        record,
        f"pin-of-{signer}-0123",
        contexts.OPERATOR_APPROVES_TRUST,
        ctx.store.trust(trust_id).signed_bytes(),
    )
    key_id = ctx.store.operator(claimed or signer).key.key_id
    ctx.store.save_signature("approval", Signature(trust_id, key_id, value))


def _forge_seal(admin: Admin, trust_id: str, hsm_label: str) -> None:
    """What an HSM PIN holder can do: make the HSM sign the trust, quorum or not."""
    _ctx(admin).store.save_signature("seal", hsm_seal(admin.store, trust_id, hsm_label))


def test_two_signatures_cannot_seal(matrix: Admin) -> None:
    trust = matrix.propose(["hsm1", "hsm2"], MEMBERS, 3, _base(matrix))
    matrix.sign(trust, "alice", "bob")
    result = matrix("trust", "seal", trust, check=exitcodes.VERIFICATION)
    assert "signed by 2, need 3 of 5" in one_error_line(result)
    assert not (matrix.store / "seals" / trust).exists()


def test_three_signatures_seal_and_verify(matrix: Admin) -> None:
    trust = matrix.propose(["hsm1", "hsm3"], MEMBERS, 3, _base(matrix))
    matrix.sign(trust, "alice", "bob", "carol")
    matrix("trust", "seal", trust, "--fork")  # the matrix seals many successors of base
    assert matrix("--json", "trust", "verify", trust).json["verified"] is True


def test_the_same_operator_signing_twice_counts_once(matrix: Admin) -> None:
    trust = matrix.propose(["hsm1"], MEMBERS, 3, _base(matrix))
    matrix.sign(trust, "alice", "alice", "bob")
    assert matrix("--json", "trust", "show", trust).json["approvals"]["signed"] == ["alice", "bob"]
    matrix("trust", "seal", trust, check=exitcodes.VERIFICATION)


def test_a_non_members_signature_counts_zero(matrix: Admin) -> None:
    trust = matrix.propose(["hsm2"], MEMBERS, 3, _base(matrix))
    matrix.sign(trust, "alice", "bob")
    _forge_approval(matrix, trust, "mallory")  # valid signature, but not a member
    result = matrix("trust", "seal", trust, check=exitcodes.VERIFICATION)
    assert "signed by 2" in one_error_line(result)


def test_an_operator_cannot_produce_anothers_signature(matrix: Admin) -> None:
    trust = matrix.propose(["hsm3"], MEMBERS, 3, _base(matrix))
    wrong_pin = matrix(
        "trust",
        "sign",
        trust,
        "--as",
        "bob",
        "--pin-file",
        matrix.pin_file("alice"),
        check=exitcodes.PIN,
    )
    assert "wrong PIN" in one_error_line(wrong_pin)
    matrix.sign(trust, "alice", "carol")
    _forge_approval(matrix, trust, "alice", claimed="bob")  # alice's signature labelled as bob's
    shown = matrix("--json", "trust", "show", trust).json
    assert shown["approvals"]["signed"] == ["alice", "carol"]
    matrix("trust", "seal", trust, check=exitcodes.VERIFICATION)


def test_a_trust_changed_after_signing_fails(matrix: Admin) -> None:
    trust_id = matrix.propose(["hsm2", "hsm3"], MEMBERS, 3, _base(matrix))
    matrix.sign(trust_id, "alice", "bob", "carol")
    matrix("trust", "seal", trust_id, "--fork")
    path = matrix.store / "trusts" / f"{trust_id}.json"
    payload = json.loads(path.read_text())
    # 1. edited in place: the content no longer matches its address
    changed = dict(payload, quorum=1)
    path.write_text(json.dumps(changed))
    result = matrix("trust", "verify", trust_id, check=exitcodes.VERIFICATION)
    assert f"trusts/{trust_id}.json" in one_error_line(result)
    path.write_text(json.dumps(payload))
    matrix("trust", "verify", trust_id)
    # 2. re-published under its new address with the old approvals and seal carried over
    ctx = _ctx(matrix)
    forged = Trust.from_dict(changed)
    ctx.store.save_trust(forged)
    for kind in ("approval", "seal"):
        for sig in ctx.store.signatures(kind, trust_id):
            ctx.store.save_signature(kind, Signature(forged.id, sig.key_id, sig.value))
    result = matrix("trust", "verify", forged.id, check=exitcodes.VERIFICATION)
    assert "not sealed" in one_error_line(result) or "quorum" in result.stderr


def test_a_domain_sealed_by_an_hsm_outside_its_trust_is_rejected(
    matrix: Admin, tmp_path: Path
) -> None:
    base = _base(matrix)
    trust = matrix.sealed_trust(["hsm2", "hsm1"], MEMBERS, 3, predecessor=base, fork=True)
    # In a copy that keeps this line alone: no Domain's keys are wrapped on a forked line.
    matrix = matrix.copy(tmp_path / "store")
    drop_rivals(matrix.store, base, trust)
    domain_id = matrix("domain", "create", "outsider-test", "--trust", trust).last_line
    ctx = _ctx(matrix)
    sealed = ctx.store.domain(domain_id)
    hsm3 = next(h for h in (ctx.store.hsm(i) for i in ctx.store.hsm_ids()) if h.label == "hsm3")
    with open_hsm(ctx, [hsm3]) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_DOMAIN, sealed.domain.signed_bytes()))
    doc = sealed.to_dict()
    doc["seal"] = Signature(domain_id, hsm3.id, value).to_dict("seal")
    (matrix.store / "domains" / f"{domain_id}.json").write_text(json.dumps(doc))
    result = matrix("domain", "verify", "outsider-test", check=exitcodes.VERIFICATION)
    assert "not in trust" in one_error_line(result)


def test_a_successor_without_its_predecessors_quorum_is_rejected(matrix: Admin) -> None:
    honest = matrix.sealed_trust(
        ["hsm1", "hsm2"], ["alice", "bob", "carol"], 2, MEMBERS[:3], predecessor=_base(matrix),
        fork=True,
    )
    # dave and erin try to take over: a successor with only themselves, signed only by themselves
    coup = matrix.propose(["hsm1"], ["dave", "erin"], 2, predecessor=honest)
    matrix.sign(coup, "dave", "erin")
    result = matrix("trust", "seal", coup, check=exitcodes.VERIFICATION)
    assert f"predecessor {honest[:12]}'s quorum not met" in one_error_line(result)
    # even with an HSM PIN, a forced seal does not make it valid anywhere
    _forge_seal(matrix, coup, "hsm1")
    verify = matrix("trust", "verify", coup, check=exitcodes.VERIFICATION)
    assert "quorum not met" in one_error_line(verify)
    refused = matrix(
        "domain", "create", "coup-domain", "--trust", coup, check=exitcodes.VERIFICATION
    )
    assert "quorum not met" in one_error_line(refused)
    # with one honest approval the predecessor's quorum is still 1 of 2: still refused
    matrix.sign(coup, "alice")
    matrix("trust", "verify", coup, check=exitcodes.VERIFICATION)
    matrix.sign(coup, "bob")
    matrix("trust", "verify", coup)  # now both quorums hold


def test_fewer_than_quorum_with_an_hsm_pin_cannot_forge_a_trust(
    matrix: Admin, tmp_path: Path
) -> None:
    """Two dishonest operators plus an HSM PIN holder: the forged seal never verifies."""
    trust = matrix.propose(["hsm3", "hsm1", "hsm2"], MEMBERS, 3, _base(matrix))
    matrix.sign(trust, "dave", "erin")
    _forge_seal(matrix, trust, "hsm2")
    result = matrix("trust", "verify", trust, check=exitcodes.VERIFICATION)
    assert "signed by 2, need 3 of 5" in one_error_line(result)
    refused = matrix("domain", "create", "forged", "--trust", trust, check=exitcodes.VERIFICATION)
    assert "quorum" in one_error_line(refused)


def test_a_rival_successor_of_the_genesis_is_refused_even_when_sealed(matrix: Admin) -> None:
    """The genesis has quorum 0: an HSM PIN holder with a puppet operator tries a new line."""
    genesis = json.loads((matrix.store / "store.json").read_text())["root"]
    ctx = _ctx(matrix)
    puppet = ctx.store.operator("mallory")
    rival = Trust(
        2,
        genesis,
        ctx.store.trust(_base(matrix)).hsms,
        (Member("mallory", puppet.key),),
        1,
        "2026-01-01T00:00:00Z",
    )
    ctx.store.save_trust(rival)
    _forge_approval(matrix, rival.id, "mallory")
    _forge_seal(matrix, rival.id, "hsm1")
    result = matrix("trust", "verify", rival.id, check=exitcodes.VERIFICATION)
    assert "rival successor of the genesis" in one_error_line(result)
    refused = matrix("domain", "create", "rival", "--trust", rival.id, check=exitcodes.VERIFICATION)
    assert "rival" in one_error_line(refused)
