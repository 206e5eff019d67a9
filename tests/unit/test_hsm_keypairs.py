"""How the signing key pair is made on tokens that differ from SoftHSM2 in ways no SoftHSM2
slot can be set up to: one that names Ed25519 only by its name (PKCS#11 3.0 allows either),
and one that lists Ed25519 but will not make the key pair."""

from __future__ import annotations

from typing import Any

import pytest
from pkcs11 import Attribute, KeyType, Mechanism
from pkcs11 import exceptions as p11

from kmsfs.hsm import keypairs

BY_OID, BY_NAME = keypairs.ED25519_PARAMS


class Token:
    """Just what the signing key pair's generation asks of a session (and its slot)."""

    def __init__(self, mechanisms: set[Mechanism], takes: set[bytes], rsa: bool = True) -> None:
        self.mechanisms, self.takes, self.rsa = mechanisms, takes, rsa
        self.made: list[tuple[KeyType, bytes | None]] = []

    @property
    def token(self) -> Token:
        return self

    @property
    def slot(self) -> Token:
        return self

    def get_mechanisms(self) -> set[Mechanism]:
        return self.mechanisms

    def generate_keypair(self, key_type: KeyType, _bits: int, **kwargs: Any) -> tuple[str, str]:
        params = kwargs["public_template"].get(Attribute.EC_PARAMS)
        if key_type == KeyType.EC_EDWARDS and params not in self.takes:
            raise p11.AttributeValueInvalid()
        self.made.append((key_type, params))
        return "public", "private"


ED25519 = {Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA}
PSS = {Mechanism.SHA256_RSA_PKCS_PSS}


def test_ed25519_is_named_by_its_oid_first() -> None:
    token = Token(ED25519 | PSS, {BY_OID, BY_NAME})
    keypairs._generate_sign_pair(token)  # type: ignore[arg-type]
    assert token.made == [(KeyType.EC_EDWARDS, BY_OID)]


def test_a_token_that_takes_only_the_curves_name_gets_ed25519() -> None:
    token = Token(ED25519 | PSS, {BY_NAME})
    keypairs._generate_sign_pair(token)  # type: ignore[arg-type]
    assert token.made == [(KeyType.EC_EDWARDS, BY_NAME)]
    assert BY_NAME == b"\x13\x0cedwards25519"  # DER PrintableString "edwards25519"


def test_a_token_that_lists_ed25519_but_makes_none_signs_with_rsa_pss() -> None:
    token = Token(ED25519 | PSS, set())
    keypairs._generate_sign_pair(token)  # type: ignore[arg-type]
    assert token.made == [(KeyType.RSA, None)]


def test_without_rsa_pss_the_refusal_stands() -> None:
    token = Token(set(ED25519), set())
    with pytest.raises(p11.AttributeValueInvalid):
        keypairs._generate_sign_pair(token)  # type: ignore[arg-type]
    assert token.made == []
