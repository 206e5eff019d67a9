"""Domain keys inside a token: generate, wrap, unwrap and derive, never in the clear.

- ``create``: ``k`` (AES-256) and ``mk`` (256-bit generic secret) are generated as SENSITIVE
  session objects; ``mk`` is wrapped by ``k`` (RFC 5649: :func:`rfc5649`) and ``k`` by each
  recipient HSM's RSA public key (CKM_RSA_PKCS_OAEP, imported as a session object). Both are
  EXTRACTABLE only so they can be wrapped; CKA_VALUE reads are refused (SENSITIVE).
- ``unwrap``: ``k`` then ``mk`` come back as SENSITIVE, non-EXTRACTABLE session objects (the
  template is always passed: C_UnwrapKey does not default to that), and ``mk`` may only sign
  (CKM_SHA256_HMAC), which is how per-purpose keys are derived.
- ``rewrap``: with ``mk`` unwrapped as extractable-by-wrap only inside this call, a fresh ``k``
  wraps ``mk`` again for a new set of recipients.
- ``create``, ``rotate`` and ``rewrap`` also return each ``mk`` epoch's binding to its Domain,
  HMAC-SHA256(mk, binding info), computed here with the ``mk`` they hold (kmsfs.model.domain).

Session objects vanish when the session closes; nothing is written to the token.
"""


import contextlib
import hashlib
import hmac
import logging
from collections.abc import Iterator, Sequence

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from kmsfs.errors import FormatError, HsmError
from kmsfs.hsm import library
from kmsfs.hsm.keypairs import OAEP_PARAMS, WRAP_LABEL
from kmsfs.hsm.library import NOT_THE_TOKENS_ANSWER, TOKEN_GONE
from kmsfs.model.publickeys import PublicKey

log = logging.getLogger(__name__)

K_TEMPLATE = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: True,
    Attribute.WRAP: True,
    Attribute.UNWRAP: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
}
MK_TEMPLATE = {
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: True,
    Attribute.SIGN: True,
    Attribute.VERIFY: False,
}
UNWRAPPED_K_TEMPLATE = {**K_TEMPLATE, Attribute.EXTRACTABLE: False, Attribute.WRAP: False}
UNWRAPPED_MK_TEMPLATE = {**MK_TEMPLATE, Attribute.EXTRACTABLE: False}


def _oaep(scheme: str) -> tuple:
    try:
        return OAEP_PARAMS[scheme.removeprefix("rsa-oaep-")]
    except KeyError as exc:
        raise FormatError(f"unknown wrapping scheme {scheme!r}") from exc


def _import_recipient(session: "pkcs11.Session", key: PublicKey) -> "pkcs11.PublicKey":
    public = serialization.load_der_public_key(key.data)
    assert isinstance(public, rsa.RSAPublicKey)
    numbers = public.public_numbers()
    return session.create_object(
        {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: False,
            Attribute.WRAP: True,
            Attribute.MODULUS: numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"),
            Attribute.PUBLIC_EXPONENT: numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"),
        }
    )


#: Each wrapped ``k``: (the OAEP scheme it was wrapped with, the wrapping), by HSM id.
WrappedKs = dict[str, tuple[str, bytes]]


def _wrap_k_for(
    session: "pkcs11.Session", k: "pkcs11.SecretKey", recipients: Sequence[tuple[str, PublicKey]]
) -> WrappedKs:
    """``k`` wrapped for each recipient with the OAEP hash its record names, or with SHA-1
    where that is SHA-256 and this token cannot do it.

    Each HSM records the best hash it can do itself, so a Trust of SoftHSM2 (SHA-1 only) and
    an HSM that does SHA-256 is the usual case, and the HSM that makes or rewraps a Domain may
    be either: the first one that answers. The Domain records each wrapping's scheme, and the
    recipient unwraps with that one (every token that does OAEP does SHA-1)."""
    wrapped: WrappedKs = {}
    for hsm_id, key in recipients:
        public = _import_recipient(session, key)
        try:
            try:
                wrapped[hsm_id] = key.scheme, bytes(public.wrap_key(
                    k, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=_oaep(key.scheme)
                ))
            except NOT_THE_TOKENS_ANSWER:
                raise  # gone, or failed once: as the enrolment probe, no SHA-1 for that
            except p11.PKCS11Error as exc:
                if key.scheme != "rsa-oaep-sha256":
                    raise
                log.warning("this HSM cannot wrap with RSA-OAEP-SHA256 (%s): k wrapped for "
                            "HSM %s with RSA-OAEP-SHA1", type(exc).__name__, hsm_id[:12])
                wrapped[hsm_id] = "rsa-oaep-sha1", bytes(public.wrap_key(
                    k, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_PARAMS["sha1"]
                ))
        finally:
            public.destroy()
    return wrapped


