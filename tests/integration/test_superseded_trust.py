"""Nothing new under a Trust that a successor replaced (DESIGN.md §2.3, revocation).

Operators revoke an HSM by sealing a successor Trust without it, then rewrapping each Domain.
Until then the removed HSM still holds its keys, and under the older Trust it alone could seal
a new Domain (with an mk it knows) that verifies, or the tool would make one on request. So:
no Domain, rotation or new volume under a superseded Trust; volumes bound before keep mounting,
with a warning, until the rewrap.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmsfs.service.context import Context
from tests.kms_helpers import Admin, one_error_line, tree_snapshot

KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]


def kmsfs(admin: Admin, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KMSFS_STORE": str(admin.store)}
    return subprocess.run([*KMSFS, *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture
def superseded(initialized: Admin) -> tuple[Admin, str, str]:
    """Domain payroll under T1 (hsm1, hsm2); then T2 succeeds T1 without hsm2."""
    admin = initialized
    t1 = admin.real_domain()
    t2 = admin.sealed_trust(["hsm1"], ["alice"], 1, predecessor=t1)
    return admin, t1, t2


def test_no_domain_is_created_under_a_superseded_trust(superseded: tuple[Admin, str, str]) -> None:
    admin, t1, t2 = superseded
    before = tree_snapshot(admin.store / "domains")
    line = one_error_line(admin("domain", "create", "late", "--trust", t1, check=2))
    assert f"trust {t1[:12]} is superseded by trust {t2[:12]}" in line
    assert tree_snapshot(admin.store / "domains") == before
    admin("domain", "create", "late", "--trust", t2)


def test_a_domain_is_rotated_only_once_rewrapped_into_the_successor(
    superseded: tuple[Admin, str, str],
) -> None:
    """A rotation under T1 would wrap the new mk under the k that hsm2 can unwrap."""
    admin, _, t2 = superseded
    before = tree_snapshot(admin.store / "domains")
    line = one_error_line(admin("domain", "rotate", "payroll", check=2))
    assert "rewrap it first" in line and f"--trust {t2[:12]}" in line
    assert tree_snapshot(admin.store / "domains") == before
    admin("domain", "rewrap", "payroll", "--trust", t2)
    admin("domain", "rotate", "payroll")


def test_domain_verify_says_a_rewrap_is_due_as_info_and_mount_do(
    superseded: tuple[Admin, str, str],
) -> None:
    """It said "verifies" and nothing more, while kmsfs info and mount named the successor."""
    admin, _, t2 = superseded
    said = admin("domain", "verify", "payroll").stdout
    assert f"superseded by trust {t2[:12]}" in said
    assert f"kmsfs-admin domain rewrap payroll --trust {t2[:12]}" in said
    assert admin("--json", "domain", "verify", "payroll").json["superseded_by"] == t2
    admin("domain", "rewrap", "payroll", "--trust", t2)
    assert "superseded" not in admin("domain", "verify", "payroll").stdout
    assert admin("--json", "domain", "verify", "payroll").json["superseded_by"] is None


def test_no_new_volume_until_the_rewrap_but_bound_ones_mount_with_a_warning(
    superseded: tuple[Admin, str, str], tmp_path: Path
) -> None:
    admin, t1, t2 = superseded
    old, new, mnt = tmp_path / "old", tmp_path / "new", tmp_path / "mnt"
    # Bound while T1 governed: take the store back to before T2 for the init (a copy), as a
    # volume made last month would have been; its private area too, where T1 was then the
    # head of its line (a store that saw T2 refuses to lose it: test_line_head.py).
    snapshot = tmp_path / "store-before"
    subprocess.run(["cp", "-a", str(admin.store), str(snapshot)], check=True)
    for path in (snapshot / "trusts").iterdir():
        if path.name.startswith(t2):
            path.unlink()
    assert Context.at(snapshot).store.set_head(t1, expect=t2, decided=t1)
    earlier = Admin(snapshot, admin.pins)
    assert kmsfs(earlier, "init", str(old), "--domain", "payroll").returncode == 0

    new.mkdir()
    refused = kmsfs(admin, "init", str(new), "--domain", "payroll")
    assert refused.returncode == 2
    assert refused.stderr.startswith("kmsfs: error: Domain payroll is governed by trust ")
    assert f"supersedes: ask an operator to rewrap it (kmsfs-admin domain rewrap payroll " \
        f"--trust {t2[:12]})" in refused.stderr
    assert len(refused.stderr.splitlines()) == 1
    assert list(new.iterdir()) == []

    info = json.loads(kmsfs(admin, "info", str(old), "--json").stdout)
    assert info["superseded_by"] == t2
    mnt.mkdir()
    mounted = kmsfs(admin, "mount", str(old), str(mnt))
    assert mounted.returncode == 0, mounted.stderr
    try:
        assert mounted.stderr.startswith("kmsfs: warning: Domain payroll is governed by trust ")
        (mnt / "f").write_text("still served")
    finally:
        assert kmsfs(admin, "umount", str(mnt)).returncode == 0

    admin("domain", "rewrap", "payroll", "--trust", t2)
    assert kmsfs(admin, "init", str(new), "--domain", "payroll").returncode == 0
    remount = kmsfs(admin, "mount", str(old), str(mnt))
    assert remount.returncode == 0 and remount.stderr == "", remount.stderr
    try:
        assert (mnt / "f").read_text() == "still served"
    finally:
        assert kmsfs(admin, "umount", str(mnt)).returncode == 0
