#!/usr/bin/env python3
"""Rebuild tests/golden/v<N>/: a store, a ciphertext tree made by this version, and a manifest.

The golden volume lets a test prove that a later change still reads data written by this format
version (as gocryptfs keeps tests/example_filesystems/). It holds a *test* store: one embedded
SoftHSM2 token whose PIN is in the store's private area, one operator, a sealed Trust and the
Domain. Never use these keys for anything else.

Only what git can carry is put in the tree: regular files (sizes around block boundaries),
directories, long names, short and long symlinks. Hard links, xattrs and FIFOs are covered by the
live mount tests instead (git stores none of them). From format version 2 on, the Domain is then
rotated once and more files are written, so the volume holds files of key epochs 1 and 2; a
build with name epochs writes them in a directory whose names are keyed with epoch 2 (an 18-byte
``kmsfs.diriv``), and one with ``SymlinkXattrEpochs`` adds two symlinks (short and long) whose
targets are sealed with epoch 2. The directories a mount makes ahead (``kmsfs.newdirs/``) are
not kept: they are the mount's, not the format's.

    .venv/bin/python tools/make_golden.py    # writes tests/golden/v<N> (refuses to overwrite)
    .venv/bin/python tools/make_golden.py --out tests/golden/v2-name-epochs
    .venv/bin/python tools/make_golden.py --out tests/golden/v2-value-epochs
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kmsfs.crypto.content import FORMAT_VERSION

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

SIZES = [0, 1, 4095, 4096, 4097, 10_000, 3 * 4096 + 7]
LONG_NAME = "long-" + "n" * 200 + ".txt"
LONG_TARGET = "t" * 4095
OPERATOR_PIN = "golden-operator-pin"


def content(size: int, seed: int) -> bytes:
    """Deterministic, incompressible-looking content."""
    out = bytearray()
    block = seed.to_bytes(4, "big")
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def run(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"make_golden: {' '.join(args[:3])}...: {proc.stderr.strip()}")
    return proc.stdout


def populate(mnt: Path) -> dict[str, dict[str, object]]:
    """Write the plaintext tree; return the manifest of what a reader must see."""
    manifest: dict[str, dict[str, object]] = {}
    (mnt / "docs" / "deep" / "er").mkdir(parents=True)
    for i, size in enumerate(SIZES):
        for rel in (f"file-{size}.bin", f"docs/deep/er/file-{size}.bin"):
            data = content(size, i)
            (mnt / rel).write_bytes(data)
            manifest[rel] = {
                "type": "file",
                "size": size,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
    data = b"a file with a name longer than the encrypted-name limit\n"
    (mnt / "docs" / LONG_NAME).write_bytes(data)
    manifest[f"docs/{LONG_NAME}"] = {
        "type": "file",
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    os.symlink("file-4096.bin", mnt / "short-link")
    manifest["short-link"] = {"type": "symlink", "target": "file-4096.bin"}
    os.symlink(LONG_TARGET, mnt / "docs" / "long-link")
    manifest["docs/long-link"] = {"type": "symlink", "target": LONG_TARGET}
    for rel in ("docs", "docs/deep", "docs/deep/er"):
        manifest[rel] = {"type": "dir"}
    return manifest


def unmount(mnt: Path) -> None:
    for _ in range(50):
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)


def populate_rotated(mnt: Path) -> dict[str, dict[str, object]]:
    """Files written after a rotation (key epoch 2), beside the epoch-1 ones."""
    manifest: dict[str, dict[str, object]] = {"rotated": {"type": "dir"}}
    (mnt / "rotated").mkdir()
    for i, size in enumerate((1, 4096, 10_000)):
        data = content(size, 100 + i)
        (mnt / "rotated" / f"epoch2-{size}.bin").write_bytes(data)
        manifest[f"rotated/epoch2-{size}.bin"] = {
            "type": "file",
            "size": size,
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    # a build with SymlinkXattrEpochs seals their targets with epoch 2 (its nonce names it)
    os.symlink("epoch2-4096.bin", mnt / "rotated" / "epoch2-link")
    manifest["rotated/epoch2-link"] = {"type": "symlink", "target": "epoch2-4096.bin"}
    os.symlink(LONG_TARGET[:-2] + "/2", mnt / "rotated" / "epoch2-long-link")
    manifest["rotated/epoch2-long-link"] = {"type": "symlink", "target": LONG_TARGET[:-2] + "/2"}
    return manifest


def build(out: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="kmsfs-golden-"))
    store, cipher, mnt = work / "store", work / "cipher", work / "mnt"
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["KMSFS_STORE"] = str(store)
    admin = [str(BIN / "kmsfs-admin")]
    kmsfs = [str(BIN / "kmsfs")]
    pin = work / "operator.pin"
    pin.write_text(OPERATOR_PIN + "\n")
    try:
        run(*admin, "init", "--hsms", "1", env=env)
        run(*admin, "operator", "create", "golden", "--pin-file", str(pin), env=env)
        trust = (
            run(
                *admin,
                "trust",
                "propose",
                "--hsm",
                "hsm1",
                "--operator",
                "golden",
                "--quorum",
                "1",
                env=env,
            )
            .strip()
            .splitlines()[-1]
        )
        run(*admin, "trust", "sign", trust, "--as", "golden", "--pin-file", str(pin), env=env)
        run(*admin, "trust", "seal", trust, env=env)
        run(*admin, "domain", "create", "golden", "--trust", trust, env=env)
        run(*kmsfs, "init", str(cipher), "--domain", "golden", env=env)
        mnt.mkdir()
        run(*kmsfs, "mount", str(cipher), str(mnt), env=env)
        try:
            manifest = populate(mnt)
        finally:
            unmount(mnt)
        if FORMAT_VERSION >= 2:
            run(*admin, "domain", "rotate", "golden", env=env)
            run(*kmsfs, "mount", str(cipher), str(mnt), env=env)
            try:
                manifest.update(populate_rotated(mnt))
            finally:
                unmount(mnt)
        out.mkdir(parents=True)
        shutil.copytree(store, out / "store", symlinks=True)
        shutil.copytree(cipher, out / "cipher", symlinks=True,
                        ignore=lambda d, names: ["kmsfs.newdirs"] if Path(d) == cipher else [])
        (out / "manifest.json").write_text(
            json.dumps(
                {"format_version": FORMAT_VERSION, "domain": "golden", "entries": manifest},
                indent=1,
                sort_keys=True,
            )
            + "\n"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "tests" / "golden" / f"v{FORMAT_VERSION}"
    )
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"make_golden: {args.out} exists; golden volumes are never rewritten in place")
    build(args.out)
    print(f"make_golden: wrote {args.out}")


if __name__ == "__main__":
    main()
