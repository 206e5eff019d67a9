"""Key custody (DESIGN.md §2.1) object by object: every ``k`` and ``mk`` a token holds is SENSITIVE.

tests/integration/test_key_custody.py reads CKA_VALUE of the current ``mk`` after an unwrap;
the templates of kmsfs.hsm.domainkeys decide much more than that one read. Here each path that
makes or unwraps a key (create, unwrap, rewrap, rotate, epoch_hmacs) runs in this process on
real SoftHSM2 tokens, with a recorder around the token calls that make keys: as each PKCS#11
object is returned it is asked, in the token, for CKA_SENSITIVE, CKA_EXTRACTABLE and CKA_VALUE.

- every ``k`` and ``mk``: CKA_SENSITIVE true, and the token refuses to give out CKA_VALUE;
- every *unwrapped* ``k``, and an ``mk`` unwrapped to derive (unwrap, epoch_hmacs): CKA_EXTRACTABLE
  false, so no PKCS#11 caller can wrap it out under a key of its own choosing. The keys that
  are wrapped by design (a new ``k`` for its recipients, a new ``mk`` by ``k``, the ``mk`` a
  rewrap wraps anew) stay extractable; SENSITIVE still keeps their value in the token.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11
import pytest
from pkcs11 import Attribute, KeyType

from kmsfs.hsm import domainkeys
from kmsfs.model import contexts
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.domain import Domain, MasterKeyEpoch, SealedDomain, WrappedKey
from kmsfs.model.trust import Signature
from kmsfs.service import domains, trusts
from kmsfs.service.context import Context, open_hsm, utc_now
from tests.kms_helpers import Admin

INFO = b"kmsfs/v1/file-key\x00" + bytes(range(16))


@dataclass(frozen=True)
class Custody:
    """What the token said of one key object the moment a domainkeys path got it."""

    path: str  # the domainkeys function: create, unwrap, rewrap, epoch_hmacs, rotate
    key: str  # "k" or "mk"
    how: str  # "generated" or "unwrapped"
    sensitive: bool
    extractable: bool
    value_readable: bool

    @property
    def kind(self) -> tuple[str, str, str]:
        return (self.path, self.key, self.how)


#: For each kind of key object: must it be non-extractable? (All must be SENSITIVE.)
MUST_NOT_EXTRACT = {
    ("create", "k", "generated"): False,  # wrapped for each HSM of the Trust
    ("create", "mk", "generated"): False,  # wrapped by k
    ("unwrap", "k", "unwrapped"): True,
    ("unwrap", "mk", "unwrapped"): True,  # the mk a mount derives with
    ("rewrap", "k", "unwrapped"): True,  # the old k
    ("rewrap", "k", "generated"): False,  # the fresh k, wrapped for the new Trust's HSMs
    ("rewrap", "mk", "unwrapped"): False,  # wrapped anew by the fresh k, inside the call only
    ("epoch_hmacs", "k", "unwrapped"): True,
    ("epoch_hmacs", "mk", "unwrapped"): True,
    ("rotate", "k", "unwrapped"): True,
    ("rotate", "mk", "generated"): False,  # the new epoch, wrapped by k
}


def _inspect(path: str, key: str, how: str, obj: pkcs11.SecretKey) -> Custody:
    try:
        obj[Attribute.VALUE]
    except pkcs11.exceptions.PKCS11Error:
        readable = False
    else:
        readable = True
    return Custody(
        path, key, how, bool(obj[Attribute.SENSITIVE]), bool(obj[Attribute.EXTRACTABLE]), readable
    )


class _RecordingSession:
    """A real pkcs11 session whose ``generate_key`` results are inspected as they are made."""

    def __init__(self, session: pkcs11.Session, path: str, seen: list[Custody]) -> None:
        self._session = session
        self._path = path
        self._seen = seen

    def generate_key(self, key_type: KeyType, *args: Any, **kwargs: Any) -> pkcs11.SecretKey:
        obj = self._session.generate_key(key_type, *args, **kwargs)
        key = "k" if key_type == KeyType.AES else "mk"
        self._seen.append(_inspect(self._path, key, "generated", obj))
        return obj

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


@pytest.fixture
def custody(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Custody]]:
    """Every k and mk the domainkeys paths make or unwrap from now on, as the token saw it."""
    seen: list[Custody] = []

    def unwrapping(key: str, real: Callable[..., pkcs11.SecretKey]) -> Callable[..., Any]:
        def recorder(*args: Any, **kwargs: Any) -> pkcs11.SecretKey:
            obj = real(*args, **kwargs)
            frame = sys._getframe(1)
            while frame.f_code.co_name.startswith("_unwrap_mk"):  # the mechanism's choice
                frame = frame.f_back  # type: ignore[assignment]
            caller = frame.f_code.co_name  # unwrap, rewrap, epoch_hmacs, rotate
            seen.append(_inspect(caller, key, "unwrapped", obj))
            return obj

        return recorder

    def generating(path: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def recorder(session: pkcs11.Session, *args: Any, **kwargs: Any) -> Any:
            return real(_RecordingSession(session, path, seen), *args, **kwargs)

        return recorder

    monkeypatch.setattr(domainkeys, "_unwrap_k", unwrapping("k", domainkeys._unwrap_k))
    monkeypatch.setattr(domainkeys, "_unwrap_mk", unwrapping("mk", domainkeys._unwrap_mk))
    for path in ("create", "rewrap", "rotate"):
        monkeypatch.setattr(domainkeys, path, generating(path, getattr(domainkeys, path)))
    yield seen


def _assert_in_custody(seen: list[Custody], kinds: set[tuple[str, str, str]]) -> None:
    """Each key seen is SENSITIVE with its value refused, non-extractable where it must be;
    and each of ``kinds`` was seen (else this test checked less than it says)."""
    assert kinds <= {c.kind for c in seen}, (kinds, seen)
    for c in seen:
        assert c.kind in MUST_NOT_EXTRACT, c
        assert c.sensitive, f"{c.key} ({c.how} in {c.path}) is not CKA_SENSITIVE: {c}"
        assert not c.value_readable, f"the token gave out CKA_VALUE of {c.key} in {c.path}"
        if MUST_NOT_EXTRACT[c.kind]:
            assert not c.extractable, f"{c.key} unwrapped in {c.path} is CKA_EXTRACTABLE: {c}"


@pytest.fixture
def trusted(initialized: Admin) -> tuple[Admin, Context, str]:
    """hsm1 + hsm2, operator alice, Trust T1 (both HSMs, quorum 1) sealed; no Domain yet."""
    initialized.create_operators("alice")
    t1 = initialized.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
    return initialized, Context.at(initialized.store), t1


def _bundle(ctx: Context, name: str) -> DomainBundle:
    return domains.export_bundle(ctx, name)


def test_create_and_rotate_make_k_and_mk_sensitive(
    trusted: tuple[Admin, Context, str], custody: list[Custody]
) -> None:
    """A user relies on a Domain's keys being made inside the token and kept there: ``k`` and
    ``mk`` from create, and each new ``mk`` epoch from rotate (with ``k`` unwrapped to wrap it),
    are SENSITIVE (rotate also unwraps each epoch first, to check its binding: those keys too).
    With SENSITIVE false in MK_TEMPLATE, anyone with the HSM's PIN could read ``mk`` from the
    session, and no test noticed (the custody test reads an unwrapped ``mk`` only)."""
    _, ctx, t1 = trusted
    domains.create(ctx, "vault", t1)
    domains.rotate(ctx, "vault")
    _assert_in_custody(
        custody,
        {
            ("create", "k", "generated"),
            ("create", "mk", "generated"),
            ("rotate", "k", "unwrapped"),
            ("rotate", "mk", "generated"),
        },
    )


def test_unwrapped_k_and_mk_are_sensitive_and_never_extractable(
    trusted: tuple[Admin, Context, str], custody: list[Custody]
) -> None:
    """Opening a Domain (what every mount does) unwraps ``k`` and then ``mk`` of the current
    epoch and, on use, of older ones. Both must come back SENSITIVE and non-EXTRACTABLE
    (C_UnwrapKey takes the template given; nothing defaults to that). An extractable ``mk``
    could be wrapped out of the token under a key the PIN holder picks, an extractable or
    non-sensitive ``k`` read or wrapped out too; the value-read test missed both."""
    _, ctx, t1 = trusted
    domains.create(ctx, "vault", t1)
    domains.rotate(ctx, "vault")
    custody.clear()  # this test is about unwrapping
    with domains.open_keys(ctx, _bundle(ctx, "vault")) as keys:
        assert keys.current_epoch == 2
        assert len(keys.derive(INFO)) == 32
        assert len(keys.derive(INFO, 1)) == 32  # an older epoch, unwrapped on use
        assert keys.master_key_is_readable() is False
    _assert_in_custody(custody, {("unwrap", "k", "unwrapped"), ("unwrap", "mk", "unwrapped")})
    assert sum(c.kind == ("unwrap", "mk", "unwrapped") for c in custody) >= 2


def test_rewrap_keeps_every_key_sensitive_and_the_old_k_unextractable(
    trusted: tuple[Admin, Context, str], custody: list[Custody]
) -> None:
    """Revocation by rewrap (DESIGN.md §2.7) unwraps the old ``k``, makes a fresh one and
    wraps every ``mk`` epoch again: the old ``k`` non-extractable, every key SENSITIVE."""
    admin, ctx, t1 = trusted
    domains.create(ctx, "vault", t1)
    domains.rotate(ctx, "vault")
    t2 = admin.sealed_trust(["hsm1"], ["alice"], 1, predecessor=t1)
    custody.clear()
    domains.rewrap(ctx, "vault", t2)
    _assert_in_custody(
        custody,
        {("rewrap", "k", "unwrapped"), ("rewrap", "k", "generated"), ("rewrap", "mk", "unwrapped")},
    )
    assert sum(c.kind == ("rewrap", "mk", "unwrapped") for c in custody) == 2  # both epochs


def _unbound_domain(ctx: Context, name: str, trust_id: str) -> SealedDomain:
    """A Domain as kmsfs made them before key binding (format 1, no binding): honest keys made
    in hsm1 and sealed by it, saved in the store (as in tests/integration/test_key_binding.py)."""
    governing = trusts.verified_chain(ctx, trust_id)[-1].trust
    hsm1 = next(h for h in governing.hsms if h.label == "hsm1")
    with open_hsm(ctx, [hsm1]) as hsm:
        wrapped_k, wrapped_mk, _ = domainkeys.create(
            hsm.session, [(h.id, h.wrap_key) for h in governing.hsms], b"unused"
        )
        domain = Domain(
            name=name, generation=1, previous=None, trust=governing.id,
            wrapped_k=tuple(
                WrappedKey(i, scheme, w) for i, (scheme, w) in wrapped_k.items()
            ),
            master_keys=(MasterKeyEpoch(1, wrapped_mk),), created=utc_now(),
        )
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_DOMAIN, domain.signed_bytes()))
    sealed = SealedDomain(domain, Signature(domain.id, hsm1.id, value))
    ctx.store.save_domain(sealed)
    return sealed


def test_binding_an_old_domain_unwraps_its_keys_unextractable(
    trusted: tuple[Admin, Context, str], custody: list[Custody]
) -> None:
    """Binding a Domain made before key binding (a rewrap into its own Trust) first has the
    sealing HSM compute each epoch's HMACs (domainkeys.epoch_hmacs): ``k`` and every ``mk``
    unwrapped there are for deriving only, SENSITIVE and non-EXTRACTABLE like a mount's."""
    _, ctx, t1 = trusted
    _unbound_domain(ctx, "legacy", t1)
    custody.clear()
    bound = domains.rewrap(ctx, "legacy", t1)
    assert bound.sealed.domain.bound
    _assert_in_custody(
        custody, {("epoch_hmacs", "k", "unwrapped"), ("epoch_hmacs", "mk", "unwrapped")}
    )
