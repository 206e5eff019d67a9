"""What a crash may leave in the ciphertext tree stays hidden and never blocks the user.

A kill -9 (or a power cut) can stop the daemon between two steps: a long-name sidecar whose
entry was never made or already removed, a ``kmsfs.tmp.*`` file, a half-made directory (the
IV written, the final rename not done). docs/format.md calls these harmless: hidden from
listings, reported by fsck, and removed by rmdir, so a directory that lists as empty can be
removed (and renamed over) as on ext4.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmsfs.crypto.names import DIRIV_NAME
from tests.integration.fs_helpers import ciphertext_paths

ORPHAN_SIDECAR = "kmsfs.longname." + "A" * 43 + ".name"


def _temporaries(volume: Path) -> list[Path]:
    """``kmsfs.tmp.*`` names in the tree, not counting the directories being made ahead."""
    paths = ciphertext_paths(volume)
    return [Path(p) for p in paths if os.path.basename(p).startswith("kmsfs.tmp.")]


def _only_dir(cipher: Path) -> Path:
    """The ciphertext directory of the only plaintext entry in *cipher*."""
    (entry,) = [p for p in cipher.iterdir() if not p.name.startswith("kmsfs.")]
    return entry


def _leave_crash_leftovers(cdir: Path) -> None:
    (cdir / ORPHAN_SIDECAR).write_text("stale")
    (cdir / "kmsfs.tmp.0123456789abcdef").write_bytes(b"half a sidecar")
    half_made = cdir / "kmsfs.tmp.fedcba9876543210"
    half_made.mkdir()
    (half_made / DIRIV_NAME).write_bytes(os.urandom(16))


def test_rmdir_of_a_dir_holding_only_leftovers(mnt, volume: Path) -> None:  # type: ignore[no-untyped-def]
    m = mnt.mountpoint
    (m / "d").mkdir()
    cdir = _only_dir(volume)
    _leave_crash_leftovers(cdir)
    assert os.listdir(m / "d") == []
    os.rmdir(m / "d")
    assert not cdir.exists() and os.listdir(m) == []


def test_rename_over_a_dir_holding_only_leftovers(mnt, volume: Path) -> None:  # type: ignore[no-untyped-def]
    m = mnt.mountpoint
    (m / "target").mkdir()
    cdir = _only_dir(volume)
    _leave_crash_leftovers(cdir)
    (m / "src").mkdir()
    (m / "src" / "f").write_bytes(b"kept")
    os.rename(m / "src", m / "target")
    assert (m / "target" / "f").read_bytes() == b"kept"
    assert os.listdir(m) == ["target"]


def test_a_real_entry_still_means_not_empty(mnt, volume: Path) -> None:  # type: ignore[no-untyped-def]
    m = mnt.mountpoint
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(b"x")
    cdir = _only_dir(volume)
    _leave_crash_leftovers(cdir)
    with pytest.raises(OSError) as info:
        os.rmdir(m / "d")
    assert info.value.errno == errno.ENOTEMPTY
    assert (m / "d" / "f").read_bytes() == b"x" and (cdir / ORPHAN_SIDECAR).exists()


def test_a_temporary_directory_with_content_is_not_a_leftover(mnt, volume: Path) -> None:  # type: ignore[no-untyped-def]
    """kmsfs never leaves more than an IV in a half-made directory: anything else is kept."""
    m = mnt.mountpoint
    (m / "d").mkdir()
    odd = _only_dir(volume) / "kmsfs.tmp.0000000000000000"
    odd.mkdir()
    (odd / DIRIV_NAME).write_bytes(os.urandom(16))
    (odd / "something").write_bytes(b"not ours to delete")
    with pytest.raises(OSError) as info:
        os.rmdir(m / "d")
    assert info.value.errno == errno.ENOTEMPTY
    assert (odd / "something").exists() and (odd / DIRIV_NAME).exists()
    assert os.listdir(m / "d") == []


def test_mkdir_leaves_no_temporary_and_a_whole_iv(mnt, volume: Path) -> None:  # type: ignore[no-untyped-def]
    m = mnt.mountpoint
    (m / "d").mkdir(mode=0o751)
    (m / "d" / "e").mkdir(mode=0o700)
    (m / "d" / "e" / "f").write_bytes(b"x")
    assert not _temporaries(volume)
    tree = [Path(p) for p in ciphertext_paths(volume)]  # not the ones made ahead
    ivs = [p for p in tree if p.name == DIRIV_NAME]
    assert len(ivs) == 3  # the root's and the two new ones
    assert all(len(iv.read_bytes()) == 16 and iv.read_bytes() != bytes(16) for iv in ivs)
    assert os.stat(m / "d").st_mode & 0o7777 == 0o751
    assert os.stat(m / "d" / "e").st_mode & 0o7777 == 0o700
    os.rename(m / "d" / "e", m / "e2")  # a directory keeps its IV through a rename
    assert (m / "e2" / "f").read_bytes() == b"x"


def test_an_empty_directory_that_lost_its_iv_can_be_removed(mnt, volume: Path) -> None:  # type: ignore[no-untyped-def]
    """What an older kmsfs could leave after a crash in rmdir: it still goes with rmdir."""
    m = mnt.mountpoint
    (m / "d").mkdir()
    (_only_dir(volume) / DIRIV_NAME).unlink()
    os.rmdir(m / "d")
    assert os.listdir(m) == [] and not _temporaries(volume)


_RENAME_THEN_DIE = """
import os, sys, types
import pyfuse3, trio
sys.path.insert(0, sys.argv[2])
from kmsfs.fs import dirs, entries
from kmsfs.fs.entries import KmsfsOps
from tests.integration.fs_helpers import SoftDeriver

