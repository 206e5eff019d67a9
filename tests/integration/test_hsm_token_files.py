"""Several processes on one store's SoftHSM2 tokens at once, on real SoftHSM2.

SoftHSM2's file backend rewrites ``token.object`` on every login. A process that initializes
the module meanwhile can misread the serial numbers of the tokens being rewritten, give two of
them one slot id and abort (``SlotManager.cpp: Assertion `result.second' failed``): CI saw it
when four operators signed a Trust at once. kmsfs serializes those steps across processes
with a lock file (``library.token_files_lock``).
"""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kmsfs.hsm import library, softhsm

PIN = "test-only-pin-0000"
ROOT = Path(__file__).resolve().parents[2]

# Logs in to token sys.argv[1] again and again for sys.argv[3] seconds; prints "ready" first
# and the number of logins last.
LOGIN_LOOP = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from kmsfs.hsm import library, softhsm
location = library.TokenLocation(softhsm.default_module(), sys.argv[1], sys.argv[2])
print("ready", flush=True)
end, logins = time.monotonic() + float(sys.argv[3]), 0
while True:
    with library.session(location, {PIN!r}):
        logins += 1
    if time.monotonic() >= end:
        break
print(logins, flush=True)
"""

# Re-initializes the module (SoftHSM2 rereads every token) for sys.argv[2] seconds.
RESCAN_LOOP = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from kmsfs.hsm import library, softhsm
location = library.TokenLocation(softhsm.default_module(), "t0", sys.argv[1])
end, rescans = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    library.refresh(location)
    rescans += 1
print(rescans, flush=True)
"""


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    """A SoftHSM2 config with four tokens t0..t3 whose user PIN is PIN."""
    conf = tmp_path / "private" / "softhsm2.conf"
    conf.parent.mkdir(mode=0o700)
    softhsm.write_config(conf, tmp_path / "private" / "tokens")
    for i in range(4):
        softhsm.create_token(conf, f"t{i}", PIN)
    return conf


def _python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_logins_and_rescans_in_many_processes_never_abort(tokens: Path) -> None:
    # Without the lock, SoftHSM2 aborted the rescanning process within 5 s in 6 runs of 6.
    seconds = "5"
    logins = [_python(LOGIN_LOOP, f"t{i}", str(tokens), seconds) for i in range(4)]
    rescans = _python(RESCAN_LOOP, str(tokens), seconds)
    for proc in [rescans, *logins]:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-500:]
        assert int(out.split()[-1]) > 0  # it did work, not just start


def test_a_login_waits_for_the_process_that_holds_the_token_files(tokens: Path) -> None:
    with library.token_files_lock(str(tokens)):
        login = _python(LOGIN_LOOP, "t1", str(tokens), "0")
        assert login.stdout is not None
        assert login.stdout.readline().strip() == "ready"
        ready, _, _ = select.select([login.stdout], [], [], 1.0)
        assert not ready and login.poll() is None, "logged in while the lock was held"
    started = time.monotonic()
    out, err = login.communicate(timeout=60)
    assert login.returncode == 0, err[-500:]
    assert out.split() == ["1"]
    assert time.monotonic() - started < 30


@pytest.mark.timeout(60)  # a lock that waited for its own holder would hang here
def test_the_lock_is_reentrant_in_one_process(tokens: Path) -> None:
    location = library.TokenLocation(softhsm.default_module(), "t2", str(tokens))
    with library.token_files_lock(str(tokens)), library.session(location, PIN):
        pass  # a login inside a held lock takes it again instead of waiting for itself
    with library.session(location, PIN):
        pass  # and the lock was given back
