"""Symlink targets and xattr values keyed with the Domain's mk epochs (docs/format.md, "Key
epochs", flag ``SymlinkXattrEpochs``).

An HSM removed before a rotation still computes epoch 1's keys: a symlink made, or an xattr
value set, after the rotation must be sealed with the new epoch, and ``kmsfs reencrypt`` must
seal the older ones again with it, so that the removed HSM reads none of them (DESIGN §2.7).
Real mounts (stub daemon, software deriver: ``SoftDeriver(current_epoch=N)`` is a Domain rotated
N - 1 times, and ``current_epoch=1`` the removed HSM's view).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import pytest

from kmsfs.crypto.encoding import b64url_decode
from kmsfs.crypto.epoch_nonces import EpochUnavailable
from kmsfs.crypto.symlinks import LONGLINK_DIR, SYMLINK_KEY_INFO, SymlinkCipher, is_longlink
from kmsfs.crypto.xattrs import USER_PREFIX, XATTR_KEY_INFO, XattrCipher
from kmsfs.errors import UsageError
from kmsfs.fs import config as volconfig
from kmsfs.fs.epoch_ciphers import links_of_volume, xattrs_of_volume
from kmsfs.fs.fsck import check_tree
from kmsfs.fs.reencrypt import reencrypt_tree
from kmsfs.fs.reencrypt_values import ValueRekeyer
from kmsfs.fs.volume import create_volume
from tests.integration.fs_helpers import (
    Mount,
    RetiringDeriver,
    SoftDeriver,
    make_volume,
    reencrypt_leftovers,
    sample_config,
)
from tests.integration.test_fs_fsck import cipher_path

LONG_TARGET = "/far/" + "t" * 1500  # kept in a blob (kmsfs.longlinks/)
LONG_XATTR = b"user." + b"x" * 200  # a hashed disk name (LongXattrNames)


def _mount(volume: Path, tmp_path: Path, epoch: int, name: str = "mnt", **kw: int) -> Mount:
    return Mount(volume, tmp_path / name, tmp_path / f"{name}.log", epoch=epoch, **kw).start()


def _stored_target(volume: Path, plain: str) -> str:
    """A ciphertext symlink's encoded target (a long one's from its blob)."""
    stored = os.readlink(cipher_path(volume, plain))
    return (volume / LONGLINK_DIR / stored).read_text() if is_longlink(stored) else stored


def _nonce_epoch(encoded: str) -> int:
    return int.from_bytes(b64url_decode(encoded)[:2], "big")


def _user_xattrs(path: Path) -> dict[bytes, bytes]:
    """The stored (ciphertext) user.* xattrs of a ciphertext path."""
    return {os.fsencode(n): os.getxattr(path, n) for n in os.listxattr(path)
            if os.fsencode(n).startswith(USER_PREFIX)}


def _epoch1_tree(volume: Path, tmp_path: Path) -> None:
    """Symlinks (short, long, hard-linked, another owner's) and xattrs (on a file, a read-only
    file, a directory, a long name) written before any rotation."""
    m = _mount(volume, tmp_path, epoch=1, name="first")
    try:
        mnt = m.mountpoint
        (mnt / "f").write_bytes(b"data")
        (mnt / "ro").write_bytes(b"read-only")
        (mnt / "d").mkdir()
        os.symlink("old-target", mnt / "short")
        os.symlink(LONG_TARGET, mnt / "d" / "long")
        os.symlink("shared-target", mnt / "linked")
        os.link(mnt / "linked", mnt / "d" / "linked2", follow_symlinks=False)
        os.lchown(mnt / "short", 1234, 5678)
        os.utime(mnt / "short", ns=(1_000_000_000, 2_000_000_000), follow_symlinks=False)
        os.setxattr(mnt / "f", b"user.colour", b"epoch-1 value")
        os.setxattr(mnt / "f", LONG_XATTR, b"long-named value")
        os.setxattr(mnt / "ro", b"user.tag", b"on a read-only file")
        os.chmod(mnt / "ro", 0o444)
        os.setxattr(mnt / "d", b"user.dir", b"on a directory")
    finally:
        m.stop()


def _made_before_the_flag(volume: Path) -> None:
    """Take SymlinkXattrEpochs out of the volume's config: a volume made before it."""
    config = volconfig.load(volume)
    volconfig.save(volume, dataclasses.replace(config, feature_flags=tuple(
        f for f in config.feature_flags if f != volconfig.FLAG_SYMLINK_XATTR_EPOCHS)))


