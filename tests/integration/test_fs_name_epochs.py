"""Names keyed with the Domain's mk epochs (docs/format.md, "Directory IV", "Key epochs").

An HSM removed before a rotation still computes epoch 1's name key: a directory made after the
rotation must key its names with the new epoch, and ``kmsfs reencrypt`` must move the older
ones there, so that the removed HSM reads no name of the volume (DESIGN §2.7). Real mounts
(stub daemon, software deriver: ``SoftDeriver(current_epoch=N)`` is a Domain rotated N - 1
times, and ``current_epoch=1`` the removed HSM's view).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kmsfs.crypto.names import DIRIV_NAME, epoch_of
from kmsfs.errors import UsageError
from kmsfs.fs import reencrypt
from kmsfs.fs.fsck import check_tree
from kmsfs.fs.reencrypt import reencrypt_tree
from kmsfs.fs.reencrypt_names import MARKER_NAME, check_not_rekeying
from kmsfs.fs.reencrypt_walk import REKEY_NAME
from tests.integration.fs_helpers import (
    Mount,
    RetiringDeriver,
    SoftDeriver,
    make_volume,
    reencrypt_leftovers,
    renameat2,
)
from tests.integration.test_fs_fsck import cipher_path

LONG = "N" * 150  # a long name: hashed entry and sidecar


def _mount(volume: Path, tmp_path: Path, epoch: int, name: str = "mnt") -> Mount:
    return Mount(volume, tmp_path / name, tmp_path / f"{name}.log", epoch=epoch).start()


def _epoch_of_dir(path: Path) -> int:
    return epoch_of((path / DIRIV_NAME).read_bytes())


def _tree(mountpoint: Path) -> dict[str, bytes | None]:
    """Every plaintext path under the mount: a file's bytes, None for a directory."""
    out: dict[str, bytes | None] = {}
    for here, dirs, files in os.walk(mountpoint):
        for d in dirs:
            out[os.path.relpath(os.path.join(here, d), mountpoint)] = None
        for f in files:
            out[os.path.relpath(os.path.join(here, f), mountpoint)] = Path(here, f).read_bytes()
    return out


def test_a_directory_made_after_a_rotation_keys_its_names_with_the_new_epoch(
    tmp_path: Path,
) -> None:
    volume = make_volume(tmp_path / "cipher")
    m = _mount(volume, tmp_path, epoch=1)
    try:  # the pool of directories made ahead fills at epoch 1 meanwhile
        (m.mountpoint / "old").mkdir()
        (m.mountpoint / "old" / "a").write_bytes(b"written at epoch 1")
    finally:
        m.stop()
    m = _mount(volume, tmp_path, epoch=2)
    try:
        (m.mountpoint / "new").mkdir()
        (m.mountpoint / "new" / "secret-plan.txt").write_bytes(b"written at epoch 2")
        (m.mountpoint / "new" / LONG).mkdir()
        (m.mountpoint / "old" / "c").write_bytes(b"a new name in an old directory")
    finally:
        m.stop()
    new = cipher_path(volume, "new")
    assert _epoch_of_dir(new) == 2 and _epoch_of_dir(cipher_path(volume, f"new/{LONG}")) == 2
    assert _epoch_of_dir(volume) == _epoch_of_dir(cipher_path(volume, "old")) == 1

    removed = check_tree(volume, SoftDeriver(current_epoch=1))  # the removed HSM's view
    assert {p.kind for p in removed.problems} == {"epoch"}
    assert sorted(p.cipher_path for p in removed.problems if p.cipher_path.endswith(DIRIV_NAME)
                  ) == sorted(str(d.relative_to(volume) / DIRIV_NAME)
                              for d in (new, cipher_path(volume, f"new/{LONG}")))
    below_new = [p for p in removed.problems if p.cipher_path.startswith(new.name + "/")
                 and p.cipher_path != f"{new.name}/{DIRIV_NAME}"]  # "new" is an epoch-1 name
    assert below_new and all(p.path is None for p in below_new)  # no name in "new" decrypts
    assert all("secret-plan" not in str(p) and LONG not in str(p) for p in removed.problems)

    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean and report.name_epochs == {1: 2, 2: 2}
    m = _mount(volume, tmp_path, epoch=2, name="again")
    try:
        assert sorted(os.listdir(m.mountpoint / "new")) == [LONG, "secret-plan.txt"]
        assert (m.mountpoint / "old" / "c").read_bytes() == b"a new name in an old directory"
    finally:
        m.stop()


