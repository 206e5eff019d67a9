"""mkdir through a real mount takes directories made ahead (kmsfs.fs.dirpool) and nobody can tell.

A directory from the pool was made earlier, by the daemon, in another directory. Through the
mount it must look exactly like one mkdir(2) just made: the caller's ids (and a set-group-ID
parent's group), the mode asked for, the current times, the root's link count untouched, and
nothing of the pool visible. What a killed daemon leaves in the pool is cleaned by the next
mount; fsck accepts the pool and reports what does not belong there.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.crypto.names import DIRIV_NAME
from kmsfs.fs.dirpool import POOL_DIR, POOL_SIZE
from kmsfs.fs.fsck import check_tree
from kmsfs.fs.names import TEMP_PREFIX
from tests.integration.fs_helpers import (
    SoftDeriver,
    ciphertext_paths,
    make_volume,
    pool_ready,
    wait_pool_full,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the pool is for a daemon run as root")


def _as_user(uid: int, gid: int, groups: list[int], fn) -> None:  # type: ignore[no-untyped-def]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os.umask(0)
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.fixture
def public_mount(volume: Path, mounter) -> Iterator[Path]:  # type: ignore[no-untyped-def]
    """An allow_other mount other users can reach (its parents are 0755, not pytest's 0700)."""
    with tempfile.TemporaryDirectory(prefix="kmsfs-pool-") as public:
        os.chmod(public, 0o755)
        mount = mounter(volume, options=("allow_other",), mountpoint=Path(public) / "m")
        os.chmod(mount.mountpoint, 0o777)
        yield mount.mountpoint
        mount.stop()  # before the directory goes


def test_a_directory_from_the_pool_looks_just_made(volume: Path, public_mount: Path) -> None:
    m = public_mount
    os.mkdir(m / "sgid", 0o777)
    os.chown(m / "sgid", 0, 1003)
    os.chmod(m / "sgid", 0o2777)
    ready = wait_pool_full(volume)
    old = time.time() - 3600
    for name in ready:  # as if made by an earlier mount, an hour ago
        os.utime(volume / POOL_DIR / name, (old, old))
    before = time.time()

    _as_user(1000, 1001, [1001], lambda: os.mkdir(m / "plain", 0o751))
    _as_user(1000, 1001, [1001], lambda: os.mkdir(m / "sgid" / "inherits", 0o705))

    used = set(ready) - set(pool_ready(volume))
    assert len(used) == 2  # both came from the pool, with the IVs made ahead
    made = [Path(p) for p in ciphertext_paths(volume)
            if os.path.isdir(p) and os.stat(p).st_uid == 1000]
    assert {(p / DIRIV_NAME).read_bytes() for p in made} == {ready[n] for n in used}
    st = os.stat(m / "plain")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o751, 1000, 1001)
    sub = os.stat(m / "sgid" / "inherits")  # ext4: the parent's group, and set-group-ID too
    assert (stat.S_IMODE(sub.st_mode), sub.st_uid, sub.st_gid) == (0o2705, 1000, 1003)
    for s in (st, sub):
        assert min(s.st_atime, s.st_mtime, s.st_ctime) >= before - 1
        assert s.st_nlink == 2
    assert sorted(os.listdir(m)) == ["plain", "sgid"]


