"""Name encryption, directory IVs and long names (kmsfs/crypto/names.py)."""

import base64
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.crypto.encoding import b64url_decode, b64url_encode, sha256_b64url
from kmsfs.crypto.names import (
    DIRIV_NAME,
    DIRIV_SIZE,
    LONGNAME_PREFIX,
    LONGNAME_SUFFIX,
    LONGNAME_THRESHOLD,
    MAX_NAME_BYTES,
    NAMES_KEY_INFO,
    DiskName,
    NameCipher,
    VolumeNames,
    epoch_of,
    is_internal,
    is_longname,
    is_sidecar,
    is_valid_name,
    iv_of,
    new_dir_iv,
    parse_dir_iv,
    with_epoch,
)
from kmsfs.errors import FormatError, IntegrityError

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "crypto_v1.json").read_text())
QUICK = settings(database=None, deadline=None, max_examples=60)
SECRET = bytes(range(100, 132))
NAMES = NameCipher(SECRET)
DIR_A, DIR_B = new_dir_iv(1), new_dir_iv(1)

valid_names = st.binary(min_size=1, max_size=MAX_NAME_BYTES).filter(is_valid_name)


def no_sidecar() -> str:
    raise AssertionError("read_sidecar must not be called for a short name")


def disk_round_trip(dir_iv: bytes, name: bytes) -> bytes:
    disk = NAMES.encrypt_to_disk(dir_iv, name)
    reader = no_sidecar if disk.long_content is None else lambda: disk.long_content
    return NAMES.decrypt_from_disk(dir_iv, disk.name, reader)


def test_constants() -> None:
    assert (DIRIV_NAME, DIRIV_SIZE, MAX_NAME_BYTES) == ("kmsfs.diriv", 16, 255)
    assert NAMES_KEY_INFO == b"kmsfs/v1/names"
    assert len(LONGNAME_PREFIX) + 43 + len(LONGNAME_SUFFIX) <= 255


@QUICK
@given(name=valid_names)
def test_round_trip(name: bytes) -> None:
    assert NAMES.decrypt(DIR_A, NAMES.encrypt(DIR_A, name)) == name
    assert disk_round_trip(DIR_A, name) == name


@QUICK
@given(name=valid_names)
def test_disk_names_are_short_enough_and_never_internal(name: bytes) -> None:
    disk = NAMES.encrypt_to_disk(DIR_A, name)
    assert len(disk.name.encode()) <= LONGNAME_THRESHOLD
    assert not is_internal(disk.name)
    if disk.sidecar is not None:
        assert is_sidecar(disk.sidecar) and is_internal(disk.sidecar)
        assert len(disk.sidecar) <= 255


def test_deterministic_within_a_directory() -> None:
    assert NAMES.encrypt(DIR_A, b"file.txt") == NAMES.encrypt(DIR_A, b"file.txt")
    assert NameCipher(SECRET).encrypt_to_disk(DIR_A, b"x" * 200) == NAMES.encrypt_to_disk(
        DIR_A, b"x" * 200
    )


def test_same_name_differs_between_directories() -> None:
    assert NAMES.encrypt(DIR_A, b"file.txt") != NAMES.encrypt(DIR_B, b"file.txt")
    assert NAMES.encrypt_to_disk(DIR_A, b"L" * 255) != NAMES.encrypt_to_disk(DIR_B, b"L" * 255)


def test_different_names_and_keys_differ() -> None:
    assert NAMES.encrypt(DIR_A, b"a") != NAMES.encrypt(DIR_A, b"b")
    assert NameCipher(bytes(32)).encrypt(DIR_A, b"a") != NAMES.encrypt(DIR_A, b"a")


def test_name_moved_to_another_directory_does_not_decrypt() -> None:
    encoded = NAMES.encrypt(DIR_A, b"secret-plans.odt")
    with pytest.raises(IntegrityError, match="authentication failed"):
        NAMES.decrypt(DIR_B, encoded)
    long = NAMES.encrypt_to_disk(DIR_A, b"p" * 255)
    with pytest.raises(IntegrityError):
        NAMES.decrypt_from_disk(DIR_B, long.name, lambda: long.long_content)


