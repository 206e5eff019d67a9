"""Who may do what on a mount made without ``allow_other``: the kernel's rules, not ours.

Without ``allow_other`` kmsfs does not ask the kernel for ``default_permissions`` (it would cost
a GETATTR of the parent directory before every create and unlink): the kernel then admits only
the mounting user's processes, and the checks that still matter for that user (exec bits,
access(2)) are the kernel's own and the ``access`` handler's. These tests pin both halves, so
dropping the option can never open the mount to another user or change what root sees.
With ``allow_other`` the option is on, and test_fs_conformance judges every check against ext4.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from kmsfs.fs.posix import CAP_FSETID

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches users: needs root")


def _mount_options(mp: Path) -> set[str]:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mp):
            return set(fields[3].split(","))
    raise AssertionError(f"{mp} is not mounted")


def _drop_cap_fsetid() -> None:
    """Take CAP_FSETID out of this process's effective and permitted sets (capset(2))."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # two {effective, permitted, inheritable}
    if libc.capget(header, data) != 0 or not data[0] & 1 << CAP_FSETID:
        raise OSError(ctypes.get_errno() or errno.EPERM, "capget")
    data[0] &= ~(1 << CAP_FSETID)
    data[1] &= ~(1 << CAP_FSETID)
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _enter_new_user_namespace() -> None:
    """unshare(CLONE_NEWUSER): every capability inside it, none where the mount is."""
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")


def _as_other_user(  # type: ignore[no-untyped-def]
    fn, gid: int = 1234, groups: tuple[int, ...] = (), uid: int = 1234, userns: bool = False
) -> int:
    """Run *fn* in a child with uid 1234 (gid 1234 unless told), or as root without
    CAP_FSETID if *uid* is 0, in a user namespace of its own if *userns*; its exit status is
    0 or the errno it got."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            if uid == 0:
                _drop_cap_fsetid()
            else:
                os.setuid(uid)
            if userns:
                _enter_new_user_namespace()
            fn()
        except OSError as exc:
            code = exc.errno or 255
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def public_mount(volume: Path, mounter):  # type: ignore[no-untyped-def]
    """A factory of mounts other users could reach if the kernel let them (0755 parents)."""
    with tempfile.TemporaryDirectory(prefix="kmsfs-perm-") as public:
        os.chmod(public, 0o755)
        mounts = []

        def start(options: tuple[str, ...] = ()) -> Path:
            mount = mounter(volume, options=options, mountpoint=Path(public) / "m")
            mounts.append(mount)
            os.chmod(mount.mountpoint, 0o777)
            return mount.mountpoint

        yield start
        for mount in mounts:  # before the directory goes
            mount.stop()


def test_without_allow_other_other_users_are_refused(public_mount) -> None:  # type: ignore[no-untyped-def]
    mp = public_mount()
    (mp / "f").write_text("secret")
    os.chmod(mp / "f", 0o666)
    assert "default_permissions" not in _mount_options(mp)
    assert _as_other_user(lambda: os.stat(mp / "f")) == errno.EACCES
    assert _as_other_user(lambda: Path(mp / "f").read_text()) == errno.EACCES
    assert _as_other_user(lambda: os.listdir(mp)) == errno.EACCES


def test_with_allow_other_the_kernel_checks_permissions(public_mount) -> None:  # type: ignore[no-untyped-def]
    mp = public_mount(("allow_other",))
    assert "default_permissions" in _mount_options(mp)
    (mp / "private").write_text("secret")
    os.chmod(mp / "private", 0o600)
    (mp / "shared").write_text("hello")
    os.chmod(mp / "shared", 0o644)
    assert _as_other_user(lambda: Path(mp / "private").read_text()) == errno.EACCES
    assert _as_other_user(lambda: Path(mp / "shared").read_text()) == 0
    assert _as_other_user(lambda: Path(mp / "shared").write_text("x")) == errno.EACCES
    assert (mp / "shared").read_text() == "hello"


def test_root_without_allow_other_keeps_exec_and_access_rules(public_mount) -> None:  # type: ignore[no-untyped-def]
    mp = public_mount()
    script = mp / "run.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    os.chmod(script, 0o644)
    assert not os.access(script, os.X_OK)  # root too: no x bit at all
    assert os.access(script, os.R_OK | os.W_OK)  # root reads and writes anything
    with pytest.raises(PermissionError):
        subprocess.run([str(script)], check=True)
    os.chmod(script, 0o700)
    assert os.access(script, os.X_OK)
    assert subprocess.run([str(script)], check=True, capture_output=True).stdout == b"ran\n"
    os.chmod(script, 0o000)
    assert script.read_text().startswith("#!")  # as on ext4: root needs no permission bits
    assert os.access(mp, os.X_OK | os.W_OK)


def test_open_with_o_trunc_by_another_user_drops_set_id_bits(public_mount) -> None:  # type: ignore[no-untyped-def]
    """As ext4 does for a caller without CAP_FSETID: set-user-ID goes, and set-group-ID when
    group-execute is on or the caller is not in the file's group (as here); root keeps them."""
    mp = public_mount(("allow_other",))
    for name, mode, after in [("u", 0o4777, 0o777), ("g", 0o2777, 0o777), ("gx", 0o2767, 0o767)]:
        (mp / name).write_text("x")
        os.chmod(mp / name, mode)
        truncate = lambda n=name: os.close(os.open(mp / n, os.O_WRONLY | os.O_TRUNC))  # noqa: E731
        assert _as_other_user(truncate) == 0
        assert (os.stat(mp / name).st_mode & 0o7777, os.stat(mp / name).st_size) == (after, 0)
    os.chmod(mp / "u", 0o4777)
    os.close(os.open(mp / "u", os.O_WRONLY | os.O_TRUNC))  # root: CAP_FSETID
    assert os.stat(mp / "u").st_mode & 0o7777 == 0o4777