def test_the_root_link_count_does_not_count_the_pool(volume: Path, mounter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    m = mounter(volume).mountpoint
    wait_pool_full(volume)
    for name in ("a", "b", "c"):
        os.mkdir(m / name)
    assert os.stat(m).st_nlink == 2 + 3
    os.symlink("x" * 4000, m / "long")  # kmsfs.longlinks/ as well
    assert os.stat(m).st_nlink == 2 + 3
    assert os.stat(volume).st_nlink == 2 + 3 + 2  # both are there on disk


def test_a_burst_longer_than_the_pool_and_a_remount(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    m = mount.mountpoint
    wait_pool_full(volume)
    for i in range(3 * POOL_SIZE):  # the pool runs dry: mkdir makes its own meanwhile
        os.makedirs(m / f"d{i % 7}" / f"e{i}")
        (m / f"d{i % 7}" / f"e{i}" / "f").write_bytes(b"%d" % i)
    mount.stop()
    report = check_tree(volume, SoftDeriver())
    assert report.clean and not report.warnings, report.to_json()
    assert report.checked["directories"] == 1 + 7 + 3 * POOL_SIZE
    m = mounter(volume, name="again").mountpoint
    assert sorted(os.listdir(m)) == [f"d{i}" for i in range(7)]
    for i in range(3 * POOL_SIZE):
        assert (m / f"d{i % 7}" / f"e{i}" / "f").read_bytes() == b"%d" % i


def test_a_read_only_mount_makes_no_pool(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    m = mounter(volume, options=("ro",)).mountpoint
    time.sleep(0.2)
    assert os.listdir(m) == []
    assert not (volume / POOL_DIR).exists()


def test_what_a_killed_daemon_left_in_the_pool_is_cleaned_by_the_next_mount(  # type: ignore[no-untyped-def]
    volume: Path, mounter
) -> None:
    mount = mounter(volume)
    wait_pool_full(volume)
    mount.kill9()
    half = volume / POOL_DIR / (TEMP_PREFIX + "0123456789abcdef")  # killed before its rename
    half.mkdir()
    (half / DIRIV_NAME).write_bytes(os.urandom(16))
    report = check_tree(volume, SoftDeriver())
    assert report.clean
    assert [(w.kind, w.cipher_path) for w in report.warnings] == [
        ("leftover", f"{POOL_DIR}/{half.name}")
    ]
    mount = mounter(volume, name="again")
    os.mkdir(mount.mountpoint / "d")
    mount.stop()
    assert not half.exists()
    report = check_tree(volume, SoftDeriver())
    assert report.clean and not report.warnings, report.to_json()


def test_fsck_reports_what_does_not_belong_in_the_pool(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    wait_pool_full(volume)
    mount.stop()
    pool = volume / POOL_DIR
    (pool / "0123456789abcdef").write_bytes(b"a file")
    full = sorted(n for n in os.listdir(pool) if (pool / n).is_dir())[0]
    (pool / full / "extra").write_bytes(b"x")
    report = check_tree(volume, SoftDeriver())
    assert report.clean
    assert sorted((w.kind, w.cipher_path) for w in report.warnings) == sorted([
        ("leftover", f"{POOL_DIR}/0123456789abcdef"),
        ("leftover", f"{POOL_DIR}/{full}"),
    ])
    # A mount uses neither, and removes neither: more mkdirs than the pool holds take every
    # ready directory, and none of the new directories is the one holding "extra".
    again = mounter(volume, name="again")
    made = [again.mountpoint / f"d{i}" for i in range(2 * POOL_SIZE)]
    for path in made:
        path.mkdir()
    assert all(os.listdir(path) == [] for path in made)
    again.stop()
    assert (pool / "0123456789abcdef").read_bytes() == b"a file"
    assert (pool / full / "extra").read_bytes() == b"x"


@pytest.fixture
def users_volume(mounter) -> Iterator[tuple[Path, Path]]:  # type: ignore[no-untyped-def]
    """A volume whose ciphertext root belongs to uid 1000 (who ran ``kmsfs init``), in a
    directory that user can reach, and a file of root's beside it: (volume, victim)."""
    with tempfile.TemporaryDirectory(prefix="kmsfs-pool-") as base:
        os.chmod(base, 0o755)
        victim = Path(base) / "shadow"
        victim.write_bytes(b"root's secret")
        victim.chmod(0o600)
        volume = make_volume(Path(base) / "cipher")
        for path in (volume, *volume.rglob("*")):
            os.chown(path, 1000, 1000)
        yield volume, victim


def test_a_root_mount_of_a_volume_another_user_owns_is_refused(users_volume, mounter) -> None:  # type: ignore[no-untyped-def]
    """The user who owns the ciphertext root plants a kmsfs.newdirs/ of their own, ready to
    swap an entry for a symlink to a file of root's once a root mount has looked at it. Such a
    volume is not mounted by root at all (kmsfs.fs.volume.check_root_only), so nothing in it is
    used or changed; the pool's own checks (tests/unit/test_fs_dirpool.py) stand behind that."""
    volume, victim = users_volume
    planted = volume / POOL_DIR / "00112233445566ff"

    def plant() -> None:
        (volume / POOL_DIR).mkdir(mode=0o755)
        planted.mkdir(mode=0o700)
        (planted / DIRIV_NAME).write_bytes(os.urandom(16))

    _as_user(1000, 1000, [], plant)
    before = sorted((str(p), p.lstat().st_mtime_ns) for p in volume.rglob("*"))
    with pytest.raises(RuntimeError, match="other users can reach the ciphertext"):
        mounter(volume, options=("allow_other",), mountpoint=volume.parent / "m")
    assert sorted((str(p), p.lstat().st_mtime_ns) for p in volume.rglob("*")) == before
    assert os.stat(victim).st_mode & 0o7777 == 0o600


def test_fsck_by_another_user_reports_the_pool_it_cannot_read(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """kmsfs.newdirs/ is root's and 0700: fsck run by the volume's owner says so and goes on."""
    mount = mounter(volume)
    os.mkdir(mount.mountpoint / "d")
    (mount.mountpoint / "d" / "f").write_bytes(b"data")
    wait_pool_full(volume)
    mount.stop()
    with tempfile.TemporaryDirectory(prefix="kmsfs-pool-") as base:
        os.chmod(base, 0o755)
        copy = Path(base) / "cipher"
        shutil.copytree(volume, copy, symlinks=True)
        for path in (copy, *copy.rglob("*")):
            if POOL_DIR not in path.relative_to(copy).parts:
                os.chown(path, 1000, 1000, follow_symlinks=False)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(rfd)
                os.setgroups([])
                os.setgid(1000)
                os.setuid(1000)
                report = check_tree(copy, SoftDeriver())
                os.write(wfd, json.dumps(report.to_json()).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            result = json.loads(f.read() or b"null")
        os.waitpid(pid, 0)
    assert result is not None, "fsck crashed"
    assert result["clean"] and result["checked"]["files"] == 1
    assert [(w["kind"], w["cipher_path"]) for w in result["warnings"]] == [
        ("made-ahead", POOL_DIR)
    ]
