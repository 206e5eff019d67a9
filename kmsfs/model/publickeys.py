"""Public keys as they appear in documents, and signature verification on the host.

Private keys live in HSMs and operator tokens; verification needs only public keys, so it is
pure and runs anywhere (the mount daemon, the admin tool, an auditor's laptop).

Schemes:
- ``ed25519``: 32 raw bytes; signatures by CKM_EDDSA or a software Ed25519 key.
- ``rsa-pss-sha256``: SubjectPublicKeyInfo DER; PSS with MGF1-SHA256, salt length 32.
- ``rsa-oaep-sha1`` / ``rsa-oaep-sha256``: SubjectPublicKeyInfo DER of an HSM's wrapping key;
  the hash is the one the token supports for OAEP (SoftHSM 2.6 only does SHA-1, which is still
  sound for key transport).
"""

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from kmsfs.errors import FormatError, IntegrityError
from kmsfs.model import fields
from kmsfs.model.canonical import b64decode, b64encode

SIGNING_SCHEMES = ("ed25519", "rsa-pss-sha256")
WRAPPING_SCHEMES = ("rsa-oaep-sha1", "rsa-oaep-sha256")
MIN_RSA_BITS = 3072
PSS_SALT_LENGTH = 32

_ED25519_P = 2**255 - 19
#: y of the Ed25519 points of small order (1, 2, 4 and 8; each y with either sign of x). Such a
#: "public key" has signatures anyone can make without a private key (OpenSSL accepts R = the
#: identity, S = 0 for every message under the identity key), so a document listing one would
#: give its holder no secret at all. Refused as libsodium's blocklist does.
_ED25519_SMALL_ORDER_Y = frozenset({
    0,
    1,
    _ED25519_P - 1,
    2707385501144840649318225287225658788936804267575313519463743609750303402022,
    55188659117513257062467267217118295137698188065244968500265048394206261417927,
})


@dataclass(frozen=True)
class PublicKey:
    """A public key with the scheme it is used under."""

    scheme: str
    data: bytes

    def __post_init__(self) -> None:
        if self.scheme not in SIGNING_SCHEMES + WRAPPING_SCHEMES:
            raise FormatError(f"public key: unknown scheme {self.scheme!r:.40}")
        if self.scheme == "ed25519":
            if len(self.data) != 32:
                raise FormatError(f"ed25519 key: want 32 bytes, have {len(self.data)}")
            y = int.from_bytes(self.data, "little") & (2**255 - 1)
            if y >= _ED25519_P:  # a second encoding of a point (and a second key id)
                raise FormatError("ed25519 key: not a canonical encoding")
            if y in _ED25519_SMALL_ORDER_Y:
                raise FormatError("ed25519 key: a point of small order, which anyone can sign for")
        else:
            key = self._rsa()
            if key.key_size < MIN_RSA_BITS:
                raise FormatError(f"RSA key: want >= {MIN_RSA_BITS} bits, have {key.key_size}")

    def _rsa(self) -> rsa.RSAPublicKey:
        try:
            key = serialization.load_der_public_key(self.data)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise FormatError(f"{self.scheme} key: not a DER SubjectPublicKeyInfo") from exc
        if not isinstance(key, rsa.RSAPublicKey):
            raise FormatError(f"{self.scheme} key: not an RSA key")
        return key

    @property
    def key_id(self) -> str:
        """Hex SHA-256 over scheme and key bytes: names the key in signatures."""
        return hashlib.sha256(self.scheme.encode() + b"\x00" + self.data).hexdigest()

    @property
    def oaep_hash(self) -> str:
        if self.scheme not in WRAPPING_SCHEMES:
            raise FormatError(f"a {self.scheme} key does not wrap")
        return self.scheme.removeprefix("rsa-oaep-")

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise IntegrityError unless ``signature`` is this key's signature of ``message``."""
        try:
            if self.scheme == "ed25519":
                ed25519.Ed25519PublicKey.from_public_bytes(self.data).verify(signature, message)
            elif self.scheme == "rsa-pss-sha256":
                self._rsa().verify(
                    signature,
                    message,
                    padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LENGTH),
                    hashes.SHA256(),
                )
            else:
                raise IntegrityError(f"a {self.scheme} key cannot verify signatures")
        except InvalidSignature as exc:
            raise IntegrityError(f"bad signature by key {self.key_id[:12]}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "data": b64encode(self.data)}

    @classmethod
    def from_dict(cls, value: Any, what: str) -> "PublicKey":
        data = fields.obj(value, what)
        fields.exact_keys(data, {"scheme", "data"}, what)
        return cls(fields.string(data, "scheme", what), b64decode(data["data"], f"{what}.data"))
