"""A Domain made under a forced Trust is refused at every entry point (DESIGN.md §2.2, §2.3).

The dishonest party holds what it would really hold: an HSM's PIN (so the HSM signs anything:
the seal of a Trust its predecessor's quorum never approved, and a Domain under it, keys made
inside the HSM and all) and write access to a ciphertext directory, or to the store too (the
forged documents planted in a copy of it). The chain
verifier is shared code, tested on its own (tests/unit/test_model_chain.py, the quorum
matrix); this module checks that each way in reaches it before a key is derived: the store's
commands, ``kmsfs init``, ``mount`` (by its store and through the agent), ``encrypt``,
``info``, and the agent's own ``derive``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmsfs import exitcodes
from kmsfs.agent.client import AgentDeriver
from kmsfs.errors import QuorumNotMetError
from kmsfs.fs import config as volconfig
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.trust import SealedTrust
from kmsfs.service import domains, hsms, trusts
from kmsfs.service.context import Context, open_hsm
from tests.integration.agent_helpers import AgentProcess, root_policy
from tests.kms_helpers import Admin, hsm_seal, one_error_line

KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]


@dataclass
class Forged:
    admin: Admin  # the store: the coup proposal and mallory's approval, not what was forged
    planted: Admin  # a copy of it, into which the forged seal and Domain were written too
    bundle: DomainBundle  # the forged Domain "coup" with its chain, as a volume would carry it
    coup: str  # mallory's successor of the honest Trust: her approval only, sealed by hsm1


def _forge(admin: Admin, coup_id: str) -> DomainBundle:
    """Seal *coup_id* with hsm1 and make Domain "coup" under it with that HSM, as ``trust
    seal`` and ``domain create`` would, less their checks; nothing is written."""
    ctx = Context.at(admin.store)
    coup = ctx.store.trust(coup_id)
    seal = hsm_seal(admin.store, coup_id, "hsm1")
    with open_hsm(ctx, [hsms.resolve_hsm(ctx, "hsm1")]) as hsm:
        sealed = domains.new_domain(hsm, "coup", coup, ctx.store.anchor().root)
    approvals = tuple(ctx.store.signatures("approval", coup.id))
    before = trusts.verified_chain(ctx, coup.predecessor or "")
    return DomainBundle(sealed, (*before, SealedTrust(coup, approvals, seal)))


@pytest.fixture(scope="module")
def forged(tmp_path_factory: pytest.TempPathFactory) -> Forged:
    root = tmp_path_factory.mktemp("forced")
    admin = Admin.under(root)
    admin("init", "--hsms", "2")
    admin.create_operators("alice", "bob", "mallory")
    honest = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 2)
    admin("domain", "create", "payroll", "--trust", honest)
    coup = admin.propose(["hsm1"], ["mallory"], 1, predecessor=honest)
    admin.sign(coup, "mallory")  # her own quorum, not alice's and bob's
    bundle = _forge(admin, coup)
    planted = admin.copy(root / "planted")
    store = Context.at(planted.store).store
    store.save_signature("seal", bundle.chain[-1].seal)
    store.save_domain(bundle.domain)
    return Forged(admin, planted, bundle, coup)


def kmsfs(store: Admin, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KMSFS, *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "KMSFS_STORE": str(store.store)},
    )


def _mount_refused(store: Admin, mountpoint: Path, *args: str) -> None:
    """``kmsfs mount ARGS MOUNTPOINT`` refused, nothing mounted (and if it was, unmounted)."""
    mountpoint.mkdir()
    try:
        _refused(kmsfs(store, "mount", *args, str(mountpoint)))
    finally:
        mounted = os.path.ismount(mountpoint)
        if mounted:
            subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
    assert not mounted


def _refused(result: subprocess.CompletedProcess[str]) -> str:
    """Exit 3 (verification) with one line that says whose quorum is missing."""
    assert result.returncode == exitcodes.VERIFICATION, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmsfs: error: "), lines
    assert "quorum not met" in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def crafted(forged: Forged, tmp_path: Path) -> Path:
    """A real volume of "payroll", copied to a path this machine never saw (no record of its
    Domain: first use), its kmsfs.conf then pointed at the forged Domain, consistently."""
    made = tmp_path / "made"
    result = kmsfs(forged.admin, "init", str(made), "--domain", "payroll")
    assert result.returncode == 0, result.stderr
    volume = tmp_path / "crafted"
    shutil.copytree(made, volume, symlinks=True)
    config = volconfig.load(volume)
    volconfig.save(volume, dataclasses.replace(
        config, domain_name="coup", domain_id=forged.bundle.domain.id,
        domain_bundle=forged.bundle.to_bytes(),
    ))
    volconfig.load(volume).validate()  # the file itself is well formed: only the chain fails
    return volume


def test_the_store_refuses_the_forged_trust_and_domain(forged: Forged) -> None:
    """Planted in the store, they verify nowhere; nor do they supersede the honest Trust."""
    planted = forged.planted
    for args in (("trust", "verify", forged.coup), ("domain", "verify", "coup"),
                 ("domain", "export", "coup"), ("domain", "rotate", "coup")):
        result = planted(*args, check=exitcodes.VERIFICATION)
        assert "quorum not met" in one_error_line(result), args
    honest = planted("--json", "domain", "verify", "payroll").json
    assert honest["verified"] is True and honest["superseded_by"] is None


def test_init_and_encrypt_refuse_the_forged_domain(forged: Forged, tmp_path: Path) -> None:
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    _refused(kmsfs(forged.planted, "init", str(cipher), "--domain", "coup"))
    assert os.listdir(cipher) == []  # nothing bound
    plain = tmp_path / "plain.txt"
    plain.write_text("secret\n")
    out = tmp_path / "out"
    _refused(kmsfs(forged.planted, "encrypt", "--domain", "coup", str(plain), str(out)))
    assert not out.exists()


def test_mount_and_info_refuse_a_volume_carrying_it(
    forged: Forged, crafted: Path, tmp_path: Path
) -> None:
    _mount_refused(forged.admin, tmp_path / "mnt", str(crafted))
    info = kmsfs(forged.admin, "info", "--json", str(crafted))
    assert info.returncode == 0, info.stderr  # info reports; it derives nothing
    shown = json.loads(info.stdout)
    assert shown["verified"] is False and "quorum not met" in shown["problem"]


def test_the_agent_refuses_it(forged: Forged, crafted: Path, tmp_path: Path) -> None:
    agent = AgentProcess(forged.admin.store, tmp_path / "agent", root_policy()).start()
    try:
        with agent.client() as client, pytest.raises(QuorumNotMetError):
            AgentDeriver(client, forged.bundle.to_bytes()).open()
        _mount_refused(forged.admin, tmp_path / "mnt", "--agent", agent.address, str(crafted))
    finally:
        agent.stop()
    assert "Traceback" not in agent.log(), agent.log()
