"""Write order of the ciphertext tree's own files (docs/format.md), checked step by step.

A power cut cannot be staged in a test, so these tests record the system calls instead: every
directory name must be durable-with-its-IV before it becomes visible, and a sidecar being
rewritten must never be seen half written. Each test fails if a step is dropped or reordered.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsfs.crypto.names import DIRIV_NAME, NameCipher
from kmsfs.fs import names

KEY = bytes(range(32))


class Recorder:
    """Wraps os.fsync and the no-replace rename used by make_dir; logs what they touched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_rename = os.fsync, names.rename_noreplace

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(old: bytes, new: bytes) -> None:
            self.events.append(("rename", os.fsdecode(old)))
            real_rename(old, new)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(names, "rename_noreplace", rename)


def test_new_directory_is_visible_only_with_a_durable_iv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch)
    final = tmp_path / "d"
    names.make_dir(os.fsencode(final), 0o750)
    (rename,) = [e for e in rec.events if e[0] == "rename"]
    temp = rename[1]
    assert os.path.basename(temp).startswith(names.TEMP_PREFIX)
    before = rec.events[: rec.events.index(rename)]
    assert ("fsync", f"{temp}/{DIRIV_NAME}") in before  # the IV's bytes
    assert ("fsync", temp) in before  # the entry naming it
    assert len((final / DIRIV_NAME).read_bytes()) == 16
    assert os.stat(final).st_mode & 0o7777 == 0o750
    assert os.listdir(tmp_path) == ["d"]


def test_new_directory_onto_an_existing_name_fails_and_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(FileExistsError):
        names.make_dir(os.fsencode(tmp_path / "d"), 0o755)
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == []


def test_lost_race_for_the_name_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name appears between the check and the rename: EEXIST, the half-made one is gone."""
    real = names.rename_noreplace

    def rename(old: bytes, new: bytes) -> None:
        os.mkdir(new)  # someone else made it meanwhile
        real(old, new)

    monkeypatch.setattr(names, "rename_noreplace", rename)
    with pytest.raises(FileExistsError):
        names.make_dir(os.fsencode(tmp_path / "d"), 0o755)
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == []


def test_sidecar_rewrite_that_fails_keeps_the_old_one_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating or renaming onto an existing long name rewrites its sidecar: a failure (or a
    crash) in the middle must leave the existing entry's sidecar as it was, never truncated."""
    cipher = NameCipher(KEY)
    disk = cipher.encrypt_to_disk(os.urandom(16), b"n" * 200)
    assert disk.long_content is not None
    dirpath = os.fsencode(tmp_path)
    names.write_sidecar(dirpath, disk)
    sidecar = tmp_path / (disk.name + ".name")
    assert sidecar.read_text() == disk.long_content

    def failing_write(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", failing_write)
    with pytest.raises(OSError):
        names.write_sidecar(dirpath, disk)
    monkeypatch.undo()
    assert sidecar.read_text() == disk.long_content
    assert sorted(os.listdir(tmp_path)) == [sidecar.name]  # no temporary left either


def test_symlink_blob_and_its_new_directory_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsfs.fs import entries

    rec = Recorder(monkeypatch)
    entries._write_blob(os.fsencode(tmp_path), "blob1", "content")
    blob_dir = f"{tmp_path}/{entries.LONGLINK_DIR}"
    assert rec.events == [("fsync", str(tmp_path)), ("fsync", f"{blob_dir}/blob1")]
    entries._write_blob(os.fsencode(tmp_path), "blob2", "more")
    assert rec.events[2:] == [("fsync", f"{blob_dir}/blob2")]  # the directory is there now
    assert Path(blob_dir, "blob2").read_text() == "more"
