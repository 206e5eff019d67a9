"""Directories made ahead for mkdir (kmsfs.fs.dirpool): crash order, hand-out, clean-up.

The pool exists so that mkdir need not fsync; these tests check that it does not buy that with
the crash guarantee of docs/format.md: a directory gets a name mkdir hands out only after its
IV and the entry naming the IV were fsync'd, a half-made one is never handed out, and what is
not kmsfs's in the pool's directory is neither used nor removed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kmsfs.crypto.names import DIRIV_NAME
from kmsfs.fs import dirpool, dirs, names
from kmsfs.fs.dirpool import POOL_DIR, DirPool, is_ready_name, is_whole


def _pool(root: Path, size: int = 4) -> DirPool:
    pool = DirPool(os.fsencode(root), size=size)
    pool.open()
    return pool


def _fill(pool: DirPool, count: int) -> list[bytes]:
    """Make *count* directories ahead on this thread (what the pool's thread does)."""
    made = []
    for _ in range(count):
        made.append(pool._make_one())
        pool._ready.append(pool.path + b"/" + made[-1])
    return made


def test_a_directory_is_ready_only_after_its_iv_and_its_entry_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool(tmp_path)
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(old: bytes, new: bytes, *, src_dir_fd: int, dst_dir_fd: int) -> None:
        events.append(("rename", os.fsdecode(old)))
        real_rename(old, new, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    try:
        name = pool._make_one()
    finally:
        pool.close()
    temp = str(tmp_path / POOL_DIR / (names.TEMP_PREFIX + name.decode()))
    assert events == [
        ("fsync", f"{temp}/{DIRIV_NAME}"),  # the IV's bytes
        ("fsync", temp),  # the entry naming it
        ("rename", os.path.basename(temp)),  # only then the name mkdir may take
    ]
    ready = tmp_path / POOL_DIR / name.decode()
    assert is_ready_name(name) and is_whole(os.fsencode(ready))
    assert os.stat(ready).st_mode & 0o7777 == 0o700


def test_mkdir_takes_a_ready_directory_without_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool(tmp_path)
    (name,) = _fill(pool, 1)
    ready = tmp_path / POOL_DIR / name.decode()
    iv = (ready / DIRIV_NAME).read_bytes()
    os.utime(ready, (1_000_000, 1_000_000))  # made long ago, by an earlier mount
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", fsyncs.append)
    before = time.time()
    dirs.make_dir(os.fsencode(tmp_path / "d"), 0o751, pool=pool)
    pool.close()
    assert fsyncs == []
    assert (tmp_path / "d" / DIRIV_NAME).read_bytes() == iv
    assert not ready.exists()
    st = os.stat(tmp_path / "d")
    assert st.st_mode & 0o7777 == 0o751
    # a new directory has the current times, as mkdir(2) gives it
    assert st.st_mtime >= before - 1 and st.st_atime >= before - 1 and st.st_ctime >= before - 1
    assert sorted(os.listdir(tmp_path)) == ["d", POOL_DIR]


def test_mkdir_with_nothing_ready_makes_its_own_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = _pool(tmp_path)
    woken = []
    monkeypatch.setattr(pool._wake, "set", lambda: woken.append(True))
    fsynced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    dirs.make_dir(os.fsencode(tmp_path / "d"), 0o700, pool=pool)
    pool.close()
    assert woken  # the thread is told to make more
    assert len(fsynced) == 2 and fsynced[0].endswith("/" + DIRIV_NAME)
    assert is_whole(os.fsencode(tmp_path / "d"))


def test_a_directory_taken_but_not_placed_is_removed(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    _fill(pool, 1)

    def prepare(temp: bytes) -> None:
        raise PermissionError(1, "chown refused")

    with pytest.raises(PermissionError):
        dirs.make_dir(os.fsencode(tmp_path / "d"), 0o755, prepare=prepare, pool=pool)
    pool.close()
    assert os.listdir(tmp_path / POOL_DIR) == []
    assert not (tmp_path / "d").exists()


def test_opening_keeps_ready_directories_and_removes_what_a_crash_left(tmp_path: Path) -> None:
    first = _pool(tmp_path)
    kept = _fill(first, 2)
    first.close()
    pool_dir = tmp_path / POOL_DIR
    half = pool_dir / (names.TEMP_PREFIX + "0123456789abcdef")  # killed before the IV
    half.mkdir()
    half_iv = pool_dir / (names.TEMP_PREFIX + "fedcba9876543210")  # killed before its rename
    half_iv.mkdir()
    names.write_dir_iv(os.fsencode(half_iv))

    second = _pool(tmp_path)
    second.close()
    assert sorted(second._ready) == sorted(second.path + b"/" + n for n in kept)
    assert sorted(os.listdir(pool_dir)) == sorted(n.decode() for n in kept)


@pytest.mark.parametrize(
    "plant",
    [
        "file",  # a ready-looking name that is not a directory
        "symlink",  # one leading elsewhere
        "content",  # a directory holding more than its IV
        "no_iv",  # a directory without one
        "bad_iv",  # an IV of the wrong size
        "odd_name",  # a name the pool never makes
        "temp_with_content",  # a half-made name holding something that is not kmsfs's
    ],
)
def test_what_is_not_a_whole_directory_made_ahead_is_never_handed_out_nor_removed(
    tmp_path: Path, plant: str
) -> None:
    pool_dir = tmp_path / POOL_DIR
    pool_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names.write_dir_iv(os.fsencode(elsewhere))
    target = pool_dir / "00112233445566ff"
    if plant == "file":
        target.write_bytes(b"x")
    elif plant == "symlink":
        target.symlink_to(elsewhere)
    elif plant in ("content", "no_iv", "bad_iv", "odd_name", "temp_with_content"):
        if plant == "odd_name":
            target = pool_dir / "not-hex"
        if plant == "temp_with_content":
            target = pool_dir / (names.TEMP_PREFIX + "00112233445566ff")
        target.mkdir()
        if plant != "no_iv":
            (target / DIRIV_NAME).write_bytes(b"short" if plant == "bad_iv" else os.urandom(16))
        if plant in ("content", "temp_with_content"):
            (target / "someone's file").write_bytes(b"data")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    pool = _pool(tmp_path)
    pool.close()
    assert pool.take() is None
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_the_thread_keeps_the_pool_full_and_stops_on_close(tmp_path: Path) -> None:
    pool = _pool(tmp_path, size=3)
    pool.start()
    deadline = time.monotonic() + 30
    while len(pool._ready) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    taken = pool.take()
    assert taken is not None
    while len(pool._ready) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # a thread that did not stop at the size would make more meanwhile
    pool.close()
    assert pool._thread is not None and not pool._thread.is_alive()
    on_disk = sorted(os.listdir(tmp_path / POOL_DIR))
    assert len(on_disk) == 4  # three ready and the one taken (never placed, in this test)
    assert all(is_ready_name(n.encode()) for n in on_disk)


def test_the_thread_waits_and_tries_again_after_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dirpool, "RETRY_SECONDS", 0.05)
    pool = _pool(tmp_path, size=2)
    real_make = pool._make_one
    failures = []

    def make_one() -> bytes:
        if len(failures) < 2:
            failures.append(True)
            raise OSError(28, "No space left on device")
        return real_make()

    monkeypatch.setattr(pool, "_make_one", make_one)
    pool.start()
    deadline = time.monotonic() + 30
    while len(pool._ready) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.close()
    assert len(failures) == 2 and len(pool._ready) == 2


def test_a_pool_that_cannot_be_made_is_an_error_to_the_caller(tmp_path: Path) -> None:
    (tmp_path / POOL_DIR).write_bytes(b"in the way")
    pool = DirPool(os.fsencode(tmp_path))
    with pytest.raises(NotADirectoryError):
        pool.open()
    pool.close()
    assert (tmp_path / POOL_DIR).read_bytes() == b"in the way"