_KILL_AT_MOVE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.integration.fs_helpers import SoftDeriver
    from kmsfs.fs import reencrypt, reencrypt_names
    real = reencrypt_names.rename_noreplace
    moves = [0]
    def rename_noreplace(old, new):
        moves[0] += 1
        if moves[0] == {n}:  # in the middle of a directory's names: no cleanup runs
            os.kill(os.getpid(), signal.SIGKILL)
        return real(old, new)
    reencrypt_names.rename_noreplace = rename_noreplace
    reencrypt.reencrypt_tree(Path({volume!r}), SoftDeriver(current_epoch=2))
    """
)


def _kill_at_move(volume: Path, n: int) -> None:
    """Run kmsfs reencrypt (to epoch 2) in a child killed at its *n*-th entry rename."""
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_AT_MOVE.format(
            root=str(Path(__file__).resolve().parents[2]), n=n, volume=str(volume))],
        capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr


def test_a_run_killed_while_moving_names_keeps_every_name_and_the_mount_waits_for_the_next(
    tmp_path: Path,
) -> None:
    volume = make_volume(tmp_path / "cipher")
    m = _mount(volume, tmp_path, epoch=1)
    try:
        p = m.mountpoint
        (p / "d").mkdir()
        for name in ("one", "two", LONG, "three"):
            (p / "d" / name).write_bytes(name.encode() * 100)
        (p / "top").write_bytes(b"top")
        want = _tree(p)
    finally:
        m.stop()
    _kill_at_move(volume, 2)
    d = cipher_path(volume, "d")  # the root's names have not moved yet (deepest first)
    assert (volume / MARKER_NAME).exists() and (d / REKEY_NAME).exists()

    with pytest.raises(UsageError, match="cut short while moving names"):
        check_not_rekeying(volume)
    refused = Mount(volume, tmp_path / "refused", tmp_path / "refused.log", epoch=2)
    try:
        with pytest.raises(RuntimeError, match="cut short while moving names"):
            refused.start()  # the daemon's own check
    finally:
        refused.stop()  # (a no-op unless it mounted)
    assert not os.path.ismount(tmp_path / "refused")

    half = check_tree(volume, SoftDeriver(current_epoch=2))
    assert half.clean, half.problems  # every name reads, under one key or the other
    assert half.checked["names"] == len(want) and {w.kind for w in half.warnings} >= {
        "interrupted-reencrypt"}

    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert summary.failed == [] and summary.name_epochs_after == {2: 2}
    assert not (volume / MARKER_NAME).exists() and reencrypt_leftovers(volume) == []
    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean and report.warnings == [] and report.name_epochs == {2: 2}
    m = _mount(volume, tmp_path, epoch=2, name="after")
    try:
        assert _tree(m.mountpoint) == want
    finally:
        m.stop()


def test_a_name_that_does_not_decrypt_is_left_and_reported_and_the_others_move(
    tmp_path: Path,
) -> None:
    """A damaged entry (or one another program put there) was unreadable before the run and
    stays as it is; the directory's other names move, and nothing blocks the mount."""
    volume = make_volume(tmp_path / "cipher")
    m = _mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "good").write_bytes(b"fine")
    finally:
        m.stop()
    (volume / "not-a-kmsfs-name").write_bytes(b"planted")
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    names = [f for f in summary.failed if "does not decrypt" in f.detail]
    assert [(f.cipher_path, f.path) for f in names] == [("not-a-kmsfs-name", None)]
    assert all(f.cipher_path == "not-a-kmsfs-name" for f in summary.failed)  # and its header
    assert summary.name_epochs_after == {2: 1} and not (volume / MARKER_NAME).exists()
    assert (volume / "not-a-kmsfs-name").read_bytes() == b"planted"
    m = _mount(volume, tmp_path, epoch=2)
    try:
        assert os.listdir(m.mountpoint) == ["good"]
    finally:
        m.stop()


def _half_moved(volume: Path, tmp_path: Path, files: int = 6) -> dict[str, bytes | None]:
    """A volume whose root a killed run left half moved (two entries renamed); its tree."""
    m = _mount(volume, tmp_path, epoch=1)
    try:
        for i in range(files):
            (m.mountpoint / f"file{i}").write_bytes(b"%d" % i)
        (m.mountpoint / LONG).write_bytes(b"long")
        want = _tree(m.mountpoint)
    finally:
        m.stop()
    _kill_at_move(volume, 3)
    assert (volume / REKEY_NAME).exists() and (volume / MARKER_NAME).exists()
    return want


