"""Tampered ciphertext gives EIO and one log line naming the plaintext path; never bad data.

Covers DESIGN.md section 2, property 4: flipped bit, truncated mid-block, swapped blocks,
a block transplanted from another file, a damaged header, a damaged name. The mount must stay
up and other files must still read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import threading
from pathlib import Path

import pytest

from kmsfs.crypto.content import CIPHER_BLOCK_SIZE, HEADER_SIZE, cipher_offset
from kmsfs.crypto.encoding import URLSAFE_ALPHABET
from kmsfs.crypto.names import DIRIV_NAME, NAMES_KEY_INFO, NameCipher
from kmsfs.crypto.xattrs import XATTR_KEY_INFO, XattrCipher
from kmsfs.fs.fsck import Report, check_tree
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


def _damaged(disk_name: str) -> str:
    """*disk_name* with its second-to-last character changed (still base64url)."""
    return disk_name[:-2] + ("A" if disk_name[-2] != "A" else "B") + disk_name[-1]


def respelled_name(disk_name: str) -> str:
    """*disk_name* with a spare bit of its last character set: the same bytes to a lenient
    base64url decoder, not the one spelling kmsfs writes."""
    last = URLSAFE_ALPHABET.index(disk_name[-1].encode())
    return disk_name[:-1] + chr(URLSAFE_ALPHABET[last ^ 1])


def test_damaged_name_is_hidden_and_logged(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    mount = mounter(volume)
    (mount.mountpoint / "victim").write_bytes(b"v")
    (mount.mountpoint / "other").write_bytes(b"o")
    mount.stop()
    path = cipher_path(volume, "victim")
    path.rename(path.with_name(_damaged(path.name)))
    mount.start()
    assert os.listdir(mount.mountpoint) == ["other"]
    assert "integrity: /: undecryptable entry" in mount.log()


def test_an_entry_moved_to_another_directory_under_a_warm_cache_is_not_shown(  # type: ignore[no-untyped-def]
    volume: Path, mounter
) -> None:
    """Names are bound to their directory (its IV is the AES-SIV associated data). The mount
    caches names both ways; a ciphertext entry moved by hand from directory a/ to b/ while
    mounted, after a/ was listed (its names cached), must not show up in b/ under the name it
    had in a/: hidden and logged there, as any name that does not decrypt in its directory."""
    mount = mounter(volume)
    for d in ("a", "b"):
        (mount.mountpoint / d).mkdir()
    (mount.mountpoint / "a" / "secret").write_bytes(b"s")
    (mount.mountpoint / "b" / "own").write_bytes(b"o")
    assert os.listdir(mount.mountpoint / "a") == ["secret"]  # cached now
    from tests.integration.test_fs_fsck import cipher_path as nested_cipher_path

    moved = nested_cipher_path(volume, "a/secret")
    moved.rename(nested_cipher_path(volume, "b") / moved.name)
    assert os.listdir(mount.mountpoint / "b") == ["own"]
    assert not (mount.mountpoint / "b" / "secret").exists()
    assert "integrity: /b: undecryptable entry" in mount.log()
    assert mount.alive()


def test_damaged_xattr_names_are_hidden_and_logged(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """A damaged short name, and a long name whose sealed form (in its value) is damaged, are
    left out of the listing with a log line each naming the file, as a damaged directory entry
    is (they went silently); another program's own user.* attribute on the ciphertext file (a
    sync client's, say) is left out without one."""
    mount = mounter(volume)
    victim = mount.mountpoint / "victim"
    victim.write_bytes(b"v")
    long_name = b"user." + b"n" * 200
    for name in (b"user.short", b"user.sixchr", b"user.dropped", long_name, b"user.intact"):
        os.setxattr(victim, name, b"value of " + name)
    mount.stop()
    path = cipher_path(volume, "victim")
    cipher = XattrCipher(SoftDeriver().derive(XATTR_KEY_INFO))
    long_disk = cipher.disk_name(long_name, long_names=True).decode()
    damaged = []  # a character changed; then one respelled (not canonical), one dropped
    for name, damage in ((b"user.short", _damaged), (b"user.sixchr", respelled_name),
                         (b"user.dropped", lambda disk: disk[:-1])):
        disk = cipher.disk_name(name).decode()
        value = os.getxattr(path, disk)
        os.removexattr(path, disk)
        damaged.append(damage(disk))
        os.setxattr(path, damaged[-1], value)
    maybe_ours = damaged[1:]  # hidden without a log line, but fsck's warning says so
    sealed = bytearray(os.getxattr(path, long_disk))
    sealed[5] ^= 1  # inside the sealed name, after its 2-byte length
    os.setxattr(path, long_disk, bytes(sealed))
    foreign = ["user.com.dropbox.attrs", "user.checksum", "user.Tags"]  # Tags: base64url too
    for name in foreign:
        os.setxattr(path, name, b"not ours")
    mount.start()
    assert os.listxattr(victim) == ["user.intact"]
    logged = [line for line in mount.log().splitlines() if "undecryptable xattr" in line]
    assert len(logged) == 2, mount.log()
    assert all("integrity: /victim: " in line for line in logged)
    mount.stop()
    # fsck: the damaged ones are damage; the others' own attributes only warnings.
    report = check_tree(volume, SoftDeriver())
    assert sorted(p.detail.split(":")[0] for p in report.problems if p.kind == "xattr") == sorted(
        f"extended attribute {d}" for d in (damaged[0], long_disk))
    warned = {w.detail.split()[2]: w.detail for w in report.warnings if w.kind == "foreign-xattr"}
    assert sorted(warned) == sorted([*foreign, *maybe_ours])
    for name, detail in warned.items():
        assert ("or one of kmsfs's own damaged in place" in detail) == (name in maybe_ours), detail


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


