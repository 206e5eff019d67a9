"""A Domain's generations form one line that only moves forward (DESIGN.md §2.2, §2.7).

hsm3 is removed by a successor Trust, the Domain is rewrapped for it and rotated. hsm3's PIN
holder then seals "generations" of their own under the Trust hsm3 was removed from: a next
one on top of the newest, and a rival one next to an old one. Each seal is valid, so only the
rules on the line of generations can refuse them: in the store, and as a CIPHERDIR's copy the
store does not hold. With real SoftHSM2 tokens.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmsfs import api
from kmsfs.errors import ChainError
from kmsfs.hsm import domainkeys
from kmsfs.model import contexts
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.domain import Domain, MasterKeyEpoch, SealedDomain, binding_info
from kmsfs.model.trust import Signature
from kmsfs.service import domains, trusts
from kmsfs.service.context import Context, open_hsm, utc_now
from tests.kms_helpers import Admin, one_error_line


@dataclass
class Revoked:
    admin: Admin
    old_trust: str  # T1: hsm1, hsm2, hsm3
    new_trust: str  # T2: hsm1, hsm2 (hsm3 removed)


@pytest.fixture
def revoked(initialized: Admin) -> Revoked:
    """payroll on T1, then rewrapped for T2 (without hsm3) and rotated: generations 1, 2, 3."""
    admin = initialized
    admin("hsm", "create", "--label", "hsm3")
    admin.create_operators("alice")
    t1 = admin.sealed_trust(["hsm1", "hsm2", "hsm3"], ["alice"], 1)
    admin("domain", "create", "payroll", "--trust", t1)
    t2 = admin.sealed_trust(["hsm1", "hsm2"], ["alice"], 1, predecessor=t1)
    admin("domain", "rewrap", "payroll", "--trust", t2)
    admin("domain", "rotate", "payroll")
    return Revoked(admin, t1, t2)


def _forge(ctx: Context, previous: SealedDomain) -> DomainBundle:
    """As hsm3's PIN holder, with no operator: a generation after *previous*, under T1 (which
    still lists hsm3), with a new epoch made inside hsm3 and wrapped under T1's ``k``."""
    first = domains._generations(ctx, "payroll")[0]
    t1 = ctx.store.trust(first.domain.trust)
    hsm3 = next(h for h in t1.hsms if h.label == "hsm3")
    with open_hsm(ctx, [hsm3]) as hsm:
        wrapped_k = first.domain.wrapped_for(hsm3.id)
        assert wrapped_k is not None
        epoch = len(first.domain.master_keys) + 1
        info = binding_info("payroll", epoch, ctx.store.anchor().root)
        new_mk, binding = domainkeys.rotate(hsm.session, wrapped_k.scheme, wrapped_k.data, info)
        forged = Domain(
            name="payroll",
            generation=previous.domain.generation + 1,
            previous=previous.id,
            trust=t1.id,
            wrapped_k=first.domain.wrapped_k,
            master_keys=(
                *first.domain.master_keys,
                MasterKeyEpoch(epoch, new_mk, binding),
            ),
            created=utc_now(),
        )
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_DOMAIN, forged.signed_bytes()))
    sealed = SealedDomain(forged, Signature(forged.id, hsm3.id, value))
    return DomainBundle(sealed, tuple(trusts.chain_to(ctx, t1.id)))


def _verified_alone(ctx: Context, bundle: DomainBundle) -> None:
    """The forgery's own seal and chain verify: only the line of generations can refuse it."""
    domains.verify_bundle(ctx, bundle)


def test_a_removed_hsm_cannot_seal_a_newer_generation_in_the_store(revoked: Revoked) -> None:
    ctx = Context.at(revoked.admin.store)
    honest = domains.current(ctx, "payroll")
    assert honest.sealed.domain.generation == 3 and honest.trust.id == revoked.new_trust
    forged = _forge(ctx, honest.sealed)
    _verified_alone(ctx, forged)
    ctx.store.save_domain(forged.domain)

    with pytest.raises(ChainError, match="does not descend from trust"):
        domains.current(ctx, "payroll")
    line = one_error_line(revoked.admin("domain", "verify", "payroll", check=3))
    assert "generation 4" in line and "older or rival trust" in line
    listed = json.loads(revoked.admin("--json", "domain", "list").stdout)
    assert [(d["generation"], d["verified"]) for d in listed] == [(4, False)]
    assert "does not descend" in listed[0]["problem"]
    # No new volume, file or generation is made on top of it.
    revoked.admin("domain", "rotate", "payroll", check=3)
    with pytest.raises(ChainError):
        api.export_domain_bundle(revoked.admin.store, "payroll")


def test_a_forged_generation_carried_by_a_volume_is_refused(revoked: Revoked) -> None:
    """The store stays clean; the forgery comes in as a CIPHERDIR's copy of the Domain."""
    ctx = Context.at(revoked.admin.store)
    forged = _forge(ctx, domains.current(ctx, "payroll").sealed)
    _verified_alone(ctx, forged)
    with pytest.raises(ChainError, match="not in the store's history"):
        domains.newest_verified(ctx, forged)
    with pytest.raises(ChainError), api.open_domain(revoked.admin.store, forged.to_bytes()):
        pass


