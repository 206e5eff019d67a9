"""``kmsfs encrypt`` / ``kmsfs decrypt`` end to end, with a real store and SoftHSM tokens.

One store per module (two HSMs, an operator, a sealed Trust, Domains payroll and hr) keeps the
HSM set-up cost out of each test; every command runs as ``python -m kmsfs.fs.cli`` in a
subprocess, exactly as a user would run it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    store: Path,
    *args: str,
    stdin: bytes | None = None,
    check: int | None = 0,
    hook: str = "",
    preexec: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """The real command; ``hook``, if given, is Python run in its process before it starts
    (to act at a chosen point of its work, e.g. a writer appending to IN), ``preexec`` runs
    in the child before exec (a resource limit)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KMSFS_STORE", "SOFTHSM2_CONF")}
    env["KMSFS_STORE"] = str(store)
    command = KMSFS
    if hook:
        command = [sys.executable, "-c", _HOOKED.format(hook=hook)]
    proc = subprocess.run([*command, *args], input=stdin, capture_output=True, env=env,
                          timeout=300, check=False, preexec_fn=preexec)
    if check is not None:
        assert proc.returncode == check, proc.stderr.decode()
    return proc


_HOOKED = """
import errno, os, sys
from kmsfs.fs import cli, singlefile
{hook}
sys.exit(cli.main(sys.argv[1:]))
"""


def after_first_read(action: str) -> str:
    """A hook: ``action`` (Python) runs once kmsfs has read the first chunk of its IN."""
    return textwrap.dedent(f"""
        _read, _reads = singlefile.read_exact, []
        def read_exact(f, n):
            data = _read(f, n)
            _reads.append(n)
            if len(_reads) == 1:
                {action}
            return data
        singlefile.read_exact = read_exact
    """)


def raising_after_first_chunk(exc: str) -> str:
    """A hook: ``exc`` is raised once the first chunk has been written (Ctrl-C, SIGTERM)."""
    return textwrap.dedent(f"""
        from kmsfs.fs import progress
        _advance = progress.Progress.advance
        def advance(self, n):
            _advance(self, n)
            raise {exc}
        progress.Progress.advance = advance
    """)


#: A hook: link(2) fails as on vfat or exFAT (EPERM), for singlefile only.
NO_HARD_LINKS = textwrap.dedent("""
    import types
    def _link(*args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
    singlefile.os = types.SimpleNamespace(**{**vars(os), "link": _link})
""")


@dataclass
class FullDisk:
    """A directory where a file cannot grow past a few KiB: a 4 KiB tmpfs of its own, or,
    where tmpfs cannot be mounted, a limit on file size (RLIMIT_FSIZE) for the command run.
    Pass ``preexec`` to the command; ``grow()`` lifts the limit."""

    path: Path
    kind: str
    limited: bool = True

    def preexec(self) -> None:
        if self.kind == "fsize" and self.limited:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then write(2) fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    def fill(self) -> None:
        """Leave no room at all on the tmpfs (a file still cannot grow past 1 KiB under the
        limit)."""
        (self.path / "filler").write_bytes(b"\0" * 4096)

    def grow(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["mount", "-o", "remount,size=1m", str(self.path)], check=True)
        self.limited = False


@contextlib.contextmanager
def full_disk(kind: str, where: Path) -> Iterator[FullDisk]:
    where.mkdir()
    if kind == "fsize":
        yield FullDisk(where, kind)
        return
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k,mode=0755", "tmpfs",
                           str(where)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); the fsize case runs")
    try:
        yield FullDisk(where, kind)
    finally:
        subprocess.run(["umount", str(where)], check=True)


