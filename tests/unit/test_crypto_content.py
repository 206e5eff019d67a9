"""Content format: header, blocks, AAD binding and size arithmetic (kmsfs/crypto/content.py)."""

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.crypto.content import (
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    CIPHER_BLOCK_SIZE,
    FILE_ID_SIZE,
    FILE_KEY_INFO_PREFIX,
    FORMAT_VERSION,
    HEADER_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    VERSION_1,
    VERSION_2,
    ContentCipher,
    FileHeader,
    block_range,
    cipher_offset,
    cipher_size,
    file_key_info,
    plain_size,
    plain_size_lenient,
)
from kmsfs.errors import BadVersionError, FormatError, IntegrityError

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "crypto_v1.json").read_text())
VECTORS_V2 = json.loads((Path(__file__).parents[1] / "vectors" / "crypto_v2.json").read_text())
QUICK = settings(database=None, deadline=None, max_examples=60)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def cipher(header: FileHeader | None = None, key: bytes = KEY) -> ContentCipher:
    return ContentCipher(key, header or FileHeader.new())


def test_constants_match_the_documented_format() -> None:
    assert (FORMAT_VERSION, FILE_ID_SIZE, HEADER_SIZE) == (2, 16, 18)
    assert (BLOCK_SIZE, NONCE_SIZE, TAG_SIZE) == (4096, 12, 16)
    assert (BLOCK_OVERHEAD, CIPHER_BLOCK_SIZE) == (28, 4124)


# Header


def test_header_round_trips_and_is_random() -> None:
    header = FileHeader.new(version=VERSION_1)
    packed = header.pack()
    assert len(packed) == HEADER_SIZE
    assert packed[:2] == b"\x00\x01"
    assert header.epoch == 1
    assert FileHeader.parse(packed) == header
    assert FileHeader.new().file_id != header.file_id


@pytest.mark.parametrize("size", [0, 1, 17, 19, 4096])
def test_header_parse_rejects_wrong_length(size: int) -> None:
    with pytest.raises(FormatError, match=f"want 18 bytes, have {size}"):
        FileHeader.parse(b"\x00\x01" + b"\x07" * (size - 2) if size >= 2 else bytes(size))


@pytest.mark.parametrize("version", [0, 3, 0xFFFF])
def test_header_parse_rejects_unknown_version(version: int) -> None:
    with pytest.raises(BadVersionError, match=f"want version 1 or 2, have {version}"):
        FileHeader.parse(version.to_bytes(2, "big") + b"\x07" * 16)


def test_header_parse_rejects_all_zero_file_id() -> None:
    with pytest.raises(FormatError, match="all zero"):
        FileHeader.parse(b"\x00\x01" + bytes(16))
    with pytest.raises(FormatError):
        FileHeader.parse(bytes(18))


# Header version 2: the key epoch (docs/format.md, "Key epochs")


@pytest.mark.parametrize("epoch", [1, 2, 0x0102, 65535])
def test_header_v2_carries_its_epoch_in_the_file_id(epoch: int) -> None:
    header = FileHeader.new(epoch)
    packed = header.pack()
    assert len(packed) == HEADER_SIZE == 18
    assert packed[:2] == b"\x00\x02"
    assert packed[2:4] == epoch.to_bytes(2, "big") == header.file_id[:2]
    assert header.version == VERSION_2 and header.epoch == epoch
    parsed = FileHeader.parse(packed)
    assert parsed == header and parsed.epoch == epoch
    assert file_key_info(header.file_id) == FILE_KEY_INFO_PREFIX + packed[2:]
    assert FileHeader.new(epoch).file_id != header.file_id


def test_header_v1_still_parses_with_epoch_1() -> None:
    v1 = FileHeader.parse(b"\x00\x01" + bytes(range(1, 17)))
    assert (v1.version, v1.epoch, v1.file_id) == (VERSION_1, 1, bytes(range(1, 17)))
    # A v1 file id may start with any bytes; only the version decides how it is read.
    assert FileHeader.parse(b"\x00\x01\x00\x07" + bytes(range(1, 15))).epoch == 1


