"""Redo records of in-place writes, so a daemon killed in the middle of a pwrite tears no block.

Linux cuts a buffered write short at a page boundary when the writer gets SIGKILL (the check
runs before each page). A ciphertext block is 4124 bytes at ``18 + 4124 n``, so every block
straddles a page boundary, and a write cut there leaves one block half new and half old: it no
longer authenticates, and the older data in it, fsync'd or not, would read as EIO
(DESIGN.md §2.5). A write over bytes the file already has (an overwrite, the read-modify-write
of a partial last block when appending, the shortened last block of a truncate) would lose
older data. A write into space the file did not have yet (an append of whole blocks, a new
file's first write, the zeros of a gap) loses none, but leaves a torn last block: the file read
EIO at its end, and every later append (which rewrites that block) failed, for good.

So before an overwrite, kmsfs puts the new ciphertext in ``kmsfs.journal`` in the volume root
(a redo record), and before a write past the end, the file's size before it (a tail record, no
data); it marks the record done once the write has returned (in the pause after the reply, or
before a truncate; :meth:`WriteJournal.done`). The next mount replays the records still live:
every block of a redo record that no longer authenticates on disk, and that its write tore,
gets the record's block, which must itself authenticate as that block of that file (a record
cannot put anything else in a file: an attacker who writes the journal can at most bring back
a valid older block, which they can do directly; docs/threat-model.md); a tail record cuts off
the file's last block if the write tore it (:func:`_apply_tail`), which an attacker could do
directly too. Both check the tear's shape (:func:`_torn_by`, :func:`_apply_tail`), so a record
left live on the disk by a power cut acts only on a tear its own write made.

The journal is not fsync'd: it covers the daemon's death (kill -9, the OOM killer, a crash),
after which the page cache keeps both it and the file. A power cut can still tear a block that
was being overwritten, as on any file system that does not journal data (docs/threat-model.md).
What a replay repairs is fdatasync'd, and only then is the journal emptied and fsync'd, so a
power cut after a mount neither undoes the repair nor brings back the records.

Record (docs/format.md, "Write journal"): ``KJR1`` | state (1: live redo, 2: live tail, 0:
done; a reader skips a state it does not know) | u64 sequence | u32 body length | body | u32
CRC-32; body = u16 path length | path (relative to the volume root) | the file's 18-byte header
| u64 ciphertext offset (a tail record: the size before the write) | ciphertext (none in a tail
record). The CRC covers the sequence, the length and the body up to the ciphertext (which
authenticates block by block). A replay reads records from offset 0 while the sequence goes up
by one; the space is reused from 0 whenever no write is in flight, so what follows the last
record is older and stops the walk. The journal is cut back then if it has grown past
:data:`SHRINK_ABOVE`, to the :data:`RESERVE` it keeps allocated while mounted (so a full disk
leaves room for the record of an overwrite; one that finds none is refused, ENOSPC), and to 0
bytes at a clean unmount.

A record names the path the file had when it was made: the open file's path, which a rename
moves and the removal of that link (unlink, or a rename over it) switches to another link the
daemon knows (KmsfsOps._link_gone). It can still name a path that no longer holds the file: a
link removed while the daemon knew no other, or a rename that landed while a worker thread was
making the record. Then, and when the file at the path has another header, the replay looks
for the record's file by its 18-byte header (:func:`find_headers`): the header holds the
file's random id (16 random bytes, or 14 after the key epoch in a version 2 header), so no two
files made apart share one, and the record goes to the one file (hard links of it count once)
that has it; none (the file is gone), or several (a copy made in the ciphertext tree), and it is
skipped as before. This changes nothing a record can do (its blocks must still authenticate as
that file's), and costs one walk of the tree, reading the first 18 bytes of every file, only
at a mount after a crash that left such a record, for all such records at once.

Whoever can write the ciphertext directory can write the journal, and plant symlinks in the
tree; the replay runs as the daemon (root) before it serves. So it never leaves the volume:
every path it opens, a record's or one the search lists, is resolved below a descriptor of the
root without following any symlink (:func:`kmsfs.fs.longpath.open_dir_beneath`: openat2
RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, or one O_NOFOLLOW open per directory), and the file
itself is opened O_NOFOLLOW. A record whose path crosses a symlink is skipped with a log line
naming the record; a symlink where its file was counts as the file gone (the search above).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NoReturn

from kmsfs.crypto.content import CIPHER_BLOCK_SIZE, HEADER_SIZE, ContentCipher, FileHeader
from kmsfs.crypto.names import is_internal
from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs.longpath import SymlinkOnPath, forget, open_dir_beneath, reach
from kmsfs.fs.posix import open_regular, pwrite_fully, read_internal_file

log = logging.getLogger(__name__)

JOURNAL_NAME = "kmsfs.journal"
MAGIC = b"KJR1"
#: Record states: DONE (its write returned), LIVE (a redo record: the ciphertext a write puts
#: over bytes the file has), TAIL (a tail record: a write past the end, no data). A reader takes
#: a state it does not know for done, and goes on: kmsfs before tail records skips them.
LIVE, DONE, TAIL = 1, 0, 2
_HEAD = struct.Struct(">4sBQI")  # magic, state, sequence, body length
_STATE_AT = 4  # offset of the state byte in a record
_DONE_BYTE = bytes([DONE])
#: Records whose write returned, at most, before :meth:`WriteJournal.done` marks them itself
#: (a mount that never pauses between requests).
MAX_UNSETTLED = 64
_CRC = struct.Struct(">I")
_PAGE = 4096  # the granularity at which a kill cuts a write (the smallest page size Linux has)
#: A record's path length is a u16: a file whose ciphertext path under the root is longer (some
#: 2,700 directories deep, which only relative paths reach) is overwritten unrecorded.
MAX_PATH_BYTES = 0xFFFF
#: A record longer than this is not one kmsfs wrote (a write is at most 1 MiB of plaintext).
MAX_BODY = 2 * 1024 * 1024
#: What a replay reads of the journal at most: records of the writes in flight at once (a few
#: of at most 1 MiB each) take far less. Records past it are not replayed (with a log line).
MAX_JOURNAL_BYTES = 1 << 30
#: A journal that has grown past this is cut back to 0 bytes whenever it rewinds (no record
#: live), and at a clean unmount whatever its size: ciphertext long since overwritten, which
#: the next mount would read whole (concurrent overwriters let it reach :data:`REWIND_ABOVE`).
SHRINK_ABOVE = 8 << 20
#: How far records may reach before a new one waits for the writes in flight to return, so
#: that the journal starts again from 0: writers that keep one write in flight at every moment
#: (three 1 MiB overwriters) never let it rewind, and it grew by some 4 MB a second, for as
#: long as they went on (a database's writers could fill the disk with it). The wait is for
#: other threads' pwrites of at most 1 MiB each, and comes once per this many bytes.
REWIND_ABOVE = 64 << 20
#: How long a new record waits for that at most. Past it, it goes on (the journal grows, as
#: before), and no record waits again before the journal has grown by another REWIND_ABOVE: a
#: write stuck in the backing file system (an NFS stall, an fdatasync) does not slow every
#: other writer. Records made on the main thread (the daemon's event loop, which small writes
#: run on) never wait: every other request would wait with them.
REWIND_WAIT_SECONDS = 2.0
#: Space the journal keeps allocated (posix_fallocate) while the volume is mounted: the redo
#: records of a few writes of at most 1 MiB each in flight at once. Without it, a disk that
#: filled up under the mount left no room for a record (the journal is emptied at every mount
#: and cut back when it rewinds), the overwrite went ahead unrecorded, and a daemon killed in
#: the middle of it tore a block of older data for good. A record that would pass it first
#: settles the returned ones, so the journal starts again from 0. An overwrite whose record
#: still cannot be written (a disk already full when the volume was mounted, or more than that
#: in flight at once) is refused with the backing store's error (ENOSPC), never made
#: unrecorded.
RESERVE = 4 << 20


@dataclass(frozen=True)
class Record:
    """A live record. A redo record (``tail`` False) holds the ciphertext *data* written at
    *offset*; a tail record (``tail`` True) holds none, and *offset* is the ciphertext size the
    file had before a write past its end (0 for a new file's first write)."""

    sequence: int
    path: bytes
    header: bytes
    offset: int
    data: bytes
    tail: bool = False


def encode(
    sequence: int, path: bytes, header: bytes, offset: int, data: bytes, state: int = LIVE
) -> bytes:
    return b"".join(_pieces(sequence, path, header, offset, data, state))


def _pieces(
    sequence: int,
    path: bytes,
    header: bytes,
    offset: int,
    data: bytes | bytearray,
    state: int = LIVE,
) -> tuple[bytes, bytes | bytearray, bytes]:
    """A record as (head, data, CRC), to write without copying the data.

    The CRC covers the sequence number, the body's length and its fixed fields, not the
    ciphertext: each block of that authenticates itself, and one cut short is skipped."""
    fixed = struct.pack(">H", len(path)) + path + header + struct.pack(">Q", offset)
    head = _HEAD.pack(MAGIC, state, sequence, len(fixed) + len(data))
    crc = zlib.crc32(head[_STATE_AT + 1 :] + fixed)
    return head + fixed, data, _CRC.pack(crc)


def parse(raw: bytes) -> list[Record]:
    """The live records of a journal: from offset 0 while the sequence goes up by one."""
    records: list[Record] = []
    pos, expected = 0, None
    while pos + _HEAD.size <= len(raw):
        magic, state, sequence, length = _HEAD.unpack_from(raw, pos)
        end = pos + _HEAD.size + length + _CRC.size
        if magic != MAGIC or length > MAX_BODY or end > len(raw):
            break
        if expected is not None and sequence != expected:
            break  # older bytes: the space was reused from 0
        body = raw[pos + _HEAD.size : end - _CRC.size]
        (path_len,) = struct.unpack_from(">H", body, 0) if len(body) >= 2 else (MAX_BODY,)
        fixed = 2 + path_len + HEADER_SIZE + 8
        (crc,) = _CRC.unpack_from(raw, end - _CRC.size)
        covered = raw[pos + _STATE_AT + 1 : pos + _HEAD.size] + body[:fixed]
        if len(body) < fixed or zlib.crc32(covered) != crc:
            break  # cut while it was being written: its write had not begun
        expected, pos = sequence + 1, end
        if state not in (LIVE, TAIL) or (state == TAIL and len(body) != fixed):
            continue  # done, or a kind this kmsfs does not know: never applied
        path = body[2 : 2 + path_len]
        header = body[2 + path_len : 2 + path_len + HEADER_SIZE]
        (offset,) = struct.unpack_from(">Q", body, fixed - 8)
        records.append(Record(sequence, path, header, offset, body[fixed:], state == TAIL))
    return records


class WriteJournal:
    """The volume's journal, open for the mount's life; thread-safe (workers write too)."""

    def __init__(self, root: bytes) -> None:
        self.root = root
        self._fd = open_regular(root + b"/" + JOURNAL_NAME.encode(), os.O_RDWR | os.O_CREAT)
        self._prefix = root.rstrip(b"/") + b"/"
        self._lock = threading.Lock()
        self._returns = threading.Condition(self._lock)  # notified by done()
        self._pos = 0
        self._end = os.lseek(self._fd, 0, os.SEEK_END)  # how far records were ever written
        self._sequence = 1
        self._in_flight = 0  # records begun and not yet marked done
        self._wait_from = REWIND_ABOVE  # where the next record waits to rewind (see there)
        self._returned: list[int] = []  # of those, the ones whose write returned
        self._reserved = False  # RESERVE bytes allocated (see there)
        self._retry_reserve = 0.0  # time.monotonic() before which a failed reserve is not retried
        self._pos_after = 0  # where the record _write just wrote ends
        self._warned = False  # the full-disk refusal is logged as a warning once a mount
        self._reserve()

    def _reserve(self) -> None:
        """Allocate :data:`RESERVE` bytes (real blocks, zeros past the records: a replay stops
        at the first bytes that are no record), if the disk has room; lock held or unshared.
        Tried again at most once a second (where the file system cannot fallocate, glibc
        writes the blocks one by one)."""
        if time.monotonic() < self._retry_reserve:
            return
        try:
            os.posix_fallocate(self._fd, 0, RESERVE)
        except OSError as exc:
            log.debug("write journal: cannot reserve %d bytes (%s)", RESERVE, exc.strerror)
            self._retry_reserve = time.monotonic() + 1.0
            return
        self._reserved = True

    def close(self) -> None:
        """Mark what returned done; then, if no write is in flight, empty the journal (a clean
        unmount leaves no record for the next mount to read) and fsync that, so that no
        power cut after the unmount brings back records of this mount."""
        with self._lock:
            self._settle()
            try:
                if self._in_flight == 0 and (self._end or self._reserved):
                    os.ftruncate(self._fd, 0)
                    os.fsync(self._fd)
                    self._end = 0
            finally:
                os.close(self._fd)

    def relative(self, path: bytes) -> bytes:
        """*path* (absolute, under the root) as records name it.

        Every open file asks, so the daemon's paths (the root, then names: nothing to
        normalise) are cut, not run through os.path.relpath, which took 3 us an open."""
        if (
            path.startswith(self._prefix)
            and not path.endswith(b"/")
            and b"/." not in path
            and b"//" not in path
        ):
            return path[len(self._prefix) :]
        return os.path.relpath(path, self.root)

    def begin(
        self, relative: bytes, header: bytes, offset: int, data: bytes | bytearray
    ) -> int | None:
        """Record a write of *data* at ciphertext *offset* of the file *relative* (to the root)
        before it is made; returns the record's position for :meth:`done`, or None for a path
        too long for a record. OSError (ENOSPC, say) if it cannot be written: the overwrite
        must not be made then (:data:`RESERVE`).

        One pwritev. A store into a shared mapping of the journal would cost a third as much,
        but one that meets a full disk (btrfs allocates on write, even after fallocate) or a
        journal truncated by someone else kills the daemon with SIGBUS, where a write fails."""
        return self._begin(relative, header, offset, data, LIVE)

    def begin_tail(self, relative: bytes, header: bytes, size: int) -> int | None:
        """Record a write past the end of the file *relative*, whose ciphertext size is *size*
        (0 for a new file's first write, which writes *header*) before the write: a tail
        record, no data (:func:`_apply_tail`). As :meth:`begin`, but None, not an error, if
        it cannot be written: such a write risks no older data, and goes ahead unrecorded."""
        return self._begin(relative, header, size, b"", TAIL)

    def _begin(
        self, relative: bytes, header: bytes, offset: int, data: bytes | bytearray, state: int
    ) -> int | None:
        if len(relative) > MAX_PATH_BYTES:
            log.debug("write journal: path too long for a record; this write goes unrecorded")
            return None
        # The record's size, as _pieces makes it (head, u16 path length, path, header, u64
        # offset, data, CRC): known before the lock, without building it.
        size = _HEAD.size + 2 + len(relative) + len(header) + 8 + len(data) + _CRC.size
        with self._lock:
            worker = threading.current_thread() is not threading.main_thread()
            if self._pos + size > self._wait_from and self._in_flight and worker:
                self._wait_to_rewind()
            if self._returned and self._pos + size > RESERVE:
                # Requests back to back leave no pause to settle in: the records would leave
                # the reserve long before MAX_UNSETTLED, and on a full disk find no room.
                self._settle()
            if not self._reserved and state == LIVE:
                self._reserve()  # the disk may have room again
            try:
                at = self._write(relative, header, offset, data, state)
            except OSError as exc:
                if state == TAIL:  # a write past the end risks no older data
                    log.debug("write journal: %s; this write goes unrecorded", exc.strerror)
                    return None
                # Past the reserve on a full disk: other writers' records are in flight. A
                # worker thread (a big write) waits for them, then writes at 0, in the reserve.
                if not (exc.errno == errno.ENOSPC and self._in_flight and worker):
                    self._refuse(exc)
                self._wait_to_rewind()
                try:
                    at = self._write(relative, header, offset, data, state)
                except OSError as again:
                    self._refuse(again)
            self._sequence += 1
            self._pos = self._pos_after
            if self._pos > self._end:
                self._end = self._pos
            self._in_flight += 1
            return at

    def _write(
        self, relative: bytes, header: bytes, offset: int, data: bytes | bytearray, state: int
    ) -> int:
        """Write the next record at the current position (lock held); its position. Its
        sequence number is taken here, after any wait (which lets other threads write
        records): two records with one number would stop a replay at the second."""
        head, data, crc = _pieces(self._sequence, relative, header, offset, data, state)
        size = len(head) + len(data) + len(crc)
        at = self._pos
        if os.pwritev(self._fd, (head, data, crc), at) != size:  # short: on ENOSPC
            pwrite_fully(self._fd, head + bytes(data) + crc, at)
        self._pos_after = at + size
        return at

    def _refuse(self, exc: OSError) -> NoReturn:
        (log.debug if self._warned else log.warning)(
            "write journal: no room for the record of an overwrite (%s): refused, as one made "
            "unrecorded could lose older data if the daemon were killed during it",
            exc.strerror,
        )
        self._warned = True
        raise exc

    def _wait_to_rewind(self) -> None:
        """With the lock held: wait until every write in flight has returned (the journal then
        starts again from 0, :meth:`_settle`), for :data:`REWIND_WAIT_SECONDS` at most."""
        deadline = time.monotonic() + REWIND_WAIT_SECONDS
        while True:
            self._settle()
            if not self._in_flight:
                return  # rewound
            left = deadline - time.monotonic()
            if left <= 0:
                self._wait_from = self._pos + REWIND_ABOVE
                log.debug("write journal: a write in flight for %.0f s", REWIND_WAIT_SECONDS)
                return
            self._returns.wait(left)

    def done(self, at: int | None) -> None:
        """The write of the record at *at* returned. It is marked done later, by
        :meth:`settle`: the daemon settles in the pause after its reply (so the mark costs a
        write no request waits for), and before anything that could make a returned record
        harmful. A block may then have several live records, one per write to it since the last
        mark; a replay applies them newest first, so a torn block gets the last write to it,
        and a block that authenticates is left alone. A returned record could only do harm
        where its block later changes without a newer record: a file cut below it and grown
        again, or an overwrite the journal had no room for. Both settle first
        (FileContent.truncate, FileContent._overwrite).
        """
        if at is None:
            return
        with self._lock:
            self._returned.append(at)
            if len(self._returned) >= MAX_UNSETTLED:
                self._settle()
            self._returns.notify_all()

    def settle(self) -> bool:
        """Mark every record whose write returned done; once none is in flight, the next
        record goes at offset 0 again. False if there was nothing to mark."""
        with self._lock:
            return self._settle()

    def _settle(self) -> bool:
        if not self._returned:
            return False
        for at in self._returned:
            try:
                os.pwrite(self._fd, _DONE_BYTE, at + _STATE_AT)
            except OSError as exc:  # never seen: the byte is already allocated
                log.warning("write journal: cannot mark a record done (%s)", exc.strerror)
        self._in_flight -= len(self._returned)
        self._returned.clear()
        if self._in_flight == 0:
            self._pos = 0
            self._wait_from = REWIND_ABOVE
            if self._end > SHRINK_ABOVE:  # every record is done: nothing to keep
                try:
                    os.ftruncate(self._fd, RESERVE if self._reserved else 0)
                    self._end = 0
                    if self._reserved:
                        # The reserve keeps its blocks (a full disk must not take them) but
                        # not its records: ciphertext long overwritten, material to roll
                        # blocks back with, stayed there for the whole mount (review).
                        os.pwrite(self._fd, bytes(RESERVE), 0)
                except OSError as exc:
                    log.debug("write journal: cannot cut it back (%s)", exc.strerror)
        return True


def replay(root: bytes, cipher_of: Callable[[FileHeader], ContentCipher]) -> int:
    """Put back, from the journal's live records (newest first), every block that no longer
    authenticates; then empty the journal. Returns how many blocks were put back. Before a
    mount serves."""
    forget()  # anchors this process cached before: a mount since may have moved directories
    try:
        root_fd = os.open(reach(root), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        return _replay(root, root_fd, cipher_of)
    finally:
        os.close(root_fd)


def _replay(
    root: bytes, root_fd: int, cipher_of: Callable[[FileHeader], ContentCipher]
) -> int:
    name = JOURNAL_NAME.encode()
    try:
        raw = read_internal_file(name, MAX_JOURNAL_BYTES + 1, dir_fd=root_fd)
    except FileNotFoundError:
        return 0
    if len(raw) > MAX_JOURNAL_BYTES:
        raw = raw[:MAX_JOURNAL_BYTES]
        log.warning(
            "write journal: larger than %d bytes; records past that are not replayed",
            MAX_JOURNAL_BYTES,
        )
    repaired = 0
    # Newest first: of the live records of a block, the newest is the last write to it (a
    # returned write may still be unmarked, and every shrink marks all first), so it is the one
    # to put back; once it has, the block authenticates and older records leave it alone. A
    # record found elsewhere by its header keeps its place in that order.
    records = parse(raw)[::-1]
    elsewhere, searched_all = _locate(root, root_fd, records)
    newer = _NewerWrites()
    for record in records:
        try:
            repaired += _apply(
                root_fd, record, elsewhere.get(record.sequence), cipher_of, newer
            )
        except (OSError, FormatError, IntegrityError, _NotFound) as exc:
            # "Gone" only if the search read everything: a file in a directory it could not
            # read may be the record's, left unrepaired (found by review).
            gone = isinstance(exc, _Gone) and searched_all
            log.log(
                logging.INFO if gone else logging.WARNING,
                "write journal: record %d for %s not replayed (%s)",
                record.sequence,
                os.fsdecode(record.path),
                exc.strerror if isinstance(exc, SymlinkOnPath) else exc,
            )
        newer.add(record)
    if raw:  # read_internal_file found a regular file; a FIFO put there since must not block
        # Every file repaired was fdatasync'd (_apply): only now may the records go, and the
        # emptied journal is fsync'd, so that no power cut brings them back under this mount's
        # records, whose sequence numbers start at 1 again.
        fd = open_regular(name, os.O_WRONLY, dir_fd=root_fd)
        try:
            os.ftruncate(fd, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    if repaired:
        log.warning(
            "write journal: %d block(s) torn by an interrupted write put back or cut off", repaired
        )
    return repaired


def live_records(root: bytes) -> list[Record]:
    """The journal's live records, redo and tail (for fsck, which changes nothing)."""
    try:
        return parse(read_internal_file(root + b"/" + JOURNAL_NAME.encode(), MAX_JOURNAL_BYTES))
    except FileNotFoundError:
        return []


class _NotFound(Exception):
    """A record whose path no longer holds its file, and whose header no other file has, or
    several do (which one the write was for cannot be told)."""


class _Gone(_NotFound):
    """... no file has it: the file was removed after the write, and there is nothing to put
    back. Logged at INFO, not as a warning: after a kill -9 under load, writes that had
    returned but were not yet marked done are common, and their files often removed since
    (found by review: operators read the warnings as data lost)."""


#: What opening a record's path gives when no regular file is there any more: nothing (or a
#: file where a directory was), a symlink, or something that is not a regular file. (A symlink
#: in place of one of its directories is SymlinkOnPath, and the record is skipped.)
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EINVAL})


def _open_beneath(root_fd: int, relative: bytes, flags: int) -> int:
    """:func:`~kmsfs.fs.posix.open_regular` of the file *relative* below the root open as
    *root_fd*, following no symlink on the way (:func:`~kmsfs.fs.longpath.open_dir_beneath`),
    nor at the file's own name; O_NOATIME with O_RDONLY where the kernel allows it (reading a
    header is not a user's read: the plaintext atime is the ciphertext file's)."""
    parent, _, name = relative.rpartition(b"/")
    dir_fd = open_dir_beneath(root_fd, parent)
    try:
        return _open_at(name, flags, dir_fd)
    finally:
        os.close(dir_fd)


def _open_at(name: bytes, flags: int, dir_fd: int) -> int:
    if flags & os.O_ACCMODE == os.O_RDONLY:
        try:
            return open_regular(name, flags | os.O_NOATIME, dir_fd=dir_fd)
        except PermissionError as exc:
            if exc.errno != errno.EPERM:  # O_NOATIME on a file of another user, not root
                raise
    return open_regular(name, flags, dir_fd=dir_fd)


def _check(record: Record) -> None:
    """FormatError for a record no replay may apply, wherever its file is now."""
    parts = record.path.split(b"/")
    if record.path.startswith(b"/") or b".." in parts or b"" in parts:
        raise FormatError("a path outside the volume")
    if b"\0" in record.path:
        raise FormatError("a path with a NUL byte")  # no file has one; open() would ValueError
    if record.tail and record.offset == 0:
        return  # a new file's first write
    if record.offset < HEADER_SIZE or (record.offset - HEADER_SIZE) % CIPHER_BLOCK_SIZE:
        raise FormatError(f"offset {record.offset} is not where a block starts")


def _moved_away(root_fd: int, record: Record) -> bool:
    """True if *record*'s path no longer holds a file with its header (nothing there, or
    another file), so that its file, if it still exists, is under another name. False too for a
    record :func:`_apply` refuses anyway, or a path it cannot read (it reports those)."""
    try:
        _check(record)
        FileHeader.parse(record.header)
    except FormatError:
        return False
    try:
        fd = _open_beneath(root_fd, record.path, os.O_RDONLY)
    except SymlinkOnPath:
        return False  # not followed, nor searched for: _apply reports it
    except OSError as exc:
        return exc.errno in _GONE
    try:
        return os.pread(fd, HEADER_SIZE, 0) != record.header
    except OSError:
        return False
    finally:
        os.close(fd)


def _locate(
    root: bytes, root_fd: int, records: list[Record]
) -> tuple[dict[int, list[bytes]], bool]:
    """Sequence -> the paths (one per file, relative to the root) holding the header of each
    record whose own path does not (:func:`_moved_away`): one walk of the tree for all of
    them, none if there are none (the usual case); and whether that walk read everything."""
    lost = [record for record in records if _moved_away(root_fd, record)]
    if not lost:
        return {}, True
    passed_over: list[bytes] = []
    found = find_headers(root, {record.header for record in lost}, passed_over)
    return {record.sequence: found.get(record.header, []) for record in lost}, not passed_over


def find_headers(
    root: bytes, headers: set[bytes], passed_over: list[bytes] | None = None
) -> dict[bytes, list[bytes]]:
    """Header -> the ciphertext files under *root* that start with it, one path per file
    (relative to *root*; hard links of one file count once). Reads the first HEADER_SIZE bytes
    of every regular file but the volume's own (``kmsfs.*``), without moving any atime
    (O_NOATIME where the kernel allows it, as fsck and reencrypt do); a file or directory it
    cannot read is passed over. It never leaves the tree: each directory is opened below the
    root's descriptor following no symlink (a directory swapped for a symlink since it was
    listed is passed over), each file by its name in its directory's descriptor, O_NOFOLLOW.
    What it passes over (but files gone since their directory was listed) is added to
    *passed_over*, if given."""
    skipped: list[bytes] = [] if passed_over is None else passed_over
    found: dict[bytes, dict[tuple[int, int], bytes]] = {}
    root_fd = os.open(reach(root), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        stack = [b""]
        while stack:
            below = stack.pop()
            try:
                dir_fd = _open_dir_unread(root_fd, below)
            except OSError as exc:
                log.debug("write journal: %s not searched (%s)", _shown(root, below), exc)
                skipped.append(below)
                continue
            try:
                stack += _search_dir(dir_fd, below, headers, found, skipped)
            except OSError as exc:
                log.debug("write journal: %s not searched (%s)", _shown(root, below), exc)
                skipped.append(below)
            finally:
                os.close(dir_fd)
    finally:
        os.close(root_fd)
    return {header: list(files.values()) for header, files in found.items()}


def _shown(root: bytes, below: bytes) -> str:
    return os.fsdecode(root + b"/" + below if below else root)


def _open_dir_unread(root_fd: int, below: bytes) -> int:
    """A descriptor to list the directory *below* the root, without moving its atime."""
    try:
        return open_dir_beneath(root_fd, below, os.O_RDONLY | os.O_NOATIME)
    except PermissionError as exc:
        if exc.errno != errno.EPERM:
            raise
    return open_dir_beneath(root_fd, below, os.O_RDONLY)


def _search_dir(
    dir_fd: int,
    below: bytes,
    headers: set[bytes],
    found: dict[bytes, dict[tuple[int, int], bytes]],
    skipped: list[bytes],
) -> list[bytes]:
    """Note the files with one of *headers* in the directory open as *dir_fd* (at *below*
    under the root); returns its subdirectories, to search next."""
    with os.scandir(dir_fd) as entries:
        listed = [
            (os.fsencode(entry.name), entry.is_dir(follow_symlinks=False),
             entry.is_file(follow_symlinks=False))
            for entry in entries
        ]
    subdirs: list[bytes] = []
    for name, is_dir, is_file in listed:
        if is_internal(os.fsdecode(name)):
            continue  # the journal, IVs, sidecars, temporaries, kmsfs.longlinks, the pool
        path = below + b"/" + name if below else name
        if is_dir:
            subdirs.append(path)
        elif is_file:
            _note_header(dir_fd, name, path, headers, found, skipped)
    return subdirs


def _note_header(
    dir_fd: int,
    name: bytes,
    path: bytes,
    headers: set[bytes],
    found: dict[bytes, dict[tuple[int, int], bytes]],
    skipped: list[bytes],
) -> None:
    try:
        fd = _open_at(name, os.O_RDONLY, dir_fd)
    except FileNotFoundError:
        return  # gone since the listing
    except OSError:
        skipped.append(path)  # not readable by this daemon: passed over
        return
    try:
        header = os.pread(fd, HEADER_SIZE, 0)
        if header in headers:
            st = os.fstat(fd)
            found.setdefault(header, {}).setdefault((st.st_dev, st.st_ino), path)
    except OSError:
        skipped.append(path)
    finally:
        os.close(fd)


def _apply(
    root_fd: int,
    record: Record,
    elsewhere: list[bytes] | None,
    cipher_of: Callable[[FileHeader], ContentCipher],
    newer: _NewerWrites | None = None,
) -> int:
    """Put back *record*'s torn blocks in its file: at its path, or if *elsewhere* is not None
    (its path no longer holds it), in the one file found with its header. Both are paths
    below the root open as *root_fd*, opened following no symlink (module docstring).
    *newer*: what the journal's newer records wrote (:func:`_apply_tail`)."""
    _check(record)
    block = (record.offset - HEADER_SIZE) // CIPHER_BLOCK_SIZE
    if elsewhere is None:
        path = record.path
    elif len(elsewhere) == 1:
        path = elsewhere[0]
    elif elsewhere:
        raise _NotFound(
            f"no file with its header at its path, and {len(elsewhere)} files elsewhere have it"
        )
    else:
        raise _Gone("no file with its header at its path or anywhere else: the file is gone")
    with _writable(root_fd, path) as fd:
        if os.pread(fd, HEADER_SIZE, 0) != record.header:
            return 0  # the file was emptied and started again, or is another one now
        cipher = cipher_of(FileHeader.parse(record.header))
        if record.tail:
            repaired = _apply_tail(fd, record, cipher, newer)
            if repaired:
                os.fdatasync(fd)  # on the disk before the journal that held it is emptied
        else:
            repaired = _apply_redo(fd, record, block, cipher, elsewhere is not None)
    if elsewhere and repaired:
        log.warning(
            "write journal: record %d for %s: the file is no longer there; found by its header"
            " at %s, %d block(s) put back there",
            record.sequence,
            os.fsdecode(record.path),
            os.fsdecode(path),
            repaired,
        )
    return repaired


def _apply_redo(
    fd: int, record: Record, block: int, cipher: ContentCipher, elsewhere: bool
) -> int:
    """Put back the blocks of a redo record that no longer authenticate on disk and were
    torn by its write (:func:`_torn_by`); returns how many.

    A record is one pwrite, and a kill stops it at one place: it tears one block, and the file
    grew past its old end only if that block reached the end. Only then are the record's
    blocks past the end written (the rest of the write, completed). A write that would have
    grown the file but was cut before its old end left the file's size as it was: writing them
    then left the file's old partial last block, fsync'd perhaps, followed by blocks with a gap
    of zeros between, unreadable for good (found by review)."""
    size = os.fstat(fd).st_size
    repaired = 0
    reached_the_end = False  # the block put back ended where the file ends
    try:
        for i in range(0, len(record.data), CIPHER_BLOCK_SIZE):
            want = record.data[i : i + CIPHER_BLOCK_SIZE]
            at = record.offset + i
            number = block + i // CIPHER_BLOCK_SIZE
            if elsewhere and at >= size:
                # A torn overwrite leaves the block it began in: a file found by its header
                # that ends before the block is an older copy (a sync tool's), never grown.
                continue
            on_disk = os.pread(fd, CIPHER_BLOCK_SIZE, at)
            if on_disk and (on_disk[: len(want)] == want or _authentic(cipher, number, on_disk)):
                continue  # the write got there, or never began, or a later one replaced it
            if not _authentic(cipher, number, want):
                raise IntegrityError(f"its block {number} does not authenticate")
            if not on_disk:
                # Past the file's end: the rest of a write that grew the file and stopped in a block
                # it tore (put back just now), completed. Without that tear, the file ends before
                # the write began (it never did, or was cut back): nothing to put back.
                if not reached_the_end:
                    break
            elif not _torn_by(on_disk, want, at):
                log.warning(
                    "write journal: record %d for %s: block %d does not authenticate, but this "
                    "record's write did not tear it (an older record, after a power cut?); left "
                    "as it is",
                    record.sequence, os.fsdecode(record.path), number,
                )
                continue
            pwrite_fully(fd, want, at)
            repaired += 1
            reached_the_end = at + max(len(on_disk), len(want)) >= size
    finally:
        # What was put back is on the disk before the journal that held it is emptied, even
        # if a later block failed (ENOSPC past the end: the record is reported not replayed).
        if repaired:
            os.fdatasync(fd)
    return repaired


def _torn_by(on_disk: bytes, want: bytes, at: int) -> bool:
    """Whether the block *on_disk* at ciphertext offset *at* can be what a write of *want*
    there, cut by a kill, left.

    A kill cuts a write at a page boundary (module docstring), so the block it tears holds the
    write's bytes up to the first page boundary inside it (or more). A block that does not is
    not this record's doing: after a power cut, the journal on the disk may hold a live record
    of an earlier write to the block whose done mark never reached the disk, while the block
    was rewritten since (and fsync'd, perhaps) and then torn by the power cut. Putting that
    record's block back would silently bring back older data; left alone, the block reads EIO,
    as documented for a power cut. The one other tear a record covers: a shrinking truncate
    killed between its cut and its write (FileContent.truncate), which leaves the file ending
    exactly where the record's shortened block ends, over the old block's first bytes."""
    first = -at % _PAGE or _PAGE  # bytes of the block before the first page boundary in it
    if first < len(want) and on_disk[:first] == want[:first]:
        return True
    return len(want) < CIPHER_BLOCK_SIZE and len(on_disk) == len(want)


def _apply_tail(
    fd: int, record: Record, cipher: ContentCipher, newer: _NewerWrites | None = None
) -> int:
    """Cut off the torn last block a write past the end left when it was killed; returns 1 if
    it did, else 0.

    The file had ciphertext size ``record.offset`` before the write (0: a new file, whose first
    write the record's header began). A kill cuts the write at a page boundary (module
    docstring): the file then ends there, every block the write finished authenticates, and the
    one it was writing does not. That, exactly, is what is cut off: only if the file ends at a
    page boundary past the old size, its last block fails to authenticate, and every block
    between the old size and it authenticates. The file keeps what the write finished, as ext4
    keeps the part of an interrupted append it wrote, and a file cut to its header alone is
    cut to 0 bytes (an empty file has no header). A write that completed leaves every block
    whole, and stays; a later write that tore a block in the middle (a power cut, with this
    record stale on the disk) leaves the file's end alone, and nothing is cut.

    Nor is a last block that a write newer than the record's wrote to (*newer*: what the
    journal's newer records wrote): the daemon writes a file one write at a time (a lock
    per inode), so that write began after the record's had returned, and the tear is not the
    record's. A kill tears only the newest write, whose own record repairs it; a power cut,
    with this record's done mark never on the disk, can tear the newer write anywhere (not only
    at a page boundary as a kill does), and cutting the block off would silently lose what it
    held before, fsync'd perhaps: left alone it reads EIO, as documented for a power cut."""
    size = os.fstat(fd).st_size
    old = max(record.offset, HEADER_SIZE)
    if size <= old or size % _PAGE:
        return 0
    last = (size - HEADER_SIZE - 1) // CIPHER_BLOCK_SIZE  # the block the file ends in
    last_at = HEADER_SIZE + last * CIPHER_BLOCK_SIZE
    if newer is not None and newer.wrote_to(record.header, last_at):
        return 0
    if _authentic(cipher, last, os.pread(fd, CIPHER_BLOCK_SIZE, last_at)):
        return 0
    number = (old - HEADER_SIZE) // CIPHER_BLOCK_SIZE
    at = old
    while at < last_at:  # the write's finished blocks, read a MiB at a time
        raw = os.pread(fd, min(last_at - at, 256 * CIPHER_BLOCK_SIZE), at)
        for i in range(0, len(raw), CIPHER_BLOCK_SIZE):
            if not _authentic(cipher, number, raw[i : i + CIPHER_BLOCK_SIZE]):
                return 0  # not a tear at the end: left for fsck to report
            number += 1
        at += len(raw)
    os.ftruncate(fd, last_at if last_at > HEADER_SIZE else 0)
    log.warning(
        "write journal: record %d: %s cut back from %d to %d bytes of ciphertext, the end of "
        "the last block an interrupted write past its end finished",
        record.sequence, os.fsdecode(record.path), size, last_at if last_at > HEADER_SIZE else 0,
    )
    return 1


class _NewerWrites:
    """The blocks the redo records a replay has gone through (newest first) wrote, file by
    file (its header). Linear in the journal's size, however its records are made (a replay
    reads up to 1 GiB of them). Newer tail records need no note: whatever tear one leaves
    alone (a file not ending at a page boundary, a block that fails before the last), an older
    one of the same file finds too, and leaves alone."""

    def __init__(self) -> None:
        self._blocks: dict[bytes, set[int]] = {}

    def add(self, record: Record) -> None:
        if not record.tail:
            self._blocks.setdefault(record.header, set()).update(
                range(record.offset, record.offset + len(record.data), CIPHER_BLOCK_SIZE)
            )

    def wrote_to(self, header: bytes, block_at: int) -> bool:
        """Whether a redo record gone through, of the file with *header*, holds the block at
        ciphertext offset *block_at*."""
        return block_at in self._blocks.get(header, ())


@contextlib.contextmanager
def _writable(root_fd: int, path: bytes) -> Iterator[int]:
    """The file *path* below the root, open read-write (following no symlink).

    A daemon that is not root may not open a file of mode 0444 for writing, even its own (git
    makes its objects so, and writes them through the descriptor it created them with, which
    the daemon opened read-write at create). If the daemon owns the file, it adds u+w for the
    repair (through the read-only descriptor: the same file, whatever the path holds now),
    reopens that descriptor read-write (/proc/self/fd: the same inode again) and restores the
    mode when done, error or not. A file of another user is left alone: PermissionError."""
    try:
        fd = _open_beneath(root_fd, path, os.O_RDWR)
    except PermissionError:
        pass
    else:
        try:
            yield fd
        finally:
            os.close(fd)
        return
    ro = _open_beneath(root_fd, path, os.O_RDONLY)
    try:
        st = os.fstat(ro)
        if st.st_uid != os.geteuid() or st.st_mode & stat.S_IWUSR:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        mode = stat.S_IMODE(st.st_mode)
        os.fchmod(ro, mode | stat.S_IWUSR)
        try:
            fd = os.open(f"/proc/self/fd/{ro}", os.O_RDWR | os.O_CLOEXEC)
            try:
                yield fd
            finally:
                os.close(fd)
        finally:
            os.fchmod(ro, mode)
    finally:
        os.close(ro)


def _authentic(cipher: ContentCipher, number: int, block: bytes) -> bool:
    if not block:
        return False
    try:
        cipher.decrypt_block(number, block)
    except IntegrityError:
        return False
    return True
