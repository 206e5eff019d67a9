"""Deep trees: a plaintext path inside PATH_MAX whose ciphertext path is beyond it.

A ciphertext name is longer than its plaintext (AES-SIV's 16 bytes, then base64), so with
8-byte names a ciphertext path passes PATH_MAX (4096) at about 1,100 plaintext bytes. Without
kmsfs.fs.longpath every operation there failed with ENAMETOOLONG, where ext4 serves the path.
Here the ciphertext paths reach about 12,000 bytes, so paths are reached through chains of
anchors, and each operation is checked against the same one on a plain directory.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kmsfs.fs.fsck import check_tree
from kmsfs.fs.longpath import PATH_MAX, reach
from kmsfs.fs.reencrypt import reencrypt_tree
from tests.integration.fs_helpers import SoftDeriver, renameat2

NAME = "d" * 7  # 8 bytes with the level digit: 33 bytes of ciphertext path per level
LEVELS = 1000
PLAIN_DEPTH_BYTES = 3300  # of the path below the mount point (which itself takes ~100)


def chain(top: Path, budget: int = PLAIN_DEPTH_BYTES) -> Path:
    """Make nested directories under *top* until the path below it is about *budget* bytes."""
    path, level = top, 0
    while len(str(path)) - len(str(top)) < budget:
        path = path / f"{NAME}{level % 10}"
        path.mkdir()
        level += 1
    return path


def deepest_cipher_path(cipherdir: Path) -> int:
    """Length of the longest ciphertext path, found through dir fds (paths do not fit)."""
    longest = 0
    for root, _dirs, files, _fd in os.fwalk(cipherdir):
        for name in files:
            longest = max(longest, len(root) + 1 + len(name))
    return longest


def operations(d: Path) -> list[tuple[str, Callable[[], object]]]:
    """The POSIX calls a user makes in a directory, in an order that builds on itself."""
    f, g, sub = d / "file", d / "other", d / "sub"
    long_name = d / ("L" * 255)
    long_target = "t" * 3000

    def listing() -> list[str]:
        return sorted(os.listdir(d))

    def kind(p: Path) -> tuple[int, int, int]:
        st = os.lstat(p)
        return stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_size

    return [
        ("create", lambda: f.write_bytes(b"first " * 2000)),
        ("append", lambda: append(f, b"appended")),
        ("read", lambda: f.read_bytes()),
        ("overwrite", lambda: overwrite(f, b"XY", 5000)),
        ("read again", lambda: f.read_bytes()),
        ("truncate down", lambda: os.truncate(f, 5003)),
        ("truncate up", lambda: os.truncate(f, 9000)),
        ("read holes", lambda: f.read_bytes()[4990:]),
        ("chmod", lambda: os.chmod(f, 0o640)),
        ("chown", lambda: os.chown(f, 1000, 1000)),
        ("utime", lambda: os.utime(f, ns=(1_000_000_000, 2_000_000_000))),
        ("times", lambda: (os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns)),
        ("stat", lambda: kind(f)),
        ("setxattr", lambda: os.setxattr(f, "user.colour", b"blue")),
        ("getxattr", lambda: os.getxattr(f, "user.colour")),
        ("listxattr", lambda: os.listxattr(f)),
        ("removexattr", lambda: os.removexattr(f, "user.colour")),
        ("getxattr gone", lambda: os.getxattr(f, "user.colour")),
        ("link", lambda: os.link(f, g)),
        ("nlink", lambda: os.stat(f).st_nlink),
        ("rename over link", lambda: os.rename(g, f)),
        ("symlink", lambda: os.symlink("file", d / "short-link")),
        ("readlink", lambda: os.readlink(d / "short-link")),
        ("follow", lambda: (d / "short-link").read_bytes()[:10]),
        ("long symlink", lambda: os.symlink(long_target, d / "long-link")),
        ("readlink long", lambda: os.readlink(d / "long-link")),
        ("mkfifo", lambda: os.mkfifo(d / "fifo", 0o600)),
        ("fifo kind", lambda: kind(d / "fifo")),
        ("mkdir", lambda: sub.mkdir(0o750)),
        ("mkdir again", lambda: sub.mkdir()),
        ("rename into sub", lambda: os.rename(f, sub / "file")),
        ("read moved", lambda: (sub / "file").read_bytes()[:20]),
        ("rmdir not empty", lambda: sub.rmdir()),
        ("long name", lambda: long_name.write_bytes(b"long")),
        ("rename long name", lambda: os.rename(long_name, d / ("M" * 255))),
        ("read long name", lambda: (d / ("M" * 255)).read_bytes()),
        ("listing", listing),
        ("unlink long name", lambda: os.unlink(d / ("M" * 255))),
        ("rename sub away", lambda: os.rename(sub, d / "moved-sub")),
        ("read under moved dir", lambda: (d / "moved-sub" / "file").read_bytes()[:20]),
        ("statvfs", lambda: os.statvfs(d).f_namemax),
        ("unlink", lambda: os.unlink(d / "moved-sub" / "file")),
        ("rmdir", lambda: (d / "moved-sub").rmdir()),
        ("rename over a file", lambda: os.rename(d / "fifo", d / "long-link")),
        ("what took its name", lambda: kind(d / "long-link")),
        ("exchange", lambda: renameat2(d / "long-link", d / "short-link", 2)),
        ("exchanged", lambda: (kind(d / "long-link"), kind(d / "short-link"))),
        ("no replace", lambda: renameat2(d / "short-link", d / "long-link", 1)),
        ("unlink a symlink", lambda: os.unlink(d / "long-link")),
        ("dirs", lambda: (os.mkdir(d / "e1"), os.mkdir(d / "e2"), os.mkdir(d / "e1" / "in"))),
        ("look inside e2", lambda: (d / "e2" / "probe").exists()),  # a way into e2 is known
        ("rename a dir over an empty one", lambda: os.rename(d / "e1", d / "e2")),
        ("write into it", lambda: (d / "e2" / "new").write_bytes(b"new")),
        ("under the new name", lambda: sorted(os.listdir(d / "e2"))),
        ("two dirs", lambda: [(d / x).mkdir() or (d / x / x).write_bytes(b"") for x in "xy"]),
        ("exchange dirs", lambda: renameat2(d / "x", d / "y", 2)),
        ("write into both", lambda: [(d / x / "after").write_bytes(x.encode()) for x in "xy"]),
        ("exchanged dirs", lambda: [sorted(os.listdir(d / x)) for x in "xy"]),
        ("their files", lambda: [(d / x / "after").read_bytes() for x in "xy"]),
        ("chown -1 -1", lambda: os.chown(d / "e2", -1, -1)),
        ("fsync the dir", lambda: fsync_dir(d)),
        ("many files", lambda: [(d / "e2" / f"n{i:04}").write_bytes(b"") for i in range(1200)]),
        ("list many", lambda: sorted(os.listdir(d / "e2"))),
        ("unlink missing", lambda: os.unlink(d / "missing")),
        ("name too long", lambda: (d / ("n" * 256)).write_bytes(b"")),
        ("listing at the end", listing),
    ]


def append(path: Path, data: bytes) -> int:
    with open(path, "ab") as f:
        return f.write(data)


def overwrite(path: Path, data: bytes, offset: int) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Every entry under *top*: kind, mode, and its bytes or link target."""
    out: dict[str, tuple[object, ...]] = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            p = Path(root, name)
            st = os.lstat(p)
            body = (os.readlink(p) if stat.S_ISLNK(st.st_mode)
                    else p.read_bytes() if stat.S_ISREG(st.st_mode) else None)
            out[str(p.relative_to(top))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), body)
    return out


