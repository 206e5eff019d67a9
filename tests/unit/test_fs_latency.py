"""``-o low_latency``: the PM QoS request is held from the first request after a pause until
HOLD_SECONDS pass without one (kmsfs.fs.latency, kmsfs.fs.daemon._SpinThenWait).

The request is written to a regular file standing in for /dev/cpu_dma_latency, so each value
the daemon asked for can be read back in order; the real device is exercised through a mount
in tests/integration/test_fs_low_latency.py.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from kmsfs.fs import daemon, latency

HELD, RELEASED = latency.BUSY_US, latency.RELEASED_US


def _written(device: Path) -> list[int]:
    data = device.read_bytes()
    return [v for (v,) in struct.iter_unpack("i", data)]


@pytest.fixture
def device(tmp_path: Path) -> Path:
    path = tmp_path / "cpu_dma_latency"
    path.write_bytes(b"")
    return path


def _pipe() -> tuple[int, int]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    return r, w


def _request_after(
    delay: float, req: latency.CpuLatencyRequest, before_it: Callable[[], None] = lambda: None
) -> daemon._SpinThenWait:
    """Wait for /dev/fuse (a pipe here) with *req*, while a request comes *delay* seconds in
    (*before_it* runs just before it is sent); returns the waiter, its fd still readable."""
    r, w = _pipe()
    spin = daemon._SpinThenWait(latency=req)

    async def writer() -> None:
        await trio.sleep(delay)
        before_it()
        os.write(w, b"x")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            with trio.fail_after(5):
                await spin.wait_readable(r)
        with trio.fail_after(5):
            await spin.wait_readable(r)  # still readable: found at once by the spin

    try:
        trio.run(main)
    finally:
        os.close(r)
        os.close(w)
    return spin


def test_hold_and_release_write_each_change_once(device: Path) -> None:
    req = latency.CpuLatencyRequest(str(device))
    assert not req.held and _written(device) == []
    req.hold()
    req.hold()
    assert req.held and _written(device) == [HELD]
    req.release()
    req.release()
    assert not req.held and _written(device) == [HELD, RELEASED]
    req.close()
    req.close()  # twice is harmless


def test_unavailable_device_is_one_line_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-device"
    why = latency.check_available(str(missing))
    assert why is not None and str(missing) in why and "\n" not in why
    assert latency.check_available(str(tmp_path / "..")) is not None  # a directory: EISDIR


def test_a_request_after_a_pause_takes_the_hold(device: Path) -> None:
    """Nothing comes during the spin: the worker sleeps, and the request that wakes it starts
    a busy spell (held); a request found by spinning changes nothing."""
    req = latency.CpuLatencyRequest(str(device))
    _request_after(0.05, req)
    assert req.held and _written(device) == [HELD]


def test_a_request_found_by_the_spin_takes_the_hold_too(device: Path) -> None:
    """Requests that keep coming never let the worker sleep (the first ones after the mount,
    or after a release, can): the hold must not depend on a sleep."""
    r, w = _pipe()
    os.write(w, b"x")  # already waiting: the spin finds it at once
    req = latency.CpuLatencyRequest(str(device))

    async def main() -> None:
        with trio.fail_after(5):
            await daemon._SpinThenWait(latency=req).wait_readable(r)

    trio.run(main)
    os.close(r)
    os.close(w)
    assert req.held and _written(device) == [HELD]


def test_a_pause_longer_than_the_hold_releases_it_then_the_next_request_takes_it_again(
    device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon, "HOLD_SECONDS", 0.05)
    req = latency.CpuLatencyRequest(str(device))
    req.hold()
    seen_released = []
    _request_after(0.3, req, lambda: seen_released.append(not req.held))  # well past the hold
    assert seen_released == [True]  # released while idle, before the request came
    assert req.held and _written(device) == [HELD, RELEASED, HELD]


def test_a_pause_shorter_than_the_hold_keeps_it(
    device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(daemon, "HOLD_SECONDS", 5.0)
    req = latency.CpuLatencyRequest(str(device))
    req.hold()
    _request_after(0.05, req)  # past the spin, well within the hold
    assert req.held and _written(device) == [HELD]
