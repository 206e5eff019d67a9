"""The mount daemon's log: where its lines go, and the log file it writes.

Its lines name plaintext paths (an integrity error names the file), so the file is made
readable by its owner alone, never opened through a symbolic link or as anything but a
regular file, and opened again by path on SIGHUP, as logrotate expects
(:func:`kmsfs.fs.stopping.watch_signals`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import logging.handlers
import os
import stat
import sys
from pathlib import Path
from typing import Any

from kmsfs.cliutil import stderr_is_the_journal
from kmsfs.errors import UsageError

log = logging.getLogger(__name__)


def setup_logging(foreground: bool, debug: bool = False, log_file: Path | None = None) -> None:
    """Where the daemon's log lines (integrity errors among them) go: ``log_file`` if given;
    else stderr in the foreground (the journal, under systemd); else syslog when daemonized.
    A daemon with neither gets :func:`default_log_file` rather than losing them."""
    handler: logging.Handler
    if log_file is not None:
        handler = LogFile(log_file)
        handler.setFormatter(logging.Formatter(LINE_FORMAT))
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(stderr_formatter())
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("kmsfs[%(process)d]: %(levelname)s %(message)s"))
    else:  # daemonized with no syslog: a file, never the terminal we are leaving
        return setup_logging(foreground, debug, default_log_file())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    if isinstance(handler, LogFile):
        handler.warn_if_exposed()


#: A line of a log file, or of stderr at a terminal.
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def stderr_formatter() -> logging.Formatter:
    """How lines to stderr look: under systemd, where stderr is the journal's stream
    (``JOURNAL_STREAM`` names it), each line starts with its syslog priority, ``<3>`` for an
    error, which journald takes as the line's priority (sd-daemon(3)), and has no time of its
    own (the journal stamps it). Without the prefix every line was priority 6 (info), and
    ``journalctl -p err`` showed none of the integrity or HSM errors (found by review)."""
    if stderr_is_the_journal():
        return JournalFormatter()
    return logging.Formatter(LINE_FORMAT)


class JournalFormatter(logging.Formatter):
    """Each line (a traceback's too) prefixed with the record's syslog priority."""

    PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                  (logging.INFO, 6))

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self.PRIORITIES if record.levelno >= level), 7)
        lines = super().format(record).splitlines() or [""]
        return "\n".join(f"<{priority}>{line}" for line in lines)


#: A log file the daemon creates: integrity errors name plaintext paths in it.
LOG_MODE = 0o600


class LogFile(logging.StreamHandler):
    """The daemon's log file: created :data:`LOG_MODE` whatever the umask, never opened
    through a symbolic link, and opened again by path on SIGHUP (:func:`reopen_log_files`),
    as logrotate expects after it moved the file aside."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._warned: tuple[int, int] | None = None  # the file last warned about
        super().__init__(self._open())

    def _open(self) -> Any:
        """The file at :attr:`path`, which must be a regular file. Opened without waiting: a
        SIGHUP reopens it on the loop's thread, and a FIFO put at the path (whose open(2)
        for writing waits for a reader) stalled every request of the mount."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags | os.O_NONBLOCK, LOG_MODE)
        except OSError as exc:
            why = {errno.ELOOP: "a symbolic link", errno.ENXIO: "not a regular file"}.get(
                exc.errno or 0, exc.strerror
            )  # ENXIO: a FIFO with no reader
            raise UsageError(f"cannot open log file {self.path}: {why}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UsageError(f"cannot open log file {self.path}: not a regular file")
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except OSError as exc:
            os.close(fd)
            raise UsageError(f"cannot open log file {self.path}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")

    def reopen(self) -> None:
        """Go on in a file opened anew at :attr:`path` (UsageError if it cannot be)."""
        old = self.setStream(self._open())
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()
        self.warn_if_exposed()

    def close(self) -> None:
        self.acquire()
        try:
            with contextlib.suppress(OSError, ValueError):
                try:
                    self.flush()
                finally:
                    self.stream.close()
            super().close()
        finally:
            self.release()

    def warn_if_exposed(self) -> None:
        """One warning per file that group or others may read: not changed, as an
        administrator may have meant it, but it names plaintext paths."""
        with contextlib.suppress(OSError, ValueError):
            st = os.fstat(self.stream.fileno())
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o044 and self._warned != (
                st.st_dev, st.st_ino
            ):
                self._warned = (st.st_dev, st.st_ino)
                log.warning(
                    "log file %s is readable by %s (mode %04o); its lines name plaintext "
                    "paths: chmod 600 it",
                    self.path, "group and others" if st.st_mode & 0o044 == 0o044
                    else "group" if st.st_mode & 0o040 else "others",
                    stat.S_IMODE(st.st_mode),
                )


def reopen_log_files() -> None:
    """SIGHUP: open the log file again by path (after logrotate moved it aside); a daemon
    that logs elsewhere has nothing to reopen."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, LogFile)]
    if not files:
        log.info("SIGHUP: no log file to reopen (logging to stderr or syslog); still serving")
    for handler in files:
        try:
            handler.reopen()
        except UsageError as exc:
            log.error("%s; logging goes on in the old file", exc)
        else:
            log.info("log file %s reopened", handler.path)


def default_log_file() -> Path:
    """/var/log/kmsfs.log for root, else ~/.cache/kmsfs/kmsfs.log."""
    if os.geteuid() == 0:
        return Path("/var/log/kmsfs.log")
    path = Path.home() / ".cache" / "kmsfs" / "kmsfs.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
