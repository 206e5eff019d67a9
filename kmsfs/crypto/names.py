"""File name encryption: AES-256-SIV with the directory's IV as associated data, base64url.

Layout (docs/format.md, sections "Directory IV", "Names" and "Long names")::

    <dir>/kmsfs.diriv                 16 random bytes, in every ciphertext directory (root too)
    names key   = HKDF-SHA256(derive(NAMES_KEY_INFO), info=NAMES_SIV_INFO, 64 bytes)
    encoded     = base64url_nopad(AES-SIV(names key, ad=[dir IV], plaintext name))
    on-disk name:
      len(encoded) <= LONGNAME_THRESHOLD:  encoded
      otherwise:                           "kmsfs.longname." + base64url_nopad(SHA-256(encoded))
                                           and a sidecar "<that>.name" holding encoded (ASCII)

Encryption is deterministic so that ``lookup`` can compute a disk name without listing the
directory; the directory IV makes equal names in different directories differ and binds each
name to its directory. Base64url never yields ``.``, so every disk name that starts with
``kmsfs.`` is reserved to the format or the fs and hidden from readdir (:func:`is_internal`).

The on-disk name of a plaintext name is unique (canonical): a short name stored as a long name,
a long name stored as a short one, or non-canonical base64 is rejected, so one plaintext name can
never show up twice in a listing.
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.crypto.encoding import (
    SHA256_B64URL_PATTERN,
    b64url_decode,
    b64url_encode,
    sha256_b64url,
)
from kmsfs.errors import FormatError, IntegrityError

DIRIV_NAME = "kmsfs.diriv"
DIRIV_SIZE = 16

NAMES_KEY_INFO = b"kmsfs/v1/names"
"""Label the fs passes to ``KeyDeriver.derive`` to get the 32-byte names secret."""
NAMES_SIV_INFO = b"kmsfs/v1/names/aes-siv"
"""HKDF info expanding the names secret into the 64-byte AES-256-SIV key."""
NAMES_SECRET_SIZE = 32
SIV_KEY_SIZE = 64
SIV_TAG_SIZE = 16

MAX_NAME_BYTES = 255
"""Longest plaintext name (ext4's NAME_MAX). Longer names are the fs's ENAMETOOLONG."""

RESERVED_PREFIX = "kmsfs."
LONGNAME_PREFIX = "kmsfs.longname."
LONGNAME_SUFFIX = ".name"
LONGNAME_THRESHOLD = 175
"""Longest encoded name stored as is; longer ones become long names.

175 characters encode plaintext names of up to 115 bytes in place (16-byte SIV tag + 115 bytes
= 131 bytes = 175 base64url characters), which covers nearly all real names, and leaves 80 bytes
below NAME_MAX (255) for tools that add a suffix to a name in the ciphertext tree (rsync's
``.name.XXXXXX`` temporaries, sync clients' conflict copies). It is part of the format: changing
it changes the disk name of some plaintext names, so lookups would miss existing files.
"""

_LONGNAME = re.compile(re.escape(LONGNAME_PREFIX) + SHA256_B64URL_PATTERN)


@dataclass(frozen=True)
class DiskName:
    """What the fs creates for one plaintext name.

    ``name`` is the directory entry. If ``long_content`` is not None, the fs must also write the
    sidecar ``name + LONGNAME_SUFFIX`` with exactly ``long_content`` (ASCII, no newline), before
    the entry itself.
    """

    name: str
    long_content: str | None

    @property
    def sidecar(self) -> str | None:
        """Name of the sidecar file, or None for a short name."""
        return None if self.long_content is None else self.name + LONGNAME_SUFFIX


def new_dir_iv() -> bytes:
    """Fresh content for a new directory's ``kmsfs.diriv``."""
    while True:
        dir_iv = os.urandom(DIRIV_SIZE)
        if dir_iv != bytes(DIRIV_SIZE):
            return dir_iv


def parse_dir_iv(data: bytes) -> bytes:
    """Check the bytes read from ``kmsfs.diriv``; FormatError if they cannot be a directory IV."""
    if len(data) != DIRIV_SIZE:
        raise FormatError(f"{DIRIV_NAME}: want {DIRIV_SIZE} bytes, have {len(data)}")
    if data == bytes(DIRIV_SIZE):
        raise FormatError(f"{DIRIV_NAME}: all zero")
    return bytes(data)


def is_longname(disk_name: str) -> bool:
    """True for a long-name entry (``kmsfs.longname.<hash>``), not its sidecar."""
    return _LONGNAME.fullmatch(disk_name) is not None


def is_sidecar(disk_name: str) -> bool:
    """True for the sidecar of a long name (``kmsfs.longname.<hash>.name``)."""
    return disk_name.endswith(LONGNAME_SUFFIX) and is_longname(disk_name[: -len(LONGNAME_SUFFIX)])


def is_internal(disk_name: str) -> bool:
    """True for entries the fs must hide from readdir and refuse to look up.

    That is every name starting with ``kmsfs.`` except long-name entries: the directory IV, long
    name sidecars, the volume config and any temporary file of the fs. Encrypted names are
    base64url and never contain ``.``, so no plaintext name can collide with one of these.
    """
    return disk_name.startswith(RESERVED_PREFIX) and not is_longname(disk_name)


def is_valid_name(name: bytes) -> bool:
    """A name a directory entry can have: 1..255 bytes, no ``/`` or NUL, not ``.`` or ``..``."""
    return (
        0 < len(name) <= MAX_NAME_BYTES
        and b"/" not in name
        and b"\x00" not in name
        and name not in (b".", b"..")
    )


def _check_dir_iv(dir_iv: bytes) -> None:
    if len(dir_iv) != DIRIV_SIZE:
        raise FormatError(f"directory IV: want {DIRIV_SIZE} bytes, have {len(dir_iv)}")


class NameCipher:
    """Encrypts and decrypts the names of one volume. Holds only the AEAD object."""

    def __init__(self, names_secret: bytes) -> None:
        if len(names_secret) != NAMES_SECRET_SIZE:
            raise ValueError(
                f"names secret: want {NAMES_SECRET_SIZE} bytes, have {len(names_secret)}"
            )
        key = HKDF(
            algorithm=hashes.SHA256(), length=SIV_KEY_SIZE, salt=None, info=NAMES_SIV_INFO
        ).derive(names_secret)
        self._siv = AESSIV(key)

    def encrypt(self, dir_iv: bytes, name: bytes) -> str:
        """Deterministically encrypt ``name`` for the directory with ``dir_iv``."""
        _check_dir_iv(dir_iv)
        if not is_valid_name(name):
            raise ValueError("not a valid file name (empty, too long, '/', NUL, '.' or '..')")
        return b64url_encode(self._siv.encrypt(bytes(name), [bytes(dir_iv)]))

    def decrypt(self, dir_iv: bytes, encoded: str) -> bytes:
        """Decrypt an encoded name; IntegrityError if it is not one of this directory's names."""
        _check_dir_iv(dir_iv)
        try:
            data = b64url_decode(encoded)
        except ValueError:
            raise IntegrityError("encrypted name: not canonical base64url") from None
        try:
            name = self._siv.decrypt(data, [bytes(dir_iv)])
        except InvalidTag:
            raise IntegrityError("encrypted name: authentication failed") from None
        if not is_valid_name(name):
            raise IntegrityError("encrypted name: decrypts to an invalid file name")
        return name

    def encrypt_to_disk(self, dir_iv: bytes, name: bytes) -> DiskName:
        """The directory entry (and sidecar content, for a long name) for ``name``."""
        encoded = self.encrypt(dir_iv, name)
        if len(encoded) <= LONGNAME_THRESHOLD:
            return DiskName(encoded, None)
        return DiskName(LONGNAME_PREFIX + sha256_b64url(encoded), encoded)

    def decrypt_from_disk(
        self, dir_iv: bytes, disk_name: str, read_sidecar: Callable[[], str]
    ) -> bytes:
        """Decrypt a directory entry; ``read_sidecar`` is called only for a long name.

        IntegrityError if the sidecar does not hash to the entry's name, or if the entry is not
        the canonical disk name of what it decrypts to. Errors of ``read_sidecar`` propagate.
        """
        if not is_longname(disk_name):
            if len(disk_name) > LONGNAME_THRESHOLD:
                raise IntegrityError("encrypted name: too long to be stored as a short name")
            return self.decrypt(dir_iv, disk_name)
        encoded = read_sidecar()
        if not encoded.isascii() or sha256_b64url(encoded) != disk_name[len(LONGNAME_PREFIX) :]:
            raise IntegrityError(f"long name {disk_name}: sidecar does not match its hash")
        if len(encoded) <= LONGNAME_THRESHOLD:
            raise IntegrityError(f"long name {disk_name}: sidecar holds a short name")
        return self.decrypt(dir_iv, encoded)
