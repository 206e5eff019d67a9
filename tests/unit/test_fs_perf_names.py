"""The encrypted-name cache of kmsfs.fs.names.DirNames: same answers as the cipher, bounded."""

from __future__ import annotations

import errno
import os

import pytest

from kmsfs.crypto.names import NameCipher
from kmsfs.fs import names
from kmsfs.fs.names import DirNames


def test_cached_names_are_the_cipher_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(names, "NAME_CACHE_SIZE", 8)
    cipher = NameCipher(os.urandom(32))
    dn = DirNames(cipher)
    ivs = [os.urandom(16) for _ in range(3)]
    plain = [b"a", b"b" * 200, b"file.txt", "é".encode()]  # short and long names
    for _ in range(3):  # misses, hits and evictions interleaved
        for iv in ivs:
            for name in plain:
                assert dn.disk_name(iv, name) == cipher.encrypt_to_disk(iv, name)
    # one name in two directories: two different entries, never confused
    assert dn.disk_name(ivs[0], b"x") != dn.disk_name(ivs[1], b"x")
    assert len(dn._names) <= 8


@pytest.mark.parametrize(
    ("name", "code"),
    [(b"x" * 256, errno.ENAMETOOLONG), (b"a/b", errno.EINVAL), (b"..", errno.EINVAL)],
)
def test_bad_names_are_refused_every_time(name: bytes, code: int) -> None:
    dn = DirNames(NameCipher(os.urandom(32)))
    for _ in range(2):
        with pytest.raises(OSError) as info:
            dn.disk_name(os.urandom(16), name)
        assert info.value.errno == code
    assert not dn._names