def _write_one_byte(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"y", 0)
    finally:
        os.close(fd)


def _ftruncate(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)


#: What may drop set-id bits, and who does it (1234: no CAP_FSETID; in the file's group or not).
_SET_ID_OPS = {
    "write": _write_one_byte,
    "truncate": lambda p: os.truncate(p, 0),
    "ftruncate": _ftruncate,
    "open(O_TRUNC)": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_TRUNC)),
    "chown(-1, -1)": lambda p: os.chown(p, -1, -1),
    "chown to own group": lambda p: os.chown(p, -1, 1234),
}


#: Callers: root, and uid 1234 with group 1234 as its own, or only as a supplementary group;
#: root without CAP_FSETID (gid 4321), which the kernel and ext4 treat as any user; and uid
#: 1234 in a user namespace of its own, where /proc shows it every capability (none count).
_WHO = {
    "root": None,
    "other": (1234, ()),
    "other, 1234 supplementary": (4321, (1234,)),
    "root without CAP_FSETID": (4321, (), 0),
    "other in its own user namespace": (4321, (), 1234, True),
}


def _set_id_outcomes(top: Path) -> dict[tuple[str, str, int, str], int]:
    """Every set-id case run in directory *top*: (op, who, mode, file group) -> mode after."""
    out = {}
    for op_name, op in _SET_ID_OPS.items():
        for who, ids in _WHO.items():
            if who == "other in its own user namespace" and op_name == "chown to own group":
                continue  # no gid is mapped in its namespace: EINVAL, here as on ext4
            for mode in (0o4777, 0o2777, 0o2767, 0o6767, 0o0777):
                for group in (0, 1234):
                    path = top / f"{op_name}-{who}-{mode:o}-{group}"
                    path.write_bytes(b"x")
                    os.chown(path, 1234 if op_name.startswith("chown") else 0, group)
                    os.chmod(path, mode)
                    if ids is None:
                        op(path)
                    else:
                        run = lambda p=path, op=op: op(p)  # noqa: E731
                        assert _as_other_user(run, *ids) == 0, (op_name, who, path)
                    out[(op_name, who, mode, str(group))] = os.stat(path).st_mode & 0o7777
    return out


@pytest.mark.parametrize("options", [("allow_other",), ("allow_other", "writeback_cache")])
def test_set_id_bits_drop_on_write_truncate_and_chown_as_on_the_local_disk(  # type: ignore[no-untyped-def]
    public_mount, options: tuple[str, ...]
) -> None:
    """kmsfs drops set-user-ID and set-group-ID itself (the kernel leaves that to the file
    system): every case gives the mode the local file system gives, for a caller without
    CAP_FSETID inside the file's group (as its own or a supplementary group) and outside it,
    for root, for root without CAP_FSETID (a capability, not uid 0, keeps the bits), and for
    a user whose own user namespace gives it every capability there (not here); with the
    kernel's writeback cache too, whose writes take another path."""
    mp = public_mount(options)
    with tempfile.TemporaryDirectory(prefix="kmsfs-setid-", dir="/var/tmp") as local:
        os.chmod(local, 0o777)
        expected = _set_id_outcomes(Path(local))
    (mp / "t").mkdir(mode=0o777)
    os.chmod(mp / "t", 0o777)
    got = _set_id_outcomes(mp / "t")
    assert {k: oct(v) for k, v in got.items() if got[k] != expected[k]} == {}
    # The cases are not vacuous: bits went in some and stayed in others.
    assert expected[("write", "other", 0o6767, "0")] == 0o767
    assert expected[("write", "other", 0o2767, "1234")] == 0o2767
    assert expected[("write", "other, 1234 supplementary", 0o2767, "1234")] == 0o2767
    assert expected[("write", "other, 1234 supplementary", 0o2767, "0")] == 0o767
    assert expected[("write", "root", 0o6767, "0")] == 0o6767
    assert expected[("truncate", "root without CAP_FSETID", 0o4777, "0")] == 0o777
    assert expected[("write", "root without CAP_FSETID", 0o2767, "1234")] == 0o767
    assert expected[("truncate", "other in its own user namespace", 0o4777, "0")] == 0o777
