"""A bigger readahead window for the mount, so a sequential read arrives as 1 MiB requests.

The kernel reads ahead of a sequential reader through the mount's backing-device info
(``/sys/class/bdi/MAJOR:MINOR``), whose window starts at 128 KiB for every FUSE mount: a
``dd`` or ``cp`` of a big file then costs one round trip, one header check and one pread per
128 KiB. libfuse already lets a request carry 1 MiB (``max_pages``), so a window of 1 MiB
makes each request eight times bigger and the daemon's work per byte smaller. Measured with
``dd`` of 512 MiB on tmpfs (caches dropped): 0.76-1.1 GB/s with 128 KiB, 1.0-1.1 GB/s with
1 MiB. Random reads keep their size: the kernel reads ahead only for a reader it sees read
in order.

Only root may write the setting; a mount by another user keeps the kernel's 128 KiB.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

#: The readahead window a mount gets: the largest request libfuse lets the kernel send.
READAHEAD_KB = 1024
BDI_ROOT = Path("/sys/class/bdi")


def raise_readahead(device: tuple[int, int], root: Path = BDI_ROOT) -> bool:
    """Set the readahead window of the mount on *device* (its ``st_dev`` as major, minor) to
    :data:`READAHEAD_KB`, unless it is that big already. True if the window is that big now.

    Call once the kernel has the daemon's INIT reply: the kernel sets the window from it,
    over what was there before.
    """
    knob = root / f"{device[0]}:{device[1]}" / "read_ahead_kb"
    if device[0] != 0:  # every FUSE mount has an anonymous device (major 0); a disk does not
        log.debug("readahead left alone: %s is not a FUSE mount's device", device)
        return False
    try:
        if int(knob.read_text()) >= READAHEAD_KB:
            return True
        # No O_CREAT, no following a symlink swapped in: only the kernel's own file.
        fd = os.open(knob, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, str(READAHEAD_KB).encode())
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:
        log.debug("readahead left at the kernel's window (%s: %s)", knob, exc)
        return False
    log.debug("readahead window: %d KiB", READAHEAD_KB)
    return True
