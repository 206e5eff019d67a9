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

from kmsfs.crypto.content import BLOCK_OVERHEAD
from kmsfs.fs.entries import KmsfsOps
from kmsfs.fs.operations import INLINE_MAX, THREAD_THRESHOLD
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



def test_a_big_request_stays_on_the_loop_only_as_a_lone_append_or_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1 MiB write runs on the trio thread only when it adds whole blocks past the end and
    no other request waits: an overwrite gets a redo record, which only a worker thread may
    wait for room for (the journal refused it with ENOSPC on a full disk otherwise), and a
    request waiting behind a 1 MiB job would wait for all of it. A read of up to 1 MiB stays
    on the loop. Everything written reads back."""
    volume = make_volume(tmp_path / "c")
    ops = KmsfsOps(volume, SoftDeriver())
    in_threads: list[Any] = []
    real = trio.to_thread.run_sync

    async def watched(fn: Any, *args: Any, **kwargs: Any) -> Any:
        in_threads.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", watched)
    waiting = [False]
    ops.requests_waiting = lambda: waiting[0]
    mib = INLINE_MAX
    data = [os.urandom(mib) for _ in range(6)]

    async def main() -> None:
        info, _ = await ops.create(
            pyfuse3.ROOT_INODE, b"f", 0o100644, os.O_RDWR | os.O_CREAT, CTX
        )
        fh = info.fh
        await ops.write(fh, 0, data[0])  # appends, alone: on the loop
        await ops.write(fh, mib, data[1])
        assert bytes(await ops.read(fh, 0, mib)) == data[0]
        assert in_threads == []
        await ops.write(fh, mib // 2, data[2])  # over blocks the file has: a redo record
        assert in_threads == ["write"]
        waiting[0] = True  # another request waits: it must not wait for this one
        await ops.write(fh, 2 * mib, data[3])
        assert bytes(await ops.read(fh, 2 * mib, mib)) == data[3]
        assert in_threads == ["write", "write"]
        waiting[0] = False
        await ops.write(fh, 3 * mib + 100, data[4])  # a gap to fill first
        await ops.write(fh, 4 * mib + 100, data[5])  # its last block is partial: rewritten
        assert in_threads == ["write", "write", "write", "write"]
        assert len(await ops.read(fh, 0, 2 * mib)) == 2 * mib  # no request is that big
        assert in_threads[-1] == "read"
        expect = bytearray(data[0] + data[1])
        expect[mib // 2 : mib // 2 + mib] = data[2]
        expect += data[3] + bytes(100) + data[4] + data[5]
        assert bytes(await ops.read(fh, 0, THREAD_THRESHOLD)) == expect[:THREAD_THRESHOLD]
        got = bytearray()
        for off in range(0, len(expect), mib):
            got += await ops.read(fh, off, mib)
        assert got == expect
        await ops.release(fh)
        in_threads.clear()
        # O_APPEND: at the end whatever the offset says, on the loop (an append).
        info, attrs = await ops.create(
            pyfuse3.ROOT_INODE, b"log", 0o100644, os.O_WRONLY | os.O_CREAT | os.O_APPEND, CTX
        )
        await ops.write(info.fh, 0, data[0])
        await ops.write(info.fh, 0, data[1])
        await ops.release(info.fh)
        assert in_threads == []
        # A torn tail (a fragment too short to be a block, after the last whole one): the
        # write rewrites from that block on, under a redo record, so in a worker thread.
        (torn,) = [p for p in volume.iterdir() if p.is_file() and not p.name.startswith("kmsfs.")
                   and 2 * mib < p.stat().st_size < 3 * mib]
        with open(torn, "ab") as f:
            f.write(bytes(BLOCK_OVERHEAD))
        info = await ops.open(attrs.st_ino, os.O_RDWR, CTX)
        await ops.write(info.fh, 2 * mib, data[2])
        assert in_threads == ["write"]
        assert bytes(await ops.read(info.fh, 0, 2 * mib)) == data[0] + data[1]
        await ops.release(info.fh)

    trio.run(main)


def test_a_directory_renamed_while_a_thread_lists_it_still_lists_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Big directories are listed in a worker thread; a rename of the directory that runs on
    the request loop meanwhile must not make the listing empty or fail."""
    from kmsfs.fs import operations

    ops = KmsfsOps(make_volume(tmp_path / "c"), SoftDeriver())
    monkeypatch.setattr(operations, "SMALL_DIR_BYTES", 0)  # every listing takes the thread
    real = trio.to_thread.run_sync
    renamed: list[bool] = []

    async def rename_meanwhile(fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not renamed:  # the request loop serves a rename while the thread works
            await ops.rename(pyfuse3.ROOT_INODE, b"d", pyfuse3.ROOT_INODE, b"moved", 0, CTX)
            renamed.append(True)
        return await real(fn, *args, **kwargs)

    listed: list[bytes] = []

    def reply(token: Any, name: bytes, attrs: Any, next_id: int) -> bool:
        listed.append(name)
        return True

    async def main() -> None:
        d = await ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o40755, CTX)
        names = [b"file%03d" % i for i in range(20)] + [b"long" * 40]  # a long name too
        for name in names:
            info, _ = await ops.create(d.st_ino, name, 0o100644, os.O_RDWR | os.O_CREAT, CTX)
            await ops.release(info.fh)
        monkeypatch.setattr(trio.to_thread, "run_sync", rename_meanwhile)
        monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
        fh = await ops.opendir(d.st_ino, CTX)
        await ops.readdir(fh, 0, None)
        await ops.releasedir(fh)
        assert renamed and sorted(listed) == sorted([b".", b"..", *names])

    trio.run(main)


