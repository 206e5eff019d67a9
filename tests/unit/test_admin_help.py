"""kmsfs-admin's help says what the commands do: read from the parser the CLI runs."""

import argparse
import inspect
from collections.abc import Iterator

from kmsfs.admin import cli
from kmsfs.agent.audit import MAX_PROBLEMS


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
