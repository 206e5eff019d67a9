"""Long jobs leave the request loop: every other request of the mount waits while one runs there.

In-process (no FUSE): the handlers of a real volume, with trio's worker-thread call watched.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyfuse3
import pytest
import trio

from kmsfs.fs.entries import KmsfsOps
from kmsfs.fs.operations import THREAD_THRESHOLD
from tests.integration.fs_helpers import SoftDeriver, make_volume

CTX = SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0o022)


def test_a_small_write_far_past_the_end_runs_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One byte written 8 MiB past the end means 8 MiB of encrypted zeros first."""
    ops = KmsfsOps(make_volume(tmp_path / "c"), SoftDeriver())
    in_threads: list[Any] = []
    real = trio.to_thread.run_sync

    async def watched(fn: Any, *args: Any, **kwargs: Any) -> Any:
        in_threads.append(fn)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", watched)

    async def main() -> None:
        info, _ = await ops.create(
            pyfuse3.ROOT_INODE, b"f", 0o100644, os.O_RDWR | os.O_CREAT, CTX
        )
        await ops.write(info.fh, 0, b"near")
        await ops.write(info.fh, THREAD_THRESHOLD // 2, b"gap within bounds")
        assert in_threads == []  # small jobs stay on the loop
        await ops.write(info.fh, 8 << 20, b"far")
        assert len(in_threads) == 1
        assert await ops.read(info.fh, 8 << 20, 3) == b"far"
        assert bytes(await ops.read(info.fh, 4 << 20, 4)) == bytes(4)
        await ops.release(info.fh)

    trio.run(main)
