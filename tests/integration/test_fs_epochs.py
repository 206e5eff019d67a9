"""Key epochs (DESIGN.md §2 property 7): new data at the Domain's current ``mk`` epoch, old data
readable with its own epoch, and ``kmsfs reencrypt`` moving old data to the current epoch.

Mounts are real FUSE mounts of the stub daemon, whose software deriver knows epochs 1 ..
``current_epoch`` (``Mount(..., epoch=N)``), like a Domain rotated N - 1 times; a deriver with
``current_epoch=1`` is what an HSM removed before the rotation can still compute. The last test
runs the real commands on a real store (SoftHSM) with ``kmsfs-admin domain rotate``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from kmsfs import exitcodes
from kmsfs.crypto import stream
from kmsfs.crypto.content import BLOCK_SIZE, HEADER_SIZE, FileHeader
from kmsfs.errors import IntegrityError, UsageError
from kmsfs.fs import config as volconfig
from kmsfs.fs import kms, reencrypt, singlefile
from kmsfs.fs.epoch_ciphers import xattrs_of_volume
from kmsfs.fs.fsck import check_tree
from kmsfs.fs.reencrypt import UPGRADE_FLAGS, reencrypt_tree
from kmsfs.fs.reencrypt_walk import TEMP_PREFIX
from kmsfs.service import domains
from kmsfs.service.context import Context
from tests.integration.fault_helpers import drop_cache, wait_for
from tests.integration.fs_helpers import (
    Mount,
    SoftDeriver,
    make_volume,
    quiet_walk,
    reencrypt_leftovers,
    sample_config,
)
from tests.integration.test_fs_fsck import cipher_path

LONG = "L" * 200
XATTR_ = "user.colour"


def header_of(path: Path) -> FileHeader:
    with open(path, "rb") as f:
        return FileHeader.parse(f.read(HEADER_SIZE))


def mount(volume: Path, tmp_path: Path, epoch: int, name: str = "mnt") -> Mount:
    return Mount(volume, tmp_path / name, tmp_path / f"{name}.log", epoch=epoch).start()


def v1_volume(cipherdir: Path) -> Path:
    """A volume as made before the KeyEpochs flag existed (and LongXattrNames, which came
    later)."""
    config = sample_config()
    flags = tuple(f for f in config.feature_flags if f not in UPGRADE_FLAGS)
    from kmsfs.fs.volume import create_volume

    create_volume(cipherdir, replace(config, feature_flags=flags))
    return cipherdir


# --- the mount -------------------------------------------------------------------------------


def test_new_files_take_the_current_epoch_and_old_ones_keep_theirs(tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "cipher")
    assert volconfig.load(volume).has(volconfig.FLAG_KEY_EPOCHS)
    a_data, b_data = os.urandom(3 * BLOCK_SIZE + 5), os.urandom(BLOCK_SIZE + 1)

    m = mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "A").write_bytes(a_data)
        (m.mountpoint / "T").write_bytes(b"first life")
    finally:
        m.stop()
    m = mount(volume, tmp_path, epoch=2)  # the Domain was rotated
    try:
        (m.mountpoint / "B").write_bytes(b_data)
        assert (m.mountpoint / "A").read_bytes() == a_data
        (m.mountpoint / "T").write_bytes(b"second life")  # O_TRUNC: truncate to 0, new header
    finally:
        m.stop()

    a, b, t = (cipher_path(volume, n) for n in ("A", "B", "T"))
    assert a.read_bytes()[:4] == b"\x00\x02\x00\x01" and header_of(a).epoch == 1
    assert b.read_bytes()[:4] == b"\x00\x02\x00\x02" and header_of(b).epoch == 2
    assert header_of(t).epoch == 2

    m = mount(volume, tmp_path, epoch=2)
    try:
        assert (m.mountpoint / "A").read_bytes() == a_data
        assert (m.mountpoint / "B").read_bytes() == b_data
        assert (m.mountpoint / "T").read_bytes() == b"second life"
    finally:
        m.stop()

    # An HSM removed before the rotation only has epoch 1: it reads A, never B.
    m = mount(volume, tmp_path, epoch=1)
    try:
        assert (m.mountpoint / "A").read_bytes() == a_data
        with pytest.raises(OSError) as info:
            (m.mountpoint / "B").read_bytes()
        assert info.value.errno == errno.EIO
        assert (m.mountpoint / "B").stat().st_size == len(b_data)  # stat needs no key
    finally:
        m.stop()
    assert "epoch 2" in m.log()


def test_volume_without_the_flag_writes_version_1_until_the_domain_rotates(
    tmp_path: Path,
) -> None:
    """A volume without KeyEpochs (made before it, or one whose unauthenticated kmsfs.conf a
    writer of the ciphertext directory stripped it from) writes version 1 headers at epoch 1
    only while the Domain has no other epoch. After a rotation it wrote them too, so new files
    went back on the key of epoch 1, readable by an HSM removed before the rotation."""
    volume = v1_volume(tmp_path / "cipher")
    for epoch, name in ((1, "before"), (3, "after")):
        m = mount(volume, tmp_path, epoch=epoch)
        try:
            (m.mountpoint / name).write_bytes(b"old style")
            assert (m.mountpoint / name).read_bytes() == b"old style"
        finally:
            m.stop()
    before, after = cipher_path(volume, "before"), cipher_path(volume, "after")
    assert before.read_bytes()[:2] == b"\x00\x01" and header_of(before).epoch == 1
    assert after.read_bytes()[:2] == b"\x00\x02" and header_of(after).epoch == 3
    m = mount(volume, tmp_path, epoch=3)  # both read back, each with its own epoch
    try:
        assert (m.mountpoint / "before").read_bytes() == (m.mountpoint / "after").read_bytes()
    finally:
        m.stop()


# --- fsck ------------------------------------------------------------------------------------


def test_fsck_counts_epochs_and_reports_a_missing_epoch(tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "cipher")
    m = mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "A").write_bytes(b"a" * 10)
        (m.mountpoint / "empty").write_bytes(b"")
    finally:
        m.stop()
    m = mount(volume, tmp_path, epoch=2)
    try:
        (m.mountpoint / "B").write_bytes(b"b" * 10)
        os.link(m.mountpoint / "B", m.mountpoint / "B2")
    finally:
        m.stop()
    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean and report.problems == []
    doc = report.to_json()
    assert doc["epochs"] == {"1": 1, "2": 1} and doc["current_epoch"] == 2

    old = check_tree(volume, SoftDeriver(current_epoch=1))
    assert not old.clean
    assert [p.kind for p in old.problems] == ["epoch"]  # one inode, two names
    assert old.problems[0].path in ("/B", "/B2")
    assert "keyed with mk epoch 2: Domain test-domain has no key epoch 2" in old.problems[0].detail


# --- reencrypt -------------------------------------------------------------------------------


def _build(volume: Path, tmp_path: Path) -> dict[str, bytes]:
    """Epoch-1 files of every kind reencrypt must handle, then one file at epoch 2."""
    data = {
        "A": os.urandom(5 * BLOCK_SIZE + 100),
        "d/sub/linked": b"",  # a hard link to A, in another directory
        LONG: b"long name content",
        "d/small": b"x",
        "empty": b"",
    }
    data["d/sub/linked"] = data["A"]
    m = mount(volume, tmp_path, epoch=1)
    try:
        p = m.mountpoint
        (p / "d" / "sub").mkdir(parents=True)
        for name in ("A", LONG, "d/small", "empty"):
            (p / name).write_bytes(data[name])
        os.link(p / "A", p / "d" / "sub" / "linked")
        os.chmod(p / "A", 0o640)
        os.setxattr(p / "A", XATTR_, b"blue")
        os.utime(p / "A", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
        os.symlink("A", p / "link-to-A")
    finally:
        m.stop()
    m = mount(volume, tmp_path, epoch=2)
    try:
        data["B"] = os.urandom(2 * BLOCK_SIZE)
        (m.mountpoint / "B").write_bytes(data["B"])
    finally:
        m.stop()
    return data


def _check_plaintext(volume: Path, tmp_path: Path, data: dict[str, bytes]) -> None:
    m = mount(volume, tmp_path, epoch=2, name="check")
    try:
        p = m.mountpoint
        for name, want in data.items():
            assert (p / name).read_bytes() == want, name
        assert os.getxattr(p / "A", XATTR_) == b"blue"
        st = os.stat(p / "A")
        assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, 1_500_000_000_987_654_321)
        assert os.readlink(p / "link-to-A") == "A"
    finally:
        m.stop()


def test_reencrypt_moves_old_files_and_keeps_everything(tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "cipher")
    data = _build(volume, tmp_path)
    a, linked = cipher_path(volume, "A"), cipher_path(volume, "d/sub/linked")
    before = os.stat(a)
    xattrs = xattrs_of_volume(SoftDeriver(current_epoch=2))
    xattrs_before = {n: xattrs.open_with_epoch(os.fsencode(n), os.getxattr(a, n))
                     for n in os.listxattr(a)}
    assert list(xattrs_before.values()) == [(b"blue", 1)] and before.st_nlink == 2
    long_dir_times = os.stat(a.parent)

    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert summary.failed == []
    assert (summary.rewritten, summary.skipped, summary.empty) == (3, 1, 1)
    assert summary.extra_links == 1 and summary.temp_removed == 0
    assert summary.epochs_before == {1: 3, 2: 1} and summary.epochs_after == {2: 4}
    # The root, d and d/sub: their names moved to epoch 2 too (their paths with them).
    assert summary.dirs_rekeyed == 3
    assert summary.name_epochs_before == {1: 3} and summary.name_epochs_after == {2: 3}
    assert not a.exists() and not linked.exists()
    a, linked = cipher_path(volume, "A"), cipher_path(volume, "d/sub/linked")

    after = os.stat(a)
    assert after.st_ino != before.st_ino  # a new file...
    assert os.stat(linked).st_ino == after.st_ino and after.st_nlink == 2  # ...still one inode
    for field in ("st_mode", "st_uid", "st_gid", "st_atime_ns", "st_mtime_ns", "st_size"):
        assert getattr(after, field) == getattr(before, field), field
    # the same names and values, sealed again at epoch 2
    assert {n: xattrs.open_with_epoch(os.fsencode(n), os.getxattr(a, n))
            for n in os.listxattr(a)} == {n: (b"blue", 2) for n in xattrs_before}
    assert summary.xattrs_resealed == 1
    assert os.stat(a.parent).st_mtime_ns == long_dir_times.st_mtime_ns
    for name in ("A", "d/sub/linked", LONG, "d/small", "B"):
        assert header_of(cipher_path(volume, name)).epoch == 2, name
    assert not [p for p in volume.rglob(TEMP_PREFIX + "*")]
    _check_plaintext(volume, tmp_path, data)

    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean and report.epochs == {2: 4} and report.name_epochs == {2: 3}
    # The removed HSM now reads nothing: no content, and no name (the root's names are keyed
    # with epoch 2, so it cannot even list the volume).
    removed = check_tree(volume, SoftDeriver(current_epoch=1))
    assert {p.kind for p in removed.problems} == {"epoch"}
    assert len([p for p in removed.problems if p.cipher_path.endswith("kmsfs.diriv")]) == 3
    assert {p.path for p in removed.problems} == {"/", None}  # not one plaintext name shown
    for d in (volume, cipher_path(volume, "d"), cipher_path(volume, "d/sub")):
        assert len((d / "kmsfs.diriv").read_bytes()) == 18, d
        assert (d / "kmsfs.diriv").read_bytes()[:2] == (2).to_bytes(2, "big"), d

    again = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert (again.rewritten, again.skipped, again.failed) == (0, 4, [])
    assert again.dirs_rekeyed == 0 and again.name_epochs_after == {2: 3}
    assert os.stat(a).st_ino == after.st_ino  # idempotent: nothing rewritten


_CRASH = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.integration.fs_helpers import SoftDeriver
    from kmsfs.fs import reencrypt
    real = os.rename
    def rename(src, dst):
        # The hard-linked file's second path: the new inode already has a path and a temporary
        # link, the old one only this path left. Crash here: no cleanup runs.
        if os.lstat(src).st_nlink == 2 and os.lstat(dst).st_nlink == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst)
    os.rename = rename
    reencrypt.reencrypt_tree(Path({volume!r}), SoftDeriver(current_epoch=2))
    """
)


