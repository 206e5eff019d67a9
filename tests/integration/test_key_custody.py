"""Key custody (DESIGN.md §2.1) with real SoftHSM2 tokens, in process through the service API.

``mk`` is generated, wrapped, unwrapped and used inside tokens: its value cannot be read, yet
every HSM of the Trust derives the same keys, and an HSM outside the Trust cannot unwrap.
"""

import json
from pathlib import Path

import pytest
from pkcs11 import exceptions as p11

from kmsfs import api
from kmsfs.errors import HsmUnavailableError
from kmsfs.hsm import domainkeys, library
from kmsfs.service import domains
from kmsfs.service.context import Context
from tests.kms_helpers import Admin

INFO = b"kmsfs/v1/file-key\x00" + bytes(range(16))


@pytest.fixture
def domain(initialized: Admin) -> Admin:
    initialized("hsm", "create", "--label", "hsm3")
    initialized.real_domain("vault")
    return initialized


def _access_file(admin: Admin, label: str) -> Path:
    ctx = Context.at(admin.store)
    record = next(h for h in (ctx.store.hsm(i) for i in ctx.store.hsm_ids()) if h.label == label)
    return admin.store / "private" / "hsm-access" / f"{record.id}.json"


def _make_unreachable(admin: Admin, label: str) -> None:
    """The HSM's token disappears (as when a device is unplugged)."""
    path = _access_file(admin, label)
    doc = json.loads(path.read_text())
    doc["token_label"] = f"{label}-unplugged"
    path.write_text(json.dumps(doc))


def _make_reachable(admin: Admin, label: str) -> None:
    path = _access_file(admin, label)
    doc = json.loads(path.read_text())
    doc["token_label"] = label
    path.write_text(json.dumps(doc))


def test_mk_value_cannot_be_read_from_the_token(domain: Admin) -> None:
    bundle = api.export_domain_bundle(domain.store, "vault")
    with domains.open_keys(
        Context.at(domain.store), domains.DomainBundle.from_bytes(bundle)
    ) as keys:
        assert keys.master_key_is_readable() is False
        assert len(keys.derive(INFO)) == 32


def test_every_hsm_of_the_trust_derives_the_same_keys(domain: Admin) -> None:
    bundle = api.export_domain_bundle(domain.store, "vault")
    with api.open_domain(domain.store, bundle) as deriver:
        assert deriver.hsm_label == "hsm1"  # type: ignore[attr-defined]
        first = deriver.derive(INFO), deriver.derive(b"other")
    _make_unreachable(domain, "hsm1")
    with api.open_domain(domain.store, bundle) as deriver:
        assert deriver.hsm_label == "hsm2"  # type: ignore[attr-defined]
        second = deriver.derive(INFO), deriver.derive(b"other")
        # A mount refilling its keys for new files asks for many in one call: the same keys.
        batch = deriver.derive_many([b"other", INFO, b"other"])  # type: ignore[attr-defined]
    assert first == second
    assert first[0] != first[1]
    assert batch == [first[1], first[0], first[1]]


def test_a_damaged_access_file_fails_over_to_another_hsm(domain: Admin) -> None:
    """One HSM's local access file cut short: the others still serve (it stopped them all)."""
    bundle = api.export_domain_bundle(domain.store, "vault")
    path = _access_file(domain, "hsm1")
    path.write_bytes(path.read_bytes()[:20])
    with api.open_domain(domain.store, bundle) as deriver:
        assert deriver.hsm_label == "hsm2"  # type: ignore[attr-defined]
        assert len(deriver.derive(INFO)) == 32


def test_no_hsm_left_is_a_clear_error(domain: Admin) -> None:
    bundle = api.export_domain_bundle(domain.store, "vault")
    _make_unreachable(domain, "hsm1")
    _make_unreachable(domain, "hsm2")
    with (
        pytest.raises(HsmUnavailableError, match=r"hsm1: .*not present.*hsm2: .*not present"),
        api.open_domain(domain.store, bundle),
    ):
        pass


def test_an_hsm_outside_the_trust_cannot_unwrap(domain: Admin) -> None:
    ctx = Context.at(domain.store)
    verified = domains.current(ctx, "vault")
    hsm3 = next(h for h in (ctx.store.hsm(i) for i in ctx.store.hsm_ids()) if h.label == "hsm3")
    location, pin = ctx.private.access("hsm", hsm3.id)
    assert pin is not None
    dom = verified.sealed.domain
    with library.session(location, pin.read()) as session:
        for wrapped in dom.wrapped_k:  # try k as wrapped for each HSM of the trust
            with pytest.raises(p11.PKCS11Error):
                domainkeys.unwrap(session, wrapped.scheme, wrapped.data, dom.current_epoch.data)


def test_describe_bundle_reports_verification(domain: Admin) -> None:
    bundle = api.export_domain_bundle(domain.store, "vault")
    info = api.describe_bundle(domain.store, bundle)
    assert info["verified"] is True and info["name"] == "vault"
    assert [h["label"] for h in info["hsms"]] == ["hsm1", "hsm2"]
    doc = json.loads(bundle)
    doc["chain"][-1]["trust"]["created"] = "2000-01-01T00:00:00Z"  # well-formed, but not signed
    info = api.describe_bundle(domain.store, json.dumps(doc).encode())
    assert info["verified"] is False and "trust" in info["problem"]


def test_after_a_rewrap_the_old_bundle_opens_the_new_generation(domain: Admin) -> None:
    """A CIPHERDIR made before hsm1 was revoked must not keep using hsm1."""
    old_bundle = api.export_domain_bundle(domain.store, "vault")
    with api.open_domain(domain.store, old_bundle) as deriver:
        before = deriver.derive(INFO)
    current = domains.current(Context.at(domain.store), "vault")
    assert json.loads(old_bundle)["chain"][-1]["trust"] == current.trust.trust.payload()
    successor = domain.sealed_trust(["hsm2"], ["alice"], 1, predecessor=current.trust.id)
    domain("domain", "rewrap", "vault", "--trust", successor)
    with api.open_domain(domain.store, old_bundle) as deriver:
        assert deriver.hsm_label == "hsm2"  # type: ignore[attr-defined]
        assert deriver.verified.sealed.domain.generation == 2  # type: ignore[attr-defined]
        assert deriver.derive(INFO) == before  # mk unchanged: old data stays readable


def test_a_failing_hsm_fails_over_and_service_resumes_when_one_returns(domain: Admin) -> None:
    """The serving token fails mid-use: the next derivation goes through another HSM; with
    none left derivation fails cleanly, and resumes by itself once an HSM is back."""
    bundle = api.export_domain_bundle(domain.store, "vault")
    with api.open_domain(domain.store, bundle) as deriver:
        keys: domains.DomainKeys = deriver  # type: ignore[assignment]
        keys.RETRY_INTERVAL = 0.0
        before = keys.derive(INFO)
        assert keys.hsm_label == "hsm1"
        _make_unreachable(domain, "hsm1")
        keys.fail_session_for_test()  # the serving token dies
        assert keys.derive(INFO) == before
        assert keys.hsm_label == "hsm2"
        _make_unreachable(domain, "hsm2")
        keys.fail_session_for_test()
        with pytest.raises(HsmUnavailableError):
            keys.derive(INFO)
        _make_reachable(domain, "hsm1")
        assert keys.derive(INFO) == before
        assert keys.hsm_label == "hsm1"
