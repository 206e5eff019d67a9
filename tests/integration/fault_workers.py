"""Workloads run in separate processes by test_faults_concurrency.py and tools/soak.py.

Each function is deterministic given its arguments (so the same run can be replayed on a plain
directory), touches only what it is told to, and returns a list of problems instead of raising:
an errno other than the expected ones, a short read, a record that is not whole.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import random
import struct
from pathlib import Path

RECORD_HEADER = struct.Struct(">4sHII")  # magic, writer, sequence number, payload length
MAGIC = b"REC1"
SLOT = 3000  # slot records are not block aligned: neighbours share ciphertext blocks


def payload(writer: int, seq: int, length: int) -> bytes:
    seed = hashlib.sha256(f"{writer}:{seq}".encode()).digest()
    return (seed * (length // 32 + 1))[:length]


def record(writer: int, seq: int, length: int) -> bytes:
    return RECORD_HEADER.pack(MAGIC, writer, seq, length) + payload(writer, seq, length)


def parse_records(data: bytes) -> tuple[list[tuple[int, int]], str | None]:
    """(writer, seq) of each whole record in ``data``; the problem if one is not whole."""
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < RECORD_HEADER.size:
            return out, f"torn header at {pos}"
        magic, writer, seq, length = RECORD_HEADER.unpack_from(data, pos)
        if magic != MAGIC:
            return out, f"no record at {pos}"
        body = data[pos + RECORD_HEADER.size : pos + RECORD_HEADER.size + length]
        if body != payload(writer, seq, length):
            return out, f"record {writer}:{seq} at {pos} is not whole"
        out.append((writer, seq))
        pos += RECORD_HEADER.size + length
    return out, None


def _err(problems: list[str], what: str, exc: OSError) -> None:
    problems.append(f"{what}: {errno.errorcode.get(exc.errno or 0, exc.errno)}")


def own_files(root: str, writer: int, seed: int, ops: int) -> list[str]:
    """Random writes, appends, pwrites, truncates and reads on this writer's own files."""
    rng = random.Random(seed * 1000 + writer)
    problems: list[str] = []
    names = [Path(root) / f"w{writer}-{k}" for k in range(4)]
    for i in range(ops):
        path = rng.choice(names)
        kind = rng.choice(["write", "append", "append", "pwrite", "pwrite", "truncate", "read"])
        data = rng.randbytes(rng.choice([1, 100, 4095, 4096, 4097, 9000, 20_000]))
        offset = rng.randrange(0, 40_000)
        try:
            if kind == "write":
                path.write_bytes(data)
            elif kind == "append":
                with open(path, "ab") as f:
                    f.write(data)
            elif kind == "pwrite":
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.pwrite(fd, data, offset)
                finally:
                    os.close(fd)
            elif kind == "truncate":
                if path.exists():
                    os.truncate(path, offset)
            elif kind == "read" and path.exists():
                size = path.stat().st_size
                got = path.read_bytes()
                if len(got) != size:
                    problems.append(f"op {i}: read {len(got)} bytes of {size}")
        except OSError as exc:
            _err(problems, f"op {i} {kind} {path.name}", exc)
    return problems


