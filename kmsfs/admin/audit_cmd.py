"""``kmsfs-admin audit``: verify and show an HSM agent's audit log (kmsfs/agent/audit.py).

``verify`` checks the hash chain and every checkpoint against the HSMs of the store: exit 0
when intact (with a warning if records after the last checkpoint are unsigned, because a cut
there would not show), exit 3 with one stderr line per problem otherwise. ``show`` prints the
records as they are, unverified.
"""

import argparse
import contextlib
import sys
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kmsfs import exitcodes
from kmsfs.admin.render import short
from kmsfs.agent.audit import CHECKPOINT, MAX_PROBLEMS, read_records, verify_log
from kmsfs.agent.protocol import printable
from kmsfs.cliutil import emit_json, emit_table
from kmsfs.errors import KmsfsError, UsageError
from kmsfs.service import trusts
from kmsfs.store.documents import Store

if TYPE_CHECKING:
    from kmsfs.admin.cli import Command
    from kmsfs.service.context import Context

PROG = "kmsfs-admin"
EXAMPLE_LOG = "/var/lib/kmsfs/hsmd/audit.log"


def add_parser(groups: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Register ``audit verify`` and ``audit show`` under ``groups`` with cli's ``command``."""
    sub = groups.add_parser(
        "audit", help="an HSM agent's audit log"
    ).add_subparsers(dest="sub", metavar="ACTION", required=True)
    p = command(
        sub,
        "verify",
        "audit",
        "verify an agent audit log: its hash chain and its checkpoints, signed by the store's "
        f"HSMs; if damaged, exit 3 with one stderr line per problem (the first {MAX_PROBLEMS}, "
        "then how many more)",
        f"kmsfs-admin --store /srv/kms audit verify {EXAMPLE_LOG} --json",
    )
    _common(p)
    p.set_defaults(audit_action=verify)
    p = command(
        sub,
        "show",
        "audit",
        "print the records of an agent audit log as they are (unverified: see 'audit verify')",
        f"kmsfs-admin audit show {EXAMPLE_LOG} --last 20",
    )
    _common(p)
    p.add_argument("--last", type=_positive, metavar="N", help="only the last N records")
    p.set_defaults(audit_action=show)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", type=Path, metavar="LOG", help="the agent's audit log file")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"want a whole number >= 1, have {text!r}")
    return value


def run(cmd: "Command") -> int | None:
    action: Callable[[Command], int | None] = cmd.args.audit_action
    return action(cmd)


@contextlib.contextmanager
def _named_on_command_line(log: Path) -> Iterator[None]:
    """A log that cannot be read is a usage error (2), as any file the command line names,
    not the catch-all (1)."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"{log}: {exc.strerror}") from None


def _trusted_keys(ctx: "Context") -> dict[str, Any]:
    """Signing keys of the HSMs of the Trusts that verify (``trusts.trusted_hsms``)."""
    ctx.store.anchor()  # "not a kmsfs store" is clearer than "every checkpoint by an unknown HSM"
    return {i: hsm.sign_key for i, hsm in trusts.trusted_hsms(ctx).items()}


def verify(cmd: "Command") -> int:
    log: Path = cmd.args.log
    keys = _trusted_keys(cmd.ctx)
    with _named_on_command_line(log):
        report = verify_log(log, keys)
    if cmd.json:
        emit_json({"log": str(log), **report.to_dict()})
    elif report.ok:
        signed = report.last_signed_seq
        print(
            f"audit log {log}: chain intact, {report.records} records, "
            f"{report.checkpoints} checkpoints, last signed seq "
            f"{'none' if signed is None else signed}"
        )
    for problem in report.problems:
        print(f"{PROG}: error: {log}: {problem}", file=sys.stderr)
    if report.ok and report.unsigned_tail:
        print(
            f"{PROG}: warning: {log}: the last {report.unsigned_tail} records follow the last "
            "checkpoint and are not signed: a cut there would not show",
            file=sys.stderr,
        )
    return exitcodes.OK if report.ok else exitcodes.VERIFICATION


def show(cmd: "Command") -> None:
    log: Path = cmd.args.log
    labels = _labels(cmd.ctx.store)
    with _named_on_command_line(log):
        entries = deque(read_records(log), maxlen=cmd.args.last)
    if cmd.json:
        emit_json(
            [
                record if record is not None else {"line": index + 1, "error": error}
                for index, record, error in entries
            ]
        )
        return
    rows = []
    for index, record, error in entries:
        if record is None:
            rows.append({"seq": f"line {index + 1}", "type": "unreadable", "reason": error})
        elif record["type"] == CHECKPOINT:
            hsm = labels.get(record["hsm"], short(record["hsm"]))
            rows.append({**record, "who": f"HSM {hsm}", "reason": "signs all before it"})
        else:
            rows.append({**record, "domain": record["domain"] or "-"})
    columns = ["seq", "time", "type", "who", "op", "domain", "decision", "reason"]
    # Records quote what clients sent: escape control characters so a record can neither
    # forge table rows nor drive the terminal.
    emit_table([{c: _safe(r.get(c, "")) for c in columns} for r in rows], columns)


def _safe(value: Any) -> str:
    return printable(str(value))


def _labels(store: Store) -> dict[str, str]:
    """HSM labels for display; a log is still shown without a usable store."""
    try:
        return {hsm_id: store.hsm(hsm_id).label for hsm_id in store.hsm_ids()}
    except KmsfsError:
        return {}
