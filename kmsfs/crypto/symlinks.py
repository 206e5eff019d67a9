"""Symlink target encryption: AES-256-GCM with a random nonce, base64url; long targets in blobs.

Layout (docs/format.md, section "Symlinks")::

    symlink key = HKDF-SHA256(derive(SYMLINK_KEY_INFO), info=SYMLINK_GCM_INFO, 32 bytes)
    encoded     = base64url_nopad(nonce (12) || AES-GCM ciphertext || tag (16)), no AAD;
                  the symlink secret, and so the key, is the mk epoch's the nonce names
                  (kmsfs.crypto.epoch_nonces: epoch 1 or, with SymlinkXattrEpochs, the current)
    ciphertext symlink target:
      len(encoded) <= LONGLINK_THRESHOLD:  encoded
      otherwise:                           "kmsfs.longlink." + base64url_nopad(SHA-256(encoded))
                                           and a blob file <root>/kmsfs.longlinks/<that target>
                                           holding encoded (ASCII, no newline)

Why blobs in one volume-wide directory: a 4095-byte target encrypts to 4123 bytes, more than any
symlink can hold, so some targets must live outside the symlink inode. Everything that must follow
a symlink through hard links and renames (also across directories) has to be in the inode; the
link target is, so it names a content-addressed blob that never moves. ``link`` and ``rename``
then need no extra work; only dropping the last link of such a symlink removes its blob.

Why 1023: XFS refuses symlink targets longer than 1023 bytes (ext4, btrfs and tmpfs take 4095),
and the ciphertext tree should be copyable to any of them. Targets up to 739 bytes stay inline.

Targets are not bound to their location (as in gocryptfs): the inode has no stable identity to
bind to, and binding to the directory would make rename re-encrypt. Swapping two encrypted
targets is therefore undetected; forging or altering one is not.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.crypto.encoding import (
    SHA256_B64URL_PATTERN,
    b64url_decode,
    b64url_encode,
    sha256_b64url,
)
from kmsfs.crypto.epoch_nonces import NONCE_SIZE, EpochAead, first_epoch_only
from kmsfs.errors import IntegrityError
from kmsfs.keys import FIRST_EPOCH

SYMLINK_KEY_INFO = b"kmsfs/v1/symlinks"
"""Label the fs passes to ``KeyDeriver.derive`` to get the 32-byte symlink secret."""
SYMLINK_GCM_INFO = b"kmsfs/v1/symlinks/aes-256-gcm"
"""HKDF info expanding the symlink secret into the AES-256-GCM key."""
SYMLINK_SECRET_SIZE = 32
TAG_SIZE = 16

MAX_TARGET_BYTES = 4095
"""Longest plaintext target (PATH_MAX - 1)."""
LONGLINK_THRESHOLD = 1023
"""Longest encoded target stored in the ciphertext symlink itself (XFS's limit)."""
LONGLINK_PREFIX = "kmsfs.longlink."
LONGLINK_DIR = "kmsfs.longlinks"
"""Directory in the ciphertext root holding one blob per long-target symlink inode."""
LONGLINK_DIR_B = LONGLINK_DIR.encode()

_LONGLINK = re.compile(re.escape(LONGLINK_PREFIX) + SHA256_B64URL_PATTERN)
LONGLINK_TARGET_LEN = len(LONGLINK_PREFIX) + 43
"""Length of every long symlink's ciphertext target (the prefix and a base64url SHA-256)."""


@dataclass(frozen=True)
class DiskLink:
    """What the fs stores for one symlink target.

    ``target`` is the ciphertext symlink's target. If ``long_content`` is not None, the fs must
    first write the blob ``<root>/LONGLINK_DIR/<target>`` with exactly ``long_content``.
    """

    target: str
    long_content: str | None


def is_longlink(link_target: str) -> bool:
    """True if a ciphertext symlink's target refers to a blob in LONGLINK_DIR."""
    return _LONGLINK.fullmatch(link_target) is not None


def inline_target_length(stored_len: int) -> int | None:
    """The plaintext length of a target stored inline in a ciphertext symlink of *stored_len*
    bytes, or None when the length alone does not tell (a long symlink's length, or one no
    encryption gives): the caller then reads the symlink.

    base64url without padding maps byte counts to lengths one to one, and the encryption adds
    exactly a nonce and a tag, so stat needs no readlink; readlink would move the ciphertext
    symlink's atime, which a stat on ext4 never does.
    """
    if stored_len == LONGLINK_TARGET_LEN or stored_len % 4 == 1:
        return None
    if stored_len > LONGLINK_THRESHOLD:
        return None
    length = stored_len * 3 // 4 - NONCE_SIZE - TAG_SIZE
    return length if 0 < length <= MAX_TARGET_BYTES else None


def is_valid_target(target: bytes) -> bool:
    """A target a symlink can have: 1..4095 bytes, no NUL."""
    return 0 < len(target) <= MAX_TARGET_BYTES and b"\x00" not in target


def symlink_key(secret: bytes) -> bytes:
    """The AES-256-GCM key of one epoch's symlink secret."""
    if len(secret) != SYMLINK_SECRET_SIZE:
        raise ValueError(f"symlink secret: want {SYMLINK_SECRET_SIZE} bytes, have {len(secret)}")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=SYMLINK_GCM_INFO).derive(
        secret
    )


