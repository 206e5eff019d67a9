"""Single encrypted files: a self-contained header, then a STREAM of AES-256-GCM chunks.

Layout (docs/format.md, section "Single encrypted files")::

    header (30 + L bytes)
      0       8   magic      MAGIC = 89 'kmsfs' 0D 0A
      8       2   version    big-endian, STREAM_VERSION = 2 (1 is still read)
      10      4   L          big-endian length of the bundle, 1 .. MAX_BUNDLE_SIZE
      14      L   bundle     canonical Domain bundle (kmsfs.api.export_domain_bundle)
      14 + L  16  file id    version 2: mk epoch (2, BE, 1..65535) || 14 random bytes;
                             version 1: 16 random bytes (epoch 1); never all zero
    chunk n (n = 0, 1, ...; CHUNK_SIZE = 65536 plaintext bytes, only the last may be shorter)
      0   12  nonce      random
      12  len ciphertext (empty only in the single final chunk of an empty file)
      ..  16  GCM tag
    AAD of chunk n = SHA-256(header) (32) || n (8, BE) || last (1: 0x01 final chunk, else 0x00)
    file key       = KeyDeriver.derive(SINGLE_FILE_KEY_INFO_PREFIX || file id, epoch)

Why a last-chunk flag (as in age's STREAM): the filesystem format cannot see blocks dropped at
the end of a file. Here the final chunk is sealed as final, so a file cut at a chunk boundary ends
in a chunk that was not, and data appended after the final chunk follows one that was: both fail.
The header digest in every AAD binds each chunk to this exact header (so to its file id) and
makes every header byte authenticated. Nonces are random although the key is unique per file id:
a repeated file id (a broken RNG, a cloned VM) then still does not repeat a (key, nonce) pair.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.crypto import fileids
from kmsfs.crypto.fileids import FILE_ID_SIZE
from kmsfs.errors import BadVersionError, FormatError, IntegrityError
from kmsfs.keys import FIRST_EPOCH

MAGIC = b"\x89kmsfs\r\n"
"""8 bytes. The non-ASCII first byte marks binary data; CR LF catches newline translation."""
STREAM_VERSION_1 = 1
"""File id: 16 random bytes; the file key is derived with mk epoch 1."""
STREAM_VERSION_2 = 2
"""File id: mk epoch (2 bytes, BE) || 14 random bytes, as in the filesystem's version 2 header."""
STREAM_VERSION = STREAM_VERSION_2
"""What ``kmsfs encrypt`` writes."""
STREAM_VERSIONS = (STREAM_VERSION_1, STREAM_VERSION_2)
MAGIC_SIZE = 8
VERSION_SIZE = 2
LENGTH_SIZE = 4
PREFIX_SIZE = MAGIC_SIZE + VERSION_SIZE + LENGTH_SIZE  # 14: enough to learn the header size
MAX_BUNDLE_SIZE = 4 * 1024 * 1024
"""Same bound as kmsfs.conf: a bundle is a few KB; this only stops absurd allocations."""

CHUNK_SIZE = 64 * 1024
"""64 KiB: measured 3-5x faster than 4096-byte chunks with AES-GCM in Python (per-call cost)."""
NONCE_SIZE = 12
TAG_SIZE = 16
CHUNK_OVERHEAD = NONCE_SIZE + TAG_SIZE  # 28
CIPHER_CHUNK_SIZE = CHUNK_SIZE + CHUNK_OVERHEAD  # 65564
CHUNK_NO_SIZE = 8
KEY_SIZE = 32

SINGLE_FILE_KEY_INFO_PREFIX = b"kmsfs/v1/single-file\x00"
"""Label of per-file key derivation: ``derive(SINGLE_FILE_KEY_INFO_PREFIX + file_id)``."""

_MAX_CHUNK_NO = 2 ** (8 * CHUNK_NO_SIZE) - 1


def key_info(file_id: bytes) -> bytes:
    """The ``info`` to pass to ``KeyDeriver.derive`` for this file's key."""
    if len(file_id) != FILE_ID_SIZE:
        raise FormatError(f"file id: want {FILE_ID_SIZE} bytes, have {len(file_id)}")
    return SINGLE_FILE_KEY_INFO_PREFIX + file_id


