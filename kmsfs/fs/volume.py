"""Creating and checking a ciphertext directory (a *volume*) and its mount point.

Every check here runs before anything is mounted or written, and fails with one
:class:`~kmsfs.errors.KmsfsError` line that names the path, so ``kmsfs`` can print it as is.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from kmsfs.crypto.names import DIRIV_NAME
from kmsfs.errors import KmsfsError, UsageError
from kmsfs.fs import config as volconfig
from kmsfs.fs.config import VolumeConfig
from kmsfs.fs.names import TEMP_PREFIX, read_dir_iv, write_dir_iv
from kmsfs.keys import FIRST_EPOCH
from kmsfs.ownership import others_may_replace_in


def create_volume(cipherdir: Path, config: VolumeConfig, epoch: int = FIRST_EPOCH) -> None:
    """Make a new volume: CIPHERDIR must be missing or empty; writes the root IV (its names
    keyed at *epoch*, the Domain's current one) and config.

    All or nothing: on any failure, Ctrl-C included, what it wrote is removed again (and
    CIPHERDIR too if it made it), so a failed init can simply be run again. A failed write
    is one line naming the file."""
    cipherdir = Path(cipherdir)
    config.validate()
    made = False
    if cipherdir.exists():
        if not cipherdir.is_dir():
            raise UsageError(f"{cipherdir}: not a directory")
        if any(cipherdir.iterdir()):
            raise UsageError(f"{cipherdir}: not empty (a new volume needs an empty directory)")
    else:
        if not cipherdir.absolute().parent.is_dir():
            raise UsageError(f"{cipherdir.absolute().parent}: no such directory (create it first)")
        cipherdir.mkdir(mode=0o700, parents=False)
        made = True
    writing = cipherdir / DIRIV_NAME
    try:
        write_dir_iv(os.fsencode(cipherdir), epoch)
        writing = cipherdir / volconfig.CONFIG_NAME
        volconfig.save(cipherdir, config)
    except BaseException as exc:
        if isinstance(exc, FileExistsError) and writing.name == DIRIV_NAME:
            # another init got there first: that volume is not this one's to undo
            raise UsageError(f"{cipherdir}: not empty (a new volume needs an empty directory)"
                             ) from None
        left = _undo_create(cipherdir, made)
        if not isinstance(exc, OSError):
            raise
        undone = f"remove {', '.join(left)} by hand" if left else "nothing was left behind"
        raise KmsfsError(
            f"{writing}: {exc.strerror or exc} (volume not created; {undone})"
        ) from None


def _undo_create(cipherdir: Path, made: bool) -> list[str]:
    """Remove what :func:`create_volume` wrote in CIPHERDIR, and CIPHERDIR if it made it;
    return the paths it could not remove."""
    names = [DIRIV_NAME, volconfig.CONFIG_NAME]
    with contextlib.suppress(OSError):  # the config's temporary file, if a crash kept it
        names += [n for n in os.listdir(cipherdir) if n.startswith(TEMP_PREFIX)]
    left = []
    for name in names:
        try:
            os.unlink(cipherdir / name)
        except FileNotFoundError:
            pass
        except OSError:
            left.append(str(cipherdir / name))
    if made:
        try:
            os.rmdir(cipherdir)
        except OSError:
            left.append(str(cipherdir))
    return left


def open_volume(cipherdir: Path) -> VolumeConfig:
    """Load and validate the config and the root directory IV of an existing volume."""
    cipherdir = Path(cipherdir)
    if not cipherdir.is_dir():
        what = "not a directory" if cipherdir.exists() else "no such directory"
        raise UsageError(f"{cipherdir}: {what}")
    config = volconfig.load(cipherdir)
    try:
        read_dir_iv(os.fsencode(cipherdir))
    except KmsfsError as exc:
        raise KmsfsError(f"{cipherdir}: {exc}") from None
    return config


def is_mount_point(path: Path, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether *path* is a mount point, from the kernel's list rather than a stat: a FUSE mount
    whose daemon died answers every stat with ENOTCONN, and os.path.ismount then says no."""
    absolute = os.path.abspath(path)
    where = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    mounts = _mounts(mountinfo)
    if mounts is None:
        return os.path.ismount(path)
    return any(point == where for point, _, _ in mounts)


def mount_at(path: Path, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str] | None:
    """(file system type, source) of the mount at *path* (the last one mounted there), or
    None if *path* is no mount point or the kernel's list cannot be read."""
    absolute = os.path.abspath(path)
    where = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    found = [(kind, source) for point, kind, source in _mounts(mountinfo) or [] if point == where]
    return found[-1] if found else None


def check_outside(cipherdir: Path, mountpoint: Path) -> None:
    """The mount point must not be the ciphertext directory or inside it (symlinks resolved).

    Why: mounted there, the plaintext appears inside the ciphertext tree, so a backup, rsync or
    tar of the ciphertext directory copies it in clear (review: ``kmsfs mount c c/sub`` was
    accepted), and ``kmsfs fsck`` then reports the leftover mount point as damage. (The other
    way round, a ciphertext directory inside an empty mount point, cannot happen.)"""
    inner, outer = Path(os.path.realpath(mountpoint)), Path(os.path.realpath(cipherdir))
    if inner == outer or outer in inner.parents:
        where = "is" if inner == outer else "is inside"
        raise UsageError(
            f"mount point {mountpoint} {where} the ciphertext directory {cipherdir}: the "
            "plaintext would show inside the ciphertext (and in its backups); mount it "
            "outside"
        )


def check_mountpoint(mountpoint: Path) -> None:
    """The mount point must be an existing, empty directory that is not already a mount."""
    mountpoint = Path(mountpoint)
    if is_mount_point(mountpoint):
        try:
            os.stat(mountpoint)
        except OSError as exc:
            if exc.errno == errno.ENOTCONN:
                raise UsageError(
                    f"mount point {mountpoint}: a mount whose daemon is gone; "
                    f"run kmsfs umount {mountpoint} first"
                ) from None
        raise UsageError(f"mount point {mountpoint}: already a mount point")
    if not mountpoint.exists():
        raise UsageError(f"mount point {mountpoint}: no such directory")
    if not mountpoint.is_dir():
        raise UsageError(f"mount point {mountpoint}: not a directory")
    if os.path.ismount(mountpoint):
        raise UsageError(f"mount point {mountpoint}: already a mount point")
    try:
        if any(mountpoint.iterdir()):
            raise UsageError(f"mount point {mountpoint}: not empty")
    except PermissionError:
        raise UsageError(f"mount point {mountpoint}: not readable") from None


# --- who is using a volume ------------------------------------------------------------------
#
# A mount holds an exclusive flock(2) on the ciphertext root directory for as long as it
# serves, and so does an offline job that rewrites files (``kmsfs reencrypt``), without waiting.
# So a job refuses a volume that is mounted, a mount refuses a volume a job is rewriting, and a
# second mount of a mounted volume is refused: two daemons writing one file each keep their own
# view of it (a block one rewrites, the other reads as EIO). The lock is on the directory, not
# on kmsfs.conf, which is replaced by rename.


def _lock(cipherdir: Path, how: int) -> int | None:
    """An fd on CIPHERDIR holding ``how`` (LOCK_SH or LOCK_EX), or None if someone else holds
    a conflicting lock."""
    import fcntl

    fd = os.open(cipherdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_root_only(cipherdir: Path) -> None:
    """As root, act only on a ciphertext directory no other user can reach or replace;
    UsageError naming the path otherwise. Nothing to check for a daemon that is not root.

    Why: the ciphertext of a user's files and directories is owned by that user (their
    plaintext ids), and the daemon reaches entries by path. A user who could reach the
    ciphertext directory could rename one of their directories there and put a symlink in its
    place; the next create through the mount would then make, as root, a file owned by them
    wherever the symlink leads (a script in /etc/cron.daily), and ``kmsfs reencrypt`` could be
    turned the same way.

    So, much as sshd's StrictModes does for ~/.ssh: the directory itself or one above it must
    be closed to everyone but root (root's, no search permission for group or others; an ACL
    that grants it shows in the group bits, as its mask), and that one and every directory
    above it must be root's and writable by nobody else, unless sticky (/tmp), where no one else
    can move them. ``kmsfs init`` makes a new directory 0700; a volume whose root is opened up
    for ``allow_other`` (its mode is the plaintext root's) belongs under a closed directory.
    """
    if os.geteuid() != 0:
        return
    real = Path(os.path.realpath(cipherdir))
    chain = [real, *real.parents]  # from the directory up to /
    stats = [os.stat(p) for p in chain]
    closed = next(
        (i for i, st in enumerate(stats) if st.st_uid == 0 and not st.st_mode & 0o011), None
    )
    if closed is None:
        st = stats[0]
        why = (f"owned by uid {st.st_uid}" if st.st_uid != 0
               else f"mode {st.st_mode & 0o7777:04o}")
        raise UsageError(
            f"{cipherdir}: other users can reach the ciphertext ({why}, and no directory above "
            "it is closed to them), where they could steer a daemon running as root outside "
            "the volume: chmod 700 it, or keep it in a directory only root can enter"
        )
    for above, st in zip(chain[closed:], stats[closed:], strict=True):
        if others_may_replace_in(st, (0,)):
            who = f"uid {st.st_uid}" if st.st_uid != 0 else "other users"
            raise UsageError(
                f"{cipherdir}: {above} can be changed by {who}, who could put another "
                "directory in its place: as root, kmsfs uses a volume only where nobody else can"
            )


def volume_served(cipherdir: Path) -> bool | None:
    """True while a mount serves CIPHERDIR (its daemon holds the volume's lock), False if
    none does, None if that cannot be told (the directory cannot be opened). An offline job
    that holds the lock shared (``kmsfs fsck``) counts as no mount; reencrypt as one."""
    import fcntl

    try:
        fd = _lock(Path(cipherdir), fcntl.LOCK_SH)
    except OSError:
        return None
    if fd is None:
        return True
    os.close(fd)
    return False


def lock_for_mount(cipherdir: Path) -> int:
    """Exclusive lock for a mount's lifetime (close the fd to release). UsageError while
    another mount serves the volume or an offline job such as ``kmsfs reencrypt`` holds it."""
    import fcntl

    fd = _lock(Path(cipherdir), fcntl.LOCK_EX)
    if fd is None:
        mounts = mounted_from(cipherdir)
        where = f"mounted on {mounts[0]}" if mounts else "mounted elsewhere, or being rewritten"
        raise UsageError(
            f"{cipherdir}: busy: {where} (one mount at a time; kmsfs reencrypt holds it too)"
        )
    return fd


def mounted_from(cipherdir: Path, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points of FUSE kmsfs mounts whose source (fsname) is CIPHERDIR.

    kmsfs mounts have CIPHERDIR as their source unless ``-o fsname=`` or the path
    (:func:`kmsfs.fs.daemon.source_name`) says otherwise; the flock (:func:`lock_exclusive`)
    catches every kmsfs mount of this build on this machine.
    """
    want = os.path.realpath(cipherdir)
    return [
        point
        for point, fstype, source in _mounts(mountinfo) or []
        if fstype.startswith("fuse")
        and (source == want or (os.path.isabs(source) and os.path.realpath(source) == want))
    ]


def _mounts(mountinfo: str) -> list[tuple[str, str, str]] | None:
    """(mount point, file system type, source) of every mount in *mountinfo*; None if it
    cannot be read."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    mounts = []
    for line in lines:
        fields = line.split(" ")
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if len(fields) < sep + 3 or sep < 5:
            continue
        mounts.append((_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2])))
    return mounts


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, ...)."""
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def lock_exclusive(cipherdir: Path) -> int:
    """Exclusive lock for an offline job that rewrites files (close the fd to release).
    UsageError, one line, if the volume is mounted (or another job holds it)."""
    import fcntl

    return _lock_offline(cipherdir, fcntl.LOCK_EX)


def lock_shared(cipherdir: Path) -> int:
    """Shared lock for an offline job that only reads (``kmsfs fsck``): what it reads of a
    live volume may change under it (a file renamed away between listing and reading is
    reported as damage), so a mount or a rewriting job refuses it as for
    :func:`lock_exclusive`, but two such jobs may run together."""
    import fcntl

    return _lock_offline(cipherdir, fcntl.LOCK_SH)


def _lock_offline(cipherdir: Path, how: int) -> int:
    mounts = mounted_from(cipherdir)
    if mounts:
        raise UsageError(
            f"{cipherdir}: mounted on {mounts[0]}: unmount it first with kmsfs umount (this "
            "job does not run while the volume is mounted, even by a daemon that is gone)"
        )
    fd = _lock(Path(cipherdir), how)
    if fd is None:
        raise UsageError(
            f"{cipherdir}: busy: mounted elsewhere, or being checked or rewritten (kmsfs "
            "fsck, kmsfs reencrypt); unmount it first, or let the other job finish"
        )
    return fd
