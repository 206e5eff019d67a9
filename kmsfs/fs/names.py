"""Plaintext names <-> ciphertext directory entries, with directory IVs and long-name sidecars.

The pure scheme lives in :mod:`kmsfs.crypto.names` (AES-SIV, DirIV as associated data, long
names hashed with a ``.name`` sidecar); this module does the file-system side of it: read and
cache each directory's ``kmsfs.diriv``, write and remove sidecars in the right order, create new
directories with their IV, and list a directory as (disk name, plaintext name) pairs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
from collections import OrderedDict
from pathlib import Path

from kmsfs.atomicfile import replace
from kmsfs.crypto.names import (
    DIRIV_NAME,
    LONGNAME_SUFFIX,
    MAX_NAME_BYTES,
    NAMES_KEY_INFO,
    DiskName,
    VolumeNames,
    is_internal,
    is_longname,
    is_valid_name,
    new_dir_iv,
    parse_dir_iv,
)
from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs.longpath import reach
from kmsfs.fs.posix import read_internal_file
from kmsfs.keys import KeyDeriver

log = logging.getLogger(__name__)

DIRIV = DIRIV_NAME.encode()
#: Prefix of the fs's own temporary names (docs/format.md, "Reserved names"): hidden from
#: listings like every ``kmsfs.`` name, reported by fsck as leftovers, removed by rmdir.
TEMP_PREFIX = "kmsfs.tmp."
#: Opening a directory of the tree: never through a symlink put in its place.
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def names_of_volume(deriver: KeyDeriver) -> VolumeNames:
    """The names of a volume keyed by *deriver*'s Domain: each epoch's name key derived in the
    HSM when a directory of that epoch is first met.

    A retired epoch's names are still read, as its symlink targets and xattr values are (the
    volume keys are exempt from retirement: docs/format.md, "Key epochs"): a directory left
    at an epoch before the
    retirement holds files written since at newer ones, which must stay reachable, and
    ``kmsfs reencrypt`` must still be able to move its names."""

    def secret_of(epoch: int) -> bytes:
        return deriver.derive(NAMES_KEY_INFO, epoch=epoch)

    return VolumeNames(secret_of)


class DirIvError(IntegrityError):
    """A directory's ``kmsfs.diriv`` is missing or malformed."""


def check_name(name: bytes) -> None:
    """ENAMETOOLONG / EINVAL for names no entry may have (checked before any encryption)."""
    if len(name) > MAX_NAME_BYTES:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    if not is_valid_name(name):
        raise OSError(errno.EINVAL, "invalid name")


def temp_path(dirpath: bytes) -> bytes:
    """A fresh hidden temporary name in *dirpath*."""
    return dirpath + b"/" + os.fsencode(TEMP_PREFIX + secrets.token_hex(8))