def _dir_times(volume: Path) -> dict[int, tuple[int, int]]:
    """(atime, mtime) of every ciphertext directory, the root included (the plaintext ones),
    by inode number: a run moves their names to a new key, not them."""
    from kmsfs.crypto.names import is_internal

    dirs = [volume, *(p for p in quiet_walk(volume) if stat.S_ISDIR(os.lstat(p).st_mode))]
    return {d.stat().st_ino: (d.stat().st_atime_ns, d.stat().st_mtime_ns)
            for d in dirs if not any(map(is_internal, d.relative_to(volume).parts))}


def test_reencrypt_resumes_after_a_crash(tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "cipher")
    data = _build(volume, tmp_path)
    a, linked = cipher_path(volume, "A"), cipher_path(volume, "d/sub/linked")
    times = _dir_times(volume)
    root = str(Path(__file__).resolve().parents[2])
    # Kill the job after A's first path is replaced, before the second (the hard link) is.
    proc = subprocess.run(
        [sys.executable, "-c", _CRASH.format(root=root, volume=str(volume))],
        capture_output=True,
    )
    assert proc.returncode == -9, proc.stderr
    assert len([p for p in reencrypt_leftovers(volume) if "saved times" not in p]) == 1
    epochs = sorted(header_of(p).epoch for p in (a, linked))
    assert epochs == [1, 2]  # the link is split: one path new, one old, both readable
    assert _dir_times(volume) != times  # the renames moved them; nothing put them back yet
    _check_plaintext(volume, tmp_path, data)  # a mount in between changes no entry
    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean and {w.kind for w in report.warnings} == {
        "leftover", "interrupted-reencrypt"}

    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    # The killed run's last rename is done (the temporary link names the old inode), not undone.
    assert summary.links_rejoined == 1 and summary.temp_removed == 0 and summary.failed == []
    assert summary.epochs_after == {2: summary.rewritten + summary.skipped}
    assert reencrypt_leftovers(volume) == []
    a, linked = cipher_path(volume, "A"), cipher_path(volume, "d/sub/linked")  # new names
    assert os.stat(a).st_ino == os.stat(linked).st_ino and os.stat(a).st_nlink == 2
    assert _dir_times(volume) == times  # as saved on each directory before it changed
    for name in ("A", "d/sub/linked", LONG, "d/small", "B"):
        assert header_of(cipher_path(volume, name)).epoch == 2, name
    _check_plaintext(volume, tmp_path, data)
    assert check_tree(volume, SoftDeriver(current_epoch=2)).clean


