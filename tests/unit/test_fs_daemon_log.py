"""The mount daemon's log file (``--log-file``, /var/log/kmsfs.log): its lines name plaintext
paths (integrity errors do), yet it was created with the caller's umask (0644: anyone could
read them). In-process: :func:`kmsfs.fs.daemonlog.setup_logging` as ``kmsfs mount`` calls it."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.errors import UsageError
from kmsfs.fs import daemonlog


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    """setup_logging replaces the root logger's handlers: give the test runner its own back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    umask = os.umask(0o022)  # what a shell gives kmsfs mount
    try:
        yield
    finally:
        os.umask(umask)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_log_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    log = tmp_path / "kmsfs.log"
    daemonlog.setup_logging(foreground=False, log_file=log)
    logging.getLogger("kmsfs.fs.files").error("integrity error in /payroll/salaries.ods")
    assert mode(log) == 0o600
    assert "/payroll/salaries.ods" in log.read_text()
    assert "readable by" not in log.read_text()


def test_an_open_log_file_is_warned_about_once_and_left_as_it_is(tmp_path: Path) -> None:
    """Not changed (an administrator may have meant it: a log group), but said, once per
    file: a SIGHUP that reopens the same file does not say it again."""
    log = tmp_path / "kmsfs.log"
    log.write_text("earlier\n")
    log.chmod(0o644)
    daemonlog.setup_logging(foreground=True, log_file=log)
    daemonlog.reopen_log_files()
    text = log.read_text()
    assert text.startswith("earlier\n")
    assert text.count(f"log file {log} is readable by group and others (mode 0644)") == 1, text
    assert f"log file {log} reopened" in text
    assert mode(log) == 0o644


def test_a_log_file_that_is_a_symbolic_link_is_refused(tmp_path: Path) -> None:
    """Created as root in a directory someone else can write, a link would send the lines
    (or root's O_CREAT) wherever it points."""
    target = tmp_path / "elsewhere"
    (tmp_path / "kmsfs.log").symlink_to(target)
    with pytest.raises(UsageError, match=r"kmsfs\.log: a symbolic link"):
        daemonlog.setup_logging(foreground=False, log_file=tmp_path / "kmsfs.log")
    assert not target.exists()


def test_a_reopen_that_fails_goes_on_in_the_old_file(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    daemonlog.setup_logging(foreground=True, log_file=logs / "kmsfs.log")
    os.rename(logs / "kmsfs.log", tmp_path / "kmsfs.log.1")
    logs.rmdir()
    daemonlog.reopen_log_files()
    logging.getLogger("kmsfs").info("still logged")
    text = (tmp_path / "kmsfs.log.1").read_text()
    assert "logging goes on in the old file" in text and "still logged" in text


@pytest.mark.parametrize("reader", [False, True], ids=["no-reader", "a-reader"])
def test_a_reopen_that_finds_a_fifo_neither_waits_nor_logs_into_it(
    tmp_path: Path, reader: bool
) -> None:
    """SIGHUP reopens the file on the mount's own thread: a FIFO put at the path made the
    open wait for a reader, and every request of the mount with it. Now anything but a
    regular file is refused at once (a FIFO with a reader too) and logging goes on in the old
    file."""
    log = tmp_path / "kmsfs.log"
    daemonlog.setup_logging(foreground=True, log_file=log)
    os.rename(log, tmp_path / "kmsfs.log.1")
    os.mkfifo(log)
    held = os.open(log, os.O_RDONLY | os.O_NONBLOCK) if reader else None
    try:
        reopen = threading.Thread(target=daemonlog.reopen_log_files, daemon=True)
        reopen.start()
        reopen.join(5)
        blocked = reopen.is_alive()
        if blocked:  # waiting in open(2) for a reader: give it one, to end the thread
            os.close(os.open(log, os.O_RDONLY | os.O_NONBLOCK))
            reopen.join(5)
    finally:
        if held is not None:
            os.close(held)
    assert not blocked, "the reopen waited for a reader of the FIFO"
    logging.getLogger("kmsfs").info("still logged")
    text = (tmp_path / "kmsfs.log.1").read_text()
    assert (
        f"cannot open log file {log}: not a regular file; logging goes on in the old file"
        in text
    ), text
    assert "still logged" in text


def test_a_log_file_that_is_no_regular_file_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "kmsfs.log")
    reader = os.open(tmp_path / "kmsfs.log", os.O_RDONLY | os.O_NONBLOCK)  # opens at once
    try:
        with pytest.raises(UsageError, match=r"kmsfs\.log: not a regular file"):
            daemonlog.setup_logging(foreground=False, log_file=tmp_path / "kmsfs.log")
    finally:
        os.close(reader)


def _limits_after_raise(as_nobody: bool = False) -> list[str]:
    """The (soft, hard) open-file limits a process that starts at (64, 4096) has after
    daemon.raise_open_file_limit, as root or as user nobody."""
    script = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 4096))\n"
        "from kmsfs.fs import daemon\n"
        "daemon.raise_open_file_limit()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    return subprocess.run([*drop, sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, cwd=Path(__file__).resolve().parents[2]).stdout.split()


def test_the_daemon_raises_its_open_file_limit_to_the_hard_one() -> None:
    """Every open file of a mount holds a daemon fd, for every user: at the usual soft limit
    of 1,024 one process's opens failed every open on the mount (EMFILE). A daemon that is
    not root goes up to its hard limit."""
    if os.geteuid() == 0:
        assert _limits_after_raise(as_nobody=True) == ["4096", "4096"]
    else:
        assert _limits_after_raise() == ["4096", "4096"]


