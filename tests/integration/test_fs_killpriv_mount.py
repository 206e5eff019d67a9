"""FUSE_HANDLE_KILLPRIV_V2 through a real mount: writes come without a GETXATTR each.

The set-id bits the file system must then drop itself are judged against the local disk in
test_fs_permissions.
"""

from __future__ import annotations

import os
from pathlib import Path


def _reads(pid: int) -> int:
    """read(2)-family calls the process made so far: one per FUSE request it took."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr in /proc/PID/io")


def test_writes_reach_the_daemon_as_one_request_each(mnt) -> None:  # type: ignore[no-untyped-def]
    """Without the flag the kernel asks for security.capability before every write(2): two
    requests (two reads of /dev/fuse) per write. With it, one."""
    path = mnt.mountpoint / "f"
    path.write_bytes(bytes(1 << 20))
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"a" * 4096, 0)  # the first write after an attribute refresh may ask
        before = _reads(mnt.proc.pid)
        for i in range(200):
            os.pwrite(fd, bytes([i]) * 4096, 4096 * (i % 256))
        after = _reads(mnt.proc.pid)
    finally:
        os.close(fd)
    assert after - before < 260, f"{after - before} reads for 200 writes"
    data = path.read_bytes()
    assert data[4096 * 199 : 4096 * 200] == bytes([199]) * 4096
