"""No plaintext name, content, symlink target or xattr leaves the mount (DESIGN.md 2.4)."""

from __future__ import annotations

import os
from pathlib import Path

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

    seen = 0
    for root, dirs, files in os.walk(volume):
        for name in dirs + files:
            path = os.path.join(root, name)
            blobs = [os.fsencode(name)]
            if os.path.islink(path):
                blobs.append(os.fsencode(os.readlink(path)))
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    blobs.append(f.read())
            for attr in os.listxattr(path, follow_symlinks=False):
                blobs += [attr.encode(), os.getxattr(path, attr, follow_symlinks=False)]
            for blob in blobs:
                for secret in SECRETS:
                    assert secret not in blob, (path, secret)
            seen += 1
    assert seen >= 8
