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
from kmsfs.fs import dirs, names

KEY = bytes(range(32))


class Recorder:
    """Wraps os.fsync and the no-replace rename of kmsfs.fs.dirs; logs what they touched."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[str, str]] = []
        real_fsync, real_rename = os.fsync, dirs.rename_noreplace

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real_fsync(fd)

        def rename(old: bytes, new: bytes) -> None:
            self.events.append(("rename", os.fsdecode(old)))
            real_rename(old, new)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(dirs, "rename_noreplace", rename)


def test_new_directory_is_visible_only_with_a_durable_iv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rec = Recorder(monkeypatch)
    final = tmp_path / "d"
    dirs.make_dir(os.fsencode(final), 0o750, 1)
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
        dirs.make_dir(os.fsencode(tmp_path / "d"), 0o755, 1)
    assert os.listdir(tmp_path) == ["d"] and os.listdir(tmp_path / "d") == []


def test_lost_race_for_the_name_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name appears between the check and the rename: EEXIST, the half-made one is gone."""
    real = dirs.rename_noreplace

    def rename(old: bytes, new: bytes) -> None:
        os.mkdir(new)  # someone else made it meanwhile
        real(old, new)

    monkeypatch.setattr(dirs, "rename_noreplace", rename)
    with pytest.raises(FileExistsError):
        dirs.make_dir(os.fsencode(tmp_path / "d"), 0o755, 1)
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
    from kmsfs.fs import longlinks

    rec = Recorder(monkeypatch)
    longlinks.write_blob(os.fsencode(tmp_path), "blob1", "content")
    blob_dir = f"{tmp_path}/{longlinks.LONGLINK_DIR}"

    def bytes_then_entry(events: list[tuple[str, str]]) -> bool:
        """The blob's bytes (under a temporary name, before it gets its own), then its entry."""
        (kind1, first), (kind2, second) = events
        temp = os.path.relpath(first, blob_dir)
        return temp.startswith(names.TEMP_PREFIX) and (kind1, kind2, second) == (
            "fsync", "fsync", blob_dir
        )

    assert rec.events[0] == ("fsync", str(tmp_path))  # the new blob directory's entry
    assert bytes_then_entry(rec.events[1:3]) and len(rec.events) == 3
    longlinks.write_blob(os.fsencode(tmp_path), "blob2", "more")
    assert bytes_then_entry(rec.events[3:5]) and len(rec.events) == 5  # the directory is there
    assert Path(blob_dir, "blob2").read_text() == "more"


def test_new_directory_is_owned_before_it_is_visible(tmp_path: Path) -> None:
    final = tmp_path / "d"
    seen: list[tuple[str, bool]] = []

    def prepare(fd: int) -> None:
        seen.append((os.readlink(f"/proc/self/fd/{fd}"), final.exists()))

    dirs.make_dir(os.fsencode(final), 0o755, 1, prepare=prepare)
    ((temp, visible),) = seen
    assert os.path.basename(temp).startswith(names.TEMP_PREFIX) and not visible


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")
    }


def _dir_with_leftovers(tmp_path: Path) -> Path:
    d = tmp_path / "d"
    dirs.make_dir(os.fsencode(d), 0o755, 1)
    (d / ("kmsfs.longname." + "A" * 43 + ".name")).write_text("orphan sidecar")
    (d / "kmsfs.tmp.0123456789abcdef").write_bytes(b"temporary file")
    half = d / "kmsfs.tmp.fedcba9876543210"  # what a crash in a removal leaves
    half.mkdir()
    (half / "kmsfs.tmp.aaaaaaaaaaaaaaaa").write_bytes(b"")
    return d


def test_removal_hides_the_directory_before_its_iv_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rmdir: a crash at any step must never leave a visible directory without its IV."""
    d = _dir_with_leftovers(tmp_path)
    events: list[tuple[str, str]] = []
    real_unlink, real_rename = os.unlink, dirs.rename_noreplace

    def unlink(path: bytes) -> None:
        events.append(("unlink", os.fsdecode(path)))
        real_unlink(path)

    def rename(old: bytes, new: bytes) -> None:
        events.append(("rename", os.fsdecode(old)))
        real_rename(old, new)

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(dirs, "rename_noreplace", rename)
    dirs.remove_empty_dir(os.fsencode(d), 1)
    assert events[0] == ("rename", str(d))
    assert [e for e in events if e[1].endswith(DIRIV_NAME)]  # the IV went, after the rename
    assert os.listdir(tmp_path) == []


def test_removal_that_fails_puts_the_directory_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With an IV: a new one if its own went (it holds no name an IV could have encrypted)."""
    d = tmp_path / "d"
    dirs.make_dir(os.fsencode(d), 0o755, 1)
    (d / "kmsfs.tmp.0123456789abcdef").write_bytes(b"temporary file")

    def busy(path: bytes) -> None:
        raise OSError(16, "Device or resource busy")

    monkeypatch.setattr(os, "rmdir", busy)
    with pytest.raises(OSError) as info:
        dirs.remove_empty_dir(os.fsencode(d), 1)
    monkeypatch.undo()
    assert info.value.errno == 16
    assert os.listdir(tmp_path) == ["d"]
    iv = (d / DIRIV_NAME).read_bytes()
    assert len(iv) == 16 and iv != bytes(16)


@pytest.mark.parametrize("extra", ["a-real-entry", "kmsfs.tmp.0000000000000000/real"])
def test_a_directory_with_more_than_internal_names_is_not_empty(tmp_path: Path, extra: str) -> None:
    """Not even inside a hidden directory: kmsfs never leaves a real entry in one."""
    d = _dir_with_leftovers(tmp_path)
    (d / extra).parent.mkdir(exist_ok=True)
    (d / extra).write_bytes(b"data")
    before = _tree(tmp_path)
    with pytest.raises(OSError) as info:
        dirs.remove_empty_dir(os.fsencode(d), 1)
    assert info.value.errno == 39  # ENOTEMPTY
    assert _tree(tmp_path) == before


def test_sidecar_is_never_written_into_a_missing_directory(tmp_path: Path) -> None:
    disk = NameCipher(KEY).encrypt_to_disk(os.urandom(16), b"n" * 200)
    with pytest.raises(FileNotFoundError):
        names.write_sidecar(os.fsencode(tmp_path / "gone"), disk)
    assert os.listdir(tmp_path) == []