def header_size(prefix: bytes) -> int:
    """Whole header size from its first PREFIX_SIZE bytes, so a reader knows what to read next.

    Checks magic, version and bundle length; FormatError/BadVersionError with want/have.
    """
    if len(prefix) < PREFIX_SIZE:
        raise FormatError(
            f"not a kmsfs encrypted file: want at least {PREFIX_SIZE} header bytes, "
            f"have {len(prefix)}"
        )
    if prefix[:MAGIC_SIZE] != MAGIC:
        raise FormatError(
            f"not a kmsfs encrypted file: want magic {MAGIC.hex()}, "
            f"have {bytes(prefix[:MAGIC_SIZE]).hex()}"
        )
    version = int.from_bytes(prefix[MAGIC_SIZE : MAGIC_SIZE + VERSION_SIZE], "big")
    if version not in STREAM_VERSIONS:
        raise BadVersionError(f"encrypted file: want version 1 or 2, have {version}")
    length = int.from_bytes(prefix[MAGIC_SIZE + VERSION_SIZE : PREFIX_SIZE], "big")
    if not 1 <= length <= MAX_BUNDLE_SIZE:
        raise FormatError(
            f"encrypted file: want a bundle of 1..{MAX_BUNDLE_SIZE} bytes, have {length}"
        )
    return PREFIX_SIZE + length + FILE_ID_SIZE


@dataclass(frozen=True)
class StreamHeader:
    """What a single encrypted file says about itself before its chunks.

    ``version`` defaults to 1 so that ``StreamHeader(bundle, file_id)`` keeps meaning what it
    always did; :meth:`new` makes version 2 headers.
    """

    bundle: bytes
    file_id: bytes
    version: int = STREAM_VERSION_1

    def __post_init__(self) -> None:
        if self.version not in STREAM_VERSIONS:
            raise BadVersionError(f"encrypted file: want version 1 or 2, have {self.version}")
        if not 1 <= len(self.bundle) <= MAX_BUNDLE_SIZE:
            raise FormatError(
                f"encrypted file: want a bundle of 1..{MAX_BUNDLE_SIZE} bytes, "
                f"have {len(self.bundle)}"
            )
        fileids.check(self.file_id, self.version == STREAM_VERSION_2, "encrypted file")

    @property
    def epoch(self) -> int:
        """The ``mk`` epoch the file key is derived with (1 for a version 1 file)."""
        return fileids.epoch_of(self.file_id, self.version == STREAM_VERSION_2)

    @classmethod
    def new(cls, bundle: bytes, epoch: int = FIRST_EPOCH) -> StreamHeader:
        """A version 2 header at key epoch ``epoch`` with a fresh random file id."""
        return cls(bytes(bundle), fileids.new(epoch), STREAM_VERSION_2)

    def pack(self) -> bytes:
        return (
            MAGIC
            + self.version.to_bytes(VERSION_SIZE, "big")
            + len(self.bundle).to_bytes(LENGTH_SIZE, "big")
            + self.bundle
            + self.file_id
        )

    @classmethod
    def parse(cls, data: bytes) -> StreamHeader:
        """Parse exactly the header bytes (``header_size(data[:14])`` of them)."""
        want = header_size(data[:PREFIX_SIZE])
        if len(data) != want:
            raise FormatError(f"encrypted file header: want {want} bytes, have {len(data)}")
        data = bytes(data)
        version = int.from_bytes(data[MAGIC_SIZE : MAGIC_SIZE + VERSION_SIZE], "big")
        return cls(data[PREFIX_SIZE:-FILE_ID_SIZE], data[-FILE_ID_SIZE:], version)


