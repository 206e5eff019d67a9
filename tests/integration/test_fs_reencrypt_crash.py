"""``kmsfs reencrypt`` killed (SIGKILL) at each of its writes in turn, then run again.

For every N, a fresh copy of one volume is re-keyed by a child process that kills itself just
before the Nth call that changes the ciphertext tree or makes it durable (rename, link, unlink,
fsync, utime, chmod, chown, setxattr, removexattr). A second, whole run must then leave exactly
what one uninterrupted run leaves (docs/format.md, "kmsfs reencrypt", "Crashes"): the same
plaintext, owners, modes, times and xattrs, hard links still one inode (never split in two),
the directories' own times as they were, every file at the new epoch, and nothing left behind
(no temporary name, no saved times). The tree is built through a real mount (stub daemon,
software deriver); the check reads the ciphertext with O_NOATIME, so looking moves nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kmsfs.crypto.content import HEADER_SIZE, FileHeader
from kmsfs.crypto.names import NAMES_KEY_INFO, VolumeNames, is_internal
from kmsfs.crypto.symlinks import LONGLINK_DIR
from kmsfs.fs.epoch_ciphers import links_of_volume, xattrs_of_volume
from kmsfs.fs.files import ContentKeys
from kmsfs.fs.fsck import check_tree
from kmsfs.fs.plainpath import plain_path
from kmsfs.fs.reencrypt import reencrypt_tree
from tests.integration.fs_helpers import (
    Mount,
    SoftDeriver,
    make_volume,
    quiet_walk,
    reencrypt_leftovers,
)

LONG = "L" * 200

_KILL_AT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.integration.fs_helpers import SoftDeriver
    from kmsfs.fs import reencrypt, reencrypt_names, reencrypt_resume, reencrypt_rewrite
    calls = [0]
    def wrap(module, name):
        real = getattr(module, name)
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == {n}:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally
            return real(*args, **kwargs)
        setattr(module, name, call)
    for name in ("rename", "replace", "link", "symlink", "unlink", "fsync", "utime", "fchmod",
                 "fchown", "chown", "setxattr", "removexattr"):
        wrap(os, name)
    for module in (reencrypt, reencrypt_resume, reencrypt_rewrite, reencrypt_names):
        wrap(module, "fsync_dir")
    wrap(reencrypt_names, "rename_noreplace")  # each entry's move to its new name
    reencrypt.reencrypt_tree(Path({volume!r}), SoftDeriver(current_epoch=2))
    """
)


def _build(volume: Path, tmp_path: Path) -> None:
    """Epoch-1 files: one inode with four paths (two in one directory, one under a long name),
    a file alone in a directory, a long name, an empty file, an xattr (on a file and on a
    directory), set times, a short symlink linked twice and a long one (another owner's)."""
    m = Mount(volume, tmp_path / "mnt", tmp_path / "mnt.log", epoch=1).start()
    try:
        p = m.mountpoint
        (p / "d" / "sub").mkdir(parents=True)
        (p / LONG).mkdir()
        (p / "A").write_bytes(os.urandom(10_000))
        for other in ("A2", "d/sub/linked", f"{LONG}/{'B' * 180}"):
            os.link(p / "A", p / other)
        os.setxattr(p / "A", "user.colour", b"blue")
        (p / "d" / "solo").write_bytes(os.urandom(5_000))
        (p / LONG / "x").write_bytes(b"under a long name")
        (p / "empty").write_bytes(b"")
        os.utime(p / "A", ns=(1_000_000_000_000_000_000, 1_500_000_000_000_000_000))
        os.setxattr(p / "d", "user.dir", b"on a directory")
        os.symlink("solo", p / "d" / "ln")
        os.link(p / "d" / "ln", p / "ln2", follow_symlinks=False)  # a hard-linked symlink
        os.symlink("/far/" + "t" * 1500, p / "long-ln")  # its target in a blob
        os.lchown(p / "long-ln", 1234, 5678)
        os.utime(p / "d", ns=(1_100_000_000_000_000_000, 1_200_000_000_000_000_000))
    finally:
        m.stop()


