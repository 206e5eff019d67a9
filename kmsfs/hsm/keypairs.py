"""An HSM's own key pairs: find or generate them inside the token, probe what it can do.

Two key pairs per HSM, both generated inside the token and never extractable:

- ``kmsfs-wrap``: RSA 3072 for RSA-OAEP unwrapping of Domain keys. The OAEP hash is probed:
  SHA-256 where the token can, SHA-1 otherwise (SoftHSM 2.6), recorded in the public key's scheme.
- ``kmsfs-sign``: Ed25519 (CKM_EDDSA) where the token can, otherwise RSA-PSS-SHA256.

Public halves are exported as documents use them (raw Ed25519, or SubjectPublicKeyInfo DER).
"""

import logging

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import MGF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

from kmsfs.errors import HsmError
from kmsfs.hsm.library import NOT_THE_TOKENS_ANSWER
from kmsfs.model.publickeys import PublicKey

log = logging.getLogger(__name__)

WRAP_LABEL = "kmsfs-wrap"
SIGN_LABEL = "kmsfs-sign"
RSA_BITS = 3072
ED25519_OID = "1.3.101.112"
OAEP_PARAMS = {
    "sha256": (Mechanism.SHA256, MGF.SHA256, None),
    "sha1": (Mechanism.SHA_1, MGF.SHA1, None),
}
PSS_PARAMS = (Mechanism.SHA256, MGF.SHA256, 32)
PRIVATE_TEMPLATE = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.PRIVATE: True,
}


