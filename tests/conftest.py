"""Fixtures shared by every test: a fresh key-management store per test or per module."""

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsfs import cliutil
from tests.kms_helpers import Admin

os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", "/tmp/kmsfs-hypothesis")
# Module-scoped fixtures run before the per-test record below: they get one of their own.
os.environ["KMSFS_STATE_DIR"] = tempfile.mkdtemp(prefix="kmsfs-test-state-")
atexit.register(shutil.rmtree, os.environ["KMSFS_STATE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def machine_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own record of the Domain generations "this machine" mounted
    (kmsfs.fs.seen), inherited by the commands it runs: never /var/lib/kmsfs/state."""
    state = tmp_path / "machine-state"
    monkeypatch.setenv("KMSFS_STATE_DIR", str(state))
    return state


@pytest.fixture(autouse=True)
def keep_this_process_dumpable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command run in this process (``cli.main`` in a test) would make pytest itself
    non-dumpable with a core limit of 0 for good (cliutil.run), and every daemon started
    afterwards would inherit the limit: a check that a daemon set it itself could not fail.
    The commands tests run as subprocesses set it for real."""
    monkeypatch.setattr(cliutil, "keep_memory_out_of_core_dumps", lambda: None)


@pytest.fixture
def admin(tmp_path: Path) -> Admin:
    """An empty place for a store (not initialized) with the real CLI bound to it."""
    return Admin.under(tmp_path)


@pytest.fixture
def initialized(admin: Admin) -> Admin:
    """A store with two embedded HSMs (hsm1, hsm2) and its genesis trust."""
    admin("init", "--hsms", "2")
    return admin


@pytest.fixture(scope="module")
def ceremony(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Admin]:
    """One store per test module: 3 HSMs, operators alice..erin (five), nothing else."""
    admin = Admin.under(tmp_path_factory.mktemp("ceremony"))
    admin("init", "--hsms", "3")
    admin.create_operators("alice", "bob", "carol", "dave", "erin")
    yield admin
