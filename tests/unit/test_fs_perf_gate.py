"""The lazy read gate the daemon gives pyfuse3 (kmsfs.fs.daemon._ReadGate).

The workers below follow pyfuse3's ``_wait_fuse_readable`` / ``_session_loop`` (3.x): count
themselves as readers, take the read lock, wait until the fd is readable, release the lock, read
one request, start another worker if none is left waiting, handle the request. A socket stands
in for /dev/fuse, one byte per request.
"""

from __future__ import annotations

import socket

import pyfuse3
import pytest
import trio
import trio.testing

from kmsfs.fs import daemon


class Loop:
    """pyfuse3's worker pool over one socket, with a given read lock."""

    def __init__(self, lock: object, sock: socket.socket, handle: object) -> None:
        self.lock, self.sock, self.handle = lock, sock, handle
        self.active_readers = 0
        self.task_count = 0
        self.exited = False  # fuse_session_exited()
        self.handled_by: list[str] = []

    async def _wait_readable(self) -> bool:
        self.active_readers += 1
        try:
            async with self.lock:  # type: ignore[attr-defined]
                if self.exited:
                    return False
                await trio.lowlevel.wait_readable(self.sock)
        except trio.ClosedResourceError:
            return False
        finally:
            self.active_readers -= 1
        return True

    async def worker(self, nursery: trio.Nursery, name: str) -> None:
        while True:
            if self.active_readers > 1:  # min_tasks=1
                break
            if not await self._wait_readable():
                break
            data = self.sock.recv(1)
            if not self.active_readers:
                self.task_count += 1
                nursery.start_soon(self.worker, nursery, f"w{self.task_count}")
            if not data:
                break
            self.handled_by.append(name)
            await self.handle(data)  # type: ignore[operator]
        self.task_count -= 1

    def start(self, nursery: trio.Nursery) -> None:
        self.task_count = 1
        nursery.start_soon(self.worker, nursery, "w0")


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


async def _run(lock_factory: object, handle: object, script: object) -> Loop:
    ours, theirs = _pair()
    with ours, theirs:
        loop = Loop(None, ours, handle)
        async with trio.open_nursery() as nursery:
            loop.lock = lock_factory(loop)  # type: ignore[operator]
            loop.start(nursery)
            with trio.fail_after(20):  # a hang is a failure, not a timing figure
                await script(loop, theirs)  # type: ignore[operator]
            nursery.cancel_scope.cancel()
    return loop


async def _settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def _gate(loop: Loop) -> daemon._ReadGate:
    gate = daemon._ReadGate()
    trio.lowlevel.add_instrument(gate)
    return gate


async def _fast(data: bytes) -> None:
    """A handler that never yields, like almost every kmsfs request."""


def test_requests_that_never_yield_stay_with_one_worker() -> None:
    async def script(loop: Loop, peer: socket.socket) -> None:
        for _ in range(50):
            peer.send(b"r")
            await _settle()
        assert len(loop.handled_by) == 50

    loop = trio.run(_run, _gate, _fast, script)
    # The first worker spawns a second (as pyfuse3 does) and then keeps the lock: the second
    # never has to be woken.
    assert set(loop.handled_by[1:]) == {loop.handled_by[1]}


def test_stock_lock_takes_turns() -> None:
    """What the gate saves: with trio.Lock the two workers alternate on every request."""

    async def script(loop: Loop, peer: socket.socket) -> None:
        for _ in range(20):
            peer.send(b"r")
            await _settle()

    loop = trio.run(_run, lambda _loop: trio.Lock(), _fast, script)
    assert len(set(loop.handled_by[-10:])) == 2


@pytest.mark.parametrize("blocked", [1, 3])
def test_a_waiting_handler_never_holds_up_other_requests(blocked: int) -> None:
    release = trio.Event()
    done: list[bytes] = []

    async def handle(data: bytes) -> None:
        if data == b"b":
            await release.wait()  # like a handler in a worker thread or on a file lock
        done.append(data)

    async def script(loop: Loop, peer: socket.socket) -> None:
        for _ in range(5):
            peer.send(b"r")
            await _settle()
        for _ in range(blocked):
            peer.send(b"b")
            await _settle()
        for _ in range(10):  # served while the blocked handlers wait
            peer.send(b"r")
            await _settle()
        assert done.count(b"r") == 15 and b"b" not in done
        release.set()
        await _settle()
        assert done.count(b"b") == blocked
        for _ in range(5):
            peer.send(b"r")
            await _settle()
        assert done.count(b"r") == 20

    trio.run(_run, _gate, handle, script)


def test_closing_the_fd_ends_every_worker() -> None:
    """pyfuse3.terminate(): notify_closing wakes the reader; the parked workers follow."""
    ours, theirs = _pair()

    async def main() -> Loop:
        loop = Loop(None, ours, _fast)
        async with trio.open_nursery() as nursery:
            loop.lock = _gate(loop)
            loop.start(nursery)
            with trio.fail_after(20):
                for _ in range(3):
                    theirs.send(b"r")
                    await _settle()
                assert loop.task_count == 2
                loop.exited = True  # what pyfuse3.terminate() does: exit flag, then close
                trio.lowlevel.notify_closing(ours)
                while loop.task_count:
                    await trio.sleep(0.01)
        return loop

    with ours, theirs:
        loop = trio.run(main)
    assert loop.task_count == 0


def test_install_and_remove() -> None:
    async def main() -> None:
        gate = daemon._install_read_gate()
        assert gate is not None
        try:
            assert pyfuse3.trio.Lock() is gate  # type: ignore[attr-defined]
            lowlevel = pyfuse3.trio.lowlevel  # type: ignore[attr-defined]
            assert isinstance(lowlevel, daemon._SpinThenWait)  # wait_readable spins first
            assert lowlevel.current_task is trio.lowlevel.current_task  # the rest is trio's
            assert daemon._install_read_gate() is None  # never stacked
        finally:
            daemon._remove_read_gate(gate)
        assert pyfuse3.trio is trio  # type: ignore[attr-defined]

    trio.run(main)
