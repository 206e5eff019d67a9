"""Shared helpers for the real-FUSE tests: a software KeyDeriver, volumes and mounts.

Each mount runs ``fs_mount_stub.py`` in its own subprocess (as pyfuse3's own tests do), so a
crash of the daemon cannot take the test runner with it, and ``kill -9`` can be tested.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from kmsfs.crypto.names import DIRIV_NAME
from kmsfs.errors import IntegrityError
from kmsfs.fs.config import VolumeConfig
from kmsfs.fs.dirpool import POOL_DIR, POOL_SIZE, is_ready_name
from kmsfs.fs.volume import create_volume
from kmsfs.service.domains import VOLUME_KEY_INFOS

STUB = Path(__file__).with_name("fs_mount_stub.py")
TEST_KEY = bytes(range(32))


class SoftDeriver:
    """HMAC-SHA256 with fixed keys: the test stand-in for the HSM-backed KeyDeriver.

    Epoch 1 is keyed with ``key`` (as before epochs existed, so old test data stays readable);
    epoch ``e`` > 1 with ``HMAC(key, "epoch" || e)``. The deriver knows epochs 1 ..
    ``current_epoch`` (settable), like a Domain after ``current_epoch - 1`` rotations; asking for
    another raises IntegrityError, as the HSM-backed deriver does.
    """

    def __init__(self, key: bytes = TEST_KEY, current_epoch: int = 1,
                 retired_below: int = 1) -> None:
        self._key = key
        self.current_epoch = current_epoch
        self.retired_below = retired_below  # what a retirement it has taken in says

    def _epoch_key(self, epoch: int) -> bytes:
        if epoch == 1:
            return self._key
        return hmac.new(self._key, b"epoch" + epoch.to_bytes(2, "big"), hashlib.sha256).digest()

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        epoch = self.current_epoch if epoch is None else epoch
        if not 1 <= epoch <= self.current_epoch:
            raise IntegrityError(
                f"Domain test-domain has no key epoch {epoch} "
                f"(its epochs are 1 to {self.current_epoch})"
            )
        return hmac.new(self._epoch_key(epoch), info, hashlib.sha256).digest()


class RetiringDeriver(SoftDeriver):
    """A :class:`SoftDeriver` that refuses what a retirement refuses, as
    ``DomainKeys.derive_many`` does: any key but the volume keys (names, symlink targets, xattr
    values) at an epoch below ``retired_below``."""

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        epoch = self.current_epoch if epoch is None else epoch
        if epoch < self.retired_below and info not in VOLUME_KEY_INFOS:
            raise IntegrityError(f"key epoch {epoch} of Domain test-domain is retired "
                                 f"(epochs below {self.retired_below})")
        return super().derive(info, epoch)


def sample_config() -> VolumeConfig:
    return VolumeConfig(domain_name="test-domain", domain_id="test-domain-id",
                        domain_bundle=b'{"test": "bundle"}')


def renameat2(old: Path, new: Path, flags: int) -> None:
    """rename(2) with flags (1: RENAME_NOREPLACE, 2: RENAME_EXCHANGE), which os lacks."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, bytes(old), -100, bytes(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def make_volume(cipherdir: Path) -> Path:
    create_volume(cipherdir, sample_config())
    return cipherdir


def ciphertext_paths(volume: Path) -> list[str]:
    """Every path in the ciphertext tree *volume* of a live mount, but for ``kmsfs.newdirs/``:
    the daemon's pool thread makes and renames directories there at any moment, so a walk
    into it races with the daemon (an entry listed, then gone before its lstat)."""
    paths = []
    for dirpath, dirs, files in os.walk(volume):
        if dirpath == os.fspath(volume) and POOL_DIR in dirs:
            dirs.remove(POOL_DIR)
        paths += [os.path.join(dirpath, name) for name in dirs + files]
    return paths


def pool_ready(volume: Path) -> dict[str, bytes]:
    """The ready directories in a volume's ``kmsfs.newdirs/``: name -> IV."""
    pool = volume / POOL_DIR
    return {
        n: (pool / n / DIRIV_NAME).read_bytes()
        for n in os.listdir(pool)
        if is_ready_name(n.encode())
    }


