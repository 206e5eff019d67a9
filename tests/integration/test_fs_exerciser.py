"""An fsx-style exerciser: one file, many open descriptors, mmap, truncates, checked byte by byte.

The model test (test_fs_model.py) compares whole-file operations with a plain directory; the
data path has more ways to go wrong than that shows: the kernel's page cache holds plaintext
pages that writes through another descriptor, a truncate by path or a store into a shared
mapping must keep coherent with what the daemon encrypts, and a partial block is rewritten
(read, decrypted, changed, encrypted again) whenever a write or a truncate lands inside it.
This follows xfstests' fsx: a seeded random sequence of operations on one file, each checked
against an in-memory model of its bytes (every read, every mapped read, the size after every
operation), then the whole file again after a remount, which reads it back from ciphertext.
Some operations drop the file's pages from the kernel's cache, so that the reads after them
reach the daemon.

Offsets and lengths are drawn around the 4 KiB block and page edges, where the
read-modify-write and the page cache meet, and the file stays within MAX_SIZE (twelve blocks
and part of one), so that truncates both cut blocks and grow holes.
"""

from __future__ import annotations

import faulthandler
import mmap
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TextIO

import pytest

REPO = Path(__file__).resolve().parents[2]

BLOCK = 4096
MAX_SIZE = 12 * BLOCK + 123  # a few blocks, with a partial one at the end
OPS = 700


