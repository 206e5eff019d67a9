"""Listing long xattr names (kmsfs.fs.xattrs, LongXattrNames) over a real ciphertext file:
entries an attacker with write access to CIPHERDIR plants or cuts are hidden, never shown.

Works on the host's /tmp (ext4 here: user xattrs), no FUSE: the listing is kmsfs's own code.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsfs.crypto.encoding import b64url_decode, b64url_encode, sha256_b64url
from kmsfs.crypto.xattrs import XattrCipher
from kmsfs.fs.xattrs import Xattrs

SECRET = bytes(range(32))
LONG = b"user." + b"L" * 200


@pytest.fixture
def target(tmp_path: Path) -> bytes:
    path = tmp_path / "cipherfile"
    path.write_bytes(b"")
    return os.fsencode(path)


def test_a_long_name_lists_and_reads_back(target: bytes) -> None:
    x = Xattrs(XattrCipher(SECRET), long_names=True)
    x.set(target, LONG, b"v")
    x.set(target, b"user.short", b"s")
    assert sorted(x.list(target)) == sorted([b"user.short", LONG])
    assert x.get(target, LONG) == b"v"


def test_forged_and_cut_long_entries_are_hidden(target: bytes) -> None:
    c = XattrCipher(SECRET)
    x = Xattrs(c, long_names=True)
    x.set(target, b"user.a", b"1")
    x.set(target, LONG, b"v")
    # A long entry made from user.a's sealed bytes: it would list user.a twice.
    sealed = b64url_decode(c.disk_name(b"user.a")[len(b"user.") :].decode())
    forged = b"user.l." + sha256_b64url(b64url_encode(sealed)).encode()
    os.setxattr(target, forged, len(sealed).to_bytes(2, "big") + sealed + bytes(28))
    # The real long entry cut down to its sealed name: the name is right, the value is gone.
    disk = c.disk_name(LONG, long_names=True)
    stored = os.getxattr(target, disk)
    os.setxattr(target, disk, stored[: 2 + int.from_bytes(stored[:2], "big")])
    assert x.list(target) == [b"user.a"]


def test_without_the_flag_long_entries_are_hidden(target: bytes) -> None:
    Xattrs(XattrCipher(SECRET), long_names=True).set(target, LONG, b"v")
    assert Xattrs(XattrCipher(SECRET)).list(target) == []
