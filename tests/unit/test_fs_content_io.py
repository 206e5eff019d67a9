"""FileContent reads and writes against a model, without FUSE: every window, every torn tail.

``FileContent.read`` learns the file's size from its own pread (it asks for BLOCK_OVERHEAD + 1
bytes past the request) instead of an fstat. The rule it must keep is the one the fstat gave:
bytes of intact blocks come back exactly, a request that reaches the end of a file whose size
no plaintext gives (a torn tail) fails with BlockIntegrityError, and nothing past the end is
invented. ``_reference_read`` is that rule written the slow, obvious way.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
from pathlib import Path
from typing import Any

import pytest

from kmsfs.crypto.content import (
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    CIPHER_BLOCK_SIZE,
    FormatError,
    cipher_offset,
    plain_size,
    plain_size_lenient,
)
from kmsfs.fs.files import FILL_BLOCKS, BlockIntegrityError, ContentKeys, FileContent


class _Deriver:
    current_epoch = 1

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        return hmac.new(b"k" * 32, info, hashlib.sha256).digest()


def _content(path: Path) -> FileContent:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    return FileContent(fd, ContentKeys(_Deriver(), key_epochs=True))


def _reference_read(plain: bytes, csize: int, offset: int, size: int) -> bytes | None:
    """What a read must give (None: BlockIntegrityError), from the plaintext and the size."""
    try:
        psize, torn = plain_size(csize), False
    except FormatError:
        psize, torn = plain_size_lenient(csize), True
    if torn and offset + size >= psize:
        return None
    return plain[offset : min(offset + size, psize)]


WINDOWS = [
    (off, size)
    for off in (0, 1, 4095, 4096, 4097, 8191, 8192, 12288, 12388, 20000)
    for size in (1, 100, 4096, 4097, 8192, 131072)
]


@pytest.mark.parametrize("length", [0, 1, 4096, 8192, 3 * 4096 + 100])
def test_reads_match_the_plaintext(tmp_path: Path, length: int) -> None:
    plain = os.urandom(length)
    content = _content(tmp_path / "f")
    content.write(0, plain)
    csize = content.cipher_size()
    for off, size in WINDOWS:
        assert bytes(content.read(off, size)) == _reference_read(plain, csize, off, size)


@pytest.mark.parametrize(
    "cut",
    # at a block boundary, inside the overhead of a would-be block, one byte past it, mid-block
    [cipher_offset(2), cipher_offset(2) + 1, cipher_offset(2) + BLOCK_OVERHEAD,
     cipher_offset(2) + BLOCK_OVERHEAD + 1, cipher_offset(2) + 1000, cipher_offset(1) + 10,
     cipher_offset(0)],
)
def test_torn_tails_fail_exactly_where_the_size_says(tmp_path: Path, cut: int) -> None:
    plain = os.urandom(3 * BLOCK_SIZE + 100)
    content = _content(tmp_path / "f")
    content.write(0, plain)
    full_size = content.cipher_size()
    os.ftruncate(content.fd, cut)

    def intact(block: int) -> bool:  # all of its original ciphertext is still there
        return min(cipher_offset(block + 1), full_size) <= cut

    for off, size in WINDOWS:
        want = _reference_read(plain, cut, off, size)
        end = off + len(want) if want is not None else off
        touched = range(off // BLOCK_SIZE, -(-end // BLOCK_SIZE)) if end > off else range(0)
        if want is not None and all(intact(b) for b in touched):
            assert bytes(content.read(off, size)) == want, (off, size)
        else:  # torn at the end, or a block cut short (it cannot authenticate)
            with pytest.raises(BlockIntegrityError):
                content.read(off, size)


class _FullDisk:
    """os.pwrite for one file on a disk that can hold *room* more bytes of it: a write past
    that is cut short, and one that gets nothing fails with ENOSPC (as on tmpfs). Shrinking
    the file frees space again."""

    def __init__(self, fd: int, room: int) -> None:
        self.limit = os.fstat(fd).st_size + room
        self.real = os.pwrite

    def __call__(self, fd: int, data: Any, offset: int) -> int:
        fits = self.limit - offset
        if fits >= len(data):
            return self.real(fd, data, offset)
        if fits <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.real(fd, bytes(data)[:fits], offset)


@pytest.mark.parametrize("old_size", [0, 10, 4096, 5000, 3 * BLOCK_SIZE])
@pytest.mark.parametrize(("offset", "length"), [(0, 100), (7, 9000), (4090, 12), (5000, 5000)])
def test_full_disk_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_size: int, offset: int, length: int
) -> None:
    """Every write that runs out of space, wherever it stops, leaves the old bytes readable.

    Writes that grow the file rewrite its old last block too, in the same pwrite: if that
    pwrite is cut short past the end, the old bytes it overwrote must be put back and the file
    cut back, or that block stays half old, half new, and unreadable for good.
    """
    old = os.urandom(old_size)
    new = os.urandom(length)
    for room in range(0, 3 * CIPHER_BLOCK_SIZE, 700):
        content = _content(tmp_path / f"f{room}")
        if old:
            content.write(0, old)
        monkeypatch.setattr(os, "pwrite", _FullDisk(content.fd, room))
        try:
            content.write(offset, new)
            wrote = True
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            wrote = False
        finally:
            monkeypatch.undo()
        if wrote:
            want = bytearray(old.ljust(offset, b"\0"))
            want[offset : offset + length] = new
        else:
            want = bytearray(old)
        assert content.plain_size() == len(want), room
        assert bytes(content.read(0, len(want) + 1)) == want, room
        os.close(content.fd)


@pytest.mark.parametrize("start", [0, 5000, 4096 * 16 - 1])
def test_growing_over_many_fill_pwrites_gives_zeros_every_block_authenticates(
    tmp_path: Path, start: int
) -> None:
    """A truncate up, then a write far past the end: encrypted zeros in FILL_BLOCKS pieces,
    from any start (unaligned, or one byte short of a piece)."""
    content = _content(tmp_path / "f")
    try:
        head = os.urandom(start)
        if head:
            content.write(0, head)
        grown = start + 3 * FILL_BLOCKS * BLOCK_SIZE + 777
        content.truncate(grown)
        far = grown + FILL_BLOCKS * BLOCK_SIZE + 5
        content.write(far, b"z")
        expect = head + bytes(far - start) + b"z"
        assert content.plain_size() == len(expect)
        assert bytes(content.read(0, len(expect) + 10)) == expect
        assert plain_size(content.cipher_size()) == len(expect)  # whole blocks, no torn tail
    finally:
        os.close(content.fd)


def test_a_write_far_past_the_end_is_refused_before_it_starts(tmp_path: Path) -> None:
    """``max_fill``: the fs runs such a write in a worker thread instead of on the request
    loop (ContentOps.write), so it must be told before any zero is written."""
    from kmsfs.fs.files import LongFill

    content = _content(tmp_path / "f")
    content.write(0, b"abc")
    before = (tmp_path / "f").read_bytes()
    with pytest.raises(LongFill) as info:
        content.write(10 * 4096, b"x", max_fill=4 * 4096)
    assert info.value.args[0] == 10 * 4096 - 3
    assert (tmp_path / "f").read_bytes() == before
    assert content.write(5 * 4096, b"y", max_fill=5 * 4096) == 1  # a gap within bounds
    assert content.read(0, 5 * 4096 + 1) == b"abc" + bytes(5 * 4096 - 3) + b"y"


def _flip(path: Path, block_no: int, at: int = 100) -> bytes:
    """Flip one ciphertext byte of block *block_no*; the file's bytes after the flip."""
    with open(path, "r+b") as f:
        f.seek(cipher_offset(block_no) + at)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    return path.read_bytes()


