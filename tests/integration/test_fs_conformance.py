"""POSIX conformance of a kmsfs mount, judged against ext4 itself.

Every scenario below runs twice: once in a plain directory on the host file system (ext4, the
reference) and once in a kmsfs mount made with ``-o allow_other`` (the daemon adds
``default_permissions``). A scenario records what it sees: the errno or success of each call,
modes, owners, sizes, link counts, and whether ctime/mtime moved. The two records must be
identical. Calls by unprivileged users run in forked children that drop to plain uids/gids
(no /etc/passwd entries needed), the way a conformance suite run as root does.

The behaviours follow what pjdfstest checks on Linux (chmod, chown, open, mkdir, mkfifo,
mknod, link, unlink, rmdir, rename, symlink, truncate/ftruncate, utimensat, posix_fallocate),
written from scratch here.
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.fs_helpers import Mount, make_volume

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches users: needs root")

TICK = 0.02  # longer than the coarse clock behind ext4 timestamps
User = tuple[int, int, tuple[int, ...]]


def user(uid: int, gid: int | None = None, *groups: int) -> User:
    gid = uid if gid is None else gid
    return uid, gid, groups or (gid,)


NOBODY = user(65534)
U1000, U1001, U1002 = user(1000), user(1001), user(1002)


# --- running calls and recording outcomes --------------------------------------------------
def _attempt(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    try:
        out = fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, exc.errno)
    if out is None or isinstance(out, os.stat_result):
        return "ok"
    return out


def as_user(who: User, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn(*args)`` in a forked child with *who*'s credentials; its result or errno name."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        status = 1
        try:
            os.close(rfd)
            uid, gid, groups = who
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            os.umask(0)
            os.write(wfd, pickle.dumps(_attempt(fn, args)))
            status = 0
        finally:
            os._exit(status)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and data, "child failed"
    return pickle.loads(data)


class Run:
    """One scenario in one root: paths relative to its top directory, and the outcome log."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.log: list[tuple[Any, ...]] = []

    def p(self, name: str) -> str:
        return str(self.top / name)

    def call(self, label: str, fn: Callable[..., Any], *args: Any, who: User | None = None) -> Any:
        out = _attempt(fn, args) if who is None else as_user(who, fn, *args)
        self.log.append((label, out))
        return out

    def attrs(self, label: str, name: str, *fields: str, follow: bool = False) -> None:
        try:
            st = os.stat(self.p(name)) if follow else os.lstat(self.p(name))
        except OSError as exc:
            self.log.append((label, name, errno.errorcode[exc.errno or 0]))
            return
        values = []
        for f in fields:
            v = stat.S_IMODE(st.st_mode) if f == "mode" else getattr(st, "st_" + f)
            values.append(oct(v) if f == "mode" else v)
        self.log.append((label, name, *values))

    def track(self, *names: str) -> dict[str, tuple[int, int]]:
        """Remember ctime/mtime of *names*, then wait so that any change is visible."""
        snap = {}
        for n in names:
            st = os.lstat(self.p(n))
            snap[n] = (st.st_ctime_ns, st.st_mtime_ns)
        time.sleep(TICK)
        return snap

    def moved(self, label: str, snap: dict[str, tuple[int, int]]) -> None:
        """Record, per tracked name, whether its (ctime, mtime) changed since ``track``."""
        out = []
        for n, (c, m) in snap.items():
            st = os.lstat(self.p(n))
            out.append((n, st.st_ctime_ns != c, st.st_mtime_ns != m))
        self.log.append((label, *out))


SCENARIOS: list[Callable[[Run], None]] = []


def scenario(fn: Callable[[Run], None]) -> Callable[[Run], None]:
    SCENARIOS.append(fn)
    return fn


