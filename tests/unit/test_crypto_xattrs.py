"""Extended attribute name and value encryption (kmsfs/crypto/xattrs.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.crypto import xattrs
from kmsfs.crypto.encoding import URLSAFE_ALPHABET, b64url_decode, b64url_encode, sha256_b64url
from kmsfs.crypto.xattrs import (
    LONG_NAME_PREFIX,
    NONCE_SIZE,
    TAG_SIZE,
    XATTR_GCM_INFO,
    XATTR_KEY_INFO,
    XATTR_NAME_AD,
    XATTR_NAME_MAX,
    XATTR_SIV_INFO,
    ForeignXattrName,
    XattrCipher,
    XattrNameError,
)
from kmsfs.errors import IntegrityError

QUICK = settings(database=None, deadline=None, max_examples=60)
SECRET = bytes(range(32))
CIPHER = XattrCipher(SECRET)

# Written by the pre-split fs/xattrs.py for SECRET: the on-disk format must not move.
GOLDEN_NAME = b"user.4BX9Bem8ezXLPNagmT0uThi2o5wL"  # user.color
GOLDEN_VALUE = bytes(12) + bytes.fromhex("8486a21bb5f2c88200c7bc1aa1d686e14547735f")  # b"blue"

# Independent known answers (tests/vectors/generate_crypto_vectors.py, vectors_v2).
VECTORS_FILE = Path(__file__).parents[1] / "vectors" / "crypto_v2.json"
VECTORS = json.loads(VECTORS_FILE.read_text())["xattrs"]
V_CIPHER = XattrCipher(bytes.fromhex(VECTORS["xattr_secret"]))

user_names = st.binary(min_size=1, max_size=150).map(lambda b: b"user." + b)


def _hkdf(info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(SECRET)


def test_constants() -> None:
    assert XATTR_KEY_INFO == b"kmsfs/v1/xattrs"
    assert (NONCE_SIZE, TAG_SIZE, XATTR_NAME_MAX) == (12, 16, 255)


def test_matches_an_independent_implementation_of_format_md() -> None:
    siv = AESSIV(_hkdf(b"kmsfs/v1/xattrs/aes-siv", 64))
    want = b"user." + b64url_encode(siv.encrypt(b"color", [b"kmsfs/v1/xattr"])).encode()
    assert CIPHER.disk_name(b"user.color") == want == GOLDEN_NAME
    gcm = AESGCM(_hkdf(b"kmsfs/v1/xattrs/aes-256-gcm", 32))
    nonce = bytes(range(12))
    sealed = CIPHER._seal_with_nonce(want, b"blue", nonce)
    assert sealed == nonce + gcm.encrypt(nonce, b"blue", want)
    assert CIPHER.open(GOLDEN_NAME, GOLDEN_VALUE) == b"blue"


@QUICK
@given(name=user_names, value=st.binary(max_size=300))
def test_round_trip(name: bytes, value: bytes) -> None:
    try:
        disk = CIPHER.disk_name(name)
    except XattrNameError as exc:
        assert exc.too_long
        return
    assert disk.startswith(b"user.") and len(disk) <= XATTR_NAME_MAX
    assert CIPHER.plain_name(disk) == name
    stored = CIPHER.seal(disk, value)
    assert len(stored) == NONCE_SIZE + len(value) + TAG_SIZE
    assert CIPHER.open(disk, stored) == value


def test_names_are_deterministic_and_keyed() -> None:
    assert CIPHER.disk_name(b"user.a") == XattrCipher(SECRET).disk_name(b"user.a")
    assert CIPHER.disk_name(b"user.a") != CIPHER.disk_name(b"user.b")
    assert CIPHER.disk_name(b"user.a") != XattrCipher(bytes(32)).disk_name(b"user.a")


def test_values_are_randomized() -> None:
    disk = CIPHER.disk_name(b"user.a")
    assert CIPHER.seal(disk, b"v") != CIPHER.seal(disk, b"v")


@pytest.mark.parametrize("name", [b"trusted.x", b"security.selinux", b"system.posix_acl", b"user."])
def test_other_namespaces_are_refused(name: bytes) -> None:
    with pytest.raises(XattrNameError) as info:
        CIPHER.disk_name(name)
    assert not info.value.too_long


def test_long_names() -> None:
    with pytest.raises(XattrNameError) as info:
        CIPHER.disk_name(b"user." + b"n" * 251)
    assert info.value.too_long
    longest = max(n for n in range(1, 251) if len(b64url_encode(bytes(16 + n))) <= 250)
    name = b"user." + b"n" * longest
    assert CIPHER.plain_name(CIPHER.disk_name(name)) == name
    with pytest.raises(XattrNameError) as info:
        CIPHER.disk_name(b"user." + b"n" * (longest + 1))
    assert info.value.too_long


def test_tampering_is_detected() -> None:
    disk = CIPHER.disk_name(b"user.a")
    stored = CIPHER.seal(disk, b"value")
    for i in (0, NONCE_SIZE, len(stored) - 1):
        bad = bytearray(stored)
        bad[i] ^= 1
        with pytest.raises(IntegrityError):
            CIPHER.open(disk, bytes(bad))
    with pytest.raises(IntegrityError):
        CIPHER.open(disk, stored[:-1])
    with pytest.raises(IntegrityError):
        CIPHER.open(disk, stored[: NONCE_SIZE + TAG_SIZE - 1])
    with pytest.raises(IntegrityError):  # a value moved under another name
        CIPHER.open(CIPHER.disk_name(b"user.b"), stored)
    with pytest.raises(IntegrityError):  # another volume's key
        XattrCipher(bytes(32)).open(disk, stored)


@pytest.mark.parametrize(
    "disk", [b"user.plain", b"user.!!", b"user.", b"trusted.abc", b"user." + b"A" * 40]
)
def test_foreign_names_are_not_ours(disk: bytes) -> None:
    with pytest.raises(IntegrityError):
        CIPHER.plain_name(disk)


def respelled(disk: bytes) -> bytes:
    """*disk* with a spare bit of its last character set: the same bytes under lenient
    base64url decoding, not the one spelling kmsfs writes (its length must leave spare bits)."""
    last = URLSAFE_ALPHABET.index(disk[-1:])
    return disk[:-1] + URLSAFE_ALPHABET[last ^ 1 : (last ^ 1) + 1]


def test_an_own_name_damaged_in_place_is_hidden_and_flagged_as_maybe_ours() -> None:
    """A character changed into a spelling that is not canonical base64url, or dropped: it
    was taken for another program's attribute without a word (review). Calling such names
    damage made other programs' base64url-looking names damage too (a log line at every
    listing, fsck failing: review of that fix), so they stay foreign, flagged as maybe ours
    for fsck's warning. A changed character that still spells canonically is damage."""
    disk = CIPHER.disk_name(b"user.sixchr")
    assert len(disk) - len(b"user.") == 30  # 22 bytes: 4 spare bits in the last character
    for damaged in (respelled(disk), disk[:-1]):
        with pytest.raises(ForeignXattrName) as caught:
            CIPHER.plain_name(damaged)
        assert caught.value.maybe_ours, damaged
    with pytest.raises(IntegrityError) as caught:
        CIPHER.plain_name(disk[:-2] + b"AA")  # "A" has no spare bits: canonical, fails SIV
    assert not isinstance(caught.value, ForeignXattrName)
    for foreign, maybe in ((b"user.plain", False), (b"user.Tags", False),
                           (b"user.com.dropbox.attrs", False), (b"user." + b"A" * 22, False),
                           (b"user." + b"A" * 30 + b"=", False), (b"trusted.abc", False),
                           (b"user.sha256_checksum_of_file", True)):
        with pytest.raises(ForeignXattrName) as caught:
            CIPHER.plain_name(foreign)
        assert caught.value.maybe_ours == maybe, foreign