def test_header_v2_refuses_epoch_0_and_zero_random_part() -> None:
    with pytest.raises(FormatError, match="epoch 0"):
        FileHeader.parse(b"\x00\x02\x00\x00" + bytes(range(1, 15)))
    with pytest.raises(FormatError, match="random part"):
        FileHeader.parse(b"\x00\x02\x00\x01" + bytes(14))
    for bad in (0, 65536, -1):
        with pytest.raises(ValueError):
            FileHeader.new(bad)
    with pytest.raises(ValueError, match="version 1 header has key epoch 1"):
        FileHeader.new(2, version=VERSION_1)
    assert FileHeader.new(1, version=VERSION_1).pack()[:2] == b"\x00\x01"


def test_tampered_epoch_fails_authentication() -> None:
    """The epoch is in every block's AAD (and in the key info): changing it is never silent."""
    header = FileHeader.new(2)
    c = cipher(header)
    block = c.encrypt_block(0, b"secret data")
    for other in (1, 3, 0x0102):
        forged = FileHeader.parse(b"\x00\x02" + other.to_bytes(2, "big") + header.file_id[2:])
        with pytest.raises(IntegrityError):
            cipher(forged).decrypt_block(0, block)  # even under the very same key
    # the same 16 bytes read as a version 1 header: another AAD, fails too
    with pytest.raises(IntegrityError):
        cipher(FileHeader(VERSION_1, header.file_id)).decrypt_block(0, block)
    assert cipher(FileHeader.parse(header.pack())).decrypt_block(0, block) == b"secret data"


def test_file_key_info_is_prefix_and_file_id() -> None:
    file_id = bytes(range(16))
    assert FILE_KEY_INFO_PREFIX == b"kmsfs/v1/file-key\x00"
    assert file_key_info(file_id) == FILE_KEY_INFO_PREFIX + file_id
    with pytest.raises(FormatError):
        file_key_info(bytes(15))


# Blocks: round trips


@QUICK
@given(
    block_no=st.integers(0, 2**64 - 1),
    plaintext=st.binary(min_size=1, max_size=BLOCK_SIZE),
)
def test_block_round_trip(block_no: int, plaintext: bytes) -> None:
    c = cipher()
    block = c.encrypt_block(block_no, plaintext)
    assert len(block) == len(plaintext) + BLOCK_OVERHEAD
    assert c.decrypt_block(block_no, block) == plaintext
    # A second cipher from the same key and parsed header decrypts it too.
    assert cipher(FileHeader.parse(c.header.pack())).decrypt_block(block_no, block) == plaintext


def test_same_block_encrypts_differently_each_time() -> None:
    c = cipher()
    blocks = {c.encrypt_block(0, b"same plaintext") for _ in range(50)}
    assert len(blocks) == 50
    assert len({b[:NONCE_SIZE] for b in blocks}) == 50


@pytest.mark.parametrize("size", [0, BLOCK_SIZE + 1])
def test_encrypt_rejects_bad_plaintext_size(size: int) -> None:
    with pytest.raises(ValueError):
        cipher().encrypt_block(0, bytes(size))


def test_bad_key_length_and_block_number_are_rejected() -> None:
    with pytest.raises(ValueError):
        ContentCipher(bytes(16), FileHeader.new())
    with pytest.raises(ValueError):
        cipher().encrypt_block(-1, b"x")
    with pytest.raises(ValueError):
        cipher().encrypt_block(2**64, b"x")


# Blocks: adversarial


@QUICK
@given(plaintext=st.binary(min_size=1, max_size=300), data=st.data())
def test_any_flipped_bit_is_detected(plaintext: bytes, data: st.DataObject) -> None:
    c = cipher()
    block = bytearray(c.encrypt_block(3, plaintext))
    bit = data.draw(st.integers(0, len(block) * 8 - 1))
    block[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError, match="content block 3"):
        c.decrypt_block(3, bytes(block))


def test_every_flipped_byte_of_a_full_block_is_detected() -> None:
    c = cipher()
    block = c.encrypt_block(0, bytes(BLOCK_SIZE))
    for i in range(0, CIPHER_BLOCK_SIZE, 7):
        tampered = bytearray(block)
        tampered[i] ^= 0x80
        with pytest.raises(IntegrityError):
            c.decrypt_block(0, bytes(tampered))


@pytest.mark.parametrize("moved_to", [1, 2, 255, 256, 2**32, 2**63])
def test_block_moved_to_another_position_is_detected(moved_to: int) -> None:
    c = cipher()
    block = c.encrypt_block(0, b"block zero")
    with pytest.raises(IntegrityError, match=f"content block {moved_to}"):
        c.decrypt_block(moved_to, block)