def _hmac(mk: "pkcs11.SecretKey", info: bytes) -> bytes:
    return bytes(mk.sign(info, mechanism=Mechanism.SHA256_HMAC))


def rfc5649(session: "pkcs11.Session") -> Mechanism:
    """The token's mechanism for AES key wrap with padding as RFC 5649 defines it, with which
    ``k`` wraps ``mk`` (every HSM of a Trust must unwrap what another one wrapped).

    PKCS#11 3.0 names it CKM_AES_KEY_WRAP_KWP and redefines CKM_AES_KEY_WRAP_PAD as PKCS#7
    padding then RFC 3394 (3.1 deprecates it), while tokens of earlier versions, SoftHSM2
    among them, implement RFC 5649 as CKM_AES_KEY_WRAP_PAD. A token that lists KWP is asked
    for that; the enrolment self-test checks a known answer either way."""
    if Mechanism.AES_KEY_WRAP_KWP in session.token.slot.get_mechanisms():
        return Mechanism.AES_KEY_WRAP_KWP
    return Mechanism.AES_KEY_WRAP_PAD


def create(
    session: "pkcs11.Session", recipients: Sequence[tuple[str, PublicKey]], binding_info: bytes
) -> tuple[WrappedKs, bytes, bytes]:
    """Generate ``k`` and ``mk``; return (k wrapped per HSM id with its scheme, mk wrapped by
    k, mk's binding)."""
    k = session.generate_key(KeyType.AES, 256, store=False, template=K_TEMPLATE)
    mk = session.generate_key(KeyType.GENERIC_SECRET, 256, store=False, template=MK_TEMPLATE)
    try:
        wrapped_mk = k.wrap_key(mk, mechanism=rfc5649(session))
        return _wrap_k_for(session, k, recipients), wrapped_mk, _hmac(mk, binding_info)
    finally:
        mk.destroy()
        k.destroy()


def _unwrap_k(
    session: "pkcs11.Session", scheme: str, wrapped_k: bytes, template: dict
) -> "pkcs11.SecretKey":
    private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=WRAP_LABEL)
    return private.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.AES,
        wrapped_k,
        store=False,
        mechanism=Mechanism.RSA_PKCS_OAEP,
        mechanism_param=_oaep(scheme),
        template=template,
    )


def _unwrap_mk_here(
    k: "pkcs11.SecretKey", wrapped_mk: bytes, template: dict, mechanism: Mechanism
) -> "pkcs11.SecretKey":
    """:func:`_unwrap_mk` with the token's :func:`rfc5649` *mechanism*. On a token that lists
    CKM_AES_KEY_WRAP_KWP, a Domain made before kmsfs asked for it was wrapped with the token's
    CKM_AES_KEY_WRAP_PAD (PKCS#7 then RFC 3394 there): that is tried next. Both forms carry an
    integrity check, so a wrong guess is an error, never a wrong key."""
    try:
        return _unwrap_mk(k, wrapped_mk, template, mechanism)
    except TOKEN_GONE:
        raise
    except p11.PKCS11Error:
        if mechanism != Mechanism.AES_KEY_WRAP_KWP:
            raise
        log.info("mk does not unwrap with CKM_AES_KEY_WRAP_KWP: trying CKM_AES_KEY_WRAP_PAD")
        return _unwrap_mk(k, wrapped_mk, template, Mechanism.AES_KEY_WRAP_PAD)


def _unwrap_mk(
    k: "pkcs11.SecretKey", wrapped_mk: bytes, template: dict, mechanism: Mechanism
) -> "pkcs11.SecretKey":
    return k.unwrap_key(
        ObjectClass.SECRET_KEY,
        KeyType.GENERIC_SECRET,
        wrapped_mk,
        store=False,
        mechanism=mechanism,
        template=template,
    )


class MasterKey:
    """``mk`` unwrapped inside the token; derives keys with HMAC-SHA256, thread-safe."""

    def __init__(self, key: "pkcs11.SecretKey") -> None:
        self._key = key

    def derive_many(self, infos: Sequence[bytes]) -> list[bytes]:
        """HMAC-SHA256(mk, info) for each info, in the token (DomainKeys.derive asks for one)."""
        with library.CALLS:
            return [_hmac(self._key, i) for i in infos]

    def value_is_readable(self) -> bool:
        """True if the token would reveal CKA_VALUE (it must not): used by the custody test."""
        try:
            self._key[Attribute.VALUE]
        except pkcs11.exceptions.PKCS11Error:
            return False
        return True

    def destroy(self) -> None:
        with library.CALLS:
            self._key.destroy()