def test_name_of_another_volume_does_not_decrypt() -> None:
    with pytest.raises(IntegrityError):
        NameCipher(bytes(32)).decrypt(DIR_A, NAMES.encrypt(DIR_A, b"a"))


@QUICK
@given(name=st.binary(min_size=1, max_size=40).filter(is_valid_name), data=st.data())
def test_any_tampered_character_is_detected(name: bytes, data: st.DataObject) -> None:
    encoded = NAMES.encrypt(DIR_A, name)
    i = data.draw(st.integers(0, len(encoded) - 1))
    replacement = data.draw(st.sampled_from("AgQw-_09z").filter(lambda ch: ch != encoded[i]))
    tampered = encoded[:i] + replacement + encoded[i + 1 :]
    with pytest.raises(IntegrityError):
        NAMES.decrypt(DIR_A, tampered)


@pytest.mark.parametrize(
    "encoded", ["", "A", "AAAA", "not base64!", "abc=", "a.b", "ab+/", "kmsfs.diriv"]
)
def test_garbage_is_an_integrity_error(encoded: str) -> None:
    with pytest.raises(IntegrityError):
        NAMES.decrypt(DIR_A, encoded)


def test_non_canonical_base64_is_rejected() -> None:
    encoded = NAMES.encrypt(DIR_A, b"abc")  # 19 bytes: the last character carries 4 spare bits
    data = b64url_decode(encoded)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(encoded[-1])
    twin = encoded[:-1] + alphabet[last | 1]
    assert twin != encoded
    with pytest.raises(ValueError):
        b64url_decode(twin)
    with pytest.raises(IntegrityError, match="base64"):
        NAMES.decrypt(DIR_A, twin)
    with pytest.raises(IntegrityError):
        NAMES.decrypt(DIR_A, encoded + "==")
    assert b64url_encode(data) == encoded


@pytest.mark.parametrize("bad", [b"", b".", b"..", b"a/b", b"a\x00b", b"x" * 256])
def test_invalid_names_are_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        NAMES.encrypt(DIR_A, bad)


@pytest.mark.parametrize("bad", [b".", b"..", b"a/b", b"a\x00b", b"x" * 256])
def test_encrypted_invalid_names_are_integrity_errors(bad: bytes) -> None:
    # Whoever holds the key could encrypt these; decrypt must still refuse to return them.
    encoded = b64url_encode(NAMES._siv.encrypt(bad, [DIR_A]))
    with pytest.raises(IntegrityError, match="invalid file name"):
        NAMES.decrypt(DIR_A, encoded)


def test_dir_iv_helpers() -> None:
    assert len(new_dir_iv(1)) == DIRIV_SIZE and new_dir_iv(1) != new_dir_iv(1)
    assert parse_dir_iv(DIR_A) == DIR_A
    with pytest.raises(FormatError, match="want 16 or 18 bytes, have 15"):
        parse_dir_iv(DIR_A[:15])
    with pytest.raises(FormatError, match="all zero"):
        parse_dir_iv(bytes(16))
    with pytest.raises(FormatError):
        NAMES.encrypt(b"short", b"a")
    with pytest.raises(FormatError):
        NAMES.decrypt(b"short", "AAAA")


def test_bad_secret_length_is_refused() -> None:
    with pytest.raises(ValueError):
        NameCipher(bytes(64))


# Long names


def test_threshold_boundary() -> None:
    short = NAMES.encrypt_to_disk(DIR_A, b"n" * 115)
    assert short.long_content is None and len(short.name) == LONGNAME_THRESHOLD
    assert short.sidecar is None
    long = NAMES.encrypt_to_disk(DIR_A, b"n" * 116)
    assert long.long_content is not None and len(long.long_content) == LONGNAME_THRESHOLD + 1


