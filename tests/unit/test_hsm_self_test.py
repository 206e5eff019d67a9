"""The enrolment self-test's judgement of a token, against dishonest tokens no real one plays.

A real token (SoftHSM2, in tests/integration/test_other_tokens.py) shows the missing-mechanism
refusals; here a token in software, faithful to PKCS#11 (RFC 5649 wrapping and HMAC-SHA256 from
the cryptography package), is made to break one promise at a time, or to be a PKCS#11 3.0
token, whose CKM_AES_KEY_WRAP_PAD is PKCS#7 padding then RFC 3394.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap,
    aes_key_wrap_with_padding,
)
from pkcs11 import Attribute, Mechanism
from pkcs11 import exceptions as p11

from kmsfs.errors import HsmError
from kmsfs.hsm import domainkeys


def _pkcs7_then_rfc3394(kek: bytes, key: bytes) -> bytes:
    """PKCS#11 3.0's CKM_AES_KEY_WRAP_PAD: PKCS#7 padding to 8 bytes, then RFC 3394."""
    pad = 8 - len(key) % 8
    return aes_key_wrap(kek, key + bytes([pad]) * pad)


def _undo_pkcs7_then_rfc3394(kek: bytes, wrapped: bytes) -> bytes:
    padded = aes_key_unwrap(kek, wrapped)
    return padded[: -padded[-1]]


class SoftKey:
    def __init__(self, token: SoftToken, value: bytes, template: dict) -> None:
        self.token, self.value, self.template = token, value, template
        token.live.add(self)

    def _wrapping(self, mechanism: Mechanism) -> tuple:  # type: ignore[type-arg]
        self.token.used.add(mechanism)
        if mechanism == Mechanism.AES_KEY_WRAP_KWP and self.token.lists_kwp:
            return aes_key_wrap_with_padding, aes_key_unwrap_with_padding
        if mechanism == Mechanism.AES_KEY_WRAP_PAD:
            if self.token.pad_is_pkcs7:
                return _pkcs7_then_rfc3394, _undo_pkcs7_then_rfc3394
            return aes_key_wrap_with_padding, aes_key_unwrap_with_padding
        raise p11.MechanismInvalid()

    def wrap_key(self, key: SoftKey, mechanism: Mechanism) -> bytes:
        wrapped = self._wrapping(mechanism)[0](self.value, key.value)
        self.token.wrapped_here.add(wrapped)
        return wrapped

    def unwrap_key(self, _cls, _type, wrapped: bytes, store: bool, mechanism: Mechanism,  # type: ignore[no-untyped-def]
                   template: dict) -> SoftKey:
        assert not store
        unwrap = self._wrapping(mechanism)[1]
        try:
            value = unwrap(self.value, wrapped)
        except InvalidUnwrap:
            raise p11.WrappedKeyInvalid() from None
        if self.token.unwraps_wrongly or (
            self.token.garbles_foreign and wrapped not in self.token.wrapped_here
        ):
            value = bytes(len(value))
        return SoftKey(self.token, value, template)

    def sign(self, data: bytes, mechanism: Mechanism) -> bytes:
        assert mechanism == Mechanism.SHA256_HMAC
        if self.token.refuses_hmac:
            raise p11.MechanismInvalid()
        return hmac.new(self.value, data, hashlib.sha256).digest()

    def __getitem__(self, attribute: Attribute) -> bytes:
        assert attribute == Attribute.VALUE
        if self.template.get(Attribute.SENSITIVE) and not self.token.reveals_values:
            raise p11.AttributeSensitive()
        return self.value

    def destroy(self) -> None:
        self.token.live.remove(self)