def leftovers(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


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


def test_decrypt_domain_holds_the_file_to_its_domain(store: Path, tmp_path: Path) -> None:
    """--domain was accepted and ignored without --cipherdir: a user who named the Domain
    the file must be of got any Domain's file decrypted, exit 0."""
    enc = encrypted(store, tmp_path, b"for hr only", domain="hr")
    out = tmp_path / "out"
    for named in ("payroll", "nosuch"):
        proc = kmsfs(store, "decrypt", "--domain", named, str(enc), str(out), check=None)
        one_error_line(proc, str(enc), f"the file's Domain is hr, not {named}")
        assert proc.returncode == exitcodes.VERIFICATION
        assert not out.exists()
    one_error_line(kmsfs(store, "decrypt", "--domain", "", str(enc), str(out),
                         check=exitcodes.USAGE), "--domain is empty")
    kmsfs(store, "decrypt", "--domain", "hr", str(enc), str(out))
    assert out.read_bytes() == b"for hr only"


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
    proc = kmsfs(store, "decrypt", "--force", str(enc), str(out), check=None)
    one_error_line(proc, "chunk 1")
    assert out.read_bytes() == b"precious"
    assert not [n for n in leftovers(tmp_path) if n.endswith(".kmsfs-tmp")]


def _in_and_out(store: Path, tmp_path: Path, sub: str, data: bytes) -> tuple[str, Path]:
    """IN for ``sub`` (plaintext for encrypt, an encrypted file for decrypt) and a path for
    OUT in its own directory."""
    source = encrypted(store, tmp_path, data) if sub == "decrypt" else tmp_path / "plain"
    if sub == "encrypt":
        source.write_bytes(data)
    (tmp_path / "d").mkdir()
    return str(source), tmp_path / "d" / "out"


def _args(sub: str) -> list[str]:
    return ["encrypt", "--domain", "payroll"] if sub == "encrypt" else ["decrypt"]


def _decrypted(store: Path, path: Path) -> bytes:
    return kmsfs(store, "decrypt", str(path), "-").stdout


@pytest.mark.parametrize("sub", ["encrypt", "decrypt"])
def test_an_existing_out_is_refused_unless_force(store: Path, tmp_path: Path, sub: str) -> None:
    """It was silently replaced: contents, mode and a hard link's sharing all gone."""
    data = os.urandom(C + 9)
    source, out = _in_and_out(store, tmp_path, sub, data)
    out.write_bytes(b"precious")
    out.chmod(0o640)
    os.link(out, tmp_path / "d" / "twin")
    before = out.stat()
    proc = kmsfs(store, *_args(sub), source, str(out), check=None)
    line = one_error_line(proc, str(out), "already exists", "--force")
    assert proc.returncode == exitcodes.USAGE, line
    after = out.stat()
    assert out.read_bytes() == b"precious"
    assert (after.st_ino, after.st_mode, after.st_nlink) == (before.st_ino, before.st_mode, 2)
    assert leftovers(tmp_path / "d") == ["out", "twin"]
    # said first, before the store or an HSM is even looked at
    proc = kmsfs(tmp_path / "no-store", *_args(sub), source, str(out), check=None)
    assert proc.returncode == exitcodes.USAGE, proc.stderr
    one_error_line(proc, "already exists")
    # a dangling symlink is a name that exists too: nothing is made where it points
    link = tmp_path / "d" / "link"
    link.symlink_to(tmp_path / "d" / "nowhere")
    one_error_line(kmsfs(store, *_args(sub), source, str(link), check=None), str(link))
    assert leftovers(tmp_path / "d") == ["link", "out", "twin"]
    # --force replaces it, with a new file (the hard link keeps the old contents)
    kmsfs(store, *_args(sub), "--force", source, str(out))
    assert (out.read_bytes() if sub == "decrypt" else _decrypted(store, out)) == data
    assert (tmp_path / "d" / "twin").read_bytes() == b"precious"
    assert leftovers(tmp_path / "d") == ["link", "out", "twin"]


@pytest.mark.parametrize("sub", ["encrypt", "decrypt"])
def test_help_says_an_existing_out_is_refused(store: Path, sub: str) -> None:
    text = kmsfs(store, sub, "--help").stdout.decode()
    assert "an existing file is refused unless --force" in " ".join(text.split())


@pytest.mark.parametrize("links", ["hard links", "no hard links"])
@pytest.mark.parametrize("sub", ["encrypt", "decrypt"])
def test_an_out_made_meanwhile_is_kept(
    store: Path, tmp_path: Path, sub: str, links: str
) -> None:
    """OUT did not exist when the command started, but someone made it before the end."""
    source, out = _in_and_out(store, tmp_path, sub, os.urandom(2 * C + 1))
    hook = after_first_read(f"open({str(out)!r}, 'xb').write(b'made meanwhile')")
    hook += NO_HARD_LINKS if links == "no hard links" else ""
    proc = kmsfs(store, *_args(sub), source, str(out), hook=hook, check=None)
    line = one_error_line(proc, str(out), "already exists")
    assert proc.returncode == exitcodes.USAGE, line
    assert out.read_bytes() == b"made meanwhile"
    assert leftovers(tmp_path / "d") == ["out"]


@pytest.mark.parametrize("sub", ["encrypt", "decrypt"])
def test_out_on_a_file_system_without_hard_links(store: Path, tmp_path: Path, sub: str) -> None:
    """vfat answers link(2) with EPERM (this kernel has no vfat: the hook stands in for it)."""
    data = os.urandom(C + 1)
    source, out = _in_and_out(store, tmp_path, sub, data)
    kmsfs(store, *_args(sub), source, str(out), hook=NO_HARD_LINKS)
    assert (out.read_bytes() if sub == "decrypt" else _decrypted(store, out)) == data
    assert leftovers(tmp_path / "d") == ["out"]
    mode = stat.S_IMODE(out.stat().st_mode)
    assert mode == 0o600 if sub == "decrypt" else mode & 0o600 == 0o600


@pytest.mark.parametrize(
    "change",
    ["open(IN, 'ab').write(b'appended')",  # a writer still adding to it
     "w = open(IN, 'r+b'); w.seek(5); w.write(b'X'); w.close()"],  # same size, rewritten
    ids=["appended", "rewritten"],
)
def test_encrypt_of_a_file_changing_while_read_fails(
    store: Path, tmp_path: Path, change: str
) -> None:
    """It gave exit 0 and a complete-looking encrypted copy of part of the file."""
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(2 * C + 3))
    os.utime(plain, ns=(10**18, 10**18))  # 2001: a rewrite now always moves the mtime
    out = tmp_path / "d" / "plain.kmsfs"
    out.parent.mkdir()
    hook = f"IN = {str(plain)!r}" + after_first_read(change)
    for target in (str(out), "-"):
        proc = kmsfs(store, "encrypt", "--domain", "payroll", str(plain), target, hook=hook,
                     check=None)
        line = one_error_line(proc, str(plain), "changed while it was read")
        assert proc.returncode == exitcodes.ERROR, line
        assert leftovers(out.parent) == []
        os.utime(plain, ns=(10**18, 10**18))