@pytest.mark.parametrize(
    "change",
    ["write inside", "write across its end", "truncate into it", "append to it"],
)
def test_a_change_to_a_tampered_block_fails_and_never_launders_it(
    tmp_path: Path, change: str
) -> None:
    """Every read-modify-write decrypts the block it changes: a tampered one fails
    (BlockIntegrityError, EIO through the mount) and the file stays byte for byte as it was;
    a write that re-encrypted whatever it found there would turn the tampering into valid
    data (zeros, say) that later reads accept (DESIGN §2.4)."""
    path = tmp_path / "f"
    content = _content(path)
    last_partial = change == "append to it"
    content.write(0, os.urandom(BLOCK_SIZE + (100 if last_partial else 3 * BLOCK_SIZE)))
    damaged = _flip(path, 1)
    with pytest.raises(BlockIntegrityError) as info:
        if change == "write inside":
            content.write(BLOCK_SIZE + 10, b"zz")
        elif change == "write across its end":
            content.write(2 * BLOCK_SIZE - 1, b"zz")
        elif change == "truncate into it":
            content.truncate(BLOCK_SIZE + 10)
        else:
            content.write(BLOCK_SIZE + 100, b"more")
    assert info.value.block == 1
    assert path.read_bytes() == damaged
    with pytest.raises(BlockIntegrityError):
        content.read(BLOCK_SIZE, 10)


def test_a_read_names_the_block_that_failed_not_the_first_it_asked_for(tmp_path: Path) -> None:
    """The log line says which block to look at (fsck and the log agree)."""
    path = tmp_path / "f"
    content = _content(path)
    content.write(0, os.urandom(4 * BLOCK_SIZE))
    _flip(path, 2)
    with pytest.raises(BlockIntegrityError) as info:
        content.read(0, 4 * BLOCK_SIZE)
    assert info.value.block == 2
    assert bytes(content.read(0, 2 * BLOCK_SIZE))  # the blocks before it still read


@pytest.mark.parametrize("blocks", [0, 1, 2, 3])
def test_truncating_down_to_a_block_boundary_keeps_exactly_those_blocks(
    tmp_path: Path, blocks: int
) -> None:
    """From 5 blocks and 100 bytes down to a multiple of the block size: the file keeps that
    many whole blocks, no more (a cut one block short would bring cut data back)."""
    path = tmp_path / "f"
    content = _content(path)
    plain = os.urandom(5 * BLOCK_SIZE + 100)
    content.write(0, plain)
    content.truncate(blocks * BLOCK_SIZE)
    assert content.cipher_size() == os.path.getsize(path)
    assert plain_size(os.path.getsize(path)) == blocks * BLOCK_SIZE
    assert bytes(content.read(0, len(plain))) == plain[: blocks * BLOCK_SIZE]
    content.truncate(len(plain))  # grown again: the cut part reads as zeros
    assert bytes(content.read(0, len(plain))) == (
        plain[: blocks * BLOCK_SIZE] + bytes(len(plain) - blocks * BLOCK_SIZE)
    )