@pytest.fixture(scope="module")
def roots() -> Iterator[tuple[Path, Path]]:
    base = Path(tempfile.mkdtemp(prefix="kmsfs-conf-"))
    mount: Mount | None = None
    try:  # also when the volume or the mount cannot be made: nothing is left in /tmp
        os.chmod(base, 0o755)  # other users must reach both roots
        mount = Mount(make_volume(base / "cipher"), base / "mnt", base / "mnt.log",
                      ("allow_other",))
        mount.start()
        ref = base / "ref"
        ref.mkdir()
        kind = subprocess.run(["stat", "-f", "-c", "%t", str(ref)], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert kind == "ef53", f"the reference {ref} must be on ext4 (set TMPDIR), not {kind}"
        for d in (ref, mount.mountpoint):
            os.chmod(d, 0o777)
        yield ref, mount.mountpoint
    finally:
        if mount is not None:
            mount.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _umask0() -> Iterator[None]:
    old = os.umask(0)
    yield
    os.umask(old)


@pytest.mark.parametrize("check", SCENARIOS, ids=lambda f: f.__name__)
def test_same_as_ext4(roots: tuple[Path, Path], check: Callable[[Run], None]) -> None:
    logs = []
    for root in roots:
        top = root / check.__name__
        top.mkdir()
        os.chmod(top, 0o777)
        run = Run(top)
        check(run)
        logs.append(run.log)
    ref, kms = logs
    for i, (want, have) in enumerate(zip(ref, kms, strict=True)):
        assert have == want, f"step {i}: ext4 gave {want}, kmsfs gave {have}"


def _forget_cached_attributes() -> None:
    """Make the kernel drop unused dentries and inodes, so the next stat on a mount reaches
    the daemon instead of the attributes the kernel keeps for a second."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


# --- small operations (module level so that children can run them) -------------------------
def creat(path: str, mode: int = 0o644, flags: int = 0) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | flags, mode))


def open_close(path: str, flags: int) -> None:
    os.close(os.open(path, flags))


def write_fstat_mode(path: str, flags: int) -> str:
    fd = os.open(path, flags)
    try:
        os.write(fd, b"x")
        return oct(stat.S_IMODE(os.fstat(fd).st_mode))
    finally:
        os.close(fd)


def ftruncate_path(path: str, size: int, flags: int = os.O_WRONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def bind_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(path)
    finally:
        s.close()


def make(r: Run, kind: str, name: str, mode: int = 0o644) -> None:
    """Create an entry of *kind* as root (the pjdfstest ``create_file`` kinds)."""
    p = r.p(name)
    if kind == "regular":
        creat(p, mode)
    elif kind == "dir":
        os.mkdir(p, mode)
    elif kind == "fifo":
        os.mkfifo(p, mode)
    elif kind == "char":
        os.mknod(p, stat.S_IFCHR | mode, os.makedev(1, 2))
    elif kind == "block":
        os.mknod(p, stat.S_IFBLK | mode, os.makedev(1, 2))
    elif kind == "socket":
        bind_socket(p)
        os.chmod(p, mode)
    else:
        os.symlink("test", p)


def remove(r: Run, name: str) -> None:
    p = r.p(name)
    if os.path.isdir(p) and not os.path.islink(p):
        os.rmdir(p)
    else:
        os.unlink(p)


KINDS = ("regular", "dir", "fifo", "char", "block", "socket")

_libc = ctypes.CDLL(None, use_errno=True)
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def utimensat(path: str, atime: tuple[int, int], mtime: tuple[int, int], flags: int = 0) -> None:
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    if _libc.utimensat(-100, os.fsencode(path), times, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# --- chmod -----------------------------------------------------------------------------------
@scenario
def chmod_by_owner_and_others(r: Run) -> None:
    for kind in KINDS:
        make(r, kind, "n")
        os.chown(r.p("n"), 65534, 65534)
        snap = r.track("n")
        r.call(f"{kind}: owner chmod", os.chmod, r.p("n"), 0o1751, who=NOBODY)
        r.attrs("mode", "n", "mode")
        r.moved("ctime after chmod", snap)
        snap = r.track("n")
        r.call(f"{kind}: other chmod", os.chmod, r.p("n"), 0o777, who=U1000)
        r.moved("ctime after failed chmod", snap)
        r.call(f"{kind}: root chmod", os.chmod, r.p("n"), 0o7777)
        r.attrs("mode", "n", "mode")
        remove(r, "n")
    make(r, "regular", "f")
    os.symlink("f", r.p("l"))
    os.chown(r.p("f"), 65534, 65534)
    r.call("chmod through symlink", os.chmod, r.p("l"), 0o600, who=NOBODY)
    r.attrs("target", "f", "mode")
    r.attrs("link", "l", "mode", "uid")


@scenario
def chmod_setgid_needs_group(r: Run) -> None:
    for kind in ("regular", "dir"):
        make(r, kind, "n", 0o755)
        os.chown(r.p("n"), 65534, 65533)
        r.call(f"{kind}: sgid, not in group", os.chmod, r.p("n"), 0o2755, who=NOBODY)
        r.attrs("mode", "n", "mode")
        who = user(65534, 65534, 65534, 65533)
        r.call(f"{kind}: sgid, in group", os.chmod, r.p("n"), 0o2755, who=who)
        r.attrs("mode", "n", "mode")
        r.call(f"{kind}: sticky by owner", os.chmod, r.p("n"), 0o1644, who=NOBODY)
        r.attrs("mode", "n", "mode")
        remove(r, "n")


# --- chown -----------------------------------------------------------------------------------
@scenario
def chown_by_non_root(r: Run) -> None:
    member = user(65534, 65532, 65532, 65531)
    for kind in (*KINDS, "symlink"):
        make(r, kind, "n")
        chown = os.lchown
        r.call(f"{kind}: root chown", chown, r.p("n"), 65534, 65533)
        r.attrs("ids", "n", "uid", "gid")
        snap = r.track("n")
        r.call("chgrp to own group", chown, r.p("n"), -1, 65532, who=member)
        r.attrs("ids", "n", "uid", "gid")
        r.moved("ctime", snap)
        r.call("chown to self, other own group", chown, r.p("n"), 65534, 65531, who=member)
        r.attrs("ids", "n", "uid", "gid")
        snap = r.track("n")
        r.call("give away", chown, r.p("n"), 1000, -1, who=member)
        r.call("chgrp to foreign group", chown, r.p("n"), -1, 1000, who=member)
        r.call("non-owner chgrp", chown, r.p("n"), -1, 65531, who=user(1000, 1000, 65531))
        r.call("non-owner -1 -1", chown, r.p("n"), -1, -1, who=U1000)
        r.moved("ctime after failures", snap)
        r.attrs("ids", "n", "uid", "gid")
        remove(r, "n")
    make(r, "regular", "f")
    os.symlink("f", r.p("l"))
    r.call("chown through symlink", os.chown, r.p("l"), 123, 456)
    r.attrs("target", "f", "uid", "gid")
    r.attrs("link", "l", "uid", "gid")


@scenario
def chown_clears_setid(r: Run) -> None:
    member = user(65534, 65533, 65533, 65532)
    for kind in ("regular", "dir", "fifo"):
        for mode in (0o6555, 0o6444):
            make(r, kind, "n")
            os.chown(r.p("n"), 65534, 65533)
            for label, who, ids in (
                ("root chown", None, (65532, 65531)),
                ("root chown -1 -1", None, (-1, -1)),
                ("owner chgrp", member, (65534, 65532)),
                ("owner chgrp back", member, (-1, 65533)),
                ("owner -1 -1", member, (-1, -1)),
            ):
                if label == "owner chgrp":
                    os.chown(r.p("n"), 65534, 65533)
                os.chmod(r.p("n"), mode)
                r.call(f"{kind} {oct(mode)}: {label}", os.chown, r.p("n"), *ids, who=who)
                r.attrs("after", "n", "mode", "uid", "gid")
            remove(r, "n")


# --- write and truncate kill set-id bits -----------------------------------------------------
@scenario
def write_and_truncate_clear_setid(r: Run) -> None:
    for mode in (0o4777, 0o2777, 0o6777, 0o6767):
        creat(r.p("f"), mode)
        os.chmod(r.p("f"), mode)
        r.call(f"{oct(mode)}: non-owner write", write_fstat_mode, r.p("f"), os.O_WRONLY, who=NOBODY)
        r.attrs("mode", "f", "mode")
        os.chmod(r.p("f"), mode)
        r.call("root write", write_fstat_mode, r.p("f"), os.O_RDWR)
        r.attrs("mode", "f", "mode")
        r.call("non-owner truncate", os.truncate, r.p("f"), 100, who=NOBODY)
        r.attrs("mode", "f", "mode", "size")
        os.chmod(r.p("f"), mode)
        r.call("non-owner ftruncate", ftruncate_path, r.p("f"), 3, who=NOBODY)
        r.attrs("mode", "f", "mode", "size")
        os.chmod(r.p("f"), mode)
        os.chown(r.p("f"), 1000, 1000)
        r.call("owner write", write_fstat_mode, r.p("f"), os.O_WRONLY, who=U1000)
        r.attrs("mode", "f", "mode")
        os.unlink(r.p("f"))


# --- open and access permission checks -------------------------------------------------------
@scenario
def open_permissions(r: Run) -> None:
    creat(r.p("f"), 0o640)
    os.chown(r.p("f"), 1000, 1000)
    group = user(1001, 1001, 1001, 1000)
    modes = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR, "trunc": os.O_RDONLY | os.O_TRUNC}
    for who_name, who in (("owner", U1000), ("group", group), ("other", U1002)):
        for flag_name, flags in modes.items():
            r.call(f"{who_name} open {flag_name}", open_close, r.p("f"), flags, who=who)
        for mode_name, mode in (("R", os.R_OK), ("W", os.W_OK), ("X", os.X_OK)):
            r.call(f"{who_name} access {mode_name}", os.access, r.p("f"), mode, who=who)
    r.call("root access X", os.access, r.p("f"), os.X_OK)
    os.chmod(r.p("f"), 0o0)
    r.call("root open mode 0", open_close, r.p("f"), os.O_RDWR)
    os.mkdir(r.p("d"), 0o700)
    creat(r.p("d/f"), 0o666)
    os.chown(r.p("d"), 1000, 1000)
    r.call("no search: open", open_close, r.p("d/f"), os.O_RDONLY, who=U1002)
    r.call("no search: stat", os.stat, r.p("d/f"), who=U1002)
    os.chmod(r.p("d"), 0o711)
    r.call("search only: open", open_close, r.p("d/f"), os.O_RDWR, who=U1002)
    r.call("search only: list", os.listdir, r.p("d"), who=U1002)
    r.call("search only: create", creat, r.p("d/new"), 0o644, who=U1002)
    r.call("search only: O_CREAT existing", creat, r.p("d/f"), 0o644, who=U1002)
    os.chmod(r.p("d"), 0o777)
    os.chmod(r.p("d/f"), 0o600)
    r.call("O_CREAT on existing, no write", creat, r.p("d/f"), 0o644, who=U1002)
    r.call("O_CREAT|O_EXCL on existing", creat, r.p("d/f"), 0o644, os.O_EXCL, who=U1002)
    r.call("O_CREAT|O_EXCL new", creat, r.p("d/g"), 0o644, os.O_EXCL, who=U1002)
    r.attrs("new file", "d/g", "mode", "uid", "gid", "size")
    os.symlink("f", r.p("d/l"))
    r.call("O_CREAT|O_EXCL on symlink", creat, r.p("d/l"), 0o644, os.O_EXCL)
    r.call("O_NOFOLLOW on symlink", open_close, r.p("d/l"), os.O_RDONLY | os.O_NOFOLLOW)
    r.call("O_DIRECTORY on file", open_close, r.p("d/f"), os.O_RDONLY | os.O_DIRECTORY)
    r.call("dir O_WRONLY", open_close, r.p("d"), os.O_WRONLY)
    r.call("dir O_RDWR", open_close, r.p("d"), os.O_RDWR)
    r.call("dir O_CREAT", creat, r.p("d"), 0o644)
    r.call("ENOTDIR in path", open_close, r.p("d/f/x"), os.O_RDONLY)
    r.call("trailing slash O_CREAT", creat, r.p("d/h/"), 0o644)


# --- modes and ownership of new entries ------------------------------------------------------
@scenario
def creation_modes(r: Run) -> None:
    for who_name, who in (("root", None), ("user", U1000)):
        for i, mode in enumerate((0o644, 0o4755, 0o2755, 0o1755, 0o7777, 0)):
            r.call(f"{who_name} creat {oct(mode)}", creat, r.p(f"f{who_name}{i}"), mode, who=who)
            r.attrs("mode", f"f{who_name}{i}", "mode", "uid", "gid", "nlink", "size")
            r.call("mkdir", os.mkdir, r.p(f"d{who_name}{i}"), mode, who=who)
            r.attrs("mode", f"d{who_name}{i}", "mode", "uid", "gid", "nlink")
            r.call("mkfifo", os.mkfifo, r.p(f"p{who_name}{i}"), mode, who=who)
            r.attrs("mode", f"p{who_name}{i}", "mode", "uid", "gid")
            r.call("mknod fifo", os.mknod, r.p(f"n{who_name}{i}"), stat.S_IFIFO | mode, 0, who=who)
            r.attrs("mode", f"n{who_name}{i}", "mode", "uid", "gid")
        chr_mode = stat.S_IFCHR | 0o6644
        r.call("mknod char", os.mknod, r.p(f"c{who_name}"), chr_mode, os.makedev(1, 3), who=who)
        r.attrs("mode", f"c{who_name}", "mode", "rdev")
        r.call("mknod block", os.mknod, r.p(f"b{who_name}"), stat.S_IFBLK | 0o644, 5, who=who)
        r.call("symlink", os.symlink, "target", r.p(f"l{who_name}"), who=who)
        r.attrs("link", f"l{who_name}", "mode", "uid", "gid", "size")
        r.call("bind", bind_socket, r.p(f"s{who_name}"), who=who)
        r.attrs("socket", f"s{who_name}", "uid", "gid")


@scenario
def new_entries_take_callers_ids(r: Run) -> None:
    caller = user(1000, 1001, 1001, 1002)
    os.mkdir(r.p("plain"), 0o777)
    os.mkdir(r.p("sgid"), 0o777)
    os.chown(r.p("sgid"), 0, 1003)
    os.chmod(r.p("sgid"), 0o2777)
    member = user(1000, 1001, 1001, 1003)
    for d in ("plain", "sgid"):
        for who_name, who in (("caller", caller), ("member", member), ("root", None)):
            pre = f"{d}/{who_name}"
            r.call(f"{pre} creat", creat, r.p(f"{pre}-f"), 0o2755, who=who)
            r.call(f"{pre} mkdir", os.mkdir, r.p(f"{pre}-d"), 0o755, who=who)
            r.call(f"{pre} mkfifo", os.mkfifo, r.p(f"{pre}-p"), 0o2644, who=who)
            r.call(f"{pre} mknod", os.mknod, r.p(f"{pre}-n"), stat.S_IFIFO | 0o2674, 0, who=who)
            r.call(f"{pre} symlink", os.symlink, "t", r.p(f"{pre}-l"), who=who)
            r.call(f"{pre} bind", bind_socket, r.p(f"{pre}-s"), who=who)
            r.call(f"{pre} nested mkdir", os.mkdir, r.p(f"{pre}-d/sub"), 0o700, who=who)
            r.call(f"{pre} nested creat", creat, r.p(f"{pre}-d/sub/f"), 0o600, who=who)
            for suffix in ("f", "d", "p", "n", "l", "s", "d/sub", "d/sub/f"):
                r.attrs("ids", f"{pre}-{suffix}", "mode", "uid", "gid")
    os.link(r.p("plain/caller-f"), r.p("sgid/hardlink"))
    r.attrs("hard link keeps ids", "sgid/hardlink", "mode", "uid", "gid", "nlink")
    r.call("rename into sgid dir keeps ids", os.rename, r.p("plain/root-d"), r.p("sgid/moved"))
    r.attrs("moved", "sgid/moved", "mode", "uid", "gid")


# --- names and path lengths ------------------------------------------------------------------
@scenario
def name_lengths(r: Run) -> None:
    ok, bad = "x" * 255, "y" * 256
    r.call("creat 255", creat, r.p(ok))
    r.call("stat 255", os.stat, r.p(ok))
    r.call("rename to 255", os.rename, r.p(ok), r.p("z" * 255))
    r.call("link 255", os.link, r.p("z" * 255), r.p(ok))
    r.call("mkdir 255", os.mkdir, r.p("d" * 255))
    r.call("mkfifo 255", os.mkfifo, r.p("p" * 255))
    r.call("symlink 255", os.symlink, "t", r.p("l" * 255))
    r.call("utf-8 254", creat, r.p("é" * 127))
    r.call("utf-8 256", creat, r.p("é" * 128))
    r.call("listing", lambda: sorted(os.listdir(str(r.top))))
    for label, fn, *args in (
        ("creat", creat, r.p(bad)),
        ("open", open_close, r.p(bad), os.O_RDONLY),
        ("stat", os.stat, r.p(bad)),
        ("mkdir", os.mkdir, r.p(bad)),
        ("rmdir", os.rmdir, r.p(bad)),
        ("mkfifo", os.mkfifo, r.p(bad)),
        ("mknod", os.mknod, r.p(bad), stat.S_IFIFO | 0o644),
        ("symlink name", os.symlink, "t", r.p(bad)),
        ("link to", os.link, r.p(ok), r.p(bad)),
        ("link from", os.link, r.p(bad), r.p("q")),
        ("rename to", os.rename, r.p(ok), r.p(bad)),
        ("rename from", os.rename, r.p(bad), r.p("q")),
        ("unlink", os.unlink, r.p(bad)),
        ("chmod", os.chmod, r.p(bad), 0o644),
        ("chown", os.chown, r.p(bad), 1, 1),
        ("truncate", os.truncate, r.p(bad), 0),
        ("utime", os.utime, r.p(bad)),
        ("getxattr", os.getxattr, r.p(bad), "user.a"),
    ):
        r.call(f"256: {label}", fn, *args)
    r.call("statvfs namemax", lambda: os.statvfs(str(r.top)).f_namemax)


def _deep_path(total: int, component: int) -> str:
    """A relative path of exactly *total* bytes made of *component*-byte directory names."""
    parts, length, i = [], 0, 0
    while length < total:
        parts.append(f"{i:03d}".ljust(component, "p"))
        length += component + 1
        i += 1
    path = "/".join(parts)[:total]
    return path[:-1] + "x" if path.endswith("/") else path


@scenario
def path_max(r: Run) -> None:
    path = _deep_path(4095, 127)  # what pjdfstest's dirgen_max builds on a NAME_MAX 255 fs
    fd = os.open(str(r.top), os.O_RDONLY | os.O_DIRECTORY)
    try:
        parent = path.rsplit("/", 1)[0]
        acc = ""
        for part in parent.split("/"):
            acc = f"{acc}/{part}" if acc else part
            os.mkdir(acc, dir_fd=fd)
        r.call("mkdir at PATH_MAX-1", lambda: os.mkdir(path, dir_fd=fd))
        r.call("rmdir at PATH_MAX-1", lambda: os.rmdir(path, dir_fd=fd))
        r.call("creat at PATH_MAX-1", lambda: os.close(os.open(path, os.O_CREAT, dir_fd=fd)))
        r.call("stat", lambda: os.stat(path, dir_fd=fd).st_size)
        r.call("unlink", lambda: os.unlink(path, dir_fd=fd))
        r.call("mkdir at PATH_MAX", lambda: os.mkdir(path + "x", dir_fd=fd))
        r.call("creat at PATH_MAX", lambda: os.open(path + "x", os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)


@scenario
def symlink_targets(r: Run) -> None:
    for n in (1, 59, 60, 739, 740, 1023, 1024, 4094, 4095):
        target = ("ab/" * n)[:n]
        r.call(f"symlink {n}", os.symlink, target, r.p(f"l{n}"))
        r.call("readlink", lambda p: len(os.readlink(p)), r.p(f"l{n}"))
        r.attrs("lstat", f"l{n}", "size", "mode", "nlink", "blocks")
    r.call("symlink 4096", os.symlink, "c" * 4096, r.p("l4096"))
    r.call("symlink empty", os.symlink, "", r.p("lempty"))
    r.call("symlink over existing", os.symlink, "x", r.p("l1"))
    os.link(r.p("l4095"), r.p("hl"), follow_symlinks=False)
    r.attrs("hard link of symlink", "hl", "nlink")
    r.call("unlink one", os.unlink, r.p("l4095"))
    r.call("still readable", lambda: len(os.readlink(r.p("hl"))))
    r.call("rename over long link", os.rename, r.p("l4094"), r.p("hl"))
    r.call("readlink renamed", lambda: len(os.readlink(r.p("hl"))))
    r.call("follow loop", os.stat, r.p("l1"))


# --- rename ----------------------------------------------------------------------------------
@scenario
def rename_cases(r: Run) -> None:
    for d in ("a", "a/sub", "empty", "full", "other"):
        os.mkdir(r.p(d), 0o755)
    creat(r.p("full/x"))
    creat(r.p("f"))
    creat(r.p("g"))
    os.link(r.p("f"), r.p("f2"))
    os.mkdir(r.p("other/empty"))
    snap = r.track(".", "other", "a/sub")
    r.call("dir over empty dir", os.rename, r.p("a"), r.p("other/empty"))
    os.rename(r.p("other/empty"), r.p("a"))
    r.moved("times", snap)
    r.call("dir over non-empty dir", os.rename, r.p("a"), r.p("full"))
    r.call("file over dir", os.rename, r.p("g"), r.p("empty"))
    r.call("dir over file", os.rename, r.p("empty"), r.p("g"))
    r.call("into own subdir", os.rename, r.p("a"), r.p("a/sub/a"))
    r.call("onto own subdir", os.rename, r.p("a"), r.p("a/sub"))
    r.call("onto own parent", os.rename, r.p("a/sub"), r.p("a"))
    r.call("dot", os.rename, r.p("a/."), r.p("b"))
    r.call("missing", os.rename, r.p("nope"), r.p("b"))
    r.call("file with trailing slash", os.rename, r.p("g/"), r.p("b"))
    r.call("ENOTDIR in target path", os.rename, r.p("g"), r.p("f/x"))
    snap = r.track("f", ".")
    r.call("onto own hard link", os.rename, r.p("f"), r.p("f2"))
    r.moved("hard link rename is a no-op", snap)
    r.attrs("both names stay", "f", "nlink")
    r.attrs("both names stay", "f2", "nlink")
    r.call("onto itself", os.rename, r.p("f"), r.p("f"))
    snap = r.track(".", "f2", "other")  # f2: another link of the inode being renamed
    r.call("file over file", os.rename, r.p("f"), r.p("g"))
    r.moved("times", snap)
    r.attrs("old target gone, links", "f2", "nlink")
    snap = r.track(".", "other", "f2")
    r.call("across dirs", os.rename, r.p("g"), r.p("other/g"))
    r.moved("times", snap)
    for d in (".", "a", "other", "full"):
        r.attrs("dir nlink", d, "nlink")
    r.call("dir across dirs", os.rename, r.p("a/sub"), r.p("other/sub"))
    for d in (".", "a", "other"):
        r.attrs("dir nlink", d, "nlink")
    os.symlink("other", r.p("sl"))
    r.call("rename symlink", os.rename, r.p("sl"), r.p("a/sl2"))
    r.attrs("symlink moved", "a/sl2", "mode", "size")
    r.call("listing", lambda: sorted(os.listdir(str(r.top))))


@scenario
def sticky_directories(r: Run) -> None:
    os.mkdir(r.p("t"), 0o777)
    os.chmod(r.p("t"), 0o1777)
    os.chown(r.p("t"), 1002, 1002)
    for name, owner in (("a", 1000), ("b", 1000), ("c", 1001), ("e", 1000), ("x", 1000)):
        creat(r.p(f"t/{name}"), 0o666)
        os.chown(r.p(f"t/{name}"), owner, owner)
    os.mkdir(r.p("t/sub"), 0o777)
    os.chown(r.p("t/sub"), 1000, 1000)
    os.mkdir(r.p("t/sub2"), 0o777)
    os.chown(r.p("t/sub2"), 1000, 1000)
    os.mkdir(r.p("out"), 0o777)
    r.call("other unlinks", os.unlink, r.p("t/a"), who=U1001)
    r.call("other renames away", os.rename, r.p("t/a"), r.p("t/z"), who=U1001)
    r.call("other moves out", os.rename, r.p("t/a"), r.p("out/a"), who=U1001)
    r.call("other rmdirs", os.rmdir, r.p("t/sub"), who=U1001)
    r.call("other renames dir", os.rename, r.p("t/sub"), r.p("out/sub"), who=U1001)
    r.call("rename over other's file", os.rename, r.p("t/c"), r.p("t/b"), who=U1001)
    r.call("move in over other's file", creat, r.p("out/m"), 0o644, who=U1001)
    r.call("move in over other's", os.rename, r.p("out/m"), r.p("t/e"), who=U1001)
    r.call("rename own file", os.rename, r.p("t/c"), r.p("t/c2"), who=U1001)
    r.call("owner unlinks", os.unlink, r.p("t/a"), who=U1000)
    r.call("dir owner unlinks", os.unlink, r.p("t/b"), who=U1002)
    r.call("dir owner rmdirs", os.rmdir, r.p("t/sub"), who=U1002)
    r.call("owner rmdirs", os.rmdir, r.p("t/sub2"), who=U1000)
    r.call("root unlinks", os.unlink, r.p("t/x"))
    r.call("listing", lambda: sorted(os.listdir(r.p("t"))))


# --- link, unlink, rmdir ---------------------------------------------------------------------
@scenario
def link_unlink_rmdir(r: Run) -> None:
    os.mkdir(r.p("d"), 0o755)
    os.mkdir(r.p("ro"), 0o755)
    creat(r.p("ro/f"), 0o666)
    creat(r.p("d/f"))
    snap = r.track("d", "d/f")
    r.call("link", os.link, r.p("d/f"), r.p("d/g"))
    r.moved("times after link", snap)
    r.attrs("nlink", "d/f", "nlink")
    snap = r.track("d", "d/g")
    r.call("unlink", os.unlink, r.p("d/f"))
    r.moved("times after unlink", snap)
    r.attrs("nlink", "d/g", "nlink")
    r.call("link to dir", os.link, r.p("d"), r.p("dl"))
    r.call("link over existing", os.link, r.p("d/g"), r.p("ro/f"))
    r.call("link missing", os.link, r.p("d/none"), r.p("x"))
    r.call("unlink dir", os.unlink, r.p("d"))
    r.call("rmdir non-empty", os.rmdir, r.p("d"))
    r.call("rmdir dot", os.rmdir, r.p("d/."))
    r.call("rmdir dotdot", os.rmdir, r.p("d/.."))
    r.call("rmdir file", os.rmdir, r.p("d/g"))
    r.call("unlink trailing slash", os.unlink, r.p("d/g/"))
    r.call("unlink without dir write", os.unlink, r.p("ro/f"), who=U1000)
    r.call("link without dir write", os.link, r.p("d/g"), r.p("ro/h"), who=U1000)
    r.call("mkdir without dir write", os.mkdir, r.p("ro/sub"), who=U1000)
    os.mkdir(r.p("ro/sub"))
    r.call("rmdir without dir write", os.rmdir, r.p("ro/sub"), who=U1000)
    os.symlink("g", r.p("d/s"))
    r.call("hard link to symlink", lambda: os.link(r.p("d/s"), r.p("d/s2"), follow_symlinks=False))
    r.attrs("symlink nlink", "d/s", "nlink", "mode")
    os.mkdir(r.p("d/sub"))
    snap = r.track("d")
    r.attrs("nlink with subdir", "d", "nlink")
    r.call("rmdir", os.rmdir, r.p("d/sub"))
    r.moved("times after rmdir", snap)
    r.attrs("nlink without subdir", "d", "nlink")
    snap = r.track("d")
    r.call("mkfifo", os.mkfifo, r.p("d/p"))
    r.call("symlink", os.symlink, "x", r.p("d/s3"))
    r.moved("times after mkfifo+symlink", snap)


# --- truncate, ftruncate, write times --------------------------------------------------------
@scenario
def truncate_cases(r: Run) -> None:
    os.mkdir(r.p("d"))
    creat(r.p("f"), 0o644)
    os.chown(r.p("f"), 1000, 1000)
    for size in (12345, 4096, 1, 0, 8192, 8192):
        snap = r.track("f")
        r.call(f"truncate {size}", os.truncate, r.p("f"), size)
        r.attrs("size", "f", "size")
        r.moved("times", snap)
    r.call("truncate dir", os.truncate, r.p("d"), 0)
    r.call("negative", os.truncate, r.p("f"), -1)
    r.call("beyond max size", os.truncate, r.p("f"), 999_999_999_999_999_999)
    r.call("ftruncate beyond max", ftruncate_path, r.p("f"), 2**62)
    r.call("no write permission", os.truncate, r.p("f"), 10, who=U1001)
    r.call("owner", os.truncate, r.p("f"), 10, who=U1000)
    r.call("ftruncate read-only fd", ftruncate_path, r.p("f"), 5, os.O_RDONLY)
    r.call("ftruncate negative", ftruncate_path, r.p("f"), -1)
    r.call("missing", os.truncate, r.p("none"), 1)
    r.attrs("size", "f", "size")
    fd = os.open(r.p("f"), os.O_RDWR)
    try:
        snap = r.track("f")
        r.call("write", os.write, fd, b"data")
        r.moved("times after write", snap)
        snap = r.track("f")
        r.call("ftruncate same size", os.ftruncate, fd, 10)
        r.moved("times after same-size ftruncate", snap)
    finally:
        os.close(fd)
    r.call("content", Path(r.p("f")).read_bytes)


# --- utimensat -------------------------------------------------------------------------------
@scenario
def utimensat_permissions(r: Run) -> None:
    creat(r.p("f"), 0o666)
    os.chown(r.p("f"), 1000, 1000)
    creat(r.p("ro"), 0o644)
    os.chown(r.p("ro"), 1000, 1000)
    os.utime(r.p("f"), ns=(1_000_000_001, 2_000_000_002))
    now, omit = (0, UTIME_NOW), (0, UTIME_OMIT)
    snap = r.track("f")
    r.call("writer: both NOW", utimensat, r.p("f"), now, now, who=U1001)
    r.moved("times", snap)
    r.call("writer: NULL", os.utime, r.p("f"), who=U1001)
    r.call("writer: explicit", utimensat, r.p("f"), (5, 0), (6, 0), who=U1001)
    r.call("writer: NOW + explicit", utimensat, r.p("f"), now, (6, 0), who=U1001)
    r.call("writer: NOW + OMIT", utimensat, r.p("f"), now, omit, who=U1001)
    r.call("writer: both OMIT", utimensat, r.p("f"), omit, omit, who=U1001)
    r.call("no write: NOW", utimensat, r.p("ro"), now, now, who=U1001)
    r.call("no write: OMIT", utimensat, r.p("ro"), omit, omit, who=U1001)
    r.call("owner explicit", utimensat, r.p("ro"), (7, 8), (9, 10), who=U1000)
    r.call("times", lambda: (os.stat(r.p("ro")).st_atime_ns, os.stat(r.p("ro")).st_mtime_ns))
    snap = r.track("ro")
    r.call("owner omit atime", utimensat, r.p("ro"), omit, (11, 12), who=U1000)
    r.moved("ctime moved", snap)
    r.call("times", lambda: (os.stat(r.p("ro")).st_atime_ns, os.stat(r.p("ro")).st_mtime_ns))
    r.call("root explicit", utimensat, r.p("ro"), (1, 999_999_999), (-1, 0))
    r.call("times", lambda: (os.stat(r.p("ro")).st_atime_ns, os.stat(r.p("ro")).st_mtime_ns))
    r.call("bad nsec", utimensat, r.p("ro"), (1, 1_000_000_000), now)
    os.symlink("ro", r.p("l"))
    r.call("nofollow", utimensat, r.p("l"), (3, 0), (4, 0), 0x100)
    r.call("link times", lambda: os.lstat(r.p("l")).st_mtime_ns)
    r.call("target untouched", lambda: os.stat(r.p("ro")).st_mtime_ns)


# --- sizes, blocks, fallocate ----------------------------------------------------------------
@scenario
def sizes_and_blocks(r: Run) -> None:
    for size in (0, 1, 4095, 4096, 4097, 10_000, 65_536, 300_000):
        with open(r.p(f"f{size}"), "wb") as f:
            f.write(b"z" * size)
        r.attrs("size and blocks", f"f{size}", "size", "blocks", "blksize")
    os.mkdir(r.p("d"))
    r.attrs("dir", "d", "size", "blocks", "nlink")


@scenario
def atime_of_writes_and_truncates(r: Run) -> None:
    """Writes and truncates never move atime on ext4. On kmsfs they read the old bytes of a
    partial block (read-modify-write), which must not count as a read either."""
    with open(r.p("f"), "wb") as f:
        f.write(b"a" * 5000)
    os.utime(r.p("f"), ns=(1_000_000_000, 2_000_000_000))  # atime < mtime: relatime would move it
    with open(r.p("f"), "ab") as f:
        f.write(b"b" * 10)  # into the partial last block
    r.attrs("after an append", "f", "atime")
    fd = os.open(r.p("f"), os.O_WRONLY)
    os.pwrite(fd, b"c", 4500)  # inside a block
    os.close(fd)
    r.attrs("after an overwrite", "f", "atime")
    os.truncate(r.p("f"), 4200)  # to the middle of a block
    r.attrs("after a truncate", "f", "atime")


@scenario
def symlink_atime(r: Run) -> None:
    """lstat never moves a symlink's atime on ext4, readlink does (relatime: atime < mtime).
    kmsfs must not read the ciphertext symlink to answer a stat."""
    for n in (1, 59, 60, 700):
        os.symlink("s" * n, r.p(f"l{n}"))
        os.utime(r.p(f"l{n}"), ns=(1_000_000_000, 2_000_000_000), follow_symlinks=False)
        for _ in range(2):  # the first stat the daemon answers, then one that would show it
            _forget_cached_attributes()
            r.attrs("lstat", f"l{n}", "atime", "size")
        r.call("readlink", lambda p: len(os.readlink(p)), r.p(f"l{n}"))
        r.call("atime moved", lambda p: os.lstat(p).st_atime_ns != 1_000_000_000, r.p(f"l{n}"))


@scenario
def xattr_errors(r: Run) -> None:
    """user.* attributes and the errors around them, as ext4 gives them (trusted.* and
    security.* are refused by design: a documented difference, not checked here)."""
    creat(r.p("f"))
    f = r.p("f")
    r.call("set", os.setxattr, f, "user.a", b"1")
    for call, args in (("set", (b"1",)), ("get", ()), ("remove", ())):
        fn = {"set": os.setxattr, "get": os.getxattr, "remove": os.removexattr}[call]
        r.call(f"{call} user. alone", fn, f, "user.", *args)
        r.call(f"{call} unknown namespace", fn, f, "foo.x", *args)
    r.call("create existing", os.setxattr, f, "user.a", b"2", os.XATTR_CREATE)
    r.call("replace missing", os.setxattr, f, "user.b", b"2", os.XATTR_REPLACE)
    r.call("get missing", os.getxattr, f, "user.missing")
    r.call("remove missing", os.removexattr, f, "user.missing")
    r.call("get trusted missing", os.getxattr, f, "trusted.missing")
    r.call("empty value", os.setxattr, f, "user.e", b"")
    r.call("get empty value", os.getxattr, f, "user.e")
    r.call("value too big", os.setxattr, f, "user.big", b"x" * 65536)
    r.call("get", os.getxattr, f, "user.a")
    r.call("list", lambda p: sorted(os.listxattr(p)), f)
    r.call("name of 256 bytes in all", os.setxattr, f, "user." + "n" * 251, b"1")
    def name_of(n: int) -> str:
        return "user." + chr(ord("a") + n % 26) * n

    for n in (171, 172, 200, 250):  # long once encrypted from about 172 on
        name = name_of(n)
        r.call(f"set name of {n}", os.setxattr, f, name, b"v%d" % n)
        r.call(f"get name of {n}", os.getxattr, f, name)
        r.call(f"replace name of {n}", os.setxattr, f, name, b"w", os.XATTR_REPLACE)
        r.call(f"create name of {n} again", os.setxattr, f, name, b"w", os.XATTR_CREATE)
    r.call("list with long names", lambda p: sorted(os.listxattr(p)), f)
    r.call("remove a long name", os.removexattr, f, name_of(200))
    r.call("get it", os.getxattr, f, name_of(200))
    r.call("list after", lambda p: sorted(os.listxattr(p)), f)


@scenario
def posix_fallocate_grows(r: Run) -> None:
    with open(r.p("f"), "wb") as f:
        f.write(b"a" * 5000)
    fd = os.open(r.p("f"), os.O_RDWR)
    try:
        snap = r.track("f")
        r.call("inside", os.posix_fallocate, fd, 0, 100)
        r.attrs("size", "f", "size")
        r.call("grow", os.posix_fallocate, fd, 4000, 9000)
        r.attrs("size", "f", "size")
        r.moved("times", snap)
        r.call("content", lambda: os.pread(fd, 20_000, 0) == b"a" * 5000 + bytes(8000))
        r.call("bad length", os.posix_fallocate, fd, 0, 0)
        r.call("negative offset", os.posix_fallocate, fd, -1, 10)
    finally:
        os.close(fd)
    fd = os.open(r.p("f"), os.O_RDONLY)
    try:
        r.call("read-only fd", os.posix_fallocate, fd, 0, 50_000)
    finally:
        os.close(fd)
    fd = os.open(str(r.top), os.O_RDONLY)
    try:
        r.call("dir", os.posix_fallocate, fd, 0, 1)
    finally:
        os.close(fd)


def test_fallocate_modes(roots: tuple[Path, Path]) -> None:
    """fallocate(2) itself: mode 0 grows the file where the FUSE layer passes it on, else it is
    refused with EOPNOTSUPP and changes nothing; other modes are refused on kmsfs."""
    _, mnt = roots
    p = mnt / "falloc"
    p.write_bytes(b"q" * 10)
    fd = os.open(p, os.O_RDWR)
    try:
        try:
            fallocate(fd, 0, 0, 6000)  # needs a FUSE fallocate handler (see the fs docs)
        except OSError as exc:
            assert exc.errno == errno.EOPNOTSUPP
            assert os.fstat(fd).st_size == 10
        else:
            assert os.fstat(fd).st_size == 6000
            assert os.pread(fd, 6000, 0) == b"q" * 10 + bytes(5990)
        for mode in (0x01, 0x03):  # KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE
            with pytest.raises(OSError) as info:
                fallocate(fd, mode, 0, 100)
            assert info.value.errno == errno.EOPNOTSUPP
        assert os.pread(fd, 10, 0) == b"q" * 10
    finally:
        os.close(fd)


def test_long_symlink_blobs_follow_the_last_link(roots: tuple[Path, Path]) -> None:
    """A long target's blob lives while any hard link to its symlink does (docs/format.md)."""
    _, mnt = roots
    blobs = mnt.parent / "cipher" / "kmsfs.longlinks"
    d = mnt / "blobs"
    d.mkdir()

    def count() -> int:
        return len(os.listdir(blobs)) if blobs.exists() else 0

    base = count()
    os.symlink("a" * 4095, d / "one")
    os.symlink("b" * 2000, d / "two")
    assert count() == base + 2
    os.link(d / "one", d / "one-b", follow_symlinks=False)
    os.unlink(d / "one")
    assert count() == base + 2 and os.readlink(d / "one-b") == "a" * 4095
    os.rename(d / "two", d / "one-b")  # replaces the last link of "one"
    assert count() == base + 1 and os.readlink(d / "one-b") == "b" * 2000
    os.unlink(d / "one-b")
    assert count() == base


def test_fallocate_handler_writes_encrypted_zeros(tmp_path: Path) -> None:
    """The fallocate handler itself (pyfuse3 3.5 does not route FUSE_FALLOCATE to it yet)."""
    import types

    import pyfuse3
    import trio

    from kmsfs.crypto.content import cipher_size
    from kmsfs.fs.entries import KmsfsOps
    from tests.integration.fs_helpers import SoftDeriver

    ops = KmsfsOps(make_volume(tmp_path / "cipher"), SoftDeriver())
    ctx = types.SimpleNamespace(uid=0, gid=0, pid=os.getpid(), umask=0)

    async def main() -> None:
        info, _ = await ops.create(pyfuse3.ROOT_INODE, b"f", 0o100644, os.O_RDWR, ctx)
        fh = info.fh
        await ops.write(fh, 0, b"abc")
        await ops.fallocate(fh, 0, 1000, 9000)
        await ops.fallocate(fh, 0, 0, 10)  # inside the file: nothing to do
        assert await ops.read(fh, 0, 20_000) == b"abc" + bytes(9997)
        assert os.fstat(ops.files.handle(fh).file.fd).st_size == cipher_size(10_000)
        for mode, offset, length, want in (
            (1, 0, 100, errno.EOPNOTSUPP),
            (3, 0, 100, errno.EOPNOTSUPP),
            (0, 0, 0, errno.EINVAL),
            (0, -1, 10, errno.EINVAL),
            (0, 0, 2**62, errno.EFBIG),
        ):
            with pytest.raises(pyfuse3.FUSEError) as info_:
                await ops.fallocate(fh, mode, offset, length)
            assert info_.value.errno == want
        await ops.release(fh)

    trio.run(main)
