"""AES-GCM nonces that name the ``mk`` epoch of their key: symlink targets and xattr values.

Layout (docs/format.md, "Key epochs", feature flag ``SymlinkXattrEpochs``)::

    epoch 1:    nonce = 12 random bytes, the first two >= 4096 as a big-endian number
                (before the flag: any 12 random bytes)
    epoch >= 2: nonce = epoch (2, big-endian) || 10 random bytes

Why in the nonce: a symlink's plaintext size is read off its ciphertext length (stat needs no
readlink, so the symlink's atime stays as on ext4), so the stored form must not grow; the nonce
is the one field whose bytes are free. An epoch-1 nonce written before the flag is random and
may begin with any two bytes, so a reader tries the epoch the nonce names and then epoch 1
(:func:`epochs_to_try`):
AES-GCM refuses a wrong key, so the first key that opens the value is its key, and a value is
never read under a key it was not sealed with. The nonce is authenticated (GCM), so an altered
epoch only makes the value fail.

What the 10 random bytes cost: two values sealed under one key with the same nonce would leak
the XOR of their plaintexts; with 80 random bits that takes about 2^40 values of one epoch,
where the 2^32 NIST caps random 96-bit nonces at is far beyond any volume's symlinks and xattrs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.crypto.fileids import MAX_EPOCH
from kmsfs.errors import IntegrityError
from kmsfs.keys import FIRST_EPOCH

NONCE_SIZE = 12
EPOCH_SIZE = 2
#: An epoch-1 nonce this build draws never begins with a smaller number, so it names no epoch
#: a Domain reaches before its 4,096th rotation: only values from before ``SymlinkXattrEpochs``
#: can (a reader tries epoch 1 after the named one for them; past that many rotations, for
#: new ones too, at the cost of one more decryption attempt).
FIRST_EPOCH_NONCES_FROM = 4096


def new_nonce(epoch: int) -> bytes:
    """A fresh nonce for a value sealed under *epoch*'s key."""
    if not FIRST_EPOCH <= epoch <= MAX_EPOCH:
        raise ValueError(f"key epoch: want {FIRST_EPOCH}..{MAX_EPOCH}, have {epoch}")
    if epoch == FIRST_EPOCH:
        while True:  # 1 in 16 drawn again: a 92-bit random nonce, as good
            nonce = os.urandom(NONCE_SIZE)
            if int.from_bytes(nonce[:EPOCH_SIZE], "big") >= FIRST_EPOCH_NONCES_FROM:
                return nonce
    return epoch.to_bytes(EPOCH_SIZE, "big") + os.urandom(NONCE_SIZE - EPOCH_SIZE)


def epochs_to_try(nonce: bytes) -> tuple[int, ...]:
    """The epochs whose keys may have sealed a value with *nonce*, in the order to try them."""
    named = int.from_bytes(nonce[:EPOCH_SIZE], "big")
    return (named, FIRST_EPOCH) if named > FIRST_EPOCH else (FIRST_EPOCH,)


#: How far past the newest epoch at hand a nonce's epoch may be and still be reported as an
#: epoch this HSM lacks: an epoch-1 nonce's first bytes are random, and name such an epoch
#: only once in 4,096 values, so the damage of almost every other value is not blamed on one.
EPOCHS_AHEAD = 16


class EpochUnavailable(IntegrityError):
    """A value sealed under an epoch whose key may not be used here: one just after the newest
    this HSM (or Domain generation) has (sealed after a rotation it does not have, most
    likely), or a retired one (:class:`EpochRetired`)."""


class EpochRetired(EpochUnavailable):
    """A value that opens, but only under the key of a retired epoch: whoever still holds that
    epoch's ``mk`` (an HSM removed before the rotation) could have sealed it, so it is refused,
    as a file's contents at that epoch are (docs/format.md, "Key epochs")."""


