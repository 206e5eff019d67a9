"""Shared command-line plumbing: one-line errors, exit codes, JSON and table output."""

import argparse
import contextlib
import ctypes
import json
import logging
import os
import resource
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from kmsfs import exitcodes
from kmsfs.errors import KmsfsError

#: Where :class:`Parser` notes, in the namespace, the innermost (sub)command that parsed.
_INNERMOST = "_innermost_prog"


class Parser(argparse.ArgumentParser):
    """argparse that prints ``prog: error: ...`` on one line and exits 2.

    Arguments left over are reported against the subcommand that was given, as a missing
    one is: argparse reports them from the top-level parser, so ``kmsfs-admin operator list
    extra`` pointed at ``kmsfs-admin --help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(exitcodes.USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if not hasattr(parsed, _INNERMOST):  # a subcommand's parser, inside, sets it first
            setattr(parsed, _INNERMOST, self.prog)
        return parsed, extras

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        innermost = getattr(parsed, _INNERMOST, self.prog)
        delattr(parsed, _INNERMOST)
        if extras:
            self.exit(
                exitcodes.USAGE,
                f"{innermost}: error: unrecognized arguments: {' '.join(extras)} "
                f"(see {innermost} --help)\n",
            )
        return parsed


def add_agent_options(parser: argparse.ArgumentParser, agent_help: str) -> None:
    """``--agent`` (what it does for this command: *agent_help*) and its TLS files, the same
    for kmsfs and kmsfs-admin."""
    parser.add_argument("--agent", metavar="SOCKET|HOST:PORT", help=agent_help)
    parser.add_argument(
        "--agent-cert", metavar="F", help="client certificate, for an agent at HOST:PORT (TLS)"
    )
    parser.add_argument("--agent-key", metavar="F", help="its private key")
    parser.add_argument("--agent-ca", metavar="F", help="CA that signed the agent's certificate")


def merge_store(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--store`` before the command (``args.store``) or after it (``args.store_after``, a
    dest of its own): either may be given; two different ones are a usage error, not the
    second one silently winning. Both tools take it so."""
    after = getattr(args, "store_after", None)
    if after is None:
        return
    if args.store is not None and os.path.realpath(args.store) != os.path.realpath(after):
        parser.error(
            f"--store {args.store} before the command and --store {after} after it: give one"
        )
    args.store = after


class Terminated(BaseException):
    """SIGTERM arrived (``kill``, ``timeout``, a stopping service): unwind like Ctrl-C, so
    every ``except BaseException`` / ``finally`` undo runs and nothing half-made stays."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: raise :class:`Terminated` where the main thread is."""
    raise Terminated


