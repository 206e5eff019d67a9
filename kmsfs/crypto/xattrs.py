"""Extended attribute encryption: AES-256-SIV names, AES-256-GCM values bound to their name.

Layout (docs/format.md, "Volume config", feature flag ``EncryptedXattrs``)::

    s           = derive(XATTR_KEY_INFO)                        (32 bytes, from the HSM)
    name key    = HKDF-SHA256(s, salt none, info XATTR_SIV_INFO, 64 bytes)    AES-256-SIV
    value key   = HKDF-SHA256(s, salt none, info XATTR_GCM_INFO, 32 bytes)    AES-256-GCM
    disk name   = "user." || base64url_nopad(AES-SIV(name key, ad=[XATTR_NAME_AD],
                                                      plaintext name after "user."))
    disk value  = nonce (12, random) || AES-GCM(value key, nonce, value, aad = disk name)
                  || tag (16)                                   (28 + len(value) bytes)

Names are deterministic so a lookup needs no listing; values are bound to their (encrypted)
name so two values cannot be swapped unnoticed. Only the ``user.`` namespace is encrypted; the
fs layer (:mod:`kmsfs.fs.xattrs`) decides what other namespaces do. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.crypto.encoding import b64url_decode, b64url_encode
from kmsfs.errors import IntegrityError

XATTR_KEY_INFO = b"kmsfs/v1/xattrs"
"""Label passed to ``KeyDeriver.derive`` for the xattr secret (expanded by HKDF below)."""
XATTR_SIV_INFO = b"kmsfs/v1/xattrs/aes-siv"
"""HKDF info of the 64-byte AES-256-SIV name key."""
XATTR_GCM_INFO = b"kmsfs/v1/xattrs/aes-256-gcm"
"""HKDF info of the 32-byte AES-256-GCM value key."""
XATTR_NAME_AD = b"kmsfs/v1/xattr"
"""Associated data of every encrypted name."""
USER_PREFIX = b"user."
XATTR_NAME_MAX = 255
"""Longest xattr name, plaintext or on disk (Linux XATTR_NAME_MAX)."""
NONCE_SIZE = 12
TAG_SIZE = 16
SIV_TAG_SIZE = 16


class XattrNameError(ValueError):
    """A name that cannot be stored: not ``user.<something>``, or too long (``too_long``)."""

    def __init__(self, message: str, *, too_long: bool = False) -> None:
        super().__init__(message)
        self.too_long = too_long


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


class XattrCipher:
    """Encrypts user xattr names (deterministically) and values (randomized, name-bound)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise ValueError(f"xattr secret: want 32 bytes, have {len(secret)}")
        self._siv = AESSIV(_hkdf(secret, XATTR_SIV_INFO, 64))
        self._gcm = AESGCM(_hkdf(secret, XATTR_GCM_INFO, 32))

    def disk_name(self, name: bytes) -> bytes:
        """The on-disk name of ``user.<x>``; XattrNameError for another namespace or length."""
        if not name.startswith(USER_PREFIX) or len(name) == len(USER_PREFIX):
            raise XattrNameError("only user.* extended attributes are supported")
        if len(name) > XATTR_NAME_MAX:
            raise XattrNameError("xattr name too long", too_long=True)
        sealed = self._siv.encrypt(name[len(USER_PREFIX) :], [XATTR_NAME_AD])
        enc = USER_PREFIX + b64url_encode(sealed).encode()
        if len(enc) > XATTR_NAME_MAX:
            raise XattrNameError("xattr name too long once encrypted", too_long=True)
        return enc

    def plain_name(self, disk: bytes) -> bytes:
        """Inverse of :meth:`disk_name`; IntegrityError if *disk* is not one of ours."""
        try:
            if not disk.startswith(USER_PREFIX):
                raise ValueError("not a user.* name")
            raw = b64url_decode(disk[len(USER_PREFIX) :].decode("ascii"))
            return USER_PREFIX + self._siv.decrypt(raw, [XATTR_NAME_AD])
        except (ValueError, UnicodeDecodeError, InvalidTag):
            raise IntegrityError("xattr name: authentication failed") from None

    def seal(self, disk_name: bytes, value: bytes) -> bytes:
        return self._seal_with_nonce(disk_name, value, os.urandom(NONCE_SIZE))

    def _seal_with_nonce(self, disk_name: bytes, value: bytes, nonce: bytes) -> bytes:
        """Deterministic form of :meth:`seal`, for known-answer tests only."""
        return nonce + self._gcm.encrypt(nonce, value, disk_name)

    def open(self, disk_name: bytes, stored: bytes) -> bytes:
        """Plaintext value; IntegrityError if it was altered, truncated or moved to another name."""
        if len(stored) < NONCE_SIZE + TAG_SIZE:
            raise IntegrityError(
                f"xattr value: want at least {NONCE_SIZE + TAG_SIZE} bytes, have {len(stored)}"
            )
        try:
            return self._gcm.decrypt(stored[:NONCE_SIZE], stored[NONCE_SIZE:], disk_name)
        except (InvalidTag, ValueError):
            raise IntegrityError("xattr value: authentication failed") from None
