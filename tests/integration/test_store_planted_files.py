"""Files a hostile replica plants in the store's public tree: ``rsync -a`` (and so a union
merge) copies FIFOs, symbolic links and directories as they are. Each is named, never a hang,
and nothing is read or written through it; where an approval or seal belongs, it is left out
with a warning, as no signature can be one."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kmsfs import exitcodes
from kmsfs.store.documents import Store
from tests.integration.fault_helpers import clean_env
from tests.kms_helpers import Admin, one_error_line


@pytest.fixture
def proposed(initialized: Admin) -> tuple[Admin, str]:
    """A store with operators alice and bob and a Trust (quorum 1) proposed, not yet signed."""
    initialized.create_operators("alice", "bob")
    return initialized, initialized.propose(["hsm1"], ["alice", "bob"], 1)


def _planted_approval(admin: Admin, trust: str) -> Path:
    directory = admin.store / "approvals" / trust
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{'ab' * 32}.json"


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_planted_special_file_is_named_never_a_hang(
    proposed: tuple[Admin, str], tmp_path: Path, kind: str
) -> None:
    admin, trust = proposed
    planted = _planted_approval(admin, trust)
    if kind == "fifo":
        os.mkfifo(planted)  # opening it for reading waited for a writer: every command hung
    elif kind == "symlink":
        outside = tmp_path / "elsewhere.json"
        outside.write_text("{}")
        planted.symlink_to(outside)
    else:
        planted.mkdir()
    # Named in a warning and left out, never opened: it is no approval (the Trust has none)
    shown = admin("trust", "show", trust)
    assert str(planted) in shown.stderr and "where a regular file belongs" in shown.stderr
    assert "left out: it cannot be an approval" in shown.stderr
    refused = admin("trust", "seal", trust, check=exitcodes.VERIFICATION).stderr.splitlines()
    assert len(refused) == 2 and str(planted) in refused[0], refused  # the warning, then:
    assert refused[1].startswith("kmsfs-admin: error: ") and "quorum not met" in refused[1]


def test_a_symlinked_store_directory_is_not_written_through(
    proposed: tuple[Admin, str], tmp_path: Path
) -> None:
    """A replica's ``approvals/<trust>`` that is a link to a directory outside the store took
    ``trust sign``'s approval there, written as root. The link is removed, not followed, and
    the approval lands in a directory of the store's own."""
    admin, trust = proposed
    outside = tmp_path / "outside"
    outside.mkdir()
    # The store's own approvals/ as a link is refused: only a signature's slot is replaced.
    assert not (admin.store / "approvals").exists()
    (admin.store / "approvals").symlink_to(outside)
    refused = admin("trust", "sign", trust, "--as", "alice", "--pin-file",
                    admin.pin_file("alice"), check=exitcodes.STORE)
    assert "a symbolic link inside the store" in one_error_line(refused)
    assert list(outside.iterdir()) == []
    (admin.store / "approvals").unlink()
    (admin.store / "approvals").mkdir()
    folder = admin.store / "approvals" / trust
    folder.symlink_to(outside)
    signed = admin("trust", "sign", trust, "--as", "alice", "--pin-file",
                   admin.pin_file("alice"))
    assert f"{folder}: a symbolic link where a approval belongs" not in signed.stderr
    assert f"{folder}: a symbolic link where an approval belongs (planted?): removed" in (
        signed.stderr)
    assert list(outside.iterdir()) == []
    assert folder.is_dir() and not folder.is_symlink() and len(list(folder.iterdir())) == 1


