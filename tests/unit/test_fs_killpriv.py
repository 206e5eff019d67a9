"""The INIT amendment (kmsfs.fs.killpriv) between a stand-in kernel and a stand-in libfuse.

The session fd is one end of a SOCK_SEQPACKET pair whose other end plays the kernel; the test
plays libfuse: it reads the request from the session fd number and writes its reply there.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest

from kmsfs.fs.killpriv import FUSE_HANDLE_KILLPRIV_V2, FUSE_INIT, InitAmendment

ASYNC_READ = 1 << 0


def _init_request(unique: int, flags: int, opcode: int = FUSE_INIT) -> bytes:
    body = struct.pack("<IIIII", 7, 41, 1 << 17, flags, 0) + bytes(44)
    head = struct.pack("<IIQQIIII", 40 + len(body), opcode, unique, 0, 0, 0, 0, 0)
    return head + body


def _init_reply(unique: int, flags: int, error: int = 0) -> bytes:
    body = struct.pack("<IIII", 7, 41, 1 << 17, flags) + bytes(48)
    if error:
        body = b""
    return struct.pack("<IiQ", 16 + len(body), error, unique) + body


def _reply_flags(reply: bytes) -> int:
    return int(struct.unpack_from("<I", reply, 16 + 12)[0])


def _exchange(request: bytes, answer) -> tuple[bytes, InitAmendment, socket.socket, int]:  # type: ignore[no-untyped-def]
    """Run the amendment around one libfuse answer; (what the kernel got, amendment, the
    kernel's end, the session fd)."""
    kernel, session = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = session.detach()
    kernel.send(request)
    amend = InitAmendment()
    assert amend.before_read(fd) is True  # libfuse reads at once
    got = os.read(fd, 1 << 16)  # libfuse reads the request from its usual fd number ...
    assert got == request
    os.write(fd, answer(got))  # ... and replies there
    assert amend.before_read(fd) is False
    assert amend.done
    kernel.settimeout(5)
    return kernel.recv(1 << 16), amend, kernel, fd


def test_the_flag_is_added_when_the_kernel_offers_it() -> None:
    request = _init_request(7, ASYNC_READ | FUSE_HANDLE_KILLPRIV_V2)
    reply, amend, kernel, fd = _exchange(request, lambda _: _init_reply(7, ASYNC_READ))
    assert _reply_flags(reply) == ASYNC_READ | FUSE_HANDLE_KILLPRIV_V2
    assert reply[:28] == _init_reply(7, ASYNC_READ)[:28]
    assert reply[32:] == _init_reply(7, ASYNC_READ)[32:]  # everything else byte for byte
    assert amend.negotiated
    # The fd number is /dev/fuse again: what the kernel sends next arrives there directly.
    kernel.send(b"next request")
    assert os.read(fd, 100) == b"next request"
    os.close(fd)
    kernel.close()


@pytest.mark.parametrize(
    ("request_", "answer"),
    [
        # a kernel that does not offer it
        (_init_request(7, ASYNC_READ), lambda _: _init_reply(7, ASYNC_READ)),
        # libfuse refusing INIT (a protocol it does not speak)
        (_init_request(7, FUSE_HANDLE_KILLPRIV_V2), lambda _: _init_reply(7, 0, error=-71)),
        # a reply to another request, or one whose length field lies
        (_init_request(7, FUSE_HANDLE_KILLPRIV_V2), lambda _: _init_reply(8, ASYNC_READ)),
        (_init_request(7, FUSE_HANDLE_KILLPRIV_V2), lambda _: _init_reply(7, ASYNC_READ)[:40]),
        # not an INIT request at all
        (_init_request(7, FUSE_HANDLE_KILLPRIV_V2, opcode=3), lambda _: _init_reply(7, 0)),
    ],
)
def test_anything_else_passes_through_unchanged(request_: bytes, answer) -> None:  # type: ignore[no-untyped-def]
    reply, amend, kernel, fd = _exchange(request_, answer)
    assert reply == answer(request_)
    assert not amend.negotiated
    os.close(fd)
    kernel.close()


def test_libfuse_not_answering_fails_the_mount_at_once_and_the_fd_is_restored() -> None:
    """The kernel gets EIO for its INIT (the mount fails) rather than no answer (a hang)."""
    kernel, session = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = session.detach()
    kernel.send(_init_request(7, FUSE_HANDLE_KILLPRIV_V2))
    amend = InitAmendment()
    assert amend.before_read(fd)
    os.read(fd, 1 << 16)
    with pytest.raises(RuntimeError, match="did not answer"):
        amend.before_read(fd)
    assert amend.done and not amend.negotiated
    kernel.settimeout(5)
    assert kernel.recv(100) == struct.pack("<IiQ", 16, -errno.EIO, 7)
    kernel.send(b"x")
    assert os.read(fd, 10) == b"x"
    os.close(fd)
    kernel.close()
