"""``kmsfs mount -o low_latency`` on real SoftHSM2 tokens, a real FUSE mount and the kernel's
real PM QoS device: the CPU latency bound is 0 while requests arrive and back to what it was
after a pause, after an unmount and after a SIGKILL; without root the option is refused.

Reading /dev/cpu_dma_latency gives the machine's current bound (the lowest request held by
anyone), so each test first checks that nobody else holds one: otherwise it could not see
the mount's own.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kmsfs.fs import latency

KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]
NOBODY = 65534

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the PM QoS device is root's"),
    pytest.mark.skipif(not os.path.exists(latency.DEVICE), reason="kernel without PM QoS"),
]


def kmsfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KMSFS, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def current_bound() -> int:
    """The machine's CPU wake-up latency bound in microseconds (the kernel's aggregate)."""
    fd = os.open(latency.DEVICE, os.O_RDONLY)
    try:
        return struct.unpack("i", os.read(fd, 4))[0]
    finally:
        os.close(fd)


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


@pytest.fixture
def unbounded() -> int:
    """The bound with nobody holding a request; the test needs the machine to be like that."""
    bound = current_bound()
    assert bound > latency.BUSY_US, (
        f"another process holds a CPU latency request ({bound} us): the mount's cannot be seen"
    )
    return bound


@pytest.fixture
def volume(tmp_path: Path, initialized) -> tuple[Path, Path, dict[str, str]]:  # type: ignore[no-untyped-def]
    initialized.real_domain()
    env = {"KMSFS_STORE": str(initialized.store)}
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    assert kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    mp.mkdir()
    return cipher, mp, env


def test_held_while_busy_released_after_a_pause_and_at_unmount(
    volume: tuple[Path, Path, dict[str, str]], unbounded: int
) -> None:
    cipher, mp, env = volume
    proc = kmsfs("mount", str(cipher), str(mp), "-o", "low_latency", env=env)
    assert proc.returncode == 0, proc.stderr
    try:
        (mp / "f").write_bytes(b"payload")  # requests: a busy spell
        assert current_bound() == latency.BUSY_US
        assert wait_for(lambda: current_bound() == unbounded), "not released after a pause"
        assert (mp / "f").read_bytes() == b"payload"  # the first request after it: held again
        assert current_bound() == latency.BUSY_US
    finally:
        assert kmsfs("umount", str(mp)).returncode == 0
    assert current_bound() == unbounded


def test_a_killed_daemon_leaves_no_bound_behind(
    volume: tuple[Path, Path, dict[str, str]], unbounded: int
) -> None:
    cipher, mp, env = volume
    daemon = subprocess.Popen(
        [*KMSFS, "mount", "--foreground", str(cipher), str(mp), "-o", "low_latency"],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: os.path.ismount(mp), 60)
        os.listdir(mp)
        assert current_bound() == latency.BUSY_US
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(30)
        assert current_bound() == unbounded
    finally:
        daemon.kill()
        daemon.wait(30)
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


def test_without_root_the_option_is_refused_in_one_line(tmp_path: Path) -> None:
    """Only root may open the device: a user gets one line and exit 2, before anything else
    (no volume, no HSM is touched), and nothing is mounted."""
    mp = tmp_path / "mnt"
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *KMSFS,
         "mount", "/nonexistent-cipher", str(mp), "-o", "low_latency"],
        capture_output=True, text=True, timeout=60, cwd="/",
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("kmsfs: error: -o low_latency: cannot open")
    assert "only root" in lines[0]
    assert not os.path.ismount(mp)
