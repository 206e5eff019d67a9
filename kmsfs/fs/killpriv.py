"""FUSE_HANDLE_KILLPRIV_V2 on a libfuse that does not negotiate it (Debian 12's 3.14).

Why: unless the file system takes the job of dropping set-user-ID, set-group-ID and file
capabilities itself (this INIT flag), the kernel cannot mark a FUSE inode as free of them
(``S_NOSEC``), so before *every* write(2) it asks the daemon for ``security.capability``: one
GETXATTR round trip per write. That was half of the requests of 4 KiB random writes and a fifth
of those of a tar extract; with the flag the kernel asks once per inode and attribute refresh
(fio 4 KiB randwrite on tmpfs: 11.6k -> 15.7k writes/s). kmsfs then drops the bits itself, as
ext4 does (``operations``, setattr and open; kmsfs stores no ``security.*`` attribute, so there
is no capability to drop): on truncate and open(O_TRUNC) by a caller without CAP_FSETID, on
chown, and on a write by such a caller, for which the kernel still sends a setattr with no
field set (tests/integration/test_fs_permissions.py judges every case against ext4).

How: the kernel queues its INIT request on /dev/fuse when the file system is mounted, and
libfuse answers it with the first request it reads. :class:`InitAmendment` runs in the read
loop's wait before libfuse's first two reads. The first time, it takes the INIT request off
/dev/fuse, puts the session's fd number on one end of a socket pair carrying that request, and
returns, so libfuse reads the request and writes its reply into the socket. The second time, it
takes that reply, adds the flag if the kernel offered it and libfuse accepted INIT, writes it to
/dev/fuse, and puts /dev/fuse back on the fd number. Nothing else passes through the socket, and
the request and reply are otherwise forwarded byte for byte.
"""

from __future__ import annotations

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
        try:
            request = _read_request(device)
            if len(request) >= _FLAGS_AT_IN + _FLAGS.size:
                _, opcode, self._unique = _IN_HEADER.unpack_from(request)
                (offered,) = _FLAGS.unpack_from(request, _FLAGS_AT_IN)
                self._offered = opcode == FUSE_INIT and bool(offered & FUSE_HANDLE_KILLPRIV_V2)
            ours.send(request)
            theirs.setblocking(os.get_blocking(fd))
            os.dup2(theirs.fileno(), fd, inheritable=False)
        except BaseException:
            os.close(device)
            ours.close()
            theirs.close()
            raise
        self._device, self._ours, self._theirs = device, ours, theirs

    def _send_reply_to_kernel(self, fd: int) -> None:
        assert self._ours is not None and self._theirs is not None
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
        finally:
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


def _accepts_init(reply: bytes | bytearray, unique: int) -> bool:
    """A successful INIT reply to request *unique*, long enough to carry ``flags``."""
    if len(reply) < _FLAGS_AT_OUT + _FLAGS.size:
        return False
    length, error, replied_to = _OUT_HEADER.unpack_from(reply)
    return length == len(reply) and error == 0 and replied_to == unique
