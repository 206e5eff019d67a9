"""The enrolment self-test's judgement of a token, against dishonest tokens no real one plays.

A real token (SoftHSM2, in tests/integration/test_other_tokens.py) shows the missing-mechanism
refusals; here a token in software, faithful to PKCS#11 (RFC 5649 wrapping and HMAC-SHA256 from
the cryptography package), is made to break one promise at a time.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives.keywrap import (
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from pkcs11 import Attribute, Mechanism
from pkcs11 import exceptions as p11

from kmsfs.errors import HsmError
from kmsfs.hsm import domainkeys


class SoftKey:
    def __init__(self, token: SoftToken, value: bytes, template: dict) -> None:
        self.token, self.value, self.template = token, value, template
        token.live.add(self)

    def wrap_key(self, key: SoftKey, mechanism: Mechanism) -> bytes:
        assert mechanism == Mechanism.AES_KEY_WRAP_PAD
        return aes_key_wrap_with_padding(self.value, key.value)

    def unwrap_key(self, _cls, _type, wrapped: bytes, store: bool, mechanism: Mechanism,  # type: ignore[no-untyped-def]
                   template: dict) -> SoftKey:
        assert mechanism == Mechanism.AES_KEY_WRAP_PAD and not store
        value = aes_key_unwrap_with_padding(self.value, wrapped)
        if self.token.unwraps_wrongly:
            value = bytes(len(value))
        return SoftKey(self.token, value, template)

    def sign(self, data: bytes, mechanism: Mechanism) -> bytes:
        assert mechanism == Mechanism.SHA256_HMAC
        return hmac.new(self.value, data, hashlib.sha256).digest()

    def __getitem__(self, attribute: Attribute) -> bytes:
        assert attribute == Attribute.VALUE
        if self.template.get(Attribute.SENSITIVE) and not self.token.reveals_values:
            raise p11.AttributeSensitive()
        return self.value

    def destroy(self) -> None:
        self.token.live.remove(self)


class SoftToken:
    """Just what ``self_test`` asks of a session."""

    def __init__(self, *, reveals_values: bool = False, unwraps_wrongly: bool = False,
                 refuses_hmac: bool = False) -> None:
        self.reveals_values, self.unwraps_wrongly = reveals_values, unwraps_wrongly
        self.refuses_hmac = refuses_hmac
        self.live: set[SoftKey] = set()

    def generate_key(self, _type, bits: int, store: bool, template: dict) -> SoftKey:  # type: ignore[no-untyped-def]
        assert not store
        key = SoftKey(self, os.urandom(bits // 8), template)
        if self.refuses_hmac:
            key.sign = _refuse  # type: ignore[method-assign]
        return key


def _refuse(*_args: object, **_kwargs: object) -> bytes:
    raise p11.MechanismInvalid()


def test_an_honest_token_passes_and_keeps_nothing() -> None:
    token = SoftToken()
    domainkeys.self_test(token)  # type: ignore[arg-type]
    assert token.live == set()


@pytest.mark.parametrize(("token", "said"), [
    (SoftToken(reveals_values=True), "reveals the value of a key unwrapped as SENSITIVE"),
    (SoftToken(unwraps_wrongly=True), "differs from that with the key itself"),
    (SoftToken(refuses_hmac=True), "HMAC-SHA256 with a secret key (CKM_SHA256_HMAC"),
])
def test_a_dishonest_or_lacking_token_is_refused_and_keeps_nothing(
    token: SoftToken, said: str
) -> None:
    with pytest.raises(HsmError, match="not enrolled") as refused:
        domainkeys.self_test(token)  # type: ignore[arg-type]
    assert said in str(refused.value)
    assert token.live == set()


def test_a_token_that_is_gone_is_not_called_lacking() -> None:
    """A removed device is the token being gone, which hsm_errors reports as such, not a
    missing mechanism."""
    token = SoftToken()

    def gone(*_args: object, **_kwargs: object) -> SoftKey:
        raise p11.DeviceRemoved()

    token.generate_key = gone  # type: ignore[method-assign]
    with pytest.raises(p11.DeviceRemoved):
        domainkeys.self_test(token)  # type: ignore[arg-type]
