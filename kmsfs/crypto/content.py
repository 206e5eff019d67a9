"""The per-file content format: an 18-byte header, then AES-256-GCM blocks.

Layout (docs/format.md, section "File contents")::

    header  (18 bytes, absent in an empty file)
      0  2   version   big-endian: 2 (FORMAT_VERSION, written by volumes with KeyEpochs) or 1
      2  16  file id   version 2: mk epoch (2, BE, 1..65535) || 14 random bytes
                       version 1: 16 random bytes (the epoch is 1)
    block n (n = 0, 1, ...; each holds up to 4096 plaintext bytes; only the last may be short)
      0  12  nonce     random, fresh for every write of the block
      12 len ciphertext
      .. 16  GCM tag
    AAD of block n = version (2, BE) || file id (16) || n (8, BE)
    file key      = KeyDeriver.derive(FILE_KEY_INFO_PREFIX || file id, epoch=header.epoch)

The AAD binds every block to its file and its position, so a block moved, reordered or copied
from another file fails authentication. The plaintext size follows from the ciphertext size alone
(:func:`plain_size`), so ``stat`` needs no decryption. A version 2 header carries its key epoch
inside the file id, so the epoch is in every block's AAD and in the key derivation info: changing
it fails authentication. Both versions have the same size, so every offset is the same.

Holes: this format has no unauthenticated representation of zeros. A hole (a file extended by
truncate or by a write past its end) MUST be filled by the fs layer with encrypted zero blocks;
an all-zero ciphertext block is simply a block whose tag does not verify.
"""

import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kmsfs.crypto import fileids
from kmsfs.crypto.fileids import FILE_ID_SIZE, MAX_EPOCH
from kmsfs.errors import BadVersionError, FormatError, IntegrityError
from kmsfs.keys import FIRST_EPOCH

VERSION_1 = 1
"""Header without an epoch: the file id is 16 random bytes and the key epoch is 1."""
VERSION_2 = 2
"""Header with a key epoch: file id = epoch (2 bytes, BE) || 14 random bytes."""
FORMAT_VERSION = VERSION_2
"""The newest header version (what a volume with the KeyEpochs flag writes)."""
VERSIONS = (VERSION_1, VERSION_2)
VERSION_SIZE = 2
HEADER_SIZE = VERSION_SIZE + FILE_ID_SIZE  # 18
BLOCK_SIZE = 4096
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_OVERHEAD = NONCE_SIZE + TAG_SIZE  # 28
CIPHER_BLOCK_SIZE = BLOCK_SIZE + BLOCK_OVERHEAD  # 4124
BLOCK_NO_SIZE = 8
FILE_KEY_SIZE = 32

FILE_KEY_INFO_PREFIX = b"kmsfs/v1/file-key\x00"
"""Label of per-file key derivation: ``derive(FILE_KEY_INFO_PREFIX + file_id)``."""

_MAX_BLOCK_NO = 2 ** (8 * BLOCK_NO_SIZE) - 1


def file_key_info(file_id: bytes) -> bytes:
    """Return the ``info`` the fs passes to ``KeyDeriver.derive`` to get this file's key."""
    if len(file_id) != FILE_ID_SIZE:
        raise FormatError(f"file id: want {FILE_ID_SIZE} bytes, have {len(file_id)}")
    return FILE_KEY_INFO_PREFIX + file_id


@dataclass(frozen=True)
class FileHeader:
    """The 18 bytes at the start of every non-empty ciphertext file.

    ``file_id`` is always the 16 bytes after the version; in a version 2 header its first two
    bytes are the ``mk`` epoch the file key is derived with (:attr:`epoch`).
    """

    version: int
    file_id: bytes

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise BadVersionError(
                f"file header: want version 1 or 2, have {self.version}"
            )
        fileids.check(self.file_id, self.version == VERSION_2, "file header")

    @property
    def epoch(self) -> int:
        """The ``mk`` epoch this file's key is derived with (1 for a version 1 header)."""
        return fileids.epoch_of(self.file_id, self.version == VERSION_2)

    @classmethod
    def new(cls, epoch: int = FIRST_EPOCH, *, version: int = VERSION_2) -> "FileHeader":
        """A header with a fresh random file id, for a file about to get its first byte.

        Version 2 (the default) at key epoch ``epoch``; ``version=VERSION_1`` only for a volume
        without the KeyEpochs flag, and then ``epoch`` must be 1.
        """
        if not FIRST_EPOCH <= epoch <= MAX_EPOCH:
            raise ValueError(f"key epoch: want {FIRST_EPOCH}..{MAX_EPOCH}, have {epoch}")
        if version == VERSION_1:
            if epoch != FIRST_EPOCH:
                raise ValueError(f"a version 1 header has key epoch 1, not {epoch}")
            return cls(version, fileids.new(None))
        if version == VERSION_2:
            return cls(version, fileids.new(epoch))
        raise ValueError(f"file header version: want 1 or 2, have {version}")

    def pack(self) -> bytes:
        """The 18 on-disk bytes."""
        return self.version.to_bytes(VERSION_SIZE, "big") + self.file_id

    @classmethod
    def parse(cls, data: bytes) -> "FileHeader":
        """Parse the first 18 bytes of a ciphertext file; FormatError/BadVersionError if bad."""
        if len(data) != HEADER_SIZE:
            raise FormatError(f"file header: want {HEADER_SIZE} bytes, have {len(data)}")
        version = int.from_bytes(data[:VERSION_SIZE], "big")
        return cls(version, bytes(data[VERSION_SIZE:]))