def test_swapped_blocks_are_detected() -> None:
    c = cipher()
    b0, b1 = c.encrypt_block(0, b"A" * BLOCK_SIZE), c.encrypt_block(1, b"B" * BLOCK_SIZE)
    for block_no, block in [(0, b1), (1, b0)]:
        with pytest.raises(IntegrityError):
            c.decrypt_block(block_no, block)


def test_block_from_another_file_with_the_same_key_is_detected() -> None:
    a, b = cipher(), cipher()
    assert a.header.file_id != b.header.file_id
    with pytest.raises(IntegrityError):
        b.decrypt_block(0, a.encrypt_block(0, b"file a"))


def test_block_with_another_key_is_detected() -> None:
    header = FileHeader.new()
    with pytest.raises(IntegrityError):
        cipher(header, OTHER_KEY).decrypt_block(0, cipher(header).encrypt_block(0, b"x"))


def test_truncated_or_extended_block_is_detected() -> None:
    c = cipher()
    block = c.encrypt_block(5, b"y" * 100)
    for cut in [0, 1, NONCE_SIZE, BLOCK_OVERHEAD, BLOCK_OVERHEAD + 1, len(block) - 1]:
        with pytest.raises(IntegrityError, match="content block 5"):
            c.decrypt_block(5, block[:cut])
    with pytest.raises(IntegrityError):
        c.decrypt_block(5, block + b"\x00")
    full = c.encrypt_block(5, bytes(BLOCK_SIZE))
    with pytest.raises(IntegrityError):
        c.decrypt_block(5, full + b"\x00")


@pytest.mark.parametrize("size", [BLOCK_OVERHEAD + 1, 100, CIPHER_BLOCK_SIZE])
def test_all_zero_block_is_not_a_hole(size: int) -> None:
    with pytest.raises(IntegrityError):
        cipher().decrypt_block(0, bytes(size))


def test_error_messages_hold_no_key_material() -> None:
    c = cipher()
    with pytest.raises(IntegrityError) as info:
        c.decrypt_block(0, bytes(100))
    assert KEY.hex() not in str(info.value)
    assert KEY.hex() not in repr(c)


def test_known_answer_vectors() -> None:
    v = VECTORS["content"]
    header = FileHeader.parse(bytes.fromhex(v["header"]))
    assert header == FileHeader(VERSION_1, bytes.fromhex(v["file_id"]))
    assert file_key_info(header.file_id).hex() == v["file_key_info"]
    c = ContentCipher(bytes.fromhex(v["file_key"]), header)
    for case in v["blocks"]:
        plaintext, block = bytes.fromhex(case["plaintext"]), bytes.fromhex(case["block"])
        encrypted = c._encrypt_block_with_nonce(
            case["block_no"], plaintext, bytes.fromhex(v["nonce"])
        )
        assert encrypted.hex() == case["block"]
        assert c.decrypt_block(case["block_no"], block) == plaintext


def test_known_answer_vectors_v2() -> None:
    """Version 2 header (epoch 2) and its blocks, from the independent generator."""
    v = VECTORS_V2["content"]
    header = FileHeader.parse(bytes.fromhex(v["header"]))
    assert header == FileHeader(VERSION_2, bytes.fromhex(v["file_id"]))
    assert header.epoch == v["epoch"] == 2
    assert header.pack().hex() == v["header"]
    assert file_key_info(header.file_id).hex() == v["file_key_info"]
    key, nonce = bytes.fromhex(v["file_key"]), bytes.fromhex(v["nonce"])
    c = ContentCipher(key, header)
    v1_reading = ContentCipher(key, FileHeader(VERSION_1, header.file_id))
    for case in v["blocks"]:
        plaintext, block = bytes.fromhex(case["plaintext"]), bytes.fromhex(case["block"])
        encrypted = c._encrypt_block_with_nonce(case["block_no"], plaintext, nonce)
        assert encrypted.hex() == case["block"]
        assert c.decrypt_block(case["block_no"], block) == plaintext
        assert c.decrypt_blocks(case["block_no"], block) == plaintext
        with pytest.raises(IntegrityError):  # the header version is in the AAD
            v1_reading.decrypt_block(case["block_no"], block)


# Sizes


