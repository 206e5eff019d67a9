"""Key binding: each mk epoch carries HMAC(mk, name, epoch, root), so a Domain's wrapped keys
cannot be carried into another Domain, or swapped in a later generation (kmsfs.model.domain).

The HSM side (the binding computed and checked in the token) is tested with real tokens in
tests/integration/test_key_binding.py; here, the documents and the rules between generations.
"""

import dataclasses

import pytest

from kmsfs.errors import ChainError, FormatError
from kmsfs.model.domain import (
    BINDING_INFO_PREFIX,
    Domain,
    MasterKeyEpoch,
    SealedDomain,
    binding_info,
)
from kmsfs.model.verify import VerifiedDomain, verify_domain, verify_generation_step
from tests.unit.model_fixtures import seal_domain, world


def _verified(domain: Domain) -> VerifiedDomain:
    w = world()
    return verify_domain(seal_domain(domain, w.h1), w.chain, w.root)


def _next(previous: Domain, **changes: object) -> Domain:
    return dataclasses.replace(
        previous,
        generation=previous.generation + 1,
        previous=previous.id,
        **changes,  # type: ignore[arg-type]
    )


def _unbound(domain: Domain) -> Domain:
    keys = tuple(dataclasses.replace(m, binding=None) for m in domain.master_keys)
    return dataclasses.replace(domain, master_keys=keys)


def test_a_bound_domain_is_format_2_and_an_unbound_one_format_1() -> None:
    bound = world().domain.domain
    assert bound.bound and bound.payload()["format"] == 2
    assert all(m["binding"] for m in bound.payload()["mk"])
    old = _unbound(bound)
    assert not old.bound and old.payload()["format"] == 1
    assert all("binding" not in m for m in old.payload()["mk"])
    for domain in (bound, old):
        assert Domain.from_dict(domain.payload()) == domain


def test_the_format_says_whether_epochs_carry_a_binding() -> None:
    """Format 2 without bindings, or format 1 with them, is a malformed document: a verifier
    must not take a stripped binding for an old document, nor the reverse."""
    bound = world().domain.domain.payload()
    with pytest.raises(FormatError, match="binding"):
        Domain.from_dict({**bound, "format": 1})
    old = _unbound(world().domain.domain).payload()
    with pytest.raises(FormatError, match="binding"):
        Domain.from_dict({**old, "format": 2})


def test_every_epoch_or_none_carries_a_binding() -> None:
    d = world().domain.domain
    mixed = (*d.master_keys, MasterKeyEpoch(2, b"\x02" * 40))
    with pytest.raises(FormatError, match="every mk epoch has a binding or none"):
        dataclasses.replace(d, master_keys=mixed)
    with pytest.raises(FormatError, match="32-byte binding"):
        MasterKeyEpoch(1, b"\x01" * 40, b"\x02" * 31)


def test_the_binding_info_names_the_domain_the_epoch_and_the_store() -> None:
    root, other_root = "ab" * 32, "cd" * 32
    infos = {
        binding_info("payroll", 1, root),
        binding_info("payroll", 2, root),
        binding_info("evil", 1, root),
        binding_info("payroll", 1, other_root),
    }
    assert len(infos) == 4
    assert all(i.startswith(BINDING_INFO_PREFIX) for i in infos)


def test_a_generation_keeps_every_binding_of_the_one_before() -> None:
    """Same mk, same HMAC: a generation whose epoch carries another binding carries another
    mk (another Domain's, or one the sealing HSM made up), and is refused."""
    first = world().domain.domain
    rewrapped = _next(first)
    verify_generation_step(_verified(first), _verified(rewrapped))  # the honest step
    swapped = _next(
        first,
        master_keys=(dataclasses.replace(first.master_keys[0], binding=b"\x07" * 32),),
    )
    with pytest.raises(ChainError, match="changes mk epoch 1"):
        verify_generation_step(_verified(first), _verified(swapped))
    added = MasterKeyEpoch(2, b"\x02" * 40, b"\x09" * 32)
    rotated = _next(first, master_keys=(*first.master_keys, added))
    verify_generation_step(_verified(first), _verified(rotated))  # a new epoch of its own


def test_a_generation_may_add_bindings_but_never_drop_them() -> None:
    """Binding a Domain made before (format 1) is a rewrap into a bound generation; the way
    back would strip the check."""
    bound = world().domain.domain
    old = _unbound(bound)
    verify_generation_step(_verified(old), _verified(_next(old, master_keys=bound.master_keys)))
    with pytest.raises(ChainError, match="drops the key binding"):
        stripped = _next(bound, master_keys=_unbound(bound).master_keys)
        verify_generation_step(_verified(bound), _verified(stripped))


def test_a_sealed_bound_domain_round_trips() -> None:
    sealed = world().domain
    assert SealedDomain.from_dict(sealed.to_dict()) == sealed
