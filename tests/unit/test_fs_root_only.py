"""As root, kmsfs acts only on a ciphertext directory no other user can reach or replace.

The ciphertext of a user's files is owned by that user, and the daemon reaches entries by
path: a user who could enter the ciphertext directory could swap one of their directories for
a symlink and have the root daemon create files wherever it leads (kmsfs.fs.volume
check_root_only). These tests build each kind of directory that would allow that and check
that it is refused, and that the safe ones (kmsfs init's 0700, or any mode under a directory
only root can enter, below root-owned parents or a sticky /tmp) are not.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.errors import UsageError
from kmsfs.fs.volume import check_root_only

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the rule is for root")


@pytest.fixture
def cipher() -> Iterator[Path]:
    """A 0700 ciphertext directory of root's in a 0755 directory in /tmp: every directory
    above it lets everyone through (pytest's own temporary directories are 0700)."""
    with tempfile.TemporaryDirectory(prefix="kmsfs-rootonly-", dir="/tmp") as base:
        os.chmod(base, 0o755)
        path = Path(base) / "cipher"
        path.mkdir(mode=0o700)
        yield path


def _acl_granting(uid: int) -> bytes:
    """A POSIX access ACL (the kernel's xattr format) that lets *uid* enter."""
    entries = [(0x01, 7, 0xFFFFFFFF), (0x02, 5, uid), (0x04, 0, 0xFFFFFFFF),
               (0x10, 5, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_a_root_only_directory_passes(cipher: Path) -> None:
    check_root_only(cipher)
    os.chmod(cipher, 0o744)  # others may list the names (no search): they cannot enter
    check_root_only(cipher)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda c: os.chown(c, 1000, 1000), r"can reach the ciphertext \(owned by uid 1000"),
        (lambda c: os.chmod(c, 0o755), r"can reach the ciphertext \(mode 0755"),
        (lambda c: os.chmod(c, 0o710), r"can reach the ciphertext \(mode 0710"),
        (lambda c: os.setxattr(c, "system.posix_acl_access", _acl_granting(1000)),
         r"can reach the ciphertext \(mode 0750"),  # the ACL's mask is the group bits
        (lambda c: os.chown(c.parent, 1000, 1000), "can be changed by uid 1000"),
        (lambda c: os.chmod(c.parent, 0o777), "can be changed by other users"),
        (lambda c: os.chmod(c.parent, 0o775), "can be changed by other users"),
    ],
    ids=["owner", "mode-0755", "mode-0710", "acl", "parent-owner", "parent-0777", "parent-0775"],
)
def test_a_directory_another_user_could_enter_or_replace_is_refused(
    cipher: Path, change, says: str  # type: ignore[no-untyped-def]
) -> None:
    change(cipher)
    with pytest.raises(UsageError, match=says):
        check_root_only(cipher)


@pytest.mark.parametrize("owner", [0, 1000])
def test_any_mode_is_fine_under_a_directory_only_root_can_enter(cipher: Path, owner: int) -> None:
    """The volume's root has the plaintext root's mode (0755 for allow_other): what keeps
    other users out is then a closed directory above it."""
    os.chmod(cipher, 0o755)
    os.chown(cipher, owner, owner)
    os.chmod(cipher.parent, 0o700)
    check_root_only(cipher)
    os.chmod(cipher.parent, 0o701)  # search for others: open again
    with pytest.raises(UsageError, match="can reach the ciphertext"):
        check_root_only(cipher)


def test_a_sticky_world_writable_parent_is_fine(cipher: Path) -> None:
    """In /tmp (1777) nobody else can move a directory of root's away."""
    os.chmod(cipher.parent, 0o1777)
    check_root_only(cipher)


def test_the_directory_is_judged_where_it_really_is(cipher: Path) -> None:
    """A volume reached through a symlink is judged by its real place: a link kept in a closed
    directory does not make an open volume pass, and a link in the open to a closed one is
    fine."""
    closed = cipher.parent / "closed"
    closed.mkdir(mode=0o700)
    inside = closed / "link"
    inside.symlink_to(cipher)
    outside = cipher.parent / "link"
    outside.symlink_to(cipher)
    check_root_only(outside)
    check_root_only(inside)
    os.chmod(cipher, 0o755)
    for link in (inside, outside):
        with pytest.raises(UsageError, match="can reach the ciphertext"):
            check_root_only(link)
