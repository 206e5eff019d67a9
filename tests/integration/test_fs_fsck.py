"""``kmsfs fsck``: a tree built through a real mount, damaged in each way the format must catch.

The tree is built through the stub daemon (real kmsfs operations, software KeyDeriver) and
checked with :func:`kmsfs.fs.fsck.check_tree` and the same deriver; the last test runs the real
``kmsfs fsck`` command on a volume of a real store (SoftHSM) for the exit codes and ``--json``.
Each damage must be reported exactly (file and block numbers), and nothing else.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kmsfs import exitcodes
from kmsfs.crypto.content import BLOCK_SIZE, CIPHER_BLOCK_SIZE, cipher_offset
from kmsfs.crypto.names import DIRIV_NAME, LONGNAME_SUFFIX, NAMES_KEY_INFO, VolumeNames
from kmsfs.fs.fsck import MAX_BLOCK_PROBLEMS, check_tree
from tests.integration.fs_helpers import SoftDeriver

BS = BLOCK_SIZE
LONG = "L" * 200  # a long name: stored hashed, with a sidecar


def cipher_path(cipherdir: Path, plain: str) -> Path:
    """Ciphertext path of a plaintext path (every directory on the way must have its IV),
    with each directory's names at the epoch its IV names (SoftDeriver's keys)."""
    names = VolumeNames(lambda e: SoftDeriver(current_epoch=e).derive(NAMES_KEY_INFO, epoch=e))
    path = cipherdir
    for part in Path(plain).parts:
        path = path / names.encrypt_to_disk((path / DIRIV_NAME).read_bytes(), part.encode()).name
    return path


def edit(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    data = bytearray(path.read_bytes())
    change(data)
    path.write_bytes(bytes(data))


def build_tree(mount_point: Path) -> None:
    """Every kind of entry the format has, so a clean check covers all of them."""
    m = mount_point
    for name in ("flipped", "cut", "cut_tail", "moved", "transplanted", "donor", "intact"):
        (m / name).write_bytes(os.urandom(3 * BS + 100))
    (m / "empty").write_bytes(b"")
    (m / "d").mkdir()
    (m / "d" / "inner").write_bytes(b"inside d" * 1000)
    (m / "d" / "sub").mkdir()
    (m / "d" / "sub" / "deep").write_bytes(b"deep")
    (m / LONG).write_bytes(b"long name")
    (m / "sidecar-gone").mkdir()
    (m / "sidecar-gone" / LONG).write_bytes(b"loses its sidecar")
    (m / "orphan").mkdir()
    (m / "orphan" / LONG).write_bytes(b"to be removed")
    (m / "victim").write_bytes(b"name to damage")
    os.symlink("intact", m / "short-link")
    os.symlink("x" * 2000, m / "long-link")  # target kept in a kmsfs.longlinks blob
    os.link(m / "intact", m / "hard")
    os.mkfifo(m / "fifo")
    for name in ("xattrs", "xattr-flipped", "xattr-long-cut"):
        (m / name).write_bytes(b"")
    os.setxattr(m / "xattrs", "user.ok", b"fine")
    os.setxattr(m / "xattrs", "user." + "X" * 200, b"long and fine")  # a hashed disk name
    os.setxattr(m / "d" / "sub", "user.on-a-directory", b"fine")
    os.setxattr(m / "xattr-flipped", "user.v", b"value")
    os.setxattr(m / "xattr-long-cut", "user." + "Y" * 200, b"value")


Finding = tuple[str, "str | None", "int | None", str]


def damage(cipher: Path) -> set[Finding]:
    """Apply each damage; return what fsck must report: (kind, plaintext path, block, cipher)."""
    donor = cipher_path(cipher, "donor").read_bytes()

    def swap(d: bytearray) -> None:
        a, b = cipher_offset(0), cipher_offset(1)
        d[a : a + CIPHER_BLOCK_SIZE], d[b : b + CIPHER_BLOCK_SIZE] = (
            d[b : b + CIPHER_BLOCK_SIZE], d[a : a + CIPHER_BLOCK_SIZE])

    edit(cipher_path(cipher, "flipped"), lambda d: d.__setitem__(
        cipher_offset(1) + 40, d[cipher_offset(1) + 40] ^ 1))
    edit(cipher_path(cipher, "cut"), lambda d: d.__delitem__(slice(cipher_offset(2) + 1000, None)))
    edit(cipher_path(cipher, "cut_tail"), lambda d: d.__delitem__(
        slice(cipher_offset(2) + 10, None)))
    edit(cipher_path(cipher, "moved"), swap)
    edit(cipher_path(cipher, "transplanted"), lambda d: d.__setitem__(
        slice(cipher_offset(1), cipher_offset(2)), donor[cipher_offset(1) : cipher_offset(2)]))

    victim = cipher_path(cipher, "victim")
    bad_name = victim.name[:-2] + ("A" if victim.name[-2] != "A" else "B") + victim.name[-1]
    victim.rename(victim.with_name(bad_name))

    d = cipher_path(cipher, "d")
    os.chmod(d / DIRIV_NAME, 0o600)
    os.unlink(d / DIRIV_NAME)

    gone = cipher_path(cipher, "sidecar-gone/" + LONG)
    os.unlink(str(gone) + LONGNAME_SUFFIX)

    orphan = cipher_path(cipher, "orphan/" + LONG)
    os.unlink(orphan)  # its sidecar stays behind: a warning, not damage
    for plain, cut in (("xattr-flipped", None), ("xattr-long-cut", 100)):
        path = cipher_path(cipher, plain)
        (disk,) = os.listxattr(path)
        value = bytearray(os.getxattr(path, disk))
        value[-1] ^= 1
        os.setxattr(path, disk, bytes(value[:cut]))

    def rel(path: Path | str) -> str:
        return str(Path(path).relative_to(cipher))

    def c(plain: str) -> str:
        return rel(cipher_path(cipher, plain))

    return {
        ("block", "/flipped", 1, c("flipped")),
        ("block", "/cut", 2, c("cut")),
        ("size", "/cut_tail", 2, c("cut_tail")),
        ("block", "/moved", 0, c("moved")),
        ("block", "/moved", 1, c("moved")),
        ("block", "/transplanted", 1, c("transplanted")),
        ("name", None, None, rel(victim.with_name(bad_name))),
        ("diriv", "/d", None, rel(d / DIRIV_NAME)),
        ("name", None, None, rel(gone)),
        ("xattr", "/xattr-flipped", None, c("xattr-flipped")),
        ("xattr", "/xattr-long-cut", None, c("xattr-long-cut")),
    }


def test_clean_tree_is_clean(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    build_tree(mount.mountpoint)
    mount.stop()
    report = check_tree(volume, SoftDeriver())
    assert report.problems == [] and report.warnings == [], report.to_json()
    assert report.clean and report.to_json()["clean"] is True
    checked = report.checked
    assert checked["directories"] == 5  # /, d, d/sub, sidecar-gone, orphan
    assert checked["symlinks"] == 2 and checked["other"] == 1 and checked["hard_links"] == 1
    assert checked["long_names"] == 3
    assert checked["xattrs"] == 5
    assert checked["bytes"] == 7 * (3 * BS + 100) + 8000 + 4 + 9 + 17 + 13 + 14


def test_each_damage_is_reported_exactly(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    build_tree(mount.mountpoint)
    mount.stop()
    want = damage(volume)
    report = check_tree(volume, SoftDeriver())
    assert not report.clean
    have = [(p.kind, p.path, p.block, p.cipher_path) for p in report.problems]
    assert len(have) == len(set(have)), "a problem reported twice"
    assert set(have) == want
    for p in report.problems:
        assert p.offset == (None if p.block is None else p.block * BS)
    assert any("sidecar is missing" in p.detail for p in report.problems)
    assert [(w.kind, w.cipher_path.endswith(LONGNAME_SUFFIX)) for w in report.warnings] == [
        ("orphan-sidecar", True)]
    # the data that is intact stays checked: the file under the IV-less directory too
    assert report.checked["bytes"] >= 8000 + 4


def test_garbage_file_is_summarised(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    (mount.mountpoint / "big").write_bytes(os.urandom(40 * BS))
    mount.stop()
    path = cipher_path(volume, "big")
    edit(path, lambda d: d.__setitem__(slice(18, None), os.urandom(len(d) - 18)))
    report = check_tree(volume, SoftDeriver())
    blocks = [p.block for p in report.problems if p.kind == "block"]
    assert blocks == list(range(MAX_BLOCK_PROBLEMS))
    assert [p.kind for p in report.problems][-1] == "blocks"
    assert "24 more blocks" in report.problems[-1].detail


def test_damaged_header_and_missing_blob(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    (mount.mountpoint / "f").write_bytes(b"abc")
    os.symlink("y" * 2000, mount.mountpoint / "ln")
    mount.stop()
    edit(cipher_path(volume, "f"), lambda d: d.__setitem__(slice(2, 18), bytes(16)))
    for blob in (volume / "kmsfs.longlinks").iterdir():
        blob.unlink()
    report = check_tree(volume, SoftDeriver())
    assert sorted((p.kind, p.path) for p in report.problems) == [
        ("header", "/f"), ("symlink", "/ln")]


def test_the_root_directorys_own_xattrs_are_checked(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    os.setxattr(mount.mountpoint, "user.on-the-root", b"value")
    mount.stop()
    report = check_tree(volume, SoftDeriver())
    assert report.clean and report.checked["xattrs"] == 1
    (disk,) = [n for n in os.listxattr(volume) if n.startswith("user.")]
    value = bytearray(os.getxattr(volume, disk))
    value[-1] ^= 1
    os.setxattr(volume, disk, bytes(value))
    report = check_tree(volume, SoftDeriver())
    assert [(p.kind, p.path, p.cipher_path) for p in report.problems] == [("xattr", "/", "/")]
    assert f"extended attribute {disk}" in report.problems[0].detail


def _unread(path: Path) -> None:
    """atime before mtime: under relatime (the default) the next read moves it to now."""
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_600_000_000_000_000_000),
             follow_symlinks=False)


def test_checking_moves_no_atime(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """fsck reads every file and lists every directory; the plaintext atimes are the
    ciphertext ones, and a check is not a read: O_NOATIME (fsck runs as root or the owner)."""
    from kmsfs.fs.fsck import _ciphertext_bytes

    mount = mounter(volume)
    (mount.mountpoint / "d").mkdir()
    (mount.mountpoint / "f").write_bytes(os.urandom(2 * BS))
    (mount.mountpoint / "d" / "g").write_bytes(b"inside")
    mount.stop()
    paths = [volume, *(cipher_path(volume, n) for n in ("d", "f", "d/g"))]
    for path in paths:
        _unread(path)
    assert check_tree(volume, SoftDeriver()).clean
    assert _ciphertext_bytes(volume) > 2 * BS  # the progress bar's count lists them too
    assert [os.stat(p).st_atime_ns for p in paths] == [1_000_000_000_000_000_000] * len(paths)


# --- the real command, real store ---------------------------------------------------------
@pytest.mark.slow
def test_fsck_command_with_real_domain(tmp_path: Path, initialized) -> None:  # type: ignore[no-untyped-def]
    from tests.integration.test_singlefile import kmsfs

    initialized.real_domain()
    store = initialized.store
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    kmsfs(store, "init", str(cipher), "--domain", "payroll")
    mp.mkdir()
    kmsfs(store, "mount", str(cipher), str(mp))
    try:
        (mp / "a").mkdir()
        (mp / "a" / "file").write_bytes(os.urandom(5 * BS))
        (mp / LONG).write_bytes(b"x")
        # Under a live mount, what fsck lists may be renamed away before it reads it, which it
        # reported as damage (exit 8): it refuses, as reencrypt does.
        live = kmsfs(store, "fsck", str(cipher), check=exitcodes.USAGE)
        assert live.stderr.decode() == (  # the mount's source names the volume
            f"kmsfs: error: {cipher}: mounted on {mp}: unmount it first with kmsfs umount "
            "(this job does not run while the volume is mounted, even by a daemon that is "
            "gone)\n"
        )
        assert live.stdout == b""
    finally:
        kmsfs(store, "umount", str(mp))

    proc = kmsfs(store, "fsck", str(cipher))
    assert b": clean (checked" in proc.stdout
    doc = json.loads(kmsfs(store, "fsck", str(cipher), "--json").stdout)
    assert doc["clean"] is True and doc["problems"] == [] and doc["checked"]["blocks"] == 6

    files = [
        p for p in cipher.rglob("*")
        if p.is_file() and p.stat().st_size > 5 * BS and not p.name.startswith("kmsfs.")
    ]
    assert len(files) == 1
    edit(files[0], lambda d: d.__setitem__(cipher_offset(3) + 7, d[cipher_offset(3) + 7] ^ 1))
    proc = kmsfs(store, "fsck", str(cipher), "--json", check=exitcodes.DAMAGED)
    doc = json.loads(proc.stdout)
    assert doc["clean"] is False
    assert doc["problems"] == [{
        "path": "/a/file", "cipher_path": str(files[0].relative_to(cipher)), "kind": "block",
        "block": 3, "offset": 3 * BS, "detail": "fails authentication"}]
    proc = kmsfs(store, "fsck", str(cipher), check=exitcodes.DAMAGED)
    assert b"damaged: /a/file: block 3 (plaintext offset 12288) fails authentication" in proc.stdout


def test_a_write_cut_short_by_a_killed_daemon_is_reported(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """A live journal record: fsck says so (and changes nothing); the next mount repairs."""
    from kmsfs.fs.journal import JOURNAL_NAME, WriteJournal

    mount = mounter(volume)
    (mount.mountpoint / "f").write_bytes(os.urandom(3 * BS))
    mount.stop()
    path = cipher_path(volume, "f")
    header = path.read_bytes()[:18]
    log = WriteJournal(os.fsencode(volume))
    log.begin(log.relative(os.fsencode(path)), header, cipher_offset(1), bytes(100))
    log.close()  # never marked done: the daemon died
    before = (volume / JOURNAL_NAME).read_bytes()
    report = check_tree(volume, SoftDeriver())
    assert [w.kind for w in report.warnings] == ["interrupted-write"]
    assert "1 write(s) a killed daemon may have cut short" in report.warnings[0].detail
    assert (volume / JOURNAL_NAME).read_bytes() == before


def test_a_fifo_swapped_in_after_the_look_never_blocks_fsck(  # type: ignore[no-untyped-def]
    volume: Path, mounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever can write the ciphertext could put a FIFO where fsck just saw a file: opening
    it for reading would block forever. fsck reports the path and goes on."""
    mount = mounter(volume)
    (mount.mountpoint / "f").write_bytes(b"data")
    (mount.mountpoint / "g").write_bytes(b"more")
    mount.stop()
    target = cipher_path(volume, "f")
    real_lstat = os.lstat

    def lstat_then_swap(path, *args, **kw):  # type: ignore[no-untyped-def]
        st = real_lstat(path, *args, **kw)
        if os.fsdecode(path) == str(target) and not target.is_fifo():
            os.rename(target, volume / "moved")
            os.mkfifo(target)
        return st

    monkeypatch.setattr(os, "lstat", lstat_then_swap)
    report = check_tree(volume, SoftDeriver())
    assert [(p.kind, p.path) for p in report.problems] == [("unreadable", "/f")]
    assert "not a regular file" in report.problems[0].detail
    assert report.checked["files"] == 2