@pytest.mark.parametrize("kind", ["fifo", "directory", "file-as-folder"])
def test_a_planted_file_where_a_signature_goes_does_not_stop_sign_or_seal(
    proposed: tuple[Admin, str], kind: str
) -> None:
    """Review: a FIFO or a directory planted at a signer's name (``approvals/<T>/<key id>.json``
    or ``seals/<T>/<hsm id>.json``), or a file where the folder ``approvals/<T>`` belongs,
    made `trust sign` and `trust seal` fail after the token or HSM had signed: a FIFO at every
    HSM's name kept a revocation from ever being sealed there. Each is removed, with a
    warning naming it, and the signature written."""
    admin, trust = proposed
    store = Store(admin.store)
    alice = store.operator("alice").key.key_id
    hsm1 = next(store.hsm(i) for i in store.hsm_ids() if store.hsm(i).label == "hsm1").id
    planted = []
    for folder, key_id in (("approvals", alice), ("seals", hsm1)):
        directory = admin.store / folder / trust
        if kind == "file-as-folder":
            directory.parent.mkdir(exist_ok=True)
            directory.write_text("garbage")
            planted.append(directory)
            continue
        directory.mkdir(parents=True)
        there = directory / f"{key_id}.json"
        os.mkfifo(there) if kind == "fifo" else there.mkdir()
        planted.append(there)
    shown = admin("trust", "show", trust)  # reading leaves them out, with a warning
    assert str(planted[0]) in shown.stderr
    signed = admin("trust", "sign", trust, "--as", "alice", "--pin-file", admin.pin_file("alice"))
    assert f"{planted[0]}: " in signed.stderr and "(planted?): removed" in signed.stderr
    sealed = admin("trust", "seal", trust)
    assert "trust sealed by HSM hsm1" in sealed.stdout
    assert f"{planted[1]}: " in sealed.stderr and "(planted?): removed" in sealed.stderr
    admin("trust", "verify", trust)


def _squat(admin: Admin, folder: str, trust: str, key_id: str) -> Path:
    """A well-formed signature document at *key_id*'s name whose signature is not one."""
    directory = admin.store / folder / trust
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key_id}.json"
    kind = {"approvals": "approval", "seals": "seal"}[folder]
    path.write_text(json.dumps({"_type": kind, "subject": trust, "key_id": key_id,
                                "signature": base64.b64encode(os.urandom(64)).decode()}))
    return path


def test_a_signature_planted_at_a_signers_name_does_not_keep_the_real_one_out(
    proposed: tuple[Admin, str]
) -> None:
    """Approvals and seals are named by their signer: a bad one a replica planted first made
    `trust sign` fail after alice's token had signed, and could keep a Trust (a revocation)
    from ever being sealed in that store."""
    admin, trust = proposed
    store = Store(admin.store)
    alice = store.operator("alice").key.key_id
    hsm1 = next(store.hsm(i) for i in store.hsm_ids() if store.hsm(i).label == "hsm1").id
    approval = _squat(admin, "approvals", trust, alice)
    seal = _squat(admin, "seals", trust, hsm1)
    signed = admin("trust", "sign", trust, "--as", "alice", "--pin-file", admin.pin_file("alice"))
    assert "does not verify was there (planted?): replaced" in signed.stderr
    sealed = admin("trust", "seal", trust)
    assert "does not verify was there (planted?): replaced" in sealed.stderr
    admin("trust", "verify", trust)  # quorum 1: alice's approval at her name, and the seal
    assert approval.exists() and seal.exists()


def test_a_planted_unparseable_approval_does_not_stop_the_trust(
    proposed: tuple[Admin, str]
) -> None:
    """Review (threat-model.md §2, "still open"): a document that does not parse, planted
    among a Trust's approvals under a name no signer has, made every command that read the
    Trust fail (exit 7), the honest quorum notwithstanding: whoever could write the store
    could stop a revocation. It is left out with a warning naming it."""
    admin, trust = proposed
    admin.sign(trust, "alice")
    planted = _planted_approval(admin, trust)
    planted.write_text('{"_type": "approval", "subj')  # cut short, or garbage
    sealed = admin("trust", "seal", trust)
    assert "trust sealed by HSM hsm1" in sealed.stdout
    assert f"{planted}: not JSON" in sealed.stderr and "left out" in sealed.stderr
    admin("trust", "verify", trust)
    assert planted.exists()  # named for the operators to remove, not removed behind them
    # kmsfs says so as its own warnings read (it printed the bare message).
    admin("domain", "create", "payroll", "--trust", trust)
    source = admin.store.parent / "plain"
    source.write_text("x")
    done = subprocess.run(
        [sys.executable, "-m", "kmsfs.fs.cli", "encrypt", "--domain", "payroll", str(source),
         str(source) + ".enc"], capture_output=True, text=True, timeout=120, check=False,
        env=clean_env(KMSFS_STORE=str(admin.store)),
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"kmsfs: warning: {planted}: not JSON"), done.stderr