def _refuse_rename(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """The names pass's *n*-th entry rename fails (EPERM, as for an immutable entry)."""
    from kmsfs.fs import reencrypt_names

    real = reencrypt_names.rename_noreplace
    calls = [0]

    def refuse(old: bytes, new: bytes) -> None:
        calls[0] += 1
        if calls[0] == n:
            raise PermissionError(1, "Operation not permitted")
        real(old, new)

    monkeypatch.setattr(reencrypt_names, "rename_noreplace", refuse)


def _read_back(volume: Path, tmp_path: Path, name: str) -> dict[str, bytes | None]:
    m = _mount(volume, tmp_path, epoch=2, name=name)
    try:
        return _tree(m.mountpoint)
    finally:
        m.stop()


def test_a_rerun_that_fails_in_a_half_moved_directory_leaves_it_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: a rerun whose rename failed "moved back" only its own renames and
    dropped kmsfs.diriv.rekey and the marker; the names the killed run had moved were then
    read under the old key, so never (a mount showed the directory without them)."""

    volume = make_volume(tmp_path / "cipher")
    want = _half_moved(volume, tmp_path)
    _refuse_rename(monkeypatch, 2)
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert [f.cipher_path for f in summary.failed] == ["."]
    assert "Operation not permitted (renaming" in summary.failed[0].detail
    assert (volume / REKEY_NAME).exists() and (volume / MARKER_NAME).exists()  # still half
    assert check_tree(volume, SoftDeriver(current_epoch=2)).clean  # and every name reads
    monkeypatch.undo()
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert summary.failed == [] and not (volume / MARKER_NAME).exists()
    assert _read_back(volume, tmp_path, "after") == want


def test_a_sidecar_that_cannot_be_read_stops_its_directory_and_strands_no_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: an EIO reading a long name's sidecar counted as a name that does not
    decrypt, and the directory moved without it: the name, fine, was lost for good. Now the
    directory goes back to its old epoch whole, and the next run moves it."""
    from kmsfs.fs import names

    volume = make_volume(tmp_path / "cipher")
    m = _mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "short").write_bytes(b"s")
        (m.mountpoint / LONG).write_bytes(b"long")
        want = _tree(m.mountpoint)
    finally:
        m.stop()
    real = names.read_internal_file

    def eio_on_sidecars(path, limit, dir_fd=None):  # type: ignore[no-untyped-def]
        if bytes(path).endswith(b".name"):
            raise OSError(5, "Input/output error")
        return real(path, limit, dir_fd)

    monkeypatch.setattr(names, "read_internal_file", eio_on_sidecars)  # (names.sidecar_of)
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert [(f.cipher_path, "Input/output error" in f.detail) for f in summary.failed] == [
        (".", True)]
    assert _epoch_of_dir(volume) == 1 and not (volume / REKEY_NAME).exists()
    assert not (volume / MARKER_NAME).exists()  # whole again, at epoch 1: the mount may serve
    assert _read_back(volume, tmp_path, "between") == want
    monkeypatch.undo()
    assert reencrypt_tree(volume, SoftDeriver(current_epoch=2)).failed == []
    assert _epoch_of_dir(volume) == 2 and _read_back(volume, tmp_path, "after") == want


def test_a_planted_rekey_file_never_moves_names_under_another_directory_s_iv(
    tmp_path: Path,
) -> None:
    """Found by review: a kmsfs.diriv.rekey was trusted as it was. A writer of the ciphertext
    who copied directory A's IV there (at the new epoch) had B's names moved under A's IV,
    after which an entry moved from A into B read there as genuine (names are bound to their
    directory: DESIGN §2.4). Only the IV's own next epoch counts; anything else is removed."""
    from kmsfs.crypto.names import with_epoch

    volume = make_volume(tmp_path / "cipher")
    m = _mount(volume, tmp_path, epoch=1)
    try:
        for d in ("A", "B", "C"):
            (m.mountpoint / d).mkdir()
        (m.mountpoint / "A" / "secret-in-A").write_bytes(b"A's")
        (m.mountpoint / "B" / "b").write_bytes(b"B's")
        want = _tree(m.mountpoint)
    finally:
        m.stop()
    a, b, c = (cipher_path(volume, d) for d in ("A", "B", "C"))
    iv_a = (a / DIRIV_NAME).read_bytes()
    (b / REKEY_NAME).write_bytes(with_epoch(iv_a, 2))  # A's IV, planted in B
    (c / REKEY_NAME).write_bytes(b"garbage")  # and one that does not parse
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert summary.failed == [] and summary.name_epochs_after == {2: 4}
    a, b, c = (cipher_path(volume, d) for d in ("A", "B", "C"))  # their names moved too
    assert (a / DIRIV_NAME).read_bytes() != (b / DIRIV_NAME).read_bytes()
    assert not (b / REKEY_NAME).exists() and not (c / REKEY_NAME).exists()
    assert not (volume / MARKER_NAME).exists()
    moved_in = cipher_path(volume, "A/secret-in-A")
    os.rename(moved_in, b / moved_in.name)  # an entry of A moved into B by hand
    tree = _read_back(volume, tmp_path, "after")
    assert "B/secret-in-A" not in tree  # does not decrypt in B: not shown
    assert {k: v for k, v in tree.items() if k != "A/secret-in-A"} == {
        k: v for k, v in want.items() if k != "A/secret-in-A"}