def _plaintext(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        raw = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    if not raw:
        return b""
    header = FileHeader.parse(raw[:HEADER_SIZE])
    cipher = ContentKeys(SoftDeriver(current_epoch=2), key_epochs=True).cipher(header)
    return bytes(cipher.decrypt_blocks(0, raw[HEADER_SIZE:]))


_XATTRS = xattrs_of_volume(SoftDeriver(current_epoch=2))  # values of epoch 1 and 2
_LINKS = links_of_volume(SoftDeriver(current_epoch=2))  # targets of epoch 1 and 2
_NAMES = VolumeNames(lambda e: SoftDeriver(current_epoch=e).derive(NAMES_KEY_INFO, epoch=e))


def _xattrs(path: Path) -> list[tuple[str, bytes]]:
    return sorted((n, _XATTRS.open(os.fsencode(n), os.getxattr(path, n)))
                  for n in os.listxattr(path) if n.startswith("user."))


def _target(volume: Path, path: Path) -> bytes:
    stored = os.readlink(path)
    return _LINKS.decrypt_from_disk(stored, lambda: (volume / LONGLINK_DIR / stored).read_text())


def _state(volume: Path) -> dict[str, Any]:
    """What a plaintext view shows of the tree, read from the ciphertext, by plaintext path (a
    run moves the names to a new key), and the hard links as groups of paths; internal entries
    (IVs, sidecars, the config) aside."""
    entries: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, list[str]] = {}
    for path in (volume, *quiet_walk(volume)):
        if any(map(is_internal, path.relative_to(volume).parts)):
            continue
        rel = "/" if path == volume else plain_path(
            bytes(volume), bytes(path.relative_to(volume)), _NAMES)
        assert rel is not None, path
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        row: tuple[Any, ...] = (kind, st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns,
                                st.st_mtime_ns)
        if kind == stat.S_IFLNK:  # its target read back, not its atime (readlink moves it)
            row = row[:4] + row[5:] + (_target(volume, path),)
            inodes.setdefault(st.st_ino, []).append(rel)
        else:
            row += (_xattrs(path),)
        if kind == stat.S_IFREG:
            row += (st.st_size, _plaintext(path))
            inodes.setdefault(st.st_ino, []).append(rel)
        entries[rel] = row
    return {"entries": entries, "links": sorted(sorted(g) for g in inodes.values())}


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="saving directory times takes root (trusted.*)")
def test_a_run_killed_at_any_write_is_finished_by_the_next(tmp_path: Path) -> None:
    template = make_volume(tmp_path / "template")
    _build(template, tmp_path)
    root = str(Path(__file__).resolve().parents[2])
    rejoined = killed = 0
    for n in range(1, 500):
        volume = tmp_path / f"v{n}"
        subprocess.run(["cp", "-a", str(template), str(volume)], check=True)
        want = _state(volume)
        proc = subprocess.run(
            [sys.executable, "-c", _KILL_AT.format(root=root, n=n, volume=str(volume))],
            capture_output=True, text=True,
        )
        assert proc.returncode in (0, -9), proc.stderr
        summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
        assert summary.failed == [], (n, summary.failed)
        assert summary.epochs_after == {2: 3}, n  # A (four paths), d/solo, LONG/x
        have = _state(volume)
        assert have["links"] == want["links"], (n, "a hard link split")
        for rel, row in want["entries"].items():
            assert have["entries"][rel] == row, (n, rel)
        assert have["entries"].keys() == want["entries"].keys(), n
        assert reencrypt_leftovers(volume) == [], n
        report = check_tree(volume, SoftDeriver(current_epoch=2))
        assert report.clean and report.warnings == [], (n, report.to_json())
        assert report.epochs == {2: 3}, n
        assert report.symlink_epochs == {2: 3} and report.xattr_epochs == {2: 5}, n  # per path
        rejoined += summary.links_rejoined
        killed += proc.returncode == -9
        subprocess.run(["rm", "-rf", str(volume)], check=True)
        if proc.returncode == 0:  # n is past the last write: the run was not killed
            break
    else:
        pytest.fail("the run never finished")
    assert killed > 20 and rejoined >= 3, (killed, rejoined)  # the renames were cut short


def _renames_cut(monkeypatch: pytest.MonkeyPatch, at: int, cut: str) -> list[int]:
    """os.rename cut at its *at*-th call of the run: SIGINT sent to this process just after
    it (Ctrl-C), or EIO instead of it. Returns the count of calls, as a one-item list."""
    real = os.rename
    calls = [0]

    def rename(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == at and cut == "EIO":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(*args, **kwargs)
        if calls[0] == at:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(os, "rename", rename)
    return calls


@pytest.mark.skipif(os.geteuid() != 0, reason="saving directory times takes root (trusted.*)")
@pytest.mark.parametrize("cut", ["SIGINT", "EIO"])
def test_renames_cut_by_ctrl_c_or_an_error_never_split_a_hard_link(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: str
) -> None:
    """A Ctrl-C (or SIGTERM) or an error between two renames of a hard-linked file's paths
    removed the temporary names left: the paths renamed were on the new inode, the others on
    the old one, for good; fsck called it clean, and a rerun re-keyed the old one as a file of
    its own (found by review, with 3,001 links). Now a signal waits for the file's last
    rename, and after an error the names stay for the next run, which joins them."""
    template = make_volume(tmp_path / "template")
    _build(template, tmp_path)
    interrupted = 0
    for at in range(1, 50):
        volume = tmp_path / f"v{at}"
        subprocess.run(["cp", "-a", str(template), str(volume)], check=True)
        want = _state(volume)
        with monkeypatch.context() as patched:
            calls = _renames_cut(patched, at, cut)
            try:
                first = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
            except KeyboardInterrupt:
                first = None
        if calls[0] < at:  # the run made fewer renames: every cut point was tried
            break
        interrupted += 1
        if cut == "SIGINT":  # taken after the file's renames, which all happened
            assert first is None, at
            assert _state(volume)["links"] == want["links"], (at, "split by Ctrl-C")
        else:
            assert first is not None and len(first.failed) == 1, at
        summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
        assert summary.failed == [] and summary.epochs_after == {2: 3}, (at, summary)
        have = _state(volume)
        assert have["links"] == want["links"], (at, "a hard link split")
        assert have["entries"] == want["entries"], at
        assert reencrypt_leftovers(volume) == [], at
        report = check_tree(volume, SoftDeriver(current_epoch=2))
        assert report.clean and report.warnings == [], (at, report.to_json())
        subprocess.run(["rm", "-rf", str(volume)], check=True)
    else:
        pytest.fail("the run never finished")
    assert interrupted >= 4, interrupted  # A's four paths among them
