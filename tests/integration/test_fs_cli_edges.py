"""``kmsfs mount`` and ``kmsfs umount`` where a user's slip or the machine gets in the way."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.fs.volume import is_mount_point
from tests.integration.fs_helpers import daemon_script, make_volume
from tests.kms_helpers import Admin

KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]
REPO = Path(__file__).resolve().parents[2]


def kmsfs(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KMSFS, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of its own, as a USB stick or a scratch disk would be: a mount that is not
    kmsfs's."""
    where = tmp_path / "stick"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_umount_of_a_path_that_does_not_exist_says_so(tmp_path: Path) -> None:
    """Not "not a mount point": a typo'd path is named as missing (found by review)."""
    proc = kmsfs("umount", str(tmp_path / "nowhere"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"kmsfs: error: {tmp_path / 'nowhere'}: no such directory"
    proc = kmsfs("umount", str(tmp_path))
    assert proc.stderr.strip() == f"kmsfs: error: {tmp_path}: not a mount point"


def test_umount_refuses_a_mount_that_is_not_kmsfs(tmpfs: Path) -> None:
    """As root, fusermount3 -u unmounts whatever it is given: ``kmsfs umount /srv`` typed for
    ``/srv/payroll`` took the disk away."""
    (tmpfs / "keep").write_text("still here")
    proc = kmsfs("umount", str(tmpfs))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"kmsfs: error: {tmpfs}: not a kmsfs mount (tmpfs from tmpfs); nothing unmounted\n"
    )
    assert os.path.ismount(tmpfs) and (tmpfs / "keep").read_text() == "still here"


def test_a_mount_leaves_the_callers_directory_free(
    tmp_path: Path, initialized: Admin, tmpfs: Path
) -> None:
    """Mounted from a shell whose directory was on a stick, the daemon kept that directory as
    its own, and the stick could not be unmounted while the volume stayed mounted. Relative
    paths (store, log file) given there still work once the daemon has left."""
    initialized.real_domain()
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    store = os.path.relpath(initialized.store, tmpfs)
    env = {"KMSFS_STORE": store}
    assert kmsfs("init", str(cipher), "--domain", "payroll", cwd=tmpfs, env=env).returncode == 0
    mp.mkdir()
    log = os.path.relpath(tmp_path / "daemon.log", tmpfs)
    proc = kmsfs("mount", os.path.relpath(cipher, tmpfs), os.path.relpath(mp, tmpfs),
                 "--log-file", log, cwd=tmpfs, env=env)
    assert proc.returncode == 0, proc.stderr
    try:
        subprocess.run(["umount", str(tmpfs)], check=True)  # not busy
        (mp / "f").write_text("served")
        assert (mp / "f").read_text() == "served"
        assert f"mounted {cipher}" in (tmp_path / "daemon.log").read_text()
    finally:
        done = kmsfs("umount", str(mp))
    assert done.returncode == 0, done.stderr


def _daemon_child(pid: int, timeout: float = 30.0) -> int:
    """The pid of the daemon that ``kmsfs mount`` (*pid*) forked, once it has: the child that
    leads a session of its own (not a program an import runs, such as ldconfig)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in map(int, children.read_text().split()):
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                if os.getsid(child) == child:
                    return child
        time.sleep(0.001)
    raise AssertionError(f"process {pid} started no daemon")


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@pytest.mark.parametrize("sigterm", ["default", "ignored"])
def test_ctrl_c_before_the_mount_is_ready_calls_it_off(
    tmp_path: Path, initialized: Admin, sigterm: str
) -> None:
    """Ctrl-C while ``kmsfs mount`` waited for its daemon said "interrupted" (exit 130), yet
    the daemon, in a session of its own that the terminal's signal does not reach, went on
    to mount the volume: plaintext served while the user believed nothing happened. Started
    with SIGTERM ignored (``trap '' TERM``), the daemon ignored the SIGTERM that calls it
    off, and the caller waited for it for ever."""
    initialized.real_domain()
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "KMSFS_STORE": str(initialized.store)}
    assert kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    mp.mkdir()
    proc = subprocess.Popen([*KMSFS, "mount", str(cipher), str(mp)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_ignore_sigterm if sigterm == "ignored" else None)
    try:
        daemon = _daemon_child(proc.pid)  # forked: opening the Domain's HSM, not yet mounted
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out, err) == (130, "", "kmsfs: interrupted\n")
        assert not os.path.ismount(mp)
        with pytest.raises(ProcessLookupError):
            os.kill(daemon, 0)  # waited for, not left to mount later
        time.sleep(0.5)
        assert not os.path.ismount(mp)
    finally:
        proc.kill()
        proc.communicate()
        if os.path.ismount(mp):
            kmsfs("umount", str(mp))


def test_a_sigterm_as_the_mount_is_made_unmounts_it(tmp_path: Path) -> None:
    """A SIGTERM (how an interrupted ``kmsfs mount`` calls its daemon off) that landed as
    pyfuse3.init returned found the daemon outside the code that unmounts: it exited 143 and
    left a dead mount (ENOTCONN) on the mount point. Here it is sent from inside init."""
    volume, target = make_volume(tmp_path / "cipher"), tmp_path / "mnt"
    target.mkdir()
    script = daemon_script(volume, target, (
        "real = pyfuse3.init\n"
        "def init(*args):\n"
        "    real(*args)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # as init returns\n"
        "pyfuse3.init = init\n"
    ), through_run=True)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              cwd=REPO, timeout=60)
        assert proc.returncode == 143, proc.stderr
        assert f" {target} " not in Path("/proc/self/mounts").read_text()
        assert list(target.iterdir()) == []  # a dead mount would raise ENOTCONN here
    finally:  # a dead mount is no mount point to os.path.ismount: unmount it regardless
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def test_a_mount_libfuse_refuses_is_one_line(tmp_path: Path) -> None:
    """``kmsfs mount --foreground`` (how systemd runs it) printed a traceback ending in
    RuntimeError: fuse_session_mount failed (a non-root user without access to /dev/fuse, or
    allow_other without user_allow_other). Here the mount point is missing, which the CLI
    checks first; the daemon is run directly so that libfuse's own refusal is what happens."""
    volume = make_volume(tmp_path / "cipher")
    target = tmp_path / "missing"
    script = daemon_script(volume, target, through_run=True)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 1
    ours = [line for line in proc.stderr.splitlines() if line.startswith("kmsfs: ")]
    assert ours == [f"kmsfs: error: {target}: the mount was refused (fuse_session_mount failed)"]
    assert "Traceback" not in proc.stderr


def test_json_goes_before_or_after_the_command_and_init_has_it(
    tmp_path: Path, initialized: Admin
) -> None:
    initialized.real_domain()
    env = {"KMSFS_STORE": str(initialized.store)}
    made = kmsfs("init", str(tmp_path / "v"), "--domain", "payroll", "--json", env=env)
    assert made.returncode == 0, made.stderr
    summary = json.loads(made.stdout)
    assert summary["cipherdir"] == str(tmp_path / "v") and summary["domain_name"] == "payroll"
    before = json.loads(kmsfs("--json", "info", str(tmp_path / "v"), env=env).stdout)
    after = json.loads(kmsfs("info", str(tmp_path / "v"), "--json", env=env).stdout)
    assert before == after and before["domain_id"] == summary["domain_id"]
    assert before["verified"] is True


def test_every_command_an_operator_scripts_has_json(tmp_path: Path, initialized: Admin) -> None:
    """``--json`` was accepted by mount, umount, encrypt and decrypt, which printed nothing
    (not JSON) before the command and refused it after."""
    initialized.real_domain()
    env = {"KMSFS_STORE": str(initialized.store)}
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    assert kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    mp.mkdir()
    mounted = kmsfs("mount", str(cipher), str(mp), "--json", env=env)
    assert mounted.returncode == 0, mounted.stderr
    try:
        summary = json.loads(mounted.stdout)
        assert summary["cipherdir"] == str(cipher) and summary["mountpoint"] == str(mp)
        assert summary["domain_name"] == "payroll" and summary["foreground"] is False
        assert os.path.ismount(mp)
    finally:
        done = kmsfs("--json", "umount", str(mp))
    assert done.returncode == 0
    assert json.loads(done.stdout) == {"mountpoint": str(mp), "lazily": False}

    plain, sealed, back = tmp_path / "plain", tmp_path / "sealed", tmp_path / "back"
    plain.write_bytes(b"x" * 5000)
    enc = kmsfs("encrypt", "--domain", "payroll", str(plain), str(sealed), "--json", env=env)
    assert enc.returncode == 0, enc.stderr
    assert json.loads(enc.stdout) == {"input": str(plain), "output": str(sealed),
                                      "domain_name": "payroll", "plaintext_bytes": 5000}
    dec = kmsfs("--json", "decrypt", str(sealed), str(back), env=env)
    assert dec.returncode == 0, dec.stderr
    assert json.loads(dec.stdout) == {"input": str(sealed), "output": str(back),
                                      "plaintext_bytes": 5000}
    assert back.read_bytes() == plain.read_bytes()
    # Relative names are reported absolute, both of them (the input was left relative).
    enc = kmsfs("encrypt", "--domain", "payroll", "plain", "sealed2", "--json", env=env,
                cwd=tmp_path)
    assert enc.returncode == 0, enc.stderr
    summary = json.loads(enc.stdout)
    assert (summary["input"], summary["output"]) == (str(plain), str(tmp_path / "sealed2"))
    # A missing IN is a usage error, said before any HSM is asked (it was exit 1, after).
    missing = kmsfs("encrypt", "--domain", "payroll", "nothing", "out", env=env, cwd=tmp_path)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip() == "kmsfs: error: nothing: No such file or directory"
    assert not (tmp_path / "out").exists()

    # JSON on stdout cannot share it with the plaintext: refused before anything is done.
    mixed = kmsfs("decrypt", str(sealed), "-", "--json", env=env)
    assert (mixed.returncode, mixed.stdout) == (2, "")
    assert mixed.stderr.startswith("kmsfs: error: --json: OUT - is not a regular file")
    script = kmsfs("--json", "completion", "bash")
    assert (script.returncode, script.stdout) == (2, "")


def test_store_goes_before_or_after_the_command_and_a_wrong_one_is_named(
    tmp_path: Path, initialized: Admin
) -> None:
    """``kmsfs --store S info V`` read S as the command; a mistyped --store made init say
    "no domain named payroll in S" (as if the Domain were missing) instead of naming it."""
    initialized.real_domain()
    store, cipher = str(initialized.store), tmp_path / "cipher"
    assert kmsfs("--store", store, "init", str(cipher), "--domain", "payroll").returncode == 0
    before = json.loads(kmsfs("--store", store, "info", str(cipher), "--json").stdout)
    after = json.loads(kmsfs("info", str(cipher), "--store", store, "--json").stdout)
    assert before == after and before["verified"] is True
    twice = kmsfs("--store", store, "info", str(cipher), "--store", str(tmp_path))
    assert twice.returncode == 2 and twice.stderr == (
        f"kmsfs: error: --store {store} before the command and --store {tmp_path} after it: "
        "give one (see kmsfs --help)\n")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    loops = kmsfs("--store", str(tmp_path / "loop-a"), "info", str(cipher),
                  "--store", str(tmp_path / "loop-b"))
    assert loops.returncode == 2 and len(loops.stderr.splitlines()) == 1, loops.stderr
    text = kmsfs("--store", store, "info", str(cipher)).stdout.splitlines()
    assert "verified:        yes" in text and "domain_name:     payroll" in text

    wrong, target = tmp_path / "no-store", tmp_path / "second"
    for command in (["init", str(target), "--domain", "payroll"],
                    ["encrypt", "--domain", "payroll", str(tmp_path / "x"), str(target)]):
        (tmp_path / "x").write_text("x")
        refused = kmsfs("--store", str(wrong), *command)
        assert refused.returncode == 6
        assert refused.stderr == (f"kmsfs: error: {wrong} is not a kmsfs store (no "
                                  "store.json): check --store or KMSFS_STORE\n")
        assert not target.exists() and not wrong.exists()


def test_umount_takes_a_mount_point_whose_name_starts_with_a_dash(
    tmp_path: Path, mounter
) -> None:  # type: ignore[no-untyped-def]
    """``kmsfs umount -- -dash`` handed "-dash" to fusermount3, which read it as options."""
    volume = make_volume(tmp_path / "cipher")
    (tmp_path / "-dash").mkdir()
    mount = mounter(volume, mountpoint=tmp_path / "-dash")
    done = kmsfs("umount", "--", "-dash", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(mount.mountpoint)


def test_umount_takes_a_mount_renamed_by_subtype_and_fsname(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """-o subtype= and fsname= are accepted by mount: the mount they name is still kmsfs's."""
    volume = make_volume(tmp_path / "cipher")
    mount = mounter(volume, options=("subtype=payroll", f"fsname={volume}"))
    done = kmsfs("umount", str(mount.mountpoint))
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(mount.mountpoint)
    assert mount.proc.wait(timeout=30) == 0  # the daemon saw its unmount and ended


def test_umount_of_a_busy_mount_is_refused_in_one_line_and_it_stays(
    tmp_path: Path, mounter
) -> None:  # type: ignore[no-untyped-def]
    """A file open on a live mount: exit 2 and a line saying what to do, the mount serving on;
    it was exit 1 with fusermount3's own text."""
    volume = make_volume(tmp_path / "cipher")
    mount = mounter(volume)
    (mount.mountpoint / "held").write_bytes(b"kept")
    with open(mount.mountpoint / "held", "rb") as held:
        refused = kmsfs("umount", str(mount.mountpoint))
        assert refused.returncode == 2, refused.stderr
        line = refused.stderr.strip()
        assert line.startswith(f"kmsfs: error: {mount.mountpoint}: busy: ") and "\n" not in line
        assert "nothing unmounted" in line and "SIGTERM" in line
        assert held.read() == b"kept" and os.path.ismount(mount.mountpoint)
    done = kmsfs("umount", str(mount.mountpoint))
    assert done.returncode == 0 and done.stdout == "", done.stderr


#: How the mount names its volume: the default (its ciphertext directory, whose lock tells
#: whether a daemon serves it) and another name (statfs asks the mount).
SOURCES = ["cipherdir", "other-name"]


def _mount_named(mounter, volume: Path, source: str):  # type: ignore[no-untyped-def]
    return mounter(volume, options=(f"fsname={volume if source == 'cipherdir' else 'vol'}",))


@pytest.mark.parametrize("source", SOURCES)
def test_umount_detaches_a_dead_mount_with_a_file_still_open_on_it(
    tmp_path: Path, mounter, source: str
) -> None:  # type: ignore[no-untyped-def]
    """After a kill -9 with a file open, the remount's advice ('run kmsfs umount first') led
    to EBUSY and exit 1; a dead mount has nothing to write back, so it is detached lazily."""
    volume = make_volume(tmp_path / "cipher")
    mount = _mount_named(mounter, volume, source)
    (mount.mountpoint / "held").write_bytes(b"kept")
    held = os.open(mount.mountpoint / "held", os.O_RDONLY)
    try:
        assert mount.proc is not None
        mount.proc.send_signal(signal.SIGKILL)
        mount.proc.wait()
        if mount.proc.stdout is not None:
            mount.proc.stdout.close()
        done = kmsfs("umount", "--json", str(mount.mountpoint))
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"mountpoint": str(mount.mountpoint), "lazily": True}
        assert not os.path.ismount(mount.mountpoint)
    finally:
        os.close(held)
    mount.start()  # the same mount point serves again
    assert (mount.mountpoint / "held").read_bytes() == b"kept"


@pytest.mark.parametrize("source", SOURCES)
def test_umount_of_a_busy_mount_whose_daemon_is_stopped_is_refused_not_detached(
    tmp_path: Path, mounter, source: str
) -> None:  # type: ignore[no-untyped-def]
    """A stopped (SIGSTOP) daemon never answers statfs: asked in the mount, umount hung for
    good; and a live mount must never be taken for a dead one and detached (review)."""
    volume = make_volume(tmp_path / "cipher")
    mount = _mount_named(mounter, volume, source)
    assert mount.proc is not None
    (mount.mountpoint / "held").write_bytes(b"kept")
    with open(mount.mountpoint / "held", "rb") as held:
        mount.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            refused = kmsfs("umount", str(mount.mountpoint))
            assert time.monotonic() - started < 60
            assert refused.returncode == 2 and ": busy: " in refused.stderr, refused.stderr
            assert is_mount_point(mount.mountpoint)  # from mountinfo: a stat would wait too
        finally:
            mount.proc.send_signal(signal.SIGCONT)
        assert held.read() == b"kept"
    done = kmsfs("umount", "--json", str(mount.mountpoint))
    assert done.returncode == 0 and json.loads(done.stdout)["lazily"] is False, done.stderr
    assert mount.proc.wait(timeout=30) == 0  # it saw its unmount and ended
