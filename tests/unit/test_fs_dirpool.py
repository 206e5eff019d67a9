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
from kmsfs.fs import dirpool, dirs, names, posix
from kmsfs.fs.dirpool import POOL_DIR, DirPool, is_ready_name, is_whole_at


def _pool(root: Path, size: int = 4) -> DirPool:
    pool = DirPool(os.fsencode(root), lambda: 1, size=size)
    pool.open()
    return pool


def _fill(pool: DirPool, count: int) -> list[bytes]:
    """Make *count* directories ahead on this thread (what the pool's thread does)."""
    made = []
    for _ in range(count):
        made.append(pool._make_one(1))
        pool._ready.append((made[-1], 1))
    return made


def _whole(root: Path, name: str | bytes) -> bool:
    fd = os.open(root / POOL_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return is_whole_at(fd, os.fsencode(name), os.geteuid())
    finally:
        os.close(fd)


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
        name = pool._make_one(1)
    finally:
        pool.close()
    temp = str(tmp_path / POOL_DIR / (names.TEMP_PREFIX + name.decode()))
    assert events == [
        ("fsync", f"{temp}/{DIRIV_NAME}"),  # the IV's bytes
        ("fsync", temp),  # the entry naming it
        ("rename", os.path.basename(temp)),  # only then the name mkdir may take
    ]
    ready = tmp_path / POOL_DIR / name.decode()
    assert is_ready_name(name) and _whole(tmp_path, name)
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
    dirs.make_dir(os.fsencode(tmp_path / "d"), 0o751, 1, pool=pool)
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
    dirs.make_dir(os.fsencode(tmp_path / "d"), 0o700, 1, pool=pool)
    pool.close()
    assert woken  # the thread is told to make more
    assert len(fsynced) == 2 and fsynced[0].endswith("/" + DIRIV_NAME)
    assert len((tmp_path / "d" / DIRIV_NAME).read_bytes()) == 16
    assert os.listdir(tmp_path / "d") == [DIRIV_NAME]


def test_a_directory_taken_but_not_placed_is_removed(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    _fill(pool, 1)

    def prepare(fd: int) -> None:
        raise PermissionError(1, "chown refused")

    with pytest.raises(PermissionError):
        dirs.make_dir(os.fsencode(tmp_path / "d"), 0o755, 1, prepare=prepare, pool=pool)
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
    names.write_dir_iv(os.fsencode(half_iv), 1)

    second = _pool(tmp_path)
    second.close()
    assert sorted(second._ready) == sorted((name, 1) for name in kept)
    assert sorted(os.listdir(pool_dir)) == sorted(n.decode() for n in kept)


@pytest.mark.parametrize("given", ["mode", "mode_and_owner"])
def test_opening_removes_a_ready_directory_a_killed_mkdir_took_but_never_placed(
    tmp_path: Path, given: str, caplog: pytest.LogCaptureFixture
) -> None:
    """mkdir gives a ready directory its caller's mode and owner, then renames it into place;
    a daemon killed in between left it in the pool, never visible, and every later mount
    warned of it as not kmsfs's (found by review). The next mount removes it."""
    first = _pool(tmp_path)
    kept, taken = _fill(first, 2)
    first.close()
    os.chmod(tmp_path / POOL_DIR / os.fsdecode(taken), 0o755)
    if given == "mode_and_owner":
        os.chown(tmp_path / POOL_DIR / os.fsdecode(taken), 1000, 1000)

    with caplog.at_level("WARNING", logger="kmsfs.fs.dirpool"):
        second = _pool(tmp_path)
        second.close()
    assert list(second._ready) == [(kept, 1)]
    assert os.listdir(tmp_path / POOL_DIR) == [kept.decode()]
    assert not caplog.records


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
        "temp_symlink",  # a half-made name leading to another directory with an IV
        "foreign_owner_content",  # someone else's directory holding more than an IV
    ],
)
def test_what_is_not_a_whole_directory_made_ahead_is_never_handed_out_nor_removed(
    tmp_path: Path, plant: str
) -> None:
    pool_dir = tmp_path / POOL_DIR
    pool_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names.write_dir_iv(os.fsencode(elsewhere), 1)
    target = pool_dir / "00112233445566ff"
    if plant == "file":
        target.write_bytes(b"x")
    elif plant == "symlink":
        target.symlink_to(elsewhere)
    elif plant == "temp_symlink":
        (pool_dir / (names.TEMP_PREFIX + "00112233445566ff")).symlink_to(elsewhere)
    elif plant == "foreign_owner_content":
        target.mkdir(mode=0o700)
        names.write_dir_iv(os.fsencode(target), 1)
        (target / "someone's file").write_bytes(b"data")
        os.chown(target, 1000, 1000)
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
    taken = pool.take(1)
    pool.close()
    assert taken is None
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_the_thread_keeps_the_pool_full_and_stops_on_close(tmp_path: Path) -> None:
    pool = _pool(tmp_path, size=3)
    pool.start()
    deadline = time.monotonic() + 30
    while len(pool._ready) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    taken = pool.take(1)
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

    def make_one(epoch: int) -> bytes:
        if len(failures) < 2:
            failures.append(True)
            raise OSError(28, "No space left on device")
        return real_make(epoch)

    monkeypatch.setattr(pool, "_make_one", make_one)
    pool.start()
    deadline = time.monotonic() + 30
    while len(pool._ready) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    pool.close()
    assert len(failures) == 2 and len(pool._ready) == 2


