"""A store read where it cannot be written (DESIGN.md section 2, property 6), with real SoftHSM
tokens and real mounts: a read-only bind mount of the store (another path, so the SoftHSM config
it records names another token directory) and the store remounted read-only at its own path.
Reads work and write nothing into the store; a write fails with one line naming the store and
exit 6, never a raw ``[Errno 30]`` and exit 1.

Found with the real SoftHSM2: C_Login, signing and unwrapping work on a read-only token
directory (SoftHSM2 leaves the token's PIN-count flags unwritten), so a read-only store is
fully usable for what only reads.
"""

import contextlib
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmsfs import exitcodes
from tests.kms_helpers import Admin, Result, one_error_line, tree_snapshot

KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")


@dataclass(frozen=True)
class Setup:
    admin: Admin  # the store, writable at its own path
    trust: str  # the sealed trust of Domain payroll
    pending: str  # a successor trust that bob has not signed yet
    volume: Path  # a volume of Domain payroll


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = tmp_path_factory.mktemp("readonly")
    admin = Admin.under(root)
    admin("init", "--hsms", "2")
    trust = admin.real_domain()  # alice, trust of hsm1 + hsm2, Domain payroll
    admin.create_operators("bob")
    pending = admin.propose(["hsm1", "hsm2"], ["alice", "bob"], 2, predecessor=trust)
    volume = root / "cipher"
    proc = kmsfs("init", str(volume), "--domain", "payroll", "--store", str(admin.store))
    assert proc.returncode == 0, proc.stderr
    return Setup(admin, trust, pending, volume)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The commands' environment: a runtime directory of the test's own, where a config for
    a read-only store's tokens goes (not the machine's /tmp/kmsfs-UID)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    drop = ("KMSFS_STORE", "SOFTHSM2_CONF")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"XDG_RUNTIME_DIR": str(run)}


def kmsfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KMSFS, *args], capture_output=True, text=True, timeout=120, check=False, env=env
    )


@contextlib.contextmanager
def read_only(source: Path, target: Path) -> Iterator[Path]:
    """*source* bind-mounted read-only at *target* (which may be *source* itself)."""
    target.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def assert_store_error(result: Result, store: Path) -> str:
    """Exit 6 and one line that names the store, with no raw errno in it."""
    line = one_error_line(result)
    assert result.returncode == exitcodes.STORE, line
    assert str(store) in line and "Errno" not in line, line
    return line


def test_bind_mount_serves_reads_and_writes_nothing(
    setup: Setup, env: dict[str, str], tmp_path: Path
) -> None:
    """verify, info, encrypt/decrypt (the HSM unwraps) and mount from another, read-only path:
    the stale SoftHSM config is not rewritten; one outside the store (0600, in a 0700
    directory of the user, naming the token directory only) serves instead."""
    before = tree_snapshot(setup.admin.store)
    plain, sealed = tmp_path / "plain", tmp_path / "sealed"
    plain.write_bytes(b"payroll data\n")
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with read_only(setup.admin.store, tmp_path / "rostore") as ro:
        store = ["--store", str(ro)]
        Admin(ro, setup.admin.pins)("domain", "verify", "payroll", env=env)
        assert kmsfs("info", str(setup.volume), *store, env=env).returncode == 0
        proc = kmsfs("encrypt", str(plain), str(sealed), "--domain", "payroll", *store, env=env)
        assert proc.returncode == 0, proc.stderr
        proc = kmsfs("decrypt", str(sealed), "-", *store, env=env)
        assert (proc.returncode, proc.stdout) == (0, "payroll data\n"), proc.stderr
        proc = kmsfs("mount", str(setup.volume), str(mountpoint), *store, env=env)
        assert proc.returncode == 0, proc.stderr
        try:
            (mountpoint / "f").write_text("hello\n")
            assert (mountpoint / "f").read_text() == "hello\n"
        finally:
            assert kmsfs("umount", str(mountpoint), env=env).returncode == 0
    assert tree_snapshot(setup.admin.store) == before
    run = Path(env["XDG_RUNTIME_DIR"]) / "kmsfs"
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    (conf,) = run.glob("softhsm2-*.conf")
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert f"directories.tokendir = {ro.resolve()}/private/tokens\n" in conf.read_text()


def test_bind_mount_refuses_writes_with_exit_6(
    setup: Setup, env: dict[str, str], tmp_path: Path
) -> None:
    """trust sign (its approval goes into the store) and domain create: one line naming the
    read-only store, exit 6, nothing changed."""
    before = tree_snapshot(setup.admin.store)
    with read_only(setup.admin.store, tmp_path / "rostore") as ro:
        admin = Admin(ro, setup.admin.pins)
        pin = ["--pin-file", admin.pin_file("bob")]
        signed = admin("trust", "sign", setup.pending, "--as", "bob", *pin, check=None, env=env)
        assert_store_error(signed, ro)
        created = admin("domain", "create", "other", "--trust", setup.trust, check=None,
                        env=env)
        assert_store_error(created, ro)
    assert tree_snapshot(setup.admin.store) == before


def test_store_read_only_at_its_own_path(setup: Setup, env: dict[str, str]) -> None:
    """The store itself remounted read-only (its config is current): reads work, trust sign
    fails with exit 6 naming the store, nothing changed."""
    store = setup.admin.store
    before = tree_snapshot(store)
    with read_only(store, store):
        setup.admin("domain", "verify", "payroll", env=env)
        assert kmsfs("info", str(setup.volume), "--store", str(store), env=env).returncode == 0
        pin = ["--pin-file", setup.admin.pin_file("bob")]
        signed = setup.admin(
            "trust", "sign", setup.pending, "--as", "bob", *pin, check=None, env=env
        )
        assert_store_error(signed, store)
    assert tree_snapshot(store) == before


def test_trust_sign_refuses_before_the_pin(
    setup: Setup, env: dict[str, str], tmp_path: Path
) -> None:
    """A wrong PIN is never tried on a read-only store (exit 6, not 5): the store is checked
    for writing before the PIN is read and the operator's token signs."""
    with read_only(setup.admin.store, tmp_path / "rostore") as ro:
        wrong = tmp_path / "wrong.pin"
        wrong.write_text("not-bobs-pin-0000\n")
        wrong.chmod(0o600)
        admin = Admin(ro, setup.admin.pins)
        signed = admin(
            "trust", "sign", setup.pending, "--as", "bob", "--pin-file", str(wrong),
            check=None, env=env,
        )
        line = assert_store_error(signed, ro)
        assert "cannot write an approval: the store is on a read-only file system" in line


def test_operator_create_refuses_before_the_pin(
    setup: Setup, env: dict[str, str], tmp_path: Path
) -> None:
    """operator create asked for the new PIN (or passphrase) first and only then found it
    could not lock a read-only store: it refuses before any prompt, exit 6, nothing changed."""
    before = tree_snapshot(setup.admin.store)
    with read_only(setup.admin.store, tmp_path / "rostore") as ro:
        admin = Admin(ro, setup.admin.pins)
        # No --pin-file and no terminal: reading a PIN would fail with exit 5 instead.
        made = admin("operator", "create", "carol", check=None, env=env)
        line = assert_store_error(made, ro)
        assert "cannot write a new operator" in line
    assert tree_snapshot(setup.admin.store) == before
