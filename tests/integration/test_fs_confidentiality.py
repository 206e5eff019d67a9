"""No plaintext name, content, symlink target or xattr leaves the mount (DESIGN.md 2.4)."""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path

from kmsfs.fs.dirpool import POOL_DIR

SECRETS = [b"hushhush-name-one", b"TOPSECRET-CONTENT", b"classified-dir", b"linktarget-xyz",
           b"xattr-secret-val", b"longsecretname"]


def test_no_plaintext_under_cipherdir(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    m = mount.mountpoint
    (m / "classified-dir").mkdir()
    (m / "classified-dir" / "hushhush-name-one").write_bytes(b"TOPSECRET-CONTENT" * 500)
    (m / "small").write_bytes(b"TOPSECRET-CONTENT")
    (m / ("longsecretname" * 15)).write_bytes(b"x")
    os.symlink("linktarget-xyz/" * 3, m / "ln")
    os.symlink("linktarget-xyz/" * 200, m / "longln")
    os.setxattr(m / "small", "user.hushhush-name-one", b"xattr-secret-val")
    mount.stop()
    assert _scanned(volume) >= 8


def _scanned(volume: Path) -> int:
    """Every name, file, symlink target and xattr under *volume* checked for SECRETS; how many
    entries were looked at."""
    seen = 0
    pool = os.path.join(volume, POOL_DIR)
    for root, dirs, files in os.walk(volume):
        for name in dirs + files:
            path = os.path.join(root, name)
            blobs = [os.fsencode(name)]
            try:
                if os.path.islink(path):
                    blobs.append(os.fsencode(os.readlink(path)))
                elif os.path.isfile(path):
                    with open(path, "rb") as f:
                        blobs.append(f.read())
                for attr in os.listxattr(path, follow_symlinks=False):
                    blobs += [attr.encode(), os.getxattr(path, attr, follow_symlinks=False)]
            except FileNotFoundError:
                # a live mount's pool thread renames its directories made ahead (each just an
                # IV) at any moment; anything else that vanishes is a failure
                if not path.startswith(pool + "/"):
                    raise
            for blob in blobs:
                for secret in SECRETS:
                    assert not _holds(blob, secret), (path, secret)
            seen += 1
    return seen


#: Runs of base64 (either alphabet) long enough to hold a secret once decoded.
_BASE64_RUN = re.compile(rb"[A-Za-z0-9_+/-]{16,}")


def _holds(blob: bytes, secret: bytes) -> bool:
    """*secret* in *blob*, as it is or in a run of base64 decoded: names, symlink targets,
    sidecars and blobs are base64url on disk, so a name stored only encoded (not encrypted)
    would pass a search of the raw bytes."""
    if secret in blob:
        return True
    for run in _BASE64_RUN.findall(blob):
        for start in range(4):  # a run may begin mid-quantum (after a prefix such as "user.")
            chunk = run[start:]
            chunk = chunk[: len(chunk) - 1] if len(chunk) % 4 == 1 else chunk  # no byte there
            chunk += b"=" * (-len(chunk) % 4)
            for decode in (base64.urlsafe_b64decode, base64.b64decode):
                try:
                    if secret in decode(chunk):
                        return True
                except ValueError:
                    continue
    return False


def test_the_scan_sees_a_secret_only_encoded() -> None:
    """The scan itself: what an encoding alone would leave is found."""
    secret = SECRETS[0]
    for encoded in (base64.urlsafe_b64encode(b"\xfb" + secret).rstrip(b"="),
                    b"user." + base64.b64encode(secret).rstrip(b"="),
                    b"dir/" + base64.urlsafe_b64encode(b"ab" + secret) + b"/x"):
        assert _holds(encoded, secret), encoded
    assert not _holds(base64.urlsafe_b64encode(os.urandom(40)), secret)


def test_no_plaintext_under_cipherdir_while_mounted_nor_after_a_crash(  # type: ignore[no-untyped-def]
    volume: Path, mounter
) -> None:
    """A clean unmount empties the write journal, so a scan after it alone never sees what
    the journal held: look while the mount serves overwrites (redo records), and after a
    kill -9 that leaves them for the next mount (found by a mutation audit)."""
    mount = mounter(volume)
    big = mount.mountpoint / "hushhush-name-one"
    big.write_bytes(os.urandom(64 * 1024))
    fd = os.open(big, os.O_WRONLY)
    try:
        for at in range(100, 60_000, 5_000):  # overwrites inside blocks: each a redo record
            os.pwrite(fd, b"TOPSECRET-CONTENT", at)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _scanned(volume) >= 3
    mount.kill9()
    assert (volume / "kmsfs.journal").read_bytes().startswith(b"KJR1")  # records: scanned too
    assert _scanned(volume) >= 3
    again = mounter(volume)
    assert (again.mountpoint / "hushhush-name-one").read_bytes()[100:117] == b"TOPSECRET-CONTENT"
    again.stop()
    assert _scanned(volume) >= 3