@pytest.mark.parametrize("kind", ["tmpfs", "fsize"])
@pytest.mark.parametrize("size", [3000, 2 * C + 1])
def test_decrypt_onto_a_full_disk_leaves_no_plaintext(
    store: Path, tmp_path: Path, kind: str, size: int
) -> None:
    """A full disk left a hidden temporary file of plaintext and an error naming no file."""
    enc = encrypted(store, tmp_path, os.urandom(size))
    with full_disk(kind, tmp_path / "tiny") as disk:
        disk.fill()
        before = leftovers(disk.path)
        out = disk.path / "out"
        proc = kmsfs(store, "decrypt", str(enc), str(out), preexec=disk.preexec, check=None)
        line = one_error_line(proc, str(out))
        assert proc.returncode == exitcodes.ERROR, line
        assert leftovers(disk.path) == before


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit(143)"])
@pytest.mark.parametrize("sub", ["encrypt", "decrypt"])
def test_interrupted_command_leaves_no_temporary_file(
    store: Path, tmp_path: Path, sub: str, exc: str
) -> None:
    """Ctrl-C, or SIGTERM once the runner turns it into SystemExit, halfway through."""
    source, out = _in_and_out(store, tmp_path, sub, os.urandom(3 * C))
    proc = kmsfs(store, *_args(sub), source, str(out), hook=raising_after_first_chunk(exc),
                 check=None)
    assert proc.returncode != 0
    assert leftovers(tmp_path / "d") == []


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
