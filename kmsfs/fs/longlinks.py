"""The blobs of long symlink targets: ``<root>/kmsfs.longlinks/<the symlink's target>``.

A target too long to stay in its ciphertext symlink (:mod:`kmsfs.crypto.symlinks`) lives in a
blob named by the hash of its encoding; the mount, ``kmsfs reencrypt`` and fsck reach the
blob directory only through :func:`longlinks_dir`, which never follows a symlink.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from kmsfs.atomicfile import fsync_dir, write_new
from kmsfs.crypto.symlinks import LONGLINK_DIR, LONGLINK_DIR_B
from kmsfs.errors import IntegrityError
from kmsfs.fs.names import TEMP_PREFIX
from kmsfs.fs.posix import dir_no_follow, read_internal_file

log = logging.getLogger(__name__)


@contextlib.contextmanager
def longlinks_dir(root: bytes, create: bool = False) -> Iterator[bytes]:
    """The long-symlink blob directory of the volume at *root*, as ``/proc/self/fd/N``: opened
    without following a symlink. Whoever can write the ciphertext directory can put a symlink
    at its name, and the daemon (root, usually) then wrote, read and removed blobs wherever it
    led. A symlink or anything but a directory there is OSError(EIO), with a log line; with
    *create*, a missing directory is made (and its entry fsync'd into the root)."""
    path = root + b"/" + LONGLINK_DIR_B
    if create and not os.path.lexists(path):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o711)
        fsync_dir(root)
    held = contextlib.ExitStack()
    try:
        blobs = held.enter_context(dir_no_follow(path))
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        log.error("%s is not a directory (a symlink?): long symlink targets unavailable",
                  LONGLINK_DIR)
        raise OSError(errno.EIO, f"{LONGLINK_DIR} is not a directory") from None
    with held:
        yield blobs


def read_blob(root: bytes, stored: str) -> str:
    """The encoded target in the blob the long symlink of target *stored* names, in the volume
    at *root*; IntegrityError if it cannot be read."""
    try:
        with longlinks_dir(root) as blobs:
            return read_internal_file(blobs + b"/" + os.fsencode(stored), 8192).decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"long symlink {stored}: unreadable blob ({exc})") from None


def remove_blob(root: bytes, name: bytes) -> None:
    """Remove a blob no symlink names any more. Its entry is gone already: a blob that cannot
    be removed is only a leftover (fsck reports it), not the caller's failure."""
    with contextlib.suppress(OSError), longlinks_dir(root) as blobs:
        os.unlink(blobs + b"/" + name)


def write_blob(root: bytes, name: str, content: str) -> bytes:
    """Write and fsync a long-symlink blob before the symlink that names it; return its name.

    Blob names are random (a nonce), so a crash before the symlink exists leaves at most an
    unreferenced blob, which fsck reports. The blob's entry is fsync'd too (and the blob
    directory's, made on first use, into the root), so no durable symlink can name a blob that
    is not.
    """
    data = content.encode("ascii")
    with longlinks_dir(root, create=True) as blobs:
        blob = Path(os.fsdecode(blobs)) / name
        write_new(blob, data, 0o444, temp_prefix=TEMP_PREFIX, parents=False)
    return os.fsencode(name)
