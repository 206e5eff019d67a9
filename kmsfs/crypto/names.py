"""File name encryption: AES-256-SIV with the directory's IV as associated data, base64url.

Layout (docs/format.md, sections "Directory IV", "Names" and "Long names")::

    <dir>/kmsfs.diriv                 in every ciphertext directory (root too): its 16-byte IV,
                                      after a u16 big-endian mk epoch if that is 2 or more
    names key   = HKDF-SHA256(derive(NAMES_KEY_INFO, epoch), info=NAMES_SIV_INFO, 64 bytes)
    encoded     = base64url_nopad(AES-SIV(names key, ad=[dir IV], plaintext name))
    on-disk name:
      len(encoded) <= LONGNAME_THRESHOLD:  encoded
      otherwise:                           "kmsfs.longname." + base64url_nopad(SHA-256(encoded))
                                           and a sidecar "<that>.name" holding encoded (ASCII)

Encryption is deterministic so that ``lookup`` can compute a disk name without listing the
directory; the directory IV makes equal names in different directories differ and binds each
name to its directory. Each directory's names are keyed with the ``mk`` epoch its
``kmsfs.diriv`` names (:class:`VolumeNames`): a directory made after ``kmsfs-admin domain
rotate`` gets the new epoch, and ``kmsfs reencrypt`` moves older ones to it, so an HSM removed
before the rotation cannot read their names (docs/format.md, "Key epochs").

Base64url never yields ``.``, so every disk name that starts with
``kmsfs.`` is reserved to the format or the fs and hidden from readdir (:func:`is_internal`).

The on-disk name of a plaintext name is unique (canonical): a short name stored as a long name,
a long name stored as a short one, or non-canonical base64 is rejected, so one plaintext name can
never show up twice in a listing.
"""

import os
import re
import struct
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
"""Length of a directory IV, and of a ``kmsfs.diriv`` of epoch 1 (which has no epoch field)."""
_EPOCH = struct.Struct(">H")
DIRIV_EPOCH_SIZE = _EPOCH.size + DIRIV_SIZE
"""Length of a ``kmsfs.diriv`` of epoch 2 or more: the epoch, then the IV."""
MAX_EPOCH = 0xFFFF

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


def new_dir_iv(epoch: int) -> bytes:
    """Fresh content for a new directory's ``kmsfs.diriv``, its names keyed at *epoch*: a
    random IV, after the epoch if that is 2 or more (epoch 1 keeps the format every kmsfs
    reads)."""
    while True:
        dir_iv = os.urandom(DIRIV_SIZE)
        if dir_iv != bytes(DIRIV_SIZE):
            return with_epoch(dir_iv, epoch)


def with_epoch(dir_iv: bytes, epoch: int) -> bytes:
    """The ``kmsfs.diriv`` content with the IV of *dir_iv* (either form) at *epoch*: what
    ``kmsfs reencrypt`` writes to move a directory's names to another epoch."""
    if not 1 <= epoch <= MAX_EPOCH:
        raise ValueError(f"key epoch {epoch}: want 1 to {MAX_EPOCH}")
    iv = iv_of(dir_iv)
    return iv if epoch == 1 else _EPOCH.pack(epoch) + iv


def parse_dir_iv(data: bytes) -> bytes:
    """Check the bytes read from ``kmsfs.diriv``; FormatError if they cannot be a directory IV.

    Returns them as they are: the name caches key on all of it, so one IV at two epochs never
    shares an entry. Each epoch has one form (epoch 1 has no epoch field), so a directory's
    names have one encryption."""
    if len(data) == DIRIV_EPOCH_SIZE:
        (epoch,) = _EPOCH.unpack_from(data)
        if epoch < 2:
            raise FormatError(f"{DIRIV_NAME}: key epoch {epoch} (1 has no epoch field, 0 is none)")
    elif len(data) != DIRIV_SIZE:
        raise FormatError(
            f"{DIRIV_NAME}: want {DIRIV_SIZE} or {DIRIV_EPOCH_SIZE} bytes, have {len(data)}"
        )
    if iv_of(data) == bytes(DIRIV_SIZE):
        raise FormatError(f"{DIRIV_NAME}: all zero")
    return bytes(data)


