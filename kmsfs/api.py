"""What the filesystem (``kmsfs``) needs from key management, in a few calls.

The filesystem never sees ``mk``: ``open_domain`` yields a :class:`kmsfs.keys.KeyDeriver` whose
``derive`` runs inside the HSM that unwrapped the Domain's master key.
"""

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kmsfs.errors import KmsfsError
from kmsfs.keys import KeyDeriver
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.domain import SealedDomain
from kmsfs.model.trust import SealedTrust
from kmsfs.service import domains, trusts
from kmsfs.service.context import Context
from kmsfs.service.context import default_store_path as default_store_path


def export_domain_bundle(store_dir: Path, domain_name: str) -> bytes:
    """The verified current Domain ``domain_name`` with its Trust chain, canonical bytes."""
    return domains.export_bundle(Context.at(store_dir), domain_name).to_bytes()


def serving_bundle(deriver: KeyDeriver) -> bytes | None:
    """The bundle (canonical bytes) of the Domain generation a deriver of :func:`open_domain`
    serves: verified, and the store's newest unless the bundle it was opened with is newer.
    None for a deriver that is not one (the agent's, verified against the agent's store)."""
    verified = getattr(deriver, "verified", None)
    if not isinstance(verified, domains.VerifiedDomain):
        return None
    return bundle_of(verified)


def bundle_of(verified: domains.VerifiedDomain) -> bytes:
    """The bundle (canonical bytes) of a verified Domain generation."""
    return DomainBundle(verified.sealed, verified.chain).to_bytes()


def bundle_facts(bundle: bytes) -> dict[str, Any]:
    """name, generation, domain id, root Trust id and the Trust ids of the chain (root first)
    of a bundle's Domain (its form checked, not its signatures: for a bundle that was
    verified, or to compare with one that will be)."""
    parsed = DomainBundle.from_bytes(bundle)
    return _facts(parsed.domain, parsed.chain)


def _facts(sealed: SealedDomain, chain: Sequence[SealedTrust]) -> dict[str, Any]:
    return {
        "name": sealed.domain.name,
        "generation": sealed.domain.generation,
        "domain_id": sealed.id,
        "root_id": chain[0].id if chain else None,
        "chain_ids": [t.id for t in chain],
    }


def is_store(store_dir: Path) -> bool:
    """True if *store_dir* holds a kmsfs store (its store.json)."""
    return Context.at(store_dir).store.exists()


def describe_bundle(store_dir: Path, bundle: bytes) -> dict[str, Any]:
    """What a bundle says, and whether it verifies against the store's pinned root.

    ``domain_id`` is the bundle's own (a volume's config names it). The rest describes what a
    mount of it uses: the store's newest generation of the Domain, when it descends from the
    bundle (after a rewrap, the Trust and HSMs differ from the bundle's); ``generation`` is that
    one's, ``bundle_generation`` the bundle's."""
    parsed = DomainBundle.from_bytes(bundle)
    info = _describe(parsed.domain, parsed.chain)
    info["bundle_generation"] = info["generation"]
    info["verified"], info["problem"], info["superseded_by"] = False, None, None
    try:
        ctx = Context.at(store_dir)
        newest = domains.newest_verified(ctx, parsed)
        info.update(_describe(newest.sealed, newest.chain), domain_id=parsed.domain.id)
        # A successor of its Trust means: rewrap before anything new is keyed with it.
        newer = trusts.successor(ctx, newest.sealed.domain.trust)
        info["superseded_by"] = newer.id if newer is not None else None
        # The generation a mount would use, as a rollback check needs it (kmsfs.fs.seen).
        info["serving"] = _facts(newest.sealed, newest.chain)
        info["verified"] = True
    except KmsfsError as exc:
        info["problem"] = str(exc)
        info["problem_class"] = type(exc).__name__  # so callers keep its exit code
    return info


def _describe(sealed: SealedDomain, chain: Sequence[SealedTrust]) -> dict[str, Any]:
    domain = sealed.domain
    trust = chain[-1].trust if chain else None
    return {
        "name": domain.name,
        "domain_id": domain.id,
        "generation": domain.generation,
        "epochs": len(domain.master_keys),
        "retired_below": domain.retired_below,
        "key_binding": domain.bound,
        "trust_id": domain.trust,
        "hsms": [{"id": h.id, "label": h.label} for h in trust.hsms] if trust else [],
        "operators": [m.name for m in trust.operators] if trust else [],
        "quorum": trust.quorum if trust else None,
    }


@contextlib.contextmanager
def open_domain(store_dir: Path, bundle: bytes) -> Iterator[KeyDeriver]:
    """Verify the bundle's whole chain, unwrap ``mk`` in an HSM of its Trust, yield a deriver."""
    with domains.open_keys(Context.at(store_dir), DomainBundle.from_bytes(bundle)) as keys:
        yield keys