def unwrap(
    session: "pkcs11.Session", scheme: str, wrapped_k: bytes, wrapped_mk: bytes
) -> MasterKey:
    """Bring ``mk`` back inside the token as a SENSITIVE, non-EXTRACTABLE, sign-only key."""
    k = _unwrap_k(session, scheme, wrapped_k, UNWRAPPED_K_TEMPLATE)
    try:
        return MasterKey(
            _unwrap_mk_here(k, wrapped_mk, UNWRAPPED_MK_TEMPLATE, rfc5649(session))
        )
    finally:
        k.destroy()


def rewrap(
    session: "pkcs11.Session",
    scheme: str,
    wrapped_k: bytes,
    wrapped_mks: Sequence[bytes],
    recipients: Sequence[tuple[str, PublicKey]],
    binding_infos: Sequence[bytes],
) -> tuple[WrappedKs, list[bytes], list[bytes]]:
    """Wrap every ``mk`` epoch under a fresh ``k`` for ``recipients``; ``mk`` is unchanged.
    Returns the new wrappings and each epoch's binding (``binding_infos``, one per epoch)."""
    old_k = _unwrap_k(session, scheme, wrapped_k, UNWRAPPED_K_TEMPLATE)
    new_k = session.generate_key(KeyType.AES, 256, store=False, template=K_TEMPLATE)
    try:
        mechanism = rfc5649(session)
        rewrapped: list[bytes] = []
        bindings: list[bytes] = []
        for wrapped_mk, info in zip(wrapped_mks, binding_infos, strict=True):
            # wrappable, only for this loop
            mk = _unwrap_mk_here(old_k, wrapped_mk, MK_TEMPLATE, mechanism)
            try:
                rewrapped.append(new_k.wrap_key(mk, mechanism=mechanism))
                bindings.append(_hmac(mk, info))
            finally:
                mk.destroy()
        return _wrap_k_for(session, new_k, recipients), rewrapped, bindings
    finally:
        new_k.destroy()
        old_k.destroy()


def epoch_hmacs(
    session: "pkcs11.Session", scheme: str, wrapped_k: bytes, wrapped_mks: Sequence[bytes],
    infos: Sequence[Sequence[bytes]],
) -> list[list[bytes]]:
    """HMAC-SHA256(mk of epoch i, info) for each info of ``infos[i]``, every ``mk`` wrapped
    under this ``k``: a fingerprint (equal values mean equal master keys) and the binding of
    each epoch, with which binding a Domain made before key binding checks that its keys are
    its own (kmsfs.service.domains)."""
    k = _unwrap_k(session, scheme, wrapped_k, UNWRAPPED_K_TEMPLATE)
    try:
        mechanism = rfc5649(session)
        found: list[list[bytes]] = []
        for wrapped_mk, epoch_infos in zip(wrapped_mks, infos, strict=True):
            mk = _unwrap_mk_here(k, wrapped_mk, UNWRAPPED_MK_TEMPLATE, mechanism)
            try:
                found.append([_hmac(mk, info) for info in epoch_infos])
            finally:
                mk.destroy()
        return found
    finally:
        k.destroy()


SELF_TEST_INFO = b"kmsfs/v1/hsm-self-test\x00"
#: The known answer: a key wrapped here (RFC 5649, by the cryptography package) under another
#: known key, unwrapped by the token, and its HMAC-SHA256 of SELF_TEST_INFO.
_KNOWN_KEK = hashlib.sha256(b"kmsfs/v1/hsm-self-test/kek").digest()
_KNOWN_MK = hashlib.sha256(b"kmsfs/v1/hsm-self-test/mk").digest()



@contextlib.contextmanager
def _step(what: str, mechanism: str) -> Iterator[None]:
    try:
        yield
    except TOKEN_GONE:
        raise
    except p11.PKCS11Error as exc:
        raise HsmError(
            f"the token cannot {what} ({mechanism}: {type(exc).__name__}), which every HSM "
            "of a Domain needs; not enrolled"
        ) from exc