def test_a_file_the_user_may_not_read_is_a_warning_not_damage(mounter) -> None:  # type: ignore[no-untyped-def]
    """fsck run by the volume's owner (not root) on a healthy 0200 file or 0300 directory: it
    cannot read them, which says nothing about the ciphertext. Reported as damage (exit 8),
    it sent a user looking for corruption that is not there."""
    import subprocess
    import sys
    import tempfile

    from tests.integration.fs_helpers import make_volume

    with tempfile.TemporaryDirectory(prefix="kmsfs-fsck-") as base:
        os.chmod(base, 0o755)
        volume = make_volume(Path(base) / "cipher")
        mount = mounter(volume)
        (mount.mountpoint / "locked").write_bytes(b"healthy" * 1000)
        (mount.mountpoint / "closed").mkdir()
        (mount.mountpoint / "closed" / "inside").write_bytes(b"also healthy")
        (mount.mountpoint / "locked").chmod(0o200)
        (mount.mountpoint / "closed").chmod(0o300)
        mount.stop()
        for path in (volume, *volume.rglob("*")):
            os.chown(path, 65534, 65534, follow_symlinks=False)
        script = (
            "import json, sys; from pathlib import Path\n"
            "sys.path.insert(0, 'tests/integration')\n"
            "from fs_helpers import SoftDeriver\n"
            "from kmsfs.fs.fsck import check_tree\n"
            f"r = check_tree(Path({str(volume)!r}), SoftDeriver())\n"
            "print(json.dumps({'clean': r.clean, 'warnings': [(w.kind, w.path) "
            "for w in r.warnings]}))\n"
        )
        proc = subprocess.run(
            ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
             sys.executable, "-c", script],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["clean"] is True
    unchecked = sorted(tuple(w) for w in report["warnings"] if w[0] == "unchecked")
    assert unchecked == [("unchecked", "/closed"), ("unchecked", "/locked")]
