"""Extended attribute encryption: AES-256-SIV names, AES-256-GCM values bound to their name.

Layout (docs/format.md, "Volume config", feature flag ``EncryptedXattrs``)::

    s           = derive(XATTR_KEY_INFO)                        (32 bytes, from the HSM)
    name key    = HKDF-SHA256(s, salt none, info XATTR_SIV_INFO, 64 bytes)    AES-256-SIV
    value key   = HKDF-SHA256(s, salt none, info XATTR_GCM_INFO, 32 bytes)    AES-256-GCM
    disk name   = "user." || base64url_nopad(AES-SIV(name key, ad=[XATTR_NAME_AD],
                                                      plaintext name after "user."))
    disk value  = nonce (12, random) || AES-GCM(value key, nonce, value, aad = disk name)
                  || tag (16)                                   (28 + len(value) bytes)

The value key is the one of the mk epoch its nonce names (:mod:`kmsfs.crypto.epoch_nonces`:
epoch 1, or with ``SymlinkXattrEpochs`` the current epoch); names are always epoch 1's.

A disk name over 255 bytes (a plaintext name of about 172 to 250 bytes after "user.") is
stored, on a volume with the ``LongXattrNames`` flag, as::

    sealed      = AES-SIV(name key, ad=[XATTR_NAME_AD], plaintext name after "user.")
    disk name   = "user.l." || base64url_nopad(SHA-256(base64url_nopad(sealed)))    (50 bytes)
    disk value  = len(sealed) (2, big-endian) || sealed || the value as above

A short disk name never has a dot after "user." (base64url has none), and a long entry whose
name would have a short disk name is refused, so no name has two. Listing reads a long name's
value to find its name; the hash in the disk name binds that sealed name to it, and the value
is bound to the disk name as before (a listing checks it too).

Names are deterministic so a lookup needs no listing; values are bound to their (encrypted)
name so two values cannot be swapped unnoticed. Only the ``user.`` namespace is encrypted; the
fs layer (:mod:`kmsfs.fs.xattrs`) decides what other namespaces do. Pure: bytes in, bytes out.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsfs.crypto.encoding import (
    URLSAFE_ALPHABET,
    b64url_decode,
    b64url_encode,
    sha256_b64url,
)
from kmsfs.crypto.epoch_nonces import NONCE_SIZE, EpochAead, first_epoch_only
from kmsfs.errors import IntegrityError
from kmsfs.keys import FIRST_EPOCH

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
TAG_SIZE = 16
SIV_TAG_SIZE = 16
LONG_NAME_PREFIX = b"user.l."
"""Disk names of long names (``LongXattrNames``) start with this; short ones never do."""
SEALED_LEN_SIZE = 2


class XattrNameError(ValueError):
    """A name that cannot be stored: not ``user.<something>``, or too long (``too_long``)."""

    def __init__(self, message: str, *, too_long: bool = False) -> None:
        super().__init__(message)
        self.too_long = too_long


def _hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def _check_secret(secret: bytes) -> None:
    if len(secret) != 32:
        raise ValueError(f"xattr secret: want 32 bytes, have {len(secret)}")


def _value_key(secret: bytes) -> bytes:
    _check_secret(secret)
    return _hkdf(secret, XATTR_GCM_INFO, 32)


class ForeignXattrName(IntegrityError):
    """A ``user.*`` name kmsfs never writes (after ``user.``, not canonical base64url of more
    than an SIV tag: ``user.com.dropbox.attrs``, ``user.checksum``): another program's own
    attribute on the ciphertext file, e.g. a sync client's. Hidden, not reported as damage.

    ``maybe_ours``: it could also be one of kmsfs's own names damaged in place (base64url
    characters only, as long as kmsfs's shortest, :func:`looks_like_ours`), which ``kmsfs
    fsck`` says in its warning. Not damage: other programs' names such as
    ``user.sha256_checksum_of_file`` look so too, and calling them damage would log a line at
    every listing and fail fsck on a healthy volume (review); a name lost in place is no
    more than one removed, which the format cannot detect either (threat-model.md)."""

    def __init__(self, message: str, maybe_ours: bool = False) -> None:
        super().__init__(message)
        self.maybe_ours = maybe_ours


class XattrCipher:
    """Encrypts user xattr names (deterministically) and values (randomized, name-bound)."""

    def __init__(self, secret: bytes) -> None:
        """Epoch 1's keys alone (*secret*: ``derive(XATTR_KEY_INFO, 1)``): names, and values
        of volumes before ``SymlinkXattrEpochs``; :meth:`of_volume` has every epoch's."""
        _check_secret(secret)
        self._siv = AESSIV(_hkdf(secret, XATTR_SIV_INFO, 64))
        self._values = EpochAead(first_epoch_only(_value_key(secret)), lambda: FIRST_EPOCH)

    @classmethod
    def of_volume(
        cls, secret_of: Callable[[int], bytes], epoch_now: Callable[[], int],
        newest: Callable[[], int] | None = None,
        retired_below: Callable[[], int] | None = None,
    ) -> XattrCipher:
        """Names keyed with epoch 1 (a lookup must find a name without knowing its epoch);
        values of every epoch, each epoch's key derived when first needed, new ones sealed
        at *epoch_now()*. *secret_of(epoch)* is ``derive(XATTR_KEY_INFO, epoch)``."""
        cipher = cls(secret_of(FIRST_EPOCH))
        cipher._values = EpochAead(lambda epoch: _value_key(secret_of(epoch)), epoch_now,
                                   newest, retired_below)
        return cipher

    def _sealed(self, name: bytes) -> bytes:
        if not name.startswith(USER_PREFIX) or len(name) == len(USER_PREFIX):
            raise XattrNameError("only user.* extended attributes are supported")
        if len(name) > XATTR_NAME_MAX:
            raise XattrNameError("xattr name too long", too_long=True)
        return self._siv.encrypt(name[len(USER_PREFIX) :], [XATTR_NAME_AD])

    def disk_name(self, name: bytes, long_names: bool = False) -> bytes:
        """The on-disk name of ``user.<x>``; XattrNameError for another namespace or length.

        *long_names* (the volume's ``LongXattrNames`` flag): a name too long once encrypted
        gets a hashed disk name instead of the error.
        """
        sealed = self._sealed(name)
        enc = USER_PREFIX + b64url_encode(sealed).encode()
        if len(enc) <= XATTR_NAME_MAX:
            return enc
        if not long_names:
            raise XattrNameError("xattr name too long once encrypted", too_long=True)
        return _long_disk_name(sealed)

    def plain_name(self, disk: bytes, stored: bytes | None = None) -> bytes:
        """Inverse of :meth:`disk_name`; IntegrityError if *disk* is not one of ours. A long
        disk name needs its *stored* value, which holds the sealed name."""
        try:
            if is_long_disk_name(disk):
                if stored is None:
                    raise ValueError("a long name needs its value")
                raw = _split_long(disk, stored)[0]
                if len(USER_PREFIX) + len(b64url_encode(raw)) <= XATTR_NAME_MAX:
                    # A name that has a short disk name never gets a long one: refusing it
                    # keeps one name from being listed twice (a forged long entry).
                    raise ValueError("a long entry for a short name")
            elif disk.startswith(USER_PREFIX):
                encoded = disk[len(USER_PREFIX) :]
                try:
                    raw = b64url_decode(encoded.decode("ascii"))
                except (ValueError, UnicodeDecodeError):
                    raw = b""
                if len(raw) <= SIV_TAG_SIZE:  # ours hold the tag and at least one byte
                    raise ForeignXattrName("xattr name: not one kmsfs writes",
                                           maybe_ours=looks_like_ours(encoded))
            else:
                raise ForeignXattrName("xattr name: not a user.* name")
            return USER_PREFIX + self._siv.decrypt(raw, [XATTR_NAME_AD])
        except (ValueError, InvalidTag):
            raise IntegrityError("xattr name: authentication failed") from None

    def seal(self, disk_name: bytes, value: bytes, name: bytes | None = None) -> bytes:
        """The stored value; a long disk name needs the plaintext *name* (its sealed form goes
        in front of the value)."""
        return self._seal_with_nonce(disk_name, value, None, name)

    def _seal_with_nonce(
        self, disk_name: bytes, value: bytes, nonce: bytes | None, name: bytes | None = None,
        epoch: int | None = None,
    ) -> bytes:
        """:meth:`seal` with a given *nonce* and *epoch*: known-answer tests only."""
        sealed_value = self._values.seal(value, disk_name, epoch=epoch, nonce=nonce)
        if not is_long_disk_name(disk_name):
            return sealed_value
        if name is None:
            raise ValueError("a long xattr name needs its plaintext name to be stored")
        sealed = self._sealed(name)
        if _long_disk_name(sealed) != disk_name:
            raise ValueError("disk name and name do not match")
        return len(sealed).to_bytes(SEALED_LEN_SIZE, "big") + sealed + sealed_value

    def open(self, disk_name: bytes, stored: bytes) -> bytes:
        """Plaintext value; IntegrityError if it was altered, truncated or moved to another name."""
        return self.open_with_epoch(disk_name, stored)[0]

    def open_with_epoch(self, disk_name: bytes, stored: bytes) -> tuple[bytes, int]:
        """(plaintext value, the mk epoch of its key): :meth:`open`."""
        if is_long_disk_name(disk_name):
            try:
                stored = _split_long(disk_name, stored)[1]
            except ValueError as exc:
                raise IntegrityError(f"xattr value: {exc}") from None
        if len(stored) < NONCE_SIZE + TAG_SIZE:
            raise IntegrityError(
                f"xattr value: want at least {NONCE_SIZE + TAG_SIZE} bytes, have {len(stored)}"
            )
        try:
            return self._values.open(stored, disk_name)
        except IntegrityError as exc:
            raise type(exc)(f"xattr value: {exc}") from None


