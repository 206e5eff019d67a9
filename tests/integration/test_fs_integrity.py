"""Tampered ciphertext gives EIO and one log line naming the plaintext path; never bad data.

Covers DESIGN.md section 2, property 4: flipped bit, truncated mid-block, swapped blocks,
a block transplanted from another file, a damaged header, a damaged name. The mount must stay
up and other files must still read.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kmsfs.crypto.content import CIPHER_BLOCK_SIZE, HEADER_SIZE, cipher_offset
from kmsfs.crypto.names import DIRIV_NAME, NAMES_KEY_INFO, NameCipher
from tests.integration.fs_helpers import SoftDeriver

BS = 4096


def cipher_path(cipherdir: Path, name: str) -> Path:
    """Where the plaintext *name* in the volume root lives in the ciphertext directory."""
    dir_iv = (cipherdir / DIRIV_NAME).read_bytes()
    cipher = NameCipher(SoftDeriver().derive(NAMES_KEY_INFO))
    return cipherdir / cipher.encrypt_to_disk(dir_iv, name.encode()).name


def _swap(data: bytearray, i: int, j: int) -> None:
    a, b = cipher_offset(i), cipher_offset(j)
    block_i = data[a:a + CIPHER_BLOCK_SIZE]
    data[a:a + CIPHER_BLOCK_SIZE] = data[b:b + CIPHER_BLOCK_SIZE]
    data[b:b + CIPHER_BLOCK_SIZE] = block_i


TAMPERS = {
    "flipped": lambda d, other: d.__setitem__(cipher_offset(1) + 40, d[cipher_offset(1) + 40] ^ 1),
    "cut_mid_block": lambda d, other: d.__delitem__(slice(cipher_offset(2) + 1000, None)),
    "cut_short_tail": lambda d, other: d.__delitem__(slice(cipher_offset(2) + 10, None)),
    "swapped": lambda d, other: _swap(d, 0, 1),
    "transplanted": lambda d, other: d.__setitem__(
        slice(cipher_offset(1), cipher_offset(2)), other[cipher_offset(1):cipher_offset(2)]),
    "header": lambda d, other: d.__setitem__(slice(2, HEADER_SIZE), other[2:HEADER_SIZE]),
}


def test_tampering_gives_eio_and_logs_path(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    m = mount.mountpoint
    for name in TAMPERS:
        (m / name).write_bytes(os.urandom(3 * BS + 100))
    (m / "donor").write_bytes(os.urandom(3 * BS + 100))
    (m / "intact").write_bytes(b"still fine" * 1000)
    mount.stop()

    donor = cipher_path(volume, "donor").read_bytes()
    for name, tamper in TAMPERS.items():
        path = cipher_path(volume, name)
        data = bytearray(path.read_bytes())
        tamper(data, donor)
        path.write_bytes(bytes(data))

    mount.start()
    for name in TAMPERS:
        with pytest.raises(OSError) as info:
            (m / name).read_bytes()
        assert info.value.errno == errno.EIO, name
        assert (m / "intact").read_bytes() == b"still fine" * 1000
    assert mount.alive()
    log = mount.log()
    for name in TAMPERS:
        assert f"integrity: /{name} " in log, name
    assert "Traceback" not in log


def test_damaged_name_is_hidden_and_logged(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    (mount.mountpoint / "victim").write_bytes(b"v")
    (mount.mountpoint / "other").write_bytes(b"o")
    mount.stop()
    path = cipher_path(volume, "victim")
    bad = path.name[:-2] + ("A" if path.name[-2] != "A" else "B") + path.name[-1]
    path.rename(path.with_name(bad))
    mount.start()
    assert os.listdir(mount.mountpoint) == ["other"]
    assert "integrity: /: undecryptable entry" in mount.log()


def test_missing_diriv_gives_eio(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    (mount.mountpoint / "d").mkdir()
    (mount.mountpoint / "d" / "f").write_bytes(b"x")
    mount.stop()
    os.unlink(cipher_path(volume, "d") / DIRIV_NAME)
    mount.start()
    with pytest.raises(OSError) as info:
        os.listdir(mount.mountpoint / "d")
    assert info.value.errno == errno.EIO
    assert "integrity: /d" in mount.log()
