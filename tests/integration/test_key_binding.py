"""Key binding with real tokens: a Domain's wrapped keys cannot be carried into another Domain.

The attack (found in review): the seal of a Domain proves only that some HSM of its Trust signed
it. So the PIN holder of one HSM (here hsm2, removed from payroll's Trust by a successor) could
seal a Domain of another name that carries payroll's ``k`` wrapped to hsm1 and payroll's ``mk``
epochs, even the one made after hsm2 was removed. It verified, and an agent client allowed only
that other name got payroll's keys from hsm1. Every mk epoch now carries HMAC(mk, name, epoch,
root), computed in the HSM when the epoch is made and checked in the HSM at every opening.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from kmsfs import api
from kmsfs.agent.policy import Peer, Policy
from kmsfs.agent.protocol import ProtocolError, Request
from kmsfs.agent.service import Agent
from kmsfs.errors import ChainError, IntegrityError, UsageError
from kmsfs.model import contexts
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.canonical import b64encode
from kmsfs.model.domain import Domain, SealedDomain, WrappedKey, binding_info
from kmsfs.model.trust import SealedTrust, Signature
from kmsfs.service import domains, trusts
from kmsfs.service.context import Context, open_hsm, utc_now
from tests.kms_helpers import Admin, tree_snapshot

PROBE = b"kmsfs/v1/file-key\x00" + bytes(16)


@dataclass
class Revoked:
    """payroll under T1 (hsm1, hsm2), rewrapped into T2 (hsm1 only), then rotated: epoch 2 was
    made after hsm2 left. Domain alpha stays under T1."""

    admin: Admin
    ctx: Context
    t1: str
    t2: str


@pytest.fixture
def revoked(initialized: Admin) -> Revoked:
    admin = initialized
    t1 = admin.real_domain("payroll")
    admin("domain", "create", "alpha", "--trust", t1)
    t2 = admin.sealed_trust(["hsm1"], ["alice"], 1, predecessor=t1)
    admin("domain", "rewrap", "payroll", "--trust", t2)
    admin("domain", "rotate", "payroll")
    return Revoked(admin, Context.at(admin.store), t1, t2)


def _seal_as_hsm2(ctx: Context, domain: Domain, chain: tuple[SealedTrust, ...]) -> DomainBundle:
    """What hsm2's PIN holder can do alone: seal any Domain document under a Trust of hsm2."""
    hsm2 = next(h for h in chain[-1].trust.hsms if h.label == "hsm2")
    with open_hsm(ctx, [hsm2]) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_DOMAIN, domain.signed_bytes()))
    return DomainBundle(SealedDomain(domain, Signature(domain.id, hsm2.id, value)), chain)


def _carrying_payroll(r: Revoked, name: str, generation: int = 1, previous: str | None = None,
                      bindings_of: Domain | None = None) -> DomainBundle:
    """A Domain *name* under T1 with payroll's current k (wrapped to hsm1) and mk epochs, and
    the bindings of *bindings_of* (default: payroll's own), sealed by hsm2."""
    payroll = domains.current(r.ctx, "payroll").sealed.domain
    chain = tuple(trusts.verified_chain(r.ctx, r.t1))
    hsm1, hsm2 = (next(h for h in chain[-1].trust.hsms if h.label == x) for x in ("hsm1", "hsm2"))
    wrapped = payroll.wrapped_for(hsm1.id)
    assert wrapped is not None
    epochs = payroll.master_keys
    if bindings_of is not None:
        epochs = tuple(replace(m, binding=b.binding)
                       for m, b in zip(epochs, bindings_of.master_keys, strict=False))
    forged = Domain(
        name=name, generation=generation, previous=previous, trust=chain[-1].trust.id,
        wrapped_k=(WrappedKey(hsm1.id, wrapped.scheme, wrapped.data),
                   WrappedKey(hsm2.id, "rsa-oaep-sha1", b"\0" * 256)),
        master_keys=epochs, created=utc_now(),
    )
    return _seal_as_hsm2(r.ctx, forged, chain)


@contextlib.contextmanager
def _agent(store: Path, allowed: str) -> Iterator[tuple[Agent, Peer]]:
    policy = (f'[[client]]\nname = "{allowed}-only"\nuids = [0]\ndomains = ["{allowed}"]\n'
              'allow = ["derive"]\n')
    agent = Agent(store, Policy.parse(policy, "test-policy"), None)
    try:
        yield agent, Peer.local(0)
    finally:
        agent.close()


def _call(agent: Agent, peer: Peer, op: str, args: dict[str, Any]) -> dict[str, Any]:
    return agent.handle(peer, Request(1, op, args))


def test_a_domain_carrying_another_domains_keys_is_refused_in_process_and_by_the_agent(
    revoked: Revoked,
) -> None:
    r = revoked
    forged = _carrying_payroll(r, "evil")
    # The document itself verifies (any HSM of T1 may seal under T1): only the keys tell.
    assert api.describe_bundle(r.admin.store, forged.to_bytes())["verified"] is True
    refused = pytest.raises(IntegrityError, match="mk epoch 2 is not bound to it")
    with refused, api.open_domain(r.admin.store, forged.to_bytes()):
        pass
    with _agent(r.admin.store, "evil") as (agent, peer), refused:
        _call(agent, peer, "open-domain", {"bundle": b64encode(forged.to_bytes())})


