"""Single encrypted files (kmsfs/crypto/stream.py): header, STREAM chunks, every tampering case.

The file-level helpers here mirror what kmsfs/fs/singlefile.py does with a file object (read one
chunk ahead to learn which chunk is last), over bytes, so every cut and splice can be tried fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kmsfs.crypto.stream import (
    CHUNK_OVERHEAD,
    CHUNK_SIZE,
    CIPHER_CHUNK_SIZE,
    FILE_ID_SIZE,
    MAGIC,
    MAX_BUNDLE_SIZE,
    PREFIX_SIZE,
    SINGLE_FILE_KEY_INFO_PREFIX,
    StreamCipher,
    StreamHeader,
    chunk_count,
    cipher_size,
    header_size,
    key_info,
    plain_size,
)
from kmsfs.errors import BadVersionError, FormatError, IntegrityError
from tests.vectors import generate_stream_vectors

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "stream_v1.json").read_text())
KEY = bytes(range(32))
BUNDLE = b'{"domain":"test"}'
C = CHUNK_SIZE


def seal_file(plaintext: bytes, key: bytes = KEY, header: StreamHeader | None = None) -> bytes:
    header = header or StreamHeader.new(BUNDLE)
    cipher = StreamCipher(key, header)
    pieces = [plaintext[i : i + C] for i in range(0, len(plaintext), C)] or [b""]
    out = [header.pack()]
    for n, piece in enumerate(pieces):
        out.append(cipher.seal(n, piece, last=n == len(pieces) - 1))
    return b"".join(out)


def open_file(data: bytes, key: bytes = KEY) -> bytes:
    """What decrypt does, over bytes: header, then chunks with the last one known by look-ahead."""
    size = header_size(data[:PREFIX_SIZE])
    header = StreamHeader.parse(data[:size])
    cipher = StreamCipher(key, header)
    body = data[size:]
    pieces = [body[i : i + CIPHER_CHUNK_SIZE] for i in range(0, len(body), CIPHER_CHUNK_SIZE)]
    pieces = pieces or [b""]
    return b"".join(
        cipher.open(n, piece, last=n == len(pieces) - 1) for n, piece in enumerate(pieces)
    )


def chunk_at(data: bytes, n: int) -> slice:
    start = header_size(data[:PREFIX_SIZE]) + n * CIPHER_CHUNK_SIZE
    return slice(start, start + CIPHER_CHUNK_SIZE)


SIZES = [0, 1, C - 1, C, C + 1, 3 * C, 3 * C + 17]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_size(size: int) -> None:
    plaintext = os.urandom(size)
    data = seal_file(plaintext)
    assert len(data) == cipher_size(size, len(BUNDLE))
    assert plain_size(len(data) - header_size(data[:PREFIX_SIZE])) == size
    assert open_file(data) == plaintext


def test_constants_and_worked_sizes() -> None:
    assert (len(MAGIC), PREFIX_SIZE, FILE_ID_SIZE) == (8, 14, 16)
    assert (C, CHUNK_OVERHEAD, CIPHER_CHUNK_SIZE) == (65536, 28, 65564)
    assert [chunk_count(p) for p in (0, 1, C, C + 1)] == [1, 1, 1, 2]
    # docs/format.md: a 2,000-byte bundle gives a 2,030-byte header.
    assert cipher_size(0, 2000) == 2030 + 28
    assert cipher_size(1, 2000) == 2030 + 29
    assert cipher_size(C, 2000) == 2030 + 65564
    assert cipher_size(C + 1, 2000) == 2030 + 65564 + 29
    assert cipher_size(1 << 30, 2000) == 2030 + (1 << 30) + 16384 * 28


@pytest.mark.parametrize("body", [0, 1, 27, CIPHER_CHUNK_SIZE + 1, CIPHER_CHUNK_SIZE + 28])
def test_plain_size_rejects_impossible_sizes(body: int) -> None:
    with pytest.raises(FormatError):
        plain_size(body)


def test_key_info_is_the_named_label() -> None:
    file_id = bytes(range(16))
    assert SINGLE_FILE_KEY_INFO_PREFIX == b"kmsfs/v1/single-file\x00"
    assert key_info(file_id) == SINGLE_FILE_KEY_INFO_PREFIX + file_id
    with pytest.raises(FormatError):
        key_info(b"short")


# Header


def test_header_round_trip_and_fresh_ids() -> None:
    header = StreamHeader.new(BUNDLE)
    packed = header.pack()
    assert packed.startswith(MAGIC + b"\x00\x02")  # version 2: the epoch is in the file id
    assert header.epoch == 1 and header.file_id[:2] == b"\x00\x01"
    assert len(packed) == header_size(packed[:PREFIX_SIZE]) == 30 + len(BUNDLE)
    assert StreamHeader.parse(packed) == header
    assert StreamHeader.new(BUNDLE).file_id != header.file_id


def test_header_rejects_with_want_and_have() -> None:
    packed = StreamHeader.new(BUNDLE).pack()
    with pytest.raises(FormatError, match="want magic"):
        header_size(b"GARBAGE!" + packed[8:PREFIX_SIZE])
    with pytest.raises(BadVersionError, match="want version 1 or 2, have 3"):
        header_size(packed[:8] + b"\x00\x03" + packed[10:PREFIX_SIZE])
    with pytest.raises(FormatError, match="want at least 14"):
        header_size(packed[:5])
    for length in (0, MAX_BUNDLE_SIZE + 1):
        with pytest.raises(FormatError, match="bundle"):
            header_size(packed[:10] + length.to_bytes(4, "big"))
    with pytest.raises(FormatError, match=f"want {len(packed)} bytes, have {len(packed) - 1}"):
        StreamHeader.parse(packed[:-1])
    with pytest.raises(FormatError, match="all zero"):
        StreamHeader.parse(packed[:-FILE_ID_SIZE] + bytes(FILE_ID_SIZE))


def test_header_v2_epoch_round_trip_and_v1_still_reads() -> None:
    header = StreamHeader.new(BUNDLE, epoch=0x0203)
    packed = header.pack()
    assert packed[8:10] == b"\x00\x02" and header.version == 2
    assert packed[-FILE_ID_SIZE:][:2] == b"\x02\x03" and header.epoch == 0x0203
    assert len(packed) == 30 + len(BUNDLE)  # same size as version 1
    parsed = StreamHeader.parse(packed)
    assert parsed == header and parsed.epoch == 0x0203
    v1 = StreamHeader(BUNDLE, bytes(range(1, 17)))
    assert v1.pack()[8:10] == b"\x00\x01" and v1.epoch == 1
    assert StreamHeader.parse(v1.pack()) == v1
    with pytest.raises(FormatError, match="epoch 0"):
        StreamHeader.parse(packed[:-FILE_ID_SIZE] + b"\x00\x00" + packed[-14:])
    with pytest.raises(ValueError):
        StreamHeader.new(BUNDLE, epoch=0)


def test_tampered_stream_epoch_fails() -> None:
    header = StreamHeader.new(BUNDLE, epoch=2)
    data = seal_file(b"x" * 100, header=header)
    assert open_file(data) == b"x" * 100
    at = 14 + len(BUNDLE) + 1  # low byte of the epoch
    forged = data[:at] + b"\x03" + data[at + 1 :]
    assert StreamHeader.parse(forged[: 30 + len(BUNDLE)]).epoch == 3
    with pytest.raises(IntegrityError):
        open_file(forged)


# Tampering: every case must fail, never give other plaintext.

PLAIN = os.urandom(3 * C + 100)


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]


def _fails(data: bytes, match: str | None = None) -> None:
    with pytest.raises((IntegrityError, FormatError), match=match):
        open_file(data)


def test_bit_flip_anywhere_fails() -> None:
    data = seal_file(PLAIN)
    hsize = header_size(data[:PREFIX_SIZE])
    # every header byte, then bytes in nonce, ciphertext and tag of each chunk
    positions = list(range(hsize))
    for n in range(4):
        start = hsize + n * CIPHER_CHUNK_SIZE
        end = min(start + CIPHER_CHUNK_SIZE, len(data))
        positions += [start, start + 11, start + 12, start + 50, end - 17, end - 1]
    for i in positions:
        _fails(_flip(data, i))


def test_bit_flip_names_the_chunk() -> None:
    data = seal_file(PLAIN)
    _fails(_flip(data, chunk_at(data, 2).start + 100), match="^chunk 2 fails authentication$")


@pytest.mark.parametrize("keep_chunks", [0, 1, 2, 3])
def test_truncation_at_a_chunk_boundary_fails(keep_chunks: int) -> None:
    data = seal_file(PLAIN)
    cut = data[: chunk_at(data, keep_chunks).start]
    if keep_chunks == 0:
        _fails(cut)
    else:
        _fails(cut, match=f"chunk {keep_chunks - 1} .*truncated")


def test_truncation_anywhere_fails() -> None:
    data = seal_file(PLAIN)
    hsize = header_size(data[:PREFIX_SIZE])
    cuts = [0, 1, 8, PREFIX_SIZE, hsize - 1, hsize, hsize + 1, hsize + 28, len(data) - 1]
    cuts += [hsize + n * CIPHER_CHUNK_SIZE + d for n in range(4) for d in (-1, 0, 1, 5000)]
    for cut in cuts:
        if cut < len(data):
            with pytest.raises((IntegrityError, FormatError)):
                open_file(data[:cut])


def test_truncated_exact_multiple_file_fails() -> None:
    data = seal_file(os.urandom(2 * C))
    _fails(data[: chunk_at(data, 1).start], match="chunk 0 .*truncated")


def test_chunk_swap_fails() -> None:
    data = bytearray(seal_file(PLAIN))
    a, b = chunk_at(data, 0), chunk_at(data, 1)
    data[a], data[b] = data[b], data[a]
    _fails(bytes(data), match="chunk 0")


def test_appended_bytes_fail() -> None:
    data = seal_file(PLAIN)
    for extra in (b"\x00", os.urandom(28), os.urandom(CIPHER_CHUNK_SIZE)):
        _fails(data + extra)
    exact = seal_file(os.urandom(2 * C))
    _fails(exact + exact[chunk_at(exact, 1)], match="chunk 1 .*follows the final chunk")


def test_last_flag_forgery_fails() -> None:
    # A final chunk sealed for the whole file cannot stand in for the last one of a shorter file.
    header = StreamHeader.new(BUNDLE)
    cipher = StreamCipher(KEY, header)
    body = [cipher.seal(0, os.urandom(C), last=False), cipher.seal(1, os.urandom(C), last=False)]
    forged = header.pack() + b"".join(body)  # no final chunk: its last chunk claims "not last"
    _fails(forged, match="chunk 1 .*truncated")
    with pytest.raises(IntegrityError):
        cipher.open(0, cipher.seal(0, b"x", last=True), last=False)


def test_other_files_chunk_fails() -> None:
    # Same key and bundle, another file id: its chunk is bound to its own header digest.
    a, b = seal_file(PLAIN), seal_file(PLAIN)
    spliced = bytearray(a)
    spliced[chunk_at(a, 1)] = b[chunk_at(b, 1)]
    _fails(bytes(spliced), match="chunk 1")
    # Same file id but another bundle (a header edit): every chunk fails.
    header = StreamHeader.parse(a[: header_size(a[:PREFIX_SIZE])])
    edited = StreamHeader(b'{"domain":"evil"}', header.file_id).pack()
    _fails(edited + a[len(header.pack()) :], match="chunk 0")


def test_wrong_key_fails() -> None:
    _fails_key = seal_file(b"secret")
    with pytest.raises(IntegrityError):
        open_file(_fails_key, key=bytes(range(1, 33)))


def test_seal_refuses_malformed_chunks() -> None:
    cipher = StreamCipher(KEY, StreamHeader.new(BUNDLE))
    with pytest.raises(ValueError):
        cipher.seal(0, bytes(C + 1), last=True)
    with pytest.raises(ValueError):
        cipher.seal(1, b"", last=True)  # empty only as the sole chunk of an empty file
    with pytest.raises(ValueError):
        cipher.seal(0, b"short", last=False)


# Known answers


def _kat_file(size: int) -> bytes:
    header = StreamHeader(bytes.fromhex(VECTORS["bundle"]), bytes.fromhex(VECTORS["file_id"]))
    assert header.pack().hex() == VECTORS["header"]
    assert key_info(header.file_id).hex() == VECTORS["key_info"]
    cipher = StreamCipher(bytes.fromhex(VECTORS["file_key"]), header)
    base = bytes.fromhex(VECTORS["nonce_base"])
    plaintext = bytes(i % 251 for i in range(size))
    pieces = [plaintext[i : i + C] for i in range(0, size, C)] or [b""]
    out = [header.pack()]
    for n, piece in enumerate(pieces):
        nonce = base[:-1] + bytes([(base[-1] + n) % 256])
        out.append(cipher._seal_with_nonce(n, piece, n == len(pieces) - 1, nonce))
    return b"".join(out)


@pytest.mark.parametrize("case", VECTORS["cases"], ids=lambda c: str(c["plain_size"]))
def test_known_answers(case: dict) -> None:
    import hashlib

    data = _kat_file(case["plain_size"])
    if "file" in case:
        assert data.hex() == case["file"]
    else:
        assert len(data) == case["file_size"]
        assert hashlib.sha256(data).hexdigest() == case["file_sha256"]
    key = bytes.fromhex(VECTORS["file_key"])
    assert open_file(data, key) == bytes(i % 251 for i in range(case["plain_size"]))


def test_vector_file_matches_its_generator() -> None:
    assert generate_stream_vectors.vectors() == VECTORS


VECTORS_V2 = json.loads((Path(__file__).parents[1] / "vectors" / "stream_v2.json").read_text())


@pytest.mark.parametrize("case", VECTORS_V2["cases"], ids=lambda c: str(c["plain_size"]))
def test_known_answers_v2(case: dict) -> None:
    v = VECTORS_V2
    header = StreamHeader.new(bytes.fromhex(v["bundle"]), epoch=v["epoch"])
    header = StreamHeader(header.bundle, bytes.fromhex(v["file_id"]), header.version)
    assert header.pack().hex() == v["header"] and header.epoch == v["epoch"] == 2
    assert StreamHeader.parse(header.pack()) == header
    assert key_info(header.file_id).hex() == v["key_info"]
    cipher = StreamCipher(bytes.fromhex(v["file_key"]), header)
    base = bytes.fromhex(v["nonce_base"])
    size = case["plain_size"]
    plaintext = bytes(i % 251 for i in range(size))
    sealed = cipher._seal_with_nonce(0, plaintext, True, base)
    assert (header.pack() + sealed).hex() == case["file"]
    assert open_file(bytes.fromhex(case["file"]), bytes.fromhex(v["file_key"])) == plaintext


def test_vector_v2_file_matches_its_generator() -> None:
    assert generate_stream_vectors.vectors_v2() == VECTORS_V2