class SoftToken:
    """Just what ``self_test`` asks of a session (and of its token's slot)."""

    def __init__(self, *, reveals_values: bool = False, unwraps_wrongly: bool = False,
                 refuses_hmac: bool = False, pad_is_pkcs7: bool = False,
                 lists_kwp: bool = False, takes_known_keys: bool = True,
                 garbles_foreign: bool = False) -> None:
        self.reveals_values, self.unwraps_wrongly = reveals_values, unwraps_wrongly
        self.refuses_hmac, self.pad_is_pkcs7 = refuses_hmac, pad_is_pkcs7
        self.lists_kwp = lists_kwp
        self.takes_known_keys, self.garbles_foreign = takes_known_keys, garbles_foreign
        self.wrapped_here: set[bytes] = set()
        self.live: set[SoftKey] = set()
        self.used: set[Mechanism] = set()

    @property
    def token(self) -> SoftToken:
        return self

    @property
    def slot(self) -> SoftToken:
        return self

    def get_mechanisms(self) -> set[Mechanism]:
        listed = {Mechanism.AES_KEY_WRAP_PAD, Mechanism.SHA256_HMAC}
        return listed | ({Mechanism.AES_KEY_WRAP_KWP} if self.lists_kwp else set())

    def generate_key(self, _type, bits: int, store: bool, template: dict) -> SoftKey:  # type: ignore[no-untyped-def]
        assert not store
        return SoftKey(self, os.urandom(bits // 8), template)

    def create_object(self, attributes: dict) -> SoftKey:
        assert attributes[Attribute.TOKEN] is False
        if not self.takes_known_keys:
            raise p11.TemplateInconsistent()
        return SoftKey(self, attributes[Attribute.VALUE], attributes)


def test_an_honest_token_passes_and_keeps_nothing() -> None:
    token = SoftToken()
    domainkeys.self_test(token)  # type: ignore[arg-type]
    assert token.live == set()


@pytest.mark.parametrize(("token", "said"), [
    (SoftToken(reveals_values=True), "reveals the value of a key unwrapped as SENSITIVE"),
    (SoftToken(unwraps_wrongly=True), "differs from that with the key itself"),
    (SoftToken(refuses_hmac=True), "HMAC-SHA256 with a secret key (CKM_SHA256_HMAC"),
    (SoftToken(pad_is_pkcs7=True), "its CKM_AES_KEY_WRAP_PAD is not RFC 5649"),
    (SoftToken(garbles_foreign=True), "is not the key wrapped"),
])
def test_a_dishonest_or_lacking_token_is_refused_and_keeps_nothing(
    token: SoftToken, said: str
) -> None:
    with pytest.raises(HsmError, match="not enrolled") as refused:
        domainkeys.self_test(token)  # type: ignore[arg-type]
    assert said in str(refused.value)
    assert token.live == set()


def test_a_token_of_pkcs11_3_is_asked_for_kwp_and_passes() -> None:
    """Its CKM_AES_KEY_WRAP_PAD is PKCS#7 then RFC 3394, but it lists CKM_AES_KEY_WRAP_KWP:
    that is RFC 5649, so the Domains of other HSMs open on it."""
    token = SoftToken(pad_is_pkcs7=True, lists_kwp=True)
    domainkeys.self_test(token)  # type: ignore[arg-type]
    assert token.used == {Mechanism.AES_KEY_WRAP_KWP}
    assert domainkeys.rfc5649(token) == Mechanism.AES_KEY_WRAP_KWP  # type: ignore[arg-type]
    assert domainkeys.rfc5649(SoftToken()) == Mechanism.AES_KEY_WRAP_PAD  # type: ignore[arg-type]


def test_a_token_that_takes_no_known_key_is_checked_by_the_round_trip_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    domainkeys.self_test(SoftToken(takes_known_keys=False))  # type: ignore[arg-type]
    assert "not checked against RFC 5649's answer" in caplog.text
    with pytest.raises(HsmError, match="differs from that with the key itself"):
        domainkeys.self_test(SoftToken(takes_known_keys=False, unwraps_wrongly=True))  # type: ignore[arg-type]


def test_a_token_that_is_gone_is_not_called_lacking() -> None:
    """A removed device is the token being gone, which hsm_errors reports as such, not a
    missing mechanism."""
    token = SoftToken()

    def gone(*_args: object, **_kwargs: object) -> SoftKey:
        raise p11.DeviceRemoved()

    token.generate_key = gone  # type: ignore[method-assign]
    with pytest.raises(p11.DeviceRemoved):
        domainkeys.self_test(token)  # type: ignore[arg-type]


def test_a_domain_wrapped_before_kwp_was_asked_for_still_opens() -> None:
    """A Trust of PKCS#11 3.0 tokens only: its Domains were wrapped with their
    CKM_AES_KEY_WRAP_PAD (PKCS#7 then RFC 3394) before kmsfs asked for KWP."""
    token = SoftToken(pad_is_pkcs7=True, lists_kwp=True)
    k = token.generate_key(None, 256, False, domainkeys.K_TEMPLATE)
    mk = token.generate_key(None, 256, False, domainkeys.MK_TEMPLATE)
    for mechanism in (Mechanism.AES_KEY_WRAP_PAD, Mechanism.AES_KEY_WRAP_KWP):
        wrapped = k.wrap_key(mk, mechanism)
        back = domainkeys._unwrap_mk_here(  # type: ignore[arg-type]
            k, wrapped, domainkeys.UNWRAPPED_MK_TEMPLATE, domainkeys.rfc5649(token)  # type: ignore[arg-type]
        )
        assert back.value == mk.value
    garbled = bytes(48)
    with pytest.raises(p11.WrappedKeyInvalid):  # neither form: an error, never a wrong key
        domainkeys._unwrap_mk_here(  # type: ignore[arg-type]
            k, garbled, domainkeys.UNWRAPPED_MK_TEMPLATE, domainkeys.rfc5649(token)  # type: ignore[arg-type]
        )