def rsa_spki(public: "pkcs11.PublicKey") -> bytes:
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
        int.from_bytes(public[Attribute.MODULUS], "big"),
    )
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ed25519_raw(public: "pkcs11.PublicKey") -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING on most tokens, raw 32 bytes on some."""
    point = bytes(public[Attribute.EC_POINT])
    if len(point) == 34 and point[:2] == b"\x04\x20":
        return point[2:]
    if len(point) == 32:
        return point
    raise HsmError(f"unexpected Ed25519 public key encoding ({len(point)} bytes)")


def _find(session: "pkcs11.Session", cls: ObjectClass, label: str) -> "pkcs11.Object | None":
    found = list(session.get_objects({Attribute.CLASS: cls, Attribute.LABEL: label}))
    if len(found) > 1:
        raise HsmError(f"the token holds {len(found)} objects labelled {label!r}")
    return found[0] if found else None


def _probe_oaep(
    session: "pkcs11.Session", public: "pkcs11.PublicKey", private: "pkcs11.PrivateKey"
) -> str:
    """Return the best OAEP hash the token can both wrap and unwrap with."""
    probe = session.generate_key(
        KeyType.AES,
        256,
        store=False,
        template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True},
    )
    try:
        for name, params in OAEP_PARAMS.items():
            try:
                wrapped = public.wrap_key(
                    probe, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=params
                )
                back = private.unwrap_key(
                    ObjectClass.SECRET_KEY,
                    KeyType.AES,
                    wrapped,
                    store=False,
                    mechanism=Mechanism.RSA_PKCS_OAEP,
                    mechanism_param=params,
                    template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
                )
                back.destroy()
                return name
            except NOT_THE_TOKENS_ANSWER:
                raise  # gone, or failed once: no reason to record a weaker hash for good
            except p11.PKCS11Error as exc:
                log.info("the token refused RSA-OAEP-%s (%s)", name.upper(), type(exc).__name__)
        raise HsmError("the token cannot wrap with RSA-OAEP (SHA-256 or SHA-1)")
    finally:
        probe.destroy()


KeyPair = tuple["pkcs11.PublicKey", "pkcs11.PrivateKey"]


def _generate_wrap_pair(session: "pkcs11.Session") -> KeyPair:
    return session.generate_keypair(  # type: ignore[no-any-return]
        KeyType.RSA,
        RSA_BITS,
        store=True,
        label=WRAP_LABEL,
        public_template={Attribute.WRAP: True, Attribute.ENCRYPT: False, Attribute.VERIFY: False},
        private_template={
            **PRIVATE_TEMPLATE,
            Attribute.UNWRAP: True,
            Attribute.DECRYPT: False,
            Attribute.SIGN: False,
        },
    )


#: CKA_EC_PARAMS for Ed25519 as PKCS#11 3.0 allows it: the curve's OID, or its name as a
#: PrintableString, which some tokens take instead of the OID.
ED25519_PARAMS = (encode_named_curve_parameters(ED25519_OID), b"\x13\x0cedwards25519")


def generate_ed25519(session: "pkcs11.Session", label: str) -> "pkcs11.PublicKey":
    """An Ed25519 key pair stored in the token, private half sign-only and non-extractable.
    The curve is named by its OID, or by name where the token refuses the OID."""
    return _generate_ed25519_pair(session, label)[0]


def _generate_ed25519_pair(session: "pkcs11.Session", label: str) -> KeyPair:
    for params in ED25519_PARAMS:
        try:
            pair = session.generate_keypair(
                KeyType.EC_EDWARDS,
                0,
                store=True,
                label=label,
                public_template={Attribute.EC_PARAMS: params, Attribute.VERIFY: True},
                private_template={**PRIVATE_TEMPLATE, Attribute.SIGN: True},
            )
            return pair  # type: ignore[no-any-return]
        except NOT_THE_TOKENS_ANSWER:
            raise
        except p11.PKCS11Error as exc:
            if params == ED25519_PARAMS[-1]:
                raise
            log.info("the token refused Ed25519 named by its OID (%s)", type(exc).__name__)
    raise AssertionError("unreachable")


def _generate_sign_pair(session: "pkcs11.Session") -> KeyPair:
    mechanisms = session.token.slot.get_mechanisms()
    can_pss = Mechanism.SHA256_RSA_PKCS_PSS in mechanisms
    if Mechanism.EC_EDWARDS_KEY_PAIR_GEN in mechanisms and Mechanism.EDDSA in mechanisms:
        try:
            return _generate_ed25519_pair(session, SIGN_LABEL)
        except NOT_THE_TOKENS_ANSWER:
            raise
        except p11.PKCS11Error as exc:
            if not can_pss:
                raise
            log.warning("the token lists Ed25519 but refused to make a key pair (%s): "
                        "signing with RSA-PSS", type(exc).__name__)
    if can_pss:
        return session.generate_keypair(  # type: ignore[no-any-return]
            KeyType.RSA,
            RSA_BITS,
            store=True,
            label=SIGN_LABEL,
            public_template={
                Attribute.VERIFY: True,
                Attribute.WRAP: False,
                Attribute.ENCRYPT: False,
            },
            private_template={
                **PRIVATE_TEMPLATE,
                Attribute.SIGN: True,
                Attribute.UNWRAP: False,
                Attribute.DECRYPT: False,
            },
        )
    else:
        raise HsmError("the token can sign with neither Ed25519 (CKM_EDDSA) nor RSA-PSS")


def sign_public_key(session: "pkcs11.Session") -> PublicKey:
    public = _find(session, ObjectClass.PUBLIC_KEY, SIGN_LABEL)
    if public is None:
        raise HsmError(f"the token has no {SIGN_LABEL!r} key pair")
    if public.key_type == KeyType.EC_EDWARDS:
        return PublicKey("ed25519", ed25519_raw(public))
    return PublicKey("rsa-pss-sha256", rsa_spki(public))


def wrap_public_key(session: "pkcs11.Session") -> PublicKey:
    public = _find(session, ObjectClass.PUBLIC_KEY, WRAP_LABEL)
    private = _find(session, ObjectClass.PRIVATE_KEY, WRAP_LABEL)
    if public is None or private is None:
        raise HsmError(f"the token has no {WRAP_LABEL!r} key pair")
    return PublicKey(f"rsa-oaep-{_probe_oaep(session, public, private)}", rsa_spki(public))


def provision(session: "pkcs11.Session") -> tuple[PublicKey, PublicKey]:
    """Ensure both key pairs exist (generating what is missing); return (wrap, sign) public keys.

    Key pairs made here are destroyed again if the token then turns out unusable (it cannot
    unwrap with RSA-OAEP, say): a refused token is left as it was."""
    made: list[pkcs11.Object] = []
    try:
        if _find(session, ObjectClass.PRIVATE_KEY, WRAP_LABEL) is None:
            made.extend(_generate_wrap_pair(session))
        if _find(session, ObjectClass.PRIVATE_KEY, SIGN_LABEL) is None:
            made.extend(_generate_sign_pair(session))
        return wrap_public_key(session), sign_public_key(session)
    except BaseException:
        for obj in made:  # by handle: never a pair another enrolment made meanwhile
            try:
                obj.destroy()
            except p11.PKCS11Error as exc:
                log.warning("could not remove a key made here (%s)", type(exc).__name__)
        raise


def sign(session: "pkcs11.Session", scheme: str, message: bytes) -> bytes:
    """Sign ``message`` with the token's kmsfs-sign key."""
    private = _find(session, ObjectClass.PRIVATE_KEY, SIGN_LABEL)
    if private is None:
        raise HsmError(f"the token has no {SIGN_LABEL!r} key")
    if scheme == "ed25519":
        return private.sign(message, mechanism=Mechanism.EDDSA)
    return private.sign(
        message, mechanism=Mechanism.SHA256_RSA_PKCS_PSS, mechanism_param=PSS_PARAMS
    )
