"""Unmounting with fusermount3, as ``kmsfs umount`` and a stopping daemon both do it.

fusermount3 needs no privilege for a user's own mount, and says why it failed only in its
message: it runs, as the commands it is asked about (``stat -f``), with messages in English
(:func:`c_locale`), so that "busy" can be matched.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

#: How fusermount3 ends its message when the mount is in use.
BUSY = os.strerror(errno.EBUSY)


def c_locale() -> dict[str, str]:
    """This process's environment with LC_ALL=C: a child's messages then match strerror's."""
    return {**os.environ, "LC_ALL": "C"}


def unmount(mountpoint: str | Path, lazy: bool = False) -> tuple[bool, str]:
    """``fusermount3 -u`` (``-z``: detach) of *mountpoint*; (done, the last line of why not).

    The path is made absolute and follows "--": a mount point named "-dash" is no option."""
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), "--", os.path.abspath(mountpoint)]
    try:
        proc = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
            env=c_locale(),
        )
    except OSError as exc:
        return False, f"fusermount3: {exc.strerror}"
    if proc.returncode == 0:
        return True, ""
    return False, (proc.stderr.strip().splitlines() or ["fusermount3 failed"])[-1]


def busy(why: str) -> bool:
    """Whether :func:`unmount` failed because the mount is in use."""
    return why.endswith(BUSY)
