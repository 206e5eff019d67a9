"""Extended attributes over the ciphertext tree: the fs side of :mod:`kmsfs.crypto.xattrs`.

Only ``user.*`` attributes exist, stored with encrypted names and values (the layout is in
:mod:`kmsfs.crypto.xattrs` and docs/format.md). Other namespaces (security, trusted, system)
are refused as on a file system without them: ENODATA for reads, EOPNOTSUPP for writes; storing
them in the clear would leak, and forwarding ``security.*`` would let the kernel act on
ciphertext. Names up to 255 bytes, as on ext4 (on a volume without the ``LongXattrNames`` flag,
a name too long once encrypted, over about 171 bytes after ``user.``, is ERANGE).
The other answers are ext4's: EINVAL for a namespace with no name after it ("user."),
EOPNOTSUPP for a namespace Linux does not know, ENOSPC for a value that does not fit.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

from kmsfs.crypto.xattrs import (
    USER_PREFIX,
    ForeignXattrName,
    XattrCipher,
    XattrNameError,
    is_long_disk_name,
)
from kmsfs.errors import IntegrityError


@dataclass(frozen=True)
class HeldFile:
    """A regular file the daemon reaches only through its own O_PATH fd (a file removed after
    the kernel looked it up: :meth:`kmsfs.fs.inodes.InodeTable.hold`). The xattr calls take no
    O_PATH fd (EBADF), so they go by its ``/proc/self/fd`` link, followed on purpose: it names
    the file itself, never a ciphertext symlink."""

    fd: int


Target = bytes | int | HeldFile  # a ciphertext path, an open fd, or a held file

#: The namespaces Linux knows; a name in any other is EOPNOTSUPP, as on ext4.
NAMESPACES = (USER_PREFIX, b"security.", b"trusted.", b"system.")


def foreign_name_errno(name: bytes) -> int:
    """What reading or removing a name outside ``user.*`` gives: ENODATA in a namespace that
    exists (there is nothing there), EINVAL for a namespace alone, EOPNOTSUPP in a namespace
    Linux does not know. Also the getxattr hot path (security.capability before each write)."""
    if name.startswith(NAMESPACES):
        return errno.EINVAL if name in NAMESPACES else errno.ENODATA
    return errno.EOPNOTSUPP


def _reach(target: Target) -> tuple[bytes | int, dict[str, bool]]:
    """What to hand os.*xattr, and how: never following a ciphertext symlink (its target is
    ciphertext); fds take no such flag; a held file's /proc link is the one link followed."""
    if isinstance(target, HeldFile):
        return b"/proc/self/fd/%d" % target.fd, {}
    return target, {} if isinstance(target, int) else {"follow_symlinks": False}


class Xattrs:
    """The four xattr operations over a ciphertext path or fd (synchronous, thread-safe).

    *long_names*: the volume has the ``LongXattrNames`` flag, so names up to ext4's 255 bytes
    are stored (hashed on disk); without it, a name too long once encrypted is ERANGE.
    """

    def __init__(self, cipher: XattrCipher, long_names: bool = False) -> None:
        self._c = cipher
        self._long = long_names

    def _disk_name(self, name: bytes) -> bytes:
        if name in NAMESPACES:
            raise OSError(errno.EINVAL, "no name after the namespace")
        try:
            return self._c.disk_name(name, self._long)
        except XattrNameError as exc:
            raise OSError(errno.ERANGE if exc.too_long else errno.EOPNOTSUPP, str(exc)) from None

    def get(self, target: Target, name: bytes) -> bytes:
        if not name.startswith(USER_PREFIX):
            raise OSError(foreign_name_errno(name), "no such user.* attribute")
        disk = self._disk_name(name)
        where, how = _reach(target)
        stored = os.getxattr(where, disk, **how)
        return self._c.open(disk, stored)

    def set(self, target: Target, name: bytes, value: bytes) -> None:
        disk = self._disk_name(name)
        where, how = _reach(target)
        try:
            os.setxattr(where, disk, self._c.seal(disk, value, name), **how)
        except OSError as exc:
            if exc.errno == errno.E2BIG:  # the nonce and tag took it past the backing's limit
                raise OSError(errno.ENOSPC, "xattr value does not fit") from None
            raise

    def remove(self, target: Target, name: bytes) -> None:
        if not name.startswith(USER_PREFIX):
            raise OSError(foreign_name_errno(name), "no such user.* attribute")
        where, how = _reach(target)
        os.removexattr(where, self._disk_name(name), **how)

    def list(
        self, target: Target, damaged: Callable[[bytes, IntegrityError], None] | None = None
    ) -> list[bytes]:
        """The plaintext names. One that does not decrypt, or whose value does not open, is
        left out and handed to *damaged* (disk name, why); another program's own ``user.*``
        names, and one removed meanwhile, are left out silently."""
        out = []
        where, how = _reach(target)
        for disk in os.listxattr(where, **how):
            raw = os.fsencode(disk)
            if raw.startswith(USER_PREFIX):
                try:
                    stored = None
                    if self._long and is_long_disk_name(raw):  # its name is in its value
                        stored = os.getxattr(where, raw, **how)
                        self._c.open(raw, stored)  # listed only if it also reads back
                    out.append(self._c.plain_name(raw, stored))
                except (ForeignXattrName, FileNotFoundError):
                    continue  # not ours, or just removed: hide it, do not fail
                except IntegrityError as exc:
                    if damaged is not None:
                        damaged(raw, exc)
                    continue  # damaged: hide it, do not fail the listing
                except OSError as exc:
                    if exc.errno != errno.ENODATA:
                        raise
        return out
