"""HSM failover in a live mount, with the HSMs' SoftHSM2 tokens taken away for real.

The volume is made and mounted through the real path (kmsfs-admin store with two HSMs, a Trust
and a Domain; ``kmsfs init``; ``kmsfs mount --foreground``). The fault: the serving token's
directory (STORE/private/tokens/<uuid>) is moved out of SoftHSM2's token directory while the
daemon has a session open on it.

What SoftHSM2 2.6 really does then (measured): the open session and its session objects (the
unwrapped ``mk``) keep working, since they live in the module's memory; C_GetTokenInfo on the
token's slot fails with CKR_GENERAL_ERROR, the token's own key pairs are gone, and the module
never sees the token again until it is re-initialized. Nothing short of closing the session from
inside the process makes the session itself fail. So the daemon probes the serving token
(``DomainKeys.PROBE_INTERVAL``) and fails over when it is gone; that is the path tested here.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest

from kmsfs.fs.files import KEYS_AHEAD_MAX
from tests.integration.fault_helpers import (
    RealMount,
    drop_cache,
    kmsfs,
    token_dir,
    wait_for,
    write_synced,
)
from tests.kms_helpers import Admin

PROBE_WAIT = 0.4  # > DomainKeys.PROBE_INTERVAL
RETRY_WAIT = 1.3  # > DomainKeys.RETRY_INTERVAL


def _read_uncached(path: Path) -> bytes:
    drop_cache(path)
    return path.read_bytes()


def _serving(mount: RealMount) -> str:
    lines = [ln for ln in mount.log().splitlines() if "keys served by HSM" in ln]
    assert lines, mount.log()
    return lines[-1].rsplit(" ", 1)[-1]


@pytest.mark.slow
def test_failover_between_hsms_in_a_live_mount(tmp_path: Path, initialized: Admin) -> None:
    store = initialized.store
    initialized.real_domain()
    cipher = tmp_path / "cipher"
    proc = kmsfs("init", str(cipher), "--domain", "payroll", "--store", str(store))
    assert proc.returncode == 0, proc.stderr
    mount = RealMount(store, cipher, tmp_path / "mnt", tmp_path / "mount.log")
    away = tmp_path / "tokens-away"
    away.mkdir()
    moved: dict[Path, Path] = {}

    def take_away(label: str) -> None:
        src = token_dir(store, label)
        moved[src] = away / src.name
        shutil.move(src, moved[src])

    def bring_back(src: Path) -> None:
        shutil.move(moved.pop(src), src)

    mount.start()
    held = -1
    try:
        m = mount.mountpoint
        write_synced(m / "before", b"b" * 10_000)
        write_synced(m / "closed-before", b"c" * 9_000)
        held = os.open(m / "held", os.O_CREAT | os.O_RDWR, 0o644)
        os.write(held, b"h" * 5000)  # its key is derived now and kept while it is open
        first = _serving(mount)
        second = {"hsm1": "hsm2", "hsm2": "hsm1"}[first]

        # 1. The serving HSM's token vanishes: the other HSM serves, no error reaches the user.
        take_away(first)
        time.sleep(PROBE_WAIT)
        write_synced(m / "after-1", b"x" * 12_345)
        assert _read_uncached(m / "after-1") == b"x" * 12_345
        assert _read_uncached(m / "closed-before") == b"c" * 9_000  # newly opened: new key
        assert wait_for(lambda: _serving(mount) == second, 5), mount.log()
        assert f"HSM {first} failed" in mount.log()

        # 2. No HSM left: a new key fails with EIO and a log line that says why; files whose
        #    keys are held keep working, and so do the few keys derived ahead for new files.
        take_away(second)
        time.sleep(PROBE_WAIT)
        for n in range(KEYS_AHEAD_MAX + 1):
            failed = m / f"after-2-{n}"
            fd = os.open(failed, os.O_CREAT | os.O_WRONLY, 0o644)  # empty: needs no key
            try:
                os.write(fd, b"y" * 100)
            except OSError as exc:
                assert exc.errno == errno.EIO
                break
            finally:
                os.close(fd)
        else:
            pytest.fail(f"{KEYS_AHEAD_MAX + 1} new files written with no HSM: too many ahead")
        with pytest.raises(OSError) as exc:
            _read_uncached(m / "before")
        assert exc.value.errno == errno.EIO
        log = mount.log()
        assert "hsm:" in log and "no HSM could serve" in log and "not present" in log, log
        os.pwrite(held, b"H" * 3000, 4000)
        os.fsync(held)
        drop_cache(m / "held")
        assert os.pread(held, 10_000, 0) == b"h" * 4000 + b"H" * 3000
        assert os.listdir(m)  # names need no HSM: their key was derived at mount

        # 3. An HSM comes back: service resumes by itself, without a remount.
        bring_back(token_dir_path := next(iter(moved)))
        time.sleep(RETRY_WAIT)
        write_synced(m / "after-3", b"z" * 7_000)
        assert _read_uncached(m / "after-3") == b"z" * 7_000
        assert _read_uncached(m / "before") == b"b" * 10_000
        with open(failed, "ab") as f:
            f.write(b"y" * 100)
        assert _read_uncached(failed) == b"y" * 100
        assert token_dir_path.exists()
        assert "Traceback" not in mount.log(), mount.log()
    finally:
        if held >= 0:
            os.close(held)
        mount.stop()
        for src in list(moved):
            bring_back(src)
    assert not os.path.ismount(mount.mountpoint)