def test_symlinks_and_xattr_values_made_after_a_rotation_are_sealed_with_the_new_epoch(
    tmp_path: Path,
) -> None:
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    m = _mount(volume, tmp_path, epoch=2)
    try:
        os.symlink("secret/plan/at/epoch-2", m.mountpoint / "new")
        os.symlink(LONG_TARGET + "-2", m.mountpoint / "new-long")
        os.setxattr(m.mountpoint / "f", b"user.new", b"secret epoch-2 value")
        os.setxattr(m.mountpoint / "d", b"user.dir", b"replaced at epoch 2")
        # the plaintext size still comes from the ciphertext length (no readlink)
        assert os.lstat(m.mountpoint / "new").st_size == len("secret/plan/at/epoch-2")
    finally:
        m.stop()
    assert _nonce_epoch(_stored_target(volume, "new")) == 2
    assert _nonce_epoch(_stored_target(volume, "new-long")) == 2

    removed = _mount(volume, tmp_path, epoch=1, name="removed")  # the removed HSM's mount
    try:
        mnt = removed.mountpoint
        assert os.readlink(mnt / "short") == "old-target"
        assert os.readlink(mnt / "d" / "long") == LONG_TARGET
        assert os.getxattr(mnt / "f", b"user.colour") == b"epoch-1 value"
        for reach in (lambda: os.readlink(mnt / "new"), lambda: os.readlink(mnt / "new-long"),
                      lambda: os.getxattr(mnt / "f", b"user.new"),
                      lambda: os.getxattr(mnt / "d", b"user.dir")):
            with pytest.raises(OSError) as err:
                reach()
            assert err.value.errno == errno.EIO
        assert "sealed with mk epoch 2" in removed.log()
    finally:
        removed.stop()
    view = check_tree(volume, SoftDeriver(current_epoch=1))
    assert {p.kind for p in view.problems} == {"epoch"} and len(view.problems) == 4
    assert all("secret" not in str(p) for p in view.problems)

    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean
    assert report.symlink_epochs == {1: 4, 2: 2}
    assert report.xattr_epochs == {1: 3, 2: 2}
    m = _mount(volume, tmp_path, epoch=2, name="again")
    try:
        assert os.readlink(m.mountpoint / "new") == "secret/plan/at/epoch-2"
        assert os.readlink(m.mountpoint / "new-long") == LONG_TARGET + "-2"
        assert os.getxattr(m.mountpoint / "f", b"user.new") == b"secret epoch-2 value"
        assert os.getxattr(m.mountpoint / "d", b"user.dir") == b"replaced at epoch 2"
    finally:
        m.stop()


