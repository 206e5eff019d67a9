"""``kmsfs encrypt`` / ``kmsfs decrypt`` end to end, with a real store and SoftHSM tokens.

One store per module (two HSMs, an operator, a sealed Trust, Domains payroll and hr) keeps the
HSM set-up cost out of each test; every command runs as ``python -m kmsfs.fs.cli`` in a
subprocess, exactly as a user would run it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs import exitcodes
from kmsfs.crypto.content import CIPHER_BLOCK_SIZE, HEADER_SIZE
from kmsfs.crypto.stream import CHUNK_SIZE, CIPHER_CHUNK_SIZE, PREFIX_SIZE, header_size
from kmsfs.model.bundle import DomainBundle
from tests.kms_helpers import Admin

pytestmark = pytest.mark.slow

KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]
C = CHUNK_SIZE


def make_store(root: Path, domains: tuple[str, ...] = ("payroll",)) -> Admin:
    admin = Admin.under(root)
    admin("init", "--hsms", "2")
    admin.create_operators("alice")
    trust = admin.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
    for name in domains:
        admin("domain", "create", name, "--trust", trust)
    return admin


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("sf"), ("payroll", "hr")).store


def kmsfs(
    store: Path, *args: str, stdin: bytes | None = None, check: int | None = 0
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("KMSFS_STORE", "SOFTHSM2_CONF")}
    env["KMSFS_STORE"] = str(store)
    proc = subprocess.run([*KMSFS, *args], input=stdin, capture_output=True, env=env,
                          timeout=300, check=False)
    if check is not None:
        assert proc.returncode == check, proc.stderr.decode()
    return proc


def one_error_line(proc: subprocess.CompletedProcess[bytes], *texts: str) -> str:
    assert proc.returncode != 0
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmsfs: error: "), lines
    for text in texts:
        assert text in lines[0], lines[0]
    return lines[0]


def encrypted(store: Path, tmp_path: Path, data: bytes, domain: str = "payroll") -> Path:
    src, dst = tmp_path / "plain", tmp_path / "plain.kmsfs"
    src.write_bytes(data)
    kmsfs(store, "encrypt", "--domain", domain, str(src), str(dst))
    return dst


SIZES = [0, 1, C - 1, C, C + 1, 3 * C + 5]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_files(store: Path, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    enc = encrypted(store, tmp_path, data)
    assert size < 16 or data[:64] not in enc.read_bytes()
    out = tmp_path / "out"
    kmsfs(store, "decrypt", str(enc), str(out))
    assert out.read_bytes() == data
    assert out.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "plain", "plain.kmsfs"]


@pytest.mark.parametrize("size", [0, 1, 2 * C + 7])
def test_round_trip_pipes(store: Path, size: int) -> None:
    data = os.urandom(size)
    enc = kmsfs(store, "encrypt", "--domain", "payroll", "-", "-", stdin=data).stdout
    assert kmsfs(store, "decrypt", "-", "-", stdin=enc).stdout == data


def test_domain_found_from_the_file_alone(store: Path, tmp_path: Path) -> None:
    enc = encrypted(store, tmp_path, b"for hr only", domain="hr")
    data = enc.read_bytes()
    bundle = DomainBundle.from_bytes(data[PREFIX_SIZE : header_size(data[:PREFIX_SIZE]) - 16])
    assert bundle.domain.domain.name == "hr"
    moved = tmp_path / "elsewhere" / "x"
    moved.parent.mkdir()
    enc.rename(moved)
    assert kmsfs(store, "decrypt", str(moved), "-").stdout == b"for hr only"


@pytest.mark.parametrize("where", ["header", "first", "middle", "tag"])
def test_changed_byte_fails_and_writes_nothing(store: Path, tmp_path: Path, where: str) -> None:
    enc = encrypted(store, tmp_path, os.urandom(3 * C))
    data = bytearray(enc.read_bytes())
    hsize = header_size(bytes(data[:PREFIX_SIZE]))
    index = {"header": hsize - 3, "first": hsize + 20, "middle": hsize + CIPHER_CHUNK_SIZE + 99,
             "tag": len(data) - 1}[where]
    data[index] ^= 0x40
    enc.write_bytes(bytes(data))
    out = tmp_path / "out"
    proc = kmsfs(store, "decrypt", str(enc), str(out), check=None)
    line = one_error_line(proc, str(enc), "fails authentication")
    assert proc.returncode == exitcodes.VERIFICATION, line
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "plain.kmsfs"]
    # to stdout from a seekable file: verified first, so not one byte of plaintext
    proc = kmsfs(store, "decrypt", str(enc), "-", check=None)
    one_error_line(proc, "fails authentication")
    assert proc.stdout == b""


def test_failed_decrypt_keeps_an_existing_out(store: Path, tmp_path: Path) -> None:
    enc = encrypted(store, tmp_path, os.urandom(C + 1))
    data = bytearray(enc.read_bytes())
    data[-5] ^= 1
    enc.write_bytes(bytes(data))
    out = tmp_path / "out"
    out.write_bytes(b"precious")
    one_error_line(kmsfs(store, "decrypt", str(enc), str(out), check=None), "chunk 1")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("chunks", [1, 2])
def test_truncation_at_a_chunk_boundary_is_detected(
    store: Path, tmp_path: Path, chunks: int
) -> None:
    enc = encrypted(store, tmp_path, os.urandom(3 * C))
    data = enc.read_bytes()
    cut = header_size(data[:PREFIX_SIZE]) + chunks * CIPHER_CHUNK_SIZE
    enc.write_bytes(data[:cut])
    out = tmp_path / "out"
    proc = kmsfs(store, "decrypt", str(enc), str(out), check=None)
    one_error_line(proc, f"chunk {chunks - 1}", "truncated")
    assert not out.exists()
    # through a pipe too
    one_error_line(kmsfs(store, "decrypt", "-", "-", stdin=data[:cut], check=None), "truncated")


def test_appended_data_and_garbage_are_refused(store: Path, tmp_path: Path) -> None:
    enc = encrypted(store, tmp_path, os.urandom(2 * C))
    data = enc.read_bytes()
    enc.write_bytes(data + data[-CIPHER_CHUNK_SIZE:])
    one_error_line(kmsfs(store, "decrypt", str(enc), "-", check=None), "follows the final chunk")
    enc.write_bytes(b"just some text\n")
    proc = kmsfs(store, "decrypt", str(enc), str(tmp_path / "o"), check=None)
    one_error_line(proc, "not a kmsfs encrypted file")
    assert proc.returncode == exitcodes.FORMAT


def test_another_stores_domain_is_refused(store: Path, tmp_path: Path) -> None:
    other = make_store(tmp_path / "other").store
    enc = encrypted(other, tmp_path, b"secret of another store")
    out = tmp_path / "out"
    proc = kmsfs(store, "decrypt", str(enc), str(out), check=None)
    one_error_line(proc, str(enc), "Domain payroll does not verify against store")
    assert not out.exists()


def test_unknown_domain_is_one_line(store: Path, tmp_path: Path) -> None:
    (tmp_path / "p").write_bytes(b"x")
    proc = kmsfs(store, "encrypt", "--domain", "nope", str(tmp_path / "p"),
                 str(tmp_path / "p.k"), check=None)
    one_error_line(proc, "nope")
    assert not (tmp_path / "p.k").exists()


@pytest.mark.parametrize("sub", ["encrypt", "decrypt", "fsck"])
def test_help_has_example(store: Path, sub: str) -> None:
    assert b"example" in kmsfs(store, sub, "--help").stdout


# --- a file out of a mounted volume -----------------------------------------------------------
@pytest.fixture
def volume_with_file(store: Path, tmp_path: Path) -> Iterator[tuple[Path, Path, bytes]]:
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    kmsfs(store, "init", str(cipher), "--domain", "payroll")
    mp.mkdir()
    data = os.urandom(3 * 4096 + 1234)
    kmsfs(store, "mount", str(cipher), str(mp))
    try:
        (mp / "dir").mkdir()
        (mp / "dir" / "report.bin").write_bytes(data)
        (mp / "empty").write_bytes(b"")
    finally:
        kmsfs(store, "umount", str(mp))
    files = [p for p in cipher.rglob("*") if p.is_file() and p.stat().st_size > 0
             and p.name not in ("kmsfs.conf", "kmsfs.diriv", "kmsfs.journal")]
    assert len(files) == 1, files
    yield cipher, files[0], data


def test_cipherdir_recovery(store: Path, tmp_path: Path, volume_with_file) -> None:  # type: ignore[no-untyped-def]
    cipher, cfile, data = volume_with_file
    out = tmp_path / "recovered"
    kmsfs(store, "decrypt", "--cipherdir", str(cipher), str(cfile), str(out))
    assert out.read_bytes() == data
    assert kmsfs(store, "decrypt", "--cipherdir", str(cipher), "-", "-",
                 stdin=cfile.read_bytes()).stdout == data


def test_cipherdir_recovery_names_the_bad_block(  # type: ignore[no-untyped-def]
    store: Path, tmp_path: Path, volume_with_file
) -> None:
    cipher, cfile, _data = volume_with_file
    raw = bytearray(cfile.read_bytes())
    raw[HEADER_SIZE + 2 * CIPHER_BLOCK_SIZE + 50] ^= 1
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(raw))
    out = tmp_path / "recovered"
    proc = kmsfs(store, "decrypt", "--cipherdir", str(cipher), str(bad), str(out), check=None)
    one_error_line(proc, "block 2 (plaintext offset 8192) fails authentication")
    assert not out.exists()


# --- constant memory ------------------------------------------------------------------------
_PIPELINE = textwrap.dedent("""
    import hashlib, resource, subprocess, sys
    src, kmsfs = sys.argv[1], sys.argv[2:]
    with open(src, "rb") as f:
        enc = subprocess.Popen([*kmsfs, "encrypt", "--domain", "payroll", "-", "-"],
                               stdin=f, stdout=subprocess.PIPE)
    dec = subprocess.Popen([*kmsfs, "decrypt", "-", "-"], stdin=enc.stdout,
                           stdout=subprocess.PIPE)
    enc.stdout.close()
    digest, total = hashlib.sha256(), 0
    for block in iter(lambda: dec.stdout.read(1 << 20), b""):
        digest.update(block)
        total += len(block)
    assert enc.wait() == 0 and dec.wait() == 0
    print(total, digest.hexdigest(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


def test_constant_memory_300_mib_through_pipes(store: Path, tmp_path: Path) -> None:
    size = 300 * 1024 * 1024
    src = tmp_path / "big"
    digest = hashlib.sha256()
    with open(src, "wb") as f:  # sparse-ish: a random 4 KiB every MiB, zeros in between
        f.truncate(size)
        for offset in range(0, size, 1 << 20):
            f.seek(offset)
            f.write(os.urandom(4096))
    with open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    env = {k: v for k, v in os.environ.items() if k not in ("KMSFS_STORE", "SOFTHSM2_CONF")}
    env["KMSFS_STORE"] = str(store)
    proc = subprocess.run([sys.executable, "-c", _PIPELINE, str(src), *KMSFS],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    total, hexdigest, maxrss_kib = proc.stdout.split()
    assert (int(total), hexdigest) == (size, digest.hexdigest())
    assert int(maxrss_kib) < 100 * 1024, f"peak RSS of a child: {int(maxrss_kib) // 1024} MiB"
