"""The encrypted-name cache of kmsfs.fs.names.DirNames: same answers as the cipher, bounded."""

from __future__ import annotations

import errno
import os

import pytest

from kmsfs.crypto.names import NameCipher, VolumeNames
from kmsfs.fs import names
from kmsfs.fs.names import DirNames

_SECRET = os.urandom(32)


def test_cached_names_are_the_cipher_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(names, "NAME_CACHE_SIZE", 8)
    secret = os.urandom(32)
    cipher = NameCipher(secret)
    dn = DirNames(VolumeNames(lambda epoch: secret))
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
    dn = DirNames(VolumeNames(lambda epoch: _SECRET))
    for _ in range(2):
        with pytest.raises(OSError) as info:
            dn.disk_name(os.urandom(16), name)
        assert info.value.errno == code
    assert not dn._names


def _volume_dir(tmp_path, cipher: NameCipher, iv: bytes, plain: list[bytes]):  # type: ignore[no-untyped-def]
    for name in plain:
        disk = cipher.encrypt_to_disk(iv, name)
        names.write_sidecar(os.fsencode(tmp_path), disk)
        (tmp_path / disk.name).write_bytes(b"")
    return os.fsencode(tmp_path)


def test_a_listing_feeds_both_caches_with_the_cipher_s_answers(tmp_path) -> None:  # type: ignore[no-untyped-def]
    secret = os.urandom(32)
    cipher = NameCipher(secret)
    iv = os.urandom(16)
    plain = [b"a", b"file.txt", b"b" * 200]  # the last is a long name (sidecar)
    dirpath = _volume_dir(tmp_path, cipher, iv, plain)
    dn = DirNames(VolumeNames(lambda epoch: secret))
    listed = dn.list_dir(iv, dirpath, "/d")
    assert sorted(p for _, p in listed) == sorted(plain)
    dn.remember_listing(iv, listed)
    for name in plain:
        assert dn.disk_name(iv, name) == cipher.encrypt_to_disk(iv, name)
    assert dn.list_dir(iv, dirpath, "/d") == listed  # again, from the reverse cache
    assert (iv, os.fsdecode(cipher.encrypt_to_disk(iv, b"file.txt").name)) in dn._plain
    assert all(not k[1].startswith("kmsfs.") for k in dn._plain)  # long names: never cached


def test_a_tampered_entry_is_refused_even_after_listing(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    secret = os.urandom(32)
    cipher = NameCipher(secret)
    iv = os.urandom(16)
    dirpath = _volume_dir(tmp_path, cipher, iv, [b"good"])
    dn = DirNames(VolumeNames(lambda epoch: secret))
    dn.remember_listing(iv, dn.list_dir(iv, dirpath, "/d"))
    good = cipher.encrypt_to_disk(iv, b"good").name
    forged = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
    (tmp_path / forged).write_bytes(b"")
    listed = dn.list_dir(iv, dirpath, "/d")
    assert [p for _, p in listed] == [b"good"]
    assert "undecryptable entry" in caplog.text
    # the same name in another directory (another IV) is not the cached one
    assert dn.list_dir(os.urandom(16), dirpath, "/e") == []


def test_both_caches_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(names, "NAME_CACHE_SIZE", 8)
    dn = DirNames(VolumeNames(lambda epoch: _SECRET))
    iv = os.urandom(16)
    for i in range(50):
        dn.disk_name(iv, b"n%d" % i)
    dn.remember_listing(iv, [(b"x%d" % i, b"p%d" % i) for i in range(50)])
    assert len(dn._names) <= 8 and len(dn._plain) <= 8
