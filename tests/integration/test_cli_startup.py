"""The console scripts' start-up: a Ctrl-C while a tool still imports its modules.

The imports (cryptography, python-pkcs11, pyfuse3, trio) are most of a short command's time,
so a user's Ctrl-C often lands in them. It printed a KeyboardInterrupt traceback from deep in
some import; it must end the tool as a Ctrl-C does later on: one line, exit 130.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kmsfs import entry, exitcodes

REPO = Path(__file__).resolve().parents[2]

#: Each tool, its console-script function and the module whose import is held up.
TOOLS = [
    ("kmsfs", "kmsfs", "kmsfs.fs.cli"),
    ("kmsfs-admin", "kmsfs_admin", "kmsfs.admin.cli"),
    ("kmsfs-hsmd", "kmsfs_hsmd", "kmsfs.agent.cli"),
    ("mount.kmsfs", "mount_kmsfs", "kmsfs.fs.mounthelper"),
]

#: Runs one console-script function with the import of one module held up for a long time
#: (a meta path finder that sleeps), and says on stdout when it is held.
_HELD_IMPORT = """
import sys, time
from kmsfs import entry

class Slow:
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[2]:
            print("importing", flush=True)
            time.sleep(60)
        return None

sys.meta_path.insert(0, Slow())
sys.exit(getattr(entry, sys.argv[1])())
"""


def test_every_console_script_starts_through_the_entry_module() -> None:
    """The installed scripts are what a user runs: each must reach its tool through
    :mod:`kmsfs.entry`, not import the tool before the quiet Ctrl-C is in place."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {prog: f"kmsfs.entry:{func}" for prog, func, _ in TOOLS}
    for _, func, _ in TOOLS:
        assert callable(getattr(entry, func))


@pytest.mark.parametrize(("prog", "func", "module"), TOOLS, ids=[t[0] for t in TOOLS])
def test_ctrl_c_during_the_imports_is_one_line_and_exit_130(
    prog: str, func: str, module: str
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HELD_IMPORT, func, module],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        # A child of a non-interactive shell may start with SIGINT ignored; a user's does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "importing\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err) == (exitcodes.INTERRUPTED, f"{prog}: interrupted\n")