def test_bad_secret_length() -> None:
    with pytest.raises(ValueError, match="want 32 bytes, have 16"):
        XattrCipher(bytes(16))


# --- long names (LongXattrNames) ----------------------------------------------------------------
LONG = b"user." + b"L" * 200  # 200 bytes after user.: over 255 once encrypted
OTHER_LONG = b"user." + b"M" * 230


def _long_pair(c: XattrCipher, name: bytes, value: bytes) -> tuple[bytes, bytes]:
    disk = c.disk_name(name, long_names=True)
    return disk, c.seal(disk, value, name)


def test_a_long_name_gets_a_hashed_disk_name_and_round_trips() -> None:
    c = XattrCipher(SECRET)
    disk, stored = _long_pair(c, LONG, b"value")
    assert disk.startswith(LONG_NAME_PREFIX) and len(disk) == 50
    assert c.disk_name(LONG, long_names=True) == disk  # deterministic: a lookup needs no list
    assert c.open(disk, stored) == b"value"
    assert c.plain_name(disk, stored) == LONG
    with pytest.raises(IntegrityError):
        c.plain_name(disk)  # its name is in its value


def test_without_the_flag_a_long_name_is_too_long_and_short_names_do_not_change() -> None:
    c = XattrCipher(SECRET)
    with pytest.raises(XattrNameError) as info:
        c.disk_name(LONG)
    assert info.value.too_long
    for n in (1, 100, 171):
        name = b"user." + b"s" * n
        assert c.disk_name(name, long_names=True) == c.disk_name(name)
        assert not c.disk_name(name).startswith(LONG_NAME_PREFIX)


def test_a_long_names_value_moved_or_altered_is_refused() -> None:
    c = XattrCipher(SECRET)
    disk, stored = _long_pair(c, LONG, b"value")
    other_disk, other_stored = _long_pair(c, OTHER_LONG, b"other")
    with pytest.raises(IntegrityError):
        c.open(other_disk, stored)  # its sealed name does not hash to the other disk name
    with pytest.raises(IntegrityError):
        c.plain_name(other_disk, stored)
    size = 2 + int.from_bytes(stored[:2], "big")
    spliced = stored[:size] + other_stored[2 + int.from_bytes(other_stored[:2], "big") :]
    with pytest.raises(IntegrityError):
        c.open(disk, spliced)  # the right name in front of another name's value
    for cut in (1, 2, 40, size):
        with pytest.raises(IntegrityError):
            c.open(disk, stored[:cut])
    flipped = bytearray(stored)
    flipped[5] ^= 1  # inside the sealed name
    with pytest.raises(IntegrityError):
        c.plain_name(disk, bytes(flipped))


