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

import collections
import contextlib
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
OPS = 500
REPS = 1200  # a file is its creator's tag this many times: 8-10 KiB, 2 to 3 blocks
NAMES = ["a", "b", "c", "L" * 200, "M" * 220]  # the long ones need a sidecar each
#: What a local file system answers when another thread has just moved, made or removed a name
#: an operation names, by operation. ENOENT and ENOTDIR: a name gone or replaced on the way;
#: ENAMETOOLONG: a path through a symlink whose long target is a single name.
RACED_ANY = {errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG}
RACED = {
    "create": {errno.EEXIST},
    "mkdir": {errno.EEXIST},
    "rename": {errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.EINVAL},  # EINVAL: into itself
    "exchange": {errno.EINVAL},  # a directory with one of its own descendants
    "link": {errno.EEXIST, errno.EPERM},  # EPERM: a hard link to a directory
    "symlink": {errno.EEXIST},
    "unlink": {errno.EISDIR},
    "rmdir": {errno.ENOTEMPTY},
    "read": {errno.EISDIR, errno.EINVAL},  # EINVAL: readlink of what is no longer a symlink
    "list": set(),
}
RENAME_EXCHANGE = 2


def tag_of(thread: int, n: int) -> bytes:
    return f"<{thread}:{n}>".encode()


def link_target(thread: int, n: int, rng: random.Random) -> str:
    """A symlink target unique to its maker's operation; some of them 3,000 bytes long, past
    what a ciphertext symlink holds (kept in a blob in kmsfs.longlinks)."""
    return f"t{thread}-{n}-" + "x" * rng.choice((0, 50, 3000))


class Storm:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.problems: list[str] = []
        self.succeeded: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.tags: dict[int, set[bytes]] = collections.defaultdict(set)  # inode -> its tags
        self.targets: dict[int, set[str]] = collections.defaultdict(set)  # inode -> targets

    def short(self, path: Path) -> str:
        """*path* below the mount, long names abridged, for failure messages."""
        rel = str(path.relative_to(self.root))
        return rel.replace(NAMES[3], "L*200").replace(NAMES[4], "M*220")

    def path(self, rng: random.Random) -> Path:
        """A path of 1 to 3 names, which may or may not exist."""
        depth = rng.randint(1, 3)
        return self.root.joinpath(*(rng.choice(NAMES) for _ in range(depth)))

    def existing(self, rng: random.Random) -> Path:
        """Mostly a path that exists just now (a random walk down the tree), so that most
        operations act on something rather than fail with ENOENT."""
        path = self.root
        for _ in range(rng.randint(1, 3)):
            try:
                names = os.listdir(path)
            except OSError:
                break
            if not names:
                break
            path = path / rng.choice(names)
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    break
            except OSError:  # gone meanwhile: the operation will say ENOENT
                break
        return path if path != self.root and rng.random() < 0.8 else self.path(rng)

    def existing_file(self, rng: random.Random) -> Path | None:
        for _ in range(4):
            path = self.existing(rng)
            with contextlib.suppress(OSError):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    return path
        return None

    def run(self, thread: int, seed: int) -> None:
        rng = random.Random(seed)
        for n in range(OPS):
            op = rng.choice(("create", "create", "mkdir", "rename", "rename", "exchange",
                             "link", "symlink", "unlink", "rmdir", "read", "list"))
            a = self.path(rng) if op in ("create", "mkdir", "symlink") else self.existing(rng)
            if op == "link":  # a file to link, most times: a directory is only EPERM
                a = self.existing_file(rng) or a
            b = self.path(rng)
            try:
                self.apply(op, a, b, thread, n, rng)
                self.succeeded[op] += 1
            except OSError as exc:
                if exc.errno not in RACED_ANY | RACED[op]:
                    self.problems.append(f"thread {thread} op {n}: {op} {self.short(a)} "
                                         f"{self.short(b)}: {exc.strerror}")
            except Exception as exc:  # anything else would end the thread unseen
                self.problems.append(f"thread {thread} op {n}: {op}: {exc!r}")

    def apply(self, op: str, a: Path, b: Path, thread: int, n: int,
              rng: random.Random) -> None:
        if op == "create":
            fd = os.open(a, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, tag_of(thread, n) * REPS)
                with self.lock:
                    self.tags[os.fstat(fd).st_ino].add(tag_of(thread, n))
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
            target = link_target(thread, n, rng)
            os.symlink(target, a)
            st = os.lstat(a)  # still this symlink, unless another thread moved one here
            if stat.S_ISLNK(st.st_mode) and os.readlink(a) == target:
                with self.lock:
                    self.targets[st.st_ino].add(target)
        elif op == "unlink":
            os.unlink(a)
        elif op == "rmdir":
            os.rmdir(a)
        elif op == "read":
            if stat.S_ISLNK(os.lstat(a).st_mode):
                os.readlink(a)
            else:
                a.read_bytes()
        elif op == "list":
            os.listdir(a)


def raise_error(exc: OSError) -> None:
    raise exc


def check_contents(storm: Storm) -> list[str]:
    """Every file holds one of the tags written into its inode, REPS times, and has as many
    links as names found; every symlink the exact target it was made with."""
    wrong = []
    names: collections.Counter[int] = collections.Counter()
    nlinks: dict[int, int] = {}
    for dirpath, _dirs, files in os.walk(storm.root, onerror=raise_error):
        for name in files:
            p = Path(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(p)
                if target not in storm.targets.get(st.st_ino, {target}):
                    wrong.append(f"{storm.short(p)}: symlink target {target[:20]!r}..., made "
                                 "for another symlink")
                elif not target.startswith("t"):
                    wrong.append(f"{storm.short(p)}: symlink target {target[:20]!r}...")
                continue
            names[st.st_ino] += 1
            nlinks[st.st_ino] = st.st_nlink
            data = p.read_bytes()
            tag = data[: data.find(b">") + 1]
            if data != tag * REPS or tag not in storm.tags.get(st.st_ino, ()):
                wrong.append(f"{storm.short(p)}: {len(data)} bytes, not what was written into "
                             "its inode")
    wrong += [f"inode {ino}: {nlinks[ino]} links, {count} names"
              for ino, count in names.items() if nlinks[ino] != count]
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
    # Each kind of operation worked often enough for the storm to mean something.
    assert min(storm.succeeded[op] for op in RACED) >= 3, storm.succeeded
    assert check_contents(storm) == []
    before = snapshot(mount.mountpoint)
    mount.stop()
    report = check_tree(volume, SoftDeriver())
    assert report.problems == [], report.problems[:5]
    mount.start()
    assert snapshot(mount.mountpoint) == before
    assert "integrity" not in mount.log() and "Traceback" not in mount.log()
