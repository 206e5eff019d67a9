"""Mount options: what kmsfs passes to the kernel for what the user asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from kmsfs.errors import UsageError
from kmsfs.fs.daemon import mount_options, source_name


def test_allow_other_brings_the_kernels_permission_checks() -> None:
    assert "default_permissions" in mount_options(["allow_other"])
    assert "default_permissions" in mount_options(["ro,allow_other"])


def test_without_allow_other_no_permission_round_trips() -> None:
    opts = mount_options([])
    assert "default_permissions" not in opts
    assert {"fsname=kmsfs", "subtype=kmsfs"} <= opts


def test_the_source_is_the_ciphertext_directory_unless_fsname_says_otherwise(
    tmp_path: Path,
) -> None:
    """mount -a matches an fstab line by its source: "kmsfs" matched no line."""
    (tmp_path / "cipher").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "cipher")
    assert f"fsname={tmp_path}/cipher" in mount_options([], tmp_path / "link")
    assert "fsname=kmsfs" not in mount_options([], tmp_path / "cipher")
    named = mount_options(["fsname=payroll"], tmp_path / "cipher")
    assert {o for o in named if o.startswith("fsname=")} == {"fsname=payroll"}


@pytest.mark.parametrize("name", ["a,b", "a\\b", "caf\u00e9", "tab\there"])
def test_a_source_libfuse_would_misread_stays_kmsfs(tmp_path: Path, name: str) -> None:
    """pyfuse3 passes options as ASCII, and libfuse splits them at commas and unescapes
    backslashes: such a directory is not the source, and the mount still works."""
    assert source_name(tmp_path / name) is None
    assert "fsname=kmsfs" in mount_options([], tmp_path / name)


def test_default_permissions_can_be_asked_for() -> None:
    assert "default_permissions" in mount_options(["default_permissions"])


@pytest.mark.parametrize(
    "bad",
    [
        ["suid,allow_root"],
        ["ro,rw"],
        ["max_write=1"],
        ["max_read=abc"],  # libfuse refused these only after the fork and the HSM unwrap
        ["max_read=0"],
        ["max_read=-4096"],
        ["subtype="],
        ["fsname="],
    ],
)
def test_refused_options(bad: list[str]) -> None:
    with pytest.raises(UsageError):
        mount_options(bad)


def test_values_libfuse_takes_pass() -> None:
    opts = mount_options(["max_read=131072,fsname=/srv/cipher/payroll,subtype=kmsfs"])
    assert {"max_read=131072", "fsname=/srv/cipher/payroll", "subtype=kmsfs"} <= opts