def epoch_of(dir_iv: bytes) -> int:
    """The ``mk`` epoch that keys the names of a directory with this ``kmsfs.diriv``."""
    return 1 if len(dir_iv) == DIRIV_SIZE else _EPOCH.unpack_from(dir_iv)[0]


def iv_of(dir_iv: bytes) -> bytes:
    """The IV in a ``kmsfs.diriv`` (the names' associated data), without the epoch."""
    return dir_iv[-DIRIV_SIZE:]


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


class NameCipher:
    """Encrypts and decrypts the names of the directories keyed with one ``mk`` epoch. Holds
    only the AEAD object."""

    def __init__(self, names_secret: bytes, epoch: int = 1) -> None:
        if len(names_secret) != NAMES_SECRET_SIZE:
            raise ValueError(
                f"names secret: want {NAMES_SECRET_SIZE} bytes, have {len(names_secret)}"
            )
        key = HKDF(
            algorithm=hashes.SHA256(), length=SIV_KEY_SIZE, salt=None, info=NAMES_SIV_INFO
        ).derive(names_secret)
        self._siv = AESSIV(key)
        self.epoch = epoch

    def _ad(self, dir_iv: bytes) -> list[bytes]:
        """The associated data for a directory's names: its IV. ValueError for a directory
        of another epoch (its names are another key's: :class:`VolumeNames` picks)."""
        if len(dir_iv) not in (DIRIV_SIZE, DIRIV_EPOCH_SIZE):
            raise FormatError(
                f"directory IV: want {DIRIV_SIZE} or {DIRIV_EPOCH_SIZE} bytes, have {len(dir_iv)}"
            )
        if epoch_of(dir_iv) != self.epoch:
            raise ValueError(
                f"a directory of key epoch {epoch_of(dir_iv)}, not {self.epoch}: another key"
            )
        return [bytes(iv_of(dir_iv))]

    def encrypt(self, dir_iv: bytes, name: bytes) -> str:
        """Deterministically encrypt ``name`` for the directory with ``dir_iv``."""
        ad = self._ad(dir_iv)
        if not is_valid_name(name):
            raise ValueError("not a valid file name (empty, too long, '/', NUL, '.' or '..')")
        return b64url_encode(self._siv.encrypt(bytes(name), ad))

    def decrypt(self, dir_iv: bytes, encoded: str) -> bytes:
        """Decrypt an encoded name; IntegrityError if it is not one of this directory's names."""
        ad = self._ad(dir_iv)
        try:
            data = b64url_decode(encoded)
        except ValueError:
            raise IntegrityError("encrypted name: not canonical base64url") from None
        try:
            name = self._siv.decrypt(data, ad)
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


class VolumeNames:
    """The names of one volume, each directory's keyed with the ``mk`` epoch of its
    ``kmsfs.diriv``: the same calls as :class:`NameCipher`, which it picks by that epoch.

    *secret_of(epoch)* gives the names secret of an epoch (``derive(NAMES_KEY_INFO, epoch)``,
    in the HSM), asked once per epoch the volume uses, when first needed; an epoch the Domain
    does not have is its IntegrityError.
    """

    def __init__(self, secret_of: Callable[[int], bytes]) -> None:
        self._secret_of = secret_of
        self._ciphers: dict[int, NameCipher] = {}

    def check(self, dir_iv: bytes) -> NameCipher:
        """The cipher of this directory's epoch (derived now if it is the first of that
        epoch); IntegrityError if the Domain lacks that epoch."""
        epoch = epoch_of(dir_iv)
        cipher = self._ciphers.get(epoch)
        if cipher is None:
            cipher = self._ciphers[epoch] = NameCipher(self._secret_of(epoch), epoch)
        return cipher

    def encrypt(self, dir_iv: bytes, name: bytes) -> str:
        return self.check(dir_iv).encrypt(dir_iv, name)

    def decrypt(self, dir_iv: bytes, encoded: str) -> bytes:
        return self.check(dir_iv).decrypt(dir_iv, encoded)

    def encrypt_to_disk(self, dir_iv: bytes, name: bytes) -> DiskName:
        return self.check(dir_iv).encrypt_to_disk(dir_iv, name)

    def decrypt_from_disk(
        self, dir_iv: bytes, disk_name: str, read_sidecar: Callable[[], str]
    ) -> bytes:
        return self.check(dir_iv).decrypt_from_disk(dir_iv, disk_name, read_sidecar)