def wait_pool_full(volume: Path) -> dict[str, bytes]:
    """Wait until a root mount's pool thread has made all its directories and is idle, so it
    takes no inode number (nor anything else) while a test looks; the ready directories."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (volume / POOL_DIR).is_dir() and len(ready := pool_ready(volume)) >= POOL_SIZE:
            return ready
        time.sleep(0.02)
    raise AssertionError("the pool never filled")


def is_mounted(path: Path) -> bool:
    """True if *path* is a mount point, a dead FUSE mount included: ``os.path.ismount`` says
    False for one (it cannot stat it: ENOTCONN), which let teardown leave such mounts behind."""
    target = os.path.abspath(path)
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
        return any(line.split()[1].replace("\\040", " ") == target for line in mounts)


def stop_daemon(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Unmount cleanly; escalate to SIGKILL and a lazy unmount if the daemon hangs or died."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if is_mounted(mountpoint):
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


def daemon_script(
    volume: Path, target: Path, hooks: str = "", log_file: Path | None = None,
    through_run: bool = False,
) -> str:
    """A program (``python -c``, run from the repo) that serves *volume* at *target* as a real
    mount's daemon, with the stub deriver, once *hooks* ran: code that patches one step of
    it, to send a signal at a chosen moment (``volume`` and ``target`` are defined for them).
    It prints ``ready`` once ready; with *through_run* it runs inside ``cliutil.run``, so the
    product's handlers and exit codes apply (SIGTERM raising Terminated: 143)."""
    serve = (
        "daemon.serve(volume, target, SoftDeriver(), daemon.mount_options([]), "
        "on_ready=lambda: print('ready', flush=True))"
    )
    log = f"Path({str(log_file)!r})" if log_file is not None else "None"
    return (
        "import os, signal, sys; sys.path.insert(0, 'tests/integration')\n"
        "from pathlib import Path\n"
        "import pyfuse3, trio\n"
        "from fs_helpers import SoftDeriver\n"
        "from kmsfs import cliutil\n"
        "from kmsfs.fs import daemon, daemonlog\n"
        f"volume, target = Path({str(volume)!r}), Path({str(target)!r})\n"
        + hooks
        + f"daemonlog.setup_logging(foreground=True, log_file={log})\n"
        + (f"sys.exit(cliutil.run('kmsfs', lambda: {serve}))\n" if through_run else serve + "\n")
    )


class Mount:
    """One stub daemon serving CIPHERDIR at MOUNTPOINT; its stderr goes to ``log_path``."""

    def __init__(self, cipherdir: Path, mountpoint: Path, log_path: Path,
                 options: tuple[str, ...] = (), epoch: int = 1, retired_below: int = 1) -> None:
        self.cipherdir, self.mountpoint, self.log_path = cipherdir, mountpoint, log_path
        self.options = options
        self.epoch = epoch  # the stub deriver's current_epoch
        self.retired_below = retired_below  # and the retirement it has taken in
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Mount:
        self.mountpoint.mkdir(exist_ok=True)
        cmd = [sys.executable, str(STUB), str(self.cipherdir), str(self.mountpoint)]
        for opt in self.options:
            cmd += ["-o", opt]
        if self.epoch != 1:
            cmd += ["--epoch", str(self.epoch)]
        if self.retired_below != 1:
            cmd += ["--retired-below", str(self.retired_below)]
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the daemon's lifetime)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            self.proc.wait()
            self._close()
            raise RuntimeError(f"mount failed: {line!r}\n{self.log()}")
        while not os.path.ismount(self.mountpoint) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Unmount cleanly; escalate to SIGKILL and a lazy unmount if the daemon hangs."""
        if self.proc is None:
            return
        stop_daemon(self.proc, self.mountpoint)
        self._close()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


def quiet_walk(top: Path) -> list[Path]:
    """Every path below *top* (sorted per directory), listed with O_NOATIME (as root): unlike
    os.walk or rglob, looking does not move the directory atimes a test compares."""
    found, stack = [], [top]
    while stack:
        d = stack.pop()
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        for name in names:
            found.append(d / name)
            if stat.S_ISDIR(os.lstat(d / name).st_mode):
                stack.append(d / name)
    return found


def reencrypt_leftovers(volume: Path) -> list[str]:
    """Temporary names and saved directory times a ``kmsfs reencrypt`` run left behind."""
    from kmsfs.fs.reencrypt_resume import TIMES_XATTR
    from kmsfs.fs.reencrypt_walk import TEMP_PREFIX

    out = []
    for path in (volume, *quiet_walk(volume)):
        if path.name.startswith(TEMP_PREFIX):
            out.append(str(path))
        elif stat.S_ISDIR(os.lstat(path).st_mode) and TIMES_XATTR in os.listxattr(path):
            out.append(f"{path} (saved times)")
    return out
