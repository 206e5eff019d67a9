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
import json
import os
import subprocess
import sys
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
from kmsfs.hsm import domainkeys
from kmsfs.model import contexts
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.canonical import b64encode
from kmsfs.model.domain import Domain, MasterKeyEpoch, SealedDomain, WrappedKey, binding_info
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


def _seal_as(ctx: Context, domain: Domain, chain: tuple[SealedTrust, ...],
             label: str) -> DomainBundle:
    """What an HSM's PIN holder can do alone: seal any Domain document under a Trust of it."""
    record = next(h for h in chain[-1].trust.hsms if h.label == label)
    with open_hsm(ctx, [record]) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_DOMAIN, domain.signed_bytes()))
    return DomainBundle(SealedDomain(domain, Signature(domain.id, record.id, value)), chain)


def _seal_as_hsm2(ctx: Context, domain: Domain, chain: tuple[SealedTrust, ...]) -> DomainBundle:
    """hsm2, which T2 removed from payroll's Trust: the attacker of these tests."""
    return _seal_as(ctx, domain, chain, "hsm2")


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
def _agent(
    store: Path, allowed: str, actions: tuple[str, ...] | list[str] = ("derive",)
) -> Iterator[tuple[Agent, Peer]]:
    policy = (f'[[client]]\nname = "{allowed}-only"\nuids = [0]\ndomains = ["{allowed}"]\n'
              f'allow = {json.dumps(list(actions))}\n')
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


# --- binding a Domain made before key binding (found in the review of the first fix) -------

def _legacy(r: Revoked, name: str, trust: str, maker: str = "hsm1") -> SealedDomain:
    """A Domain as kmsfs made them before key binding (format 1: no binding), honestly: its
    own fresh k and mk, made in *maker*, sealed by it, saved in the store."""
    chain = trusts.verified_chain(r.ctx, trust)
    governing = chain[-1].trust
    hsm1 = next(h for h in governing.hsms if h.label == maker)
    with open_hsm(r.ctx, [hsm1]) as hsm:
        wrapped_k, wrapped_mk, _ = domainkeys.create(
            hsm.session, [(h.id, h.wrap_key) for h in governing.hsms], b"unused"
        )
        domain = Domain(
            name=name, generation=1, previous=None, trust=governing.id,
            wrapped_k=tuple(WrappedKey(i, scheme, w) for i, (scheme, w) in wrapped_k.items()),
            master_keys=(MasterKeyEpoch(1, wrapped_mk),), created=utc_now(),
        )
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_DOMAIN, domain.signed_bytes()))
    sealed = SealedDomain(domain, Signature(domain.id, hsm1.id, value))
    r.ctx.store.save_domain(sealed)
    return sealed


def _unbound_copy_of_payroll(r: Revoked, name: str, generation: int = 1,
                             previous: str | None = None) -> DomainBundle:
    """hsm2's forgery in the old format: payroll's keys, no binding, for a bind to bind."""
    bound = _carrying_payroll(r, name, generation, previous).domain.domain
    stripped = replace(bound, master_keys=tuple(replace(m, binding=None)
                                                for m in bound.master_keys))
    return _seal_as_hsm2(r.ctx, stripped, tuple(trusts.verified_chain(r.ctx, r.t1)))


def test_a_bind_needs_the_keys_to_unwrap_in_the_hsm_that_sealed_them(
    revoked: Revoked, tmp_path: Path
) -> None:
    """An unbound generation N+1 of a Domain made before key binding, sealed by hsm2 alone and
    carrying payroll's current keys (k wrapped to hsm1 only), is what the operator's upgrade
    step (the rewrap the refusal names) would bind. Every honest generation is sealed by an HSM
    that holds its k; hsm2 holds no k that opens these keys, so the bind is refused, nothing
    written, even in a store that lacks payroll (a partial copy, or payroll hidden), where no
    comparison with payroll could be made. The honest generation before it binds."""
    r = revoked
    legacy = _legacy(r, "legacy", r.t1)
    forged = _unbound_copy_of_payroll(r, "legacy", 2, legacy.id)
    r.ctx.store.save_domain(forged.domain)  # a store writer puts it in the store
    assert [v.sealed.id for v in domains.history(r.ctx, "legacy")] == [legacy.id, forged.domain.id]
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for generation in domains._generations(r.ctx, "payroll"):
        (r.admin.store / "domains" / f"{generation.id}.json").rename(
            hidden / f"{generation.id}.json")
    before = tree_snapshot(r.admin.store / "domains")
    result = r.admin("domain", "rewrap", "legacy", "--trust", r.t2, check=3)
    assert "its keys do not unwrap in HSM hsm2, which sealed it" in result.stderr
    assert tree_snapshot(r.admin.store / "domains") == before
    (r.admin.store / "domains" / f"{forged.domain.id}.json").unlink()
    r.admin("domain", "rewrap", "legacy", "--trust", r.t2)
    with api.open_domain(r.admin.store, domains.export_bundle(r.ctx, "legacy").to_bytes()) as d:
        assert len(d.derive(PROBE)) == 32


