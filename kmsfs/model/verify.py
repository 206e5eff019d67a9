"""Chain verification: pure, no I/O; bytes in, verified objects out, or an exception.

Rules (DESIGN.md §2.2, §2.3):

- a Trust's seal is a valid signature by an HSM listed in that same Trust;
- a Trust has ``quorum`` valid approvals of distinct operators of its own;
- a successor also has its predecessor's quorum of the predecessor's operators, links to the
  predecessor by id, and has ``serial`` = predecessor's + 1 (as TUF root rotation);
- the chain starts at the pinned root (the store's genesis), which is itself checked, and, once
  the store has pinned the genesis's one successor (the first Trust with operators), passes
  through it: the genesis has quorum 0, so without that pin anyone holding a genesis HSM's PIN
  could seal a rival successor with operators of their choosing;
- a Domain is sealed by an HSM of its Trust, names that Trust, wraps ``k`` to exactly that
  Trust's HSMs, and its Trust has at least one operator (the genesis only bootstraps);
- a Domain generation N+1 names generation N as its previous one, keeps all its ``mk`` epochs
  (with the same bindings, so the same keys, once generation N has them), and is governed by
  generation N's Trust or one that descends from it: otherwise an HSM that a successor Trust
  removed could still seal a "newer" generation under the Trust it was removed from, and bring
  itself back into the Domain.

An HSM signature alone is never enough: a PKCS#11 token signs whatever its PIN holder asks.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from kmsfs.errors import ChainError, IntegrityError
from kmsfs.model import contexts
from kmsfs.model.domain import SealedDomain
from kmsfs.model.trust import SealedTrust, Signature, Trust, verify_quorum


def verify_hsm_seal(
    trust: Trust, seal: Signature, context: bytes, payload: bytes, what: str
) -> None:
    """Check that ``seal`` is a signature over ``payload`` by an HSM listed in ``trust``."""
    hsm = trust.hsm(seal.key_id)
    if hsm is None:
        raise IntegrityError(
            f"{what} is sealed by HSM {seal.key_id[:12]}, which is not in trust {trust.id[:12]}"
        )
    try:
        hsm.sign_key.verify(seal.value, contexts.message(context, payload))
    except IntegrityError as exc:
        raise IntegrityError(f"{what}: the seal of HSM {hsm.label} does not verify") from exc


def verify_approvals(
    trust: Trust, approvals: Sequence[Signature], predecessor: SealedTrust | None
) -> None:
    """Check the Trust's own quorum and, for a successor, its link and its predecessor's quorum."""
    what = f"trust {trust.id[:12]}"
    verify_quorum(trust, list(approvals), trust.operators, trust.quorum, "its own")
    if trust.predecessor is None:
        if predecessor is not None:
            raise ChainError(f"{what} is a root but follows trust {predecessor.id[:12]}")
        return
    if predecessor is None or predecessor.id != trust.predecessor:
        raise ChainError(f"{what}: predecessor {trust.predecessor[:12]} is missing from the chain")
    if trust.serial != predecessor.trust.serial + 1:
        raise ChainError(f"{what}: serial want {predecessor.trust.serial + 1}, have {trust.serial}")
    old = predecessor.trust
    verify_quorum(trust, list(approvals), old.operators, old.quorum, f"predecessor {old.id[:12]}'s")


def verify_trust(sealed: SealedTrust, predecessor: SealedTrust | None) -> None:
    """Verify one link: its seal, its own quorum and, for a successor, its predecessor's."""
    trust = sealed.trust
    what = f"trust {trust.id[:12]}"
    if sealed.seal.subject != trust.id:
        raise IntegrityError(f"{what}: the seal is for another trust")
    verify_hsm_seal(trust, sealed.seal, contexts.HSM_SEALS_TRUST, trust.signed_bytes(), what)
    # A successor of the genesis (which has no operators) is approved by nobody: only its seal
    # ties it to the store. Sealed by an HSM it lists itself, anyone could make one (an HSM of
    # their own, the store's HSMs' public keys beside it), seal it, and have an unpinned store
    # take it. So it must be sealed by an HSM of the genesis too.
    genesis = predecessor.trust if predecessor is not None else None
    if genesis is not None and genesis.is_genesis and genesis.hsm(sealed.seal.key_id) is None:
        raise ChainError(
            f"{what} succeeds the genesis {genesis.id[:12]} but is not sealed by an HSM of it"
        )
    verify_approvals(trust, sealed.approvals, predecessor)


@dataclass(frozen=True)
class Anchor:
    """What a verifier pins: the root (genesis) and, once chosen, the genesis's successor."""

    root: str
    successor: str | None = None


def check_root(chain: Sequence[SealedTrust], anchor: "Anchor") -> None:
    """ChainError unless ``chain`` starts at the pinned root: the first thing to say of a
    chain of another store, before anything about its later links."""
    if not chain:
        raise ChainError("empty trust chain")
    if chain[0].id != anchor.root:
        raise ChainError(
            f"the trust chain starts at {chain[0].id[:12]}, but this store pins root "
            f"{anchor.root[:12]} (a Domain or Trust of another store?)"
        )


def verify_chain(chain: Sequence[SealedTrust], anchor: "Anchor | str") -> SealedTrust:
    """Verify ``chain`` (root first) from the pinned anchor; return its last Trust."""
    if isinstance(anchor, str):
        anchor = Anchor(anchor)
    check_root(chain, anchor)
    if anchor.successor is not None and len(chain) > 1 and chain[1].id != anchor.successor:
        raise ChainError(
            f"trust {chain[1].id[:12]} is a rival successor of the genesis: this store pinned "
            f"{anchor.successor[:12]}"
        )
    previous: SealedTrust | None = None
    for link in chain:
        verify_trust(link, previous)
        previous = link
    return chain[-1]


