"""Symlink target encryption and long-target blobs (kmsfs/crypto/symlinks.py)."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.crypto import symlinks
from kmsfs.crypto.encoding import b64url_decode, b64url_encode, sha256_b64url
from kmsfs.crypto.symlinks import (
    LONGLINK_DIR,
    LONGLINK_PREFIX,
    LONGLINK_THRESHOLD,
    MAX_TARGET_BYTES,
    SYMLINK_KEY_INFO,
    DiskLink,
    SymlinkCipher,
    is_longlink,
    is_valid_target,
)
from kmsfs.errors import IntegrityError

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "crypto_v1.json").read_text())
QUICK = settings(database=None, deadline=None, max_examples=60)
SECRET = bytes(range(7, 39))
LINKS = SymlinkCipher(SECRET)

valid_targets = st.binary(min_size=1, max_size=MAX_TARGET_BYTES).filter(is_valid_target)


def no_blob() -> str:
    raise AssertionError("read_blob must not be called for a short target")


def disk_round_trip(target: bytes) -> bytes:
    disk = LINKS.encrypt_to_disk(target)
    reader = no_blob if disk.long_content is None else lambda: disk.long_content
    return LINKS.decrypt_from_disk(disk.target, reader)


def test_constants() -> None:
    assert SYMLINK_KEY_INFO == b"kmsfs/v1/symlinks"
    assert MAX_TARGET_BYTES == 4095
    assert LONGLINK_DIR.startswith("kmsfs.")


@QUICK
@given(target=valid_targets)
def test_round_trip(target: bytes) -> None:
    assert LINKS.decrypt(LINKS.encrypt(target)) == target
    assert disk_round_trip(target) == target


@QUICK
@given(target=valid_targets)
def test_disk_target_always_fits_a_symlink(target: bytes) -> None:
    disk = LINKS.encrypt_to_disk(target)
    assert 0 < len(disk.target) <= LONGLINK_THRESHOLD
    assert "/" not in disk.target and "\x00" not in disk.target
    assert (disk.long_content is None) != is_longlink(disk.target)


@pytest.mark.parametrize("size", [1, 739, 740, 3043, 4095])
def test_targets_of_every_length_class_round_trip(size: int) -> None:
    target = (b"../" + b"d/" * size)[:size]
    disk = LINKS.encrypt_to_disk(target)
    assert (disk.long_content is not None) == (size > 739)
    assert disk_round_trip(target) == target


def test_long_target_blob_is_content_addressed() -> None:
    disk = LINKS.encrypt_to_disk(b"t" * 4095)
    assert disk.target == LONGLINK_PREFIX + sha256_b64url(disk.long_content)
    assert len(disk.long_content) == 5498


def test_same_target_encrypts_differently_each_time() -> None:
    assert len({LINKS.encrypt(b"/etc/passwd") for _ in range(50)}) == 50
    assert LINKS.encrypt_to_disk(b"x" * 4000) != LINKS.encrypt_to_disk(b"x" * 4000)


@QUICK
@given(target=st.binary(min_size=1, max_size=100).filter(is_valid_target), data=st.data())
def test_any_flipped_bit_is_detected(target: bytes, data: st.DataObject) -> None:
    raw = bytearray(b64url_decode(LINKS.encrypt(target)))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError):
        LINKS.decrypt(b64url_encode(bytes(raw)))


def test_truncated_garbage_and_foreign_targets_are_rejected() -> None:
    stored = LINKS.encrypt(b"target")
    raw = b64url_decode(stored)
    for cut in [0, 1, 12, 28, len(raw) - 1]:
        with pytest.raises(IntegrityError):
            LINKS.decrypt(b64url_encode(raw[:cut]))
    for garbage in ["", "not/base64", "abc=", "kmsfs.longlink.x", stored + "A"]:
        with pytest.raises(IntegrityError):
            LINKS.decrypt(garbage)
    with pytest.raises(IntegrityError, match="authentication failed"):
        SymlinkCipher(bytes(32)).decrypt(stored)


def test_blob_that_does_not_match_its_hash_is_rejected() -> None:
    a = LINKS.encrypt_to_disk(b"a" * 1000)
    b = LINKS.encrypt_to_disk(b"b" * 1000)
    for wrong in [b.long_content, a.long_content[:-1], "", "é"]:
        with pytest.raises(IntegrityError, match="blob does not match"):
            LINKS.decrypt_from_disk(a.target, lambda w=wrong: w)


def test_blob_may_hold_a_short_encoding() -> None:
    # The documented fallback for a filesystem that refuses even short symlinks.
    stored = LINKS.encrypt(b"short")
    assert LINKS.decrypt_from_disk(LONGLINK_PREFIX + sha256_b64url(stored), lambda: stored) == (
        b"short"
    )


def test_blob_read_errors_propagate() -> None:
    disk = LINKS.encrypt_to_disk(b"z" * 2000)

    def missing() -> str:
        raise FileNotFoundError(disk.target)

    with pytest.raises(FileNotFoundError):
        LINKS.decrypt_from_disk(disk.target, missing)


@pytest.mark.parametrize("bad", [b"", b"a\x00b", b"x" * 4096])
def test_invalid_targets_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        LINKS.encrypt(bad)


def test_encrypted_invalid_target_is_an_integrity_error() -> None:
    nonce = bytes(12)
    stored = b64url_encode(nonce + LINKS._sealer.aead(1).encrypt(nonce, b"a\x00b", None))
    with pytest.raises(IntegrityError, match="invalid target"):
        LINKS.decrypt(stored)


def test_bad_secret_length_is_refused() -> None:
    with pytest.raises(ValueError):
        SymlinkCipher(bytes(31))


def test_known_answer_vectors() -> None:
    v = VECTORS["symlinks"]
    links = SymlinkCipher(bytes.fromhex(v["symlink_secret"]))
    nonce = bytes.fromhex(v["nonce"])
    for case in v["targets"]:
        target = bytes.fromhex(case["target"])
        encoded = links._encrypt_with_nonce(target, nonce)
        assert encoded == case["encoded"]
        assert links.decrypt(encoded) == target
        disk = DiskLink(case["disk"], case["long_content"])
        assert is_longlink(disk.target) == (disk.long_content is not None)
        assert links.decrypt_from_disk(disk.target, lambda c=case: c["long_content"]) == target


def test_the_plaintext_length_follows_from_an_inline_target_length() -> None:
    """stat derives a symlink's size from its ciphertext length (no readlink): exact for every
    inline target, and None only where a long symlink's length could also be."""
    cipher = SymlinkCipher(b"\x07" * 32)
    for n in range(1, 760):
        stored = cipher.encrypt(b"t" * n)
        if len(stored) > symlinks.LONGLINK_THRESHOLD:
            continue
        got = symlinks.inline_target_length(len(stored))
        if len(stored) == symlinks.LONGLINK_TARGET_LEN:
            assert got is None
        else:
            assert got == n, n
    assert symlinks.inline_target_length(symlinks.LONGLINK_TARGET_LEN) is None
    assert symlinks.inline_target_length(5) is None  # no encryption is that short
    assert symlinks.inline_target_length(29) is None  # 29 % 4 == 1: not base64url
