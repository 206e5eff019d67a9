"""Whether someone else could replace what a directory holds: one definition for every place
kmsfs trusts a path it will use by name later (a volume as root, the agent's socket, a SoftHSM
config kept outside a read-only store)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Collection
from pathlib import Path

#: Symlinks followed in one lookup before giving up, as the kernel does (ELOOP).
MAX_SYMLINKS = 40


def others_may_replace_in(st: os.stat_result, owners: Collection[int]) -> bool:
    """True if a user other than *owners* could rename or replace entries of the directory
    *st* describes: it belongs to someone else, or group or others may write it without the
    sticky bit (with it, as on /tmp, nobody renames what is not theirs)."""
    return st.st_uid not in owners or bool(
        st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
    )


def _walk(directory: Path) -> tuple[list[Path], list[Path]]:
    """(every directory whose entries a lookup of *directory* reads, from ``/`` down to the
    directory itself; every symlink it follows), as the kernel follows them.

    Not just the resolved path and its parents: a symlink on the way lives in a directory the
    resolved path never names (``/run/link -> /srv/agent`` is read in ``/run``), and whoever
    may write that directory may point the link elsewhere after any check of its target."""
    path = Path(directory)
    if not path.is_absolute():
        path = Path(os.getcwd(), path)  # only then: a removed working directory is no error
    parts = list(reversed(path.parts[1:]))  # ".." kept, not collapsed
    current = Path("/")
    seen = [current]
    links: list[Path] = []
    while parts:
        name = parts.pop()
        if name == "..":
            current = current.parent  # already on the way: it was walked through to get here
            continue
        following = current / name
        if stat.S_ISLNK(os.lstat(following).st_mode):
            links.append(following)
            if len(links) > MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(directory))
            target = Path(os.readlink(following))
            if target.is_absolute():
                current = Path("/")
            parts.extend(reversed(target.parts[1:] if target.is_absolute() else target.parts))
            continue
        current = following
        seen.append(current)
    return list(dict.fromkeys(seen)), links


def first_replaceable(directory: Path, owners: Collection[int]) -> tuple[Path, str] | None:
    """The first place on the way to *directory* (itself included) that a user other than
    *owners* could change, with why; None if there is none. OSError if the way cannot be
    walked (a missing component, a loop).

    Each directory on the way must be one whose entries nobody else may replace
    (:func:`others_may_replace_in`), and each symlink followed must be owned by *owners*: in
    a sticky directory (/tmp) the owner of a link may still remove it and put another there."""
    directories, links = _walk(directory)
    for on_the_way in directories:
        st = os.stat(on_the_way)
        if others_may_replace_in(st, owners):
            who = (f"owned by uid {st.st_uid}" if st.st_uid not in owners
                   else f"mode {stat.S_IMODE(st.st_mode):04o}")
            return on_the_way, who
    for link in links:
        st = os.lstat(link)
        if st.st_uid not in owners:
            return link, f"a symbolic link owned by uid {st.st_uid}"
    return None
