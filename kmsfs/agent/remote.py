"""``kmsfs-admin --agent``: the admin actions that need an HSM, done by the agent.

The operator's own store supplies the documents (the Trust, its approvals, the chain to the
pinned root); the agent re-verifies them against *its* pinned root, acts in its HSMs and sends
back the new document (a seal, a sealed Domain). That document is verified here again against
the local root before it is saved: the client trusts the agent to hold the HSMs, not to be
right about signatures.
"""

from __future__ import annotations

from typing import Any

from kmsfs.agent.client import AgentClient
from kmsfs.errors import AlreadyExistsError, IntegrityError, UsageError
from kmsfs.model import fields
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.canonical import b64encode
from kmsfs.model.domain import SealedDomain
from kmsfs.model.trust import SealedTrust, Signature
from kmsfs.model.verify import Anchor, VerifiedDomain, verify_domain, verify_trust
from kmsfs.service import domains, trusts
from kmsfs.service.context import Context


def seal_trust(
    client: AgentClient, ctx: Context, trust_ref: str, fork: bool = False
) -> SealedTrust:
    trust = ctx.store.trust(trusts.resolve_trust(ctx, trust_ref))
    if trust.predecessor is None:
        raise UsageError(f"trust {trust.id[:12]} is a root: it is made by init, not sealed")
    trusts.line(ctx)  # a store that lost its head asks for nothing (trusts._seal refuses too)
    approvals = tuple(ctx.store.signatures("approval", trust.id))
    chain = trusts.verified_chain(ctx, trust.predecessor)
    request: dict[str, Any] = {
        "trust": trust.payload(),
        "approvals": [a.to_dict("approval") for a in approvals],
        "chain": [link.to_dict() for link in chain],
    }
    if fork:  # only then: an agent older than the fork check would refuse the field
        request["fork"] = True
    result = client.call("seal-trust", request, retry=False)
    seal = Signature.from_dict(result.get("seal"), "seal")
    sealed = SealedTrust(trust, approvals, seal)
    verify_trust(sealed, chain[-1])
    ctx.store.save_signature("seal", seal, valid=lambda there: trusts.is_valid_seal(sealed, there))
    anchor = ctx.store.anchor()
    if trust.predecessor == anchor.root and anchor.successor is None:
        ctx.store.write_config(Anchor(anchor.root, trust.id))
    trusts.line(ctx)  # this store's head moves to it as after a seal here (trusts._seal)
    return sealed


def create_domain(client: AgentClient, ctx: Context, name: str, trust_ref: str) -> VerifiedDomain:
    if any(ctx.store.domain(i).domain.name == name for i in ctx.store.domain_ids()):
        # As in-process: the agent's store may lack the name, but a second generation 1 here
        # would make this store refuse the Domain everywhere (rival generations). Exit 6
        # like in-process (the agent's own refusal comes back as code "store": exit 6 too).
        raise AlreadyExistsError(f"a domain named {name!r} exists already (rewrap it instead)")
    trust_id = trusts.resolve_trust(ctx, trust_ref)
    chain = trusts.verified_chain(ctx, trust_id)
    domains.refuse_superseded(ctx, trust_id, "make a Domain under it")
    # This store's line too, not only the agent's (whose store may lack the honest one).
    trusts.refuse_forked_line(ctx, chain, domains.WRAP_KEYS)
    result = client.call(
        "create-domain",
        {"name": name, "trust": trust_id, "chain": [link.to_dict() for link in chain]},
        retry=False,
    )
    return _save_domain(
        ctx, result, name=name, trust_id=trust_id, previous=None, generation=1, epochs=1
    )


def rewrap(client: AgentClient, ctx: Context, name: str, trust_ref: str) -> VerifiedDomain:
    trust_id = trusts.resolve_trust(ctx, trust_ref)
    chain = trusts.verified_chain(ctx, trust_id)
    domains.refuse_superseded(ctx, trust_id, "rewrap a Domain into it")
    trusts.refuse_forked_line(ctx, chain, domains.WRAP_KEYS)  # as create_domain
    bundle = domains.export_bundle(ctx, name)
    result = client.call(
        "rewrap",
        {
            "bundle": b64encode(bundle.to_bytes()),
            "trust": trust_id,
            "chain": [link.to_dict() for link in chain],
        },
        retry=False,
    )
    old = bundle.domain.domain
    return _save_domain(
        ctx, result, name=name, trust_id=trust_id, previous=old.id,
        generation=old.generation + 1, epochs=len(old.master_keys),
    )


def rotate(client: AgentClient, ctx: Context, name: str) -> VerifiedDomain:
    bundle = domains.export_bundle(ctx, name)
    domains.refuse_rotation_under_superseded(ctx, name, bundle.domain.domain.trust)
    trusts.refuse_forked_line(ctx, bundle.chain, "add a key epoch to a Domain")  # as create
    result = client.call("rotate", {"bundle": b64encode(bundle.to_bytes())}, retry=False)
    old = bundle.domain.domain
    return _save_domain(
        ctx, result, name=name, trust_id=old.trust, previous=old.id,
        generation=old.generation + 1, epochs=len(old.master_keys) + 1,
    )


def retire(client: AgentClient, ctx: Context, name: str, below: int) -> VerifiedDomain:
    bundle = domains.export_bundle(ctx, name)
    result = client.call(
        "retire", {"bundle": b64encode(bundle.to_bytes()), "below": below}, retry=False
    )
    old = bundle.domain.domain
    verified = _save_domain(
        ctx, result, name=name, trust_id=old.trust, previous=old.id,
        generation=old.generation + 1, epochs=len(old.master_keys),
    )
    if verified.sealed.domain.retired_below != below:
        raise IntegrityError(
            f"the agent answered with Domain {name} retiring epochs below "
            f"{verified.sealed.domain.retired_below}, not below {below} as asked"
        )
    return verified


def health(client: AgentClient) -> list[dict[str, Any]]:
    rows = fields.array(client.call("health", {}), "hsms", "health result")
    return [fields.obj(r, "health row") for r in rows]


def _save_domain(
    ctx: Context,
    result: dict[str, Any],
    *,
    name: str,
    trust_id: str,
    previous: str | None,
    generation: int,
    epochs: int | None = None,
) -> VerifiedDomain:
    """Keep the agent's Domain only if it verifies here *and* is the one asked for: a valid
    but different Domain (another name, the old generation of a rewrap) would make a
    revocation look done when it is not."""
    sealed = SealedDomain.from_dict(result.get("domain"))
    domain = sealed.domain
    want = (name, trust_id, previous, generation)
    have = (domain.name, domain.trust, domain.previous, domain.generation)
    if have != want or (epochs is not None and len(domain.master_keys) != epochs):
        raise IntegrityError(
            f"the agent answered with Domain {domain.name} generation {domain.generation} of "
            f"trust {domain.trust[:12]}, not the {name} generation {generation} of trust "
            f"{trust_id[:12]} asked for; nothing saved"
        )
    chain = trusts.chain_to(ctx, domain.trust)
    verified = verify_domain(sealed, chain, ctx.store.anchor())
    with ctx.store.exclusive():  # this store's history must take it, until it is written
        domains.newest_verified(ctx, DomainBundle(sealed, tuple(chain)))
        ctx.store.save_domain(sealed)
    return verified