def test_the_pause_after_an_open_for_reading_derives_that_files_key(tmp_path: Path) -> None:
    """between_requests (the spin's idle hook) keys the file just opened: its READ then
    derives nothing (tests/unit/test_fs_key_on_open.py has the rules)."""
    calls: list[bytes] = []

    class Counting(SoftDeriver):
        def derive(self, info: bytes, epoch: int | None = None) -> bytes:
            calls.append(info)
            return super().derive(info, epoch)

    ops = KmsfsOps(make_volume(tmp_path / "c"), Counting())

    async def main() -> None:
        info, attrs = await ops.create(
            pyfuse3.ROOT_INODE, b"f", 0o100644, os.O_RDWR | os.O_CREAT, CTX
        )
        await ops.write(info.fh, 0, b"contents")
        await ops.release(info.fh)
        while ops.between_requests():  # keys of new files derived ahead, and so on
            pass
        before = len(calls)
        fh = (await ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert len(calls) == before
        assert ops.between_requests() is True
        assert len(calls) == before + 1
        assert bytes(await ops.read(fh, 0, 100)) == b"contents"
        assert len(calls) == before + 1
        await ops.release(fh)

    trio.run(main)


@pytest.mark.parametrize(
    ("raised", "errno_out", "logged"),
    [
        (OSError(13, "Permission denied"), 13, None),
        ("integrity", 5, "integrity: block 3: authentication failed"),
        ("hsm", 5, "hsm: handler failed: token removed"),
        (RuntimeError("bug"), 5, "unexpected error in handler"),
    ],
    ids=["oserror", "integrity", "hsm", "bug"],
)
def test_the_error_boundary_of_a_handler_answers_an_errno_and_logs_what_an_operator_needs(
    raised: Any, errno_out: int, logged: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing but FUSEError leaves a handler: an OSError keeps its errno, silently (ENOENT is
    no news); damage, a failed HSM and a bug give EIO and a log line (the integrity line is
    the one whose loss no test noticed: mutation audit)."""
    from kmsfs.errors import HsmError, IntegrityError
    from kmsfs.fs.operations import guard

    exc = {"integrity": IntegrityError("block 3: authentication failed"),
           "hsm": HsmError("token removed")}.get(raised, raised)

    class Ops:
        @guard
        async def handler(self) -> None:
            raise exc

    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(Ops().handler)
    assert info.value.errno == errno_out
    lines = [r.getMessage() for r in caplog.records if r.name == "kmsfs.fs.operations"]
    assert lines == ([] if logged is None else [logged])
