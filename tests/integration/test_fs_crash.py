"""What was fsync'd survives kill -9 of the daemon (DESIGN.md 2.5)."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmsfs.fs import files
from kmsfs.fs.files import ContentKeys, FileContent
from kmsfs.fs.journal import WriteJournal
from tests.integration.fs_helpers import SoftDeriver
from tests.integration.test_fs_integrity import cipher_path


def test_fsynced_data_survives_kill9(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    m = mount.mountpoint
    data = os.urandom(1_000_003)
    (m / "d").mkdir()
    fd = os.open(m / "d" / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    mount.kill9()
    with contextlib.suppress(OSError):  # the connection is gone; close may report it
        os.close(fd)
    mount.start()
    assert (m / "d" / "f").read_bytes() == data
    # The file is still writable and consistent after the crash.
    with open(m / "d" / "f", "r+b") as f:
        f.seek(4000)
        f.write(b"after")
    assert (m / "d" / "f").read_bytes()[4000:4005] == b"after"


def test_a_mount_puts_back_a_block_a_killed_overwrite_tore(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """The torn state made exactly (the write stops at its first page boundary, the daemon
    dies before it marks its journal record done), then a real mount: it replays the journal
    before it serves, so the fsync'd data around the write reads back and nothing is EIO."""
    mount = mounter(volume)
    old = os.urandom(4 * 4096)
    (mount.mountpoint / "f").write_bytes(old)
    mount.stop()
    path = cipher_path(volume, "f")
    keys = ContentKeys(SoftDeriver(), key_epochs=True)
    log = WriteJournal(os.fsencode(volume))
    content = FileContent(os.open(path, os.O_RDWR), keys, os.fsencode(path), log)
    new = os.urandom(4096)
    real = files._pwrite_fully

    def killed_at_page_boundary(fd: int, view: memoryview, offset: int) -> None:
        real(fd, view[: 4096 - offset % 4096], offset)
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after it runs

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files, "_pwrite_fully", killed_at_page_boundary)
        patch.setattr(WriteJournal, "done", lambda self, at: None)
        with pytest.raises(KeyboardInterrupt):
            content.write(4096, new)
    os.close(content.fd)
    log.close()

    mount.start()
    assert (mount.mountpoint / "f").read_bytes() == old[:4096] + new + old[8192:]
    assert "put back" in mount.log()
    assert os.listdir(mount.mountpoint) == ["f"]  # the journal is internal


