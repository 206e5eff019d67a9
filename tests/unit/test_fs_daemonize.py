"""kmsfs.fs.daemon.daemonize: how ``kmsfs mount`` (without --foreground) hands the mount to its
daemon, and what a Ctrl-C or SIGTERM then does to the caller's exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def test_a_stop_signal_once_the_daemon_is_ready_leaves_the_outcome_alone() -> None:
    """Ctrl-C just as ``kmsfs mount`` returned killed it with status 130 while its daemon went
    on serving the mount: a script's ``kmsfs mount ... || clean-up`` took the live mount for
    a failed one (found by review). Once the daemon said ready, the caller holds both."""
    proc = _run(
        "import os, signal, time\n"
        "from kmsfs.fs import daemon\n"
        "def child(ready):\n"
        "    ready()\n"
        "    time.sleep(0.5)\n"
        "rc = daemon.daemonize(child)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.1)\n"
        "print('returned', rc)\n"
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "returned 0\n", "")


def test_a_daemon_that_fails_reports_its_line_and_code() -> None:
    """The other outcome, for contrast: the child's error reaches the caller as one line and
    its exit code, and a stop signal after that changes neither."""
    proc = _run(
        "import os, signal, sys\n"
        "from kmsfs.errors import UsageError\n"
        "from kmsfs.fs import daemon\n"
        "def child(ready):\n"
        "    raise UsageError('no such mount point')\n"
        "rc = daemon.daemonize(child)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.exit(rc)\n"
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "kmsfs: error: no such mount point\n"


def test_a_second_signal_while_the_child_reports_never_unwinds_into_the_caller() -> None:
    """The child had a Ctrl-C from the terminal (before its setsid) and, while it reported
    that, the SIGTERM with which the parent calls it off: the second, raised in the child's
    handler, ran the caller's exit path in the child too (both "kmsfs: interrupted" and
    "kmsfs: terminated" printed; found by review). The child ends in os._exit, whatever lands."""
    proc = _run(
        "import os, signal, time\n"
        "from kmsfs.fs import daemon\n"
        "class Interrupted(KeyboardInterrupt):\n"
        "    def __str__(self):  # the child reports it: the parent's SIGTERM lands then\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.2)\n"
        "        return 'interrupted'\n"
        "def child(ready):\n"
        "    raise Interrupted\n"
        "try:\n"
        "    rc = daemon.daemonize(child)\n"
        "except BaseException as exc:\n"
        "    print('unwound', type(exc).__name__, flush=True)\n"
        "    raise SystemExit(99)\n"
        "print('returned', rc, flush=True)\n"
    )
    assert (proc.returncode, proc.stdout) == (0, "returned 1\n"), proc.stderr
