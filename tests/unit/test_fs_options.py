"""Mount options: what kmsfs passes to the kernel for what the user asked."""

from __future__ import annotations

import pytest

from kmsfs.errors import UsageError
from kmsfs.fs.daemon import mount_options


def test_allow_other_brings_the_kernels_permission_checks() -> None:
    assert "default_permissions" in mount_options(["allow_other"])
    assert "default_permissions" in mount_options(["ro,allow_other"])


def test_without_allow_other_no_permission_round_trips() -> None:
    opts = mount_options([])
    assert "default_permissions" not in opts
    assert {"fsname=kmsfs", "subtype=kmsfs"} <= opts


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
