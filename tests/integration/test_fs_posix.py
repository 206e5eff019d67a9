"""POSIX behaviour through a real kmsfs mount, with the errno values ext4 gives."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import random
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.integration.fs_helpers import ciphertext_paths, renameat2

BS = 4096


def _errno(exc_info: pytest.ExceptionInfo[OSError]) -> int:
    return exc_info.value.errno  # type: ignore[return-value]


@pytest.fixture
def m(mnt) -> Path:  # type: ignore[no-untyped-def]
    return mnt.mountpoint


# --- content -------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, 300_000])
def test_write_read_sizes(m: Path, size: int) -> None:
    data = os.urandom(size)
    (m / "f").write_bytes(data)
    assert os.stat(m / "f").st_size == size
    assert (m / "f").read_bytes() == data


def test_random_offset_writes_match_model(m: Path) -> None:
    rng = random.Random(7)
    model = bytearray()
    fd = os.open(m / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(200):
            off = rng.randrange(0, 40_000)
            buf = rng.randbytes(rng.randrange(1, 9000))
            os.pwrite(fd, buf, off)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + len(buf)] = buf
            if rng.random() < 0.2:
                roff, rlen = rng.randrange(0, 50_000), rng.randrange(0, 10_000)
                assert os.pread(fd, rlen, roff) == bytes(model[roff:roff + rlen])
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert (m / "f").read_bytes() == bytes(model)


def test_o_append(m: Path) -> None:
    (m / "f").write_bytes(b"abc")
    fd = os.open(m / "f", os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"def")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"ghi")
    os.close(fd)
    assert (m / "f").read_bytes() == b"abcdefghi"


def test_o_trunc(m: Path) -> None:
    (m / "f").write_bytes(b"x" * 10_000)
    fd = os.open(m / "f", os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"new")
    os.close(fd)
    assert (m / "f").read_bytes() == b"new"


def test_truncate_up_and_down_with_holes(m: Path) -> None:
    p = m / "f"
    p.write_bytes(b"a" * 5000)
    os.truncate(p, 20_000)
    assert p.read_bytes() == b"a" * 5000 + bytes(15_000)
    os.truncate(p, 4100)
    assert p.read_bytes() == b"a" * 4100
    os.truncate(p, 3)
    assert p.read_bytes() == b"aaa"
    with open(p, "r+b") as f:
        f.seek(10_000)
        f.write(b"z")
    assert p.read_bytes() == b"aaa" + bytes(9997) + b"z"
    os.truncate(p, 0)
    assert p.read_bytes() == b""
    os.truncate(p, 8192)
    assert p.read_bytes() == bytes(8192)


def test_ftruncate_on_open_file(m: Path) -> None:
    fd = os.open(m / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"b" * 9000)
    os.ftruncate(fd, 5000)
    assert os.fstat(fd).st_size == 5000
    assert os.pread(fd, 10_000, 0) == b"b" * 5000
    os.close(fd)


def test_large_file_roundtrip(m: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    (m / "big").write_bytes(data)
    assert (m / "big").read_bytes() == data


def test_mmap_read_write(m: Path) -> None:
    p = m / "f"
    p.write_bytes(b"0" * 3 * BS)
    with open(p, "r+b") as f:
        mm = mmap.mmap(f.fileno(), 0)
        assert mm[:4] == b"0000"
        mm[BS - 2:BS + 2] = b"WXYZ"
        mm.flush()
        mm.close()
    subprocess.run(["sync"], check=True)
    data = p.read_bytes()
    assert data[BS - 2:BS + 2] == b"WXYZ" and len(data) == 3 * BS


def test_fsync_file_and_dir(m: Path) -> None:
    fd = os.open(m / "f", os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"data")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    dfd = os.open(m, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)


def test_unlink_while_open(m: Path) -> None:
    p = m / "f"
    p.write_bytes(b"keep me")
    fd = os.open(p, os.O_RDWR)
    os.unlink(p)
    assert not p.exists()
    assert os.pread(fd, 100, 0) == b"keep me"
    os.pwrite(fd, b"!" * 5000, 7)
    assert os.fstat(fd).st_size == 5007
    assert os.pread(fd, 10, 0) == b"keep me!!!"
    os.close(fd)
    assert os.listdir(m) == []


def test_fstat_of_an_o_path_fd_after_the_last_link_is_removed(m: Path) -> None:
    """An O_PATH fd reaches the daemon as no OPEN (it holds no fd of its own for it): once
    the last link is gone, fstat still answers, as on ext4 (0 links, ctime of the removal),
    where it gave ENOENT (found by review). Hard links and directories were covered."""
    p = m / "f"
    p.write_bytes(b"hello")
    before = os.lstat(p)
    fd = os.open(p, os.O_PATH)
    try:
        time.sleep(0.01)
        os.unlink(p)
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_size, st.st_mode) == (0, 5, before.st_mode)
        assert st.st_mtime_ns == before.st_mtime_ns and st.st_ctime_ns > before.st_ctime_ns
    finally:
        os.close(fd)
    # A FIFO held open for reading and writing: the same (it answered ENOENT: review).
    os.mkfifo(m / "fifo", 0o640)
    fd = os.open(m / "fifo", os.O_RDWR)
    try:
        os.unlink(m / "fifo")
        st = os.fstat(fd)
        assert (st.st_nlink, stat.S_ISFIFO(st.st_mode), stat.S_IMODE(st.st_mode)) == (
            0, True, 0o640)
        os.write(fd, b"still a pipe")
        assert os.read(fd, 100) == b"still a pipe"
    finally:
        os.close(fd)
    # Not a symlink's: its size would be its ciphertext's (ENOENT, as before, not a wrong size).
    os.symlink("t" * 30, m / "ln")
    fd = os.open(m / "ln", os.O_PATH | os.O_NOFOLLOW)
    try:
        os.unlink(m / "ln")
        with contextlib.suppress(FileNotFoundError):
            assert os.fstat(fd).st_size == 30
    finally:
        os.close(fd)


# --- errno values --------------------------------------------------------------------------
def test_errnos(m: Path) -> None:
    (m / "file").write_bytes(b"x")
    (m / "dir").mkdir()
    (m / "dir" / "child").write_bytes(b"")
    cases = [
        (lambda: os.stat(m / "missing"), errno.ENOENT),
        (lambda: os.open(m / "missing", os.O_RDONLY), errno.ENOENT),
        (lambda: os.unlink(m / "missing"), errno.ENOENT),
        (lambda: os.mkdir(m / "dir"), errno.EEXIST),
        (lambda: os.open(m / "file", os.O_CREAT | os.O_EXCL | os.O_WRONLY), errno.EEXIST),
        (lambda: os.link(m / "file", m / "dir"), errno.EEXIST),
        (lambda: os.symlink("t", m / "file"), errno.EEXIST),
        (lambda: os.rmdir(m / "dir"), errno.ENOTEMPTY),
        (lambda: os.open(m / ("n" * 256), os.O_CREAT | os.O_WRONLY), errno.ENAMETOOLONG),
        (lambda: os.stat(m / ("n" * 256)), errno.ENAMETOOLONG),
        (lambda: os.mkdir(m / ("n" * 256)), errno.ENAMETOOLONG),
        (lambda: os.open(m / "dir", os.O_WRONLY), errno.EISDIR),
        (lambda: os.unlink(m / "dir"), errno.EISDIR),
        (lambda: os.rename(m / "file", m / "dir"), errno.EISDIR),
        (lambda: os.rmdir(m / "file"), errno.ENOTDIR),
        (lambda: os.stat(m / "file" / "x"), errno.ENOTDIR),
        (lambda: os.rename(m / "dir", m / "file"), errno.ENOTDIR),
        (lambda: os.listdir(m / "file"), errno.ENOTDIR),
    ]
    for i, (call, want) in enumerate(cases):
        with pytest.raises(OSError) as info:
            call()
        assert _errno(info) == want, f"case {i}: {info.value}"


def test_long_names(m: Path) -> None:
    names = ["a" * 255, "é" * 127, "b" * 116, "c" * 115]
    for n in names:
        (m / n).write_bytes(n.encode())
    assert sorted(os.listdir(m)) == sorted(names)
    for n in names:
        assert (m / n).read_bytes() == n.encode()
    os.rename(m / names[0], m / "short")
    os.rename(m / "short", m / ("d" * 200))
    (m / "dd").mkdir()
    os.rename(m / ("d" * 200), m / "dd" / ("e" * 250))
    assert (m / "dd" / ("e" * 250)).read_bytes() == names[0].encode()
    for n in names[1:]:
        os.unlink(m / n)
    os.unlink(m / "dd" / ("e" * 250))
    os.rmdir(m / "dd")
    assert os.listdir(m) == []


# --- rename --------------------------------------------------------------------------------
def test_rename_cases(m: Path) -> None:
    (m / "a").write_bytes(b"A")
    (m / "b").write_bytes(b"B")
    os.rename(m / "a", m / "a2")
    assert (m / "a2").read_bytes() == b"A" and not (m / "a").exists()
    os.rename(m / "a2", m / "b")  # over an existing file
    assert (m / "b").read_bytes() == b"A" and os.listdir(m) == ["b"]
    (m / "d1" / "sub").mkdir(parents=True)
    (m / "d1" / "sub" / "deep").write_bytes(b"deep")
    (m / "d2").mkdir()
    os.rename(m / "b", m / "d2" / "b")  # across directories
    assert (m / "d2" / "b").read_bytes() == b"A"
    os.rename(m / "d1", m / "d2" / "moved")  # a directory, with contents
    assert (m / "d2" / "moved" / "sub" / "deep").read_bytes() == b"deep"
    (m / "empty").mkdir()
    os.rename(m / "d2" / "moved", m / "empty")  # directory over an empty directory
    assert (m / "empty" / "sub" / "deep").read_bytes() == b"deep"
    (m / "full").mkdir()
    (m / "full" / "x").write_bytes(b"")
    with pytest.raises(OSError) as info:
        os.rename(m / "empty", m / "full")
    assert _errno(info) in (errno.ENOTEMPTY, errno.EEXIST)
    assert (m / "full" / "x").exists() and (m / "empty" / "sub").is_dir()


def test_rename_noreplace_and_exchange(m: Path) -> None:
    (m / "a").write_bytes(b"A")
    (m / "b").write_bytes(b"B")
    with pytest.raises(OSError) as info:
        renameat2(m / "a", m / "b", 1)  # RENAME_NOREPLACE
    assert _errno(info) == errno.EEXIST
    renameat2(m / "a", m / "c", 1)
    assert (m / "c").read_bytes() == b"A"
    renameat2(m / "c", m / "b", 2)  # RENAME_EXCHANGE
    assert (m / "c").read_bytes() == b"B" and (m / "b").read_bytes() == b"A"
    with pytest.raises(OSError) as info:
        renameat2(m / "c", m / "b", 4)  # RENAME_WHITEOUT: unsupported
    assert _errno(info) == errno.EINVAL


def test_rename_hardlink_onto_itself_keeps_both(m: Path) -> None:
    (m / "a").write_bytes(b"A")
    os.link(m / "a", m / "b")
    os.rename(m / "a", m / "b")
    assert sorted(os.listdir(m)) == ["a", "b"]


# --- links ---------------------------------------------------------------------------------
def test_hard_links(m: Path) -> None:
    (m / "a").write_bytes(b"one")
    (m / "d").mkdir()
    os.link(m / "a", m / "d" / "b")
    assert os.stat(m / "a").st_nlink == 2
    assert os.stat(m / "a").st_ino == os.stat(m / "d" / "b").st_ino
    with open(m / "d" / "b", "ab") as f:
        f.write(b" two")
    assert (m / "a").read_bytes() == b"one two"
    os.unlink(m / "a")
    assert os.stat(m / "d" / "b").st_nlink == 1
    assert (m / "d" / "b").read_bytes() == b"one two"


def test_symlinks(m: Path) -> None:
    (m / "target").write_bytes(b"T")
    os.symlink("target", m / "rel")
    assert os.readlink(m / "rel") == "target"
    assert (m / "rel").read_bytes() == b"T"
    assert os.lstat(m / "rel").st_size == len("target")
    os.symlink("/nonexistent/dangling", m / "dangling")
    assert os.readlink(m / "dangling") == "/nonexistent/dangling"
    for n in (700, 1000, 4095):
        target = ("x/" * n)[:n]
        os.symlink(target, m / f"long{n}")
        assert os.readlink(m / f"long{n}") == target
        assert os.lstat(m / f"long{n}").st_size == n
    with pytest.raises(OSError) as info:
        os.symlink("y" * 4096, m / "toolong")
    assert _errno(info) == errno.ENAMETOOLONG
    os.link(m / "long4095", m / "hl", follow_symlinks=False)
    os.unlink(m / "long4095")
    assert os.readlink(m / "hl") == ("x/" * 4095)[:4095]
    os.rename(m / "hl", m / "hl2")
    assert os.readlink(m / "hl2") == ("x/" * 4095)[:4095]
    os.unlink(m / "hl2")
    os.unlink(m / "long1000")


def test_the_root_counts_only_the_subdirectories_users_see(m: Path) -> None:
    """A directory's link count is 2 plus its subdirectories, the root's too: the hidden
    kmsfs.longlinks/ that a long symlink creates in the ciphertext root does not count."""
    assert os.stat(m).st_nlink == 2
    os.symlink("t/" * 1000, m / "long")  # its target goes to a blob in kmsfs.longlinks/
    assert os.stat(m).st_nlink == 2
    os.mkdir(m / "d")
    assert os.stat(m).st_nlink == 3
    os.rmdir(m / "d")
    assert os.stat(m).st_nlink == 2
    assert os.listdir(m) == ["long"]


def test_a_long_symlink_in_a_subdirectory_leaves_the_root_s_times(mnt) -> None:  # type: ignore[no-untyped-def]
    """kmsfs.longlinks/ was made in the ciphertext root at the volume's first long symlink,
    wherever it was made: the mount root's mtime and ctime moved, as ext4's never do for an
    entry made elsewhere (a running `tar -c` of the mount said "file changed as we read it").
    The mount root's times are the ciphertext root's, read there (the kernel caches them)."""
    m = mnt.mountpoint
    os.mkdir(m / "sub")
    before = os.stat(mnt.cipherdir)
    os.symlink("t/" * 1000, m / "sub" / "long")  # its target goes to a blob
    after = os.stat(mnt.cipherdir)
    assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns, before.st_ctime_ns)
    assert os.readlink(m / "sub" / "long") == "t/" * 1000


# --- attributes ----------------------------------------------------------------------------
def test_modes_are_exact(m: Path) -> None:
    old = os.umask(0)
    try:
        fd = os.open(m / "f", os.O_CREAT | os.O_WRONLY, 0o640)
        os.close(fd)
        os.mkdir(m / "d", 0o751)
        os.mkfifo(m / "p", 0o604)
        fd = os.open(m / "ro", os.O_CREAT | os.O_WRONLY, 0o400)
        os.write(fd, b"still writable through this fd")
        os.close(fd)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(m / "f").st_mode) == 0o640
    assert stat.S_IMODE(os.stat(m / "d").st_mode) == 0o751
    assert stat.S_IMODE(os.stat(m / "p").st_mode) == 0o604
    assert (m / "ro").read_bytes() == b"still writable through this fd"


def test_chmod_chown_utimens(m: Path) -> None:
    p = m / "f"
    p.write_bytes(b"x")
    os.chmod(p, 0o4751)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4751
    os.chmod(p, 0)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    os.utime(p, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(p)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    subprocess.run(["touch", "-m", "-d", "2001-02-03 04:05:06", str(p)], check=True)
    st = os.stat(p)
    assert st.st_atime_ns == 1_000_000_123
    assert st.st_mtime_ns != 2_000_000_456
    os.symlink("f", m / "l")
    os.utime(m / "l", ns=(5, 6), follow_symlinks=False)
    assert os.lstat(m / "l").st_mtime_ns == 6 and os.stat(p).st_mtime_ns != 6


def test_a_new_directory_has_one_time_for_atime_mtime_ctime(m: Path) -> None:
    """As on ext4. The rename that gives a new ciphertext directory its name moved its ctime
    alone, a clock tick after the others, for about half of them (review)."""
    for i in range(60):
        (m / f"d{i}").mkdir()
        st = os.lstat(m / f"d{i}")
        assert st.st_atime_ns == st.st_mtime_ns == st.st_ctime_ns, i


@pytest.mark.parametrize("target", ["t", "a" * 15, "b" * 200, "c" * 1000])
def test_removing_a_link_of_a_symlink_leaves_its_other_links_atime(m: Path, target: str) -> None:
    """As on ext4. Every removal read the symlink's ciphertext target (for a long target's
    blob), which moved the atime its other hard links show (review). Still read: a
    ciphertext target as long as a long one's (15-byte targets, docs/operators.md)."""
    os.symlink(target, m / "a")
    os.link(m / "a", m / "b", follow_symlinks=False)
    os.link(m / "a", m / "c", follow_symlinks=False)
    os.utime(m / "b", ns=(1_000_000_000, 2_000_000_000), follow_symlinks=False)
    os.unlink(m / "a")
    (m / "f").write_bytes(b"x")
    os.rename(m / "f", m / "c")  # a file renamed over one link
    moved = os.lstat(m / "b").st_atime_ns != 1_000_000_000
    assert moved == (len(target) in (15, 1000)), os.lstat(m / "b")
    assert os.readlink(m / "b") == target