def test_reencrypt_refuses_a_mounted_volume_and_a_volume_without_the_flag(
    tmp_path: Path,
) -> None:
    volume = make_volume(tmp_path / "cipher")
    m = mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "f").write_bytes(b"data")
        with pytest.raises(UsageError, match="unmount it first"):
            reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    finally:
        m.stop()
    assert header_of(cipher_path(volume, "f")).epoch == 1  # nothing touched

    old = v1_volume(tmp_path / "old")
    m = mount(old, tmp_path, epoch=1, name="oldmnt")
    try:
        (m.mountpoint / "f").write_bytes(b"data")
    finally:
        m.stop()
    with pytest.raises(UsageError, match="no KeyEpochs flag"):
        reencrypt_tree(old, SoftDeriver(current_epoch=2))
    summary = reencrypt_tree(old, SoftDeriver(current_epoch=2), upgrade=True)
    assert summary.upgraded and summary.rewritten == 1
    # NameEpochs too: the run moves the root's names to epoch 2 (an 18-byte kmsfs.diriv);
    # and SymlinkXattrEpochs.
    assert summary.flags_added == [volconfig.FLAG_KEY_EPOCHS, volconfig.FLAG_LONG_XATTR_NAMES,
                                   volconfig.FLAG_NAME_EPOCHS,
                                   volconfig.FLAG_SYMLINK_XATTR_EPOCHS]
    assert summary.name_epochs_after == {2: 1}
    assert volconfig.load(old).has(volconfig.FLAG_NAME_EPOCHS)
    assert volconfig.load(old).has(volconfig.FLAG_SYMLINK_XATTR_EPOCHS)
    assert volconfig.load(old).has(volconfig.FLAG_KEY_EPOCHS)
    assert volconfig.load(old).has(volconfig.FLAG_LONG_XATTR_NAMES)
    again = reencrypt_tree(old, SoftDeriver(current_epoch=2), upgrade=True)
    assert not again.upgraded and again.flags_added == [] and again.rewritten == 0
    f = cipher_path(old, "f")
    assert f.read_bytes()[:4] == b"\x00\x02\x00\x02"
    m = mount(old, tmp_path, epoch=2, name="oldmnt")
    try:
        assert (m.mountpoint / "f").read_bytes() == b"data"
    finally:
        m.stop()


def test_reencrypt_reports_a_damaged_file_and_goes_on(tmp_path: Path) -> None:
    """Named by its plaintext path (it was the ciphertext path alone: review), a long name on
    the way included."""
    volume = make_volume(tmp_path / "cipher")
    m = mount(volume, tmp_path, epoch=1)
    name = "sub/" + "B" * 200
    try:
        (m.mountpoint / "sub").mkdir()
        (m.mountpoint / name).write_bytes(os.urandom(3 * BLOCK_SIZE))
        (m.mountpoint / "good").write_bytes(b"fine")
    finally:
        m.stop()
    bad = cipher_path(volume, name)
    raw = bytearray(bad.read_bytes())
    raw[HEADER_SIZE + 4124 + 50] ^= 1  # block 1
    bad.write_bytes(bytes(raw))
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert summary.rewritten == 1 and len(summary.failed) == 1
    assert "block 1 (plaintext offset 4096) fails authentication" in summary.failed[0].detail
    assert summary.failed[0].path == "/" + name
    bad = cipher_path(volume, name)  # named by the key the run moved its names to
    assert summary.failed[0].cipher_path == str(bad.relative_to(volume))
    assert summary.to_json()["failed"][0]["path"] == "/" + name
    assert bad.read_bytes() == bytes(raw)  # left as it was
    assert not list(volume.rglob(TEMP_PREFIX + "*"))


def test_reencrypt_moves_no_atime(tmp_path: Path) -> None:
    """A run reads every header and lists every directory, and a file it cannot rewrite is
    read in full: none of it moves a plaintext atime (O_NOATIME), nor a directory's mtime."""
    from tests.integration.test_fs_fsck import _unread

    volume = make_volume(tmp_path / "cipher")
    m = mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "d").mkdir()
        (m.mountpoint / "d" / "f").write_bytes(os.urandom(2 * BLOCK_SIZE))
        (m.mountpoint / "bad").write_bytes(os.urandom(3 * BLOCK_SIZE))
    finally:
        m.stop()
    bad = cipher_path(volume, "bad")
    raw = bytearray(bad.read_bytes())
    raw[HEADER_SIZE + 4124 + 50] ^= 1  # block 1 fails: the rewrite stops there
    bad.write_bytes(bytes(raw))
    paths = [volume, *(cipher_path(volume, n) for n in ("d", "d/f", "bad"))]
    for path in paths:
        _unread(path)
    mtimes = [os.stat(p).st_mtime_ns for p in paths]

    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=1))  # nothing to do
    assert summary.skipped == 2 and summary.rewritten == 0
    assert [os.stat(p).st_atime_ns for p in paths] == [1_000_000_000_000_000_000] * len(paths)

    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    paths = [volume, *(cipher_path(volume, n) for n in ("d", "d/f", "bad"))]  # names moved
    assert summary.rewritten == 1 and [f.cipher_path for f in summary.failed] == [paths[3].name]
    assert [os.stat(p).st_atime_ns for p in paths] == [1_000_000_000_000_000_000] * len(paths)
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes


