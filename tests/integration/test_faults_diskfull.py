"""Disk full: the ciphertext directory lives on a real 8 MiB tmpfs that the test fills up.

Writes must fail with ENOSPC (never EIO), the mount must stay up, everything fsync'd before must
read back exactly, and a write that runs out of space must not tear a block so that older data
becomes unreadable: a rewrite of an existing block reads back as the old data or the new, never
EIO. After space is freed, writing works again.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fault_helpers import drop_cache, tmpfs, write_synced
from tests.integration.fs_helpers import make_volume

CHUNK = 64 * 1024


@contextlib.contextmanager
def _small_disk_mount(tmp_path: Path, mounter) -> Iterator[Any]:  # type: ignore[no-untyped-def]
    """A mount whose ciphertext directory is on a fresh 8 MiB tmpfs (stopped on the way out)."""
    with tmpfs(tmp_path / "small", "8m") as small:
        mount = mounter(make_volume(small / "cipher"))
        try:
            yield mount
        finally:
            mount.stop()


def _fill(directory: Path) -> int:
    """Fill the disk with new files (so no file of the test is torn by it); must see ENOSPC.

    Big files first, then ever smaller ones until not even one page is left on the tmpfs.
    """
    written = 0
    n = 0
    for size in (CHUNK * 16, CHUNK, 4000, 100, 1):
        for _ in range(2000):
            n += 1
            try:
                write_synced(directory / f"filler{n}", os.urandom(size))
                written += size
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, f"filling the disk gave {exc!r}"
                break
        else:
            pytest.fail("the disk never filled up")
    return written


def _free(directory: Path) -> None:
    for name in os.listdir(directory):
        if name.startswith("filler"):
            os.unlink(directory / name)


def _pwrite_full(path: Path, data: bytes, offset: int) -> int | None:
    """pwrite on a full disk: the errno (must be ENOSPC) or None if it succeeded."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
        return None
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)


def _old_or_new(path: Path, old: bytes, new: bytes) -> None:
    drop_cache(path)
    try:
        got = path.read_bytes()
    except OSError as exc:
        pytest.fail(f"{path.name}: reading after a failed rewrite gave {exc!r} (torn block)")
    assert got in (old, new), f"{path.name}: neither the old nor the new content"


def test_disk_full_gives_enospc_keeps_synced_data_and_recovers(
    tmp_path: Path, mounter  # type: ignore[no-untyped-def]
) -> None:
    with _small_disk_mount(tmp_path, mounter) as mount:
        m = mount.mountpoint
        synced = {f"keep{i}": os.urandom(n) for i, n in enumerate((1, 4096, 10_000, 300_001))}
        for name, data in synced.items():
            write_synced(m / name, data)
        mid_old = os.urandom(3 * 4096)  # block 1 is rewritten in place while full
        write_synced(m / "mid", mid_old)

        assert _fill(m) > 0
        assert mount.alive()
        assert {*synced, "mid"} <= set(os.listdir(m))
        os.statvfs(m)
        with pytest.raises(OSError) as exc:
            write_synced(m / "new-file", os.urandom(20_000))
        assert exc.value.errno == errno.ENOSPC

        # An in-place rewrite while the disk is full: old or new content, never EIO.
        patch = os.urandom(4096)
        mid_new = mid_old[:4196] + patch + mid_old[8292:]
        err = _pwrite_full(m / "mid", patch, 4196)
        assert err in (None, errno.ENOSPC), errno.errorcode.get(err or 0)
        _old_or_new(m / "mid", mid_old, mid_new)

        for name, data in synced.items():
            drop_cache(m / name)
            assert (m / name).read_bytes() == data, name
        assert mount.alive()

        # Space freed: writing works again, also to the file that hit ENOSPC.
        _free(m)
        fresh = os.urandom(500_000)
        write_synced(m / "new-file", fresh)
        write_synced(m / "mid", mid_new)
        for name, data in {**synced, "new-file": fresh, "mid": mid_new}.items():
            drop_cache(m / name)
            assert (m / name).read_bytes() == data, name
        log = mount.log()
        assert "Traceback" not in log and "unexpected error" not in log, log