#: The shortest short disk name after ``user.``: base64url of the SIV tag and one byte.
MIN_ENCODED_NAME = -(-(SIV_TAG_SIZE + 1) * 4 // 3)


def looks_like_ours(encoded: bytes) -> bool:
    """True if a ``user.*`` name (after the prefix) could be one kmsfs wrote, damaged in place
    (a character changed, dropped or added: a spelling that is not canonical base64url):
    base64url characters only, at least :data:`MIN_ENCODED_NAME` of them."""
    return len(encoded) >= MIN_ENCODED_NAME and not encoded.strip(URLSAFE_ALPHABET)


def is_long_disk_name(disk: bytes) -> bool:
    """True for the disk name of a long xattr name (``LongXattrNames``)."""
    return disk.startswith(LONG_NAME_PREFIX)


def _long_disk_name(sealed: bytes) -> bytes:
    return LONG_NAME_PREFIX + sha256_b64url(b64url_encode(sealed)).encode()


def _split_long(disk: bytes, stored: bytes) -> tuple[bytes, bytes]:
    """(sealed name, sealed value) of a long name's stored value; ValueError unless the sealed
    name is whole and hashes to *disk*."""
    size = int.from_bytes(stored[:SEALED_LEN_SIZE], "big")
    sealed = stored[SEALED_LEN_SIZE : SEALED_LEN_SIZE + size]
    if len(stored) < SEALED_LEN_SIZE or len(sealed) != size or size <= SIV_TAG_SIZE:
        raise ValueError("long name: truncated")
    if _long_disk_name(sealed) != disk:
        raise ValueError("long name: does not match its disk name")
    return sealed, stored[SEALED_LEN_SIZE + size :]
