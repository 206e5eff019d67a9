"""A symlink planted in the ciphertext directory at the name of kmsfs's long-symlink blob
directory (docs/threat-model.md §1, "Symlinks planted in the ciphertext directory"): the daemon
(root, usually) wrote, read and removed blobs wherever it led. It now opens that directory
without following a symlink: long symlink targets fail with EIO and a log line, the mount goes
on, and nothing outside the volume is touched."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from kmsfs.crypto.symlinks import LONGLINK_DIR
from kmsfs.fs.fsck import check_tree
from tests.integration.fs_helpers import SoftDeriver, make_volume

LONG_TARGET = "t" * 1500  # encrypted, longer than a symlink's stored target: it gets a blob


def test_a_new_long_symlink_is_refused_not_written_outside(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    outside.mkdir()
    volume = make_volume(tmp_path / "cipher")
    (volume / LONGLINK_DIR).symlink_to(outside)
    mount = mounter(volume)
    with pytest.raises(OSError) as exc:
        os.symlink(LONG_TARGET, mount.mountpoint / "long")
    assert exc.value.errno == errno.EIO
    assert os.listdir(outside) == []
    assert f"{LONGLINK_DIR} is not a directory" in mount.log()
    os.symlink("short", mount.mountpoint / "short")  # the rest of the mount goes on
    assert os.readlink(mount.mountpoint / "short") == "short"


def _blobs_moved_behind_a_symlink(tmp_path: Path, mounter) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """A volume with one long symlink, ``/long``, whose blob directory was then moved out of
    it and a symlink to it planted in its place: (the volume, where the blobs are now)."""
    volume = make_volume(tmp_path / "cipher")
    mount = mounter(volume)
    os.symlink(LONG_TARGET, mount.mountpoint / "long")
    assert os.readlink(mount.mountpoint / "long") == LONG_TARGET
    mount.stop()
    outside = tmp_path / "outside"
    shutil.move(volume / LONGLINK_DIR, outside)  # the blobs, now outside, a symlink in place
    (volume / LONGLINK_DIR).symlink_to(outside)
    return volume, outside


def test_an_existing_long_symlink_is_not_read_or_removed_through_a_planted_one(
    tmp_path: Path, mounter  # type: ignore[no-untyped-def]
) -> None:
    volume, outside = _blobs_moved_behind_a_symlink(tmp_path, mounter)
    blobs = sorted(os.listdir(outside))
    assert blobs
    mount = mounter(volume, name="again")
    with pytest.raises(OSError) as exc:
        os.readlink(mount.mountpoint / "long")
    assert exc.value.errno == errno.EIO
    os.unlink(mount.mountpoint / "long")
    assert sorted(os.listdir(outside)) == blobs  # not removed through the symlink


def test_fsck_neither_reads_nor_lists_blobs_through_a_planted_symlink(
    tmp_path: Path, mounter  # type: ignore[no-untyped-def]
) -> None:
    volume, outside = _blobs_moved_behind_a_symlink(tmp_path, mounter)
    (outside / "unrelated-secret-name").write_text("x")  # a name fsck must not list
    report = check_tree(volume, SoftDeriver())
    assert [(p.kind, p.path) for p in report.problems] == [("symlink", "/long")]
    assert ("leftover", LONGLINK_DIR) in [(w.kind, w.cipher_path) for w in report.warnings]
    assert "unrelated-secret-name" not in str(report.to_json())