def test_255_byte_name_round_trips_through_a_long_name() -> None:
    name = "é".encode() * 127 + b"z"
    assert len(name) == 255
    disk = NAMES.encrypt_to_disk(DIR_A, name)
    assert is_longname(disk.name) and not is_sidecar(disk.name)
    assert disk.name == LONGNAME_PREFIX + sha256_b64url(disk.long_content)
    assert len(disk.name.encode()) <= 255 and len(disk.sidecar.encode()) <= 255
    assert disk.sidecar == disk.name + LONGNAME_SUFFIX
    assert disk_round_trip(DIR_A, name) == name


def test_sidecar_that_does_not_match_its_hash_is_rejected() -> None:
    a = NAMES.encrypt_to_disk(DIR_A, b"a" * 200)
    b = NAMES.encrypt_to_disk(DIR_A, b"b" * 200)
    for wrong in [b.long_content, a.long_content + "A", a.long_content[:-1], "", "é" * 200]:
        with pytest.raises(IntegrityError, match="sidecar does not match"):
            NAMES.decrypt_from_disk(DIR_A, a.name, lambda w=wrong: w)


def test_short_name_dressed_as_long_name_is_rejected() -> None:
    # A valid short encoding behind a long-name entry would list one name twice.
    encoded = NAMES.encrypt(DIR_A, b"short")
    disk_name = LONGNAME_PREFIX + sha256_b64url(encoded)
    with pytest.raises(IntegrityError, match="holds a short name"):
        NAMES.decrypt_from_disk(DIR_A, disk_name, lambda: encoded)


def test_long_encoding_stored_as_short_entry_is_rejected() -> None:
    disk = NAMES.encrypt_to_disk(DIR_A, b"q" * 200)
    with pytest.raises(IntegrityError, match="too long"):
        NAMES.decrypt_from_disk(DIR_A, disk.long_content, no_sidecar)


def test_sidecar_read_errors_propagate() -> None:
    disk = NAMES.encrypt_to_disk(DIR_A, b"q" * 200)

    def missing() -> str:
        raise FileNotFoundError(disk.sidecar)

    with pytest.raises(FileNotFoundError):
        NAMES.decrypt_from_disk(DIR_A, disk.name, missing)


def test_classification_of_disk_names() -> None:
    h = "A" * 43
    assert is_longname(LONGNAME_PREFIX + h)
    assert not is_longname(LONGNAME_PREFIX + h + LONGNAME_SUFFIX)
    assert not is_longname(LONGNAME_PREFIX + h[:-1])
    assert is_sidecar(LONGNAME_PREFIX + h + LONGNAME_SUFFIX)
    assert not is_sidecar(LONGNAME_PREFIX + "x" + LONGNAME_SUFFIX)
    assert is_internal(DIRIV_NAME)
    assert is_internal(LONGNAME_PREFIX + h + LONGNAME_SUFFIX)
    assert is_internal("kmsfs.conf") and is_internal("kmsfs.tmp.123")
    assert not is_internal(LONGNAME_PREFIX + h)
    assert not is_internal(NAMES.encrypt(DIR_A, b"kmsfs.diriv"))


def test_known_answer_vectors() -> None:
    v = VECTORS["names"]
    names = NameCipher(bytes.fromhex(v["names_secret"]))
    dir_iv = bytes.fromhex(v["dir_iv"])
    for case in v["names"]:
        name = bytes.fromhex(case["name"])
        assert names.encrypt(dir_iv, name) == case["encoded"]
        assert names.encrypt_to_disk(dir_iv, name) == DiskName(case["disk"], case["long_content"])
        assert names.decrypt_from_disk(dir_iv, case["disk"], lambda c=case: c["long_content"]) == (
            name
        )


