"""The ``kmsfs`` command and the volume config: refusals are one line and mount nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from kmsfs.errors import BadVersionError, FormatError
from kmsfs.fs import config as volconfig
from kmsfs.fs import daemon
from tests.integration.fs_helpers import Mount, make_volume, sample_config
from tests.kms_helpers import tree_snapshot

KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]


def kmsfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KMSFS, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


# --- config ---------------------------------------------------------------------------------
def test_config_roundtrip_and_atomic_save(tmp_path: Path) -> None:
    cfg = sample_config()
    assert volconfig.parse(volconfig.pack(cfg)) == cfg
    volconfig.save(tmp_path, cfg)
    assert volconfig.load(tmp_path) == cfg
    assert sorted(os.listdir(tmp_path)) == ["kmsfs.conf"]


@pytest.mark.parametrize(("edit", "error", "text"), [
    (lambda d: d["feature_flags"].append("FutureFlag"), BadVersionError, "FutureFlag"),
    (lambda d: d.__setitem__("format_version", 2), BadVersionError, "want 1, have 2"),
    (lambda d: d.__setitem__("domain_bundle", "!!"), FormatError, "base64"),
    (lambda d: d.pop("domain_id"), FormatError, "domain_id"),
    (lambda d: d.__setitem__("extra", 1), FormatError, "extra"),
    (lambda d: d["feature_flags"].remove("DirIV"), BadVersionError, "DirIV"),
])
def test_config_rejects(edit, error, text) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(volconfig.pack(sample_config()))
    edit(doc)
    with pytest.raises(error, match=text):
        volconfig.parse(json.dumps(doc).encode())
    with pytest.raises(FormatError):
        volconfig.parse(b"not json")


# --- CLI refusals ---------------------------------------------------------------------------
def _assert_refused(proc: subprocess.CompletedProcess[str], mountpoint: Path, text: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmsfs: error: "), proc.stderr
    assert text in lines[0]
    assert not os.path.ismount(mountpoint)


def test_mount_refusals(tmp_path: Path) -> None:
    cipher = make_volume(tmp_path / "c")
    mp = tmp_path / "m"
    _assert_refused(kmsfs("mount", str(cipher), str(mp)), mp, "no such directory")
    mp.mkdir()
    (mp / "x").write_text("")
    _assert_refused(kmsfs("mount", str(cipher), str(mp)), mp, "not empty")
    (mp / "x").unlink()
    _assert_refused(kmsfs("mount", str(cipher), str(mp), "-o", "bogus"), mp, "bogus")
    doc = json.loads((cipher / "kmsfs.conf").read_bytes())
    doc["feature_flags"].append("FutureFlag")
    os.chmod(cipher / "kmsfs.conf", 0o644)
    (cipher / "kmsfs.conf").write_text(json.dumps(doc))
    _assert_refused(kmsfs("mount", str(cipher), str(mp)), mp, "unknown feature flag 'FutureFlag'")
    (cipher / "kmsfs.conf").write_text("{garbage")
    _assert_refused(kmsfs("mount", str(cipher), str(mp)), mp, "not valid JSON")
    _assert_refused(kmsfs("mount", str(tmp_path / "nope"), str(mp)), mp, "no such directory")


def test_a_mount_point_inside_the_ciphertext_directory_is_refused(tmp_path: Path) -> None:
    """Review: `kmsfs mount c c/sub` was accepted, and then a tar or rsync of the ciphertext
    directory copied the plaintext in clear. Refused, exit 2, however the path reaches it (a
    symlink from outside, the directory itself), and nothing is mounted or written."""
    cipher = make_volume(tmp_path / "c")
    inside = cipher / "sub"
    inside.mkdir()
    (tmp_path / "link").symlink_to(inside)
    before = tree_snapshot(cipher)
    for mp in (inside, tmp_path / "link", cipher):
        proc = kmsfs("mount", str(cipher), str(mp))
        assert proc.returncode == 2, proc.stderr
        where = "is" if mp == cipher else "is inside"
        _assert_refused(proc, mp, f"mount point {mp} {where} the ciphertext directory {cipher}")
    assert tree_snapshot(cipher) == before
    (tmp_path / "file").write_bytes(b"")  # a volume named by mistake: not "no such"
    _assert_refused(kmsfs("mount", str(tmp_path / "file"), str(mp)), mp, "file: not a directory")


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is for root")
def test_root_mounts_only_a_volume_nobody_else_can_reach(tmp_path: Path) -> None:
    """One line, nothing mounted: a ciphertext directory another user can reach or replace
    would let that user steer the root daemon outside the volume (check_root_only)."""
    mp = tmp_path / "m"
    mp.mkdir()
    with tempfile.TemporaryDirectory(prefix="kmsfs-cli-", dir="/tmp") as base:
        os.chmod(base, 0o755)  # unlike pytest's 0700 directories, lets everyone through
        cipher = make_volume(Path(base) / "c")
        os.chown(cipher, 1000, 1000)
        _assert_refused(kmsfs("mount", str(cipher), str(mp)), mp, "(owned by uid 1000,")
        os.chown(cipher, 0, 0)
        os.chmod(cipher, 0o755)  # as after chmod 755 of an allow_other mount's root
        _assert_refused(kmsfs("mount", str(cipher), str(mp)), mp, "(mode 0755,")
        os.chmod(cipher, 0o700)
        os.chmod(base, 0o777)
        _assert_refused(kmsfs("mount", str(cipher), str(mp)), mp, "can be changed by other")
        os.chmod(base, 0o700)  # closed above: the volume's root may be open to all
        os.chmod(cipher, 0o755)
        # the volume itself passes now: what stops the mount is a later check (no store
        # here; the test volume's Domain bundle is a stand-in anyway)
        proc = kmsfs("mount", str(cipher), str(mp))
        assert proc.returncode != 0 and "is not a kmsfs store" in proc.stderr, proc.stderr


def test_init_refuses_non_empty(tmp_path: Path, initialized) -> None:  # type: ignore[no-untyped-def]
    """With a Domain that exists (a missing store or Domain fails first, for its own reason)."""
    initialized.real_domain()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "f").write_text("")
    proc = kmsfs("init", str(tmp_path / "c"), "--domain", "payroll",
                 "--store", str(initialized.store))
    assert proc.returncode == 2
    assert proc.stderr == f"kmsfs: error: {tmp_path / 'c'}: not empty (a new volume needs an " \
        "empty directory)\n"
    assert os.listdir(tmp_path / "c") == ["f"]


@pytest.mark.parametrize(
    "sub",
    ["", "init", "mount", "umount", "info", "encrypt", "decrypt", "fsck", "reencrypt",
     "completion"],
)
def test_help_has_example(sub: str) -> None:
    proc = kmsfs(*filter(None, [sub]), "--help")
    assert proc.returncode == 0 and "example" in proc.stdout


def test_info_reads_config(tmp_path: Path) -> None:
    cipher = make_volume(tmp_path / "c")
    proc = kmsfs("info", str(cipher), "--json", "--store", str(tmp_path / "nostore"))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["domain_name"] == "test-domain" and info["verified"] is False
    # The keys a verified Domain fills are there all the same, as null: scripts index them.
    for key in ("generation", "epochs", "key_binding", "trust_id", "hsms", "superseded_by"):
        assert key in info and info[key] is None, key


# --- end to end with a real store and SoftHSM ----------------------------------------------
def _daemon_serving(mountpoint: Path) -> int:
    """The pid of the ``kmsfs mount`` daemon serving *mountpoint*."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue  # gone meanwhile
            if b"mount" in argv and os.fsencode(mountpoint) in argv:
                return int(entry.name)
    raise AssertionError(f"no daemon serves {mountpoint}")