def _unblock(fifo: Path) -> None:
    """If a daemon is stuck opening *fifo* for reading, let it go (so a failing test ends)."""
    with contextlib.suppress(OSError):  # ENXIO: nobody is reading it, nothing is stuck
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_internal_files_replaced_by_a_fifo_or_symlink_are_damage_not_a_hang(  # type: ignore[no-untyped-def]
    volume: Path, mounter
) -> None:
    """Whoever can write the ciphertext can put a FIFO where an IV or a long name's sidecar
    was. An open() that blocked on it froze every request of the mount; a symlink there was
    followed. Each is EIO on its own path, and the rest of the mount keeps serving."""
    mount = mounter(volume)
    m = mount.mountpoint
    for d in ("fifo_iv", "link_iv", "fifo_sidecar"):
        (m / d).mkdir()
    (m / "fifo_sidecar" / ("n" * 200)).write_bytes(b"long")
    (m / "ok").write_bytes(b"fine")
    mount.stop()
    fifo_iv = cipher_path(volume, "fifo_iv") / DIRIV_NAME
    fifo_iv.unlink()
    os.mkfifo(fifo_iv)
    link_iv = cipher_path(volume, "link_iv") / DIRIV_NAME
    link_iv.unlink()
    link_iv.symlink_to(volume / DIRIV_NAME)  # a valid IV, of another directory
    (sidecar,) = cipher_path(volume, "fifo_sidecar").glob("*.name")
    sidecar.unlink()
    os.mkfifo(sidecar)
    mount.start()

    def ls(d: str) -> tuple[int, bytes, bytes]:
        """``ls`` that fails, not hangs, if the daemon blocks: a FUSE request already sent
        cannot be killed, so the FIFOs are opened for writing to free the daemon first."""
        proc = subprocess.Popen(["ls", str(m / d)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            _unblock(fifo_iv)
            _unblock(sidecar)
            proc.kill()
            proc.communicate()
            raise AssertionError(f"ls {d} hung: the daemon blocked on a FIFO") from None
        return proc.returncode, out, err

    for d in ("fifo_iv", "link_iv"):
        code, _, err = ls(d)
        assert code != 0 and b"Input/output error" in err, d
    assert ls("fifo_sidecar")[:2] == (0, b"")  # the damaged entry is hidden
    assert (m / "ok").read_bytes() == b"fine"
    log = mount.log()
    assert "integrity: /fifo_iv" in log and "integrity: /link_iv" in log
    assert "unreadable sidecar" in log
    assert mount.alive()
    mount.stop()

    reports: list[Report] = []  # fsck reads the same files, and must not hang either
    fsck = threading.Thread(target=lambda: reports.append(check_tree(volume, SoftDeriver())))
    fsck.start()
    fsck.join(30)
    if fsck.is_alive():
        _unblock(fifo_iv)
        _unblock(sidecar)
        fsck.join(30)
        raise AssertionError("fsck hung on a FIFO")
    details = sorted(f"{p.kind}: {p.detail}" for p in reports[0].problems)
    assert [d.split(":")[0] for d in details] == ["diriv", "diriv", "name"]
    assert "Too many levels of symbolic links" in details[0]
    assert "not a regular file" in details[1] and "not a regular file" in details[2]


def test_a_header_copied_from_another_file_is_not_written_under(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    """Copy B's header over A's, let the user write a whole block into A, move that block into
    B: it read there as B's data. Now the write is EIO (A's block 0 does not match the header)
    and A is left as it was; and a file cut to B's header alone starts a header of its own."""
    mount = mounter(volume)
    m = mount.mountpoint
    (m / "a").write_bytes(os.urandom(3 * BS))
    (m / "b").write_bytes(os.urandom(3 * BS))
    (m / "c").write_bytes(b"c")
    mount.stop()
    a, b, c = (cipher_path(volume, n) for n in "abc")
    b_header = b.read_bytes()[:HEADER_SIZE]
    a.write_bytes(b_header + a.read_bytes()[HEADER_SIZE:])
    c.write_bytes(b_header)  # a header and no block
    a_before = a.read_bytes()

    mount.start()
    with open(m / "a", "r+b", buffering=0) as f:
        f.seek(BS)
        with pytest.raises(OSError) as info:
            f.write(b"X" * BS)
    assert info.value.errno == errno.EIO
    with open(m / "c", "r+b", buffering=0) as f:  # no O_TRUNC: the header stays until written
        f.write(b"S" * BS)
    assert (m / "c").read_bytes() == b"S" * BS
    assert "header does not match block 0" in mount.log()
    mount.stop()

    assert a.read_bytes() == a_before
    c_data = c.read_bytes()
    assert c_data[:HEADER_SIZE] != b_header
    data = bytearray(b.read_bytes())  # c's block moved into b
    data[cipher_offset(1) : cipher_offset(2)] = c_data[cipher_offset(0) : cipher_offset(1)]
    b.write_bytes(bytes(data))
    mount.start()
    with pytest.raises(OSError) as info:
        (m / "b").read_bytes()
    assert info.value.errno == errno.EIO