def test_worked_sizes_from_format_md() -> None:
    assert cipher_size(0) == 0
    assert cipher_size(1) == 18 + 29 == 47
    assert cipher_size(4096) == 18 + 4124 == 4142
    assert cipher_size(4097) == 18 + 4124 + 29 == 4171
    assert cipher_size(10_000) == 18 + 2 * 4124 + (1808 + 28) == 10_102
    assert cipher_size(2**20) == 18 + 256 * 4124 == 1_055_762


def test_sizes_round_trip_for_every_small_size() -> None:
    previous = -1
    for p in range(3 * BLOCK_SIZE + 50):
        c = cipher_size(p)
        assert c > previous  # strictly increasing, so the inverse is unique
        previous = c
        assert plain_size(c) == p
        assert plain_size_lenient(c) == p


def test_plain_size_rejects_exactly_the_impossible_sizes() -> None:
    possible = {cipher_size(p) for p in range(3 * BLOCK_SIZE + 50)}
    for c in range(max(possible) + 1):
        if c in possible:
            assert cipher_size(plain_size(c)) == c
        else:
            with pytest.raises(FormatError):
                plain_size(c)


@pytest.mark.parametrize(
    "size",
    [1, 17, 18, 19, 18 + BLOCK_OVERHEAD, 18 + CIPHER_BLOCK_SIZE + 1, 18 + CIPHER_BLOCK_SIZE + 28],
)
def test_plain_size_rejects_header_only_and_fragments(size: int) -> None:
    with pytest.raises(FormatError, match=f"ciphertext size {size}"):
        plain_size(size)


def test_plain_size_lenient_gives_the_plausible_size_of_damaged_files() -> None:
    assert plain_size_lenient(0) == 0
    assert plain_size_lenient(5) == 0  # torn header
    assert plain_size_lenient(18) == 0  # header only
    assert plain_size_lenient(18 + 28) == 0  # fragment too short for a block
    assert plain_size_lenient(18 + CIPHER_BLOCK_SIZE + 10) == BLOCK_SIZE
    assert plain_size_lenient(-1) == 0


def test_random_large_sizes_round_trip() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        p = rng.randrange(2**50)
        assert plain_size(cipher_size(p)) == p
        assert plain_size_lenient(cipher_size(p)) == p
    for p in [2**63, 2**64 - 1]:
        assert plain_size(cipher_size(p)) == p


def test_negative_sizes_are_rejected() -> None:
    for f in (cipher_size, plain_size, cipher_offset):
        with pytest.raises(ValueError):
            f(-1)


def test_cipher_offset() -> None:
    assert cipher_offset(0) == HEADER_SIZE
    assert cipher_offset(3) == HEADER_SIZE + 3 * CIPHER_BLOCK_SIZE
    # The last block of a file starts at its offset and ends at the file's end.
    for p in [1, 4096, 4097, 12_345]:
        last = (p - 1) // BLOCK_SIZE
        assert cipher_offset(last) + (p - last * BLOCK_SIZE) + BLOCK_OVERHEAD == cipher_size(p)


def test_block_range() -> None:
    assert block_range(0, 0) == range(0)
    assert block_range(5000, 0) == range(0)
    assert block_range(0, 1) == range(0, 1)
    assert block_range(0, BLOCK_SIZE) == range(0, 1)
    assert block_range(0, BLOCK_SIZE + 1) == range(0, 2)
    assert block_range(BLOCK_SIZE - 1, 2) == range(0, 2)
    assert block_range(BLOCK_SIZE, BLOCK_SIZE) == range(1, 2)
    with pytest.raises(ValueError):
        block_range(-1, 1)


@QUICK
@given(offset=st.integers(0, 2**40), length=st.integers(1, 10 * BLOCK_SIZE))
def test_block_range_covers_exactly_the_touched_blocks(offset: int, length: int) -> None:
    blocks = block_range(offset, length)
    assert blocks.start * BLOCK_SIZE <= offset < (blocks.start + 1) * BLOCK_SIZE
    end = offset + length - 1
    assert (blocks.stop - 1) * BLOCK_SIZE <= end < blocks.stop * BLOCK_SIZE


def test_vector_file_matches_its_generator() -> None:
    # The generator re-implements docs/format.md without kmsfs code; a stale file fails here.
    from tests.vectors import generate_crypto_vectors as generator

    assert generator.content_vectors() == VECTORS["content"]
    assert generator.name_vectors() == VECTORS["names"]
    assert generator.symlink_vectors() == VECTORS["symlinks"]


