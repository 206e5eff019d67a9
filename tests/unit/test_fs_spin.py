"""The daemon's spin-then-wait for /dev/fuse (kmsfs.fs.daemon._SpinThenWait), on a real pipe.

No timing assertions: each test checks what happens (returned, waited, let another task run),
with generous bounds only to keep a broken implementation from hanging the suite.
"""

from __future__ import annotations

import os

import pytest
import trio

from kmsfs.fs import daemon


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def test_returns_at_once_when_a_request_is_already_there() -> None:
    r, w = _pipe()
    os.write(w, b"x")

    async def main() -> None:
        with trio.fail_after(5):
            await daemon._SpinThenWait().wait_readable(r)

    trio.run(main)
    os.close(r)
    os.close(w)


def test_sleeps_in_trio_when_nothing_comes_during_the_spin() -> None:
    """The request arrives long after the spin: the waiter must be woken by trio's epoll,
    and other tasks must run meanwhile (it is not spinning all along)."""
    r, w = _pipe()
    ran_meanwhile = []

    async def writer() -> None:
        await trio.sleep(0.05)
        ran_meanwhile.append(True)
        os.write(w, b"x")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            with trio.fail_after(5):
                await daemon._SpinThenWait().wait_readable(r)

    trio.run(main)
    assert ran_meanwhile == [True]
    os.close(r)
    os.close(w)


def test_a_steady_stream_still_lets_other_tasks_run() -> None:
    """Requests always waiting (the fd stays readable): the waiter yields to trio at least
    every CHECKPOINT_SECONDS, so the signal watcher and worker-thread results are served."""
    r, w = _pipe()
    os.write(w, b"x")
    ticks = []

    async def other() -> None:
        while True:
            ticks.append(1)
            await trio.sleep(0)

    async def main() -> None:
        spin = daemon._SpinThenWait()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            await trio.sleep(0)  # let it start
            start = len(ticks)
            deadline = trio.current_time() + 0.05
            while trio.current_time() < deadline:
                await spin.wait_readable(r)  # never blocks: the fd is always readable
            assert len(ticks) > start + 5, "the other task was starved"
            nursery.cancel_scope.cancel()

    trio.run(main)
    os.close(r)
    os.close(w)


def test_does_idle_jobs_while_it_polls_and_returns_when_a_request_comes() -> None:
    """``idle`` (deriving keys ahead) runs between polls, one job at a time, until the request
    arrives; with nothing to do it is merely asked."""
    r, w = _pipe()
    jobs = []

    def idle() -> bool:
        jobs.append(1)
        os.write(w, b"x")  # the request arrives while the worker is busy with a job
        return True

    async def main() -> None:
        with trio.fail_after(5):
            await daemon._SpinThenWait(idle=idle).wait_readable(r)

    trio.run(main)
    assert len(jobs) == 1  # polled again after the job: returned, no second job
    os.close(r)
    os.close(w)


def test_one_idle_job_per_wait_and_none_while_a_request_is_waiting() -> None:
    """Each job may take an HSM round trip: never more than one per wait (the spin's polls stay
    cheap), and none at all when a request is already there to be served."""
    r, w = _pipe()
    jobs = []

    def idle() -> bool:
        jobs.append(1)
        return True

    async def writer() -> None:
        await trio.sleep(0.05)  # long after the spin
        os.write(w, b"x")

    async def main() -> None:
        spin = daemon._SpinThenWait(idle=idle)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            with trio.fail_after(5):
                await spin.wait_readable(r)
        assert len(jobs) == 1
        with trio.fail_after(5):
            await spin.wait_readable(r)  # the byte is still there: served at once
        assert len(jobs) == 1

    trio.run(main)
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("released", [True, False], ids=["released", "in-place"])
def test_a_session_aborted_once_the_mount_was_released_is_its_end_not_a_failure(
    monkeypatch: pytest.MonkeyPatch, released: bool
) -> None:
    """The kernel ended a detached mount's session, as its last user closed, with ECONNABORTED
    rather than ENODEV (CI, Linux 6.18): the daemon logged "main loop failed" and exited 1 for a
    clean end. That is the session's end once the daemon released the mount; an abort of a
    mount still in place (by root, through /sys/fs/fuse/connections) stays a failure."""
    from pathlib import Path

    from kmsfs.fs import daemon
    from kmsfs.fs.stopping import Stop

    async def aborted() -> None:
        async with trio.open_nursery() as nursery:  # as pyfuse3.main's workers raise it

            async def worker() -> None:
                raise ConnectionAbortedError(103, "fuse_session_receive_buf failed")

            nursery.start_soon(worker)

    monkeypatch.setattr(daemon.pyfuse3, "main", aborted)
    stop = Stop(Path("/nonexistent"))
    stop.released = released

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon._run_fuse, nursery.cancel_scope, daemon._SpinThenWait(),
                                stop)

    if released:
        trio.run(run)
        assert stop.ended
    else:
        with pytest.raises(BaseExceptionGroup) as info:
            trio.run(run)
        assert info.value.subgroup(ConnectionAbortedError) is not None
        assert not stop.ended


def test_tells_whether_a_request_waits_on_the_fd_it_serves() -> None:
    """requests_waiting: what a big write asks before it keeps the loop for a millisecond."""
    r, w = _pipe()
    spin = daemon._SpinThenWait()
    assert spin.requests_waiting() is False  # serves no fd yet
    os.write(w, b"first")

    async def main() -> None:
        with trio.fail_after(5):
            await spin.wait_readable(r)

    trio.run(main)
    assert spin.requests_waiting() is True
    os.read(r, 100)
    assert spin.requests_waiting() is False
    os.write(w, b"next")
    assert spin.requests_waiting() is True
    os.close(r)
    os.close(w)
