"""``kmsfs init`` that fails halfway leaves nothing behind, so it can simply be run again.

It used to leave ``kmsfs.diriv`` without ``kmsfs.conf``: a retry said "not empty", a mount
"kmsfs.conf: no such file", and the error ("No space left on device") named no file. Real
store and SoftHSM tokens; the command runs in a subprocess as a user would run it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs import exitcodes
from tests.integration.test_singlefile import (
    FullDisk,
    full_disk,
    kmsfs,
    leftovers,
    make_store,
    one_error_line,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("init")).store


@pytest.fixture(params=["tmpfs", "fsize"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FullDisk]:
    """Room for the 16-byte directory IV, not for the config (a few KiB): a 4 KiB tmpfs, and
    a file-size limit, which needs no mount and so always runs."""
    with full_disk(request.param, tmp_path / "tiny") as found:
        yield found


def _verifies(store: Path, cipherdir: Path) -> bool:
    info = json.loads(kmsfs(store, "info", str(cipherdir), "--json").stdout)
    return bool(info["verified"])


@pytest.mark.parametrize("made_by", ["init", "the user"])
def test_failed_init_leaves_nothing_and_can_be_run_again(
    store: Path, disk: FullDisk, made_by: str
) -> None:
    cipherdir = disk.path / "vol"
    if made_by == "the user":
        cipherdir.mkdir()
    proc = kmsfs(store, "init", str(cipherdir), "--domain", "payroll", preexec=disk.preexec,
                 check=None)
    line = one_error_line(proc, f"{cipherdir}/kmsfs.conf", "nothing was left behind")
    assert proc.returncode == exitcodes.ERROR, line
    # as it was: the directory init made is gone, the user's is empty again
    assert leftovers(disk.path) == ([] if made_by == "init" else ["vol"])
    if made_by == "the user":
        assert leftovers(cipherdir) == []
    disk.grow()
    kmsfs(store, "init", str(cipherdir), "--domain", "payroll")
    assert _verifies(store, cipherdir)


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit(143)"])
def test_interrupted_init_leaves_nothing(store: Path, tmp_path: Path, exc: str) -> None:
    """Ctrl-C (or SIGTERM, as SystemExit) once the directory IV is written."""
    hook = f"from kmsfs.fs import config\ndef save(*args):\n    raise {exc}\nconfig.save = save"
    cipherdir = tmp_path / "d" / "vol"
    cipherdir.parent.mkdir()
    proc = kmsfs(store, "init", str(cipherdir), "--domain", "payroll", hook=hook, check=None)
    assert proc.returncode != 0
    assert leftovers(cipherdir.parent) == []
    kmsfs(store, "init", str(cipherdir), "--domain", "payroll")
    assert _verifies(store, cipherdir)