def test_vector_v2_file_matches_its_generator() -> None:
    # crypto_v2.json: the version 2 header and blocks, and the xattr layout.
    from tests.vectors import generate_crypto_vectors as generator

    assert generator.vectors_v2() == VECTORS_V2


# Batched blocks (the fs hot path): same bytes on disk as block by block


@QUICK
@given(first=st.integers(0, 2**40), size=st.integers(1, 5 * BLOCK_SIZE))
def test_batched_blocks_match_single_blocks(first: int, size: int) -> None:
    c = cipher()
    plaintext = random.Random(size).randbytes(size)
    blocks = bytes(c.encrypt_blocks(first, plaintext))
    assert len(blocks) == size + -(-size // BLOCK_SIZE) * BLOCK_OVERHEAD
    for i in range(0, len(blocks), CIPHER_BLOCK_SIZE):
        n = first + i // CIPHER_BLOCK_SIZE
        start = (n - first) * BLOCK_SIZE
        assert c.decrypt_block(n, blocks[i : i + CIPHER_BLOCK_SIZE]) == plaintext[
            start : start + BLOCK_SIZE
        ]
    assert c.decrypt_blocks(first, blocks) == plaintext


def test_batched_blocks_get_fresh_nonces() -> None:
    c = cipher()
    blocks = b"".join(bytes(c.encrypt_blocks(0, bytes(3 * BLOCK_SIZE))) for _ in range(20))
    nonces = {blocks[i : i + NONCE_SIZE] for i in range(0, len(blocks), CIPHER_BLOCK_SIZE)}
    assert len(nonces) == 60


def test_batched_decrypt_detects_tampering_in_any_block() -> None:
    c = cipher()
    blocks = bytes(c.encrypt_blocks(7, bytes(3 * BLOCK_SIZE + 10)))
    for at in [0, CIPHER_BLOCK_SIZE + 5, 2 * CIPHER_BLOCK_SIZE + 100, len(blocks) - 1]:
        tampered = bytearray(blocks)
        tampered[at] ^= 1
        with pytest.raises(IntegrityError, match="authentication failed"):
            c.decrypt_blocks(7, bytes(tampered))
    with pytest.raises(IntegrityError):
        c.decrypt_blocks(8, blocks)  # moved
    for cut in [len(blocks) - 11, 3 * CIPHER_BLOCK_SIZE + BLOCK_OVERHEAD, 0]:
        with pytest.raises(IntegrityError):
            c.decrypt_blocks(7, blocks[:cut])


def test_batched_encrypt_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        cipher().encrypt_blocks(0, b"")
    with pytest.raises(ValueError):
        cipher().encrypt_blocks(2**64 - 1, bytes(BLOCK_SIZE + 1))


@pytest.mark.parametrize("size", [1, BLOCK_SIZE - 1, BLOCK_SIZE])
def test_one_block_takes_the_same_format_and_checks_as_many(size: int) -> None:
    """A run of one block (every 4 KiB random read or write) takes a shorter path: same
    format, a fresh nonce every time, same checks."""
    c = cipher()
    plaintext = random.Random(size).randbytes(size)
    block = bytes(c.encrypt_blocks(9, plaintext))
    again = bytes(c.encrypt_blocks(9, memoryview(plaintext)))
    assert len(block) == len(again) == size + BLOCK_OVERHEAD
    assert block[:NONCE_SIZE] != again[:NONCE_SIZE]
    assert c.decrypt_block(9, again) == plaintext
    assert c.decrypt_blocks(9, block) == plaintext == c.decrypt_block(9, block)
    assert c.decrypt_blocks(9, memoryview(block)) == plaintext  # as FileContent.read passes it
    for at in (0, NONCE_SIZE, len(block) - 1):  # nonce, ciphertext, tag
        tampered = bytearray(block)
        tampered[at] ^= 1
        with pytest.raises(IntegrityError, match=r"block 9 of file .*authentication failed"):
            c.decrypt_blocks(9, bytes(tampered))
    with pytest.raises(IntegrityError):
        c.decrypt_blocks(10, block)  # moved
    with pytest.raises(IntegrityError):
        cipher().decrypt_blocks(9, block)  # transplanted: another file's id in the AAD
