"""Extended attributes over the ciphertext tree: the fs side of :mod:`kmsfs.crypto.xattrs`.

Only ``user.*`` attributes exist, stored with encrypted names and values (the layout is in
:mod:`kmsfs.crypto.xattrs` and docs/format.md). Other namespaces (security, trusted, system)
are refused as on a file system without them: ENODATA for reads, EOPNOTSUPP for writes; storing
them in the clear would leak, and forwarding ``security.*`` would let the kernel act on
ciphertext. A name too long once encrypted is ERANGE, as Linux gives for a too-long name.
"""

from __future__ import annotations

import errno
import os

from kmsfs.crypto.xattrs import USER_PREFIX, XattrCipher, XattrNameError
from kmsfs.errors import IntegrityError

Target = bytes | int  # a ciphertext path or an open fd


def _nofollow(target: Target) -> dict[str, bool]:
    """Never follow a ciphertext symlink (its target is ciphertext); fds take no such flag."""
    return {} if isinstance(target, int) else {"follow_symlinks": False}


class Xattrs:
    """The four xattr operations over a ciphertext path or fd (synchronous, thread-safe)."""

    def __init__(self, cipher: XattrCipher) -> None:
        self._c = cipher

    def _disk_name(self, name: bytes) -> bytes:
        try:
            return self._c.disk_name(name)
        except XattrNameError as exc:
            raise OSError(errno.ERANGE if exc.too_long else errno.EOPNOTSUPP, str(exc)) from None

    def get(self, target: Target, name: bytes) -> bytes:
        if not name.startswith(USER_PREFIX):
            raise OSError(errno.ENODATA, "no such attribute")
        disk = self._disk_name(name)
        stored = os.getxattr(target, disk, **_nofollow(target))
        return self._c.open(disk, stored)

    def set(self, target: Target, name: bytes, value: bytes) -> None:
        disk = self._disk_name(name)
        os.setxattr(target, disk, self._c.seal(disk, value), **_nofollow(target))

    def remove(self, target: Target, name: bytes) -> None:
        if not name.startswith(USER_PREFIX):
            raise OSError(errno.ENODATA, "no such attribute")
        os.removexattr(target, self._disk_name(name), **_nofollow(target))

    def list(self, target: Target) -> list[bytes]:
        out = []
        for disk in os.listxattr(target, **_nofollow(target)):
            raw = os.fsencode(disk)
            if raw.startswith(USER_PREFIX):
                try:
                    out.append(self._c.plain_name(raw))
                except IntegrityError:
                    continue  # not ours (or damaged): hide it rather than fail the listing
        return out
