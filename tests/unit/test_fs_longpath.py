"""kmsfs.fs.longpath: paths beyond PATH_MAX reach their file, and anchors do not pile up."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kmsfs.fs import longpath
from kmsfs.fs.longpath import MAX_ANCHORS, PATH_MAX, Anchors

NAME = b"n" * 200


def deep_dir(top: Path, min_length: int) -> bytes:
    """Nested directories under *top* (made through dir fds) until the path is this long."""
    path = os.fsencode(top)
    at = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while len(path) < min_length:
            os.mkdir(NAME, dir_fd=at)
            deeper = os.open(NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=at)
            os.close(at)
            at, path = deeper, path + b"/" + NAME
    finally:
        os.close(at)
    return path


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_path_that_fits_is_given_back_unchanged(tmp_path: Path) -> None:
    path = os.fsencode(tmp_path / "f")
    assert longpath.reach(path) is path


@pytest.mark.parametrize("length", [PATH_MAX, 3 * PATH_MAX + 123])
def test_a_longer_path_reaches_the_same_file(tmp_path: Path, length: int) -> None:
    d = deep_dir(tmp_path, length)
    anchors = Anchors()
    reached = anchors.reach(d + b"/file")
    assert len(reached) < PATH_MAX
    with pytest.raises(OSError) as too_long:
        os.open(d + b"/file", os.O_RDONLY)
    assert too_long.value.errno == errno.ENAMETOOLONG

    fd = os.open(anchors.reach(d + b"/file"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, b"deep")
    os.close(fd)
    with open(anchors.reach(d + b"/file"), "rb") as f:
        assert f.read() == b"deep"
    assert os.listdir(anchors.reach(d)) == [b"file"]  # the directory itself, too
    anchors.close()


def test_anchors_are_bounded_and_a_reached_path_outlives_one_retirement(tmp_path: Path) -> None:
    top = deep_dir(tmp_path, PATH_MAX)
    for i in range(MAX_ANCHORS + 10):
        os.mkdir(longpath.reach(top + b"/%d" % i))
    anchors = Anchors()
    before = open_fds()
    first = anchors.reach(top + b"/0/f")
    for i in range(1, MAX_ANCHORS + 10):  # fills the cache: the first anchor is retired
        anchors.reach(top + b"/%d/f" % i)
    assert len(anchors) < MAX_ANCHORS
    assert open_fds() - before <= 2 * MAX_ANCHORS + 1
    with open(first, "wb") as f:  # still the same directory: retired, not closed
        f.write(b"x")
    assert os.listdir(longpath.reach(top + b"/0")) == [b"f"]

    for i in range(MAX_ANCHORS + 10):  # fills it again: the first generation is closed
        anchors.reach(top + b"/%d/g" % i)
    assert open_fds() - before <= 2 * MAX_ANCHORS + 1
    anchors.close()
    assert open_fds() == before


def test_forget_drops_the_anchors_at_and_below_a_path_and_closes_them_one_call_later(
    tmp_path: Path,
) -> None:
    top = deep_dir(tmp_path, PATH_MAX)
    for name in (b"/a", b"/a/in", b"/ab", b"/b"):
        os.mkdir(longpath.reach(top + name))
    anchors = Anchors()
    before = open_fds()
    for name in (b"/a", b"/a/in", b"/ab", b"/b"):
        anchors.reach(top + name + b"/f")
    kept = len(anchors)  # the four, and those on the way to them

    anchors.forget(top + b"/a")  # not /ab: a sibling that shares the prefix
    assert len(anchors) == kept - 2
    assert open_fds() - before == kept  # not closed yet
    anchors.forget(top + b"/nothing")
    assert open_fds() - before == kept - 2
    anchors.close()
    assert open_fds() == before


def test_forget_makes_a_moved_directory_unreachable_by_its_old_path(tmp_path: Path) -> None:
    top = deep_dir(tmp_path, PATH_MAX)
    old, new = top + b"/old", top + b"/new"
    anchors = Anchors()
    os.mkdir(anchors.reach(old))
    open(anchors.reach(old + b"/f"), "wb").close()  # anchors old
    os.rename(anchors.reach(old), anchors.reach(new))
    anchors.forget()
    os.mkdir(anchors.reach(old))
    assert os.listdir(anchors.reach(old)) == []
    assert os.listdir(anchors.reach(new)) == [b"f"]
    anchors.close()


def test_a_name_longer_than_path_max_is_left_to_the_kernel_to_refuse() -> None:
    path = b"/tmp/" + b"x" * PATH_MAX
    assert Anchors().reach(path) == path