def test_created_with_callers_ids(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    # Other users must be able to reach the mount point: pytest's tmp dirs are 0700.
    with tempfile.TemporaryDirectory(prefix="kmsfs-ids-") as public:
        os.chmod(public, 0o755)
        mount = mounter(volume, options=("allow_other",), mountpoint=Path(public) / "m")
        os.chmod(mount.mountpoint, 0o777)
        _create_as_other_user(mount.mountpoint)
        mount.stop()


def _create_as_other_user(mp: Path) -> None:

    def as_user() -> None:
        os.setgid(4321)
        os.setuid(1234)

    subprocess.run(["sh", "-c", f"echo hi > {mp}/u; mkdir {mp}/ud"],
                   check=True, preexec_fn=as_user)
    for name in ("u", "ud"):
        st = os.stat(mp / name)
        assert (st.st_uid, st.st_gid) == (1234, 4321)


def test_xattrs(m: Path, volume: Path) -> None:
    p = m / "f"
    p.write_bytes(b"x")
    os.setxattr(p, "user.color", b"secret-value-123")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.color") == b"secret-value-123"
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(os.listxattr(p)) == ["user.color", "user.empty"]
    os.removexattr(p, "user.empty")
    assert os.listxattr(p) == ["user.color"]
    with pytest.raises(OSError) as info:
        os.getxattr(p, "user.missing")
    assert _errno(info) == errno.ENODATA
    with pytest.raises(OSError) as info:
        os.removexattr(p, "user.missing")
    assert _errno(info) == errno.ENODATA
    with pytest.raises(OSError) as info:
        os.setxattr(p, "trusted.x", b"1")
    assert _errno(info) == errno.EOPNOTSUPP
    (m / "d").mkdir()
    os.setxattr(m / "d", "user.dir", b"v")
    assert os.getxattr(m / "d", "user.dir") == b"v"
    for path in ciphertext_paths(volume):
        for a in os.listxattr(path, follow_symlinks=False):
            assert "color" not in a
            assert b"secret-value" not in os.getxattr(path, a, follow_symlinks=False)


def test_long_xattr_names_are_stored_hashed_and_leak_nothing(m: Path, volume: Path) -> None:
    """Names up to 250 bytes after user. (ext4's limit): the disk name is a hash, the sealed
    name rides in front of the value, and neither the name nor the value shows on disk."""
    p = m / "f"
    p.write_bytes(b"x")
    name = "user." + "secretname" * 25  # 250 bytes after user.
    os.setxattr(p, name, b"secret-value-456")
    assert os.getxattr(p, name) == b"secret-value-456"
    assert os.listxattr(p) == [name]
    on_disk = [n for f in volume.iterdir() if f.is_file() for n in os.listxattr(f)]
    assert len(on_disk) == 1 and on_disk[0].startswith("user.l.") and len(on_disk[0]) == 50
    for f in volume.iterdir():
        for a in os.listxattr(f):
            val = os.getxattr(f, a)
            assert b"secretname" not in val and b"secret-value" not in val
    os.removexattr(p, name)
    assert os.listxattr(p) == []


def test_a_volume_without_long_xattr_names_refuses_them(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """A volume made before the LongXattrNames flag keeps its limit (ERANGE past about 171
    bytes after user.): older builds would hide such names, so only flagged volumes get them."""
    from dataclasses import replace

    from kmsfs.fs import config as volconfig
    from kmsfs.fs.volume import create_volume
    from tests.integration.fs_helpers import sample_config

    flags = tuple(f for f in volconfig.DEFAULT_FLAGS if f != volconfig.FLAG_LONG_XATTR_NAMES)
    cipher = tmp_path / "old"
    create_volume(cipher, replace(sample_config(), feature_flags=flags))
    m = mounter(cipher).mountpoint
    (m / "f").write_bytes(b"x")
    os.setxattr(m / "f", "user." + "s" * 171, b"fits")
    with pytest.raises(OSError) as info:
        os.setxattr(m / "f", "user." + "s" * 200, b"too long")
    assert _errno(info) == errno.ERANGE
    assert os.listxattr(m / "f") == ["user." + "s" * 171]


def test_special_files(m: Path) -> None:
    os.mkfifo(m / "fifo")
    assert stat.S_ISFIFO(os.stat(m / "fifo").st_mode)
    os.mknod(m / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    st = os.stat(m / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(m / "sock"))
        assert stat.S_ISSOCK(os.stat(m / "sock").st_mode)
    finally:
        s.close()
    assert sorted(os.listdir(m)) == ["fifo", "null", "sock"]


def test_statfs(m: Path) -> None:
    sv = os.statvfs(m)
    assert sv.f_namemax == 255 and sv.f_blocks > 0 and sv.f_bsize > 0


def test_readdir_10000_entries(m: Path) -> None:
    d = m / "many"
    d.mkdir()
    names = {f"entry-{i:05d}-{'x' * (i % 50)}" for i in range(10_000)}
    for n in names:
        os.close(os.open(d / n, os.O_CREAT | os.O_WRONLY, 0o644))
    listed = os.listdir(d)
    assert len(listed) == len(names) and set(listed) == names
    with os.scandir(d) as it:
        assert sum(1 for _ in it) == 10_000
    out = subprocess.run(["ls", "-l", str(d)], capture_output=True, check=True).stdout
    assert out.count(b"\n") == 10_001


def test_a_missing_name_is_remembered_for_the_entry_timeout(m: Path, volume: Path) -> None:
    """LOOKUP of a missing name answers inode 0, which the kernel keeps as a negative entry for
    the entry timeout (1 s), as it keeps positive ones: a stat of a missing name, repeated
    (PATH searches, imports, builds), costs no round trip. Seen from behind the mount's back, a
    name made directly in the ciphertext tree appears only once that second is over."""
    import time

    from kmsfs.crypto.names import DIRIV_NAME, NAMES_KEY_INFO, NameCipher
    from tests.integration.fs_helpers import SoftDeriver

    with pytest.raises(FileNotFoundError):
        os.stat(m / "late")
    cipher = NameCipher(SoftDeriver().derive(NAMES_KEY_INFO, epoch=1))
    disk = cipher.encrypt_to_disk((volume / DIRIV_NAME).read_bytes(), b"late")
    (volume / disk.name).write_bytes(b"")  # an empty file is an empty plaintext file
    with pytest.raises(FileNotFoundError):
        os.stat(m / "late")  # answered by the kernel from its negative entry
    time.sleep(1.5)
    assert os.stat(m / "late").st_size == 0
    (m / "made-through-the-mount").write_bytes(b"x")  # a negative entry never hides a create
    with pytest.raises(FileNotFoundError):
        os.stat(m / "gone")
    (m / "gone").write_bytes(b"y")
    assert (m / "gone").read_bytes() == b"y"


def test_a_file_unlinked_while_open_can_be_truncated_and_reopened(m: Path) -> None:
    fd = os.open(m / "gone", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"hello world")
        os.unlink(m / "gone")
        os.ftruncate(fd, 5)
        assert os.pread(fd, 100, 0) == b"hello"
        st = os.fstat(fd)
        assert (st.st_nlink, st.st_size) == (0, 5)
    finally:
        os.close(fd)
    (m / "gone2").write_bytes(b"abc")
    ro = os.open(m / "gone2", os.O_RDONLY)
    try:
        os.unlink(m / "gone2")
        rw = os.open(f"/proc/self/fd/{ro}", os.O_RDWR)  # for write: the daemon needs a new fd
        try:
            os.pwrite(rw, b"X", 1)
            assert os.pread(rw, 10, 0) == b"aXc"
        finally:
            os.close(rw)
    finally:
        os.close(ro)


def test_read_only_open_with_o_trunc_truncates(m: Path) -> None:
    """Linux truncates on O_RDONLY|O_TRUNC when the caller may write the file, as ext4 does."""
    (m / "f").write_bytes(b"data")
    os.close(os.open(m / "f", os.O_RDONLY | os.O_TRUNC))
    assert os.stat(m / "f").st_size == 0 and (m / "f").read_bytes() == b""


def _readdir(path: Path) -> dict[bytes, int]:
    """name -> d_ino, straight from readdir(3): what ls, find and every C program see."""

    class Dirent(ctypes.Structure):
        _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                    ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                    ("d_name", ctypes.c_char * 256)]

    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir64.restype = ctypes.POINTER(Dirent)
    libc.readdir64.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    handle = libc.opendir(bytes(path))
    assert handle, os.strerror(ctypes.get_errno())
    out = {}
    try:
        while entry := libc.readdir64(handle):
            out[entry.contents.d_name] = entry.contents.d_ino
    finally:
        libc.closedir(handle)
    return out


def test_listings_start_with_dot_and_dot_dot(m: Path) -> None:
    """As on ext4: an empty directory lists two entries, "." and "..", with their inodes."""
    (m / "d" / "e").mkdir(parents=True)
    (m / "d" / "f").write_bytes(b"")
    ino = {p: os.stat(p).st_ino for p in (m, m / "d", m / "d" / "e")}
    assert _readdir(m / "d" / "e") == {b".": ino[m / "d" / "e"], b"..": ino[m / "d"]}
    listing = _readdir(m / "d")
    assert listing[b"."] == ino[m / "d"] and listing[b".."] == ino[m]
    assert set(listing) == {b".", b"..", b"e", b"f"}
    assert _readdir(m)[b"."] == ino[m]
    assert subprocess.run(["ls", "-a", str(m / "d" / "e")], capture_output=True, text=True,
                          check=True).stdout.split() == [".", ".."]
    assert sorted(os.listdir(m / "d")) == ["e", "f"]  # tools that skip them see no more
