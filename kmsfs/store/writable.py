"""Writing into a store: one kind of error (StoreError, exit 6) for every way it can fail.

A store may be read where it cannot be written: a read-only bind mount of it, a restored
backup on read-only media, a store of another user. Whatever only reads (mount, ``domain
verify``, ``info``) must work there; whatever writes must say so in one line naming the store
and what could not be written, not end on a raw ``[Errno 30]`` with exit 1 -- and it must say
so *before* it asks for or uses a PIN (:func:`require_writable`), not after an operator's
token has already signed.
"""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from kmsfs.errors import StoreError


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """Turn an OSError while writing *what* at *path* into a StoreError naming both."""
    try:
        yield
    except OSError as exc:
        raise StoreError(f"{path}: cannot write {what}: {exc.strerror or exc}") from exc


def require_writable(root: Path, what: str) -> None:
    """StoreError unless this process may write into the store at *root* (checked, not tried:
    nothing is written). Call it before a PIN is read for something the store must record."""
    if is_writable(root):
        return
    raise StoreError(f"{root}: cannot write {what}: the store is {why_not_writable(root)}")


def is_writable(root: Path) -> bool:
    """Whether this process may write into the directory *root* (False if it is missing).

    access(2) answers EROFS for a read-only mount, even to root; with the effective ids, as
    open(2) would check them."""
    effective = os.access in os.supports_effective_ids
    return os.access(root, os.W_OK | os.X_OK, effective_ids=effective)


def why_not_writable(root: Path) -> str:
    """"on a read-only file system" or "not writable by this user", for an error line."""
    try:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return "on a read-only file system"
    except OSError as exc:
        return f"not reachable ({exc.strerror})"
    return "not writable by this user"

