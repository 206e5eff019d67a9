"""Rotating mk (DESIGN §2.7): a new key epoch, and an HSM removed before it is locked out.

Real SoftHSM2 tokens throughout; the removed HSM is asked, through PKCS#11 itself, to unwrap
the new epoch with everything it ever legitimately had.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from pkcs11 import exceptions as p11

from kmsfs.crypto.names import NAMES_KEY_INFO
from kmsfs.errors import ChainError, HsmUnavailableError, IntegrityError
from kmsfs.fs import kms
from kmsfs.hsm import domainkeys, library
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.verify import VerifiedDomain
from kmsfs.service import domains
from kmsfs.service.context import Context, open_hsm
from tests.integration.fault_helpers import wait_for
from tests.kms_helpers import Admin

INFO = b"kmsfs/v1/file-key\x00" + bytes(range(16))


def _hsm(ctx: Context, label: str):  # type: ignore[no-untyped-def]
    return next(r for r in (ctx.store.hsm(i) for i in ctx.store.hsm_ids()) if r.label == label)


def test_rotate_adds_an_epoch_and_keeps_the_old_ones(initialized: Admin) -> None:
    initialized.real_domain()
    ctx = Context.at(initialized.store)
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as before:
        assert before.current_epoch == 1
        epoch1 = before.derive(INFO)
    out = initialized("--json", "domain", "rotate", "payroll").json
    assert out["generation"] == 2 and out["epochs"] == 2
    initialized("domain", "verify", "payroll")
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as after:
        assert after.current_epoch == 2
        assert after.derive(INFO, 1) == epoch1  # old data stays readable
        assert after.derive(INFO) == after.derive(INFO, 2) != epoch1
        with pytest.raises(IntegrityError, match="no key epoch 3"):
            after.derive(INFO, 3)
    # A volume made before the rotation carries generation 1: opening it gives the newest.
    first = DomainBundle.from_bytes(initialized("domain", "export", "payroll").stdout.encode())
    assert first.domain.domain.generation == 2


def test_an_hsm_removed_before_a_rotation_cannot_reach_the_new_epoch(initialized: Admin) -> None:
    """hsm2 leaves (successor Trust of hsm1 only, rewrap), then mk is rotated. hsm2 still
    holds the generation-1 k it was given, and that opens epoch 1 (old data, until
    re-encrypted) but not epoch 2: no k it can unwrap wraps the new mk."""
    admin = initialized
    admin.create_operators("alice", "bob")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 1)
    admin("domain", "create", "payroll", "--trust", t1)
    ctx = Context.at(admin.store)
    generation1 = domains.current(ctx, "payroll").sealed.domain
    t2 = admin.sealed_trust(["hsm1"], ["alice", "bob"], 1, signers=["alice"], predecessor=t1)
    admin("domain", "rewrap", "payroll", "--trust", t2)
    admin("domain", "rotate", "payroll")
    latest = domains.current(ctx, "payroll").sealed.domain
    assert latest.generation == 3 and len(latest.master_keys) == 2
    hsm2 = _hsm(ctx, "hsm2")
    assert latest.wrapped_for(hsm2.id) is None
    old_k = generation1.wrapped_for(hsm2.id)
    assert old_k is not None
    with open_hsm(ctx, [hsm2]) as removed, library.CALLS:
        k = domainkeys._unwrap_k(
            removed.session, old_k.scheme, old_k.data, domainkeys.UNWRAPPED_K_TEMPLATE
        )
        try:
            # Epoch 1 as generation 1 wrapped it: old data, readable by hsm2 until re-encrypted.
            rfc5649 = domainkeys.rfc5649(removed.session)
            epoch1 = domainkeys._unwrap_mk(
                k, generation1.master_keys[0].data, domainkeys.UNWRAPPED_MK_TEMPLATE, rfc5649
            )
            epoch1.destroy()
            # Epoch 2 exists only wrapped by the k of generation 2 onwards, which hsm2 never got.
            for wrapped in (latest.master_keys[1].data, latest.master_keys[0].data):
                with pytest.raises(p11.PKCS11Error):
                    domainkeys._unwrap_mk(
                        k, wrapped, domainkeys.UNWRAPPED_MK_TEMPLATE, rfc5649
                    )
        finally:
            k.destroy()
    # And hsm1, still in the Trust, derives both epochs.
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as keys:
        assert keys.hsm_label == "hsm1"
        assert keys.derive(INFO, 1) != keys.derive(INFO, 2)


def _store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file()}


def test_retire_refuses_contents_of_older_epochs_and_keeps_the_volume_keys(
    initialized: Admin,
) -> None:
    """After rotate, retire --below 2: file keys of epoch 1 are refused by every opening of
    the Domain (what an HSM removed before the rotation could still compute), while the volume
    keys (names of a directory still at epoch 1, symlink targets and xattrs) are served as
    before."""
    initialized.real_domain()
    ctx = Context.at(initialized.store)
    initialized("domain", "rotate", "payroll")
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as before:
        volume_keys = [before.derive(i, 1) for i in sorted(domains.VOLUME_KEY_INFOS)]
        content = before.derive(INFO, 2)
    out = initialized("--json", "domain", "retire", "payroll", "--below", "2", "--yes").json
    assert (out["generation"], out["epochs"], out["retired_below"]) == (3, 2, 2)
    initialized("domain", "verify", "payroll")
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as after:
        with pytest.raises(IntegrityError, match="key epoch 1 of Domain payroll is retired"):
            after.derive(INFO, 1)
        with pytest.raises(IntegrityError, match="is retired"):  # a batch with one of them
            after.derive_many([NAMES_KEY_INFO, INFO], 1)
        assert [after.derive(i, 1) for i in sorted(domains.VOLUME_KEY_INFOS)] == volume_keys
        assert after.derive(INFO, 2) == after.derive(INFO) == content
    # A later rotation keeps the retirement.
    out = initialized("--json", "domain", "rotate", "payroll").json
    assert (out["generation"], out["epochs"], out["retired_below"]) == (4, 3, 2)


def test_retire_refusals_change_nothing(initialized: Admin) -> None:
    initialized.real_domain()
    before = _store_files(initialized.store)
    result = initialized("domain", "retire", "payroll", "--below", "2", "--yes", check=2)
    assert "its newest key epoch is 1" in result.stderr and "rotate first" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    for bad in ("0", "x", "-1"):
        result = initialized("domain", "retire", "payroll", "--below", bad, check=2)
        assert "is not a key epoch" in result.stderr
    assert _store_files(initialized.store) == before
    initialized("domain", "rotate", "payroll")
    rotated = _store_files(initialized.store)
    result = initialized("domain", "retire", "payroll", "--below", "2", check=2)
    assert "cannot be undone" in result.stderr and "--yes" in result.stderr  # asked, not done
    assert _store_files(initialized.store) == rotated
    initialized("domain", "retire", "payroll", "--below", "2", "--yes")
    before = _store_files(initialized.store)
    for below in ("1", "2"):
        result = initialized("domain", "retire", "payroll", "--below", below, "--yes", check=2)
        assert "epochs below 2 are retired" in result.stderr and "never undone" in result.stderr
    assert _store_files(initialized.store) == before


def test_a_generation_that_brings_retired_epochs_back_is_refused(initialized: Admin) -> None:
    """Sealed by an HSM of the Domain's own Trust, a next generation that lowers
    retired_below would let the removed HSM's contents verify again: the whole history is
    refused (fail closed), not the retirement quietly dropped."""
    initialized.real_domain()
    initialized("domain", "rotate", "payroll")
    initialized("domain", "retire", "payroll", "--below", "2", "--yes")
    ctx = Context.at(initialized.store)
    retired = domains.current(ctx, "payroll")
    old = retired.sealed.domain
    forged = dataclasses.replace(
        old, generation=old.generation + 1, previous=old.id, retired_below=1
    )
    with open_hsm(ctx, retired.trust.trust.hsms) as hsm:
        ctx.store.save_domain(domains._seal(hsm, forged))
    with pytest.raises(ChainError, match="brings back mk epochs below 2"):
        domains.current(ctx, "payroll")
    result = initialized("domain", "verify", "payroll", check=3)
    assert "brings back mk epochs below 2" in result.stderr


def test_a_rewrap_after_a_retirement_keeps_it(initialized: Admin) -> None:
    t1 = initialized.real_domain()
    initialized("domain", "rotate", "payroll")
    initialized("domain", "retire", "payroll", "--below", "2", "--yes")
    t2 = initialized.sealed_trust(["hsm1"], ["alice"], 1, signers=["alice"], predecessor=t1)
    out = initialized("--json", "domain", "rewrap", "payroll", "--trust", t2).json
    assert (out["generation"], out["trust"], out["retired_below"]) == (4, t2, 2)


def test_retire_refuses_an_epoch_a_removed_hsm_could_unwrap(initialized: Admin) -> None:
    """Rotated while hsm2 was in the Trust, epoch 2 was wrapped for it: after hsm2 is removed
    (successor Trust, rewrap), retiring below 2 would leave hsm2 able to make epoch-2
    contents. Refused, naming hsm2; a rotation under the new Trust gives an epoch to keep."""
    t1 = initialized.real_domain()
    initialized("domain", "rotate", "payroll")
    t2 = initialized.sealed_trust(["hsm1"], ["alice"], 1, signers=["alice"], predecessor=t1)
    initialized("domain", "rewrap", "payroll", "--trust", t2)
    before = _store_files(initialized.store)
    result = initialized("domain", "retire", "payroll", "--below", "2", "--yes", check=2)
    assert "HSM hsm2, which its trust no longer has, had the k of generation" in result.stderr
    assert _store_files(initialized.store) == before
    initialized("domain", "rotate", "payroll")
    out = initialized("--json", "domain", "retire", "payroll", "--below", "3", "--yes").json
    assert out["retired_below"] == 3


def test_retire_counts_the_hsm_that_made_the_k_of_a_rewrap_that_kept_none(
    initialized: Admin,
) -> None:
    """A rewrap into a successor that keeps none of the old HSMs makes the fresh k in one of
    those (it must unwrap the old k), so that HSM had every later epoch's mk: retiring, even
    below an epoch rotated afterwards, would leave it out of reach of nothing (found by
    review). Refused, naming it."""
    t1 = initialized.real_domain()  # hsm1 + hsm2
    initialized("hsm", "create", "--label", "hsm3")
    t2 = initialized.sealed_trust(["hsm3"], ["alice"], 1, signers=["alice"], predecessor=t1)
    initialized("domain", "rewrap", "payroll", "--trust", t2)  # k made in hsm1 or hsm2
    initialized("domain", "rotate", "payroll")
    result = initialized("domain", "retire", "payroll", "--below", "2", "--yes", check=2)
    assert re.search(r"HSM hsm[12], which its trust no longer has, had the k of generation 3",
                     result.stderr), result.stderr


def test_a_mounts_handle_serves_a_new_generation_only_once_it_can(
    initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handle of a mount (follow_in_background) moves to a rotation that reaches the
    store. While the new generation's HSM is being opened, and as long as that fails, it
    serves the old generation whole: its current epoch (which new file headers take) and its
    keys, never the new epoch before a key of it can be derived (a new file would then fail
    on a key its generation lacks). Once it works, the new generation, old epochs included."""
    initialized.real_domain()
    ctx = Context.at(initialized.store)
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as keys:
        old_key = keys.derive(INFO)
        seen: list[int] = []
        real_open = keys._open_generation

        def new_one_unavailable(verified: VerifiedDomain) -> object:
            if verified.sealed.domain.generation == 1:
                return real_open(verified)
            seen.append(keys.current_epoch)  # what a new file would be keyed with just now
            raise HsmUnavailableError("no HSM of the new generation's trust answers")

        monkeypatch.setattr(keys, "_open_generation", new_one_unavailable)
        keys.follow_in_background()
        initialized("domain", "rotate", "payroll")
        assert wait_for(lambda: len(seen) >= 3, timeout=15)  # it tried, and tried again
        assert set(seen) == {1} and keys.current_epoch == 1
        assert keys.derive(INFO) == old_key
        monkeypatch.setattr(keys, "_open_generation", real_open)
        assert wait_for(lambda: keys.current_epoch == 2, timeout=15)
        assert keys.derive(INFO, 1) == old_key and keys.derive(INFO) != old_key