_AS_OWNER = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.integration.fs_helpers import SoftDeriver
    from kmsfs.fs.reencrypt import reencrypt_tree
    summary = reencrypt_tree(Path({volume!r}), SoftDeriver(current_epoch=2), upgrade={upgrade})
    print(json.dumps(summary.to_json()))
    """
)


def _reencrypt_as(uid: int, volume: Path, upgrade: bool = False) -> dict[str, object]:
    script = _AS_OWNER.format(root=str(Path(__file__).resolve().parents[2]),
                              volume=str(volume), upgrade=upgrade)
    proc = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", sys.executable,
         "-c", script], capture_output=True, text=True, cwd="/", timeout=120)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_an_owner_other_than_root_rekeys_its_read_only_dirs_and_write_only_files(
    tmp_path: Path,
) -> None:
    """Run by the volume's owner (not root), reencrypt could neither read a write-only file
    (0200) nor replace a file in a read-only directory (0555): both failed. Its owner may
    chmod them: the job opens them for the rewrite and puts each mode back."""
    base = Path(tempfile.mkdtemp(prefix="kmsfs-owner-"))  # tmp_path is closed to others
    try:
        _rekey_as_owner(base, tmp_path)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _rekey_as_owner(base: Path, tmp_path: Path) -> None:
    base.chmod(0o755)
    volume = make_volume(base / "cipher")
    m = mount(volume, tmp_path, epoch=1)
    data = {"ro/f": b"in a read-only directory", "wo": b"write-only", "plain": b"plain"}
    try:
        (m.mountpoint / "ro").mkdir()
        for name, value in data.items():
            (m.mountpoint / name).write_bytes(value)
        os.setxattr(m.mountpoint / "plain", b"user.a", b"on a read-only file")
        os.setxattr(m.mountpoint / "wo", b"user.w", b"on a write-only file")
        os.setxattr(m.mountpoint / "ro", b"user.b", b"on a read-only directory")
        os.symlink("a target", m.mountpoint / "ro" / "link")
        (m.mountpoint / "plain").chmod(0o444)
        (m.mountpoint / "wo").chmod(0o200)
        (m.mountpoint / "ro").chmod(0o555)
    finally:
        m.stop()
    # what a killed run (as root) left in the read-only directory: removed first
    (cipher_path(volume, "ro") / f"{TEMP_PREFIX}{'0' * 16}-1").write_bytes(b"left over")
    subprocess.run(["chown", "-R", "65534:65534", str(volume)], check=True)
    modes = {name: stat.S_IMODE(cipher_path(volume, name).lstat().st_mode)
             for name in ("ro", "ro/f", "wo", "plain")}
    assert (modes["ro"], modes["wo"], modes["plain"]) == (0o555, 0o200, 0o444)

    summary = _reencrypt_as(65534, volume)
    assert (summary["rewritten"], summary["failed"], summary["temp_removed"]) == (3, [], 1)
    assert (summary["xattrs_resealed"], summary["symlinks_rewritten"]) == (3, 1)
    for name, mode in modes.items():
        path = cipher_path(volume, name)
        assert stat.S_IMODE(path.lstat().st_mode) == mode, name
        assert path.lstat().st_uid == 65534
        if not path.is_dir():
            assert header_of(path).epoch == 2

    subprocess.run(["chown", "-R", "0:0", str(volume)], check=True)
    m = mount(volume, tmp_path, epoch=2, name="again")
    try:
        for name, value in data.items():
            assert (m.mountpoint / name).read_bytes() == value
        assert os.getxattr(m.mountpoint / "plain", b"user.a") == b"on a read-only file"
        assert os.getxattr(m.mountpoint / "wo", b"user.w") == b"on a write-only file"
        assert os.getxattr(m.mountpoint / "ro", b"user.b") == b"on a read-only directory"
        assert os.readlink(m.mountpoint / "ro" / "link") == "a target"
    finally:
        m.stop()

    # --upgrade rewrites kmsfs.conf in the root, which its owner may have made read-only
    old = v1_volume(base / "old")
    subprocess.run(["chown", "-R", "65534:65534", str(old)], check=True)
    old.chmod(0o555)
    summary = _reencrypt_as(65534, old, upgrade=True)
    assert summary["flags_added"] and summary["failed"] == []
    assert volconfig.load(old).has(volconfig.FLAG_KEY_EPOCHS)
    assert volconfig.load(old).has(volconfig.FLAG_NAME_EPOCHS)
    assert stat.S_IMODE(old.lstat().st_mode) == 0o555


def test_a_fifo_swapped_in_before_the_rewrite_never_blocks_reencrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the scan, which read a file's header, and its rewrite, which opens it again, a
    FIFO put in its place would block a plain open forever, the volume locked. Here the FIFO
    has a writer, so even a blocking open returns (the test cannot hang): the rewrite must
    still refuse it as not a regular file."""
    volume = make_volume(tmp_path / "cipher")
    m = mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "A").write_bytes(b"a" * 5000)
    finally:
        m.stop()
    target = cipher_path(volume, "A")
    real_run = reencrypt._Job.run
    writers: list[int] = []

    def swap_then_run(self, nodes):  # type: ignore[no-untyped-def]
        os.rename(target, tmp_path / "moved-away")
        os.mkfifo(target)
        writers.append(os.open(target, os.O_RDWR | os.O_NONBLOCK))
        return real_run(self, nodes)

    monkeypatch.setattr(reencrypt._Job, "run", swap_then_run)
    try:
        summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    finally:
        for fd in writers:
            os.close(fd)
    assert writers and [f.detail for f in summary.failed] == ["not a regular file"]
    target = cipher_path(volume, "A")  # its name moved to epoch 2, as every entry's
    assert stat.S_ISFIFO(os.lstat(target).st_mode) and summary.rewritten == 0
    assert not list(volume.glob(TEMP_PREFIX + "*"))


def test_mount_refuses_while_reencrypt_holds_the_volume(tmp_path: Path) -> None:
    from kmsfs.fs.volume import lock_exclusive

    volume = make_volume(tmp_path / "cipher")
    fd = lock_exclusive(volume)
    try:
        with pytest.raises(RuntimeError, match="busy"):
            mount(volume, tmp_path, epoch=1)
    finally:
        os.close(fd)


def test_a_second_job_while_reencrypt_runs_is_told_so(tmp_path: Path) -> None:
    """fsck or a second reencrypt said "in use by a mount or another job: unmount it first"
    with nothing mounted (found by review): now it names both, as a mount's refusal does."""
    from kmsfs.fs.volume import lock_exclusive, lock_shared

    volume = make_volume(tmp_path / "cipher")
    fd = lock_exclusive(volume)
    try:
        with pytest.raises(UsageError) as refused:
            os.close(lock_shared(volume))
    finally:
        os.close(fd)
    assert str(refused.value) == (
        f"{volume}: busy: mounted elsewhere, or being checked or rewritten (kmsfs fsck, "
        "kmsfs reencrypt); unmount it first, or let the other job finish")


