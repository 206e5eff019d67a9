"""Files a hostile replica plants in the store's public tree: ``rsync -a`` (and so a union
merge) copies FIFOs, symbolic links and directories as they are. Each is one error line naming
it, never a hang, and nothing is read or written through it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsfs import exitcodes
from tests.kms_helpers import Admin, one_error_line


@pytest.fixture
def proposed(initialized: Admin) -> tuple[Admin, str]:
    """A store with operators alice and bob and a Trust (quorum 1) proposed, not yet signed."""
    initialized.create_operators("alice", "bob")
    return initialized, initialized.propose(["hsm1"], ["alice", "bob"], 1)


def _planted_approval(admin: Admin, trust: str) -> Path:
    directory = admin.store / "approvals" / trust
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{'ab' * 32}.json"


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_planted_special_file_is_one_error_line_not_a_hang(
    proposed: tuple[Admin, str], tmp_path: Path, kind: str
) -> None:
    admin, trust = proposed
    planted = _planted_approval(admin, trust)
    if kind == "fifo":
        os.mkfifo(planted)  # opening it for reading waited for a writer: every command hung
    elif kind == "symlink":
        outside = tmp_path / "elsewhere.json"
        outside.write_text("{}")
        planted.symlink_to(outside)
    else:
        planted.mkdir()
    for command in (("trust", "show", trust), ("trust", "seal", trust)):
        line = one_error_line(admin(*command, check=exitcodes.FORMAT))
        assert str(planted) in line and "where a regular file belongs" in line


def test_a_symlinked_store_directory_is_not_written_through(
    proposed: tuple[Admin, str], tmp_path: Path
) -> None:
    """A replica's ``approvals/<trust>`` that is a link to a directory outside the store took
    ``trust sign``'s approval there, written as root."""
    admin, trust = proposed
    outside = tmp_path / "outside"
    outside.mkdir()
    (admin.store / "approvals").mkdir(exist_ok=True)
    (admin.store / "approvals" / trust).symlink_to(outside)
    result = admin("trust", "sign", trust, "--as", "alice", "--pin-file",
                   admin.pin_file("alice"), check=exitcodes.STORE)
    assert "a symbolic link inside the store" in one_error_line(result)
    assert list(outside.iterdir()) == []