def test_a_pool_that_cannot_be_made_is_an_error_to_the_caller(tmp_path: Path) -> None:
    (tmp_path / POOL_DIR).write_bytes(b"in the way")
    pool = DirPool(os.fsencode(tmp_path), lambda: 1)
    with pytest.raises(NotADirectoryError):
        pool.open()
    pool.close()
    assert (tmp_path / POOL_DIR).read_bytes() == b"in the way"


@pytest.mark.parametrize("how", ["owner", "world_writable", "group_writable"])
def test_a_pool_directory_that_is_not_the_daemons_own_is_not_used(
    tmp_path: Path, how: str
) -> None:
    """Whoever else can write the ciphertext root could make kmsfs.newdirs/ first and fill it
    with entries of their choosing: the daemon runs without a pool rather than use it."""
    pool_dir = tmp_path / POOL_DIR
    pool_dir.mkdir(mode=0o700)
    (pool_dir / "00112233445566ff").mkdir(mode=0o700)
    names.write_dir_iv(os.fsencode(pool_dir / "00112233445566ff"), 1)
    (pool_dir / (names.TEMP_PREFIX + "0011223344556677")).mkdir()
    if how == "owner":
        os.chown(pool_dir, 1000, 1000)
    else:
        os.chmod(pool_dir, 0o777 if how == "world_writable" else 0o770)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    pool = DirPool(os.fsencode(tmp_path), lambda: 1)
    with pytest.raises(PermissionError):
        pool.open()
    assert not pool._ready
    pool.close()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_moving_the_pool_away_and_planting_a_symlink_in_its_place_steers_nothing(
    tmp_path: Path,
) -> None:
    """The daemon holds the pool's directory open and reaches its entries through it: a
    kmsfs.newdirs/ put in its place while mounted, with a ready-looking name leading to a
    file of root's, never gets that file chmodded, and mkdir still gets a whole directory."""
    pool = _pool(tmp_path)
    (name,) = _fill(pool, 1)
    victim = tmp_path / "shadow"
    victim.write_bytes(b"root's secret")
    victim.chmod(0o600)
    os.rename(tmp_path / POOL_DIR, tmp_path / "moved")
    (tmp_path / POOL_DIR).mkdir()
    (tmp_path / POOL_DIR / name.decode()).symlink_to(victim)
    dirs.make_dir(os.fsencode(tmp_path / "d"), 0o777, 1, pool=pool)
    pool.close()
    assert os.stat(victim).st_mode & 0o7777 == 0o600
    assert (tmp_path / "d").is_dir() and not (tmp_path / "d").is_symlink()
    assert os.stat(tmp_path / "d").st_mode & 0o7777 == 0o777
    assert os.listdir(tmp_path / "d") == [DIRIV_NAME]
    assert os.listdir(tmp_path / "moved") == []  # the one taken was the pool's own


def test_ready_directories_removed_by_hand_are_skipped(tmp_path: Path) -> None:
    """An operator who empties kmsfs.newdirs/ while mounted costs mkdir its head start only."""
    pool = _pool(tmp_path)
    _fill(pool, 2)
    for entry in (tmp_path / POOL_DIR).iterdir():
        (entry / DIRIV_NAME).unlink()
        entry.rmdir()
    dirs.make_dir(os.fsencode(tmp_path / "d"), 0o755, 1, pool=pool)
    pool.close()
    assert os.listdir(tmp_path / "d") == [DIRIV_NAME]
    assert pool.take(1) is None