def test_reencrypt_seals_every_symlink_target_and_xattr_value_again_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    old_blobs = sorted(os.listdir(volume / LONGLINK_DIR))
    short_before = os.lstat(cipher_path(volume, "short"))
    # what crashes left beside the blob: one no symlink names, a half-written one, and a file
    # that is no blob (fsck's to report, not the run's to remove)
    leftovers = ("kmsfs.longlink." + "A" * 43, "kmsfs.tmp.half-written", "not-a-blob")
    for name in leftovers:
        (volume / LONGLINK_DIR / name).write_text("x")

    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert not summary.failed
    assert summary.blobs_removed == 3  # the replaced one, the orphan and the half-written one
    (volume / LONGLINK_DIR / "not-a-blob").unlink()
    assert summary.symlinks_rewritten == 3  # short, long, and the hard-linked one once
    assert summary.symlink_epochs_before == {1: 4} and summary.symlink_epochs_after == {2: 4}
    assert summary.xattrs_resealed == 4
    assert summary.xattr_epochs_before == {1: 4} and summary.xattr_epochs_after == {2: 4}
    assert reencrypt_leftovers(volume) == []

    short = cipher_path(volume, "short")
    st = os.lstat(short)  # before anything below reads it (readlink moves atime)
    assert (st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns) == (
        1234, 5678, 1_000_000_000, 2_000_000_000)
    assert st.st_ino != short_before.st_ino  # a new symlink

    new_blobs = sorted(os.listdir(volume / LONGLINK_DIR))
    assert len(new_blobs) == 1 and new_blobs != old_blobs  # the old blob is gone
    removed_links = links_of_volume(SoftDeriver(current_epoch=1))
    removed_xattrs = xattrs_of_volume(SoftDeriver(current_epoch=1))
    for plain in ("short", "d/long", "linked", "d/linked2"):
        with pytest.raises(EpochUnavailable):  # what the removed HSM can no longer read
            removed_links.open_from_disk(os.readlink(cipher_path(volume, plain)),
                                         lambda: (volume / LONGLINK_DIR / new_blobs[0]).read_text())
    for plain in ("f", "ro", "d"):
        for disk, stored in _user_xattrs(cipher_path(volume, plain)).items():
            with pytest.raises(EpochUnavailable):
                removed_xattrs.open(disk, stored)

    a, b = os.lstat(cipher_path(volume, "linked")), os.lstat(cipher_path(volume, "d/linked2"))
    assert a.st_ino == b.st_ino and a.st_nlink == 2  # still one inode, linked twice

    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean, report.problems
    assert report.symlink_epochs == {2: 4} and report.xattr_epochs == {2: 4}
    m = _mount(volume, tmp_path, epoch=2)
    try:
        mnt = m.mountpoint
        assert os.readlink(mnt / "short") == "old-target"
        assert os.readlink(mnt / "d" / "long") == LONG_TARGET
        assert os.readlink(mnt / "d" / "linked2") == "shared-target"
        assert os.getxattr(mnt / "f", b"user.colour") == b"epoch-1 value"
        assert os.getxattr(mnt / "f", LONG_XATTR) == b"long-named value"
        assert sorted(os.listxattr(mnt / "f")) == sorted(["user.colour", LONG_XATTR.decode()])
        assert os.getxattr(mnt / "ro", b"user.tag") == b"on a read-only file"
        assert os.stat(mnt / "ro").st_mode & 0o777 == 0o444
        assert os.getxattr(mnt / "d", b"user.dir") == b"on a directory"
    finally:
        m.stop()

    again = reencrypt_tree(volume, SoftDeriver(current_epoch=2))  # idempotent
    assert (again.symlinks_rewritten, again.xattrs_resealed) == (0, 0)
    assert again.symlink_epochs_after == {2: 4} and not again.failed


