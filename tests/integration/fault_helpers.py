"""Helpers for the fault-injection tests (test_faults_*.py): real mounts, tmpfs, SoftHSM tokens.

Nothing here mocks SoftHSM or FUSE: a :class:`RealMount` is ``kmsfs mount --foreground`` with a
real store, a :func:`tmpfs` is a real size-limited filesystem, and :func:`token_dir` finds the
directory that *is* an embedded SoftHSM2 token, so a test can take the token away for real.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tests.integration.fs_helpers import stop_daemon

KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what would point a child at another store, token
    config or agent than the test gives it on the command line; plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("KMSFS_STORE", "SOFTHSM2_CONF") and not k.startswith("KMSFS_AGENT")
    }
    env.update(extra)
    return env


def kmsfs(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KMSFS, *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(), check=False)


def token_dir(store: Path, label: str) -> Path:
    """The SoftHSM2 token directory (STORE/private/tokens/<uuid>) of the token ``label``."""
    padded = label.encode().ljust(32, b" ")  # CK_TOKEN_INFO labels are blank-padded to 32
    found = [d for d in (store / "private" / "tokens").iterdir()
             if (d / "token.object").exists() and padded in (d / "token.object").read_bytes()]
    assert len(found) == 1, f"token {label!r}: found {found}"
    return found[0]


def write_synced(path: Path, data: bytes) -> None:
    """Create or replace ``path`` with ``data`` and fsync it: what "fsync'd" means in tests."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class RealMount:
    """``kmsfs mount --foreground`` of a real volume in a subprocess; its log in a file."""

    def __init__(self, store: Path, cipherdir: Path, mountpoint: Path, log_path: Path) -> None:
        self.store, self.cipherdir, self.mountpoint = store, cipherdir, mountpoint
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def key_args(self) -> list[str]:
        """Where the mount gets its keys: the store's HSMs, in process."""
        return ["--store", str(self.store)]

    def start(self, timeout: float = 30.0) -> RealMount:
        self.mountpoint.mkdir(exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*KMSFS, "mount", "--foreground", *self.key_args(),
                 str(self.cipherdir), str(self.mountpoint)],
                stdout=log, stderr=log, env=clean_env())
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mount failed:\n{self.log()}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        stop_daemon(self.proc, self.mountpoint)
        self.proc = None


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` (e.g. "8m") mounted at ``path``; always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True, capture_output=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def ext4_image(workdir: Path, size: str = "64M") -> Iterator[tuple[Path, Path]]:
    """An ext4 file system in an image file, loop-mounted at ``workdir/disk``: yields (the
    mount point, the image). A copy of the image taken while it is mounted is what a power cut
    would leave on the disk (what the loop device has written, not the page cache of the file
    system on it); :func:`after_power_cut` mounts such a copy, replaying ext4's journal as a
    boot would."""
    workdir.mkdir(parents=True, exist_ok=True)
    image, disk = workdir / "disk.img", workdir / "disk"
    subprocess.run(["truncate", "-s", size, str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    disk.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(disk)], check=True, capture_output=True)
    try:
        yield disk, image
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@contextlib.contextmanager
def after_power_cut(image: Path, at: Path) -> Iterator[Path]:
    """The disk as a power cut now would leave it: a copy of the loop-mounted *image*,
    mounted at *at* (ext4 replays its journal); unmounted afterwards."""
    copy = image.with_name(image.name + ".cut")
    subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
    at.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(copy), str(at)], check=True, capture_output=True)
    try:
        yield at
    finally:
        if subprocess.run(["umount", str(at)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(at)], capture_output=True)
        copy.unlink()


def wait_for(predicate, timeout: float = 10.0, step: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def drop_cache(path: Path) -> None:
    """Evict ``path``'s pages from the kernel page cache, so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