def test_a_mounts_handle_does_not_move_to_a_rival_this_machine_has_not_mounted(
    initialized: Admin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:  # type: ignore[no-untyped-def]
    """Another volume of the Domain mounted generation 2 on this machine; a store writer then
    swaps in a rival generation 2 (from a copy of the store rotated apart). A mount's handle
    still at generation 1 does not move to it (found by review): this machine's record refuses
    it, as it would refuse a mount started now, and the handle serves generation 1 as before
    (whose keys the real history still has), saying why once."""
    monkeypatch.setenv("KMSFS_STATE_DIR", str(tmp_path / "state"))
    initialized.real_domain()
    ctx = Context.at(initialized.store)
    elsewhere = dataclasses.replace(initialized, store=tmp_path / "store-elsewhere")
    shutil.copytree(initialized.store, elsewhere.store, symlinks=True)
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as keys:
        kms.remember_in_use(keys)
        key_1 = keys.derive(INFO)
        keys.check_move = kms.check_move  # as a mount sets it (kmsfs.fs.cli)
        elsewhere("domain", "rotate", "payroll")
        initialized("domain", "rotate", "payroll")
        mine = {p.name for p in (initialized.store / "domains").iterdir()}
        (rival,) = {p.name for p in (elsewhere.store / "domains").iterdir()} - mine
        with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as other:
            assert kms.remember_in_use(other) == 2  # the other volume's mount
        (made,) = mine - {p.name for p in (elsewhere.store / "domains").iterdir()}
        (initialized.store / "domains" / made).unlink()
        shutil.copy2(elsewhere.store / "domains" / rival, initialized.store / "domains")
        keys.follow_in_background()
        assert wait_for(lambda: "cannot serve its generation 2 yet" in caplog.text, timeout=15)
        assert "a rival generation?" in caplog.text
        assert keys.verified.sealed.domain.generation == 1 and keys.derive(INFO) == key_1


def test_a_generation_slipped_in_with_the_store_mtime_put_back_is_still_seen(
    initialized: Admin, tmp_path: Path
) -> None:
    """Whoever owns the store adds a retiring generation and puts domains/'s mtime back
    (utime), as if nothing had changed there: the handle reads the store again all the same
    (a directory's ctime cannot be put back) and takes the retirement in."""
    initialized.real_domain()
    initialized("domain", "rotate", "payroll")
    ctx = Context.at(initialized.store)
    elsewhere = dataclasses.replace(initialized, store=tmp_path / "store-elsewhere")
    shutil.copytree(initialized.store, elsewhere.store, symlinks=True)
    elsewhere("domain", "retire", "payroll", "--below", "2", "--yes")
    (made,) = {p.name for p in (elsewhere.store / "domains").iterdir()} - {
        p.name for p in (initialized.store / "domains").iterdir()}
    store_dirs = [initialized.store / "domains", initialized.store / "trusts"]
    for d in store_dirs:  # settled a minute ago
        os.utime(d, (time.time() - 60, time.time() - 60))
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as keys:
        keys.follow_store()
        before = os.stat(store_dirs[0])
        shutil.copy2(elsewhere.store / "domains" / made, store_dirs[0])
        os.utime(store_dirs[0], ns=(before.st_atime_ns, before.st_mtime_ns))
        keys.follow_store()
        assert keys.retired_below == 2


def test_a_mounts_handle_moves_to_a_trust_of_hsms_made_after_it_opened(
    initialized: Admin,
) -> None:
    """Every HSM of the Trust is replaced by one made since the mount started (a successor
    of only a new HSM, and a rewrap into it, found by review): SoftHSM2 shows this process the
    new token only after a rescan, which the handle's open session prevents. The handle closes
    its sessions and moves all the same; keys of the Domain stay what they were."""
    trust = initialized.real_domain()  # hsm1 + hsm2
    ctx = Context.at(initialized.store)
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as keys:
        key = keys.derive(INFO)
        keys.follow_in_background()
        initialized("hsm", "create", "--label", "hsm3")
        successor = initialized.sealed_trust(["hsm3"], ["alice"], 1, signers=["alice"],
                                             predecessor=trust)
        initialized("domain", "rewrap", "payroll", "--trust", successor)
        assert wait_for(lambda: keys.verified.sealed.domain.generation == 2, timeout=15)
        assert keys.hsm_label == "hsm3" and keys.derive(INFO) == key


def test_a_handle_follows_the_retirements_of_its_own_domain_only(initialized: Admin) -> None:
    """follow_store takes in a retirement only from a history its own generation is part of:
    a same-named Domain made in the store since (the old one's documents removed) is another
    Domain, whose retirements say nothing about this one's keys. Its own Domain's retirement,
    once in the store, is taken in (the same call, the same handle)."""
    trust = initialized.real_domain()
    ctx = Context.at(initialized.store)
    initialized("domain", "rotate", "payroll")
    own = {p.name: p.read_bytes() for p in (initialized.store / "domains").iterdir()}
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as keys:
        keys.follow_store()
        assert keys.retired_below == 1
        for name in own:
            (initialized.store / "domains" / name).unlink()
        initialized("domain", "create", "payroll", "--trust", trust)
        initialized("domain", "rotate", "payroll")
        initialized("domain", "retire", "payroll", "--below", "2", "--yes")
        keys.follow_store()
        assert keys.retired_below == 1
        assert keys.derive(INFO, 1)
        for name in list((initialized.store / "domains").iterdir()):
            name.unlink()
        for name, data in own.items():
            (initialized.store / "domains" / name).write_bytes(data)
        initialized("domain", "retire", "payroll", "--below", "2", "--yes")
        keys.follow_store()
        assert keys.retired_below == 2
        with pytest.raises(IntegrityError, match="key epoch 1 of Domain payroll is retired"):
            keys.derive(INFO, 1)


def test_following_the_store_reads_it_only_when_it_may_have_news(
    initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """follow_store reads and verifies the history (a tenth of a second for a long one) only
    when there may be news: a store changed in the last seconds is looked at again a second
    later (its directory may change again within one timestamp), an unchanged one never, and
    one that does not verify after 1, 2, 4... s, or at once when it changes. The agent calls
    it for every derivation, so none of this may happen per call. The thread of a mount ends
    with the handle."""
    initialized.real_domain()
    ctx = Context.at(initialized.store)
    reads: list[str] = []
    real_history = domains.history

    def counted(c: Context, name: str) -> list:  # type: ignore[type-arg]
        reads.append(name)
        return real_history(c, name)

    monkeypatch.setattr(domains, "history", counted)
    clock = [1000.0]
    monkeypatch.setattr(domains.time, "monotonic", lambda: clock[0])
    store_dirs = [initialized.store / "domains", initialized.store / "trusts"]

    def age_store() -> None:  # as if the last change were a minute ago
        for d in store_dirs:
            os.utime(d, (time.time() - 60, time.time() - 60))

    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as keys:
        reads.clear()  # opening read it too
        for _ in range(5):  # just changed: looked at, then again only a second later
            keys.follow_store()
        assert len(reads) == 1
        clock[0] += 1.1
        keys.follow_store()
        assert len(reads) == 2
        age_store()
        for _ in range(5):
            keys.follow_store()
        assert len(reads) == 3  # settled: never read again while it stays as it is
        planted = initialized.store / "domains" / f"{'ab' * 32}.json"
        planted.write_text("{")
        age_store()
        for _ in range(5):
            keys.follow_store()
        assert len(reads) == 4  # does not verify: read again in 1 s, then 2, then 4
        for wait, expect in ((1.1, 5), (1.1, 5), (1.0, 6), (3.9, 6), (0.2, 7)):
            clock[0] += wait
            keys.follow_store()
            assert len(reads) == expect
        planted.unlink()  # a change: read at once
        keys.follow_store()
        assert len(reads) == 8
        keys.follow_in_background()
        assert any(t.name == "kmsfs-follow-store" for t in threading.enumerate())
    monkeypatch.undo()  # the real clock again
    deadline = time.monotonic() + 10
    while any(t.name == "kmsfs-follow-store" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the follower outlived its handle"
        time.sleep(0.05)