def test_a_damaged_value_is_reported_and_the_others_still_move(tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    f = cipher_path(volume, "f")
    colour = next(d for d in _user_xattrs(f) if not d.startswith(b"user.l."))
    stored = bytearray(os.getxattr(f, colour))
    stored[-1] ^= 1
    os.setxattr(f, colour, bytes(stored))
    short = cipher_path(volume, "short")
    target = os.readlink(short)
    os.unlink(short)
    os.symlink(target[:-4] + ("AAAA" if target[-4:] != "AAAA" else "BBBB"), short)

    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert sorted(f.path for f in summary.failed) == ["/f", "/short"]
    assert all("authentication failed" in f.detail for f in summary.failed)
    assert summary.symlinks_rewritten == 2 and summary.xattrs_resealed == 3
    assert summary.xattr_epochs_after == {2: 3}  # the damaged one is counted nowhere
    assert os.getxattr(cipher_path(volume, "f"), colour) == bytes(stored)  # left as it was


def test_a_mount_whose_epoch_is_retired_makes_no_symlink_and_sets_no_xattr(
    tmp_path: Path,
) -> None:
    volume = make_volume(tmp_path / "cipher")
    m = _mount(volume, tmp_path, epoch=1, name="before")
    try:  # no name is made in a directory of a retired epoch (the root's, here) either
        (m.mountpoint / "f").write_bytes(b"")
    finally:
        m.stop()
    m = _mount(volume, tmp_path, epoch=1, retired_below=2)
    try:
        with pytest.raises(OSError) as err:
            os.symlink("t", m.mountpoint / "l")
        assert err.value.errno == errno.EIO and not os.path.lexists(m.mountpoint / "l")
        with pytest.raises(OSError) as err:
            os.setxattr(m.mountpoint / "f", b"user.a", b"v")
        assert err.value.errno == errno.EIO
        assert "key epoch 1 is retired" in m.log()
    finally:
        m.stop()


def test_targets_and_values_of_a_retired_epoch_are_refused_and_new_ones_work(
    tmp_path: Path,
) -> None:
    """Whoever still holds a retired epoch's mk (the removed HSM) could seal a symlink target
    or an xattr value under it: once the epoch is retired, the mount refuses them (EIO) as it
    refuses a file's contents, fsck calls them damage of kind epoch, and kmsfs reencrypt does
    not move them (it would serve what that HSM forged)."""
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    m = _mount(volume, tmp_path, epoch=2, name="rotated")
    try:  # a directory whose names are keyed with epoch 2 (the others' are retired below)
        (m.mountpoint / "new").mkdir()
    finally:
        m.stop()
    m = _mount(volume, tmp_path, epoch=2, retired_below=2)
    try:
        mnt = m.mountpoint
        assert os.lstat(mnt / "short").st_size == len("old-target")  # stat needs no key
        for reach in (lambda: os.readlink(mnt / "short"), lambda: os.readlink(mnt / "d" / "long"),
                      lambda: os.getxattr(mnt / "f", b"user.colour")):
            with pytest.raises(OSError) as err:
                reach()
            assert err.value.errno == errno.EIO
        assert "sealed with mk epoch 1, which is retired" in m.log()
        assert "reencrypt --upgrade" not in m.log()  # a volume with SymlinkXattrEpochs
        os.symlink("fresh", mnt / "new" / "fresh")
        os.setxattr(mnt / "d", b"user.fresh", b"at epoch 2")
        assert os.readlink(mnt / "new" / "fresh") == "fresh"
        assert os.getxattr(mnt / "d", b"user.fresh") == b"at epoch 2"
    finally:
        m.stop()
    report = check_tree(volume, SoftDeriver(current_epoch=2, retired_below=2))
    kinds = {(p.kind, p.path) for p in report.problems if "sealed with mk epoch 1" in p.detail}
    assert kinds == {("epoch", "/short"), ("epoch", "/d/long"), ("epoch", "/linked"),
                     ("epoch", "/d/linked2"), ("epoch", "/f"), ("epoch", "/ro"), ("epoch", "/d")}
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2, retired_below=2))
    assert (summary.symlinks_rewritten, summary.xattrs_resealed) == (0, 0)
    assert sum("which is retired" in f.detail for f in summary.failed) == 7