def quiet_interrupts(prog: str) -> None:
    """Until :func:`run` starts, a Ctrl-C ends the program with "PROG: interrupted" and exit
    130 instead of a KeyboardInterrupt traceback from wherever it landed (an import, argument
    parsing). Left alone where SIGINT is ignored (a background job) or already taken."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def interrupted(signum: int, frame: object) -> None:
        os.write(2, f"{prog}: interrupted\n".encode())
        os._exit(exitcodes.INTERRUPTED)  # nothing is done yet: no clean-up to run

    _BEFORE_RUN.add(interrupted)
    signal.signal(signal.SIGINT, interrupted)


#: The handlers :func:`quiet_interrupts` installed, which :func:`run` replaces.
_BEFORE_RUN: set[Callable[..., None]] = set()


#: prctl(2) option: whether the process may be dumped (and ptraced by its own user).
PR_SET_DUMPABLE = 4


def keep_memory_out_of_core_dumps() -> None:
    """No core dump of this process, ever.

    Every kmsfs tool holds secrets in memory: file keys and plaintext (the mount daemon,
    encrypt/decrypt, fsck, reencrypt), PINs and passphrases, and with the embedded SoftHSM2 the
    token's unwrapped keys themselves. A crash (in libfuse, OpenSSL, the PKCS#11 module) would
    leave them all in a core file that outlives the process, e.g. under
    /var/lib/systemd/coredump and in its backups. RLIMIT_CORE 0 stops a core file; not being
    dumpable also stops a core_pattern pipe (systemd-coredump, which ignores that limit) and
    ptrace by the same user, as ssh-agent and gpg-agent do. Both pass to a forked child (the
    mount daemon); the limit also passes to programs run.
    """
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE): {os.strerror(err)}")


def run(prog: str, handler: Callable[[], int | None]) -> int:
    """Run ``handler``; turn kmsfs errors into one stderr line and a stable exit code.

    First, the process stops being dumpable (:func:`keep_memory_out_of_core_dumps`).
    Output never fails on a name that is not valid in the locale's encoding (file names are
    bytes: a Latin-1 name under a UTF-8 locale): it is written with backslash escapes. A
    SIGTERM unwinds as :class:`Terminated`, unless the caller ignores the signal (nohup) or
    the handler installs its own (the agent, the mount daemon); a Ctrl-C as KeyboardInterrupt.
    """
    keep_memory_out_of_core_dumps()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):  # not a text file (tests)
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    if signal.getsignal(signal.SIGINT) in _BEFORE_RUN:  # from here on, Ctrl-C unwinds
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        with contextlib.suppress(ValueError):  # only the main thread may (in-process tests)
            signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return handler() or exitcodes.OK
    except KmsfsError as exc:
        print_error(prog, str(exc))
        return exitcodes.for_error(exc)
    except BrokenPipeError:
        # The reader went away (``kmsfs decrypt f - | head``): not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not complain either.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exitcodes.OK
    except OSError as exc:
        # "PATH: what", as every other error line says where first
        what = exc.strerror or str(exc)
        print_error(prog, f"{exc.filename}: {what}" if exc.filename else what)
        return exitcodes.ERROR
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted{_left(exc)}", file=sys.stderr)
        return exitcodes.INTERRUPTED
    except Terminated as exc:
        print(f"{prog}: terminated{_left(exc)}", file=sys.stderr)
        return exitcodes.TERMINATED


def _left(exc: BaseException) -> str:
    """What a command cut short left to do, if it said (:func:`say_what_is_left`)."""
    left = getattr(exc, "kmsfs_left", None)
    return f": {left}" if left else ""


def say_what_is_left(exc: BaseException, left: str) -> None:
    """Have the "interrupted" (or "terminated") line of *exc*, a Ctrl-C or SIGTERM that cuts a
    command short, say what is left to do: "kmsfs: interrupted" alone did not say that the
    volume must be re-encrypted to the end before it mounts again (review)."""
    exc.kmsfs_left = left  # type: ignore[attr-defined]


def print_error(prog: str, message: str) -> None:
    """The one line of a failed command, on stderr: under systemd with priority 3 (error),
    so that `journalctl -p err` shows a mount or an agent that did not start."""
    line = f"{prog}: error: {message}"
    print(f"<3>{line}" if stderr_is_the_journal() else line, file=sys.stderr)


def stderr_is_the_journal() -> bool:
    """True if stderr is the stream systemd connected to the journal: ``JOURNAL_STREAM`` is
    its device and inode (a child whose stderr was redirected elsewhere inherits the
    variable, so the file itself is compared). journald then reads a ``<N>`` in front of a
    line as its priority (sd-daemon(3))."""
    device, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return bool(sep) and (st.st_dev, st.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return False


class _ToolFormatter(logging.Formatter):
    """``PROG: warning: message``: a warning from inside the tool (a store.json a sync
    replaced, an HSM that failed over) reads as the tool's own warnings do, not as a logger's
    ``kmsfs.store.documents: WARNING:`` line (review)."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.prog}: {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(verbose: bool, prog: str | None = None) -> None:
    """Warnings to stderr, as ``PROG: warning: ...`` (with *prog*); with *verbose*, debug
    lines too, each naming the module it comes from."""
    if verbose or prog is None:
        logging.basicConfig(
            level=logging.DEBUG if verbose else logging.WARNING,
            format="%(name)s: %(levelname)s: %(message)s",
            stream=sys.stderr,
        )
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ToolFormatter(prog))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def emit_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def emit_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A plain aligned table; an empty list prints a header only."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
