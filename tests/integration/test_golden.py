"""Data written by an earlier build must stay readable: the committed golden volumes.

``tools/make_golden.py`` made ``tests/golden/v<N>/`` (a test store with its SoftHSM2 token, a
ciphertext tree, a manifest). This test copies one to a temporary place (so the store also has
to cope with having moved), mounts it with the real ``kmsfs`` command on the real HSM path, and
compares every entry with the manifest. A format change that cannot read it fails here.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]


def _unmount(mnt: Path) -> None:
    for _ in range(50):
        if not os.path.ismount(mnt):
            return
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        time.sleep(0.1)


@pytest.mark.parametrize("version", sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()))
def test_golden_volume_reads_back_exactly(version: str, tmp_path: Path) -> None:
    copy = tmp_path / version
    shutil.copytree(GOLDEN / version, copy, symlinks=True)
    (copy / "store" / "private").chmod(0o700)
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["KMSFS_STORE"] = str(copy / "store")
    manifest = json.loads((copy / "manifest.json").read_text())

    info = subprocess.run(
        [*KMSFS, "info", str(copy / "cipher"), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(info.stdout)["verified"] is True

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(
        [*KMSFS, "mount", str(copy / "cipher"), str(mnt)],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        seen = set()
        for root, dirs, files in os.walk(mnt):
            for name in dirs + files:
                seen.add(str((Path(root) / name).relative_to(mnt)))
        assert seen == set(manifest["entries"])
        for rel, want in manifest["entries"].items():
            path = mnt / rel
            if want["type"] == "file":
                data = path.read_bytes()
                assert len(data) == want["size"] and path.stat().st_size == want["size"], rel
                assert hashlib.sha256(data).hexdigest() == want["sha256"], rel
            elif want["type"] == "symlink":
                assert os.readlink(path) == want["target"], rel
            else:
                assert path.is_dir() and not path.is_symlink(), rel
    finally:
        _unmount(mnt)
    assert not os.path.ismount(mnt)