def test_disk_full_never_tears_a_block(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """A write that needs new space on a full disk must not leave a half-written block.

    ``tail`` ends in a 1808-byte block, so growing it rewrites that block across a page the
    full tmpfs cannot give: a single pwrite would be cut short there and leave the old last
    block half old, half new (EIO forever) unless the old bytes are put back. ``log`` is
    appended to until ENOSPC, then again: the second append must see ENOSPC too, not EIO from
    the first one's torn block.
    """
    with _small_disk_mount(tmp_path, mounter) as mount:
        m = mount.mountpoint
        tail_old = os.urandom(10_000)
        write_synced(m / "tail", tail_old)
        log_old = os.urandom(5_000)
        write_synced(m / "log", log_old)
        _fill(m)

        grow = os.urandom(6000)
        tail_new = tail_old[:9000] + grow
        err = _pwrite_full(m / "tail", grow, 9000)
        assert err in (None, errno.ENOSPC), errno.errorcode.get(err or 0)
        _old_or_new(m / "tail", tail_old, tail_new)

        for attempt in range(2):
            with pytest.raises(OSError) as exc, open(m / "log", "ab", buffering=0) as f:
                f.write(os.urandom(9_000))
                os.fsync(f.fileno())
            assert exc.value.errno == errno.ENOSPC, f"append {attempt}: {exc.value!r}"
        drop_cache(m / "log")
        try:
            assert (m / "log").read_bytes()[:5000] == log_old
        except OSError as e:
            pytest.fail(f"log: the fsync'd part became unreadable after ENOSPC: {e!r}")

        _free(m)
        with open(m / "log", "ab") as f:
            f.write(b"more")
        data = (m / "log").read_bytes()
        assert data[:5000] == log_old and data.endswith(b"more")
        assert mount.alive()


def test_failed_append_on_full_disk_leaves_the_file_as_it_was(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """An append that the disk cannot take is cut back to the file's old size
    (kmsfs.fs.files._pwrite_all), never left with a torn tail.

    ``aligned`` holds exactly one block, so an append starts a new block; its ciphertext ends
    4050 bytes into a tmpfs page that is already allocated, so on the full disk the pwrite is
    cut short there, after writing part of the new block. ``empty`` has no header yet: its
    first write fails as a whole and it must stay an empty, readable file.
    """
    with _small_disk_mount(tmp_path, mounter) as mount:
        m = mount.mountpoint
        aligned_old = os.urandom(4096)
        write_synced(m / "aligned", aligned_old)
        write_synced(m / "empty", b"")
        _fill(m)

        for name, old in (("aligned", aligned_old), ("empty", b"")):
            with pytest.raises(OSError) as exc, open(m / name, "ab", buffering=0) as f:
                f.write(os.urandom(9_000))
            assert exc.value.errno == errno.ENOSPC, f"{name}: {exc.value!r}"
            assert (m / name).stat().st_size == len(old), name
            drop_cache(m / name)
            try:
                assert (m / name).read_bytes() == old, name
            except OSError as e:
                pytest.fail(f"{name}: unreadable after a failed append: {e!r}")
        assert mount.alive()


def test_truncate_up_on_full_disk_leaves_the_file_as_it_was(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """Growing a file fills the gap with encrypted zeros; if the disk cannot take them the
    truncate fails with ENOSPC and the file keeps its size and content, its gap gone again
    (it stayed grown, and left the disk full)."""
    with _small_disk_mount(tmp_path, mounter) as mount:
        m = mount.mountpoint
        old = os.urandom(1000)
        write_synced(m / "f", old)
        with pytest.raises(OSError) as exc:
            os.truncate(m / "f", 64 * 1024 * 1024)
        assert exc.value.errno == errno.ENOSPC
        assert (m / "f").stat().st_size == len(old)
        drop_cache(m / "f")
        assert (m / "f").read_bytes() == old
        write_synced(m / "after", os.urandom(100_000))  # the space came back
        assert mount.alive()
