"""File ids, with or without a key epoch in them: shared by the filesystem's content header
and the single-file (stream) header, which lay them out the same way.

Without an epoch (version 1 headers) a file id is 16 random bytes and the key epoch is 1. With
one (version 2) it is ``epoch (2 bytes, BE, 1..65535) || 14 random bytes``: the epoch is then
part of the id, hence of every AAD and of the key derivation info, so it cannot be changed
without failing authentication. An all-zero id (or random part) is what a crash or a sparse copy
leaves, never a real id.
"""

import os

from kmsfs.errors import FormatError
from kmsfs.keys import FIRST_EPOCH

FILE_ID_SIZE = 16
EPOCH_SIZE = 2
MAX_EPOCH = 2 ** (8 * EPOCH_SIZE) - 1  # 65535
_RANDOM_SIZE = FILE_ID_SIZE - EPOCH_SIZE


def check(file_id: bytes, with_epoch: bool, what: str) -> None:
    """FormatError (starting with ``what``) unless ``file_id`` is a well-formed id."""
    if not isinstance(file_id, bytes) or len(file_id) != FILE_ID_SIZE:
        have = len(file_id) if isinstance(file_id, bytes) else "not bytes"
        raise FormatError(f"{what}: want a {FILE_ID_SIZE}-byte file id, have {have}")
    if file_id == bytes(FILE_ID_SIZE):
        raise FormatError(f"{what}: file id is all zero")
    if with_epoch:
        if file_id[:EPOCH_SIZE] == bytes(EPOCH_SIZE):
            raise FormatError(f"{what}: key epoch 0 (epochs start at 1)")
        if file_id[EPOCH_SIZE:] == bytes(_RANDOM_SIZE):
            raise FormatError(f"{what}: random part of the file id is all zero")


def epoch_of(file_id: bytes, with_epoch: bool) -> int:
    """The ``mk`` epoch an id names (1 for an id without an epoch)."""
    return int.from_bytes(file_id[:EPOCH_SIZE], "big") if with_epoch else FIRST_EPOCH


def new(epoch: int | None) -> bytes:
    """A fresh id: with ``epoch`` in it, or (None) 16 random bytes."""
    if epoch is not None and not FIRST_EPOCH <= epoch <= MAX_EPOCH:
        raise ValueError(f"key epoch: want {FIRST_EPOCH}..{MAX_EPOCH}, have {epoch}")
    prefix = b"" if epoch is None else epoch.to_bytes(EPOCH_SIZE, "big")
    size = FILE_ID_SIZE - len(prefix)
    while True:
        rand = os.urandom(size)
        if rand != bytes(size):
            return prefix + rand