def test_a_half_made_directory_swapped_for_a_symlink_during_clean_up_removes_no_other_iv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean-up removes the IV through the descriptor it checked, not by the name, which
    could lead elsewhere by then: another directory's IV is every name in it."""
    pool_dir = tmp_path / POOL_DIR
    pool_dir.mkdir(mode=0o700)
    half = pool_dir / (names.TEMP_PREFIX + "0011223344556677")
    half.mkdir()
    names.write_dir_iv(os.fsencode(half), 1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    names.write_dir_iv(os.fsencode(elsewhere), 1)
    real_listdir = os.listdir

    def listdir_then_swap(target: int | str) -> list[str]:
        out = real_listdir(target)
        if isinstance(target, int) and not half.is_symlink():
            os.rename(half, tmp_path / "moved")
            half.symlink_to(elsewhere)
        return out

    monkeypatch.setattr(os, "listdir", listdir_then_swap)
    pool = _pool(tmp_path)
    pool.close()
    assert (elsewhere / DIRIV_NAME).exists()
    assert half.is_symlink()


def test_a_hidden_new_directory_swapped_for_a_symlink_steers_no_chmod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a pool, mkdir makes the directory under a hidden name in the parent, which
    whoever can write the parent could swap for a symlink: mode, owner and times still go to
    the directory made, through its descriptor, never to what the name leads to."""
    victim = tmp_path / "shadow"
    victim.write_bytes(b"root's secret")
    victim.chmod(0o600)
    real_write = names.write_dir_iv_at

    def write_then_swap(fd: int, epoch: int) -> bytes:
        iv = real_write(fd, epoch)
        temp = os.readlink(f"/proc/self/fd/{fd}")
        os.rename(temp, tmp_path / "moved")
        os.symlink(victim, temp)
        return iv

    monkeypatch.setattr(names, "write_dir_iv_at", write_then_swap)
    owned = []
    dirs.make_dir(os.fsencode(tmp_path / "d"), 0o777, 1, prepare=owned.append)
    assert os.stat(victim).st_mode & 0o7777 == 0o600
    assert os.stat(tmp_path / "moved").st_mode & 0o7777 == 0o777
    assert len(owned) == 1 and isinstance(owned[0], int)


@pytest.mark.parametrize("with_pool", [True, False])
def test_mkdir_on_a_file_system_without_renameat2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_pool: bool
) -> None:
    """Where RENAME_NOREPLACE is missing, a check then a plain rename, from the pool's
    descriptor too; an existing name is still never replaced."""
    monkeypatch.setattr(posix, "_renameat2", None)
    pool = _pool(tmp_path) if with_pool else None
    if pool is not None:
        _fill(pool, 2)
    dirs.make_dir(os.fsencode(tmp_path / "d"), 0o751, 1, pool=pool)
    (tmp_path / "taken").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        dirs.make_dir(os.fsencode(tmp_path / "taken"), 0o755, 1, pool=pool)
    if pool is not None:
        assert len(os.listdir(tmp_path / POOL_DIR)) == 1  # one placed, one untouched
        pool.close()
    assert os.stat(tmp_path / "d").st_mode & 0o7777 == 0o751
    assert os.listdir(tmp_path / "d") == [DIRIV_NAME]
    assert (tmp_path / "taken").read_bytes() == b"keep"


def test_directories_made_ahead_before_a_rotation_are_never_handed_out(tmp_path: Path) -> None:
    """A directory gets the epoch its names will be keyed with when it is made ahead; one made
    before a rotation would key names of the new directory with the old epoch (which an HSM
    removed before the rotation computes). mkdir after the rotation removes those, and makes
    its own at the new epoch; a pool opened later knows each ready one's epoch."""
    epoch = [1]
    pool = DirPool(os.fsencode(tmp_path), lambda: epoch[0])
    pool.open()
    try:
        for _ in range(3):
            pool._ready.append((pool._make_one(epoch[0]), epoch[0]))
        epoch[0] = 2
        dirs.make_dir(os.fsencode(tmp_path / "after"), 0o755, epoch[0], pool=pool)
        assert (tmp_path / "after" / DIRIV_NAME).read_bytes()[:2] == b"\x00\x02"
        assert not pool._ready and len(pool._stale) == 3  # set aside, for the thread
        pool.start()
        deadline = time.monotonic() + 30
        while pool._stale and time.monotonic() < deadline:
            time.sleep(0.01)
        pool.close()  # what it made meanwhile (at epoch 2) stays, and is removed here
        assert not pool._stale
        for ready in (tmp_path / POOL_DIR).iterdir():
            assert (ready / DIRIV_NAME).read_bytes()[:2] == b"\x00\x02"  # no epoch-1 one left
            (ready / DIRIV_NAME).unlink()
            ready.rmdir()
        pool = DirPool(os.fsencode(tmp_path), lambda: 2)
        pool.open()
        made = pool._make_one(2)
    finally:
        pool.close()
    reopened = DirPool(os.fsencode(tmp_path), lambda: 2)
    reopened.open()
    try:
        assert list(reopened._ready) == [(made, 2)]
        ready = reopened.take(2)
        assert ready is not None and ready.name == made
    finally:
        reopened.close()
