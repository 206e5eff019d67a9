"""Many threads renaming, linking and removing in one small namespace at once.

The model test (test_fs_model.py) runs one operation at a time, and the concurrency tests
(test_faults_concurrency.py) share files, not names. Here four threads create, rename (over
files, across directories, of directories, RENAME_EXCHANGE), link, symlink, unlink, mkdir and
rmdir among a handful of names, long ones among them (a sidecar per name, written and removed
with it), so that the same entries are looked up, moved and removed by several requests at
once: the daemon's inode table, name cache, directory IVs and sidecars must follow every
interleaving the kernel lets through.

Nothing here has a single right end state; what must hold is what a user relies on:
- every operation either works or fails with an errno a local file system could give for a
  name that another thread just moved (never EIO, never an errno outside that set);
- every file, at the end, holds exactly the bytes its creator wrote, and every symlink the
  target it was made with (names move, contents never mix);
- the tree reads the same after a remount, and fsck of the ciphertext finds nothing wrong.
"""

from __future__ import annotations

import errno
import os
import random
import stat
import threading
from pathlib import Path

from kmsfs.fs.fsck import check_tree
from tests.integration.fs_helpers import SoftDeriver, renameat2
from tests.integration.test_fs_model import snapshot

THREADS = 4
OPS = 350
REPS = 300  # a file is its creator's tag this many times: a few KiB, a partial last block
NAMES = ["a", "b", "c", "L" * 200, "M" * 220]  # the long ones need a sidecar each
#: What a local file system answers when another thread has just moved, made or removed the
#: name an operation names (EPERM: a hard link to a directory; EINVAL: a directory moved into
#: itself; ENAMETOOLONG: a path through a symlink whose long target is a single name).
RACED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR,
         errno.EINVAL, errno.EPERM, errno.ENAMETOOLONG}
RENAME_EXCHANGE = 2


def tag_of(thread: int, n: int) -> bytes:
    return f"<{thread}:{n}>".encode()


def link_target(thread: int, n: int, rng: random.Random) -> str:
    """A symlink target that names its maker; some past 4,000 bytes (stored in a blob)."""
    return f"t{thread}-{n}-" + "x" * rng.choice((0, 50, 3000))


class Storm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[str] = []

    def short(self, path: Path) -> str:
        """*path* below the mount, long names abridged, for failure messages."""
        rel = str(path.relative_to(self.root))
        return rel.replace(NAMES[3], "L*200").replace(NAMES[4], "M*220")

    def path(self, rng: random.Random) -> Path:
        depth = rng.randint(1, 3)
        return self.root.joinpath(*(rng.choice(NAMES) for _ in range(depth)))

    def run(self, thread: int, seed: int) -> None:
        rng = random.Random(seed)
        for n in range(OPS):
            op = rng.choice(("create", "create", "mkdir", "rename", "rename", "exchange",
                             "link", "symlink", "unlink", "rmdir", "read", "list"))
            a, b = self.path(rng), self.path(rng)
            try:
                self.apply(op, a, b, thread, n, rng)
            except OSError as exc:
                if exc.errno not in RACED:
                    self.problems.append(f"thread {thread} op {n}: {op} {self.short(a)} "
                                         f"{self.short(b)}: {exc.strerror}")

    def apply(self, op: str, a: Path, b: Path, thread: int, n: int,
              rng: random.Random) -> None:
        if op == "create":
            fd = os.open(a, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, tag_of(thread, n) * REPS)
            finally:
                os.close(fd)
        elif op == "mkdir":
            os.mkdir(a)
        elif op == "rename":
            os.rename(a, b)
        elif op == "exchange":
            renameat2(a, b, RENAME_EXCHANGE)
        elif op == "link":
            os.link(a, b)
        elif op == "symlink":
            os.symlink(link_target(thread, n, rng), a)
        elif op == "unlink":
            os.unlink(a)
        elif op == "rmdir":
            os.rmdir(a)
        elif op == "read":
            if stat.S_ISLNK(os.lstat(a).st_mode):
                os.readlink(a)
            else:
                a.read_bytes()  # EISDIR for a directory: raced, as the others
        elif op == "list":
            os.listdir(a)


def check_contents(root: Path) -> list[str]:
    """Every file is one creator's tag REPS times; every symlink a target as made."""
    wrong = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.is_symlink():
                target = os.readlink(p)
                head, _, pad = target.rpartition("-")
                if not head.startswith("t") or pad.strip("x"):
                    wrong.append(f"{p}: symlink target {target[:40]!r}")
                continue
            data = p.read_bytes()
            tag = data[: data.find(b">") + 1]
            if not tag.startswith(b"<") or data != tag * REPS:
                wrong.append(f"{p}: {len(data)} bytes, not one creator's")
    return wrong


def test_threads_moving_the_same_names_keep_every_file_whole(  # type: ignore[no-untyped-def]
    volume: Path, mounter
) -> None:
    mount = mounter(volume)
    storm = Storm(mount.mountpoint)
    for name in NAMES[:3]:
        (mount.mountpoint / name).mkdir()
    threads = [threading.Thread(target=storm.run, args=(i, 1000 + i)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not storm.problems, storm.problems[:5]
    assert check_contents(mount.mountpoint) == []
    before = snapshot(mount.mountpoint)
    assert len(before) > 10  # the storm left a tree worth checking
    mount.stop()
    report = check_tree(volume, SoftDeriver())
    assert report.problems == [], report.problems[:5]
    mount.start()
    assert snapshot(mount.mountpoint) == before
    assert "integrity" not in mount.log() and "Traceback" not in mount.log()
