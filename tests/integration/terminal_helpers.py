"""A command run at a terminal, for the prompts of kmsfs-admin (PINs, passphrases)."""

from __future__ import annotations

import os
import select
import subprocess

from tests.integration.fault_helpers import clean_env
from tests.kms_helpers import Result


def at_terminal(command: list[str], keys: list[bytes]) -> Result:
    """*command* with a pseudo-terminal as stdin and no controlling terminal (getpass then
    reads stdin and prompts on stderr): each of *keys* (a line with its newline, or b"\\x04"
    for Ctrl-D) is typed once the prompt before it shows. Its stderr comes back with the
    prompts in it, each ended as the terminal would show it."""
    master, slave = os.openpty()
    proc = subprocess.Popen(
        command, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
        start_new_session=True,
    )
    try:
        os.close(slave)
        assert proc.stderr is not None
        seen = b""
        for typed in keys:
            while not seen.endswith(b": "):
                ready, _, _ = select.select([proc.stderr], [], [], 60)
                chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
                assert chunk, f"no prompt: {seen!r}"
                seen += chunk
            seen += b"\n"  # the next prompt follows what this one got
            os.write(master, typed)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    return Result(proc.returncode, out.decode(), (seen + err).decode())