def test_a_bind_refuses_keys_another_domain_of_the_store_holds(revoked: Revoked) -> None:
    """The second line: hsm2 was in payroll's first Trust, so it can seal an unbound document
    carrying payroll's first k (wrapped to hsm2 too) and epoch 1. Those it had anyway; still,
    the HSM finds them in payroll's first generation and the bind is refused, naming both."""
    r = revoked
    first = domains._generations(r.ctx, "payroll")[0].domain
    chain = tuple(trusts.verified_chain(r.ctx, r.t1))
    forged = Domain(name="copied", generation=1, previous=None, trust=chain[-1].trust.id,
                    wrapped_k=first.wrapped_k,
                    master_keys=tuple(replace(m, binding=None) for m in first.master_keys),
                    created=utc_now())
    bundle = _seal_as_hsm2(r.ctx, forged, chain)
    r.ctx.store.save_domain(bundle.domain)
    before = tree_snapshot(r.admin.store / "domains")
    result = r.admin("domain", "rewrap", "copied", "--trust", r.t2, check=3)
    assert f"holds master keys of domain payroll ({first.id[:12]}), and both verify" in (
        result.stderr)
    assert tree_snapshot(r.admin.store / "domains") == before


def test_rotate_checks_the_bindings_it_builds_on(revoked: Revoked) -> None:
    """A generation of beta carrying payroll's keys (beta's binding on epoch 1, none that holds
    on epoch 2) opens nowhere; a rotation made it open (its new current epoch is genuine) and
    lent it an honest HSM's seal. Rotate now checks every binding first, and writes nothing."""
    r = revoked
    r.admin("domain", "create", "beta", "--trust", r.t2)
    beta = domains.current(r.ctx, "beta").sealed.domain
    payroll = domains.current(r.ctx, "payroll").sealed.domain
    epochs = (replace(payroll.master_keys[0], binding=beta.master_keys[0].binding),
              replace(payroll.master_keys[1], binding=bytes(32)))
    forged = Domain(name="beta", generation=2, previous=beta.id, trust=beta.trust,
                    wrapped_k=payroll.wrapped_k, master_keys=epochs, created=utc_now())
    r.ctx.store.save_domain(
        _seal_as(r.ctx, forged, tuple(trusts.verified_chain(r.ctx, r.t2)), "hsm1").domain)
    before = tree_snapshot(r.admin.store / "domains")
    result = r.admin("domain", "rotate", "beta", check=3)
    assert "mk epoch 2 is not bound to it" in result.stderr
    assert tree_snapshot(r.admin.store / "domains") == before


def test_the_agent_takes_in_no_unbound_generation_from_a_client(revoked: Revoked) -> None:
    """Through the agent, a client allowed to rewrap 'evil' sent hsm2's unbound forgery: the
    agent saved it as a Domain it did not know and bound payroll's keys to it."""
    r = revoked
    forged = _unbound_copy_of_payroll(r, "evil")
    t2_chain = [t.to_dict() for t in trusts.verified_chain(r.ctx, r.t2)]
    before = tree_snapshot(r.admin.store / "domains")
    with _agent(r.admin.store, "evil", ["rewrap", "derive"]) as (agent, peer), pytest.raises(
        ChainError, match="made before key binding is taken in only by the store that holds it"
    ):
        _call(agent, peer, "rewrap", {"bundle": b64encode(forged.to_bytes()), "trust": r.t2,
                                      "chain": t2_chain})
    assert tree_snapshot(r.admin.store / "domains") == before


def test_the_agent_writes_no_generation_whose_keys_are_not_its_own(revoked: Revoked) -> None:
    """A bound generation from a client whose keys are another Domain's was written into the
    store before the rewrap refused it, and then failed every opening of the Domain."""
    r = revoked
    alpha = domains.current(r.ctx, "alpha").sealed.domain
    with_alphas = _carrying_payroll(r, "alpha", 2, alpha.id, bindings_of=alpha)
    t2_chain = [t.to_dict() for t in trusts.verified_chain(r.ctx, r.t2)]
    before = tree_snapshot(r.admin.store / "domains")
    with _agent(r.admin.store, "alpha", ["rewrap", "derive"]) as (agent, peer), pytest.raises(
        IntegrityError, match="mk epoch 1 is not bound to it"
    ):
        _call(agent, peer, "rewrap", {"bundle": b64encode(with_alphas.to_bytes()),
                                      "trust": r.t2, "chain": t2_chain})
    assert tree_snapshot(r.admin.store / "domains") == before
    r.admin("domain", "rewrap", "alpha", "--trust", r.t2)  # alpha itself is unharmed