def _reference_b64url_decode(text: str) -> bytes:
    """The obvious canonical decoder (decode, then insist re-encoding gives the same text)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise ValueError("not canonical")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("not canonical")
    return data


_B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/= \n.é\x00"


@settings(max_examples=3000, deadline=None)
@given(st.one_of(
    st.binary(max_size=40).map(b64url_encode),  # canonical texts
    st.binary(max_size=40).map(b64url_encode).flatmap(  # one character changed
        lambda t: st.tuples(st.integers(0, max(len(t) - 1, 0)), st.sampled_from(_B64_CHARS)).map(
            lambda ic: t[: ic[0]] + ic[1] + t[ic[0] + 1 :]
        )
    ),
    st.text(alphabet=_B64_CHARS, max_size=12),  # anything
))
def test_b64url_decode_is_the_canonical_decoder(text: str) -> None:
    try:
        want: bytes | None = _reference_b64url_decode(text)
    except ValueError:
        want = None
    if want is None:
        with pytest.raises(ValueError):
            b64url_decode(text)
    else:
        assert b64url_decode(text) == want


# Key epochs: a directory's IV names the mk epoch of its names' key


def test_a_directory_iv_names_the_epoch_of_its_names() -> None:
    first, later = new_dir_iv(1), new_dir_iv(3)
    assert len(first) == DIRIV_SIZE and epoch_of(first) == 1 and iv_of(first) == first
    assert len(later) == DIRIV_SIZE + 2 and later[:2] == b"\x00\x03" and epoch_of(later) == 3
    assert parse_dir_iv(later) == later and iv_of(later) == later[2:]
    moved = with_epoch(first, 2)  # what kmsfs reencrypt writes: the same IV, another epoch
    assert epoch_of(moved) == 2 and iv_of(moved) == first and with_epoch(moved, 1) == first
    for bad in (b"\x00\x01" + first, b"\x00\x00" + first, later[:17], b"\x00\x02" + bytes(16)):
        with pytest.raises(FormatError):
            parse_dir_iv(bad)  # one form per epoch; no epoch 0; no all-zero IV
    for epoch in (0, 65536):
        with pytest.raises(ValueError):
            new_dir_iv(epoch)


def test_each_directory_s_names_are_keyed_with_its_own_epoch() -> None:
    asked: list[int] = []

    def secret_of(epoch: int) -> bytes:
        asked.append(epoch)
        if epoch > 2:
            raise IntegrityError(f"Domain test has no key epoch {epoch}")
        return bytes([epoch]) * 32

    names = VolumeNames(secret_of)
    iv = new_dir_iv(1)
    at_2 = with_epoch(iv, 2)
    first = NameCipher(bytes([1]) * 32)
    assert names.encrypt(iv, b"report.pdf") == first.encrypt(iv, b"report.pdf")
    moved = names.encrypt(at_2, b"report.pdf")
    assert moved != names.encrypt(iv, b"report.pdf")  # same IV, another key
    assert names.decrypt(at_2, moved) == b"report.pdf"
    with pytest.raises(IntegrityError):
        names.decrypt(iv, moved)  # epoch 1's key does not open an epoch-2 name
    long = names.encrypt_to_disk(at_2, b"L" * 200)
    assert names.decrypt_from_disk(at_2, long.name, lambda: str(long.long_content)) == b"L" * 200
    assert asked == [1, 2]  # each epoch's secret asked for once
    with pytest.raises(IntegrityError, match="no key epoch 3"):
        names.encrypt(with_epoch(iv, 3), b"x")  # an epoch the Domain lacks
    with pytest.raises(ValueError, match="another key"):
        NameCipher(bytes(32)).encrypt(at_2, b"x")  # a cipher never guesses another epoch


def test_a_second_entry_s_name_is_shortened_at_a_character_boundary() -> None:
    """kmsfs reencrypt names a second entry of one name NAME.kmsfs-conflict-N (255 bytes at
    most): a UTF-8 name is cut between characters, never inside one."""
    from kmsfs.fs.reencrypt_names import _shortened

    assert _shortened(b"short", 10) == b"short"
    name = "é".encode() * 127 + b"x"  # 255 bytes
    assert _shortened(name, 240) == "é".encode() * 120
    assert _shortened(b"\xff" * 255, 240) == b"\xff" * 240  # not UTF-8: cut by bytes