def test_overwrites_killed_at_random_leave_every_block_whole(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """The real kernel and SIGKILL: a writer rewrites a synced file in place, the daemon is
    killed at a random moment; after the remount every 4 KiB block is wholly old or wholly new
    (before the journal, about one kill in 20 left a block that read as EIO)."""
    mount = mounter(volume)
    m = mount.mountpoint
    size = 2 * 1024 * 1024
    (m / "f").write_bytes(b"A" * size)
    rng = random.Random(5)
    for trial in range(8):
        writer = subprocess.Popen(
            [sys.executable, "-c", _OVERWRITER, str(m / "f"), str(size)],
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.2 + rng.random() * 0.3)
        mount.kill9()
        writer.wait(timeout=30)
        mount.start()
        data = (m / "f").read_bytes()
        assert len(data) == size, trial
        blocks = {data[i : i + 4096] for i in range(0, size, 4096)}
        assert blocks <= {b"A" * 4096, b"B" * 4096, b"C" * 4096}, trial
    assert mount.alive()


_OVERWRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
size = int(sys.argv[2])
n = 0
while True:
    fill = b"BC"[n % 2:n % 2 + 1] * size
    n += 1
    try:
        os.pwrite(fd, fill, 0)
    except OSError:
        break
"""


@pytest.mark.parametrize("renamed", ["file", "parent", "exchanged"])
def test_a_killed_write_to_a_file_renamed_while_open_is_put_back(
    tmp_path: Path, renamed: str
) -> None:
    """Log rotation: the writer keeps appending to the file it has open, now app.log.1 (or
    its directory was renamed). Records named the path the file was opened at, which a replay
    then skipped: the torn block stayed, the older data in it EIO. An overwrite before the
    move makes the file's record path early, so the move must change it too."""
    import types

    import pyfuse3
    import trio

    from kmsfs.fs import journal
    from kmsfs.fs.entries import KmsfsOps
    from tests.integration.fs_helpers import make_volume

    volume = make_volume(tmp_path / "cipher")
    ops = KmsfsOps(volume, SoftDeriver())
    ctx = types.SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0)
    old = os.urandom(4 * 4096)
    new = os.urandom(100)
    early = os.urandom(10)
    real = files._pwrite_fully

    def killed_at_page_boundary(fd: int, view: memoryview, offset: int) -> None:
        real(fd, view[: 4096 - offset % 4096], offset)
        raise KeyboardInterrupt  # stands for SIGKILL: nothing after it runs

    async def main() -> None:
        d = await ops.mkdir(pyfuse3.ROOT_INODE, b"d", 0o40755, ctx)
        info, _ = await ops.create(d.st_ino, b"app.log", 0o100644, os.O_RDWR, ctx)
        await ops.write(info.fh, 0, old)
        await ops.write(info.fh, 100, early)  # recorded under the path it has before the move
        if renamed == "file":
            await ops.rename(d.st_ino, b"app.log", d.st_ino, b"app.log.1", 0, ctx)
        elif renamed == "parent":
            await ops.rename(pyfuse3.ROOT_INODE, b"d", pyfuse3.ROOT_INODE, b"d.old", 0, ctx)
        else:  # its directory swapped with another (RENAME_EXCHANGE)
            await ops.mkdir(pyfuse3.ROOT_INODE, b"e", 0o40755, ctx)
            await ops.rename(
                pyfuse3.ROOT_INODE, b"d", pyfuse3.ROOT_INODE, b"e", pyfuse3.RENAME_EXCHANGE, ctx
            )
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(files, "_pwrite_fully", killed_at_page_boundary)
            patch.setattr(WriteJournal, "done", lambda self, at: None)
            with pytest.raises(KeyboardInterrupt):
                await ops.write(info.fh, 5000, new)

    trio.run(main)
    assert journal.replay(os.fsencode(volume), ContentKeys(SoftDeriver(), True).cipher) == 1
    ops2 = KmsfsOps(volume, SoftDeriver())
    where = {"file": (b"d", b"app.log.1"), "parent": (b"d.old", b"app.log"),
             "exchanged": (b"e", b"app.log")}[renamed]

    async def read_back() -> bytes:
        d = await ops2.lookup(pyfuse3.ROOT_INODE, where[0], ctx)
        f = await ops2.lookup(d.st_ino, where[1], ctx)
        info = await ops2.open(f.st_ino, os.O_RDONLY, ctx)
        return bytes(await ops2.read(info.fh, 0, len(old)))

    before = old[:100] + early + old[110:]
    assert trio.run(read_back) == before[:5000] + new + before[5100:]


@pytest.mark.parametrize("kind", ["directory", "fifo", "symlink"])
def test_a_journal_that_is_not_a_file_stops_the_mount_naming_it(  # type: ignore[no-untyped-def]
    volume: Path, tmp_path: Path, kind: str
) -> None:
    from tests.integration.fs_helpers import Mount

    where = volume / "kmsfs.journal"
    if kind == "directory":
        where.mkdir()
    elif kind == "fifo":
        os.mkfifo(where)
    else:
        where.symlink_to(tmp_path / "elsewhere")
    mount = Mount(volume, tmp_path / "mnt", tmp_path / "log")
    try:
        with pytest.raises(RuntimeError):
            mount.start()
    finally:
        mount.stop()
    # (the stub daemon prints a traceback; kmsfs mount prints this one line)
    assert f"{where}: " in mount.log() and "not kmsfs's write journal: move it away" in mount.log()


def test_a_mount_marks_returned_overwrites_done_in_the_pause_after(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """The record of an overwrite is marked done off the write's path, while the daemon waits
    for the next request: a moment after the last write, none is live."""
    from kmsfs.fs.journal import live_records

    mount = mounter(volume)
    with open(mount.mountpoint / "f", "w+b") as f:
        f.write(os.urandom(8 * 4096))
        f.flush()
        for i in range(20):
            os.pwrite(f.fileno(), b"x" * 4096, (i % 8) * 4096)  # overwrites: recorded
    deadline = time.monotonic() + 5
    while live_records(os.fsencode(volume)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_records(os.fsencode(volume)) == []
    assert (mount.mountpoint / "f").read_bytes()[:4096] == b"x" * 4096
