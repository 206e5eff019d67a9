"""Taking a Domain generation and its Trust chain into a store from outside it.

Two callers: ``kmsfs-admin domain import`` (a bundle from ``domain export``, a backup, or the
copy a ciphertext directory carries) and the HSM agent (the Domain a client sends with a rewrap
or rotate). Both must write nothing a verifier of the store would not accept, and nothing that
would make the store's history of the Domain fail closed for everyone:

- the chain must verify against the store's own pinned root (a Trust beyond the genesis only
  once the store has pinned the genesis's successor, or names it to pin: first seen is not
  good enough for the one choice a store makes on its own);
- only approvals by members of a Trust or of its predecessor are written (a forged one is
  dropped, never stored);
- the generation must fit the store's history (``domains.newest_verified``): one it holds,
  the very next step of its newest, or the first of a Domain it does not know. A validly
  sealed rival is refused: once in the store, ``domains.history`` would fail for every client;
- it must be bound (a generation made before key binding, which anyone holding an HSM's PIN
  can still seal, is bound only in the store that holds it), and each ``mk`` epoch's binding
  is checked in an HSM of its Trust before it is written.

Everything is checked before the first document is written, and the Domain goes last, so an
interrupted import leaves at most verified Trust documents, which the store may hold anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kmsfs.errors import AlreadyExistsError, ChainError, KmsfsError, UsageError
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.trust import SealedTrust, Signature, Trust, valid_approvals
from kmsfs.model.verify import Anchor, VerifiedDomain, check_root, verify_chain, verify_domain
from kmsfs.service import domains, trusts
from kmsfs.service.context import Context


@dataclass(frozen=True)
class Imported:
    """What an import did: the generation now in the store, and how many documents it wrote."""

    verified: VerifiedDomain
    domain_added: bool
    trusts_added: int


def member_approvals(
    trust: Trust, approvals: Sequence[Signature], predecessor: Trust | None
) -> list[Signature]:
    """The approvals that are valid signatures by a member of the Trust or its predecessor:
    the only ones ever written (a forged one is dropped)."""
    members = {m.key.key_id: m for m in trust.operators}
    if predecessor is not None:
        members.update({m.key.key_id: m for m in predecessor.operators})
    return [a for _, a in valid_approvals(trust, approvals, list(members.values()))]


def approving(trust: Trust, predecessor: Trust | None) -> Callable[[Signature], bool]:
    """Whether a signature is a valid approval of *trust* by a member of it or *predecessor*."""
    return lambda there: bool(member_approvals(trust, [there], predecessor))


def keep_signature(
    ctx: Context, kind: str, signature: Signature, valid: Callable[[Signature], bool]
) -> None:
    """Store a verified signature unless the store holds a valid one of this key already:
    RSA-PSS signatures are randomized, so another valid one for the same document is no
    conflict. One that ``valid`` refuses (planted by a replica) is replaced."""
    with contextlib.suppress(AlreadyExistsError):
        ctx.store.save_signature(kind, signature, valid)


def check_chain(
    ctx: Context, chain: Sequence[SealedTrust], last: str, *, allow_unpinned: bool = False,
    pin: str | None = None,
) -> Anchor:
    """Verify *chain* (root first, ending at Trust *last*) against the store's root; return
    the anchor to verify with. With *pin*, a store that has pinned no successor of the genesis
    takes the chain's (which must be *pin*) for this check; :func:`import_bundle` writes it."""
    if not chain or chain[-1].id != last:
        raise ChainError(f"the chain sent does not end at trust {last[:12]}")
    anchor = ctx.store.anchor()
    check_root(chain, anchor)  # another store's chain: said at once, not "pin it" first
    if anchor.successor is None and len(chain) > 1:
        if pin is not None:
            if chain[1].id != pin:
                raise ChainError(
                    f"the chain's successor of the genesis is {chain[1].id}, not {pin} "
                    "(the one given to pin)"
                )
            anchor = Anchor(anchor.root, pin)
        elif not allow_unpinned:
            raise ChainError(
                f"the store {ctx.store.root} has not pinned the genesis's successor, and this "
                f"chain names {chain[1].id}: only the operators can confirm that id (pin it "
                "with domain import --pin, or kmsfs-admin trust pin, if they do)"
            )
    verify_chain(chain, anchor)
    return anchor


