"""``-o low_latency``: fast CPU wake-ups while the mount is busy (a PM QoS latency request).

A small FUSE request is a ping-pong between two sleeping processes: the client sends it and
sleeps, the daemon answers and the kernel wakes the client. When the CPU the client sleeps on
has halted, that wake-up is an interrupt to a halted CPU; on a VM it is also a VM exit, and it
can cost more than serving the request. On this project's 2-vCPU VM, measured with the
kernel's fuse tracepoints during ``tar -x``, the client took 25 us on average from a reply to
its next request, while the daemon served most requests in 10 to 30 us. gocryptfs pays the same
wake-ups (less often, as its Go threads keep vCPUs busy): the cost belongs to the machine.

Linux lets a process ask for a bound on CPU wake-up latency (PM QoS, ``/dev/cpu_dma_latency``,
the interface tuned's *latency-performance* profile uses). With a bound of 0 us, idle CPUs poll
instead of halting, and a wake-up is a store to memory. ``tar -x`` of 5,000 small files then
took 0.93 s instead of 1.80 s (this VM, tmpfs backing).

The price is power: while the request is held, every idle CPU of the machine spins. So this is
an option, off by default, and the daemon holds the request only while requests arrive: from
the first request after a pause until :data:`HOLD_SECONDS` pass without one. Only root may
open the device.
"""

from __future__ import annotations

import errno
import logging
import os
import struct

log = logging.getLogger(__name__)

#: The kernel's interface for CPU wake-up latency requests (in microseconds, a native s32).
DEVICE = "/dev/cpu_dma_latency"
#: Released after this long without a request: a pause, not a gap between two requests.
HOLD_SECONDS = 0.5
#: The bound asked for while busy: idle CPUs poll.
BUSY_US = 0
#: PM_QOS_DEFAULT_VALUE: the request no longer bounds anything.
RELEASED_US = -1


class CpuLatencyRequest:
    """One PM QoS CPU latency request, open for the mount's life and off between busy spells.

    The kernel drops the request when its file is closed, so a daemon that dies, even by
    SIGKILL, leaves no bound behind.
    """

    def __init__(self, device: str = DEVICE) -> None:
        # OSError (EACCES without root, ENOENT without PM QoS) goes to the caller.
        self._fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        self.held = False

    def hold(self) -> None:
        """Ask for wake-ups with no delay (idempotent)."""
        if not self.held:
            os.write(self._fd, struct.pack("i", BUSY_US))
            self.held = True
            log.debug("cpu latency request: held")

    def release(self) -> None:
        """Let the CPUs halt again (idempotent)."""
        if self.held:
            os.write(self._fd, struct.pack("i", RELEASED_US))
            self.held = False
            log.debug("cpu latency request: released")

    def close(self) -> None:
        """Drop the request for good."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.held = False


def unavailable_reason(exc: OSError, device: str = DEVICE) -> str:
    """One line on why the request could not be opened."""
    hint = " (only root may ask for it)" if exc.errno in (errno.EPERM, errno.EACCES) else ""
    return f"cannot open {device}: {exc.strerror}{hint}"


def check_available(device: str | None = None) -> str | None:
    """Why ``-o low_latency`` cannot work here, or None if it can (checked before mounting)."""
    try:
        CpuLatencyRequest(device or DEVICE).close()
    except OSError as exc:
        return unavailable_reason(exc, device or DEVICE)
    return None