def test_kmsfs_init_refuses_a_domain_made_before_key_binding(
    revoked: Revoked, tmp_path: Path
) -> None:
    """The volume could not mount until a bind: say so now, and write nothing."""
    r = revoked
    _legacy(r, "legacy", r.t2)
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "kmsfs.fs.cli", "init", str(cipher), "--domain", "legacy"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "KMSFS_STORE": str(r.admin.store)},
    )
    assert proc.returncode == 3
    assert proc.stderr == (
        "kmsfs: error: domain legacy predates key binding: an operator must bind it first "
        f"('kmsfs-admin domain rewrap legacy --trust {r.t2[:12]}'); a new volume waits for "
        "that\n"
    )
    assert not any(cipher.iterdir())


def test_the_agent_checks_every_epoch_of_a_generation_it_takes_in(revoked: Revoked) -> None:
    """Zeta, a Domain the agent's store does not know, carries payroll's keys with a binding
    that holds for its current epoch (computed with hsm1's PIN, as its PIN holder could) and
    none for epoch 1: checking the current epoch alone would have let it in."""
    r = revoked
    payroll = domains.current(r.ctx, "payroll").sealed.domain
    chain = tuple(trusts.verified_chain(r.ctx, r.t2))
    hsm1 = next(h for h in chain[-1].trust.hsms if h.label == "hsm1")
    wrapped = payroll.wrapped_for(hsm1.id)
    assert wrapped is not None
    with open_hsm(r.ctx, [hsm1]) as hsm:
        ((holds,),) = domainkeys.epoch_hmacs(
            hsm.session, wrapped.scheme, wrapped.data, [payroll.master_keys[1].data],
            [[binding_info("zeta", 2, r.ctx.store.anchor().root)]],
        )
    epochs = (replace(payroll.master_keys[0], binding=bytes(32)),
              replace(payroll.master_keys[1], binding=holds))
    zeta = Domain(name="zeta", generation=1, previous=None, trust=chain[-1].trust.id,
                  wrapped_k=payroll.wrapped_k, master_keys=epochs, created=utc_now())
    bundle = _seal_as(r.ctx, zeta, chain, "hsm1")
    before = tree_snapshot(r.admin.store / "domains")
    with _agent(r.admin.store, "zeta", ["rotate", "derive"]) as (agent, peer), pytest.raises(
        IntegrityError, match="mk epoch 1 is not bound to it"
    ):
        _call(agent, peer, "rotate", {"bundle": b64encode(bundle.to_bytes())})
    assert tree_snapshot(r.admin.store / "domains") == before


def test_an_unverified_copy_does_not_block_an_honest_bind(revoked: Revoked) -> None:
    """A store writer without any PIN renames a copy of an honest unbound Domain: its seal no
    longer verifies, its keys still unwrap. It must not stop the operators' bind (nor make the
    message point at the honest document)."""
    r = revoked
    legacy = _legacy(r, "legacy", r.t2)
    renamed = replace(legacy.domain, name="zzz")
    r.ctx.store.save_domain(SealedDomain(renamed, legacy.seal))
    r.admin("domain", "rewrap", "legacy", "--trust", r.t2)
    assert domains.current(r.ctx, "legacy").sealed.domain.bound


def test_a_bind_into_a_successor_makes_the_fresh_k_in_an_hsm_the_successor_keeps(
    revoked: Revoked, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Domain made before key binding and sealed by hsm2, which T2 removed: hsm2 checks that
    its keys are its own, but the fresh k for T2 is made in hsm1. It was made in the sealer,
    so the removed HSM held the successor's k (and so every epoch a later rotation adds)."""
    r = revoked
    _legacy(r, "legacy", r.t1, maker="hsm2")
    made_in: list[str] = []
    real = domainkeys.rewrap

    def spy(session: Any, *args: Any, **kwargs: Any) -> Any:
        made_in.append(session.token.label.strip())
        return real(session, *args, **kwargs)

    monkeypatch.setattr(domainkeys, "rewrap", spy)
    domains.rewrap(r.ctx, "legacy", r.t2)
    t1 = trusts.verified_chain(r.ctx, r.t1)[-1].trust
    hsm1 = next(h for h in t1.hsms if h.label == "hsm1")
    with open_hsm(r.ctx, [hsm1]) as hsm:
        assert made_in == [hsm.session.token.label.strip()]
    assert domains.current(r.ctx, "legacy").sealed.domain.bound