def test_a_rival_generation_is_refused(revoked: Revoked) -> None:
    """A second generation 2, next to the operators' rewrap: a fork fails closed."""
    ctx = Context.at(revoked.admin.store)
    generations = domains._generations(ctx, "payroll")
    rival = _forge(ctx, generations[0])
    assert rival.domain.domain.generation == 2
    _verified_alone(ctx, rival)
    with pytest.raises(ChainError, match="not in the store's history"):
        domains.newest_verified(ctx, rival)
    ctx.store.save_domain(rival.domain)
    with pytest.raises(ChainError, match="rival generations 2 of domain payroll"):
        domains.current(ctx, "payroll")
    # Even a volume made before the rewrap no longer opens: which line is true is for people.
    first = DomainBundle(generations[0], tuple(trusts.chain_to(ctx, generations[0].domain.trust)))
    with pytest.raises(ChainError, match="rival"):
        domains.newest_verified(ctx, first)


def test_the_next_generation_from_a_store_not_yet_merged_is_accepted(revoked: Revoked) -> None:
    """The honest case the rule must keep: a volume made with a store one generation ahead."""
    ctx = Context.at(revoked.admin.store)
    newest = domains.current(ctx, "payroll")
    ahead = DomainBundle(newest.sealed, newest.chain)
    stored = [p for p in (revoked.admin.store / "domains").iterdir() if newest.sealed.id in p.name]
    assert len(stored) == 1
    stored[0].unlink()  # this copy of the store has generations 1 and 2 only
    assert domains.current(ctx, "payroll").sealed.domain.generation == 2
    assert domains.newest_verified(ctx, ahead).sealed.id == newest.sealed.id
    with api.open_domain(revoked.admin.store, ahead.to_bytes()) as deriver:
        assert deriver.verified.sealed.domain.generation == 3  # type: ignore[attr-defined]


def test_an_old_volume_moves_to_the_newest_generation(revoked: Revoked, tmp_path: Path) -> None:
    ctx = Context.at(revoked.admin.store)
    first = domains._generations(ctx, "payroll")[0]
    old = DomainBundle(first, tuple(trusts.chain_to(ctx, first.domain.trust)))
    newest = domains.newest_verified(ctx, old)
    assert newest.sealed.domain.generation == 3
    assert newest.sealed.domain.trust == revoked.new_trust


def test_info_on_an_old_volume_describes_what_a_mount_uses(revoked: Revoked) -> None:
    """``kmsfs info`` of a directory made before the rewrap listed the revoked HSM and the old
    Trust: the copy in its kmsfs.conf, not the generation a mount of it would use."""
    ctx = Context.at(revoked.admin.store)
    first = domains._generations(ctx, "payroll")[0]
    old = DomainBundle(first, tuple(trusts.chain_to(ctx, first.domain.trust)))
    info = api.describe_bundle(revoked.admin.store, old.to_bytes())
    assert info["verified"] is True and info["problem"] is None
    assert (info["bundle_generation"], info["generation"], info["epochs"]) == (1, 3, 2)
    assert info["trust_id"] == revoked.new_trust
    assert [h["label"] for h in info["hsms"]] == ["hsm1", "hsm2"]
    assert info["domain_id"] == first.id  # the id the volume's config names


def test_a_generation_that_drops_an_epoch_is_refused(revoked: Revoked) -> None:
    """Sealed by an HSM of the current Trust, but without epoch 2: files of that epoch would
    become unreadable to every mount."""
    ctx = Context.at(revoked.admin.store)
    newest = domains.current(ctx, "payroll")
    t2 = ctx.store.trust(revoked.new_trust)
    hsm1 = next(h for h in t2.hsms if h.label == "hsm1")
    previous = newest.sealed.domain
    dropped = Domain(
        name="payroll",
        generation=previous.generation + 1,
        previous=previous.id,
        trust=t2.id,
        wrapped_k=previous.wrapped_k,
        master_keys=previous.master_keys[:1],
        created=utc_now(),
    )
    with open_hsm(ctx, [hsm1]) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_DOMAIN, dropped.signed_bytes()))
    ctx.store.save_domain(SealedDomain(dropped, Signature(dropped.id, hsm1.id, value)))
    with pytest.raises(ChainError, match="drops mk epochs of generation 3"):
        domains.current(ctx, "payroll")


@pytest.mark.slow
def test_a_forged_newer_generation_in_an_emptied_store_is_refused_where_one_was_mounted(
    revoked: Revoked, tmp_path: Path
) -> None:
    """hsm3's PIN holder also writes the store and the ciphertext directory. They delete the
    Domain's documents, so the volume's copy is verified alone, and put there a generation 4
    of their own under T1 (which still lists hsm3), sealed by hsm3, with a key epoch it made.
    Its number beats what this machine mounted (3, under T2), but its Trust chain does not
    hold T2: refused, before anything is mounted."""
    from dataclasses import replace

    from kmsfs.fs import config as volconfig
    from tests.integration.test_fs_domain_copy import _write_through_a_mount
    from tests.integration.test_fs_epochs import _kmsfs

    store = revoked.admin.store
    env = {"KMSFS_STORE": str(store)}
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    mp.mkdir()
    assert _kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    _write_through_a_mount(cipher, mp, env)  # this machine mounts generation 3 (T2)

    ctx = Context.at(store)
    forged = _forge(ctx, domains.current(ctx, "payroll").sealed)
    assert (forged.domain.domain.generation, forged.domain.domain.trust) == (4, revoked.old_trust)
    for document in (store / "domains").iterdir():
        document.unlink()
    config = volconfig.load(cipher)
    volconfig.save(
        cipher, replace(config, domain_bundle=forged.to_bytes(), domain_id=forged.domain.id)
    )
    assert api.describe_bundle(store, forged.to_bytes())["verified"] is True  # alone, it does

    proc = _kmsfs("mount", str(cipher), str(mp), env=env)
    assert proc.returncode == 3, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "does not descend" in line and revoked.new_trust[:12] in line
    assert not os.path.ismount(mp)