# --- the command line ------------------------------------------------------------------------


def _kmsfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmsfs.fs.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def test_cli_refusals_are_one_line_exit_2(tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "cipher")
    m = mount(volume, tmp_path, epoch=1)
    try:
        proc = _kmsfs("reencrypt", str(volume), "--store", str(tmp_path / "nostore"))
    finally:
        m.stop()
    assert proc.returncode == exitcodes.USAGE, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1
    assert "unmount it first" in proc.stderr

    old = v1_volume(tmp_path / "old")
    proc = _kmsfs("reencrypt", str(old), "--store", str(tmp_path / "nostore"))
    assert proc.returncode == exitcodes.USAGE
    assert len(proc.stderr.strip().splitlines()) == 1 and "--upgrade" in proc.stderr
    assert not volconfig.load(old).has(volconfig.FLAG_KEY_EPOCHS)


# --- single files ----------------------------------------------------------------------------


def test_single_file_encrypt_decrypt_at_epoch_2(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from contextlib import contextmanager

    epoch = {"now": 2}

    @contextmanager
    def open_deriver(store, bundle, agent=None):  # type: ignore[no-untyped-def]
        yield SoftDeriver(current_epoch=epoch["now"])

    monkeypatch.setattr(kms, "export_bundle", lambda store, name: b'{"test": "bundle"}')
    monkeypatch.setattr(kms, "check_bundle", lambda *a, **k: "test-domain-id")
    monkeypatch.setattr(kms, "open_deriver", open_deriver)
    plain, enc, out = tmp_path / "p", tmp_path / "p.kmsfs", tmp_path / "out"
    plain.write_bytes(os.urandom(3 * stream.CHUNK_SIZE + 7))
    singlefile.encrypt(tmp_path, "payroll", str(plain), str(enc))
    data = enc.read_bytes()
    size = stream.header_size(data[: stream.PREFIX_SIZE])
    header = stream.StreamHeader.parse(data[:size])
    assert (header.version, header.epoch) == (2, 2)
    singlefile.decrypt(tmp_path, str(enc), str(out))
    assert out.read_bytes() == plain.read_bytes()

    epoch["now"] = 1  # a Domain (or removed HSM) without epoch 2
    with pytest.raises(IntegrityError, match="keyed with mk epoch 2"):
        singlefile.decrypt(tmp_path, str(enc), str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()


# --- end to end: real store, SoftHSM, kmsfs-admin domain rotate ------------------------------


@pytest.mark.slow
def test_rotate_then_reencrypt_with_the_real_commands(tmp_path: Path, initialized) -> None:  # type: ignore[no-untyped-def]
    initialized.real_domain()
    env = {"KMSFS_STORE": str(initialized.store)}
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    assert _kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    mp.mkdir()

    def mounted(write: dict[str, bytes]) -> None:
        proc = _kmsfs("mount", str(cipher), str(mp), env=env)
        assert proc.returncode == 0, proc.stderr
        try:
            for name, value in write.items():
                (mp / name).parent.mkdir(exist_ok=True)
                (mp / name).write_bytes(value)
        finally:
            assert _kmsfs("umount", str(mp)).returncode == 0

    a, b = os.urandom(3 * BLOCK_SIZE), os.urandom(100)
    mounted({"A": a})
    initialized("domain", "rotate", "payroll")
    (cipher / "kmsfs.rekeying").write_bytes(b"")  # what a reencrypt cut short leaves
    log = tmp_path / "refused.log"
    proc = _kmsfs("mount", str(cipher), str(mp), "--log-file", str(log), env=env)
    assert proc.returncode == exitcodes.USAGE and len(proc.stderr.strip().splitlines()) == 1
    assert "cut short while moving names" in proc.stderr and not os.path.ismount(mp)
    assert not log.exists()  # said before anything is touched (no HSM login either)
    (cipher / "kmsfs.rekeying").unlink()
    # "new" is made after the rotation: its names at epoch 2, derived in the HSM
    mounted({"B": b, "new/C": b})
    doc = json.loads(_kmsfs("fsck", str(cipher), "--json", env=env).stdout)
    assert doc["clean"] and doc["epochs"] == {"1": 1, "2": 2} and doc["current_epoch"] == 2
    assert doc["name_epochs"] == {"1": 1, "2": 1}
    text = _kmsfs("fsck", str(cipher), env=env).stdout.splitlines()
    assert text[-2:] == [
        "files per key epoch: epoch 1: 1, epoch 2: 2; 1 below the current epoch 2",
        "directories per key epoch of their names: epoch 1: 1, epoch 2: 1; 1 below the "
        "current epoch 2"]

    proc = _kmsfs("reencrypt", str(cipher), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert (summary["rewritten"], summary["skipped"]) == (1, 2)
    assert summary["epochs_before"] == {"1": 1, "2": 2} and summary["epochs_after"] == {"2": 3}
    assert summary["dirs_rekeyed"] == 1 and summary["name_epochs_after"] == {"2": 2}
    doc = json.loads(_kmsfs("fsck", str(cipher), "--json", env=env).stdout)
    assert doc["clean"] and doc["epochs"] == {"2": 3} and doc["name_epochs"] == {"2": 2}

    proc = _kmsfs("mount", str(cipher), str(mp), env=env)
    assert proc.returncode == 0, proc.stderr
    try:
        assert (mp / "A").read_bytes() == a and (mp / "B").read_bytes() == b
        assert (mp / "new" / "C").read_bytes() == b
    finally:
        _kmsfs("umount", str(mp))
    proc = _kmsfs("reencrypt", str(cipher), env=env)
    assert proc.returncode == 0 and "0 file(s) re-encrypted" in proc.stdout
    assert proc.stdout.splitlines()[-2:] == [
        "files per key epoch: before epoch 2: 3; after epoch 2: 3",
        "directories per key epoch of their names: before epoch 2: 2; after epoch 2: 2 "
        "(0 re-keyed)"]


def test_retired_epochs_close_the_rollback_a_removed_hsm_could_use(  # type: ignore[no-untyped-def]
    tmp_path: Path, initialized
) -> None:
    """Revocation done to the end (DESIGN §2.7): after rotate and reencrypt, a writer of the
    ciphertext puts back an old copy of a file, keyed with epoch 1 (what an HSM removed
    before the rotation can compute, and so could have made with contents of its choosing).
    Until the epochs are retired the mount reads it, and appends go to epoch 1 too; after
    ``domain retire --below 2`` it reads and writes EIO with a log line naming the file, and
    fsck calls it damage. The other files, names and all, read as before."""
    initialized.real_domain()
    env = {"KMSFS_STORE": str(initialized.store)}
    cipher, mp, log = tmp_path / "cipher", tmp_path / "mnt", tmp_path / "kmsfs.log"
    assert _kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    mp.mkdir()

    def mounted(do) -> None:  # type: ignore[no-untyped-def]
        proc = _kmsfs("mount", str(cipher), str(mp), "--log-file", str(log), env=env)
        assert proc.returncode == 0, proc.stderr
        try:
            do(mp)
        finally:
            assert _kmsfs("umount", str(mp)).returncode == 0

    old, kept = os.urandom(BLOCK_SIZE + 7), os.urandom(99)
    mounted(lambda m: ((m / "old").write_bytes(old), (m / "kept").write_bytes(kept)))
    def files() -> list[Path]:
        return [p for p in cipher.iterdir() if p.is_file() and not p.name.startswith("kmsfs.")]

    old_copy = next(p.read_bytes() for p in files() if p.stat().st_size > 200)
    initialized("domain", "rotate", "payroll")
    assert _kmsfs("reencrypt", str(cipher), env=env).returncode == 0
    assert {header_of(p).epoch for p in files()} == {2}
    assert (cipher / "kmsfs.diriv").read_bytes()[:2] == b"\x00\x02"  # names moved too
    rolled_back = next(p for p in files() if p.stat().st_size > 200)
    rolled_back.write_bytes(old_copy)  # the old copy, back at epoch 1

    def reads_and_appends(m: Path) -> None:
        assert (m / "old").read_bytes() == old
        with open(m / "old", "ab") as f:
            f.write(b"new data")
    mounted(reads_and_appends)
    assert header_of(rolled_back).epoch == 1  # the window retirement closes

    out = initialized("--json", "domain", "retire", "payroll", "--below", "2", "--yes").json
    assert out["retired_below"] == 2
    log.write_bytes(b"")

    def refused(m: Path) -> None:
        with pytest.raises(OSError) as read:
            (m / "old").read_bytes()
        with pytest.raises(OSError) as append, open(m / "old", "ab") as f:
            f.write(b"more")
            f.flush()
        assert read.value.errno == append.value.errno == errno.EIO
        assert (m / "kept").read_bytes() == kept
        (m / "new").write_bytes(b"written after the retirement")
    mounted(refused)
    logged = log.read_text()
    assert "/old" in logged and "key epoch 1 of Domain payroll is retired" in logged
    proc = _kmsfs("fsck", str(cipher), "--json", env=env)
    assert proc.returncode == exitcodes.DAMAGED, proc.stderr
    report = json.loads(proc.stdout)
    assert [(p["kind"], p["path"]) for p in report["problems"]] == [("epoch", "/old")]
    assert "is retired" in report["problems"][0]["detail"]


def _real_volume(tmp_path: Path, initialized) -> tuple[dict[str, str], Path, Path]:  # type: ignore[no-untyped-def]
    """A volume of a real Domain (store, SoftHSM), made and written once at generation 1."""
    initialized.real_domain()
    env = {"KMSFS_STORE": str(initialized.store)}
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    assert _kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    mp.mkdir()
    return env, cipher, mp


def _through_a_mount(  # type: ignore[no-untyped-def]
    env: dict[str, str], cipher: Path, mp: Path, do, log: Path | None = None
) -> None:
    logging = ["--log-file", str(log)] if log is not None else []
    proc = _kmsfs("mount", str(cipher), str(mp), *logging, env=env)
    assert proc.returncode == 0, proc.stderr
    try:
        do(mp)
    finally:
        assert _kmsfs("umount", str(mp)).returncode == 0


def _files(cipher: Path) -> dict[str, tuple[int, int]]:
    """Ciphertext file name -> (inode, key epoch) of each file in the root."""
    return {p.name: (p.stat().st_ino, header_of(p).epoch) for p in cipher.iterdir()
            if p.is_file() and not p.name.startswith("kmsfs.")}


def _generation(cipher: Path) -> int:
    from kmsfs import api

    return int(api.bundle_facts(volconfig.load(cipher).domain_bundle)["generation"])


@pytest.mark.slow
def test_reencrypt_keeps_the_generation_it_keys_files_with(  # type: ignore[no-untyped-def]
    tmp_path: Path, initialized, machine_state: Path
) -> None:
    """reencrypt keys files with the store's newest generation: like a mount that used it, it
    keeps it in kmsfs.conf and in this machine's record. A store writer who then hides it
    cannot make the next mount fall back to generation 1 (A unreadable, new files at epoch 1,
    which an HSM removed before the rotation still has)."""
    env, cipher, mp = _real_volume(tmp_path, initialized)
    a = os.urandom(3 * BLOCK_SIZE)
    _through_a_mount(env, cipher, mp, lambda m: (m / "A").write_bytes(a))
    initialized("domain", "rotate", "payroll")
    root = os.stat(cipher)

    proc = _kmsfs("reencrypt", str(cipher), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["epochs_after"] == {"2": 1}
    assert _generation(cipher) == 2
    now = os.stat(cipher)  # kmsfs.conf rewritten and A replaced: the root's times put back
    assert (now.st_atime_ns, now.st_mtime_ns) == (root.st_atime_ns, root.st_mtime_ns)
    (record,) = (machine_state / "domains").glob("*.json")  # beside it: volumes/ (volumepin)
    assert json.loads(record.read_text())["generation"] == 2

    (initialized.store / "domains" / f"{volconfig.load(cipher).domain_id}.json").unlink()
    before = set(_files(cipher))

    def read_and_write(m: Path) -> None:
        assert (m / "A").read_bytes() == a
        (m / "C").write_bytes(b"new data")

    _through_a_mount(env, cipher, mp, read_and_write)
    (new,) = set(_files(cipher)) - before
    assert _files(cipher)[new][1] == 2


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("chattr"), reason="needs chattr")
def test_reencrypt_refuses_when_it_cannot_record_the_generation(  # type: ignore[no-untyped-def]
    tmp_path: Path, initialized, machine_state: Path
) -> None:
    """A kmsfs.conf or a machine record that cannot be written: one line, nothing rewritten."""
    env, cipher, mp = _real_volume(tmp_path, initialized)
    _through_a_mount(env, cipher, mp, lambda m: (m / "A").write_bytes(b"a" * 5000))
    initialized("domain", "rotate", "payroll")
    files = _files(cipher)
    assert [epoch for _, epoch in files.values()] == [1]

    # kmsfs.conf first: once it carries generation 2 it is not written again.
    for frozen, what in ((cipher, "in use in"), (machine_state / "domains", "this machine")):
        with _unwritable(frozen):
            proc = _kmsfs("reencrypt", str(cipher), env=env)
        assert proc.returncode == exitcodes.ERROR, proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert f"cannot record the Domain generation {what}" in line, line
        assert line.endswith("nothing re-encrypted") and proc.stdout == ""
        assert _files(cipher) == files and not list(cipher.glob(TEMP_PREFIX + "*"))

    assert _generation(cipher) == 2  # written before the machine record was refused
    proc = _kmsfs("reencrypt", str(cipher), "--json", env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["rewritten"] == 1, proc.stderr


@contextmanager
def _unwritable(directory: Path) -> Iterator[None]:
    """No file can be made in *directory*, even by root (immutable: chattr +i)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        return
    mode = directory.stat().st_mode
    directory.chmod(0o555)
    try:
        yield
    finally:
        directory.chmod(mode)


def test_reencrypt_is_a_documented_command() -> None:
    proc = _kmsfs("reencrypt", "--help")
    assert proc.returncode == 0 and "example" in proc.stdout
    assert TEMP_PREFIX.startswith("kmsfs.tmp.")


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is for root")
def test_reencrypt_as_root_refuses_a_volume_another_user_can_reach(tmp_path: Path) -> None:
    """reencrypt creates, links and renames files by path as root: in a tree another user can
    reach, a directory swapped for a symlink would put a file of theirs anywhere."""
    with tempfile.TemporaryDirectory(prefix="kmsfs-epochs-", dir="/tmp") as base:
        os.chmod(base, 0o755)  # unlike pytest's 0700 directories, lets everyone through
        volume = make_volume(Path(base) / "cipher")
        _build(volume, tmp_path)
        os.chmod(volume, 0o711)
        before = sorted((str(p), p.lstat().st_mtime_ns) for p in volume.rglob("*"))
        with pytest.raises(UsageError, match=r"can reach the ciphertext \(mode 0711"):
            reencrypt_tree(volume, SoftDeriver(current_epoch=2))
        assert sorted((str(p), p.lstat().st_mtime_ns) for p in volume.rglob("*")) == before


def test_a_fifo_swapped_in_after_the_walk_never_blocks_reencrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the walk that saw a regular file and the read of its header, a FIFO put in
    its place would block a plain open forever; the job reports the file instead."""
    volume = make_volume(tmp_path / "cipher")
    _build(volume, tmp_path)
    target = cipher_path(volume, "A")
    real_lstat = os.lstat
    seen, swapped = [], []

    def lstat_then_swap(path, *args, **kw):  # type: ignore[no-untyped-def]
        st = real_lstat(path, *args, **kw)
        if os.fsdecode(path) == str(target) and stat.S_ISREG(st.st_mode):
            seen.append(True)
            if len(seen) == 2:  # the scan's look, after the walk's: the header is read next
                swapped.append(True)
                os.rename(target, tmp_path / "moved")  # out of the volume
                os.mkfifo(target)
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert swapped and len(summary.failed) == 1, summary.failed
    assert "not a regular file" in summary.failed[0].detail


def _wait_for_log(log: Path, text: str) -> None:
    assert wait_for(lambda: text in log.read_text(), timeout=30), f"never logged: {text}"


def _read_uncached(path: Path) -> bytes:
    """Read with the kernel's cached pages of the file dropped first (the mount keeps them
    across opens): the read reaches the daemon."""
    drop_cache(path)
    return path.read_bytes()


def _refused(action) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(OSError) as refused:
        action()
    assert refused.value.errno == errno.EIO


def test_a_mount_takes_in_a_retirement_made_while_it_serves(  # type: ignore[no-untyped-def]
    tmp_path: Path, initialized
) -> None:
    """``domain retire`` run while a volume is mounted in-process (no agent): within a second
    or so, with no request needed, the mount refuses the retired epoch's file keys, as a mount
    started after the retirement does, instead of until it is remounted. A file keyed with
    epoch 1 then reads and writes EIO with a log line, through a new open and through one held
    open since before the retirement; files of the kept epoch and every name read as before."""
    env, cipher, mp = _real_volume(tmp_path, initialized)
    log = tmp_path / "kmsfs.log"
    old, kept = os.urandom(BLOCK_SIZE + 7), os.urandom(99)
    _through_a_mount(env, cipher, mp, lambda m: (m / "old").write_bytes(old))
    initialized("domain", "rotate", "payroll")

    def retired_while_mounted(m: Path) -> None:
        (m / "kept").write_bytes(kept)  # epoch 2: the mount serves generation 2
        with open(m / "old", "r+b") as held:
            assert held.read() == old
            initialized("domain", "retire", "payroll", "--below", "2", "--yes")
            _wait_for_log(log, "generation 3 retires key epochs below 2")
            _refused(lambda: _read_uncached(m / "old"))
            drop_cache(m / "old")
            _refused(lambda: os.pread(held.fileno(), 10, 0))
            _refused(lambda: os.pwrite(held.fileno(), b"forged on", 0))
        assert _read_uncached(m / "kept") == kept
        assert sorted(os.listdir(m)) == ["kept", "old"]

    _through_a_mount(env, cipher, mp, retired_while_mounted, log)
    logged = log.read_text()
    assert "/old" in logged and "key epoch 1 of Domain payroll is retired" in logged


def test_a_mount_moves_to_a_rotation_made_while_it_serves(  # type: ignore[no-untyped-def]
    tmp_path: Path, initialized
) -> None:
    """``domain rotate`` while a volume is mounted in-process: within a second or so the
    mount serves the new generation, as a mount started then would (DESIGN §2.7: new data
    unreadable to the HSM the rotation was for), instead of keying new files with the old
    epoch until it is remounted. Files of the old epoch read as before, and the volume's
    copy of its Domain now carries the new generation."""
    env, cipher, mp = _real_volume(tmp_path, initialized)
    log = tmp_path / "kmsfs.log"
    before, after = os.urandom(5000), os.urandom(99)

    def rotated_while_mounted(m: Path) -> None:
        (m / "before").write_bytes(before)
        (m / "keys-ahead").write_bytes(b"keys for new files are derived ahead: at epoch 1")
        initialized("domain", "rotate", "payroll")
        _wait_for_log(log, "now serving generation 2: new files get key epoch 2")
        (m / "after").write_bytes(after)
        assert _read_uncached(m / "before") == before

    _through_a_mount(env, cipher, mp, rotated_while_mounted, log)
    assert sorted(epoch for _, epoch in _files(cipher).values()) == [1, 1, 2]
    assert _generation(cipher) == 2

    def read_back(m: Path) -> None:
        assert (m / "after").read_bytes() == after

    _through_a_mount(env, cipher, mp, read_back)


def test_a_mount_that_cannot_open_the_new_generation_yet_serves_as_before_and_retries(  # type: ignore[no-untyped-def]
    tmp_path: Path, initialized
) -> None:
    """A rotation reaches the store (copied from another copy of it) while no HSM of the
    Domain can be opened: the mount says so once and serves as before (a file whose key it
    does not hold reads EIO meanwhile, which any mount would give without an HSM); once the
    HSMs are back it moves to the new generation by itself, within the retry's backoff."""
    env, cipher, mp = _real_volume(tmp_path, initialized)
    log = tmp_path / "kmsfs.log"
    elsewhere = replace(initialized, store=tmp_path / "store-elsewhere")
    shutil.copytree(initialized.store, elsewhere.store, symlinks=True)
    elsewhere("domain", "rotate", "payroll")
    (made,) = {p.name for p in (elsewhere.store / "domains").iterdir()} - {
        p.name for p in (initialized.store / "domains").iterdir()}
    tokens = list((initialized.store / "private" / "tokens").iterdir())
    away = tmp_path / "tokens-away"
    away.mkdir()

    def rotated_while_the_hsms_are_away(m: Path) -> None:
        (m / "before").write_bytes(b"epoch 1")
        for token in tokens:
            shutil.move(token, away / token.name)
        try:
            shutil.copy2(elsewhere.store / "domains" / made, initialized.store / "domains")
            _wait_for_log(log, "cannot serve its generation 2 yet")
            _refused(lambda: _read_uncached(m / "before"))  # its key went with its close
        finally:
            for token in tokens:
                shutil.move(away / token.name, token)
        _wait_for_log(log, "now serving generation 2: new files get key epoch 2")
        (m / "after").write_bytes(b"epoch 2")
        assert _read_uncached(m / "before") == b"epoch 1"

    _through_a_mount(env, cipher, mp, rotated_while_the_hsms_are_away, log)
    assert log.read_text().count("cannot serve its generation 2 yet") == 1
    assert sorted(epoch for _, epoch in _files(cipher).values()) == [1, 2]


def test_a_mount_does_not_move_to_a_rival_of_a_generation_this_machine_mounted(  # type: ignore[no-untyped-def]
    tmp_path: Path, initialized
) -> None:
    """This machine has mounted generation 2 of the Domain (another volume, through another
    copy of the store); a rival generation 2 then reaches the store of a mount still at
    generation 1. The mount does not move to it (found by review): the machine's record
    refuses it as it would refuse a mount started now, the log says so once, and the mount
    keeps serving generation 1, whose keys the real history still has."""
    env, cipher, mp = _real_volume(tmp_path, initialized)
    log = tmp_path / "kmsfs.log"
    copies = {}
    for copy in ("recorded", "rival"):
        copies[copy] = replace(initialized, store=tmp_path / f"store-{copy}")
        shutil.copytree(initialized.store, copies[copy].store, symlinks=True)
        copies[copy]("domain", "rotate", "payroll")
    (rival,) = {p.name for p in (copies["rival"].store / "domains").iterdir()} - {
        p.name for p in (initialized.store / "domains").iterdir()}

    def offered_a_rival(m: Path) -> None:
        (m / "before").write_bytes(b"epoch 1")
        ctx = Context.at(copies["recorded"].store)
        with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as other:
            assert kms.remember_in_use(other) == 2  # another volume's mount, on this machine
        shutil.copy2(copies["rival"].store / "domains" / rival, initialized.store / "domains")
        _wait_for_log(log, "cannot serve its generation 2 yet")
        (m / "after").write_bytes(b"still epoch 1")
        assert _read_uncached(m / "before") == b"epoch 1"

    _through_a_mount(env, cipher, mp, offered_a_rival, log)
    assert "a rival generation?" in log.read_text()
    assert sorted(epoch for _, epoch in _files(cipher).values()) == [1, 1]
    assert _generation(cipher) == 1


def test_a_retirement_that_reaches_the_store_half_copied_is_taken_in_once_whole(  # type: ignore[no-untyped-def]
    tmp_path: Path, initialized
) -> None:
    """The retiring generation is copied into the store the way cp or rsync --inplace copy:
    the file appears half written (the store does not verify: a warning), then is completed
    in place, which leaves domains/ as it was. The mount reads the store again until it
    verifies, so it takes the retirement in then, not at its next remount."""
    env, cipher, mp = _real_volume(tmp_path, initialized)
    log = tmp_path / "kmsfs.log"
    old = os.urandom(99)
    _through_a_mount(env, cipher, mp, lambda m: (m / "old").write_bytes(old))
    initialized("domain", "rotate", "payroll")
    elsewhere = replace(initialized, store=tmp_path / "store-elsewhere")
    shutil.copytree(initialized.store, elsewhere.store, symlinks=True)
    elsewhere("domain", "retire", "payroll", "--below", "2", "--yes")
    (made,) = {p.name for p in (elsewhere.store / "domains").iterdir()} - {
        p.name for p in (initialized.store / "domains").iterdir()}
    document = (elsewhere.store / "domains" / made).read_bytes()

    def copied_while_mounted(m: Path) -> None:
        assert _read_uncached(m / "old") == old
        target = initialized.store / "domains" / made
        target.write_bytes(document[: len(document) // 2])
        _wait_for_log(log, "its documents in the store do not verify now")
        assert _read_uncached(m / "old") == old  # served as before meanwhile
        with open(target, "r+b") as f:  # completed in place: domains/ does not change
            f.write(document)
        _wait_for_log(log, "generation 3 retires key epochs below 2")
        _refused(lambda: _read_uncached(m / "old"))

    _through_a_mount(env, cipher, mp, copied_while_mounted, log)


def test_a_mount_whose_own_epoch_is_retired_moves_on_and_writes_no_file_with_it(  # type: ignore[no-untyped-def]
    tmp_path: Path, initialized
) -> None:
    """A mount opened before a rotation keys new files with epoch 1 and holds keys for the
    next ones derived ahead. When a rotation and a retirement of epoch 1 reach it, it moves
    to the newest generation: the next file first written is keyed with epoch 2, never with a
    key of epoch 1 derived before (a file no mount could read again), and the next mount reads
    it. (It is made, empty, before: the root's names are keyed with epoch 1, and no new name
    is made in a directory of a retired epoch.)"""
    env, cipher, mp = _real_volume(tmp_path, initialized)
    log = tmp_path / "kmsfs.log"

    def retired_while_mounted(m: Path) -> None:
        (m / "first").write_bytes(b"a new file: keys for the next ones are derived ahead")
        (m / "second").write_bytes(b"")  # no header yet: its first write makes one
        initialized("domain", "rotate", "payroll")
        initialized("domain", "retire", "payroll", "--below", "2", "--yes")
        _wait_for_log(log, "retires key epochs below 2")
        _wait_for_log(log, "now serving generation 3: new files get key epoch 2")
        (m / "second").write_bytes(b"written after its epoch was retired")

    _through_a_mount(env, cipher, mp, retired_while_mounted, log)
    assert "new files fail until" not in log.read_text()
    assert sorted(epoch for _, epoch in _files(cipher).values()) == [1, 2]

    def read_back(m: Path) -> None:
        assert (m / "second").read_bytes() == b"written after its epoch was retired"
        _refused(lambda: (m / "first").read_bytes())

    _through_a_mount(env, cipher, mp, read_back)