def appender(root: str, writer: int, count: int) -> list[str]:
    """O_APPEND records of varied sizes to the shared ``shared.log``."""
    problems: list[str] = []
    rng = random.Random(writer)
    fd = os.open(Path(root) / "shared.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for seq in range(count):
            rec = record(writer, seq, rng.choice([10, 500, 4000, 4100, 9000]))
            try:
                if os.write(fd, rec) != len(rec):
                    problems.append(f"append {seq}: short write")
            except OSError as exc:
                _err(problems, f"append {seq}", exc)
    finally:
        os.close(fd)
    return problems


def slot_writer(root: str, writer: int, writers: int, count: int) -> list[str]:
    """pwrite of fixed-size records into this writer's slots of the shared ``shared.slots``."""
    problems: list[str] = []
    fd = os.open(Path(root) / "shared.slots", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for seq in range(count):
            slot = writer + writers * seq
            rec = record(writer, seq, SLOT - RECORD_HEADER.size)
            try:
                os.pwrite(fd, rec, slot * SLOT)
                if seq % 8 == 0:
                    os.fsync(fd)
                if os.pread(fd, SLOT, slot * SLOT) != rec:
                    problems.append(f"slot {slot}: does not read back")
            except OSError as exc:
                _err(problems, f"slot {slot}", exc)
    finally:
        os.close(fd)
    return problems


def truncator(root: str, writer: int, count: int) -> list[str]:
    """Writes and truncates ``shared.trunc`` while a reader reads it; sizes must stay sane."""
    problems: list[str] = []
    rng = random.Random(writer)
    path = Path(root) / "shared.trunc"
    for i in range(count):
        try:
            if i % 3 == 2:
                os.truncate(path, rng.randrange(0, 30_000))
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    os.pwrite(fd, rng.randbytes(rng.randrange(1, 9000)), rng.randrange(0, 30_000))
                finally:
                    os.close(fd)
        except OSError as exc:
            _err(problems, f"truncator {i}", exc)
    return problems


def reader(root: str, rounds: int) -> list[str]:
    """Reads every shared file over and over: never EIO, never more bytes than st_size allows."""
    problems: list[str] = []
    for i in range(rounds):
        for name in ("shared.log", "shared.slots", "shared.trunc"):
            path = Path(root) / name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                _err(problems, f"read {i} {name}", exc)
                continue
            if name == "shared.log":
                # Appends are atomic: any prefix read holds only whole records (the last may
                # be cut by a concurrent append's page-cache update, so it is not checked).
                _, problem = parse_records(data)
                if problem and not problem.startswith(("torn header", "record")):
                    problems.append(f"read {i} shared.log: {problem}")
    return problems


def crash_writer(root: str, prefix: str, seed: int) -> None:
    """Heavy writes until killed; prints ``start NAME``, ``synced NAME SIZE`` (after fsync)
    and ``journal SIZE`` (after the shared journal's fsync), flushed, on stdout.

    Every file's content is ``payload(prefix-derived writer, k, size)``: a verifier rebuilds
    it from the name alone. A file is written in shuffled chunks (partial blocks, rewrites),
    so the daemon's read-modify-write paths run at the moment of the kill.
    """
    rng = random.Random(seed)
    # Names resolve through a directory fd of the mount: after the daemon dies and the mount
    # is lazily detached, a path would silently reach the empty directory underneath.
    base = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    journal = os.open("journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644, dir_fd=base)
    jsize = os.fstat(journal).st_size
    try:
        for k in range(100_000):
            name = f"{prefix}-{k}"
            size = rng.choice([0, 1, 4095, 4096, 4097, 50_000, 300_000, 1_100_000])
            data = payload(hash_name(name), 0, size)
            print(f"start {name}", flush=True)
            fd = os.open(name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644, dir_fd=base)
            try:
                cuts = sorted({0, size, *(rng.randrange(0, size + 1) for _ in range(6))})
                spans = list(itertools.pairwise(cuts))
                rng.shuffle(spans)
                for a, b in spans:
                    os.pwrite(fd, data[a:b], a)
                os.fsync(fd)
            finally:
                os.close(fd)
            print(f"synced {name} {size}", flush=True)
            entry = stream_bytes(jsize, rng.randrange(1, 6000))
            jsize += os.write(journal, entry)
            if k % 2 == 0:
                os.fsync(journal)
                print(f"journal {jsize}", flush=True)
    except OSError:
        return  # the daemon is gone
    finally:
        with contextlib.suppress(OSError):
            os.close(journal)
        with contextlib.suppress(OSError):
            os.close(base)


def hash_name(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")



def stream_bytes(start: int, length: int) -> bytes:
    """Bytes [start, start+length) of the journal's endless deterministic content."""
    first, last = start // 32, (start + length + 31) // 32
    blob = b"".join(hashlib.sha256(b"journal%d" % n).digest() for n in range(first, last))
    return blob[start - first * 32 : start - first * 32 + length]