def test_an_upgrade_moves_what_a_volume_made_before_the_flag_has_at_a_retired_epoch(
    tmp_path: Path,
) -> None:
    """A volume made before SymlinkXattrEpochs had every symlink target and xattr value at
    epoch 1, which its Domain may have retired since: they read EIO (the mount says why and
    what to run), and kmsfs reencrypt --upgrade, the one run that reads them, moves them."""
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    _made_before_the_flag(volume)
    m = _mount(volume, tmp_path, epoch=2, retired_below=2)
    try:
        with pytest.raises(OSError):
            os.readlink(m.mountpoint / "short")
        assert "until 'kmsfs reencrypt --upgrade' moves them" in m.log()
    finally:
        m.stop()
    summary = reencrypt_tree(volume, RetiringDeriver(current_epoch=2, retired_below=2),
                             upgrade=True)
    assert summary.flags_added == [volconfig.FLAG_SYMLINK_XATTR_EPOCHS]
    assert (summary.symlinks_rewritten, summary.xattrs_resealed) == (3, 4)
    # each listed, so that one the holder of epoch 1's mk planted can be seen
    assert sorted((m.path, m.what, m.epoch) for m in summary.retired_values) == [
        ("/d", "xattr user.dir value", 1), ("/d/linked2", "symlink target", 1),
        ("/d/long", "symlink target", 1), ("/f", "xattr user.colour value", 1),
        ("/f", f"xattr {LONG_XATTR.decode()} value", 1), ("/linked", "symlink target", 1),
        ("/ro", "xattr user.tag value", 1), ("/short", "symlink target", 1)]
    listed = summary.to_json()["retired_values"]
    assert {"path": "/short", "cipher_path": str(cipher_path(volume, "short").relative_to(
        volume)), "what": "symlink target", "epoch": 1} in listed  # its name moved: the new one
    m = _mount(volume, tmp_path, epoch=2, name="after", retired_below=2)
    try:
        assert os.readlink(m.mountpoint / "short") == "old-target"
        assert os.getxattr(m.mountpoint / "f", b"user.colour") == b"epoch-1 value"
    finally:
        m.stop()
    report = check_tree(volume, SoftDeriver(current_epoch=2, retired_below=2))
    assert report.symlink_epochs == {2: 4} and report.xattr_epochs == {2: 4}


def test_an_upgrade_of_a_volume_with_the_flag_moves_no_forged_value(tmp_path: Path) -> None:
    """Found by review: --upgrade read targets and values of retired epochs on every volume,
    so one forged by the holder of a retired mk (which the mount and a plain run refuse) was
    sealed again at the current epoch, genuine from then on, and reported nowhere. On a volume
    that has SymlinkXattrEpochs, none can be genuine: --upgrade refuses them as a plain run
    does (listed in failed), and the mount still reads them EIO."""
    volume = tmp_path / "cipher"
    create_volume(volume, sample_config(), epoch=2)  # every flag, names at epoch 2
    m = _mount(volume, tmp_path, epoch=2, retired_below=2)
    try:
        (m.mountpoint / "report.txt").write_bytes(b"hello")
        os.setxattr(m.mountpoint / "report.txt", b"user.approved", b"no")
        os.symlink("/srv/shared/tools/deploy.sh", m.mountpoint / "deploy")
    finally:
        m.stop()
    mk1 = SoftDeriver(current_epoch=1)  # the removed HSM: epoch 1's mk, retired
    xattrs = XattrCipher(mk1.derive(XATTR_KEY_INFO, epoch=1))
    links = SymlinkCipher(mk1.derive(SYMLINK_KEY_INFO, epoch=1))
    disk = xattrs.disk_name(b"user.approved")
    os.setxattr(cipher_path(volume, "report.txt"), disk, xattrs.seal(disk, b"yes"))
    deploy = cipher_path(volume, "deploy")
    deploy.unlink()
    os.symlink(links.encrypt(b"/tmp/evil/deploy.sh"), deploy)

    summary = reencrypt_tree(volume, RetiringDeriver(current_epoch=2, retired_below=2),
                             upgrade=True)
    assert summary.flags_added == [] and summary.retired_values == []
    assert (summary.symlinks_rewritten, summary.xattrs_resealed) == (0, 0)
    assert sorted((f.path, "sealed with mk epoch 1, which is retired" in f.detail)
                  for f in summary.failed) == [("/deploy", True), ("/report.txt", True)]
    m = _mount(volume, tmp_path, epoch=2, name="after", retired_below=2)
    try:
        for reach in (lambda: os.readlink(m.mountpoint / "deploy"),
                      lambda: os.getxattr(m.mountpoint / "report.txt", b"user.approved")):
            with pytest.raises(OSError) as err:
                reach()
            assert err.value.errno == errno.EIO
    finally:
        m.stop()


