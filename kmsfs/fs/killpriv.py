"""FUSE_HANDLE_KILLPRIV_V2 on a libfuse that does not negotiate it (Debian 12's 3.14).

Why: unless the file system takes the job of dropping set-user-ID, set-group-ID and file
capabilities itself (this INIT flag), the kernel cannot mark a FUSE inode as free of them
(``S_NOSEC``), so before *every* write(2) it asks the daemon for ``security.capability``: one
GETXATTR round trip per write. That was half of the requests of 4 KiB random writes and a fifth
of those of a tar extract; with the flag the kernel asks once per inode and attribute refresh
(fio 4 KiB randwrite on tmpfs: 11.6k -> 15.7k writes/s). The file system drops the bits itself
then, as it already must with the FUSE_HANDLE_KILLPRIV that libfuse asks for by default:
kmsfs does it as ext4 does (``operations``, setattr and open; it stores no ``security.*``
attribute, so there is no capability to drop) on truncate and open(O_TRUNC) by a caller
without CAP_FSETID (read from /proc, ``posix.Caller``), on chown, and on a write by such
a caller, for which the kernel sends a setattr with no field set
(tests/integration/test_fs_permissions.py judges every case against the local disk).

How: the kernel queues its INIT request on /dev/fuse when the file system is mounted, and
libfuse answers it with the first request it reads. :class:`InitAmendment` runs in the read
loop's wait before libfuse's first two reads. The first time, it takes the INIT request off
/dev/fuse, puts the session's fd number on one end of a socket pair carrying that request, and
returns, so libfuse reads the request and writes its reply into the socket. The second time, it
takes that reply, adds the flag if the kernel offered it and libfuse accepted INIT, writes it to
/dev/fuse, and puts /dev/fuse back on the fd number. Nothing else passes through the socket, and
the request and reply are otherwise forwarded byte for byte. If anything fails once the request
is off /dev/fuse, the kernel gets an error reply to it, so the mount fails at once instead of
hanging with INIT unanswered.

This relies on libfuse answering INIT inside the read that took it, before the loop yields,
which holds for libfuse 3 up to the versions listed in :data:`AMENDED_LIBFUSE_MINORS`
(:func:`libfuse_needs_it`); on any other libfuse the daemon leaves INIT alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import socket
import struct

log = logging.getLogger(__name__)

#: include/uapi/linux/fuse.h
FUSE_INIT = 26
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
_IN_HEADER = struct.Struct("<IIQ")  # len, opcode, unique (then nodeid, uid, gid, pid, ...)
_IN_HEADER_SIZE = 40
_OUT_HEADER = struct.Struct("<IiQ")  # len, error, unique
#: Offset of ``flags`` in fuse_init_in (after major, minor, max_readahead), and in fuse_init_out.
_FLAGS_AT_IN = _IN_HEADER_SIZE + 12
_FLAGS_AT_OUT = _OUT_HEADER.size + 12
_FLAGS = struct.Struct("<I")
#: libfuse 3 reads requests into a buffer of this size at most (1 MiB of data and the headers).
_MAX_REQUEST = (1 << 20) + 8192
#: How long to wait for the kernel's INIT request (queued before mount(2) returns).
INIT_WAIT_MS = 5000
#: libfuse 3 minor versions known to answer INIT synchronously in the read loop and not to
#: offer the flag through their API (Debian 12 has 3.14).
AMENDED_LIBFUSE_MINORS = range(10, 18)


def libfuse_needs_it() -> bool:
    """Whether the libfuse this process uses is one :class:`InitAmendment` is made for."""
    name = ctypes.util.find_library("fuse3") or "libfuse3.so.3"
    try:
        version_of = ctypes.CDLL(name).fuse_pkgversion
    except (OSError, AttributeError):
        return False
    version_of.restype = ctypes.c_char_p
    parts = (version_of() or b"").split(b".")
    return (
        len(parts) >= 2
        and parts[0] == b"3"
        and parts[1].isdigit()
        and int(parts[1]) in AMENDED_LIBFUSE_MINORS
    )


class InitAmendment:
    """Adds FUSE_HANDLE_KILLPRIV_V2 to libfuse's reply to the kernel's INIT request.

    Call :meth:`before_read` with the session fd before each of libfuse's reads; it returns
    True while libfuse must read at once (the request is waiting in the socket), and
    :attr:`done` once /dev/fuse is back. :attr:`negotiated`: the kernel took the flag.
    """

    def __init__(self) -> None:
        self.done = False
        self.negotiated = False
        self._device = -1  # /dev/fuse, under another number while libfuse reads the socket
        self._ours: socket.socket | None = None  # the socket end libfuse does not hold
        self._theirs: socket.socket | None = None
        self._unique = 0
        self._offered = False

    def before_read(self, fd: int) -> bool:
        if self.done:
            return False
        if self._ours is None:
            self._hand_request_to_libfuse(fd)
            return True
        self._send_reply_to_kernel(fd)
        return False

    def _hand_request_to_libfuse(self, fd: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        device = os.dup(fd)
        request = b""
        try:
            request = _read_request(device)
            if len(request) >= _IN_HEADER.size:
                _, opcode, self._unique = _IN_HEADER.unpack_from(request)
                if opcode == FUSE_INIT and len(request) >= _FLAGS_AT_IN + _FLAGS.size:
                    (offered,) = _FLAGS.unpack_from(request, _FLAGS_AT_IN)
                    self._offered = bool(offered & FUSE_HANDLE_KILLPRIV_V2)
            ours.send(request)
            theirs.setblocking(os.get_blocking(fd))
            os.dup2(theirs.fileno(), fd, inheritable=False)
        except BaseException:
            if request:
                _refuse(device, self._unique)
            os.close(device)
            ours.close()
            theirs.close()
            self.done = True
            raise
        self._device, self._ours, self._theirs = device, ours, theirs

    def _send_reply_to_kernel(self, fd: int) -> None:
        assert self._ours is not None and self._theirs is not None
        answered = False
        try:
            self._ours.setblocking(False)
            try:
                reply = bytearray(self._ours.recv(_MAX_REQUEST))
            except BlockingIOError:
                raise RuntimeError("libfuse did not answer the INIT request") from None
            if self._offered and _accepts_init(reply, self._unique):
                (flags,) = _FLAGS.unpack_from(reply, _FLAGS_AT_OUT)
                _FLAGS.pack_into(reply, _FLAGS_AT_OUT, flags | FUSE_HANDLE_KILLPRIV_V2)
                self.negotiated = True
            os.write(self._device, reply)
            answered = True
        finally:
            if not answered:
                self.negotiated = False
                _refuse(self._device, self._unique)
            os.dup2(self._device, fd, inheritable=False)
            os.close(self._device)
            self._ours.close()
            self._theirs.close()
            self._ours = self._theirs = None
            self.done = True
        if self.negotiated:
            log.debug("FUSE_HANDLE_KILLPRIV_V2 negotiated: no GETXATTR before each write")


def _read_request(device: int) -> bytes:
    """The next request on /dev/fuse (waiting for it if the fd does not block)."""
    poller = select.poll()
    poller.register(device, select.POLLIN)
    if not poller.poll(INIT_WAIT_MS):
        raise RuntimeError("no INIT request from the kernel")
    return os.read(device, _MAX_REQUEST)


def _refuse(device: int, unique: int) -> None:
    """Answer request *unique* with EIO, so a mount whose INIT went wrong fails at once."""
    try:
        os.write(device, _OUT_HEADER.pack(_OUT_HEADER.size, -errno.EIO, unique))
    except OSError:
        log.debug("could not refuse the INIT request", exc_info=True)


def _accepts_init(reply: bytes | bytearray, unique: int) -> bool:
    """A successful INIT reply to request *unique*, long enough to carry ``flags``."""
    if len(reply) < _FLAGS_AT_OUT + _FLAGS.size:
        return False
    length, error, replied_to = _OUT_HEADER.unpack_from(reply)
    return length == len(reply) and error == 0 and replied_to == unique