def test_a_directory_swapped_since_the_walk_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The names pass comes after every file, long after the walk: a directory swapped for a
    symlink meanwhile (to another volume's directory, say) must not have its IV replaced or
    its sidecars dropped by a run as root. Review finding; the file pass had the same window."""
    volume = make_volume(tmp_path / "cipher")
    other = make_volume(tmp_path / "other")
    m = _mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "d").mkdir()
        (m.mountpoint / "d" / "f").write_bytes(b"f")
    finally:
        m.stop()
    d = cipher_path(volume, "d")
    others_iv = (other / DIRIV_NAME).read_bytes()
    real = reencrypt.NameRekeyer.run

    def swap_then_run(self, dirs):  # type: ignore[no-untyped-def]
        os.rename(d, tmp_path / "moved-away")
        os.symlink(other, d)
        os.utime(d, ns=(5, 5), follow_symlinks=False)
        return real(self, dirs)

    monkeypatch.setattr(reencrypt.NameRekeyer, "run", swap_then_run)
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert [(f.cipher_path, "not the directory the walk found" in f.detail)
            for f in summary.failed] == [(cipher_path(volume, "d").name, True)]  # its new name
    assert (other / DIRIV_NAME).read_bytes() == others_iv and not (other / REKEY_NAME).exists()
    swapped = cipher_path(volume, "d")
    assert swapped.is_symlink() and os.lstat(swapped).st_mtime_ns == 5  # its times: untouched


def test_a_mount_whose_epoch_is_retired_makes_no_directory_with_it(tmp_path: Path) -> None:
    """Found by re-review: a mount still serving a retired epoch (its move to the newer
    generation failing, say) refused new files but made new directories keyed with it, whose
    names the HSM the retirement is for reads. Now mkdir is EIO too, with a log line. (Every
    directory such a mount can read is keyed with an epoch it serves, retired too: no name
    is made in one, FIFOs included; see the rollback test below.)"""
    volume = make_volume(tmp_path / "cipher")
    m = Mount(volume, tmp_path / "mnt", tmp_path / "mnt.log", epoch=1, retired_below=2).start()
    try:
        with pytest.raises(OSError) as refused:
            (m.mountpoint / "new").mkdir()
        assert refused.value.errno == 5  # EIO
        assert os.listdir(m.mountpoint) == []
        assert "integrity: / (its names are keyed with mk epoch 1, which is retired" in m.log()
        with pytest.raises(OSError) as refused:
            os.mkfifo(m.mountpoint / "fifo")
        assert refused.value.errno == 5 and os.listdir(m.mountpoint) == []
    finally:
        m.stop()


def test_a_directory_that_fails_below_a_moved_parent_keeps_its_times(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by re-review: a directory whose names could not move kept its saved times (and
    their xattr) until the end of the run, by a path its parent's move had made stale."""
    from kmsfs.fs.reencrypt_resume import TIMES_XATTR

    volume = make_volume(tmp_path / "cipher")
    m = _mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "a" / "b").mkdir(parents=True)
        (m.mountpoint / "a" / "b" / "f").write_bytes(b"f")
    finally:
        m.stop()
    b = cipher_path(volume, "a/b")
    before = os.lstat(b)
    _refuse_rename(monkeypatch, 1)  # b's, the deepest: first
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert len(summary.failed) == 1 and summary.name_epochs_after == {1: 1, 2: 2}
    b = cipher_path(volume, "a/b")  # its parent's names moved: a new path
    after = os.lstat(b)
    assert after.st_ino == before.st_ino and _epoch_of_dir(b) == 1
    assert (after.st_atime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_mtime_ns)
    assert TIMES_XATTR not in os.listxattr(b)