class Exerciser:
    """The file under test, the model of its bytes, and the descriptors open on it."""

    def __init__(self, path: Path, seed: int) -> None:
        self.path = path
        self.rng = random.Random(seed)
        self.model = bytearray()
        self.fds: list[int] = []
        path.write_bytes(b"")
        self.reopen()

    # --- drawing offsets and lengths --------------------------------------------------------
    def offset(self, limit: int) -> int:
        """An offset in [0, limit], often on or next to a block edge."""
        if limit <= 0:
            return 0
        if self.rng.random() < 0.5:
            edge = self.rng.randrange(0, limit // BLOCK + 1) * BLOCK
            return max(0, min(limit, edge + self.rng.choice((-1, 0, 0, 1))))
        return self.rng.randrange(0, limit + 1)

    def length(self) -> int:
        return self.rng.choice((1, 17, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 5,
                                self.rng.randrange(1, 3 * BLOCK)))

    def fd(self) -> int:
        return self.rng.choice(self.fds)

    # --- operations (each returns a description for the failure message) -------------------
    def write(self) -> str:
        off = self.offset(min(len(self.model) + BLOCK, MAX_SIZE - 1))
        data = self.rng.randbytes(self.length())[: MAX_SIZE - off]
        assert os.pwrite(self.fd(), data, off) == len(data)
        self._model_write(off, data)
        return f"pwrite {off} +{len(data)}"

    def read(self) -> str:
        off, n = self.offset(len(self.model) + 10), self.length()
        got = os.pread(self.fd(), n, off)
        want = bytes(self.model[off : off + n])
        assert got == want, f"pread {off} +{n}: {self._first_difference(got, want, off)}"
        return f"pread {off} +{n}"

    def append(self) -> str:
        """A write through a descriptor opened O_APPEND, which the kernel places at the end."""
        data = self.rng.randbytes(min(self.length(), max(1, MAX_SIZE - len(self.model))))
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            assert os.write(fd, data) == len(data)
        finally:
            os.close(fd)
        self._model_write(len(self.model), data)
        return f"append +{len(data)}"

    def copy_range(self) -> str:
        """copy_file_range from one part of the file to another (the kernel copies through
        reads and writes: FUSE file systems without the request get its fallback)."""
        if len(self.model) < 2:
            return "copy skipped (too short)"
        src = self.offset(len(self.model) - 1)
        n = min(self.length(), len(self.model) - src)
        dst = self.offset(min(len(self.model) + BLOCK, MAX_SIZE - 1))
        if dst < src + n and src < dst + n:  # overlapping ranges are EINVAL
            dst = src + n
        n = min(n, MAX_SIZE - dst)
        if n <= 0:
            return "copy skipped (past the maximum size)"
        data = bytes(self.model[src : src + n])
        copied = 0
        while copied < n:  # it may copy less than asked, as write may
            step = os.copy_file_range(self.fd(), self.fd(), n - copied, src + copied, dst + copied)
            assert step > 0, f"copy_file_range {src} -> {dst} +{n} stopped at {copied}"
            copied += step
        self._model_write(dst, data)
        return f"copy {src} -> {dst} +{n}"

    def truncate(self) -> str:
        size = self.offset(MAX_SIZE)
        if self.rng.random() < 0.5:
            os.ftruncate(self.fd(), size)
            how = "ftruncate"
        else:
            os.truncate(self.path, size)
            how = "truncate"
        if size < len(self.model):
            del self.model[size:]
        else:
            self.model.extend(bytes(size - len(self.model)))
        return f"{how} {size}"

    def map_write(self) -> str:
        if not self.model:
            return "mapwrite skipped (empty)"
        off = self.offset(len(self.model) - 1)
        data = self.rng.randbytes(min(self.length(), len(self.model) - off))
        with mmap.mmap(self.fd(), len(self.model)) as area:
            area[off : off + len(data)] = data
            if self.rng.random() < 0.5:
                area.flush()
        self.model[off : off + len(data)] = data
        return f"mapwrite {off} +{len(data)}"

    def map_read(self) -> str:
        if not self.model:
            return "mapread skipped (empty)"
        off = self.offset(len(self.model) - 1)
        n = min(self.length(), len(self.model) - off)
        with mmap.mmap(self.fd(), len(self.model), prot=mmap.PROT_READ) as area:
            got = area[off : off + n]
        want = bytes(self.model[off : off + n])
        assert got == want, f"mapread {off} +{n}: {self._first_difference(got, want, off)}"
        return f"mapread {off} +{n}"

    def drop(self) -> str:
        """Write back, then drop the file's pages from the kernel's cache: the reads that follow
        reach the daemon and are decrypted from the ciphertext, not served from pages the
        kernel kept (kmsfs lets it keep them across opens)."""
        fd = self.fd()
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return "drop cached pages"

    def sync(self) -> str:
        (os.fsync if self.rng.random() < 0.5 else os.fdatasync)(self.fd())
        return "fsync"

    def reopen(self) -> str:
        for fd in self.fds:
            os.close(fd)
        self.fds = [os.open(self.path, os.O_RDWR) for _ in range(self.rng.randint(1, 3))]
        return f"reopen ({len(self.fds)} descriptors)"

    def step(self, trail: TextIO | None = None) -> str:
        """One random operation, checked; its name goes to *trail* before it runs."""
        op = self.rng.choices(
            (self.write, self.append, self.copy_range, self.read, self.truncate,
             self.map_write, self.map_read, self.sync, self.drop, self.reopen),
            weights=(26, 6, 6, 25, 10, 12, 12, 4, 8, 6),
        )[0]
        if trail is not None:
            trail.write(f"{op.__name__}: ")
        what = op()
        size = os.fstat(self.fd()).st_size
        assert size == len(self.model), f"after {what}: size {size}, model {len(self.model)}"
        return what

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def _model_write(self, off: int, data: bytes) -> None:
        if off > len(self.model):
            self.model.extend(bytes(off - len(self.model)))
        self.model[off : off + len(data)] = data

    @staticmethod
    def _first_difference(got: bytes, want: bytes, base: int) -> str:
        if len(got) != len(want):
            return f"{len(got)} bytes read, {len(want)} expected"
        i = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        return f"first wrong byte at file offset {base + i} (block {(base + i) // BLOCK})"


def exercise(path: Path, seed: int, ops: int, model_out: Path, log: Path) -> None:
    """Run the exerciser on *path*, each operation logged to *log* before it is made, and write
    its model of the file's bytes to *model_out*.

    Run in a child process (below): a file whose bytes the daemon lost is also one whose
    mapping can reach past the end the kernel learns from a short read, and that access is
    SIGBUS, which no Python code can catch; it would kill pytest itself, mounts and all. The
    log tells the test which operation the child died in."""
    faulthandler.enable()
    ex = Exerciser(path, seed)
    with open(log, "w", buffering=1) as trail:
        try:
            for n in range(ops):
                trail.write(f"op {n}: ")
                trail.write(ex.step(trail) + "\n")
        except Exception as exc:
            raise SystemExit(f"{type(exc).__name__}: {exc}") from None
        finally:
            ex.close()
    model_out.write_bytes(bytes(ex.model))


@pytest.mark.parametrize(
    ("seed", "options"),
    [(1, ()), (2, ()), (3, ("writeback_cache",)), (4, ("writeback_cache",))],
    ids=["1", "2", "3-writeback", "4-writeback"],
)
def test_random_io_on_one_file_matches_its_model(  # type: ignore[no-untyped-def]
    seed: int, options: tuple[str, ...], volume: Path, mounter, tmp_path: Path
) -> None:
    mount = mounter(volume, options=options)
    path, model_out, log = mount.mountpoint / "exercised", tmp_path / "model", tmp_path / "ops"
    child = subprocess.run(
        [sys.executable, __file__, str(path), str(seed), str(OPS), str(model_out), str(log)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    if child.returncode != 0:
        how = (f"died of {signal.Signals(-child.returncode).name}" if child.returncode < 0
               else child.stderr.strip().splitlines()[-1])
        trail = log.read_text().splitlines()[-6:] if log.exists() else []
        raise AssertionError(f"seed {seed}: the exerciser {how}; its last operations: {trail}")
    want = model_out.read_bytes()
    assert path.read_bytes() == want
    mount.stop()  # the daemon drops every key and the kernel every page: back from ciphertext
    mount.start()
    assert path.read_bytes() == want
    assert "integrity" not in mount.log() and "Traceback" not in mount.log()


def test_direct_reads_during_big_overwrites_never_see_a_torn_block(  # type: ignore[no-untyped-def]
    volume: Path, mounter
) -> None:
    """O_DIRECT reads reach the daemon whatever the page cache holds, and arrive while a big
    overwrite is being encrypted and written in a daemon worker thread. Each 4 KiB block read
    must be one whole version of that block, never EIO: a read served from the ciphertext
    file while the worker's pwrite was half done would find a block that is part old and part
    new (a ciphertext block straddles two pages), which no longer authenticates.

    A race: with reads let past the file's lock (ContentOps.read), EIO came in 4 runs of 5
    with 100 rounds of overwrites; 160 are run."""
    chunk, chunks, rounds, span = 1 << 20, 2, 160, 16 * BLOCK
    mount = mounter(volume)
    path = mount.mountpoint / "overwritten"
    path.write_bytes(bytes([1]) * chunk * chunks)
    done = threading.Event()
    problems: list[str] = []
    reads = [0]

    def recorded(target):  # type: ignore[no-untyped-def]
        """*target* with any exception it raises put in ``problems`` (a thread's own
        exception would reach pytest only as a warning)."""

        def run(*args) -> None:  # type: ignore[no-untyped-def]
            try:
                target(*args)
            except BaseException as exc:
                problems.append(f"{target.__name__}: {type(exc).__name__}: {exc}")
                done.set()

        return run

    def writer() -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            for version in range(2, rounds + 2):
                for i in range(chunks):  # each pwrite: one WRITE request per MiB
                    os.pwrite(fd, bytes([version]) * chunk, i * chunk)
        finally:
            os.close(fd)
            done.set()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, span)  # page-aligned, as O_DIRECT wants
        seen: dict[int, int] = {}  # block -> the newest version this reader saw in it
        try:
            while not done.is_set() and not problems:
                first = rng.randrange((chunk * chunks - span) // BLOCK + 1)
                try:
                    n = os.preadv(fd, [buf], first * BLOCK)
                except OSError as exc:
                    problems.append(f"blocks {first}+: {exc}")
                    return
                assert n == span, f"a read of {span} bytes inside the file gave {n}"
                for i in range(0, span, BLOCK):  # a read may span two WRITEs: block by block
                    block, data = first + i // BLOCK, buf[i : i + BLOCK]
                    if data.count(data[:1]) != BLOCK:
                        problems.append(f"block {block}: not one version")
                    elif data[0] < seen.get(block, 0):  # a write that returned, undone
                        problems.append(f"block {block}: version {data[0]} after {seen[block]}")
                    else:
                        seen[block] = data[0]
                reads[0] += 1
        finally:
            buf.close()
            os.close(fd)

    threads = [threading.Thread(target=recorded(writer))]
    threads += [threading.Thread(target=recorded(reader), args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not problems, problems[:3]
    assert reads[0] > 0
    final = path.read_bytes()
    assert len(final) == chunk * chunks and final.count(bytes([rounds + 1])) == len(final)
    assert "integrity" not in mount.log() and "Traceback" not in mount.log()


if __name__ == "__main__":  # the child of test_random_io_on_one_file_matches_its_model
    exercise(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]),
             Path(sys.argv[5]))