@pytest.mark.parametrize("may_raise_hard", [True, False])
def test_a_daemon_that_may_raises_its_hard_open_file_limit_to_the_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, may_raise_hard: bool
) -> None:
    """With allow_other, two users holding 10,000 files open each used up a hard limit of
    20,000 and every other open on the mount failed (EMFILE), where ext4 gives each process
    its own limit: a daemon with CAP_SYS_RESOURCE (root, outside a container that drops it)
    takes the kernel's per-process ceiling, fs.nr_open; one without it, its hard limit. (This
    machine's root lacks the capability, so the kernel's refusal is played by a stand-in.)"""
    from kmsfs.fs import daemon

    nr_open = tmp_path / "nr_open"
    nr_open.write_text("1048576\n")
    monkeypatch.setattr(daemon, "NR_OPEN", str(nr_open))
    limits = [(1024, 20_000)]

    def setrlimit(which: int, new: tuple[int, int]) -> None:
        assert which == daemon.resource.RLIMIT_NOFILE
        if new[1] > limits[-1][1] and not may_raise_hard:
            raise ValueError("not allowed to raise maximum limit")
        limits.append(new)

    monkeypatch.setattr(daemon.resource, "getrlimit", lambda which: limits[-1])
    monkeypatch.setattr(daemon.resource, "setrlimit", setrlimit)
    daemon.raise_open_file_limit()
    assert limits[-1] == ((1_048_576, 1_048_576) if may_raise_hard else (20_000, 20_000))


def test_the_agents_log_file_is_created_closed_to_others(tmp_path: Path) -> None:
    """kmsfs-hsmd --log-file made it 0644 under the usual umask, where the mount's is 0600
    (found by review); and a symlink planted at its path is refused, not followed."""
    from kmsfs.agent.cli import _setup_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    old_umask = os.umask(0o022)
    try:
        _setup_logging(tmp_path / "hsmd.log", False)
        logging.getLogger("kmsfs.agent").info("started")
        for handler in root.handlers:
            handler.flush()
        assert stat.S_IMODE((tmp_path / "hsmd.log").stat().st_mode) == 0o600
        assert "started" in (tmp_path / "hsmd.log").read_text()
        (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
        with pytest.raises(UsageError, match="symbolic link"):
            _setup_logging(tmp_path / "link", False)
        assert not (tmp_path / "elsewhere").exists()
    finally:
        os.umask(old_umask)
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:], root.level = saved[0], saved[1]


_LOG_SOME = """
import logging, sys
from kmsfs.fs.daemonlog import setup_logging
from kmsfs.agent.cli import _setup_logging
(setup_logging(True) if sys.argv[1] == "mount" else _setup_logging(None, False))
log = logging.getLogger("kmsfs.test")
log.error("integrity: /victim: block 3")
log.warning("careful")
log.info("serving")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("unexpected error in write")
"""


def _logged(tmp_path: Path, who: str, journal_is_stderr: bool) -> list[str]:
    """What the mount daemon's (or the agent's) stderr logging writes, stderr a file that
    JOURNAL_STREAM names (as systemd sets it) or another one."""
    out = tmp_path / f"{who}.stderr"
    out.touch()
    named = out if journal_is_stderr else tmp_path / "another"
    named.touch()
    st = named.stat()
    with open(out, "wb") as stderr:
        subprocess.run([sys.executable, "-c", _LOG_SOME, who], stderr=stderr, check=True,
                       env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    return out.read_text().splitlines()


@pytest.mark.parametrize("who", ["mount", "agent"])
def test_under_systemd_each_stderr_line_carries_its_priority(tmp_path: Path, who: str) -> None:
    """Every line was priority 6 in the journal: `journalctl -p err` showed no integrity or
    HSM error (found by review). Now <3> for errors, on every line of a traceback too, and
    no time of the daemon's own (the journal has it)."""
    lines = _logged(tmp_path, who, journal_is_stderr=True)
    assert lines[:3] == [
        "<3>ERROR kmsfs.test: integrity: /victim: block 3",
        "<4>WARNING kmsfs.test: careful",
        "<6>INFO kmsfs.test: serving",
    ]
    assert lines[3] == "<3>ERROR kmsfs.test: unexpected error in write"
    assert len(lines) > 5 and all(line.startswith("<3>") for line in lines[3:])
    assert lines[-1] == "<3>ValueError: boom"


def test_elsewhere_stderr_lines_keep_their_time_and_no_prefix(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited by a daemon whose stderr goes to a file or a terminal."""
    lines = _logged(tmp_path, "mount", journal_is_stderr=False)
    assert lines[0].endswith(" ERROR kmsfs.test: integrity: /victim: block 3")
    assert lines[0][:4].isdigit() and not any(line.startswith("<") for line in lines)


@pytest.mark.parametrize("journal_is_stderr", [True, False])
def test_a_failed_commands_line_carries_the_error_priority_under_systemd(
    tmp_path: Path, journal_is_stderr: bool
) -> None:
    """A mount under kmsfs@ that failed to start printed its one line at priority info, out
    of `journalctl -p err` (review)."""
    out = tmp_path / "stderr"
    out.touch()
    named = out if journal_is_stderr else tmp_path / "another"
    named.touch()
    st = named.stat()
    with open(out, "wb") as stderr:
        done = subprocess.run(
            [sys.executable, "-m", "kmsfs.fs.cli", "info", str(tmp_path / "nowhere")],
            stderr=stderr, env={**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
        )
    assert done.returncode != 0
    line = out.read_text().strip()
    assert line.startswith("<3>kmsfs: error: " if journal_is_stderr else "kmsfs: error: "), line
    assert "\n" not in line and str(tmp_path / "nowhere") in line