def test_a_name_written_again_while_half_moved_keeps_both_entries(tmp_path: Path) -> None:
    """Found by re-review: with kmsfs.rekeying removed by hand, a mount hid a name the killed
    run had moved, a user wrote it again, and every later run failed on it (EEXIST), the
    marker for ever. Now the second one shows as NAME.kmsfs-conflict-1, reported."""
    volume = make_volume(tmp_path / "cipher")
    want = _half_moved(volume, tmp_path)
    (volume / MARKER_NAME).unlink()  # what the docs say not to do
    m = _mount(volume, tmp_path, epoch=2, name="between")
    try:
        hidden = sorted(set(want) - set(_tree(m.mountpoint)))
        assert hidden  # the names the killed run moved: not shown under the old key
        (m.mountpoint / hidden[0]).write_bytes(b"written again")
        (m.mountpoint / f"{hidden[0]}.kmsfs-conflict-1").write_bytes(b"a user's own")
    finally:
        m.stop()
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert [(f.path, f.detail) for f in summary.failed] == [(
        f"/{hidden[0]}.kmsfs-conflict-2",
        f"two entries were named {hidden[0]!r} (one written while names were half moved): "
        f"the second shows as '{hidden[0]}.kmsfs-conflict-2'")]
    assert not (volume / MARKER_NAME).exists()
    assert _read_back(volume, tmp_path, "after") == {
        **want, f"{hidden[0]}.kmsfs-conflict-2": b"written again",
        f"{hidden[0]}.kmsfs-conflict-1": b"a user's own"}  # its name taken by nobody


def test_fsck_does_not_take_a_planted_rekey_file_for_a_half_moved_directory(
    tmp_path: Path,
) -> None:
    """Found by re-review: fsck read names under any kmsfs.diriv.rekey it found, so an entry
    of one directory put into another, with the first one's IV planted as its .rekey, passed
    as clean (the mount and reencrypt never take it)."""
    volume = make_volume(tmp_path / "cipher")
    m = _mount(volume, tmp_path, epoch=1)
    try:
        (m.mountpoint / "B").mkdir()
    finally:
        m.stop()
    m = _mount(volume, tmp_path, epoch=2, name="later")
    try:
        (m.mountpoint / "A").mkdir()  # at epoch 2
        (m.mountpoint / "A" / "from-A").write_bytes(b"A's")
    finally:
        m.stop()
    a, b = cipher_path(volume, "A"), cipher_path(volume, "B")
    entry = cipher_path(volume, "A/from-A")
    os.rename(entry, b / entry.name)
    (b / REKEY_NAME).write_bytes((a / DIRIV_NAME).read_bytes())
    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert not report.clean
    assert sorted(p.kind for p in report.problems) == ["name", "rekey"]


