"""Domain verification (kmsfs/model/verify.py verify_domain; DESIGN §2.2, §2.3, §2.6).

A Domain is accepted only if its whole chain verifies from the pinned root, it names the last
Trust of that chain, that Trust has operators, its seal is by an HSM of that Trust under the
Domain context, and ``k`` is wrapped to exactly that Trust's HSMs.
"""

import dataclasses
from collections.abc import Callable

import pytest

from kmsfs.errors import ChainError, IntegrityError, QuorumNotMetError
from kmsfs.model import contexts
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.domain import Domain, MasterKeyEpoch, SealedDomain, WrappedKey
from kmsfs.model.trust import SealedTrust, Signature
from kmsfs.model.verify import VerifiedDomain, verify_domain, verify_trust
from tests.unit.model_fixtures import (
    make_domain,
    make_operator,
    make_trust,
    seal_domain,
    seal_trust,
    world,
)


def domain() -> Domain:
    return world().domain.domain


def verify(sealed: SealedDomain) -> VerifiedDomain:
    w = world()
    return verify_domain(sealed, w.chain, w.root)


def test_valid_domain_verifies() -> None:
    w = world()
    verified = verify(w.domain)
    assert verified.sealed == w.domain
    assert verified.trust == w.t2
    assert verified.chain == w.chain


def test_valid_bundle_verifies_from_bytes() -> None:
    w = world()
    bundle = DomainBundle.from_bytes(w.bundle.to_bytes())
    verified = verify_domain(bundle.domain, bundle.chain, w.root)
    assert verified.sealed.id == w.domain.id


def test_domain_sealed_by_hsm_outside_its_trust_fails() -> None:
    w = world()
    with pytest.raises(IntegrityError, match="not in trust"):
        verify(seal_domain(domain(), w.outsider))
    forged = dataclasses.replace(w.outsider.seal_domain(domain()), key_id=w.h1.id)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify(SealedDomain(domain(), forged))


def test_domain_sealed_by_a_removed_hsm_fails() -> None:
    """h1 is in T2 but was removed in T3: it can no longer seal a Domain of T3."""
    w = world()
    approvers = [w.op("alice"), w.op("bob"), w.op("carol")]
    t3 = seal_trust(make_trust([w.h2], w.ops, 3, w.t2), approvers, w.h2)
    chain = [*w.chain, t3]
    of_t3 = make_domain(t3)
    assert verify_domain(seal_domain(of_t3, w.h2), chain, w.root).trust == t3
    with pytest.raises(IntegrityError, match="not in trust"):
        verify_domain(seal_domain(of_t3, w.h1), chain, w.root)


def test_domain_of_another_trust_fails() -> None:
    """The Domain must name the last Trust of the chain it is verified with."""
    w = world()
    approvers = [w.op("alice"), w.op("bob"), w.op("carol")]
    t3 = seal_trust(make_trust(w.hsms, w.ops, 3, w.t2), approvers, w.h2)
    with pytest.raises(ChainError, match="belongs to trust"):
        verify_domain(w.domain, [*w.chain, t3], w.root)
    elsewhere = dataclasses.replace(domain(), trust="ab" * 32)
    with pytest.raises(ChainError, match="belongs to trust"):
        verify(seal_domain(elsewhere, w.h1))


def test_domain_governed_by_the_genesis_fails() -> None:
    """The genesis only bootstraps: an HSM seal on a Domain of it is not enough."""
    w = world()
    of_genesis = seal_domain(make_domain(w.genesis), w.h1)
    with pytest.raises(ChainError, match="no operators"):
        verify_domain(of_genesis, [w.genesis], w.root)


def test_domain_whose_trust_lacks_its_quorum_fails() -> None:
    """A Domain sealed by an HSM of a Trust that never met its quorum is rejected."""
    w = world()
    unapproved = dataclasses.replace(w.t2, approvals=w.t2.approvals[:2])
    with pytest.raises(QuorumNotMetError):
        verify_domain(w.domain, [w.genesis, unapproved], w.root)


@pytest.mark.parametrize("which", ["missing", "extra", "substituted"])
def test_k_must_be_wrapped_to_exactly_the_trusts_hsms(which: str) -> None:
    w = world()
    hsms = {
        "missing": [w.h1],
        "extra": [w.h1, w.h2, w.outsider],
        "substituted": [w.h1, w.outsider],
    }[which]
    with pytest.raises(IntegrityError, match="exactly the HSMs"):
        verify(seal_domain(make_domain(w.t2, hsms), w.h1))


# -- seals are bound to their purpose -------------------------------------------------------------


def test_domain_seal_replayed_as_trust_seal_fails() -> None:
    """h1's Domain seal (same key) is not a Trust seal."""
    w = world()
    replayed = Signature(w.t2.id, w.h1.id, w.domain.seal.value)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_trust(SealedTrust(w.t2.trust, w.t2.approvals, replayed), w.genesis)


def test_trust_seal_replayed_as_domain_seal_fails() -> None:
    w = world()
    replayed = Signature(domain().id, w.t2.seal.key_id, w.t2.seal.value)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify(SealedDomain(domain(), replayed))


