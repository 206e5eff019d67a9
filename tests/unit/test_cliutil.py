"""The shared command-line runner: what every kmsfs and kmsfs-admin command gets from it."""

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from kmsfs import cliutil, exitcodes


def test_a_name_that_is_not_utf8_is_printed_escaped_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """File names are bytes: os.fsdecode gives a Latin-1 name lone surrogates, which stdout
    cannot encode under a UTF-8 locale that Python does not coerce (LANG=en_US.UTF-8 gives
    errors=strict). fsck's damage report and init's summary died on one."""
    raw = io.BytesIO()
    strict = io.TextIOWrapper(raw, encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", strict)  # here: pytest resets sys.stdout after fixtures
    name = os.fsdecode(b"n\xffme")

    def report() -> int:
        print(f"damaged: {name}")
        return exitcodes.DAMAGED

    assert cliutil.run("kmsfs", report) == exitcodes.DAMAGED
    strict.flush()
    assert raw.getvalue() == b"damaged: n\\udcffme\n"


def test_a_system_error_names_its_file_first(capsys: pytest.CaptureFixture[str]) -> None:
    """It read "No such file or directory: report.txt", the other way round from every other
    error line ("PATH: what")."""

    def missing() -> int:
        raise FileNotFoundError(2, "No such file or directory", "report.txt")

    assert cliutil.run("kmsfs", missing) == exitcodes.ERROR
    assert capsys.readouterr().err == "kmsfs: error: report.txt: No such file or directory\n"


@pytest.fixture
def default_sigterm() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_unwinds_so_cleanups_run(
    default_sigterm: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """``timeout``, ``kill`` and a stopping service send SIGTERM: by default it ends the process
    on the spot, and a decrypt left its plaintext temporary file, an init its half store."""
    cleaned = []

    def long_work() -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes: well before the end
                pass
            return exitcodes.OK
        finally:
            cleaned.append(True)

    assert cliutil.run("kmsfs", long_work) == exitcodes.TERMINATED == 143
    assert cleaned == [True]
    assert capsys.readouterr().err == "kmsfs: terminated\n"


def test_an_ignored_sigterm_stays_ignored(default_sigterm: None) -> None:
    """nohup-style callers that ignore SIGTERM keep it ignored."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def work() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return exitcodes.OK

    assert cliutil.run("kmsfs", work) == exitcodes.OK
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


@pytest.fixture
def default_sigint() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_once_a_command_runs_ctrl_c_unwinds_again(
    default_sigint: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """The quiet exit is for the imports only: a command that is running (a reencrypt, an
    init, a foreground mount) must get its KeyboardInterrupt and clean up, not die on the spot
    with its temporary files and a half-made store left behind."""
    cliutil.quiet_interrupts("kmsfs")
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    cleaned = []

    def long_work() -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes: well before the end
                pass
            return exitcodes.OK
        finally:
            cleaned.append(True)

    assert cliutil.run("kmsfs", long_work) == exitcodes.INTERRUPTED == 130
    assert cleaned == [True]
    assert capsys.readouterr().err == "kmsfs: interrupted\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored(default_sigint: None) -> None:
    """A background job of a non-interactive shell starts with SIGINT ignored: the terminal's
    Ctrl-C is not for it, before its command runs or after."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cliutil.quiet_interrupts("kmsfs")
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN

    def work() -> int:
        os.kill(os.getpid(), signal.SIGINT)
        return exitcodes.OK

    assert cliutil.run("kmsfs", work) == exitcodes.OK
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_every_tool_leaves_no_core_dump() -> None:
    """Every tool runs through cliutil.run, which makes its process non-dumpable, with a core
    limit of 0: a crash of the mount daemon dumped the keys of open files and their plaintext
    (and, with the embedded SoftHSM2, the token's unwrapped keys) into a core file."""
    code = (
        "import ctypes, resource, sys\n"
        "from kmsfs import cliutil\n"
        "get_dumpable = lambda: ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE\n"
        "before = get_dumpable()\n"
        "def show():\n"
        "    print(before, get_dumpable(), *resource.getrlimit(resource.RLIMIT_CORE))\n"
        "sys.exit(cliutil.run('t', show))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "0", "0", "0"]


def _two_level_parser() -> cliutil.Parser:
    parser = cliutil.Parser(prog="tool")
    groups = parser.add_subparsers(dest="group", required=True)
    actions = groups.add_parser("operator").add_subparsers(dest="action", required=True)
    actions.add_parser("list").add_argument("--json", action="store_true")
    return parser


def test_leftover_arguments_point_at_the_subcommand_given(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """They pointed at the top-level help (``tool --help``), where a missing argument
    already pointed at the subcommand's."""
    parser = _two_level_parser()
    with pytest.raises(SystemExit) as leftover:
        parser.parse_args(["operator", "list", "extra"])
    assert leftover.value.code == exitcodes.USAGE
    assert capsys.readouterr().err == (
        "tool operator list: error: unrecognized arguments: extra "
        "(see tool operator list --help)\n"
    )
    parsed = parser.parse_args(["operator", "list", "--json"])
    assert vars(parsed) == {"group": "operator", "action": "list", "json": True}