def test_a_rekey_file_that_cannot_be_read_keeps_the_volume_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kmsfs.diriv.rekey that cannot be read (EIO) may be a run's, with names moved to it:
    it is neither removed nor passed over, and the marker stays until a run can read it."""
    from kmsfs.fs import reencrypt_names

    volume = make_volume(tmp_path / "cipher")
    want = _half_moved(volume, tmp_path)
    real = reencrypt_names.read_internal_file

    def eio_on_rekey(path, limit, dir_fd=None):  # type: ignore[no-untyped-def]
        if bytes(path).endswith(REKEY_NAME.encode()):
            raise OSError(5, "Input/output error")
        return real(path, limit, dir_fd)

    monkeypatch.setattr(reencrypt_names, "read_internal_file", eio_on_rekey)
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert [f.cipher_path for f in summary.failed] == ["."]
    assert (volume / REKEY_NAME).exists() and (volume / MARKER_NAME).exists()
    monkeypatch.undo()
    assert reencrypt_tree(volume, SoftDeriver(current_epoch=2)).failed == []
    assert _read_back(volume, tmp_path, "after") == want


def test_no_new_name_in_a_directory_rolled_back_to_a_retired_epoch(tmp_path: Path) -> None:
    """Found by review: a writer of the ciphertext drops the 2 epoch bytes of a directory's
    kmsfs.diriv (no key needed: the IV stays), and the mount encrypted every new name there
    under the retired epoch's name key, which the removed HSM reads (and fsck called the
    volume clean). Now no name is made in a directory whose names are keyed with a retired
    epoch (create, mkdir, mknod, symlink, link, rename into it: EIO, with a log line naming it
    and what to run); what is there still lists, reads, goes and moves away (a directory a run
    missed before the retirement holds files written since); fsck calls it damage, and
    kmsfs reencrypt lists it as it moves it. A directory at the current epoch is unaffected."""
    volume = make_volume(tmp_path / "cipher")
    m = _mount(volume, tmp_path, epoch=1, name="first")
    try:
        (m.mountpoint / "old").mkdir()  # the directory a run missed: names at epoch 1
        (m.mountpoint / "old" / "a").write_bytes(b"gone soon")
    finally:
        m.stop()
    m = _mount(volume, tmp_path, epoch=2, name="second")
    try:
        (m.mountpoint / "old" / "b").write_bytes(b"written at epoch 2")
        for d in ("projects", "current"):
            (m.mountpoint / d).mkdir()
        (m.mountpoint / "current" / "c").write_bytes(b"in a directory of epoch 2")
    finally:
        m.stop()
    projects = cipher_path(volume, "projects")
    iv = (projects / DIRIV_NAME).read_bytes()
    assert epoch_of(iv) == 2
    os.chmod(projects / DIRIV_NAME, 0o640)
    (projects / DIRIV_NAME).write_bytes(iv[2:])  # the rollback: epoch 1, the same IV
    before = sorted(os.listdir(projects))

    m = Mount(volume, tmp_path / "mnt", tmp_path / "mnt.log", epoch=2, retired_below=2).start()
    try:
        mnt = m.mountpoint
        refused = [
            lambda: (mnt / "projects" / "acquisition.xlsx").write_bytes(b"x"),
            lambda: (mnt / "projects" / LONG).write_bytes(b"x"),  # a sidecar, too
            lambda: (mnt / "projects" / "sub").mkdir(),
            lambda: os.mkfifo(mnt / "projects" / "fifo"),
            lambda: os.symlink("t", mnt / "projects" / "link"),
            lambda: os.link(mnt / "current" / "c", mnt / "projects" / "hard"),
            lambda: os.rename(mnt / "current" / "c", mnt / "projects" / "c"),
            lambda: (mnt / "old" / "new").write_bytes(b"x"),  # the missed one: no new name
        ]
        for make in refused:
            with pytest.raises(OSError) as err:
                make()
            assert err.value.errno == 5  # EIO
        assert sorted(os.listdir(projects)) == before  # nothing under the retired key
        assert os.listdir(mnt / "projects") == []
        assert (mnt / "current" / "c").read_bytes() == b"in a directory of epoch 2"
        logged = m.log()
        assert ("integrity: /projects (its names are keyed with mk epoch 1, which is retired "
                "(epochs below 2") in logged
        assert "until 'kmsfs reencrypt' moves its names to the current epoch" in logged
        # what is there: listed, read, removed, and moved away
        assert sorted(os.listdir(mnt / "old")) == ["a", "b"]
        assert (mnt / "old" / "b").read_bytes() == b"written at epoch 2"
        os.unlink(mnt / "old" / "a")
        renameat2(mnt / "old" / "b", mnt / "current" / "c", 2)  # RENAME_EXCHANGE: no new name
        assert (mnt / "old" / "b").read_bytes() == b"in a directory of epoch 2"
        os.rename(mnt / "old" / "b", mnt / "current" / "b")
        assert sorted(os.listdir(mnt / "current")) == ["b", "c"]
        (mnt / "current" / "d").write_bytes(b"new")  # a directory at the current epoch
        (mnt / "current" / "e").mkdir()
        os.rmdir(mnt / "current" / "e")
    finally:
        m.stop()
    assert _epoch_of_dir(cipher_path(volume, "current")) == 2

    deriver = RetiringDeriver(current_epoch=2, retired_below=2)
    report = check_tree(volume, deriver)
    assert not report.clean
    retired = {p.path: p for p in report.problems if p.kind == "epoch"}
    assert sorted(retired) == ["/", "/old", "/projects"]  # the root: made at epoch 1, too
    assert retired["/projects"].cipher_path == f"{projects.name}/{DIRIV_NAME}"
    assert "which is retired (epochs below 2)" in retired["/projects"].detail
    assert "or one rolled back" in retired["/projects"].detail
    summary = reencrypt_tree(volume, deriver)
    assert sorted(summary.retired_dirs) == ["/", "/old", "/projects"]
    assert summary.to_json()["retired_dirs"] == summary.retired_dirs
    assert not [p for p in check_tree(volume, deriver).problems if p.kind == "epoch"]
