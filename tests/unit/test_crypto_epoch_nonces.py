"""Nonces that name their key's mk epoch (kmsfs/crypto/epoch_nonces.py), and the symlink and
xattr ciphers that use them across epochs."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from kmsfs.crypto.epoch_nonces import (
    FIRST_EPOCH_NONCES_FROM,
    EpochAead,
    EpochUnavailable,
    epochs_to_try,
    first_epoch_only,
    new_nonce,
)
from kmsfs.crypto.symlinks import SymlinkCipher, inline_target_length
from kmsfs.crypto.xattrs import XattrCipher
from kmsfs.errors import IntegrityError


def _secret_of(epochs: int):  # type: ignore[no-untyped-def]
    """A Domain with mk epochs 1..*epochs*: a secret per epoch, IntegrityError past them."""

    def secret_of(epoch: int) -> bytes:
        if not 1 <= epoch <= epochs:
            raise IntegrityError(f"mk epoch {epoch}: not in this Domain")
        return hmac.new(b"mk-%d" % epoch, b"info", hashlib.sha256).digest()

    return secret_of


def _aead(epochs: int, now: int) -> EpochAead:
    return EpochAead(_secret_of(epochs), lambda: now)


def test_a_nonce_names_an_epoch_after_1_and_is_all_random_at_1() -> None:
    assert new_nonce(2)[:2] == b"\x00\x02" and new_nonce(300)[:2] == (300).to_bytes(2, "big")
    assert len({new_nonce(2)[2:] for _ in range(50)}) == 50  # 10 random bytes each
    firsts = [int.from_bytes(new_nonce(1)[:2], "big") for _ in range(2000)]
    assert len(set(firsts)) > 1900 and min(firsts) >= FIRST_EPOCH_NONCES_FROM  # no epoch named
    assert epochs_to_try(b"\x00\x07" + bytes(10)) == (7, 1)
    assert epochs_to_try(b"\x00\x01" + bytes(10)) == epochs_to_try(bytes(12)) == (1,)
    for bad in (0, 65536):
        with pytest.raises(ValueError):
            new_nonce(bad)


def test_values_open_under_the_epoch_they_were_sealed_with() -> None:
    at2 = _aead(epochs=2, now=2)
    sealed = at2.seal(b"secret", b"ad")
    assert sealed[:2] == b"\x00\x02"
    assert at2.open(sealed, b"ad") == (b"secret", 2)
    old = _aead(epochs=2, now=1).seal(b"older", b"ad")
    assert at2.open(old, b"ad") == (b"older", 1)
    with pytest.raises(IntegrityError):
        at2.open(sealed, b"other ad")


def test_an_epoch_1_nonce_that_looks_like_another_epoch_still_opens() -> None:
    """Epoch 1's nonces are random: some begin with bytes that name an epoch. The reader
    tries that epoch, fails, and opens it under epoch 1."""
    at2 = _aead(epochs=2, now=2)
    for lookalike in (b"\x00\x02", b"\x00\x09"):  # an epoch the Domain has, and one it lacks
        sealed = at2.seal(b"v", None, epoch=1, nonce=lookalike + bytes(range(10)))
        assert at2.open(sealed, None) == (b"v", 1)


def test_the_removed_hsm_cannot_open_a_value_of_a_later_epoch() -> None:
    sealed = _aead(epochs=2, now=2).seal(b"secret", None)
    with pytest.raises(EpochUnavailable, match="sealed with mk epoch 2"):
        _aead(epochs=1, now=1).open(sealed, None)
    # damage to an epoch-1 value whose random nonce names an epoch far off is only damage
    damaged = bytearray(_aead(epochs=1, now=1).seal(b"v", None, nonce=b"\x9c\x40" + bytes(10)))
    damaged[-1] ^= 1
    with pytest.raises(IntegrityError) as err:
        _aead(epochs=1, now=1).open(bytes(damaged), None)
    assert not isinstance(err.value, EpochUnavailable)


def test_an_altered_epoch_or_a_planted_value_fails() -> None:
    at3 = _aead(epochs=3, now=3)
    sealed = bytearray(at3.seal(b"secret", None))
    sealed[1] = 2  # names epoch 2: a key that did not seal it
    with pytest.raises(IntegrityError, match="authentication failed"):
        at3.open(bytes(sealed), None)
    foreign = EpochAead(first_epoch_only(bytes(32)), lambda: 1).seal(b"planted", None)
    with pytest.raises(IntegrityError):
        at3.open(foreign, None)


def test_a_single_epoch_cipher_seals_and_opens_epoch_1_only() -> None:
    only = EpochAead(first_epoch_only(bytes(32)), lambda: 1)
    with pytest.raises(IntegrityError):
        only.seal(b"v", None, epoch=2)
    with pytest.raises(ValueError, match="does not name epoch 3"):
        _aead(epochs=3, now=3).seal(b"v", None, epoch=3, nonce=b"\x00\x02" + bytes(10))


def test_symlinks_of_a_later_epoch_keep_the_length_that_stat_reads_the_size_from() -> None:
    at2 = SymlinkCipher.of_volume(_secret_of(2), lambda: 2)
    for target in (b"t", b"some/target", b"x" * 500):
        stored = at2.encrypt(target)
        assert inline_target_length(len(stored)) == len(target)
        assert at2.open(stored) == (target, 2)
        # a writer at epoch 1 of a Domain with epoch 2 (newest: 2) reads it
        assert SymlinkCipher.of_volume(_secret_of(2), lambda: 1, lambda: 2).open(stored)[1] == 2
    with pytest.raises(EpochUnavailable):
        SymlinkCipher.of_volume(_secret_of(1), lambda: 1).decrypt(at2.encrypt(b"t"))
    # epoch 1 through of_volume is what SymlinkCipher(secret) reads and writes
    at1 = SymlinkCipher.of_volume(_secret_of(2), lambda: 1)
    assert SymlinkCipher(_secret_of(1)(1)).decrypt(at1.encrypt(b"t")) == b"t"


def test_xattr_values_move_epochs_and_names_stay_with_epoch_1() -> None:
    at1, at2 = (XattrCipher.of_volume(_secret_of(2), lambda e=e: e, lambda: 2) for e in (1, 2))
    name = b"user.colour"
    disk = at2.disk_name(name)
    assert disk == at1.disk_name(name) == XattrCipher(_secret_of(1)(1)).disk_name(name)
    stored = at2.seal(disk, b"blue")
    assert at1.open_with_epoch(disk, stored) == (b"blue", 2)
    long_name = b"user." + b"n" * 200
    long_disk = at2.disk_name(long_name, long_names=True)
    long_stored = at2.seal(long_disk, b"v", long_name)
    assert at2.plain_name(long_disk, long_stored) == long_name
    assert at2.open_with_epoch(long_disk, long_stored) == (b"v", 2)
    with pytest.raises(EpochUnavailable):
        XattrCipher.of_volume(_secret_of(1), lambda: 1).open(disk, stored)
    with pytest.raises(IntegrityError):
        at2.open(at2.disk_name(b"user.other"), stored)  # moved to another name


def test_no_key_is_asked_for_past_the_newest_epoch() -> None:
    """Found by review: an epoch-1 nonce names an epoch of 4096 or more, and each read asked
    the deriver for it (through the agent: a failed round trip and audit record per read)."""
    asked: list[int] = []
    secret_of = _secret_of(2)

    def key_of(epoch: int) -> bytes:
        asked.append(epoch)
        return secret_of(epoch)

    aead = EpochAead(key_of, lambda: 2)
    old = EpochAead(secret_of, lambda: 1).seal(b"v", None)
    legacy = EpochAead(secret_of, lambda: 1).seal(b"v", None, epoch=1,
                                                  nonce=b"\x00\x09" + bytes(10))
    for _ in range(50):
        assert aead.open(old, None) == (b"v", 1)
        assert aead.open(legacy, None) == (b"v", 1)
    assert asked == [1]