@pytest.mark.parametrize(
    "context",
    [contexts.HSM_SEALS_TRUST, contexts.HSM_RECORD, contexts.OPERATOR_APPROVES_TRUST, b""],
    ids=["hsm-seals-trust", "hsm-record", "operator-approves", "no-context"],
)
def test_domain_bytes_signed_under_another_context_fail(context: bytes) -> None:
    """The right HSM signing the right Domain bytes for another purpose is not a Domain seal."""
    w = world()
    value = w.h1.sign(context, domain().signed_bytes())
    with pytest.raises(IntegrityError, match="does not verify"):
        verify(SealedDomain(domain(), Signature(domain().id, w.h1.id, value)))


@pytest.mark.parametrize(
    "context",
    [contexts.HSM_SEALS_DOMAIN, contexts.HSM_RECORD, b""],
    ids=["hsm-seals-domain", "hsm-record", "no-context"],
)
def test_trust_bytes_signed_under_another_context_fail(context: bytes) -> None:
    w = world()
    value = w.h1.sign(context, w.t2.trust.signed_bytes())
    sealed = SealedTrust(w.t2.trust, w.t2.approvals, Signature(w.t2.id, w.h1.id, value))
    with pytest.raises(IntegrityError, match="does not verify"):
        verify_trust(sealed, w.genesis)


# -- a Domain changed after it was sealed ---------------------------------------------------------


def _flip(data: bytes) -> bytes:
    return bytes([data[0] ^ 1]) + data[1:]


CHANGES: dict[str, Callable[[Domain], Domain]] = {
    "name": lambda d: dataclasses.replace(d, name="other"),
    "created": lambda d: dataclasses.replace(d, created="2099-01-01T00:00:00Z"),
    "wrapped-k-data": lambda d: dataclasses.replace(
        d,
        wrapped_k=(
            dataclasses.replace(d.wrapped_k[0], data=_flip(d.wrapped_k[0].data)),
            *d.wrapped_k[1:],
        ),
    ),
    "wrapped-k-scheme": lambda d: dataclasses.replace(
        d, wrapped_k=tuple(dataclasses.replace(w, scheme="rsa-oaep-sha256") for w in d.wrapped_k)
    ),
    "wrapped-k-order": lambda d: dataclasses.replace(d, wrapped_k=d.wrapped_k[::-1]),
    "master-key-data": lambda d: dataclasses.replace(
        d, master_keys=(dataclasses.replace(d.master_keys[0], data=_flip(d.master_keys[0].data)),)
    ),
    "master-key-epoch-added": lambda d: dataclasses.replace(
        d, master_keys=(*d.master_keys, MasterKeyEpoch(2, b"\x02" * 40, b"\x03" * 32))
    ),
    "master-key-binding": lambda d: dataclasses.replace(
        d,
        master_keys=(
            dataclasses.replace(d.master_keys[0], binding=_flip(d.master_keys[0].binding or b"")),
        ),
    ),
    "generation": lambda d: dataclasses.replace(d, generation=2, previous="cd" * 32),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changed_domain_fails(change: str) -> None:
    """Any change to a sealed Domain's payload breaks its seal, reused or relabelled."""
    w = world()
    changed = CHANGES[change](domain())
    assert changed.id != domain().id
    with pytest.raises(IntegrityError, match="another domain"):
        verify(SealedDomain(changed, w.domain.seal))
    relabelled = dataclasses.replace(w.domain.seal, subject=changed.id)
    with pytest.raises(IntegrityError, match="does not verify"):
        verify(SealedDomain(changed, relabelled))


def test_changed_domain_wraps_are_well_formed() -> None:
    """The changed Domains above are otherwise valid: resealed, they verify."""
    w = world()
    for change in CHANGES.values():
        verify(seal_domain(change(domain()), w.h2))


def test_wrapped_for_finds_only_the_trusts_hsms() -> None:
    w = world()
    for hsm in w.hsms:
        wrapped = domain().wrapped_for(hsm.id)
        assert isinstance(wrapped, WrappedKey)
        assert wrapped.hsm == hsm.id
    assert domain().wrapped_for(w.outsider.id) is None


# -- another store --------------------------------------------------------------------------------


def test_domain_of_another_store_fails() -> None:
    """A complete, valid Domain of another store does not verify against this store's root."""
    w = world()
    root = seal_trust(make_trust(w.hsms, created="2024-06-01T00:00:00Z"), [], w.h1)
    people = [make_operator(n) for n in ("olga", "piet")]
    trust = seal_trust(make_trust(w.hsms, people, 1, root), people[:1], w.h1)
    theirs = seal_domain(make_domain(trust), w.h1)
    assert verify_domain(theirs, [root, trust], root.id).trust == trust
    with pytest.raises(ChainError, match="another store"):
        verify_domain(theirs, [root, trust], w.root)
    with pytest.raises(ChainError, match="another store"):
        verify_domain(w.domain, w.chain, root.id)