@pytest.mark.slow
def test_init_mount_umount_with_real_domain(tmp_path: Path, initialized) -> None:  # type: ignore[no-untyped-def]
    initialized.real_domain()
    env = {"KMSFS_STORE": str(initialized.store)}
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    proc = kmsfs("init", str(cipher), "--domain", "payroll", env=env)
    assert proc.returncode == 0, proc.stderr
    mp.mkdir()
    log = tmp_path / "daemon.log"
    proc = kmsfs("mount", str(cipher), str(mp), "--log-file", str(log), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # a daemonizing mount says nothing once it serves
    try:
        assert os.path.ismount(mp)
        (mp / "hello").write_bytes(b"world")
        assert (mp / "hello").read_bytes() == b"world"
        # The daemon holds keys and plaintext: it may leave no core file (cliutil.run).
        limits = Path(f"/proc/{_daemon_serving(mp)}/limits").read_text()
        assert re.search(r"^Max core file size +0 +0 ", limits, re.MULTILINE), limits
        # The plaintext view given for the volume: named as such, with the command to run
        # (it said "kmsfs.conf: no such file (not a kmsfs volume?)").
        for command in ("info", "fsck"):
            mixed = kmsfs(command, str(mp), env=env)
            assert mixed.returncode == 2 and mixed.stderr == (
                f"kmsfs: error: {mp} is the mount point of the kmsfs volume {cipher}: give the "
                f"ciphertext directory ('kmsfs {command} {cipher}')\n"
            ), mixed.stderr
        # A volume made inside the plaintext view (a volume stored in a volume) is a volume
        # all the same: its own mount point is where it lives, not a mix-up.
        (mp / "hello").unlink()
        nested = kmsfs("init", str(mp), "--domain", "payroll", env=env)
        assert nested.returncode == 0, nested.stderr
        info = kmsfs("info", "--json", str(mp), env=env)
        assert info.returncode == 0, info.stderr
        shown = json.loads(info.stdout)
        assert (shown["cipherdir"], shown["domain_name"], shown["verified"]) == (
            str(mp), "payroll", True
        )
        checked = kmsfs("fsck", str(mp), env=env)
        assert checked.returncode == 0, checked.stderr
    finally:
        proc = kmsfs("umount", str(mp))
    assert proc.returncode == 0, proc.stderr
    for _ in range(50):  # the daemon logs its unmount as it exits
        if "unmounted" in log.read_text():
            break
        time.sleep(0.1)
    assert f"mounted {cipher}" in log.read_text() and "unmounted" in log.read_text()


@pytest.mark.slow
def test_refused_mounts_exit_with_their_codes(tmp_path: Path, initialized) -> None:  # type: ignore[no-untyped-def]
    """The README's exit codes hold for mount too, also when the failure comes after the fork
    (a daemonizing mount opens the HSMs in the child): one line, that code, nothing mounted."""
    from tests.integration.fault_helpers import token_dir
    from tests.kms_helpers import Admin

    initialized.real_domain()
    store = initialized.store
    env = {"KMSFS_STORE": str(store)}
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    assert kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    mp.mkdir()
    info = json.loads(kmsfs("info", str(cipher), "--json", env=env).stdout)
    assert info["verified"] is True and info["trust_id"]
    assert sorted(h["label"] for h in info["hsms"]) == ["hsm1", "hsm2"]

    def refused(*extra: str) -> tuple[int, str]:
        proc = kmsfs("mount", str(cipher), str(mp), *extra, env=env)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kmsfs: error: "), proc.stderr
        assert not os.path.ismount(mp)
        return proc.returncode, lines[0]

    other = Admin.under(tmp_path / "other")
    other("init", "--hsms", "1")
    assert refused("--store", str(other.store))[0] == 3  # verification failed
    code, line = refused("--store", str(tmp_path / "typo"))  # was 3 too: a script could not
    assert code == 6 and "no store.json" in line  # tell an attack from a typo
    fsck = kmsfs("fsck", str(cipher), "--store", str(tmp_path / "typo"))
    assert fsck.returncode == 6, fsck.stderr

    tokens = [token_dir(store, label) for label in ("hsm1", "hsm2")]
    away = tmp_path / "away"
    away.mkdir()
    for t in tokens:
        t.rename(away / t.name)
    try:
        code, line = refused()
        assert code == 4, line  # no HSM
        assert refused("--foreground")[0] == 4  # the same without the fork
    finally:
        for t in tokens:
            (away / t.name).rename(t)

    pins = [store / "private" / "pins" / f"{label}.pin" for label in ("hsm1", "hsm2")]
    saved = {p: p.read_bytes() for p in pins}
    try:
        for p in pins:
            p.write_text("wrong-pin-0000\n")
        code, line = refused()
        assert code == 5, line  # PIN
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
    proc = kmsfs("mount", str(cipher), str(mp), env=env)
    assert proc.returncode == 0, proc.stderr
    assert kmsfs("umount", str(mp)).returncode == 0


@pytest.mark.parametrize("option", sorted(daemon.ALLOWED_OPTIONS))
def test_every_option_the_cli_accepts_mounts(volume: Path, mounter, option: str) -> None:  # type: ignore[no-untyped-def]
    """An option ``mount_options`` lets through must not make libfuse refuse the mount (3.14
    knows neither relatime nor nodiratime: kmsfs applies those itself)."""
    m = mounter(volume, options=(option,))
    assert os.path.ismount(m.mountpoint)
    assert os.listdir(m.mountpoint) == []


def test_a_mount_whose_daemon_died_is_named_and_can_be_unmounted(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """After kill -9 the mount point stays in the mount table and every stat of it is ENOTCONN
    (once the kernel's 1 s attribute cache is gone): umount said "not a mount point", and mount
    failed with the bare errno text."""
    mount = mounter(volume)
    mp = mount.mountpoint
    assert mount.proc is not None
    mount.proc.kill()
    mount.proc.wait()
    time.sleep(1.5)
    with pytest.raises(OSError):
        os.stat(mp)
    refused = kmsfs("mount", str(volume), str(mp))
    assert refused.returncode == 2
    assert refused.stderr == (
        f"kmsfs: error: mount point {mp}: a mount whose daemon is gone; "
        f"run kmsfs umount {mp} first\n"
    )
    done = kmsfs("umount", str(mp))
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(mp) and mp.is_dir()
    mount._close()
    mount.start()  # and it mounts again
    assert mount.alive()


def test_a_second_mount_of_a_mounted_volume_is_refused(  # type: ignore[no-untyped-def]
    volume: Path, mounter, tmp_path: Path
) -> None:
    """Two daemons on one CIPHERDIR each keep their own view of a file: a block one of them
    rewrites, the other read as EIO. One mount at a time; the first keeps serving."""
    first = mounter(volume)
    (first.mountpoint / "f").write_bytes(b"one")
    second = Mount(volume, tmp_path / "second", tmp_path / "second.log")
    try:
        with pytest.raises(RuntimeError, match="busy"):
            second.start()
    finally:
        second.stop()  # if it did mount, this test must not leave it behind
    assert f"{volume}: busy: " in second.log()
    assert not os.path.ismount(tmp_path / "second")
    assert (first.mountpoint / "f").read_bytes() == b"one"


def test_init_names_a_missing_parent_and_makes_nothing(tmp_path: Path) -> None:
    """It said "No such file or directory: /srv/cipher/payroll", naming the wrong path."""
    from kmsfs.errors import UsageError
    from kmsfs.fs.volume import create_volume

    with pytest.raises(UsageError) as info:
        create_volume(tmp_path / "nope" / "payroll", sample_config())
    assert str(info.value) == f"{tmp_path / 'nope'}: no such directory (create it first)"
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is for root")
def test_opening_the_mount_root_says_when_it_opens_the_ciphertext(mounter) -> None:  # type: ignore[no-untyped-def]
    """chmod 755 of an allow_other mount's root is the ciphertext root's chmod too: where
    nothing above closes it, the log says so at once, and the next mount refuses it."""
    with tempfile.TemporaryDirectory(prefix="kmsfs-cli-", dir="/tmp") as base:
        os.chmod(base, 0o755)
        closed = Path(base) / "closed"
        closed.mkdir(mode=0o700)
        for parent, warned in ((closed, False), (Path(base), True)):
            cipher = make_volume(parent / "c")
            mount = mounter(cipher, name=f"m{warned}")
            os.chmod(mount.mountpoint, 0o755)
            os.chmod(mount.mountpoint, 0o700)  # closing again says nothing
            said = mount.log().count("the next one as root will refuse")
            mount.stop()
            assert said == (1 if warned else 0), mount.log()
            if warned:
                with pytest.raises(RuntimeError, match="other users can reach the ciphertext"):
                    os.chmod(cipher, 0o755)
                    mounter(cipher, name="again")
