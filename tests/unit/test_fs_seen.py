"""This machine's record of the newest Domain generation it mounted (kmsfs.fs.seen)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs import seen

ROOT_A, ROOT_B = "a" * 64, "b" * 64


def test_the_record_lives_where_the_environment_says(machine_state: Path) -> None:
    assert seen.state_dir() == machine_state
    assert seen.record_path(ROOT_A, "payroll").parent == machine_state / "domains"


def test_without_the_environment_root_keeps_it_in_var_lib(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(seen.STATE_ENV)
    monkeypatch.setattr(seen.os, "geteuid", lambda: 0)
    assert seen.state_dir() == Path("/var/lib/kmsfs/state")
    monkeypatch.setattr(seen.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert seen.state_dir() == tmp_path / "kmsfs"


def test_an_older_generation_than_one_mounted_here_is_refused() -> None:
    seen.check(ROOT_A, "payroll", 1)  # nothing recorded: anything goes
    assert seen.remember(ROOT_A, "payroll", 3, "id3") is True
    with pytest.raises(IntegrityError) as info:
        seen.check(ROOT_A, "payroll", 2)
    message = str(info.value)
    assert "generation 3" in message and "generation 2" in message
    assert str(seen.record_path(ROOT_A, "payroll")) in message  # how to accept a restore
    seen.check(ROOT_A, "payroll", 3)
    seen.check(ROOT_A, "payroll", 4)


def test_the_record_only_moves_forward() -> None:
    assert seen.remember(ROOT_A, "payroll", 3, "id3") is True
    assert seen.remember(ROOT_A, "payroll", 2, "id2") is False
    assert seen.remember(ROOT_A, "payroll", 3, "id3") is False
    assert seen.load(ROOT_A, "payroll") == seen.Seen("payroll", ROOT_A, 3, "id3")
    assert seen.remember(ROOT_A, "payroll", 4, "id4") is True
    assert seen.load(ROOT_A, "payroll") == seen.Seen("payroll", ROOT_A, 4, "id4")


def test_domains_of_other_stores_and_other_names_are_apart() -> None:
    seen.remember(ROOT_A, "payroll", 5, "x")
    seen.check(ROOT_B, "payroll", 1)
    seen.check(ROOT_A, "hr", 1)
    assert seen.load(ROOT_B, "payroll") is None


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"{}",
        json.dumps({"domain": "payroll", "root": ROOT_A, "generation": "3", "domain_id": "x"}),
        json.dumps({"domain": "payroll", "root": ROOT_A, "generation": 0, "domain_id": "x"}),
        json.dumps({"domain": "hr", "root": ROOT_A, "generation": 3, "domain_id": "x"}),
        b"{" + b" " * 5000 + b"}",
    ],
)
def test_a_damaged_record_is_named_not_ignored(content: bytes | str) -> None:
    path = seen.record_path(ROOT_A, "payroll")
    path.parent.mkdir(parents=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(FormatError, match=str(path)):
        seen.check(ROOT_A, "payroll", 9)