def make_dir_with_iv(path: bytes, epoch: int, dir_fd: int | None = None) -> int:
    """Make the directory *path* (mode 0700) with its IV (names keyed at *epoch*), fsync'd, and
    fsync the directory, so the entry naming the IV is on disk too; return a descriptor of the
    directory. Nothing is left if it fails. With *dir_fd*, *path* is a name in that directory.

    The only way kmsfs makes a directory that may get a visible name (kmsfs.fs.dirs,
    kmsfs.fs.dirpool): without both fsyncs, a power cut could keep its names and lose the IV.
    """
    where = path if dir_fd is not None else reach(path)
    os.mkdir(where, 0o700, dir_fd=dir_fd)
    try:
        fd = os.open(where, DIR_FLAGS, dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(where, dir_fd=dir_fd)
        raise
    try:
        write_dir_iv_at(fd, epoch)
        os.fsync(fd)  # the entry naming the IV, not only its bytes
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(DIRIV, dir_fd=fd)
        with contextlib.suppress(OSError):
            os.rmdir(where, dir_fd=dir_fd)
        os.close(fd)
        raise
    return fd


def write_dir_iv(dirpath: bytes, epoch: int) -> bytes:
    """Create ``dirpath/kmsfs.diriv`` (exclusively) with a fresh IV at *epoch*, fsync'd, and
    return it."""
    fd = os.open(reach(dirpath), DIR_FLAGS)
    try:
        return write_dir_iv_at(fd, epoch)
    finally:
        os.close(fd)


def write_dir_iv_at(dir_fd: int, epoch: int) -> bytes:
    """Create ``kmsfs.diriv`` (exclusively) with a fresh IV, its names keyed at *epoch*,
    fsync'd, in the directory open as *dir_fd*, and return it.

    Every name in the directory is encrypted with the IV, so it must reach the disk before any
    of them can: without the fsync, a power cut could keep the names and lose the IV.
    """
    dir_iv = new_dir_iv(epoch)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(DIRIV, flags, 0o440, dir_fd=dir_fd)
    try:
        os.write(fd, dir_iv)
        os.fsync(fd)
    finally:
        os.close(fd)
    return dir_iv


def read_dir_iv(dirpath: bytes) -> bytes:
    try:
        data = read_internal_file(dirpath + b"/" + DIRIV, 64)
        return parse_dir_iv(data)
    except FileNotFoundError:
        raise DirIvError(f"{DIRIV_NAME} is missing") from None
    except FormatError as exc:
        raise DirIvError(str(exc)) from None
    except OSError as exc:
        raise DirIvError(f"{DIRIV_NAME} is unreadable ({exc.strerror})") from None


#: How many (directory IV, name) -> disk name results :class:`DirNames` keeps (and as many the
#: other way). Both caches full take about 8.5 MB (520 bytes a name). The oldest go first, so a
#: tree listed again in the same order hits only if all of it fits: with 4096, ``rm -rf`` after
#: ``ls -lR`` of 5,400 entries decrypted half its names again (the cache held the wrong half).
NAME_CACHE_SIZE = 16384


class DirNames:
    """Name encryption for one volume; caches directory IVs by FUSE inode (trio thread only).

    Each directory's names are keyed with the epoch its IV names (:class:`VolumeNames`).

    It also keeps the last :data:`NAME_CACHE_SIZE` names in each direction: (directory IV,
    name) -> disk name, since the kernel asks about one name several times in a row (a lookup
    then a create, a listing then an unlink), and (directory IV, short disk name) -> name, since
    a directory is often listed again (``find`` then ``rm -rf``). Both are pure functions of the
    volume key, the IV and the name, so an entry is never stale whatever happens to the entry or
    the directory (a new directory has a new IV), and a tampered entry, being another disk name,
    is never found there: it is decrypted, and refused, as always.
    """

    def __init__(self, cipher: VolumeNames) -> None:
        self._cipher = cipher
        self._ivs: dict[int, bytes] = {}
        # OrderedDict, not dict: evicting the oldest from a full dict (del d[next(iter(d))])
        # scans the holes earlier deletions left, ~1 us per insert at this size; popitem(False)
        # is O(1).
        self._names: OrderedDict[tuple[bytes, bytes], DiskName] = OrderedDict()
        self._plain: OrderedDict[tuple[bytes, str], bytes] = OrderedDict()

    def dir_iv(self, ino: int, dirpath: bytes) -> bytes:
        """The IV of directory *ino* (read once); IntegrityError if the Domain lacks the epoch
        of its names (whose key is derived here, on the trio thread, so :meth:`list_dir` in a
        worker thread never derives)."""
        dir_iv = self._ivs.get(ino)
        if dir_iv is None:
            dir_iv = read_dir_iv(dirpath)
            self._cipher.check(dir_iv)
            self._ivs[ino] = dir_iv
        return dir_iv

    def forget_dir(self, ino: int) -> None:
        self._ivs.pop(ino, None)

    def disk_name(self, dir_iv: bytes, name: bytes) -> DiskName:
        disk = self._names.get((dir_iv, name))
        if disk is None:
            check_name(name)
            disk = self._cipher.encrypt_to_disk(dir_iv, name)
            self._remember(dir_iv, name, disk)
        return disk

    def _remember(self, dir_iv: bytes, name: bytes, disk: DiskName) -> None:
        if len(self._names) >= NAME_CACHE_SIZE:
            self._names.popitem(last=False)  # the oldest
        self._names[(dir_iv, name)] = disk
        if disk.long_content is None:
            if len(self._plain) >= NAME_CACHE_SIZE:
                self._plain.popitem(last=False)
            self._plain[(dir_iv, disk.name)] = name

    def remember_listing(self, dir_iv: bytes, entries: list[tuple[bytes, bytes]]) -> None:
        """Keep what :meth:`list_dir` found (short names), for the calls that usually follow."""
        for cname, plain in entries[:NAME_CACHE_SIZE]:
            disk = os.fsdecode(cname)
            if not is_longname(disk) and (dir_iv, plain) not in self._names:
                self._remember(dir_iv, plain, DiskName(disk, None))

    def decrypt(self, dir_iv: bytes, dirpath: bytes, disk_name: str) -> bytes:
        """Plaintext of one entry; IntegrityError if it is not a valid name of this directory."""

        def read_sidecar() -> str:
            try:
                return sidecar_of(dirpath, disk_name)
            except (OSError, UnicodeDecodeError) as exc:
                raise IntegrityError(f"long name {disk_name}: unreadable sidecar ({exc})") from None

        return self._cipher.decrypt_from_disk(dir_iv, disk_name, read_sidecar)

    def list_dir(
        self, dir_iv: bytes, dirpath: bytes, plain_dir: str, fd: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        """(disk name, plaintext name) of every visible entry; bad entries are logged, skipped.

        Lists *fd* if given (an open directory; its flags decide whether atime moves), else
        *dirpath*, which long names' sidecars are read through in either case. Thread-safe
        (only reads the name cache), so big directories can be listed off the loop.
        """
        out = []
        known = self._plain
        with os.scandir(reach(dirpath) if fd is None else fd) as it:
            for entry in it:
                name = entry.name
                disk = os.fsdecode(name)
                if is_internal(disk):
                    continue
                plain = known.get((dir_iv, disk))
                if plain is None:
                    try:
                        plain = self.decrypt(dir_iv, dirpath, disk)
                    except IntegrityError as exc:
                        log.error(
                            "integrity: %s: undecryptable entry %r (%s)", plain_dir, disk, exc
                        )
                        continue
                out.append((os.fsencode(name), plain))
        out.sort()
        return out


def sidecar_of(dirpath: bytes, disk_name: str) -> str:
    """The encoded name in the sidecar of long name *disk_name* in *dirpath* (OSError if it
    cannot be read, or is not a regular file; UnicodeDecodeError if it is not ASCII)."""
    sidecar = dirpath + b"/" + os.fsencode(disk_name + LONGNAME_SUFFIX)
    return read_internal_file(sidecar, 4096).decode("ascii")


def write_sidecar(dirpath: bytes, disk: DiskName, temp_prefix: str = TEMP_PREFIX) -> bool:
    """Write the long-name sidecar (if any) before the entry; True if one was written.

    Atomically (``kmsfs.tmp.*`` file, fsync, rename, fsync the directory): the sidecar of a name
    that already exists is rewritten in place (a create or rename onto it), and a crash must not
    leave that entry with a truncated sidecar, i.e. without a name. Long names are rare, so the
    fsyncs cost little. Never creates *dirpath* (a vanished directory is ENOENT, as before).
    """
    if disk.long_content is None:
        return False
    path = dirpath + b"/" + os.fsencode(disk.name + LONGNAME_SUFFIX)
    data = disk.long_content.encode("ascii")
    replace(Path(os.fsdecode(reach(path))), data, 0o440, temp_prefix=temp_prefix, parents=False)
    return True


def remove_sidecar(dirpath: bytes, cname: bytes) -> None:
    """Remove the sidecar of a long name whose entry no longer exists."""
    if not is_longname(os.fsdecode(cname)):
        return
    if os.path.lexists(reach(dirpath + b"/" + cname)):
        return  # still there (rename onto a hard link of itself, or a lost race): keep it
    with contextlib.suppress(FileNotFoundError):
        os.unlink(reach(dirpath + b"/" + cname + LONGNAME_SUFFIX.encode()))


def undo_sidecar(dirpath: bytes, disk: DiskName, written: bool) -> None:
    """After a failed create: drop the sidecar unless an entry of that name exists."""
    if written:
        remove_sidecar(dirpath, os.fsencode(disk.name))
