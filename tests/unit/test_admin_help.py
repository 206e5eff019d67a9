"""kmsfs-admin's help says what the commands do: read from the parser the CLI runs."""

import argparse
import inspect
from collections.abc import Iterator

import pytest

from kmsfs import exitcodes
from kmsfs.admin import cli
from kmsfs.agent.audit import MAX_PROBLEMS
from kmsfs.service.context import STORE_DEFAULT


def _commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (sub)command parser with its words (``("trust", "seal")``)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def _help(*words: str) -> str:
    return dict(_commands(cli.build_parser()))[words].format_help()


def test_every_trust_argument_has_the_same_help() -> None:
    """`trust show TRUST` said "id or unique prefix"; seal, sign, verify and pin said nothing."""
    found = []
    for words, parser in _commands(cli.build_parser()):
        for action in parser._actions:
            if action.metavar == "TRUST":
                found.append((words, action.dest))
                assert action.help and cli.TRUST_REF in action.help, (words, action.dest)
    have = {(" ".join(w), d) for w, d in found}
    assert {("trust show", "trust"), ("trust seal", "trust"), ("trust sign", "trust"),
            ("trust verify", "trust"), ("trust pin", "trust"),
            ("trust propose", "predecessor"), ("domain create", "trust"),
            ("domain rewrap", "trust")} <= have


def test_predecessor_help_says_when_it_is_required() -> None:
    """It said "default: the store's genesis", but once the genesis's successor is pinned,
    leaving it out fails (trusts.propose: "give --predecessor")."""
    text = " ".join(_help("trust", "propose").split())
    assert "default: the store's genesis" not in text
    assert "Without it: the genesis, but only until this store pins" in text
    assert "required after that" in text


def test_agent_help_names_every_command_that_uses_the_agent() -> None:
    """`domain rotate` goes through --agent but was not listed."""
    agent = next(a for a in cli.build_parser()._actions if a.dest == "agent")
    for name, method in inspect.getmembers(cli.Command, inspect.isfunction):
        if "self.agent()" in inspect.getsource(method):
            group, action = name.split("_", 1)
            assert f"{group} " in agent.help and action in agent.help, name


def test_audit_verify_help_says_one_line_per_problem() -> None:
    """It said "exit 3 naming the first damaged record"; it prints up to 100 problems."""
    text = " ".join(_help("audit", "verify").split())
    assert "first damaged record" not in text
    assert f"one stderr line per problem (the first {MAX_PROBLEMS}, then how many more)" in text


def test_store_help_says_the_default_for_every_user_as_kmsfs_does() -> None:
    """kmsfs-admin's said nothing of a user other than root (~/.local/share/kmsfs/store)."""
    from kmsfs.fs import cli as fs_cli

    admin = " ".join(_help().split())
    kmsfs = " ".join(fs_cli.build_parser().format_help().split())
    assert "else ~/.local/share/kmsfs/store" in admin
    assert f"default: {STORE_DEFAULT}" in admin and f"default: {STORE_DEFAULT}" in kmsfs


@pytest.mark.parametrize(
    "argv", [["completion", "--json", "bash"], ["--json", "completion", "bash"]]
)
def test_completion_refuses_json_as_kmsfs_does(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed the script and ignored --json."""
    assert cli.main(argv) == exitcodes.USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "kmsfs-admin: error: --json: completion prints a shell script\n"
    assert cli.main(["completion", "bash"]) == exitcodes.OK
    assert "complete -o filenames -F _kmsfs_admin kmsfs-admin" in capsys.readouterr().out


def _command_summaries(text: str) -> dict[str, str]:
    """The top-level help's COMMAND entries, each joined into one line: {"trust": "..."}."""
    entries: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("    ") and not line.startswith("     "):  # "    trust   ..."
            name, _, rest = line.strip().partition(" ")
            entries[name] = rest.strip()
        elif name and line.startswith(" " * 24) and line.strip():  # argparse's wrapping
            entries[name] += " " + line.strip()
        else:
            name = None
    return entries


def test_the_top_level_help_lists_every_action_of_every_command() -> None:
    """`kmsfs-admin --help` left out domain rotate, trust list, trust pin and hsm health: its
    summaries were written by hand, before those actions were added."""
    summaries = _command_summaries(_help())
    actions = [w for w in dict(_commands(cli.build_parser())) if len(w) == 2]
    assert {("domain", "rotate"), ("trust", "list"), ("trust", "pin"), ("hsm", "health")} <= set(
        actions
    )
    for group in {g for g, _ in actions}:
        _, colon, tail = summaries[group].rpartition(": ")
        assert colon, f"{group}: no list of actions in {summaries[group]!r}"
        listed = tail.replace("- ", "-").split(", ")
        assert listed == [a for g, a in actions if g == group], (group, summaries[group])