class ContentCipher:
    """Encrypts and decrypts the blocks of one file with that file's key.

    Holds only the AEAD object, never the raw key, so nothing secret can leak through repr.
    """

    def __init__(self, file_key: bytes, header: FileHeader) -> None:
        if len(file_key) != FILE_KEY_SIZE:
            raise ValueError(f"file key: want {FILE_KEY_SIZE} bytes, have {len(file_key)}")
        self._aead = AESGCM(file_key)
        self._header = header
        self._aad_prefix = header.pack()

    @property
    def header(self) -> FileHeader:
        return self._header

    def _aad(self, block_no: int) -> bytes:
        if not 0 <= block_no <= _MAX_BLOCK_NO:
            raise ValueError(f"block number out of range: {block_no}")
        return self._aad_prefix + block_no.to_bytes(BLOCK_NO_SIZE, "big")

    def encrypt_block(self, block_no: int, plaintext: bytes) -> bytes:
        """Encrypt 1..BLOCK_SIZE bytes as block ``block_no``: nonce || ciphertext || tag.

        A fresh random nonce every call: rewriting a block never reuses a (key, nonce) pair.
        With 96-bit random nonces, keep below 2**32 block writes per file id.
        """
        return self._encrypt_block_with_nonce(block_no, plaintext, os.urandom(NONCE_SIZE))

    def _encrypt_block_with_nonce(self, block_no: int, plaintext: bytes, nonce: bytes) -> bytes:
        """Seam for known-answer tests only: production code must use :meth:`encrypt_block`."""
        if not 1 <= len(plaintext) <= BLOCK_SIZE:
            raise ValueError(f"block plaintext: want 1..{BLOCK_SIZE} bytes, have {len(plaintext)}")
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce: want {NONCE_SIZE} bytes, have {len(nonce)}")
        return nonce + self._aead.encrypt(nonce, bytes(plaintext), self._aad(block_no))

    def decrypt_block(self, block_no: int, block: bytes) -> bytes:
        """Authenticate and decrypt block ``block_no``; IntegrityError on any failure."""
        aad = self._aad(block_no)
        where = f"content block {block_no} of file {self._header.file_id.hex()}"
        if not BLOCK_OVERHEAD < len(block) <= CIPHER_BLOCK_SIZE:
            raise IntegrityError(
                f"{where}: want {BLOCK_OVERHEAD + 1}..{CIPHER_BLOCK_SIZE} bytes, have {len(block)}"
            )
        block = bytes(block)
        try:
            return self._aead.decrypt(block[:NONCE_SIZE], block[NONCE_SIZE:], aad)
        except InvalidTag:
            raise IntegrityError(f"{where}: authentication failed") from None

    # Batched forms for the fs hot path: one call per read or write instead of one per block,
    # filling one buffer (no per-block bytes objects, no join). Same format, same checks.

    def encrypt_blocks(self, first_block: int, plaintext: bytes | memoryview) -> bytes | bytearray:
        """Encrypt *plaintext* as blocks ``first_block``, ``first_block + 1``, ...

        Every block but the last must be full (BLOCK_SIZE bytes); each gets its own fresh
        random nonce. Returns the ciphertext blocks back to back, ready for one ``pwrite``.
        """
        size = len(plaintext)
        count = -(-size // BLOCK_SIZE)
        if count == 0:
            raise ValueError("block plaintext: want at least 1 byte, have 0")
        if count == 1:  # one block (small random writes): one call, no buffer to fill
            nonce = os.urandom(NONCE_SIZE)
            return nonce + self._aead.encrypt(nonce, plaintext, self._aad(first_block))
        self._aad(first_block)
        self._aad(first_block + count - 1)  # range checks
        out = bytearray(size + count * BLOCK_OVERHEAD)
        dst = memoryview(out)
        src = memoryview(plaintext)
        nonces = os.urandom(NONCE_SIZE * count)
        encrypt_into = self._aead.encrypt_into
        prefix = self._aad_prefix
        at = 0
        for i in range(count):
            chunk = src[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            nonce = nonces[i * NONCE_SIZE : (i + 1) * NONCE_SIZE]
            end = at + NONCE_SIZE + len(chunk) + TAG_SIZE
            dst[at : at + NONCE_SIZE] = nonce
            aad = prefix + (first_block + i).to_bytes(BLOCK_NO_SIZE, "big")
            encrypt_into(nonce, chunk, aad, dst[at + NONCE_SIZE : end])
            at = end
        return out

    def decrypt_blocks(self, first_block: int, blocks: bytes | memoryview) -> bytes | bytearray:
        """Authenticate and decrypt consecutive ciphertext blocks read back to back.

        Every block but the last must be full (CIPHER_BLOCK_SIZE bytes). IntegrityError if any
        block fails; callers that need to know which one can retry with :meth:`decrypt_block`.
        """
        size = len(blocks)
        count = -(-size // CIPHER_BLOCK_SIZE)
        rest = size - (count - 1) * CIPHER_BLOCK_SIZE
        if count == 0 or rest <= BLOCK_OVERHEAD:
            raise IntegrityError(f"content blocks from {first_block}: bad length {size}")
        if count == 1:  # one block (small random reads): one call, no buffer to fill
            try:
                return self._aead.decrypt(
                    blocks[:NONCE_SIZE], blocks[NONCE_SIZE:], self._aad(first_block)
                )
            except InvalidTag:
                raise IntegrityError(
                    f"content block {first_block} of file {self._header.file_id.hex()}: "
                    "authentication failed"
                ) from None
        self._aad(first_block)
        self._aad(first_block + count - 1)  # range checks
        out = bytearray(size - count * BLOCK_OVERHEAD)
        dst = memoryview(out)
        src = memoryview(blocks)
        decrypt_into = self._aead.decrypt_into
        prefix = self._aad_prefix
        at = 0
        try:
            for i in range(count):
                block = src[i * CIPHER_BLOCK_SIZE : (i + 1) * CIPHER_BLOCK_SIZE]
                end = at + len(block) - BLOCK_OVERHEAD
                aad = prefix + (first_block + i).to_bytes(BLOCK_NO_SIZE, "big")
                decrypt_into(block[:NONCE_SIZE], block[NONCE_SIZE:], aad, dst[at:end])
                at = end
        except InvalidTag:
            raise IntegrityError(
                f"content block {first_block + i} of file {self._header.file_id.hex()}: "
                "authentication failed"
            ) from None
        return out


# Size arithmetic: pure functions, docs/format.md section "Sizes".


def cipher_size(plain_size: int) -> int:
    """Ciphertext file size for a plaintext size (0 stays 0: an empty file has no header)."""
    if plain_size < 0:
        raise ValueError(f"negative size: {plain_size}")
    if plain_size == 0:
        return 0
    full, rest = divmod(plain_size, BLOCK_SIZE)
    return HEADER_SIZE + full * CIPHER_BLOCK_SIZE + (rest + BLOCK_OVERHEAD if rest else 0)


def plain_size(cipher_size: int) -> int:
    """Plaintext size for a ciphertext size; FormatError if no plaintext size gives it."""
    if cipher_size < 0:
        raise ValueError(f"negative size: {cipher_size}")
    if cipher_size == 0:
        return 0
    if cipher_size <= HEADER_SIZE:
        raise FormatError(
            f"ciphertext size {cipher_size}: a non-empty file needs more than "
            f"{HEADER_SIZE} bytes (header and a block)"
        )
    full, rest = divmod(cipher_size - HEADER_SIZE, CIPHER_BLOCK_SIZE)
    if rest == 0:
        return full * BLOCK_SIZE
    if rest <= BLOCK_OVERHEAD:
        raise FormatError(
            f"ciphertext size {cipher_size}: last block has {rest} bytes, "
            f"want more than {BLOCK_OVERHEAD}"
        )
    return full * BLOCK_SIZE + rest - BLOCK_OVERHEAD


def plain_size_lenient(cipher_size: int) -> int:
    """Best plausible plaintext size of a possibly damaged file; never raises.

    For ``stat`` only: a header without blocks counts as empty and a trailing fragment too short
    to be a block is ignored. Reading the damaged part still fails with IntegrityError.
    """
    if cipher_size <= HEADER_SIZE:
        return 0
    full, rest = divmod(cipher_size - HEADER_SIZE, CIPHER_BLOCK_SIZE)
    return full * BLOCK_SIZE + max(rest - BLOCK_OVERHEAD, 0)


def block_range(offset: int, length: int) -> range:
    """Block numbers that plaintext bytes ``[offset, offset + length)`` touch (empty if 0)."""
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length: {offset}, {length}")
    if length == 0:
        return range(0)
    return range(offset // BLOCK_SIZE, (offset + length - 1) // BLOCK_SIZE + 1)


def cipher_offset(block_no: int) -> int:
    """Offset of block ``block_no`` in the ciphertext file."""
    if block_no < 0:
        raise ValueError(f"negative block number: {block_no}")
    return HEADER_SIZE + block_no * CIPHER_BLOCK_SIZE
