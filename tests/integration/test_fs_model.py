"""Randomized model test: one seeded op sequence on the mount and on a plain directory.

After the sequence (and again after a remount) both trees must be identical: names, types,
contents, symlink targets, modes and link counts; every op must fail with the same errno on both.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

NAMES = ["a", "b", "c", "long" * 40, "dir1", "dir2", "é"]


def snapshot(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(p, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_nlink, st.st_size, f.read())
    return out


class OpGen:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def path(self, depth: int = 2) -> str:
        parts = [self.rng.choice(NAMES) for _ in range(self.rng.randint(1, depth))]
        return "/".join(parts)

    def op(self) -> tuple[str, Callable[[Path], object]]:
        r = self.rng
        kind = r.choice(["write", "write", "pwrite", "append", "truncate", "mkdir", "rmdir",
                         "unlink", "rename", "link", "symlink", "chmod", "read"])
        p, q = self.path(), self.path()
        data = r.randbytes(r.choice([0, 1, 100, 4096, 5000, 20_000]))
        off, size, mode = r.randrange(0, 30_000), r.randrange(0, 30_000), r.choice([0o600, 0o755])

        def run(root: Path) -> object:
            a, b = root / p, root / q
            if kind == "write":
                a.write_bytes(data)
            elif kind == "pwrite":
                fd = os.open(a, os.O_WRONLY)
                try:
                    os.pwrite(fd, data, off)
                finally:
                    os.close(fd)
            elif kind == "append":
                with open(a, "ab") as f:
                    f.write(data)
            elif kind == "truncate":
                os.truncate(a, size)
            elif kind == "mkdir":
                os.mkdir(a, mode)
            elif kind == "rmdir":
                os.rmdir(a)
            elif kind == "unlink":
                os.unlink(a)
            elif kind == "rename":
                os.rename(a, b)
            elif kind == "link":
                os.link(a, b)
            elif kind == "symlink":
                os.symlink(q, a)
            elif kind == "chmod":
                os.chmod(a, mode)
            elif kind == "read":
                return a.read_bytes()
            return None

        return f"{kind} {p} {q}", run


def apply(run: Callable[[Path], object], root: Path) -> tuple[str, object]:
    try:
        return "ok", run(root)
    except OSError as exc:
        return "err", errno.errorcode.get(exc.errno or 0, exc.errno)


@pytest.mark.parametrize(
    ("seed", "options"),
    [(1, ()), (2, ()), (3, ("writeback_cache",))],
    ids=["1", "2", "3-writeback"],
)
def test_random_ops_match_plain_dir(  # type: ignore[no-untyped-def]
    seed: int, options: tuple[str, ...], tmp_path: Path, volume: Path, mounter
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    mount = mounter(volume, options=options)
    gen = OpGen(seed)
    for i in range(600):
        desc, run = gen.op()
        want, got = apply(run, plain), apply(run, mount.mountpoint)
        assert got == want, f"op {i}: {desc}"
    expected = snapshot(plain)
    assert snapshot(mount.mountpoint) == expected
    mount.stop()
    mount.start()
    assert snapshot(mount.mountpoint) == expected
    assert "integrity" not in mount.log() and "Traceback" not in mount.log()