def first_epoch_only(key: bytes) -> Callable[[int], bytes]:
    """A *key_of* for :class:`EpochAead` that has epoch 1's *key* and no other (a volume
    before ``SymlinkXattrEpochs``, known-answer tests)."""

    def key_of(epoch: int) -> bytes:
        if epoch != FIRST_EPOCH:
            raise IntegrityError(f"mk epoch {epoch}: only epoch {FIRST_EPOCH} is at hand")
        return key

    return key_of


class EpochAead:
    """AES-256-GCM under one key per ``mk`` epoch, each nonce naming its key's epoch.

    *key_of(epoch)* gives the 32-byte key of an epoch (derived in the HSM, then expanded),
    asked once per epoch, when first needed; it raises IntegrityError for an epoch the Domain
    does not have. *epoch_now()* is the epoch new values are sealed with.
    """

    def __init__(self, key_of: Callable[[int], bytes], epoch_now: Callable[[], int],
                 newest: Callable[[], int] | None = None,
                 retired_below: Callable[[], int] | None = None) -> None:
        self._key_of = key_of
        self._epoch_now = epoch_now
        self._retired_below = retired_below or (lambda: FIRST_EPOCH)
        """Values of the epochs below this one are refused (asked at each opening: a mount
        takes in a retirement while it serves)."""
        self._newest = newest or epoch_now
        """The newest epoch at hand (the deriver's current one, retired or not): no key is
        asked for past it (an epoch-1 nonce names epochs 4096 and up: each would be a failed
        derivation, an agent's round trip and audit record, at every read)."""
        self._aeads: dict[int, AESGCM] = {}

    def aead(self, epoch: int) -> AESGCM:
        """The cipher of *epoch*; IntegrityError if the Domain lacks it."""
        aead = self._aeads.get(epoch)
        if aead is None:
            aead = self._aeads[epoch] = AESGCM(self._key_of(epoch))
        return aead

    def seal(self, plain: bytes, aad: bytes | None, *, epoch: int | None = None,
             nonce: bytes | None = None) -> bytes:
        """nonce || ciphertext || tag, under the key of *epoch* (default: the current one).
        *nonce* is for known-answer tests only."""
        if epoch is None:
            epoch = self._epoch_now()
        if nonce is None:
            nonce = new_nonce(epoch)
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce: want {NONCE_SIZE} bytes, have {len(nonce)}")
        if epoch != FIRST_EPOCH and epochs_to_try(nonce)[0] != epoch:
            raise ValueError(f"nonce does not name epoch {epoch}")
        return nonce + self.aead(epoch).encrypt(nonce, plain, aad)

    def open(self, sealed: bytes, aad: bytes | None) -> tuple[bytes, int]:
        """(plaintext, epoch of its key); IntegrityError if no key opens it,
        :class:`EpochUnavailable` if its nonce names one of the :data:`EPOCHS_AHEAD` epochs
        after the newest at hand, :class:`EpochRetired` if it opens under a retired epoch."""
        nonce, body = sealed[:NONCE_SIZE], sealed[NONCE_SIZE:]
        newest = self._newest()
        missing = None
        for epoch in epochs_to_try(nonce):
            if epoch > newest:
                missing = epoch
                continue
            try:
                aead = self.aead(epoch)
            except IntegrityError:
                missing = epoch
                continue
            try:
                plain = aead.decrypt(nonce, body, aad)
            except InvalidTag:
                continue
            below = self._retired_below()
            if epoch < below:
                raise EpochRetired(f"sealed with mk epoch {epoch}, which is retired (epochs "
                                   f"below {below})")
            return plain, epoch
        if missing is not None and newest < missing <= newest + EPOCHS_AHEAD:
            raise EpochUnavailable(f"authentication failed: sealed with mk epoch {missing}, "
                                   f"its nonce says, and epochs after {newest} cannot be "
                                   "derived here")
        raise IntegrityError("authentication failed")