class StreamCipher:
    """Seals and opens the chunks of one single encrypted file. Holds only the AEAD object."""

    def __init__(self, file_key: bytes, header: StreamHeader) -> None:
        if len(file_key) != KEY_SIZE:
            raise ValueError(f"file key: want {KEY_SIZE} bytes, have {len(file_key)}")
        self._aead = AESGCM(file_key)
        self._digest = hashlib.sha256(header.pack()).digest()

    def _aad(self, chunk_no: int, last: bool) -> bytes:
        if not 0 <= chunk_no <= _MAX_CHUNK_NO:
            raise ValueError(f"chunk number out of range: {chunk_no}")
        flag = b"\x01" if last else b"\x00"
        return self._digest + chunk_no.to_bytes(CHUNK_NO_SIZE, "big") + flag

    def seal(self, chunk_no: int, plaintext: bytes, last: bool) -> bytes:
        """Encrypt chunk ``chunk_no``: nonce || ciphertext || tag."""
        return self._seal_with_nonce(chunk_no, plaintext, last, os.urandom(NONCE_SIZE))

    def _seal_with_nonce(self, chunk_no: int, plaintext: bytes, last: bool, nonce: bytes) -> bytes:
        """Seam for known-answer tests only: production code must use :meth:`seal`."""
        if len(plaintext) > CHUNK_SIZE:
            raise ValueError(
                f"chunk plaintext: want at most {CHUNK_SIZE} bytes, have {len(plaintext)}"
            )
        if not plaintext and not (last and chunk_no == 0):
            raise ValueError("only the final chunk of an empty file may be empty")
        if not last and len(plaintext) != CHUNK_SIZE:
            raise ValueError(f"a chunk before the last must hold {CHUNK_SIZE} bytes")
        return nonce + self._aead.encrypt(nonce, bytes(plaintext), self._aad(chunk_no, last))

    def open(self, chunk_no: int, chunk: bytes, last: bool) -> bytes:
        """Authenticate and decrypt; IntegrityError (naming the chunk and why) on any failure."""
        if not last and len(chunk) != CIPHER_CHUNK_SIZE:
            raise IntegrityError(
                f"chunk {chunk_no}: want {CIPHER_CHUNK_SIZE} bytes, have {len(chunk)}"
            )
        if not CHUNK_OVERHEAD <= len(chunk) <= CIPHER_CHUNK_SIZE:
            raise IntegrityError(
                f"chunk {chunk_no}: want {CHUNK_OVERHEAD}..{CIPHER_CHUNK_SIZE} bytes, "
                f"have {len(chunk)} (file truncated?)"
            )
        chunk = bytes(chunk)
        try:
            plain = self._aead.decrypt(
                chunk[:NONCE_SIZE], chunk[NONCE_SIZE:], self._aad(chunk_no, last)
            )
        except InvalidTag:
            raise IntegrityError(
                f"chunk {chunk_no} fails authentication{self._why(chunk_no, chunk, last)}"
            ) from None
        if not plain and chunk_no != 0:
            raise IntegrityError(f"chunk {chunk_no}: empty chunk after chunk 0")
        return plain

    def _why(self, chunk_no: int, chunk: bytes, last: bool) -> str:
        """Tell truncation and appended data apart from plain damage (one extra trial open)."""
        try:
            aad = self._aad(chunk_no, not last)
            self._aead.decrypt(chunk[:NONCE_SIZE], chunk[NONCE_SIZE:], aad)
        except InvalidTag:
            return ""
        if last:
            return " (the file is truncated: this chunk is not the final one)"
        return " (data follows the final chunk: appended bytes?)"


# Size arithmetic (docs/format.md, "Single encrypted files", worked sizes).


def chunk_count(plain_size: int) -> int:
    """Chunks for a plaintext size: at least one (an empty file has one empty final chunk)."""
    if plain_size < 0:
        raise ValueError(f"negative size: {plain_size}")
    return max(1, -(-plain_size // CHUNK_SIZE))


def cipher_size(plain_size: int, bundle_size: int) -> int:
    """Size of the encrypted file for a plaintext size and a bundle size."""
    header = PREFIX_SIZE + bundle_size + FILE_ID_SIZE
    return header + plain_size + chunk_count(plain_size) * CHUNK_OVERHEAD


def plain_size(body_size: int) -> int:
    """Plaintext size for the bytes after the header; FormatError for sizes never produced."""
    if body_size < CHUNK_OVERHEAD:
        raise FormatError(
            f"encrypted file: {body_size} bytes after the header, want at least {CHUNK_OVERHEAD}"
        )
    full, rest = divmod(body_size, CIPHER_CHUNK_SIZE)
    if rest == 0:
        return full * CHUNK_SIZE
    if rest < CHUNK_OVERHEAD or (rest == CHUNK_OVERHEAD and full > 0):
        raise FormatError(
            f"encrypted file: last chunk has {rest} bytes, want {CHUNK_OVERHEAD + 1} or more"
        )
    return full * CHUNK_SIZE + rest - CHUNK_OVERHEAD