def test_a_migration_cut_short_in_its_value_pass_is_finished_by_the_next_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SymlinkXattrEpochs, which ends the migration (no run reads a retired epoch's targets and
    values after it), is added only once the pass that moves them is done: a run cut short in
    it (here, after the xattr values, at the first symlink) leaves the volume without it, so
    the next --upgrade reads the rest. Values it moved read the same without the flag, in the
    mount and in the next run; the config writes keep the root's times."""
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    _made_before_the_flag(volume)
    os.utime(volume, ns=(1_000_000_000, 2_000_000_000))
    deriver = RetiringDeriver(current_epoch=2, retired_below=2)

    def cut_short(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ValueRekeyer, "rewrite_symlink", cut_short)
    with pytest.raises(KeyboardInterrupt):
        reencrypt_tree(volume, deriver, upgrade=True)
    monkeypatch.undo()
    assert not volconfig.load(volume).has(volconfig.FLAG_SYMLINK_XATTR_EPOCHS)
    with pytest.raises(UsageError, match="no SymlinkXattrEpochs flag"):
        reencrypt_tree(volume, deriver)
    m = _mount(volume, tmp_path, epoch=2, retired_below=2)
    try:  # moved before the cut: read without the flag
        assert os.getxattr(m.mountpoint / "f", b"user.colour") == b"epoch-1 value"
        with pytest.raises(OSError):
            os.readlink(m.mountpoint / "short")  # not yet
    finally:
        m.stop()
    os.utime(volume, ns=(1_000_000_000, 2_000_000_000))

    summary = reencrypt_tree(volume, deriver, upgrade=True)
    assert summary.flags_added == [volconfig.FLAG_SYMLINK_XATTR_EPOCHS]
    # (the files' contents, at epoch 1, are the retirement's to refuse: no value failed)
    assert sorted((f.path, "keyed with mk epoch 1" in f.detail) for f in summary.failed) == [
        ("/f", True), ("/ro", True)]
    assert (summary.symlinks_rewritten, summary.xattrs_resealed) == (3, 0)
    assert summary.xattr_epochs_before == {2: 4}  # what the cut run moved, read as such
    assert sorted(m.path for m in summary.retired_values) == [
        "/d/linked2", "/d/long", "/linked", "/short"]
    assert volconfig.load(volume).has(volconfig.FLAG_SYMLINK_XATTR_EPOCHS)
    root = os.stat(volume)
    assert (root.st_atime_ns, root.st_mtime_ns) == (1_000_000_000, 2_000_000_000)
    m = _mount(volume, tmp_path, epoch=2, name="after", retired_below=2)
    try:
        assert os.readlink(m.mountpoint / "short") == "old-target"
        assert os.readlink(m.mountpoint / "d" / "long") == LONG_TARGET
        assert os.getxattr(m.mountpoint / "d", b"user.dir") == b"on a directory"
    finally:
        m.stop()
    report = check_tree(volume, deriver)
    assert report.symlink_epochs == {2: 4} and report.xattr_epochs == {2: 4}
    assert {p.path for p in report.problems} == {"/f", "/ro"}  # their contents, as above


def test_a_migration_that_leaves_a_value_adds_the_flag_only_once_none_is_left(
    tmp_path: Path,
) -> None:
    """A value the migration could not move (here, damaged) keeps the volume without
    SymlinkXattrEpochs (flags_pending): with it, the next --upgrade would no longer read a
    retired epoch's. Once it is removed, the next --upgrade adds the flag."""
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    _made_before_the_flag(volume)
    d = cipher_path(volume, "d")
    (disk,) = _user_xattrs(d)
    stored = bytearray(os.getxattr(d, disk))
    stored[-1] ^= 1
    os.setxattr(d, disk, bytes(stored))
    deriver = SoftDeriver(current_epoch=2, retired_below=2)
    summary = reencrypt_tree(volume, deriver, upgrade=True)
    assert summary.flags_pending == [volconfig.FLAG_SYMLINK_XATTR_EPOCHS]
    assert volconfig.FLAG_SYMLINK_XATTR_EPOCHS not in summary.flags_added
    assert [f.path for f in summary.failed] == ["/d"]
    assert not volconfig.load(volume).has(volconfig.FLAG_SYMLINK_XATTR_EPOCHS)
    os.removexattr(cipher_path(volume, "d"), disk)
    again = reencrypt_tree(volume, deriver, upgrade=True)
    assert again.flags_added == [volconfig.FLAG_SYMLINK_XATTR_EPOCHS]
    assert again.flags_pending == [] and not again.failed
    assert volconfig.load(volume).has(volconfig.FLAG_SYMLINK_XATTR_EPOCHS)