def outcome(fn: Callable[[], object]) -> object:
    """What a call gave: its result, or the name of its errno."""
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("error", errno.errorcode.get(exc.errno or 0, exc.errno))


def test_a_deep_tree_behaves_as_a_plain_directory(tmp_path: Path, volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    deep = chain(mount.mountpoint)
    (tmp_path / "plain").mkdir()
    plain = chain(tmp_path / "plain")
    assert deepest_cipher_path(volume) > 2 * PATH_MAX  # anchors on anchors, not only one

    for (what, on_kmsfs), (_, on_plain) in zip(operations(deep), operations(plain), strict=True):
        assert outcome(on_kmsfs) == outcome(on_plain), what

    mount.stop()
    mount.start()
    assert snapshot(deep) == snapshot(plain)
    report = check_tree(volume, SoftDeriver())  # the long symlink's blob went with it, too
    assert report.clean, report.problems


def test_a_renamed_deep_directory_leaves_no_stale_way_in(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """Use a deep directory, rename it away, make one of the same name: the name must lead to
    the new directory, not to the moved one (which a stale anchor of the old path would)."""
    mount = mounter(volume)
    deep = chain(mount.mountpoint)
    (deep / "f").write_bytes(b"old")
    assert (deep / "f").read_bytes() == b"old"  # deep's own way in is known now

    moved = deep.with_name("moved")
    os.rename(deep, moved)
    deep.mkdir()
    (deep / "f").write_bytes(b"new")
    assert (moved / "f").read_bytes() == b"old"
    assert (deep / "f").read_bytes() == b"new"
    assert os.listdir(deep) == ["f"] and os.listdir(moved) == ["f"]


def test_a_removed_deep_directory_leaves_no_stale_way_in(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """rmdir a deep directory and make it again: its name must work (a stale anchor would
    lead to the removed one: ENOENT)."""
    mount = mounter(volume)
    deep = chain(mount.mountpoint)
    (deep / "f").write_bytes(b"f")
    (deep / "f").unlink()
    deep.rmdir()
    deep.mkdir()
    (deep / "g").write_bytes(b"g")
    assert os.listdir(deep) == ["g"]
    assert (deep / "g").read_bytes() == b"g"


def test_deep_files_survive_a_remount_fsck_and_reencrypt(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    deep = chain(mount.mountpoint)
    data = os.urandom(3 * 4096 + 17)
    (deep / "blob").write_bytes(data)
    os.setxattr(deep / "blob", "user.k", b"v")
    os.link(deep / "blob", deep.parent / "link")
    mount.stop()

    report = check_tree(volume, SoftDeriver())
    assert report.clean, report.problems
    assert (report.checked["files"], report.checked["hard_links"]) == (1, 1)
    assert report.checked["xattrs"] == 2  # read through each of its two names

    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert (summary.failed, summary.rewritten, summary.extra_links) == ([], 1, 1)
    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean and report.epochs == {2: 1}, report.problems

    mount.epoch = 2  # the stub deriver of a Domain rotated once
    mount.start()
    assert (deep / "blob").read_bytes() == data
    assert (deep.parent / "link").read_bytes() == data
    assert os.getxattr(deep / "blob", "user.k") == b"v"


def remove_tree(top: Path) -> None:
    """shutil.rmtree without recursion, which a tree of 1,650 levels is too deep for."""
    stack = [os.fsencode(top)]
    while stack:
        below = []
        with os.scandir(reach(stack[-1])) as it:
            for entry in it:
                path = stack[-1] + b"/" + entry.name
                if entry.is_dir(follow_symlinks=False):
                    below.append(path)
                else:
                    os.unlink(reach(path))
        if below:
            stack += below
        else:
            os.rmdir(reach(stack.pop()))


@pytest.fixture
def deep_volume(volume: Path) -> Iterator[Path]:
    """The volume, removed at teardown (after the mounts stop) without recursion."""
    yield volume
    remove_tree(volume)


def test_fsck_checks_a_tree_deeper_than_pythons_recursion_limit(deep_volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """1,000 levels of one-letter names (PATH_MAX allows about 2,000): a recursive walk, even
    with one call a level, passes Python's limit of 1,000 frames."""
    volume = deep_volume
    mount = mounter(volume)
    # Level by level through a directory fd: a walk from the mount point would look up every
    # level again once the kernel's entries expire (1 s), which makes the loop quadratic.
    at = os.open(mount.mountpoint, os.O_RDONLY)
    for _ in range(LEVELS):
        os.mkdir("x", dir_fd=at)
        deeper = os.open("x", os.O_RDONLY | os.O_DIRECTORY, dir_fd=at)
        os.close(at)
        at = deeper
    fd = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=at)
    os.write(fd, b"bottom")
    os.close(fd)
    os.close(at)
    mount.stop()
    assert sys.getrecursionlimit() <= LEVELS  # even one frame a level is too many
    report = check_tree(volume, SoftDeriver())
    assert report.clean, report.problems
    assert (report.checked["directories"], report.checked["files"]) == (LEVELS + 1, 1)


def test_fsck_and_reencrypt_in_one_process_see_directories_a_mount_moved(  # type: ignore[no-untyped-def]
    volume: Path, mounter
) -> None:
    """A process that checks a volume, lets a mount exchange two deep directories, then checks
    or re-keys it again must not reach them through what it cached the first time."""
    mount = mounter(volume)
    # Just past PATH_MAX: few enough anchors that none is dropped only because the cache filled.
    deep = chain(mount.mountpoint, 1300)
    for x in "xy":
        (deep / x).mkdir()
        (deep / x / x).write_bytes(x.encode() * 5000)
    mount.stop()
    assert PATH_MAX < deepest_cipher_path(volume) < 2 * PATH_MAX
    assert check_tree(volume, SoftDeriver()).clean  # caches a way into x and y

    def exchange(epoch: int) -> None:
        mount.epoch = epoch
        mount.start()
        renameat2(deep / "x", deep / "y", 2)
        mount.stop()

    exchange(1)
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert (summary.failed, summary.rewritten) == ([], 2)
    exchange(2)
    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean and report.checked["files"] == 2, report.problems
    mount.start()
    assert [(deep / x / x).read_bytes() for x in "xy"] == [b"x" * 5000, b"y" * 5000]
