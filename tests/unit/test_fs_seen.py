"""This machine's record of the newest Domain generation it mounted (kmsfs.fs.seen)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kmsfs.errors import FormatError, IntegrityError
from kmsfs.fs import seen

ROOT_A, ROOT_B = "a" * 64, "b" * 64
T1, T2, T3 = "1" * 64, "2" * 64, "3" * 64  # T2 succeeds T1 (an HSM removed), T3 succeeds T2


def offered(generation: int, chain: tuple[str, ...] = (ROOT_A, T1, T2), **kw: str) -> seen.Offered:
    return seen.Offered(
        kw.get("root", ROOT_A), kw.get("domain", "payroll"), generation,
        kw.get("domain_id", f"id{generation}"), chain,
    )


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


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_state_directories_are_closed_to_other_users_even_under_umask_0(
    machine_state: Path,
) -> None:
    """The mount daemon runs with umask 0: its state directories were made 0777, so any user
    could remove the record that refuses a rolled-back Domain."""
    old = os.umask(0)
    try:
        seen.remember(offered(1))
    finally:
        os.umask(old)
    assert _mode(machine_state) == _mode(machine_state / "domains") == 0o755


def test_state_directories_left_open_by_an_earlier_version_are_closed(
    machine_state: Path,
) -> None:
    (machine_state / "domains").mkdir(parents=True)
    for directory in (machine_state, machine_state / "domains"):
        directory.chmod(0o777)
    seen.remember(offered(1))
    assert _mode(machine_state) == _mode(machine_state / "domains") == 0o755


def test_state_directories_are_closed_even_when_the_record_is_current(
    machine_state: Path,
) -> None:
    """Installs an earlier version left open stayed open until a newer generation came."""
    seen.remember(offered(1))
    machine_state.chmod(0o777)
    assert seen.remember(offered(1)) is False  # nothing new to record
    assert _mode(machine_state) == 0o755


def test_a_symlink_planted_for_the_domains_directory_is_not_followed(
    machine_state: Path, tmp_path: Path
) -> None:
    """While the state directory was open to all, another user could swap ``domains`` for a
    symlink: to a file of root's (chmod'ed through it) or a directory of their choosing
    (the record written there)."""
    machine_state.mkdir(mode=0o777)
    machine_state.chmod(0o777)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o777)
    victim.chmod(0o777)
    (machine_state / "domains").symlink_to(victim)
    with pytest.raises(IntegrityError, match="not a directory of its own"):
        seen.remember(offered(1))
    assert _mode(victim) == 0o777 and list(victim.iterdir()) == []
    assert _mode(machine_state) == 0o755  # closed on the way down, before the refusal


def test_the_system_state_directory_may_be_a_symlink_and_its_parent_is_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """/var/lib/kmsfs/state kept elsewhere (a symlink) was refused, and with it every
    record (and kmsfs reencrypt); /var/lib/kmsfs above it, left 0777, is closed first."""
    parent, elsewhere = tmp_path / "var-lib-kmsfs", tmp_path / "elsewhere"
    parent.mkdir()
    parent.chmod(0o777)
    elsewhere.mkdir()
    (parent / "state").symlink_to(elsewhere)
    monkeypatch.delenv(seen.STATE_ENV)
    monkeypatch.setattr(seen, "SYSTEM_STATE_DIR", parent / "state")
    assert seen.state_dir() == parent / "state"
    assert seen.remember(offered(1)) is True
    assert len(list((elsewhere / "domains").glob("*.json"))) == 1
    assert _mode(parent) == 0o755


def test_a_state_directory_others_may_write_and_another_user_owns_is_refused(
    machine_state: Path,
) -> None:
    machine_state.mkdir()
    os.chown(machine_state, 65534, 65534)
    machine_state.chmod(0o777)
    with pytest.raises(IntegrityError, match="owned by uid 65534"):
        seen.remember(offered(1))
    assert not (machine_state / "domains").exists()


def test_an_older_generation_than_one_mounted_here_is_refused() -> None:
    seen.check(offered(1))  # nothing recorded: anything goes
    assert seen.remember(offered(3)) is True
    with pytest.raises(IntegrityError) as info:
        seen.check(offered(2))
    message = str(info.value)
    assert "generation 3" in message and "generation 2" in message
    assert str(seen.record_path(ROOT_A, "payroll")) in message  # how to accept a restore
    seen.check(offered(3))
    seen.check(offered(4))


def test_a_rival_of_the_generation_mounted_here_is_refused() -> None:
    seen.remember(offered(3))
    with pytest.raises(IntegrityError, match="rival"):
        seen.check(offered(3, domain_id="another"))


def test_a_newer_number_under_an_older_trust_is_refused() -> None:
    """An HSM removed by T2 can still seal a Domain under T1, with any generation number:
    what this machine last used was governed by T2, so the offer must descend from T2."""
    seen.remember(offered(3, chain=(ROOT_A, T1, T2)))
    with pytest.raises(IntegrityError, match="does not descend"):
        seen.check(offered(9, chain=(ROOT_A, T1)))
    seen.check(offered(4, chain=(ROOT_A, T1, T2)))  # a rotation under T2
    seen.check(offered(4, chain=(ROOT_A, T1, T2, T3)))  # a rewrap to T3


def test_the_record_only_moves_forward() -> None:
    assert seen.remember(offered(3)) is True
    assert seen.remember(offered(2)) is False
    assert seen.remember(offered(3)) is False
    assert seen.load(ROOT_A, "payroll") == seen.Seen("payroll", ROOT_A, 3, "id3", T2)
    assert seen.remember(offered(4, chain=(ROOT_A, T1, T2, T3))) is True
    assert seen.load(ROOT_A, "payroll") == seen.Seen("payroll", ROOT_A, 4, "id4", T3)


def test_domains_of_other_stores_and_other_names_are_apart() -> None:
    seen.remember(offered(5))
    seen.check(offered(1, root=ROOT_B, chain=(ROOT_B,)))
    seen.check(offered(1, domain="hr", chain=(ROOT_A,)))
    assert seen.load(ROOT_B, "payroll") is None


def _record(**changes: object) -> bytes:
    doc: dict[str, object] = {
        "domain": "payroll", "root": ROOT_A, "generation": 3, "domain_id": "x", "trust": T2
    }
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"{}",
        _record(generation="3"),
        _record(generation=0),
        _record(domain="hr"),
        _record(trust=None),
        b"{" + b" " * 5000 + b"}",
    ],
)
def test_a_damaged_record_is_named_not_ignored(content: bytes) -> None:
    path = seen.record_path(ROOT_A, "payroll")
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(FormatError, match=str(path)):
        seen.check(offered(9))
