"""The mount daemon's log file (``--log-file``, /var/log/kmsfs.log): its lines name plaintext
paths (integrity errors do), yet it was created with the caller's umask (0644: anyone could
read them). In-process: :func:`kmsfs.fs.daemon.setup_logging` as ``kmsfs mount`` calls it."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs.errors import UsageError
from kmsfs.fs import daemon


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
    daemon.setup_logging(foreground=False, log_file=log)
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
    daemon.setup_logging(foreground=True, log_file=log)
    daemon.reopen_log_files()
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
        daemon.setup_logging(foreground=False, log_file=tmp_path / "kmsfs.log")
    assert not target.exists()


def test_a_reopen_that_fails_goes_on_in_the_old_file(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    daemon.setup_logging(foreground=True, log_file=logs / "kmsfs.log")
    os.rename(logs / "kmsfs.log", tmp_path / "kmsfs.log.1")
    logs.rmdir()
    daemon.reopen_log_files()
    logging.getLogger("kmsfs").info("still logged")
    text = (tmp_path / "kmsfs.log.1").read_text()
    assert "logging goes on in the old file" in text and "still logged" in text