def die_after(real):
    def step(*args):
        real(*args)
        os._exit(9)  # SIGKILL's effect: nothing after this runs, no undo, no cleanup
    return step

ops = KmsfsOps(sys.argv[1], SoftDeriver())
ctx = types.SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0)
entries.renameat2 = die_after(entries.renameat2)
dirs.rename_noreplace = die_after(dirs.rename_noreplace)
trio.run(ops.rename, pyfuse3.ROOT_INODE, b"src", pyfuse3.ROOT_INODE, b"dst", 0, ctx)
"""


def test_a_crash_in_a_rename_onto_an_empty_directory_never_loses_the_new_name(  # type: ignore[no-untyped-def]
    volume: Path, mounter
) -> None:
    """rename(2) onto an empty directory never leaves the new name missing, not even across a
    crash (ext4 keeps that). kmsfs hid the empty one first, then renamed: a crash in between
    left neither. Now the two are exchanged in one step; the worst a crash leaves is the empty
    one visible under the old name."""
    mount = mounter(volume)
    (mount.mountpoint / "src").mkdir()
    (mount.mountpoint / "src" / "f").write_bytes(b"kept")
    (mount.mountpoint / "dst").mkdir()
    mount.stop()
    repo = str(Path(__file__).resolve().parents[2])
    died = subprocess.run([sys.executable, "-c", _RENAME_THEN_DIE, str(volume), repo],
                          capture_output=True, timeout=60)
    assert died.returncode == 9, died.stderr
    mount.start()
    assert (mount.mountpoint / "dst" / "f").read_bytes() == b"kept"
    assert sorted(os.listdir(mount.mountpoint)) in (["dst"], ["dst", "src"])
    if (mount.mountpoint / "src").exists():
        assert os.listdir(mount.mountpoint / "src") == []
        os.rmdir(mount.mountpoint / "src")  # and it goes like any empty directory


def test_a_mount_removes_the_temporary_file_of_a_blob_a_crash_left(  # type: ignore[no-untyped-def]
    mnt, volume: Path
) -> None:
    """A daemon killed while it wrote a long symlink's blob leaves ``kmsfs.tmp.*`` in
    ``kmsfs.longlinks``; one a crash, for good, reported only by fsck (storage review). The
    next read-write mount removes such files, and nothing else there: the blobs symlinks name,
    a directory of that name, and a symlink of that name (not followed) stay."""
    from kmsfs.fs.fsck import check_tree
    from tests.integration.fs_helpers import SoftDeriver

    target = "t/" * 1500  # a target too long for a symlink of its own: kept as a blob
    os.symlink(target, mnt.mountpoint / "long")
    mnt.stop()
    blobs = volume / "kmsfs.longlinks"
    kept = sorted(os.listdir(blobs))
    assert kept
    (blobs / "kmsfs.tmp.a1b2c3").write_bytes(b"half a blob")
    (blobs / "kmsfs.tmp.dir").mkdir()
    outside = volume.parent / "outside"
    outside.write_bytes(b"not the volume's")
    os.symlink(outside, blobs / "kmsfs.tmp.link")
    assert any(p.kind == "orphan-blob" for p in check_tree(volume, SoftDeriver()).warnings)
    mnt.start()
    assert os.readlink(mnt.mountpoint / "long") == target
    assert sorted(os.listdir(blobs)) == sorted([*kept, "kmsfs.tmp.dir", "kmsfs.tmp.link"])
    assert outside.read_bytes() == b"not the volume's"
    assert "removed kmsfs.longlinks/kmsfs.tmp.a1b2c3, a blob a crash left half" in mnt.log()
    assert "leftovers not removed" not in mnt.log()
