"""Encrypted content of one open ciphertext file: block reads, writes and truncation.

Layout (docs/format.md, "Content"): an 18-byte header (version, file id) then 4124-byte
ciphertext blocks, each AES-256-GCM of up to 4096 plaintext bytes bound to the file id and its
block number; an empty file has no header at all. The file key is derived with the ``mk`` epoch
the header names; a new header (first write, or a write after truncate to 0) gets the Domain's
current epoch on a volume with the KeyEpochs flag, and a version 1 header (epoch 1) otherwise
(:class:`ContentKeys`). Everything here is synchronous and runs under
the per-file lock held by the caller (``operations``), because a reader that raced a writer
could see half a block and report a false integrity failure.

Crash safety: a write rewrites whole ciphertext blocks with one ``pwrite`` per call (at most
``CHUNK_BLOCKS`` blocks), and a full disk leaves the file as it was (:func:`_pwrite_all`). The
kernel can still cut a pwrite short at a page boundary when the daemon is killed, which tears
the block there; so a write over bytes the file already has (and the cut-then-write of a
shrinking truncate) is first recorded in the volume's write journal, which the next mount
replays, and a write past the end gets a tail record, with which the next mount cuts off the
last block it tore (:mod:`kmsfs.fs.journal`, :meth:`FileContent._overwrite`). Holes are
encrypted zero blocks: an unauthenticated zero block is never accepted as data.

Space: ciphertext files are never sparse, so a hole costs its full size on the backing disk. A
gap (a write past the end, a truncate or fallocate that grows the file) is filled only if the
backing file system has the room for it (:func:`check_room`): one that cannot fit fails with
ENOSPC before anything is written, instead of filling the disk and being cut back.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from kmsfs.crypto.content import (
    BLOCK_OVERHEAD,
    BLOCK_SIZE,
    CIPHER_BLOCK_SIZE,
    FIRST_EPOCH,
    HEADER_SIZE,
    VERSION_1,
    ContentCipher,
    FileHeader,
    cipher_offset,
    cipher_size,
    file_key_info,
    plain_size,
    plain_size_lenient,
)
from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs.journal import WriteJournal
from kmsfs.fs.posix import pwrite_fully as _pwrite_fully  # one seam: crash tests cut it

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: How many keys of new files :meth:`ContentKeys.derive_ahead` keeps ready: this many once a
#: mount starts a new file, doubled while new files come fast, up to KEYS_AHEAD_MAX.
KEYS_AHEAD_MIN = 4
KEYS_AHEAD_MAX = 32
#: How long one :meth:`ContentKeys.derive_ahead` call may go on deriving. The daemon answers no
#: request meanwhile, so this bounds the wait it adds (plus one derivation, however slow).
AHEAD_BUDGET_SECONDS = 0.0005
#: Keys running low within this long of the last refill means new files come fast: twice as
#: many are kept ready from then on.
AHEAD_FAST_SECONDS = 1.0
CHUNK_BLOCKS = 256  # 1 MiB of plaintext per pwrite: bounds memory for big writes
#: Blocks of encrypted zeros per pwrite when a file grows by truncate or a write past its end.
#: Not CHUNK_BLOCKS: ext4 (Linux 6.18) caches what one 1 MiB pwrite writes as one 1 MiB folio,
#: and every later small write into it walks the folio's 256 buffer heads twice. Grown in 1 MiB
#: pwrites, as fio does with ftruncate before its random writes, a file then took 4 KiB random
#: writes at 16.5k/s; grown in 64 KiB ones at 18k/s. Growing 64 MiB took 73 ms instead of 43.
FILL_BLOCKS = 16
_ZEROS = bytes(BLOCK_SIZE * FILL_BLOCKS)


class BlockIntegrityError(IntegrityError):
    """A ciphertext block (or the header) failed to authenticate; ``block`` says which."""

    def __init__(self, block: int, reason: str) -> None:
        super().__init__(f"block {block}: {reason}")
        self.block = block


class LongFill(Exception):
    """A write would first fill more of a gap with encrypted zeros than ``max_fill`` allows.

    Raised before anything is written, so the caller can run the write where a long job
    belongs (a worker thread) instead of stalling every other request of the mount.
    """


class ContentKeys:
    """How one volume keys file contents: the Domain's deriver, and the header of a new file.

    ``key_epochs`` is the volume's KeyEpochs flag: with it a new file gets a version 2 header at
    ``deriver.current_epoch`` (read for every new header, so it is the epoch the deriver has
    now); without it a version 1 header (epoch 1) while the Domain is at epoch 1, so a volume
    that an older kmsfs may still mount never gets a header it cannot read. Once the Domain
    has rotated, version 2 headers whatever the flag says (see :meth:`_versioned`).

    Keys derived ahead: once a mount has started a new file, :meth:`derive_ahead` (called by
    the daemon while it waits for the next request) keeps headers of files yet to be written
    ready with their keys, so the HSM call of a new file (10-40 µs with SoftHSM, much more with
    a network HSM) is not on the path of its first write. They are held only in this object,
    like the keys of open files, and are the keys of files that do not exist yet: no data is
    readable with them. A mount that never writes a new file never derives ahead.

    How many: :data:`KEYS_AHEAD_MIN` at first. A refill starts when a quarter of them is left
    and fills them all; one that starts within :data:`AHEAD_FAST_SECONDS` of the last one ended
    doubles the number (up to :data:`KEYS_AHEAD_MAX`). So only a mount that creates files fast
    (tar, cp -r) holds many, and one that stops writing leaves at most that many unused.
    Refilling in runs is what makes them cheap: with SoftHSM2, one HMAC alone inside the daemon
    took 35-40 µs (its code and data evicted from the CPU caches by the requests in between),
    and 18 µs on average in runs. Deriving one per wait, as before, saved nothing over deriving
    on the write's path; runs took tar -x of 5,400 files from 2.06 s to 1.93 s. A run stops
    after :data:`AHEAD_BUDGET_SECONDS`, since requests wait meanwhile, and goes on at the next
    wait.
    """

    def __init__(self, deriver: Any, key_epochs: bool) -> None:
        self._deriver = deriver
        self.key_epochs = key_epochs
        self._ahead: collections.deque[tuple[FileHeader, ContentCipher]] = collections.deque()
        self._wanted = 0  # how many to keep ready: 0 until the first new file
        self._refilling = False  # a refill started (at a quarter of wanted) and is not done
        self._refilled = -AHEAD_FAST_SECONDS  # time.monotonic() when the last refill ended
        self._batch = KEYS_AHEAD_MIN  # keys per derive_many request (adapts to their cost)

    def new_file(self) -> tuple[FileHeader, ContentCipher]:
        """A fresh header and its cipher, for the first write of an empty file."""
        if self._wanted == 0:
            self._wanted = KEYS_AHEAD_MIN
        while True:
            try:  # popleft is atomic: two worker threads may start files at once
                header, cipher = self._ahead.popleft()
            except IndexError:
                break
            # Not if the Domain rotated since, nor if a retirement the deriver took in since
            # (DomainKeys.follow_store) refuses their epoch: a file keyed with it would be lost
            # at the next mount. The write then derives anew and fails (EIO).
            if header.epoch == self._new_epoch() and not self.refuses(header.epoch):
                return header, cipher
        header = self.new_header()
        return header, self.cipher(header)

    def refuses(self, epoch: int) -> bool:
        """Whether the deriver has taken in a retirement of *epoch* since it was opened
        (DomainKeys.follow_store): keys of that epoch already derived, for open files or
        ahead, must not be used either."""
        return epoch < getattr(self._deriver, "retired_below", FIRST_EPOCH)

    @property
    def wanted(self) -> int:
        """How many keys derive_ahead keeps ready now (0 until the mount's first new file)."""
        return self._wanted

    def derive_ahead(self, budget: float = AHEAD_BUDGET_SECONDS) -> bool:
        """Derive keys ahead until as many as wanted are ready or *budget* seconds have gone
        (always at least one if any is wanted); False if there was nothing to do.

        Never raises: a failing HSM stops it until the next new file, whose own derivation then
        reports the error."""
        ready = len(self._ahead)
        if ready >= self._wanted:
            self._refilling = False
            return False
        if not self._refilling:
            if ready > self._wanted // 4:
                return False  # not yet: refills are cheap only in runs
            if time.monotonic() - self._refilled < AHEAD_FAST_SECONDS:
                self._wanted = min(self._wanted * 2, KEYS_AHEAD_MAX)
            self._refilling = True
        deadline = time.perf_counter() + budget
        while True:
            try:
                self._derive_some(min(self._wanted - len(self._ahead), self._batch), budget)
            except Exception as exc:  # HsmError, an agent gone...: the next write will say
                log.debug("deriving a key ahead failed: %s", exc)
                self._wanted = 0
                self._refilling = False
                return False
            if len(self._ahead) >= self._wanted:
                self._refilling = False
                self._refilled = time.monotonic()
                return True
            if time.perf_counter() >= deadline:
                return True

    def _derive_some(self, count: int, budget: float) -> None:
        """Derive up to *count* keys ahead: all in one request if the deriver takes batches
        (``derive_many``: the agent, one round trip for them all), else one.

        Through a local kmsfs-hsmd a key alone took 174 µs, and 18 µs each 32 to a request.
        A batch is one wait for the daemon too, so its size follows what the last one cost:
        as many keys as *budget* allowed at that rate (1 to :data:`KEYS_AHEAD_MAX`).
        """
        derive_many = getattr(self._deriver, "derive_many", None)
        if derive_many is None:
            header = self.new_header()
            self._ahead.append((header, self.cipher(header)))
            return
        epoch = self._new_epoch()
        headers = [self.new_header(epoch) for _ in range(count)]
        started = time.perf_counter()
        keys = derive_many([file_key_info(h.file_id) for h in headers], epoch)
        seconds_per_key = (time.perf_counter() - started) / count
        fit = int(budget / seconds_per_key) if seconds_per_key > 0 else KEYS_AHEAD_MAX
        self._batch = max(1, min(fit, KEYS_AHEAD_MAX))
        self._ahead.extend(
            (header, ContentCipher(key, header)) for header, key in zip(headers, keys, strict=True)
        )

    def _versioned(self) -> bool:
        """Whether new files get version 2 headers at the current epoch: with the KeyEpochs
        flag, and without it too once the Domain has rotated. kmsfs.conf is not authenticated:
        a writer of the ciphertext directory who strips the flag must not put new files back
        on the key of epoch 1, which an HSM removed before the rotation may hold. Every kmsfs
        that opens a rotated (hence bound, format 2) Domain reads version 2 headers."""
        return self.key_epochs or self._deriver.current_epoch > FIRST_EPOCH

    def _new_epoch(self) -> int:
        return self._deriver.current_epoch if self._versioned() else FIRST_EPOCH

    def new_header(self, epoch: int | None = None) -> FileHeader:
        """A header for a new file: at *epoch* (None: the Domain's current one) with the
        KeyEpochs flag or a rotated Domain, else version 1 at epoch 1."""
        if self._versioned():
            return FileHeader.new(self._deriver.current_epoch if epoch is None else epoch)
        return FileHeader.new(FIRST_EPOCH, version=VERSION_1)

    def cipher(self, header: FileHeader) -> ContentCipher:
        """The cipher of a file with this header: its key derived at the header's epoch.

        IntegrityError if the Domain has no such epoch (e.g. the file was written after a
        rotation this deriver's Domain does not know)."""
        key = self._deriver.derive(file_key_info(header.file_id), epoch=header.epoch)
        return ContentCipher(key, header)


class FileContent:
    """Reads and writes plaintext through one fd on a ciphertext file.

    ``keys`` derives the file key (through the Domain's KeyDeriver) once, when the header is
    first needed; it is dropped with this object.
    """

    def __init__(
        self, fd: int, keys: ContentKeys, path: bytes = b"", journal: WriteJournal | None = None
    ) -> None:
        self.fd = fd
        self._keys = keys
        self._cipher: ContentCipher | None = None
        self._header = b""  # the on-disk bytes of the header self._cipher was made from
        self._header_matches = False  # checked against block 0 (or made here) before writing
        self._journal = journal
        # Where it is, kept current by :meth:`moved`: journal records name it (a replay that
        # finds another header at a record's path leaves that record alone). Made relative
        # at the first overwrite (most files opened are never overwritten), and kept with the
        # path it was made from: an overwrite in a worker thread may read the path just
        # before a rename on the trio thread changes it, and must not leave its relative
        # form of the old path for the writes after.
        self._path = path
        self._journal_path: tuple[bytes, bytes] | None = None  # (path, relative form)

    def moved(self, old: bytes, new: bytes) -> bool:
        """Ciphertext path *old* is now *new*: the file or a directory above it was renamed.
        True if the file was there (its path changed)."""
        path = self._path
        if path == old or path.startswith(old + b"/"):
            self._path = new + path[len(old) :]
            return True
        return False

    def exchanged(self, a: bytes, b: bytes) -> None:
        """RENAME_EXCHANGE of ciphertext paths *a* and *b* (disjoint: the kernel refuses to
        exchange a directory with one inside it). One assignment, so that a worker thread
        never reads a path half-way through the exchange."""
        if not self.moved(a, b):
            self.moved(b, a)

    # --- sizes and header ---------------------------------------------------------------
    def cipher_size(self) -> int:
        """The ciphertext file's size. lseek, not fstat: every write asks, and fstat's result
        object cost 5 us of a 4 KiB random write's 50 (measured in the daemon). Every use of
        the fd is positional (pread, pwrite), so moving its offset changes nothing."""
        return os.lseek(self.fd, 0, os.SEEK_END)

    def plain_size(self) -> int:
        return plain_size_lenient(self.cipher_size())

    def _cipher_for_existing(self) -> ContentCipher:
        """Cipher of a non-empty file, reading and checking its header on first use."""
        cipher = self._cipher
        if cipher is not None and self._keys.refuses(cipher.header.epoch):
            # Derived before a retirement reached the deriver (a file held open across it):
            # derive it again, which is refused, so it reads and writes EIO from now on.
            self._cipher = None
        if self._cipher is None:
            raw = quiet_pread(self.fd, HEADER_SIZE, 0)
            try:
                header = FileHeader.parse(raw)
            except FormatError as exc:
                raise BlockIntegrityError(-1, f"bad header: {exc}") from None
            try:
                self._cipher = self._keys.cipher(header)
            except IntegrityError as exc:  # an epoch the Domain does not have
                raise BlockIntegrityError(-1, f"file key epoch {header.epoch}: {exc}") from None
            self._header = bytes(raw)
        return self._cipher

    def load_key(self) -> bool:
        """Read the header and derive the file key now, if the file has a header and its key
        is not loaded yet; True if it derived one.

        For the pause after an open (:meth:`OpenFiles.key_one`): the key of a file just
        opened for reading is derived while the client turns the open's reply into a READ,
        not on that READ's path. Reads the header as the daemon's own read (atime stays,
        should no user read follow). A failure is left for the read that needs the key,
        which reports it (EIO and a log line naming the file).
        """
        if self._cipher is not None:
            return False
        try:
            self._cipher_for_existing()
        except BlockIntegrityError:
            return False  # empty (no key to derive), torn, or an epoch it lacks: the read says
        return True

    def _start_file(self) -> bytes:
        """Make a fresh header for an empty file; returns its bytes to write at offset 0."""
        header, self._cipher = self._keys.new_file()
        self._header = header.pack()
        self._header_matches = True
        return self._header

    def _cipher_for_writing(self) -> ContentCipher:
        """The cipher to write under, its header checked once against the file's block 0.

        A header copied alone from another file would otherwise have the user's writes
        encrypted under that file's id and key, ready to be moved into it unnoticed
        (docs/threat-model.md §1). Reads need no such check: every block they return
        authenticates against the header."""
        cipher = self._cipher_for_existing()
        if not self._header_matches:
            first = quiet_pread(self.fd, CIPHER_BLOCK_SIZE, HEADER_SIZE)
            if first:
                try:
                    cipher.decrypt_block(0, first)
                except IntegrityError:
                    raise BlockIntegrityError(
                        0, "the header does not match block 0 (copied from another file?)"
                    ) from None
            self._header_matches = True
        return cipher

    def _overwrite(
        self,
        data: bytes | bytearray,
        offset: int,
        csize: int,
        write: Callable[[], _T],
        may_go_unrecorded: bool = False,
    ) -> _T:
        """Run *write* (which puts *data* at ciphertext *offset* of a file of ciphertext size
        *csize*) with a journal record: a daemon killed in the middle would tear a block
        (kmsfs.fs.journal).

        A write over bytes the file has gets a redo record, with *data*: the next mount puts
        back what it tore. One whose record cannot be written is refused (the journal's
        OSError, ENOSPC), unless *may_go_unrecorded* (a truncate's shortened block). A write
        past the end (*offset* >= *csize*: an append of whole
        blocks, a new file's first write, the zeros that fill a gap) risks no older data, but
        the block it tears is the file's last: without a record the file read EIO at its end
        ever after, and every later append, which reads that block, failed too. So it gets a
        tail record: the file's size before it and no data (a few dozen bytes, one pwritev,
        like the mark after it), and the next mount cuts that torn last block off (the file
        keeps what the write finished, as ext4 does). Even a new file's first write gets one
        (most writes of tar -x or cp are such): an empty file to write again is better than one
        that reads EIO. Measured with tools/profile_fs.py --workdir /dev/shm (tar -x of 5,000
        files, 10,218 writes, on a loaded 2-CPU machine, three runs each, alternated): the
        write handler's mean went from 91.8 to 96.0 us (some 4 us, 43 ms in all), under 1 %
        of the phase (6-7 s), which its noise hid (docs/format.md)."""
        journal = self._journal
        if journal is None or not self._header:
            return write()
        path, made = self._path, self._journal_path
        if made is None or made[0] != path:
            made = self._journal_path = (path, journal.relative(path))
        if offset >= csize:
            at = journal.begin_tail(made[1], self._header, offset)
        else:
            try:
                at = journal.begin(made[1], self._header, offset, data)
            except OSError:
                if not may_go_unrecorded:
                    raise
                at = None
        if at is None:
            # Unrecorded (a tail record the full journal had no room for, or a path too long
            # for one): older records of these blocks, returned and not yet marked, must not
            # outlive it, or a replay would put them back over it.
            journal.settle()
        try:
            result = write()
        except OSError:
            # Marked done at once: a write that grew the file and failed was cut back, and its
            # record must not put the cut blocks back in a replay.
            journal.done(at)
            journal.settle()
            raise
        journal.done(at)
        return result

    def forget_journal(self) -> None:
        """Write unrecorded from now on: the file has no link left (OpenFiles.unlinked). A
        record begun before still gets its done mark (_overwrite holds the journal)."""
        self._journal = None

    def forget_header(self) -> None:
        """The file became empty (truncate to 0): the next write starts a new header."""
        self._cipher = None
        self._header = b""
        self._header_matches = False

    # --- blocks -------------------------------------------------------------------------
    def _decrypt(self, block_no: int, raw: bytes) -> bytes:
        cipher = self._cipher_for_existing()
        try:
            return cipher.decrypt_block(block_no, raw)
        except (IntegrityError, FormatError) as exc:
            raise BlockIntegrityError(block_no, str(exc) or type(exc).__name__) from None

    def _read_block(self, block_no: int) -> bytes:
        return self._read_block_and_raw(block_no)[0]

    def _read_block_and_raw(self, block_no: int) -> tuple[bytes, bytes]:
        """(plaintext, ciphertext) of one block; both empty past the end of the file."""
        raw = quiet_pread(self.fd, CIPHER_BLOCK_SIZE, cipher_offset(block_no))
        if not raw:
            return b"", b""
        return self._decrypt(block_no, raw), raw

    def _decrypt_run(self, first: int, raw: bytes) -> bytearray:
        """Decrypt consecutive blocks read back to back (one AEAD call each, one buffer)."""
        cipher = self._cipher_for_existing()
        try:
            return cipher.decrypt_blocks(first, raw)
        except (IntegrityError, FormatError):
            pass
        # Rare path: find and name the block that failed.
        cbs = CIPHER_BLOCK_SIZE
        for i in range(-(-len(raw) // cbs)):
            self._decrypt(first + i, raw[i * cbs : (i + 1) * cbs])
        raise BlockIntegrityError(first, "authentication failed")  # not reached

    def read(self, offset: int, size: int) -> bytes | bytearray | memoryview:
        """Plaintext bytes [offset, offset+size) clipped at EOF; BlockIntegrityError on tamper.

        One pread of the covered ciphertext blocks and one decryption pass. The file's size
        matters only near its end, and the pread tells it: it asks for BLOCK_OVERHEAD + 1 bytes
        more than the blocks, so a pread that gets them all shows at least one more plausible
        block after the request (no end in sight), and a shorter one ends exactly where the file
        does, torn tail included (an fstat only for a request wholly past the end). Returns any
        contiguous buffer: pyfuse3 replies from it without a copy.
        """
        if size <= 0:
            return b""
        first, last = offset // BLOCK_SIZE, (offset + size - 1) // BLOCK_SIZE
        start = cipher_offset(first)
        want = cipher_offset(last) + CIPHER_BLOCK_SIZE - start
        raw: bytes | memoryview = os.pread(self.fd, want + BLOCK_OVERHEAD + 1, start)
        end = offset + size
        if len(raw) > want + BLOCK_OVERHEAD:  # the file goes on after the request
            raw = memoryview(raw)[:want]
        else:  # the request reaches the end of the file
            csize = start + len(raw) if raw else self.cipher_size()
            try:
                psize = plain_size(csize)
                torn = False
            except FormatError:
                psize, torn = plain_size_lenient(csize), True
            if torn and end >= psize:
                raise BlockIntegrityError(psize // BLOCK_SIZE, "ciphertext size is impossible")
            end = min(end, psize)
            if offset >= end:
                return b""
            last = (end - 1) // BLOCK_SIZE
            raw = memoryview(raw)[: cipher_offset(last) + CIPHER_BLOCK_SIZE - start]
        data = self._decrypt_run(first, raw)
        skip = offset - first * BLOCK_SIZE
        if skip == 0 and len(data) == end - offset:
            return data
        return memoryview(data)[skip : skip + end - offset]

    def write(self, offset: int, data: bytes, max_fill: int | None = None) -> int:
        """Write *data* at *offset*, filling any gap after EOF with encrypted zeros.

        If the disk fills up, the file keeps its old size: a gap already filled with zeros is
        cut off again (ext4 does not grow a file on a failed write either); one the disk
        cannot hold fails at once (:meth:`_fill_zeros`). A gap longer than *max_fill* raises
        :class:`LongFill` before anything is written.
        """
        csize = self.cipher_size()
        psize = old_psize = plain_size_lenient(csize)
        if max_fill is not None and offset - psize > max_fill:
            raise LongFill(offset - psize)
        try:
            if offset > psize:
                csize = self._fill_zeros(psize, offset, csize, offset + len(data))
                psize = offset
            view = memoryview(data)
            step = BLOCK_SIZE * CHUNK_BLOCKS
            pos = 0
            while pos < len(data):
                n = min(step - (offset + pos) % BLOCK_SIZE, len(data) - pos)
                csize = self._write_span(offset + pos, view[pos : pos + n], psize, csize)
                pos += n
                psize = max(psize, offset + pos)
        except OSError:
            if offset > old_psize and self.plain_size() > old_psize:
                with contextlib.suppress(OSError, IntegrityError):
                    self.truncate(old_psize)  # needs no new space
            raise
        return len(data)

    def _fill_zeros(self, start: int, end: int, csize: int, grow_to: int = 0) -> int:
        """Encrypted zeros over plaintext [start, end); returns the new ciphertext size.

        Every gap a write or a truncate (fallocate is one) fills goes through here, so this is
        where a fill the backing disk cannot hold is refused, with ENOSPC before anything is
        written (:func:`check_room`): the file's growth to plaintext size *grow_to* (at least
        *end*; a write passes where its data ends) must fit.
        """
        check_room(self.fd, csize, cipher_size(max(end, grow_to)))
        pos = start
        while pos < end:
            n = min(len(_ZEROS) - pos % BLOCK_SIZE, end - pos)
            csize = self._write_span(pos, memoryview(_ZEROS)[:n], pos, csize)
            pos += n
        return csize

    def _write_span(self, offset: int, data: memoryview, psize: int, csize: int) -> int:
        """Rewrite the blocks covering [offset, offset+len(data)); requires offset <= psize.

        *csize* is the ciphertext size now; returns it after the write.
        """
        prefix = b""
        if psize == 0 and csize <= HEADER_SIZE:  # empty, or a header with no block: start anew
            prefix = self._start_file()
        end = offset + len(data)
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        head = offset - first * BLOCK_SIZE
        old_first = raw_first = b""
        if head and first * BLOCK_SIZE < psize:
            old_first, raw_first = self._read_block_and_raw(first)
        plain: bytes | bytearray | memoryview = data
        if head or (end < psize and end % BLOCK_SIZE):  # partial blocks: read-modify-write
            plain = bytearray(old_first[:head])
            plain += data
            if end < psize and end % BLOCK_SIZE:
                old_last = old_first if last == first and old_first else self._read_block(last)
                plain += old_last[end - last * BLOCK_SIZE :]
        out = self._cipher_for_writing().encrypt_blocks(first, plain)
        if prefix:  # a tail record of size 0: a kill in this write leaves an empty file
            return self._overwrite(b"", 0, 0, lambda: _pwrite_all(self.fd, prefix + out, 0, csize))
        start = cipher_offset(first)
        # Appending to a partial last block: its old bytes, just read, are all the write covers.
        covered = raw_first if start + len(raw_first) == csize else None
        return self._overwrite(
            out, start, csize, lambda: _pwrite_all(self.fd, out, start, csize, covered)
        )

    def truncate(self, size: int) -> None:
        """Set the plaintext size; shrinking re-encrypts a partial last block.

        A cut inside a block (``block``, kept to ``rest`` bytes) first cuts the ciphertext to
        where the shortened block will end, then writes that block in place over the first
        bytes of the old one. Each step is safe on its own:

        - The cut only shrinks the file (the old block was longer), so it needs no space. The
          space it frees may go to another writer at once (the disk may be full).
        - The write lies wholly inside the file, over blocks it already has: on a file system
          that overwrites in place (ext4, xfs, tmpfs) it needs no new space, so it cannot fail
          for want of it, whoever took the freed space. The other order (cut at the block's
          start, then write the block past the new end) needed new space just then, and a
          full disk lost the kept bytes of that block (ENOSPC, the block gone).
        - Between the two, and during the write, the block holds the first bytes of the old
          block's ciphertext, which do not authenticate. The write journal's record (taken
          by :meth:`_overwrite` before the cut) holds the shortened block: a daemon killed
          there gets it put back at the next mount (the file already has its new size). Killed
          before the cut, the file is as it was: its old block authenticates, and a replay
          leaves it alone.

        The write can still fail for another reason: an I/O error, or ENOSPC where an
        overwrite needs new space (copy-on-write: btrfs, or a reflinked ciphertext file).
        That block is then torn, as by any failed overwrite there, and the error is returned.
        Growing fills the gap with encrypted zeros (:meth:`_fill_zeros`: ENOSPC at once if the
        disk cannot hold them).
        """
        psize = self.plain_size()
        if size < psize and self._journal is not None:
            self._journal.settle()  # a record of a block cut here must not bring it back
        if size == 0:
            os.ftruncate(self.fd, 0)
            self.forget_header()
        elif size < psize:
            block, rest = divmod(size, BLOCK_SIZE)
            if rest == 0:
                os.ftruncate(self.fd, cipher_offset(block))
            else:
                keep = self._read_block(block)[:rest]
                shortened = self._cipher_for_writing().encrypt_block(block, keep)
                at = cipher_offset(block)
                end = at + len(shortened)

                def cut_and_write() -> None:
                    os.ftruncate(self.fd, end)
                    _pwrite_fully(self.fd, memoryview(shortened), at)
                    # On the disk before the call returns: ext4 commits the new size within
                    # 5 s, the rewritten block only when its page is written back (30 s), and
                    # a power cut in between left the new size over the old ciphertext: kept
                    # bytes, fsync'd long before, read EIO. (Truncates into a block are rare.)
                    os.fdatasync(self.fd)

                # Unrecorded if the journal has no room: a truncate frees space, and must work
                # on a full disk (a kill between the cut and the write would cost the kept
                # bytes of that one block, as before the reserve).
                self._overwrite(
                    shortened, at, self.cipher_size(), cut_and_write, may_go_unrecorded=True
                )
        elif size > psize:
            try:
                self._fill_zeros(psize, size, self.cipher_size())
            except OSError:  # the disk filled up: keep the old size, as write() does
                if self.plain_size() > psize:  # not if refused before writing: leave it be
                    with contextlib.suppress(OSError, IntegrityError):
                        self.truncate(psize)  # needs no new space
                raise
        else:
            os.ftruncate(self.fd, self.cipher_size())  # same size: still updates mtime/ctime

    def fsync(self, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self.fd)


def check_room(fd: int, csize: int, new_csize: int) -> None:
    """OSError(ENOSPC) if growing the ciphertext file *fd* from *csize* to *new_csize* bytes
    needs more blocks than its file system has left for the daemon (``fstatvfs``).

    For a gap (:meth:`FileContent._fill_zeros`): without this, a fill the disk cannot hold
    (a truncate up, or a write far past the end) wrote encrypted zeros until the disk was
    full, for as long as that took (minutes for tens of GB, in a worker thread nothing
    interrupts), left every other writer of that disk without space meanwhile, and only then
    failed and was cut back.

    What is left for the daemon: ``f_bavail``, or ``f_bfree`` if it runs as root, since ext4
    lets its reserved uid (root, unless tune2fs -u said otherwise) use the reserved blocks
    too. No margin: the count is of the ciphertext's own blocks, which any file system must
    find (encrypted data does not compress), so a fill refused here could not have fit. One
    that fits only without the file system's own metadata, or loses its room to another
    writer meanwhile, or meets a quota, still fails on the way and is cut back
    (:meth:`FileContent.write`, :meth:`FileContent.truncate`), as before. A file system that
    reports no blocks (some FUSE and network ones) or no figures at all is not checked.
    """
    if new_csize <= csize:
        return
    try:
        st = os.fstatvfs(fd)
    except OSError:
        return
    unit = st.f_frsize or st.f_bsize
    if st.f_blocks <= 0 or unit <= 0:
        return
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail
    need = -(-new_csize // unit) - -(-csize // unit)
    if need > free:
        raise OSError(
            errno.ENOSPC,
            f"{os.strerror(errno.ENOSPC)}: growing the file needs {need} blocks, {free} free",
        )


def quiet_pread(fd: int, size: int, offset: int) -> bytes:
    """A pread that leaves the file's atime alone: the daemon's own reads (the old bytes of a
    partial block it rewrites, a header checked before a write or a truncate) are not reads
    by a user, and ext4 moves atime only for those (never for a write or a truncate).

    O_NOATIME is set on the open file for the call (the daemon owns the ciphertext or has
    CAP_FOWNER); where the kernel refuses it, the read moves atime as before.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & os.O_NOATIME:
        return os.pread(fd, size, offset)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NOATIME)
    except PermissionError:
        return os.pread(fd, size, offset)
    try:
        return os.pread(fd, size, offset)
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def _pwrite_all(
    fd: int, data: bytes | bytearray, offset: int, csize: int, covered: bytes | None = None
) -> int:
    """pwrite all of *data* at *offset* into a file of ciphertext size *csize*; returns the size
    after it. A full disk (ENOSPC, EDQUOT) fails the write and leaves the file as it was.

    One pwrite (which a kill can still cut at a page boundary: the caller records overwrites
    in the write journal first). Only the
    part past the end needs new space (ciphertext files are never sparse), so only a write
    that grows the file can run out of it, possibly after overwriting the old last block in
    place; the old bytes it covers are read first and, if it fails, put back (in place: no
    new space) before the file is cut back to *csize*. gocryptfs reserves the space with
    fallocate instead; that allocated each small piece of a file at once on ext4 (3-5 extents
    per 30 KB file written in pieces, as tar does) and made reads and unlinks slower.
    *covered*, if the caller has them, are the old bytes from *offset* to *csize*.
    """
    end = offset + len(data)
    view = memoryview(data)
    if end <= csize:  # a pure overwrite needs no new space
        _pwrite_fully(fd, view, offset)
        return csize
    old = covered
    if old is None:
        old = quiet_pread(fd, csize - offset, offset) if offset < csize else b""
    try:
        _pwrite_fully(fd, view, offset)
    except OSError:
        _put_back(fd, old, offset, csize)
        raise
    return end


def _put_back(fd: int, old: bytes, offset: int, csize: int) -> None:
    """Undo a write that grew the file and failed: the old bytes it overwrote, then the old
    size. Neither needs new space, so both work on a full disk. If even they fail, the
    caller still raises the write's own error (and fsck names the damaged block)."""
    with contextlib.suppress(OSError):
        if old:
            _pwrite_fully(fd, memoryview(old), offset)
        os.ftruncate(fd, csize)