def test_sealing_a_long_name_needs_the_matching_name() -> None:
    c = XattrCipher(SECRET)
    disk = c.disk_name(LONG, long_names=True)
    with pytest.raises(ValueError):
        c.seal(disk, b"v")
    with pytest.raises(ValueError):
        c.seal(disk, b"v", OTHER_LONG)


def test_the_long_name_format_does_not_move() -> None:
    """Known answer for SECRET (written by the first build with LongXattrNames): 2-byte length,
    the 216-byte sealed name, then the 12-byte nonce and the sealed 4-byte value."""
    disk = CIPHER.disk_name(LONG, long_names=True)
    assert disk == b"user.l.4y8k-4NdRfaM6YTsCsO9y4TXwoBCcvXfruqdxHwGcnQ"
    stored = CIPHER._seal_with_nonce(disk, b"blue", bytes(12), LONG)
    assert len(stored) == 2 + 216 + 12 + 4 + 16
    assert hashlib.sha256(stored).hexdigest() == (
        "9919d82682ef359d9bfcd974171e687d3221f188c968780c213c5d82e5eec1cc"
    )


def test_a_long_entry_for_a_name_that_has_a_short_one_is_refused() -> None:
    """Forged from a short name's sealed bytes, it would list that name twice."""
    c = XattrCipher(SECRET)
    short_disk = c.disk_name(b"user.a")
    sealed = b64url_decode(short_disk[len(b"user.") :].decode())
    forged_disk = b"user.l." + sha256_b64url(b64url_encode(sealed)).encode()
    forged = len(sealed).to_bytes(2, "big") + sealed + bytes(28)
    with pytest.raises(IntegrityError):
        c.plain_name(forged_disk, forged)


# --- known-answer vectors (crypto_v2.json, independent of kmsfs code) ----------------------------


def test_known_answer_key_derivation() -> None:
    v = VECTORS
    assert XATTR_KEY_INFO.hex() == v["key_info"]
    assert XATTR_SIV_INFO.hex() == v["name_key_hkdf_info"]
    assert XATTR_GCM_INFO.hex() == v["value_key_hkdf_info"]
    assert XATTR_NAME_AD.hex() == v["name_ad"]
    secret = bytes.fromhex(v["xattr_secret"])
    assert xattrs._hkdf(secret, XATTR_SIV_INFO, 64).hex() == v["name_key"]
    assert xattrs._hkdf(secret, XATTR_GCM_INFO, 32).hex() == v["value_key"]


@pytest.mark.parametrize(
    "case", VECTORS["names"], ids=lambda c: f"{len(bytes.fromhex(c['name'])) - 5}-bytes"
)
def test_known_answer_names(case: dict) -> None:
    name, disk = bytes.fromhex(case["name"]), case["disk"].encode()
    assert V_CIPHER.disk_name(name, long_names=True) == disk
    sealed = bytes.fromhex(case["sealed"])
    if case["long"]:
        assert disk.startswith(LONG_NAME_PREFIX) and len(disk) == 50
        with pytest.raises(XattrNameError) as info:
            V_CIPHER.disk_name(name)  # without LongXattrNames
        assert info.value.too_long
        # the stored value starts with the sealed name, from which a listing reads the name
        stored = V_CIPHER._seal_with_nonce(disk, b"", bytes.fromhex(VECTORS["nonce"]), name)
        assert stored[:2 + len(sealed)] == len(sealed).to_bytes(2, "big") + sealed
        assert V_CIPHER.plain_name(disk, stored) == name
    else:
        assert V_CIPHER.disk_name(name) == disk == b"user." + b64url_encode(sealed).encode()
        assert V_CIPHER.plain_name(disk) == name


@pytest.mark.parametrize(
    "case",
    VECTORS["values"],
    ids=lambda c: f"{len(c['disk'])}-byte-disk-name-{len(c['value']) // 2}-byte-value",
)
def test_known_answer_values(case: dict) -> None:
    name, disk = bytes.fromhex(case["name"]), case["disk"].encode()
    value, stored = bytes.fromhex(case["value"]), bytes.fromhex(case["stored"])
    nonce = bytes.fromhex(VECTORS["nonce"])
    assert V_CIPHER._seal_with_nonce(disk, value, nonce, name) == stored
    assert V_CIPHER.open(disk, stored) == value
    if xattrs.is_long_disk_name(disk):
        assert V_CIPHER.plain_name(disk, stored) == name
    else:
        assert len(stored) == NONCE_SIZE + len(value) + TAG_SIZE