@dataclass(frozen=True)
class VerifiedDomain:
    """A Domain whose whole chain verified, with the Trust that governs it."""

    sealed: SealedDomain
    trust: SealedTrust
    chain: tuple[SealedTrust, ...]


def verify_domain(
    sealed: SealedDomain, chain: Sequence[SealedTrust], anchor: "Anchor | str"
) -> VerifiedDomain:
    """Verify a Domain and its Trust chain back to the pinned ``anchor``."""
    trust = verify_chain(chain, anchor).trust
    domain = sealed.domain
    what = f"domain {domain.name} ({domain.id[:12]})"
    if domain.trust != trust.id:
        raise ChainError(f"{what} belongs to trust {domain.trust[:12]}, not {trust.id[:12]}")
    if not trust.operators:
        raise ChainError(f"{what}: its trust has no operators (a genesis cannot govern Domains)")
    if sealed.seal.subject != domain.id:
        raise IntegrityError(f"{what}: the seal is for another domain")
    verify_hsm_seal(trust, sealed.seal, contexts.HSM_SEALS_DOMAIN, domain.signed_bytes(), what)
    if {w.hsm for w in domain.wrapped_k} != {h.id for h in trust.hsms}:
        raise IntegrityError(f"{what}: k is not wrapped to exactly the HSMs of its trust")
    return VerifiedDomain(sealed, chain[-1], tuple(chain))


def verify_generation_step(previous: VerifiedDomain, following: VerifiedDomain) -> None:
    """Check that ``following`` is the generation right after ``previous`` of the same Domain.

    Both are verified already. The Trust may only move forward: the one governing ``following``
    must be ``previous``'s or descend from it (``previous``'s Trust is on ``following``'s chain).
    """
    old, new = previous.sealed.domain, following.sealed.domain
    what = f"domain {new.name} generation {new.generation} ({new.id[:12]})"
    if new.name != old.name:
        raise ChainError(f"{what} follows domain {old.name}, not itself")
    if new.generation != old.generation + 1 or new.previous != old.id:
        raise ChainError(
            f"{what} does not follow generation {old.generation} ({old.id[:12]}) of the store"
        )
    _check_keeps(previous, following, what)


def verify_generation_descent(older: VerifiedDomain, newer: VerifiedDomain) -> None:
    """Check that ``newer`` descends from ``older``, an earlier generation of the same Domain,
    where the generations between them are not at hand.

    For a store rebuilt from an export of a Domain's newest generation (operators.md §4): it
    holds no older generation, yet a volume or a ``kmsfs encrypt`` file made earlier carries
    one. ``previous`` links cannot be followed across the gap, but the key binding can: an
    epoch's binding is ``HMAC(mk, name ‖ epoch ‖ root)`` computed in an HSM, so ``newer``
    having every epoch of ``older`` with the same binding shows it holds the very same master
    keys, and the Trust only moved forward. Both are verified already. An unbound ``older``
    (made before key binding) cannot be linked so and is refused.
    """
    old, new = older.sealed.domain, newer.sealed.domain
    what = f"domain {old.name} generation {old.generation} ({old.id[:12]})"
    if new.name != old.name:
        raise ChainError(f"{what} is not a generation of domain {new.name}")
    if old.generation >= new.generation:
        raise ChainError(f"{what} is not older than generation {new.generation}")
    if not old.bound:
        raise ChainError(
            f"{what} has no key binding, so nothing links it to generation {new.generation} "
            "without the generations between them"
        )
    if new.generation == old.generation + 1 and new.previous != old.id:
        # No gap after all: the link is there to check (a rival of the store's oldest).
        raise ChainError(f"{what} is not the generation that generation {new.generation} "
                         "follows")
    _check_keeps(older, newer, f"domain {new.name} generation {new.generation} ({new.id[:12]})")


def _check_keeps(previous: VerifiedDomain, following: VerifiedDomain, what: str) -> None:
    """What a later generation (*what*) keeps of an earlier one, whether it is the very next
    or not: the Trust only moves forward, no epoch is dropped or brought back from retirement,
    and every epoch keeps its mk (the same binding)."""
    old, new = previous.sealed.domain, following.sealed.domain
    if old.trust not in {link.id for link in following.chain}:
        raise ChainError(
            f"{what} is governed by trust {new.trust[:12]}, which does not descend from trust "
            f"{old.trust[:12]} of generation {old.generation}: a Domain never goes back to an "
            "older or rival trust"
        )
    if len(new.master_keys) < len(old.master_keys):
        raise ChainError(f"{what} drops mk epochs of generation {old.generation}")
    if new.retired_below < old.retired_below:
        raise ChainError(
            f"{what} brings back mk epochs below {old.retired_below}, which generation "
            f"{old.generation} retired"
        )
    if old.bound:
        # The same mk gives the same binding (HMAC): a generation that swapped an epoch's mk
        # for another (another Domain's, or one of the sealing HSM's choosing) shows here.
        if not new.bound:
            raise ChainError(f"{what} drops the key binding of generation {old.generation}")
        for before, after in zip(old.master_keys, new.master_keys, strict=False):
            if before.binding != after.binding:
                raise ChainError(
                    f"{what} changes mk epoch {before.epoch} of generation {old.generation}"
                )