def save_chain(ctx: Context, chain: Sequence[SealedTrust]) -> int:
    """Write a verified chain's Trusts, member approvals and seals; return how many Trusts
    the store did not hold."""
    added = 0
    previous: Trust | None = None
    known = set(ctx.store.trust_ids())
    for link in chain:
        if link.id not in known:
            ctx.store.save_trust(link.trust)
            added += 1
        for approval in member_approvals(link.trust, list(link.approvals), previous):
            keep_signature(ctx, "approval", approval, approving(link.trust, previous))
        keep_signature(ctx, "seal", link.seal, lambda there, s=link: trusts.is_valid_seal(s, there))
        previous = link.trust
    return added


def _needs_writing(ctx: Context, bundle: DomainBundle, verified: VerifiedDomain) -> bool:
    """With the store's lock held: refuse a generation the store's history does not take,
    or an unbound one, or one whose bindings the HSM does not confirm; False if the store
    holds it already."""
    newest = domains.newest_verified(ctx, bundle, "the imported domain")  # a rival, a step back
    if bundle.domain.id in ctx.store.domain_ids():
        return False
    if newest.sealed.domain.generation > bundle.domain.domain.generation:
        # Older than every generation the store holds (a store rebuilt from an export of its
        # newest): that newest keeps its keys, and written beside it, it would leave a gap the
        # history refuses.
        return False
    # A generation made on a rival line of Trusts where the honest one was not known: its k is
    # the rival's (trusts.refuse_forked_line; review).
    trusts.refuse_forked_line(ctx, verified.chain, "take in a Domain generation")
    if not bundle.domain.domain.bound:
        raise ChainError(
            f"domain {bundle.domain.domain.name}: a generation made before key binding is "
            "taken in only by the store that holds it; bind it there (kmsfs-admin domain "
            "rewrap)"
        )
    domains.check_bindings(ctx, verified)
    return True


def take_generation(ctx: Context, bundle: DomainBundle) -> VerifiedDomain:
    """The agent's step: write the bundle's Domain generation if the store's history takes
    it (its chain is in the store already, see :func:`check_chain` and :func:`save_chain`)."""
    verified = domains.verify_bundle(ctx, bundle)
    with ctx.store.exclusive():  # what the history is must hold until it is written
        if _needs_writing(ctx, bundle, verified):
            ctx.store.save_domain(bundle.domain)
    return verified


def import_bundle(ctx: Context, bundle: DomainBundle, pin: str | None = None) -> Imported:
    """``kmsfs-admin domain import``: check everything, then write the pin (if asked for and
    the store has none), the chain and the generation, in that order."""
    chain = list(bundle.chain)
    if pin is not None:
        if len(chain) < 2:
            raise UsageError("the bundle's chain has no successor of the genesis to pin")
        if len(pin) < 12 or not chain[1].id.startswith(pin):
            raise UsageError(
                f"--pin {pin}: the bundle's successor of the genesis is {chain[1].id} (give it, "
                "or its first 12 characters or more)"
            )
        pin = chain[1].id
    with ctx.store.exclusive():
        stored = ctx.store.anchor()
        if pin is not None and stored.successor not in (None, pin):
            raise UsageError(f"this store already pinned {stored.successor[:12]}, not {pin[:12]}")
        anchor = check_chain(ctx, chain, bundle.domain.domain.trust, pin=pin)
        if anchor != stored:
            trusts.refuse_rival_successors(ctx, anchor.root, chain[1].id)
        verified = verify_domain(bundle.domain, chain, anchor)
        domain_added = _needs_writing(ctx, bundle, verified)
        if anchor != stored:
            ctx.store.write_config(anchor)
        trusts_added = save_chain(ctx, chain)
        if domain_added:
            # The store's own documents must now verify the chain: a damaged approval or seal
            # at the place of one of the bundle's (kept, not overwritten) would leave a Domain
            # that the store then refuses.
            try:
                trusts.verified_chain(ctx, chain[-1].id)
            except KmsfsError as exc:
                raise ChainError(
                    f"the store's documents of the chain do not verify after the import ({exc}); "
                    "the domain was not written: remove the damaged document and import again"
                ) from None
            ctx.store.save_domain(bundle.domain)
    return Imported(verified, domain_added, trusts_added)