class SymlinkCipher:
    """Encrypts and decrypts the symlink targets of one volume. Holds only AEAD objects.

    ``SymlinkCipher(secret)`` has epoch 1's key alone (volumes before ``SymlinkXattrEpochs``,
    known-answer tests); :meth:`of_volume` has every epoch's, each derived when first needed,
    and seals new targets with the epoch the volume writes at.
    """

    def __init__(self, secret: bytes) -> None:
        self._sealer = EpochAead(first_epoch_only(symlink_key(secret)), lambda: FIRST_EPOCH)

    @classmethod
    def of_volume(
        cls, secret_of: Callable[[int], bytes], epoch_now: Callable[[], int],
        newest: Callable[[], int] | None = None,
        retired_below: Callable[[], int] | None = None,
    ) -> "SymlinkCipher":
        """Targets of every epoch: *secret_of(epoch)* is ``derive(SYMLINK_KEY_INFO, epoch)``
        (IntegrityError for an epoch the Domain lacks); new ones sealed at *epoch_now()*."""
        cipher = cls.__new__(cls)
        cipher._sealer = EpochAead(lambda epoch: symlink_key(secret_of(epoch)), epoch_now,
                                   newest, retired_below)
        return cipher

    def encrypt(self, target: bytes) -> str:
        """Encrypt a target with a fresh random nonce: base64url(nonce || ciphertext || tag)."""
        if not is_valid_target(target):
            raise ValueError("not a valid symlink target (empty, over 4095 bytes or NUL)")
        return b64url_encode(self._sealer.seal(bytes(target), None))

    def _encrypt_with_nonce(self, target: bytes, nonce: bytes, epoch: int = FIRST_EPOCH) -> str:
        """Seam for known-answer tests only: production code must use :meth:`encrypt`."""
        if not is_valid_target(target):
            raise ValueError("not a valid symlink target (empty, over 4095 bytes or NUL)")
        return b64url_encode(self._sealer.seal(bytes(target), None, epoch=epoch, nonce=nonce))

    def decrypt(self, stored: str) -> bytes:
        """Decrypt an encoded target; IntegrityError if it was not made by this volume's key."""
        return self.open(stored)[0]

    def open(self, stored: str) -> tuple[bytes, int]:
        """(target, the mk epoch of its key) of an encoded target; IntegrityError as
        :meth:`decrypt`."""
        try:
            data = b64url_decode(stored)
        except ValueError:
            raise IntegrityError("symlink target: not canonical base64url") from None
        if len(data) <= NONCE_SIZE + TAG_SIZE:
            raise IntegrityError(f"symlink target: {len(data)} bytes is too short")
        try:
            target, epoch = self._sealer.open(data, None)
        except IntegrityError as exc:
            raise type(exc)(f"symlink target: {exc}") from None
        if not is_valid_target(target):
            raise IntegrityError("symlink target: decrypts to an invalid target")
        return target, epoch

    def encrypt_to_disk(self, target: bytes) -> DiskLink:
        """The ciphertext symlink target (and blob content, for a long target)."""
        encoded = self.encrypt(target)
        if len(encoded) <= LONGLINK_THRESHOLD:
            return DiskLink(encoded, None)
        return DiskLink(LONGLINK_PREFIX + sha256_b64url(encoded), encoded)

    def decrypt_from_disk(self, link_target: str, read_blob: Callable[[], str]) -> bytes:
        """Decrypt a ciphertext symlink's target; ``read_blob`` is called only for a long one.

        IntegrityError if the blob does not hash to the link target. A blob may hold a short
        encoding too (an fs may fall back to a blob when a filesystem refuses a long symlink).
        Errors of ``read_blob`` propagate.
        """
        return self.open_from_disk(link_target, read_blob)[0]

    def open_from_disk(
        self, link_target: str, read_blob: Callable[[], str]
    ) -> tuple[bytes, int]:
        """(target, epoch of its key) of a ciphertext symlink: :meth:`decrypt_from_disk`."""
        if not is_longlink(link_target):
            return self.open(link_target)
        encoded = read_blob()
        if not encoded.isascii() or sha256_b64url(encoded) != link_target[len(LONGLINK_PREFIX) :]:
            raise IntegrityError(f"long symlink {link_target}: blob does not match its hash")
        return self.open(encoded)
