"""Operator private keys: in the operator's own token, or in a passphrase-protected file.

Either way nobody signs as an operator without that operator's secret, the holder of the HSM
PINs included: the token's PIN is the operator's alone (never stored), and the key file is
AES-256-GCM under a key stretched from the passphrase with scrypt (n=2^17, r=8, p=1), the
operator's name bound as associated data so files cannot be swapped between operators.

The secret can be changed (C_SetPIN in the token, or the same key sealed again under a new
passphrase); the key itself never changes, so every signature made with it stays valid.
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
from pkcs11 import exceptions as p11

from kmsfs import atomicfile as atomic
from kmsfs.errors import FormatError, HsmError, IntegrityError, PinError, UsageError
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


def token_change_pin(location: TokenLocation, old: str, new: str, key: PublicKey) -> None:
    """Change the user PIN of the operator's token from ``old`` to ``new`` (C_SetPIN).

    Only if the token holds ``key`` (IntegrityError otherwise, before anything changes): the
    caller's record then names the key that the new PIN unlocks. C_SetPIN checks ``old``
    itself, so a login this process already holds (which :func:`library.session` reuses
    without a PIN) cannot let a wrong PIN through.
    """
    with library.session(location, old, rw=True) as session, library.hsm_errors("operator PIN"):
        public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=OPERATOR_KEY_LABEL)
        if PublicKey("ed25519", ed25519_raw(public)) != key:
            raise IntegrityError(f"{location.describe()} holds another key")
        try:
            with library.token_files_lock(location.softhsm_conf):  # C_SetPIN rewrites them
                session.set_pin(old, new)
        except p11.PinIncorrect:
            raise PinError(f"wrong PIN for {location.describe()}") from None
        except p11.PinLocked:
            raise PinError(f"the PIN of {location.describe()} is locked") from None
        except (p11.PinInvalid, p11.PinLenRange):
            raise UsageError(f"{location.describe()} refuses the new PIN") from None


def _stretch(passphrase: str, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(
        passphrase.encode()
    )


def _seal(name: str, passphrase: str, raw: bytes) -> bytes:
    """The key file's bytes: the raw private key under ``passphrase``, fresh salt and nonce."""
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
    return json.dumps(doc).encode() + b"\n"


def _public(private: ed25519.Ed25519PrivateKey) -> PublicKey:
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return PublicKey("ed25519", raw)


def keyfile_generate(path: Path, name: str, passphrase: str) -> PublicKey:
    """Generate an Ed25519 key and store it encrypted under ``passphrase`` at ``path``."""
    private = ed25519.Ed25519PrivateKey.generate()
    raw = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic.write_new(path, _seal(name, passphrase, raw), mode=0o600)
    return _public(private)


def _unseal(path: Path, name: str, passphrase: str) -> bytes:
    """The raw private key in the key file; PinError for a wrong passphrase or no file."""
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
        return AESGCM(_stretch(passphrase, salt)).decrypt(
            nonce, sealed, KEYFILE_AAD_PREFIX + name.encode()
        )
    except InvalidTag:
        raise PinError(f"wrong passphrase for operator {name}") from None


def keyfile_sign(path: Path, name: str, passphrase: str, message: bytes) -> bytes:
    return ed25519.Ed25519PrivateKey.from_private_bytes(_unseal(path, name, passphrase)).sign(
        message
    )


def keyfile_change_passphrase(path: Path, name: str, old: str, new: str, key: PublicKey) -> None:
    """Seal the key in ``path`` again under ``new``: the same key, a fresh salt and nonce.

    Only if the file holds ``key`` (IntegrityError otherwise). Atomic: an interrupted change
    leaves the file under ``old`` or under ``new``, never half of each.
    """
    raw = _unseal(path, name, old)
    if _public(ed25519.Ed25519PrivateKey.from_private_bytes(raw)) != key:
        raise IntegrityError(f"{path} holds another key")
    atomic.replace(path, _seal(name, new, raw), mode=0o600)
