"""Extended attributes in the ``user.`` namespace, names and values encrypted.

On disk (docs/format.md, "Volume config" feature flag ``EncryptedXattrs``)::

    name  = "user." + base64url_nopad(AES-256-SIV(xattr names key, ad=["kmsfs/v1/xattr"],
                                                  plaintext name after "user."))
    value = nonce (12) || AES-256-GCM(xattr values key, value, aad = on-disk name) || tag (16)

Names are deterministic so ``getxattr`` can find one without listing; values are bound to their
name so two values cannot be swapped unnoticed. Other namespaces (security, trusted, system) are
refused as on a file system without them: ENODATA for reads, EOPNOTSUPP for writes; storing them
in the clear would leak, and forwarding ``security.*`` would let the kernel act on ciphertext.
"""

from __future__ import annotations

import errno
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.crypto.encoding import b64url_decode, b64url_encode
from kmsfs.errors import IntegrityError

XATTR_KEY_INFO = b"kmsfs/v1/xattrs"
"""Label passed to ``KeyDeriver.derive`` for the xattr secret (expanded by HKDF below)."""
_SIV_INFO = b"kmsfs/v1/xattrs/aes-siv"
_GCM_INFO = b"kmsfs/v1/xattrs/aes-256-gcm"
_NAME_AD = b"kmsfs/v1/xattr"
USER = b"user."
XATTR_NAME_MAX = 255
NONCE_SIZE = 12

ENODATA = errno.ENODATA


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


class XattrCipher:
    """Encrypts user xattr names (deterministically) and values (randomized, name-bound)."""

    def __init__(self, secret: bytes) -> None:
        self._siv = AESSIV(_hkdf(secret, _SIV_INFO, 64))
        self._gcm = AESGCM(_hkdf(secret, _GCM_INFO, 32))

    def disk_name(self, name: bytes) -> bytes:
        if not name.startswith(USER) or len(name) == len(USER):
            raise OSError(errno.EOPNOTSUPP, "only user.* extended attributes are supported")
        if len(name) > XATTR_NAME_MAX:
            raise OSError(errno.ERANGE, "xattr name too long")
        enc = USER + b64url_encode(self._siv.encrypt(name[len(USER) :], [_NAME_AD])).encode()
        if len(enc) > XATTR_NAME_MAX:
            raise OSError(errno.ERANGE, "xattr name too long once encrypted")
        return enc

    def plain_name(self, disk: bytes) -> bytes:
        try:
            raw = b64url_decode(disk[len(USER) :].decode("ascii"))
            return USER + self._siv.decrypt(raw, [_NAME_AD])
        except (ValueError, UnicodeDecodeError, InvalidTag):
            raise IntegrityError("xattr name: authentication failed") from None

    def seal(self, disk_name: bytes, value: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._gcm.encrypt(nonce, value, disk_name)

    def open(self, disk_name: bytes, stored: bytes) -> bytes:
        try:
            return self._gcm.decrypt(stored[:NONCE_SIZE], stored[NONCE_SIZE:], disk_name)
        except (InvalidTag, ValueError):
            raise IntegrityError("xattr value: authentication failed") from None


Target = bytes | int  # a ciphertext path or an open fd


def _nofollow(target: Target) -> dict[str, bool]:
    """Never follow a ciphertext symlink (its target is ciphertext); fds take no such flag."""
    return {} if isinstance(target, int) else {"follow_symlinks": False}


class Xattrs:
    """The four xattr operations over a ciphertext path or fd (synchronous, thread-safe)."""

    def __init__(self, cipher: XattrCipher) -> None:
        self._c = cipher

    def get(self, target: Target, name: bytes) -> bytes:
        if not name.startswith(USER):
            raise OSError(ENODATA, "no such attribute")
        disk = self._c.disk_name(name)
        stored = os.getxattr(target, disk, **_nofollow(target))
        return self._c.open(disk, stored)

    def set(self, target: Target, name: bytes, value: bytes) -> None:
        disk = self._c.disk_name(name)
        os.setxattr(target, disk, self._c.seal(disk, value), **_nofollow(target))

    def remove(self, target: Target, name: bytes) -> None:
        if not name.startswith(USER):
            raise OSError(ENODATA, "no such attribute")
        os.removexattr(target, self._c.disk_name(name), **_nofollow(target))

    def list(self, target: Target) -> list[bytes]:
        out = []
        for disk in os.listxattr(target, **_nofollow(target)):
            raw = os.fsencode(disk)
            if raw.startswith(USER):
                try:
                    out.append(self._c.plain_name(raw))
                except IntegrityError:
                    continue  # not ours (or damaged): hide it rather than fail the listing
        return out