def test_stripping_the_bindings_does_not_help(revoked: Revoked) -> None:
    """Without bindings the document is of the older format, which no opening accepts."""
    r = revoked
    bound = _carrying_payroll(r, "evil").domain.domain
    stripped = replace(bound, master_keys=tuple(replace(m, binding=None)
                                                for m in bound.master_keys))
    forged = _seal_as_hsm2(r.ctx, stripped, tuple(trusts.verified_chain(r.ctx, r.t1)))
    with _agent(r.admin.store, "evil") as (agent, peer), pytest.raises(
        ChainError, match="predates key binding"
    ):
        _call(agent, peer, "open-domain", {"bundle": b64encode(forged.to_bytes())})


def test_a_next_generation_carrying_another_domains_keys_is_refused(revoked: Revoked) -> None:
    """hsm2 is in alpha's Trust: it may seal alpha's next generation, but not one that swaps
    alpha's keys for payroll's, with payroll's bindings (the history shows the swap) or with
    alpha's (the HSM shows it when the generation is opened, and when it is rewrapped)."""
    r = revoked
    alpha = domains.current(r.ctx, "alpha").sealed.domain
    with_theirs = _carrying_payroll(r, "alpha", 2, alpha.id)
    described = api.describe_bundle(r.admin.store, with_theirs.to_bytes())
    assert "changes mk epoch 1" in described["problem"]
    with pytest.raises(ChainError, match="changes mk epoch 1"), api.open_domain(
        r.admin.store, with_theirs.to_bytes()
    ):
        pass
    with_alphas = _carrying_payroll(r, "alpha", 2, alpha.id, bindings_of=alpha)
    r.ctx.store.save_domain(with_alphas.domain)  # a store writer puts it in the store
    before = tree_snapshot(r.admin.store / "domains")
    with _agent(r.admin.store, "alpha") as (agent, peer), pytest.raises(
        IntegrityError, match="mk epoch 1 is not bound to it"
    ):
        _call(agent, peer, "open-domain", {"bundle": b64encode(with_alphas.to_bytes())})
    result = r.admin("domain", "rewrap", "alpha", "--trust", r.t2, check=3)
    assert "mk epoch 1 is not bound to it" in result.stderr
    assert tree_snapshot(r.admin.store / "domains") == before


def test_honest_domains_open_and_every_epoch_is_checked(revoked: Revoked) -> None:
    """The bindings create, rewrap and rotate computed hold in the HSM, for the current epoch
    and an older one, through the agent and in process."""
    r = revoked
    bundle = domains.export_bundle(r.ctx, "payroll").to_bytes()
    with api.open_domain(r.admin.store, bundle) as deriver:
        assert deriver.current_epoch == 2
        in_process = [deriver.derive(PROBE, epoch) for epoch in (1, 2)]
    with _agent(r.admin.store, "payroll") as (agent, peer):
        handle = _call(agent, peer, "open-domain", {"bundle": b64encode(bundle)})["handle"]
        keys = [_call(agent, peer, "derive", {"handle": handle, "infos": [b64encode(PROBE)],
                                              "epoch": epoch})["keys"][0] for epoch in (1, 2)]
    assert keys == [b64encode(k) for k in in_process]


def test_the_agent_derives_nothing_with_the_binding_prefix(revoked: Revoked) -> None:
    """Else a client allowed payroll could have the HSM compute payroll's binding for another
    name, and hsm2 seal that name with payroll's keys and a binding that holds."""
    r = revoked
    bundle = domains.export_bundle(r.ctx, "payroll").to_bytes()
    info = binding_info("evil", 2, r.ctx.store.anchor().root)
    with _agent(r.admin.store, "payroll") as (agent, peer):
        handle = _call(agent, peer, "open-domain", {"bundle": b64encode(bundle)})["handle"]
        with pytest.raises(ProtocolError, match="prefix of Domain key bindings"):
            _call(agent, peer, "derive", {"handle": handle, "infos": [b64encode(info)]})
    with api.open_domain(r.admin.store, bundle) as deriver, pytest.raises(
        UsageError, match="prefix of Domain key bindings"
    ):
        deriver.derive(info)


def test_an_older_epoch_is_checked_when_first_used(revoked: Revoked) -> None:
    """Older epochs are unwrapped only when data of theirs is read: each is checked then, and
    one that does not hold derives nothing (the current epoch goes on serving)."""
    r = revoked
    verified = domains.current(r.ctx, "payroll")
    honest = verified.sealed.domain
    first, current = honest.master_keys
    altered = replace(honest, master_keys=(replace(first, binding=bytes(32)), current))
    keys = domains.DomainKeys(
        r.ctx, replace(verified, sealed=replace(verified.sealed, domain=altered))
    ).open()
    try:
        keys.derive(PROBE)
        with pytest.raises(IntegrityError, match="mk epoch 1 is not bound to it"):
            keys.derive(PROBE, 1)
        keys.derive(PROBE, 2)
    finally:
        keys.close()
