"""The inode table's paths (InodeTable.path), without FUSE.

Every request turns a FUSE inode into a ciphertext path, and the table caches those paths. A
stale one would send a request to the wrong file, so each test asks for the paths first (so
they are cached), changes the links the way a handler does, and checks the paths again:
renames of a file, of a directory above it, exchanges, hard links, unlinks, and a number that
comes back for another object after FORGET.
"""

from __future__ import annotations

import errno
import os

import pytest

from kmsfs.fs import inodes
from kmsfs.fs.inodes import ROOT, InodeTable

R = b"/cipher"


def _table() -> InodeTable:
    """root/a (10), root/a/b (11), root/a/b/f (12), root/c (13), each held once by the kernel."""
    t = InodeTable(R, root_backing_ino=2)
    t.remember(10, ROOT, b"a", b"A", 1)
    t.remember(11, 10, b"b", b"B", 1)
    t.remember(12, 11, b"f", b"F", 1)
    t.remember(13, ROOT, b"c", b"C", 1)
    return t


def _all(t: InodeTable) -> list[bytes]:
    return [t.path(i) for i in (ROOT, 10, 11, 12, 13)]


def test_paths_are_built_from_the_root() -> None:
    t = _table()
    assert _all(t) == [R, R + b"/a", R + b"/a/b", R + b"/a/b/f", R + b"/c"]
    assert _all(t) == [R, R + b"/a", R + b"/a/b", R + b"/a/b/f", R + b"/c"]  # from the cache


def test_a_renamed_directory_moves_every_path_under_it() -> None:
    t = _table()
    _all(t)
    t.move_link((10, b"b"), (13, b"b2"), b"B2")
    assert t.path(11) == R + b"/c/b2"
    assert t.path(12) == R + b"/c/b2/f"
    assert t.path(10) == R + b"/a"


def test_a_renamed_file_and_the_file_it_replaced() -> None:
    t = _table()
    t.remember(14, 11, b"g", b"G", 1)
    _all(t)
    assert t.path(14) == R + b"/a/b/g"
    t.move_link((11, b"g"), (11, b"f"), b"F")  # g over f
    assert t.path(14) == R + b"/a/b/f"
    with pytest.raises(OSError) as exc:
        t.path(12)  # f is gone
    assert exc.value.errno == errno.ENOENT


def test_exchanged_directories_swap_their_subtrees() -> None:
    t = _table()
    t.remember(15, 13, b"d", b"D", 1)
    _all(t)
    t.path(15)
    t.exchange((10, b"b"), b"B", (13, b"d"), b"D")
    assert t.path(11) == R + b"/c/d"
    assert t.path(12) == R + b"/c/d/f"
    assert t.path(15) == R + b"/a/b"


def test_a_hard_link_keeps_the_file_reachable_when_its_first_name_goes() -> None:
    t = _table()
    _all(t)
    t.add_link(12, 13, b"hard", b"HARD")
    assert t.path(12) == R + b"/a/b/f"
    t.drop_link(11, b"f")
    assert t.path(12) == R + b"/c/hard"


def test_an_unlinked_entry_has_no_path() -> None:
    t = _table()
    _all(t)
    t.drop_link(ROOT, b"c")
    with pytest.raises(OSError) as exc:
        t.path(13)
    assert exc.value.errno == errno.ENOENT


def test_a_number_that_comes_back_for_another_object_gets_its_new_path() -> None:
    t = _table()
    _all(t)
    t.forget(13, 1)  # the kernel lets go of root/c: the node is freed
    assert not t.known(13)
    t.remember(13, 10, b"new", b"NEW", 1)  # the backing number now names another object
    assert t.path(13) == R + b"/a/new"


def test_a_full_cache_starts_over_and_stays_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inodes, "PATH_CACHE_SIZE", 4)
    t = _table()
    for i in range(20, 30):
        t.remember(i, 11, b"n%d" % i, b"N", 1)
    assert [t.path(i) for i in range(20, 30)] == [R + b"/a/b/n%d" % i for i in range(20, 30)]
    assert len(t._paths) <= 4
    t.move_link((ROOT, b"a"), (ROOT, b"z"), b"Z")
    assert [t.path(i) for i in range(20, 30)] == [R + b"/z/b/n%d" % i for i in range(20, 30)]


def test_a_table_whose_links_form_a_loop_fails_the_request_instead_of_hanging() -> None:
    t = _table()
    t.drop_link(ROOT, b"a")
    t.add_link(10, 12, b"loop", b"LOOP")  # a/b/f/loop is a again: only a bug could do this
    with pytest.raises(OSError) as exc:
        t.path(12)
    assert exc.value.errno == errno.ELOOP


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_held_fds_are_bounded_and_closed_when_the_kernel_lets_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A removed file's fd (InodeTable.hold) lives until FORGET or a link comes back, and no
    more than MAX_HELD_FDS are held: a user can keep the kernel's nodes of many removed files
    (an inotify watch on a file with other links needs no fd of theirs at all)."""
    monkeypatch.setattr(inodes, "MAX_HELD_FDS", 2)
    t = InodeTable(R, root_backing_ino=2)
    fds = [os.open("/", os.O_PATH) for _ in range(4)]
    for i, ino in enumerate((20, 21, 22)):
        t.remember(ino, ROOT, b"f%d" % i, b"F%d" % i, 1)
        t.drop_link(ROOT, b"f%d" % i)  # its known link removed, the kernel still holds it
        t.hold(ino, fds[i], b"/cipher/f%d" % i)
    assert [t.held(ino) for ino in (20, 21)] == [(fds[0], b"/cipher/f0"), (fds[1], b"/cipher/f1")]
    assert t.held(22) is None and not _fd_open(fds[2])  # past the bound: closed at once
    t.forget(20, 1)  # FORGET: the node goes, and its fd
    assert not _fd_open(fds[0])
    t.hold(22, fds[3], b"/cipher/f2")  # room again
    assert t.held(22) == (fds[3], b"/cipher/f2")
    t.remember(21, ROOT, b"other", b"OTHER", 1)  # a link of it looked up: a path again
    assert t.held(21) is None and not _fd_open(fds[1])
    assert t.path(21) == R + b"/other"
    t.forget(22, 1)
    assert not _fd_open(fds[3])
