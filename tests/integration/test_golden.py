"""Data written by an earlier build must stay readable: the committed golden volumes.

``tools/make_golden.py`` made ``tests/golden/v<N>/`` (a test store with its SoftHSM2 token, a
ciphertext tree, a manifest). This test copies one to a temporary place (so the store also has
to cope with having moved), mounts it with the real ``kmsfs`` command on the real HSM path, and
compares every entry with the manifest. A format change that cannot read it fails here.
The Domains of v1 and v2 predate key binding: each is bound first, as an operator upgrading
would (the refusal before, and the rewrap that binds it). v2-name-epochs (bound) has a directory
made after its Domain's rotation, whose names are keyed with epoch 2.
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
ADMIN = [sys.executable, "-m", "kmsfs.admin.cli"]


def _unmount(mnt: Path) -> None:
    for _ in range(50):
        if not os.path.ismount(mnt):
            return
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        time.sleep(0.1)


def _bind(copy: Path, env: dict[str, str], described: dict, mnt: Path) -> None:
    """A Domain made before key binding: refused (exit 3, one line saying what to run, nothing
    mounted) until an operator binds it with a rewrap into its own Trust, as docs/operators.md
    says; then it mounts."""
    refused = subprocess.run(
        [*KMSFS, "mount", str(copy / "cipher"), str(mnt)],
        env=env, capture_output=True, text=True, timeout=60,
    )
    name, trust = described["domain_name"], described["trust_id"]
    assert refused.returncode == 3
    assert refused.stderr == (
        f"kmsfs: error: domain {name} (generation {described['generation']}) predates key "
        "binding, so nothing shows its keys are its own: an operator must bind it first with "
        f"'kmsfs-admin domain rewrap {name} --trust {trust[:12]}'\n"
    )
    assert not os.path.ismount(mnt) and not any(mnt.iterdir())
    subprocess.run(
        [*ADMIN, "--store", str(copy / "store"), "domain", "rewrap", name, "--trust", trust[:12]],
        env=env, check=True, capture_output=True, timeout=120,
    )


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
    described = json.loads(info.stdout)
    assert described["verified"] is True

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not described["key_binding"]:  # made before key binding: bound as upgraders do
        _bind(copy, env, described, mnt)
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


def test_a_golden_volume_keeps_a_directory_whose_names_are_keyed_with_epoch_2() -> None:
    """The 18-byte ``kmsfs.diriv`` (docs/format.md, "Directory IV") is in the golden set, so a
    later change that cannot read it fails above."""
    from kmsfs.crypto.names import DIRIV_NAME, epoch_of, parse_dir_iv

    cipher = GOLDEN / "v2-name-epochs" / "cipher"
    epochs = sorted(epoch_of(parse_dir_iv(p.read_bytes())) for p in cipher.rglob(DIRIV_NAME))
    assert epochs[0] == 1 and epochs[-1] == 2 and epochs.count(2) == 1


def test_a_golden_volume_keeps_symlinks_whose_targets_are_sealed_with_epoch_2() -> None:
    """Targets sealed under epoch 2, the nonce naming it (docs/format.md, "Key epochs"), are in
    the golden set, short and long, so a later change that cannot read them fails above."""
    from kmsfs.crypto.encoding import b64url_decode
    from kmsfs.crypto.symlinks import LONGLINK_DIR, is_longlink

    cipher = GOLDEN / "v2-value-epochs" / "cipher"
    named = []
    for link in (p for p in cipher.rglob("*") if p.is_symlink()):
        stored = os.readlink(link)
        long = is_longlink(stored)
        encoded = (cipher / LONGLINK_DIR / stored).read_text() if long else stored
        named.append((int.from_bytes(b64url_decode(encoded)[:2], "big"), long))
    assert sorted(e for e in named if e[0] == 2) == [(2, False), (2, True)]
    assert len(named) == 4  # and the two of epoch 1
