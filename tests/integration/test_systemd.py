"""Administrators' integration: the shipped systemd units and the mount(8) helper, for real.

The ``installed`` fixture (conftest.py) runs tools/install-system.sh (links into /usr/local/bin
and /usr/sbin, the unit into /etc/systemd/system) and removes exactly that afterwards.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.kms_helpers import Admin

ROOT = Path(__file__).resolve().parent.parent.parent
UNITS = sorted((ROOT / "systemd").iterdir())


@pytest.fixture
def volume(initialized: Admin, tmp_path: Path) -> dict[str, str]:
    """A real Domain and a ciphertext directory bound to it; the unit's environment file."""
    initialized.real_domain()
    env = {
        "KMSFS_CIPHERDIR": str(tmp_path / "cipher"),
        "KMSFS_MOUNTPOINT": str(tmp_path / "mnt"),
        "KMSFS_STORE": str(initialized.store),
        "KMSFS_OPTIONS": "allow_other",
    }
    subprocess.run(
        [
            "/usr/local/bin/kmsfs",
            "init",
            env["KMSFS_CIPHERDIR"],
            "--domain",
            "payroll",
            "--store",
            env["KMSFS_STORE"],
        ],
        check=True,
        capture_output=True,
    )
    Path(env["KMSFS_MOUNTPOINT"]).mkdir()
    return env


def _unmount(path: str) -> None:
    for _ in range(50):
        if not os.path.ismount(path):
            return
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, check=False)
        time.sleep(0.1)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_analyze_verify_passes(installed: None, unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert unit.name.split("@")[0] not in result.stderr, result.stderr


def test_systemd_analyze_would_catch_a_broken_unit(installed: None, tmp_path: Path) -> None:
    """The check above is not vacuous: a unit with a missing binary fails it."""
    broken = tmp_path / "kmsfs-broken@.service"
    text = (ROOT / "systemd" / "kmsfs@.service").read_text()
    broken.write_text(text.replace("/usr/local/bin/kmsfs", "/usr/local/bin/kmsfs-missing"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True
    )
    assert result.returncode != 0


def _exec_start(env: dict[str, str]) -> list[str]:
    """The unit's own ExecStart line, expanded as systemd does from EnvironmentFile: ${VAR} is
    one word; a word that is just $VAR splits into words, none if VAR is empty or unset."""
    text = (ROOT / "systemd" / "kmsfs@.service").read_text()
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    expanded: list[str] = []
    for word in line.removeprefix("ExecStart=").split():
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            expanded += env.get(whole.group(1), "").split()
        else:
            expanded.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return expanded


def test_unit_exec_start_notifies_ready_once_serving_and_unmounts_on_sigterm(
    installed: None, volume: dict[str, str], tmp_path: Path
) -> None:
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(60)
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF",)}
    env.update(volume, NOTIFY_SOCKET=notify_path)
    proc = subprocess.Popen(_exec_start(volume), env=env, stderr=subprocess.PIPE, text=True)
    mnt = volume["KMSFS_MOUNTPOINT"]
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message
        # at READY the mount must already answer
        assert os.path.ismount(mnt)
        Path(mnt, "hello.txt").write_text("served")
        assert Path(mnt, "hello.txt").read_text() == "served"
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert proc.wait(timeout=60) == 0
        assert not os.path.ismount(mnt)
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert "mounted" in log and "unmounted" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _unmount(mnt)
        listener.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_mount_t_kmsfs_and_an_fstab_line(
    installed: None, volume: dict[str, str], tmp_path: Path
) -> None:
    cipher, mnt, store = (
        volume["KMSFS_CIPHERDIR"],
        volume["KMSFS_MOUNTPOINT"],
        volume["KMSFS_STORE"],
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "KMSFS_STORE")}
    try:
        subprocess.run(
            ["mount", "-t", "kmsfs", cipher, mnt, "-o", f"store={store},allow_other"],
            check=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert os.path.ismount(mnt)
        Path(mnt, "via-mount.txt").write_text("mount -t kmsfs")
        subprocess.run(["umount", mnt], check=True, capture_output=True, timeout=60)
        assert not os.path.ismount(mnt)

        fstab = tmp_path / "fstab"
        fstab.write_text(f"{cipher} {mnt} kmsfs store={store},allow_other,_netdev,noauto 0 0\n")
        subprocess.run(
            ["mount", "--fstab", str(fstab), mnt],
            check=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert Path(mnt, "via-mount.txt").read_text() == "mount -t kmsfs"
        subprocess.run(["umount", mnt], check=True, capture_output=True, timeout=60)
    finally:
        _unmount(mnt)


def test_mount_helper_reports_errors_in_one_line(installed: None, volume: dict[str, str]) -> None:
    cipher, mnt = volume["KMSFS_CIPHERDIR"], volume["KMSFS_MOUNTPOINT"]
    result = subprocess.run(
        ["mount", "-t", "kmsfs", cipher, mnt, "-o", "store=/nonexistent/store"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "kmsfs: error:" in result.stderr and "/nonexistent/store" in result.stderr
    assert not os.path.ismount(mnt)
    assert shutil.which("mount.kmsfs") or Path("/usr/sbin/mount.kmsfs").exists()
