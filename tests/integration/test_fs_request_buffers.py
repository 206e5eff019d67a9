"""How the serving daemon meets big requests, on a real FUSE mount: the kernel sends a
sequential reader's reads as 1 MiB requests (the mount's readahead window), and 1 MiB writes
come from memory the daemon's heap keeps, not from pages faulted in anew each time
(kmsfs.fs.readahead, kmsfs.fs.heap). Speed is the bench's business (tools/bench.py); these
tests check the mechanisms, by what the kernel reports, never by a time."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsfs.fs.readahead import READAHEAD_KB
from tests.integration.fs_helpers import Mount

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


def minor_faults(pid: int) -> int:
    """The process's minor page faults so far, all threads (/proc/PID/stat field 10)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may set a mount's readahead")
def test_the_mount_reads_ahead_1_mib(mnt: Mount) -> None:
    st = os.stat(mnt.mountpoint)
    knob = Path(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb")
    assert int(knob.read_text()) == READAHEAD_KB == 1024


def test_big_writes_do_not_fault_in_fresh_pages_for_each_request(mnt: Mount) -> None:
    """A 1 MiB write allocates some 2 MiB in the daemon (the request and its ciphertext):
    from fresh pages that is some 500 faults per request; from the kept heap, none once it
    has grown (1 in all, measured)."""
    assert mnt.proc is not None
    chunk = os.urandom(MIB)
    fd = os.open(mnt.mountpoint / "big", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(8):  # let the heap grow to what the requests need
            os.write(fd, chunk)
        before = minor_faults(mnt.proc.pid)
        for _ in range(64):
            assert os.write(fd, chunk) == MIB
        faults = minor_faults(mnt.proc.pid) - before
    finally:
        os.close(fd)
    assert faults < 64, f"{faults} minor faults in the daemon for 64 writes of 1 MiB"
    assert (mnt.mountpoint / "big").stat().st_size == 72 * MIB
