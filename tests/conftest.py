"""Fixtures shared by every test: a fresh key-management store per test or per module."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kms_helpers import Admin

os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", "/tmp/kmsfs-hypothesis")


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