def self_test(session: "pkcs11.Session") -> None:
    """Run a Domain's key life cycle on throwaway session keys; raise HsmError if it fails.

    Enrolment probes RSA-OAEP and a signing mechanism, but a token that cannot generate ``k``
    or ``mk``, wrap and unwrap with RFC 5649, or HMAC with the unwrapped key would otherwise be
    enrolled, put in a Trust by operators, and fail only when a Domain is created on it or a
    mount asks it for keys. A token that reveals the value of a key unwrapped SENSITIVE and
    non-EXTRACTABLE would hand every Domain's ``mk`` to whoever holds its PIN (DESIGN.md §2.1):
    it is refused too. Session objects only: nothing is left in the token.
    """
    made: list[pkcs11.SecretKey] = []
    try:
        with _step("generate an AES-256 key", "CKM_AES_KEY_GEN"):
            k = session.generate_key(KeyType.AES, 256, store=False, template=K_TEMPLATE)
            made.append(k)
        with _step("generate a 256-bit secret", "CKM_GENERIC_SECRET_KEY_GEN"):
            mk = session.generate_key(
                KeyType.GENERIC_SECRET, 256, store=False, template=MK_TEMPLATE
            )
            made.append(mk)
        mechanism = rfc5649(session)
        name = f"CKM_{mechanism.name}"
        with _step("wrap a key with AES key wrap with padding", name):
            wrapped = k.wrap_key(mk, mechanism=mechanism)
        with _step("unwrap a key with AES key wrap with padding", name):
            unwrapped = _unwrap_mk(k, wrapped, UNWRAPPED_MK_TEMPLATE, mechanism)
            made.append(unwrapped)
        with _step("compute HMAC-SHA256 with a secret key", "CKM_SHA256_HMAC"):
            expected, got = _hmac(mk, SELF_TEST_INFO), _hmac(unwrapped, SELF_TEST_INFO)
        if len(expected) != 32 or got != expected:
            raise HsmError(
                "the token's HMAC-SHA256 with an unwrapped key differs from that with the key "
                "itself; not enrolled"
            )
        if MasterKey(unwrapped).value_is_readable():
            raise HsmError(
                "the token reveals the value of a key unwrapped as SENSITIVE and "
                "non-EXTRACTABLE, so it would hand a Domain's master key to whoever holds its "
                "PIN; not enrolled"
            )
        _known_answer(session, mechanism, made)
    finally:
        for key in reversed(made):
            with contextlib.suppress(p11.PKCS11Error):  # never hides why the test failed
                key.destroy()


def _known_answer(
    session: "pkcs11.Session", mechanism: Mechanism, made: "list[pkcs11.SecretKey]"
) -> None:
    """Unwrap a known RFC 5649 wrapping made outside the token and compare the HMAC of what
    comes out: a round trip inside one token cannot tell RFC 5649 from PKCS#11 3.0's
    CKM_AES_KEY_WRAP_PAD (PKCS#7 padding then RFC 3394), and a token with that one could
    never unwrap a Domain that another HSM of its Trust made. A token that refuses to take a
    known key (some do in a FIPS mode) is checked by the round trip alone, with a warning."""
    try:
        kek = session.create_object({
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.TOKEN: False,
            Attribute.VALUE: _KNOWN_KEK,
            Attribute.UNWRAP: True,
            Attribute.WRAP: False,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
        })
    except TOKEN_GONE:
        raise
    except p11.PKCS11Error as exc:
        log.warning("the token does not take a known key (%s): its AES key wrap with padding "
                    "is not checked against RFC 5649's answer", type(exc).__name__)
        return
    made.append(kek)
    name = f"CKM_{mechanism.name}"
    hint = "" if mechanism == Mechanism.AES_KEY_WRAP_KWP else (
        " (it lists no CKM_AES_KEY_WRAP_KWP, and its CKM_AES_KEY_WRAP_PAD is not RFC 5649)")
    try:
        unwrapped = _unwrap_mk(
            kek, aes_key_wrap_with_padding(_KNOWN_KEK, _KNOWN_MK), UNWRAPPED_MK_TEMPLATE,
            mechanism,
        )
    except TOKEN_GONE:
        raise
    except p11.PKCS11Error as exc:
        raise HsmError(
            f"the token cannot unwrap an RFC 5649 wrapping made elsewhere ({name}: "
            f"{type(exc).__name__}){hint}, so it could not open a Domain another HSM made; "
            "not enrolled"
        ) from exc
    made.append(unwrapped)
    if _hmac(unwrapped, SELF_TEST_INFO) != hmac.digest(_KNOWN_MK, SELF_TEST_INFO, "sha256"):
        raise HsmError(
            f"the key the token unwraps from an RFC 5649 wrapping made elsewhere ({name}) is "
            f"not the key wrapped{hint}; not enrolled"
        )


def rotate(
    session: "pkcs11.Session", scheme: str, wrapped_k: bytes, binding_info: bytes
) -> tuple[bytes, bytes]:
    """A new ``mk`` epoch, generated in the token and returned wrapped by the Domain's ``k``,
    with its binding.

    Only HSMs that can unwrap this ``k`` (those of the Trust it is wrapped for) can ever use
    the new epoch: after a rewrap that dropped an HSM, rotating locks it out of new data.
    """
    k = _unwrap_k(session, scheme, wrapped_k, {**K_TEMPLATE, Attribute.EXTRACTABLE: False})
    mk = session.generate_key(KeyType.GENERIC_SECRET, 256, store=False, template=MK_TEMPLATE)
    try:
        return bytes(k.wrap_key(mk, mechanism=rfc5649(session))), _hmac(mk, binding_info)
    finally:
        mk.destroy()
        k.destroy()