def test_reencrypt_wants_the_flag_and_upgrade_adds_it(tmp_path: Path) -> None:
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    _made_before_the_flag(volume)
    before = _stored_target(volume, "short")
    with pytest.raises(UsageError, match="no SymlinkXattrEpochs flag"):
        reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert _stored_target(volume, "short") == before  # nothing touched
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2), upgrade=True)
    assert summary.flags_added == [volconfig.FLAG_SYMLINK_XATTR_EPOCHS]
    assert summary.symlinks_rewritten == 3 and summary.xattrs_resealed == 4


def test_two_symlinks_naming_one_blob_both_keep_their_target(tmp_path: Path) -> None:
    """Found by review: a copy of the ciphertext that broke hard links (rsync without -H)
    leaves two symlinks naming one blob; re-keying the first removed the blob the second
    still named. Blobs go only once no symlink of the tree names them."""
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    long = cipher_path(volume, "d/long")
    m = _mount(volume, tmp_path, epoch=1)
    try:
        os.symlink(LONG_TARGET, m.mountpoint / "d" / "twin")
    finally:
        m.stop()
    twin = cipher_path(volume, "d/twin")
    twin.unlink()
    os.symlink(os.readlink(long), twin)  # the copy: the same blob, another inode
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert not summary.failed and summary.symlinks_rewritten == 4
    m = _mount(volume, tmp_path, epoch=2, name="after")
    try:
        assert os.readlink(m.mountpoint / "d" / "long") == LONG_TARGET
        assert os.readlink(m.mountpoint / "d" / "twin") == LONG_TARGET
    finally:
        m.stop()
    assert check_tree(volume, SoftDeriver(current_epoch=2)).clean


def test_an_error_between_a_hard_linked_symlinks_renames_is_joined_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: the temporary names left after an error between the renames were
    removed, which split the hard link for good (the old inode re-keyed on its own by the
    next run). They stay now, named after the old inode as a file's are, and the next run
    renames them over the paths still on the old inode."""
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    second = os.fsencode(cipher_path(volume, "d/linked2"))
    real = os.rename

    def rename(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.fsencode(dst) == second:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert [f.path for f in summary.failed] == ["/linked"]
    assert "which the next 'kmsfs reencrypt' does" in summary.failed[0].detail
    monkeypatch.undo()
    again = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert not again.failed and again.links_rejoined == 1
    a, b = os.lstat(cipher_path(volume, "linked")), os.lstat(cipher_path(volume, "d/linked2"))
    assert a.st_ino == b.st_ino and a.st_nlink == 2
    assert reencrypt_leftovers(volume) == []
    report = check_tree(volume, SoftDeriver(current_epoch=2))
    assert report.clean and report.symlink_epochs == {2: 4}


def test_values_sealed_again_are_made_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: the values pass wrote with setxattr and never fsync'd; a power cut
    after a run that said it was done (and a retirement) could bring epoch-1 values back."""
    volume = make_volume(tmp_path / "cipher")
    _epoch1_tree(volume, tmp_path)
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    paths = {p: str(cipher_path(volume, p)) for p in ("f", "ro", "d")}
    summary = reencrypt_tree(volume, SoftDeriver(current_epoch=2))
    assert summary.xattrs_resealed == 4
    # each after the file's rewrite (f and ro are rewritten: new inodes at the same paths)
    for plain, path in paths.items():
        assert path in synced, plain
