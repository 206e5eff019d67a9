"""Operator private keys: in the operator's own token, or in a passphrase-protected file.

Either way nobody signs as an operator without that operator's secret, the holder of the HSM
PINs included: the token's PIN is the operator's alone (never stored), and the key file is
AES-256-GCM under a key stretched from the passphrase with scrypt (n=2^17, r=8, p=1), the
operator's name bound as associated data so files cannot be swapped between operators.
"""

import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from pkcs11 import Attribute, Mechanism, ObjectClass

from kmsfs import atomicfile as atomic
from kmsfs.errors import FormatError, HsmError, PinError
from kmsfs.hsm import library
from kmsfs.hsm.keypairs import ed25519_raw, generate_ed25519
from kmsfs.hsm.library import TokenLocation
from kmsfs.model.canonical import b64decode, b64encode
from kmsfs.model.publickeys import PublicKey

OPERATOR_KEY_LABEL = "kmsfs-operator"
KEYFILE_AAD_PREFIX = b"kmsfs/v1/operator-key\x00"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 17, 8, 1


def token_generate(location: TokenLocation, pin: str) -> PublicKey:
    """Generate the operator's Ed25519 key pair inside its token; return the public key."""
    with library.session(location, pin, rw=True) as session, library.hsm_errors("operator key"):
        if list(session.get_objects({Attribute.LABEL: OPERATOR_KEY_LABEL})):
            raise HsmError(f"{location.describe()} already holds an operator key")
        public = generate_ed25519(session, OPERATOR_KEY_LABEL)
        return PublicKey("ed25519", ed25519_raw(public))


def token_sign(location: TokenLocation, pin: str, message: bytes) -> bytes:
    with library.session(location, pin) as session, library.hsm_errors("operator signature"):
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=OPERATOR_KEY_LABEL)
        return bytes(private.sign(message, mechanism=Mechanism.EDDSA))


def _stretch(passphrase: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        passphrase.encode()
    )


def keyfile_generate(path: Path, name: str, passphrase: str) -> PublicKey:
    """Generate an Ed25519 key and store it encrypted under ``passphrase`` at ``path``."""
    private = ed25519.Ed25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    salt, nonce = os.urandom(16), os.urandom(12)
    sealed = AESGCM(_stretch(passphrase, salt)).encrypt(
        nonce, raw, KEYFILE_AAD_PREFIX + name.encode()
    )
    doc = {
        "kdf": "scrypt",
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
        "salt": b64encode(salt),
        "nonce": b64encode(nonce),
        "ciphertext": b64encode(sealed),
    }
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic.write_new(path, json.dumps(doc).encode() + b"\n", mode=0o600)
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return PublicKey("ed25519", public)


def keyfile_sign(path: Path, name: str, passphrase: str, message: bytes) -> bytes:
    try:
        doc = json.loads(path.read_text())
        salt = b64decode(doc["salt"], "salt")
        nonce = b64decode(doc["nonce"], "nonce")
        sealed = b64decode(doc["ciphertext"], "ciphertext")
        if (doc["kdf"], doc["n"], doc["r"], doc["p"]) != ("scrypt", SCRYPT_N, SCRYPT_R, SCRYPT_P):
            raise FormatError("unknown key derivation parameters")
    except FileNotFoundError:
        raise PinError(f"operator {name}: key file {path} is not on this machine") from None
    except (ValueError, KeyError, TypeError, FormatError) as exc:
        raise FormatError(f"{path}: damaged operator key file ({exc})") from exc
    try:
        raw = AESGCM(_stretch(passphrase, salt)).decrypt(
            nonce, sealed, KEYFILE_AAD_PREFIX + name.encode()
        )
    except InvalidTag:
        raise PinError(f"wrong passphrase for operator {name}") from None
    return ed25519.Ed25519PrivateKey.from_private_bytes(raw).sign(message)
