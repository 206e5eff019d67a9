"""``kmsfs-admin domain import``: a Domain bundle (``domain export``, a backup, or the copy in a
ciphertext directory's kmsfs.conf) taken into a store, with real SoftHSM2 tokens.

The replica is a copy of the store made right after its operators were created: it has the
same HSMs and root, but none of the Trusts and Domains made since (a store restored from an
old backup, or a second site's). An import must verify everything against the replica's own
pinned root before it writes a byte, and write nothing the replica's history would not take.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmsfs import exitcodes
from kmsfs.store.documents import Store
from tests.kms_helpers import Admin, one_error_line, tree_snapshot


@dataclass
class Sites:
    main: Admin
    replica: Admin
    trust: str  # the Trust of payroll, sealed in main after the copy
    bundle: Path  # payroll exported from main


@pytest.fixture
def sites(initialized: Admin, tmp_path: Path) -> Sites:
    main = initialized
    main.create_operators("alice")
    replica = main.copy(tmp_path / "replica")
    trust = main.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
    main("domain", "create", "payroll", "--trust", trust)
    return Sites(main, replica, trust, main.export("payroll", tmp_path / "payroll.domain"))


def _public(admin: Admin) -> dict[str, bytes]:
    return {k: v for k, v in tree_snapshot(admin.store).items() if not k.startswith("private")}


def test_import_pins_when_asked_then_the_domain_verifies_in_the_replica(sites: Sites) -> None:
    r = sites.replica
    before = _public(r)
    refused = r("domain", "import", str(sites.bundle), check=exitcodes.VERIFICATION)
    line = one_error_line(refused)
    assert "has not pinned the genesis's successor" in line and sites.trust in line
    assert _public(r) == before  # nothing written: no trust, no domain, no pin

    done = r("--json", "domain", "import", str(sites.bundle), "--pin", sites.trust[:12]).json
    assert done["name"] == "payroll" and done["domain_added"] is True
    assert done["trusts_added"] == 1 and done["verified"] is True
    assert json.loads((r.store / "store.json").read_text())["successor"] == sites.trust
    assert r("--json", "domain", "verify", "payroll").json["id"] == done["id"]

    times = _directory_times(r.store)
    again = r("--json", "domain", "import", str(sites.bundle)).json  # idempotent
    assert again["domain_added"] is False and again["trusts_added"] == 0
    assert again["in_store"] is True
    # nothing written, not even a temporary file made and removed: a backup or sync tool
    # that watches directory times saw the store change at every import of the same bundle
    assert _directory_times(r.store) == times


def _directory_times(store: Path) -> dict[str, int]:
    """Each directory of *store* (its tokens aside: SoftHSM rewrites them at login) and its
    mtime."""
    return {str(d): d.stat().st_mtime_ns for d in (store, *store.rglob("*"))
            if d.is_dir() and "tokens" not in d.relative_to(store).parts}


def test_the_next_generation_imports_and_a_step_back_changes_nothing(sites: Sites) -> None:
    m, r = sites.main, sites.replica
    r("domain", "import", str(sites.bundle), "--pin", sites.trust)
    m("domain", "rotate", "payroll")
    newer = m.export("payroll", sites.bundle.with_name("payroll-2.domain"))
    out = r("domain", "import", str(newer)).stdout
    assert "generation 2" in out
    assert r("--json", "domain", "verify", "payroll").json["generation"] == 2
    # The older bundle again: the store holds it, nothing to write, the newest stays.
    r("domain", "import", str(sites.bundle))
    assert r("--json", "domain", "verify", "payroll").json["generation"] == 2


def test_a_generation_past_the_next_is_refused_naming_the_import(sites: Sites) -> None:
    """The refusal blamed "the volume's copy of the domain": the input is a bundle file."""
    m, r = sites.main, sites.replica
    r("domain", "import", str(sites.bundle), "--pin", sites.trust)
    m("domain", "rotate", "payroll")
    m("domain", "rotate", "payroll")
    third = m.export("payroll", sites.bundle.with_name("payroll-3.domain"))
    before = _public(r)
    line = one_error_line(r("domain", "import", str(third), check=None))
    assert "the imported domain is not in the store's history" in line, line
    assert "volume" not in line, line
    assert _public(r) == before


def test_a_tampered_or_foreign_bundle_is_refused_and_nothing_is_written(
    sites: Sites, tmp_path: Path
) -> None:
    r = sites.replica
    doc = json.loads(sites.bundle.read_text())
    doc["domain"]["domain"]["name"] = "evil"  # the seal no longer covers it
    forged = tmp_path / "forged.domain"
    forged.write_text(json.dumps(doc))
    other = Admin(tmp_path / "other", sites.main.pins)
    other("init", "--hsms", "1")
    other.create_operators("alice")
    foreign_trust = other.sealed_trust(["hsm1"], ["alice"], 1)
    other("domain", "create", "payroll", "--trust", foreign_trust)
    foreign = other.export("payroll", tmp_path / "foreign.domain")
    garbage = tmp_path / "garbage.domain"
    garbage.write_text("{not json")

    before = _public(r)
    for path, pin, want in (
        (forged, sites.trust, "seal"),
        (foreign, foreign_trust, "another store"),
        (garbage, None, str(garbage)),
        (tmp_path / "missing.domain", None, "missing.domain"),
    ):
        args = ["domain", "import", str(path)] + (["--pin", pin] if pin else [])
        result = r(*args, check=None)
        assert result.returncode != 0, args
        assert want in one_error_line(result), (args, result.stderr)
    assert _public(r) == before


def test_a_bundle_of_another_store_is_named_so_before_any_pin_is_asked_for(
    sites: Sites, tmp_path: Path
) -> None:
    """Into an unrelated store it said "has not pinned the genesis's successor ... pin it with
    --pin"; with --pin it then said the chain starts at another root. The root comes first."""
    other = Admin(tmp_path / "other", sites.main.pins)
    other("init", "--hsms", "1")
    before = _public(other)
    for pin in ([], ["--pin", sites.trust]):
        result = other("domain", "import", str(sites.bundle), *pin,
                       check=exitcodes.VERIFICATION)
        line = one_error_line(result)
        assert "but this store pins root" in line and "another store" in line, line
        assert "pin" not in line.split("pins root")[0] and "--pin" not in line, line
    # nothing written but the store's (empty) lock file, which the import held while checking
    assert {k: v for k, v in _public(other).items() if k != ".lock"} == before


def test_a_missing_input_file_is_a_usage_error_naming_it(sites: Sites, tmp_path: Path) -> None:
    """It was exit 6, the store's code, although the store was fine."""
    r = sites.replica
    missing = tmp_path / "nonexistent.domain"
    before = _public(r)
    line = one_error_line(r("domain", "import", str(missing), check=exitcodes.USAGE))
    assert line == f"kmsfs-admin: error: {missing}: No such file or directory"
    assert _public(r) == before


def test_a_pin_that_is_not_the_bundles_is_refused(sites: Sites) -> None:
    r = sites.replica
    before = _public(r)
    result = r("domain", "import", str(sites.bundle), "--pin", "0" * 64, check=exitcodes.USAGE)
    assert sites.trust in one_error_line(result)
    assert _public(r) == before


def test_import_from_a_ciphertext_directory(sites: Sites, tmp_path: Path) -> None:
    """The copy of the Domain a volume carries is enough to restore it into a store."""
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    subprocess.run(
        [sys.executable, "-m", "kmsfs.fs.cli", "init", str(cipher), "--domain", "payroll",
         "--store", str(sites.main.store)],
        check=True, capture_output=True, timeout=120,
    )
    r = sites.replica
    r("domain", "import", str(cipher), "--pin", sites.trust)
    assert r("--json", "domain", "verify", "payroll").json["verified"] is True



def test_a_damaged_signature_in_the_way_is_replaced_by_the_import(sites: Sites) -> None:
    """An invalid seal at the place the bundle's valid one takes was kept (documents are never
    overwritten): first the import said "verified" and wrote a Domain the store then refused;
    then it refused the import. A signature that does not verify is no document to keep: the
    bundle's valid one replaces it, and the store verifies the Domain."""
    r = sites.replica
    r("domain", "import", str(sites.bundle), "--pin", sites.trust)
    for d in (r.store / "domains").iterdir():
        d.unlink()  # the replica lost its Domain ...
    (seal_path,) = list((r.store / "seals" / sites.trust).iterdir())
    seal = Store(r.store).signatures("seal", sites.trust)[0]
    seal_path.unlink()  # ... and its Trust's seal is damaged
    Store(r.store).save_signature("seal", dataclasses.replace(seal, value=bytes(len(seal.value))))
    done = r("domain", "import", str(sites.bundle))
    assert "a seal that does not verify was there (planted?): replaced" in done.stderr
    assert Store(r.store).signatures("seal", sites.trust) == [seal]
    r("domain", "verify", "payroll")


@pytest.mark.parametrize("command", [["domain", "import", "x.domain"],
                                     ["operator", "change-pin", "alice"]])
def test_commands_of_this_hosts_store_refuse_agent(initialized: Admin, tmp_path: Path,
                                                   command: list[str]) -> None:
    """--agent was ignored: they acted on this host's store while the user meant the agent's."""
    before = tree_snapshot(initialized.store)
    result = initialized("--agent", str(tmp_path / "agent.sock"), *command, check=exitcodes.USAGE)
    assert "works on a store of this host" in one_error_line(result)
    assert tree_snapshot(initialized.store) == before


def test_an_invalid_approval_planted_in_the_replica_is_replaced_by_the_import(
    sites: Sites,
) -> None:
    """Approvals are named by their signer: one a hostile replica planted at alice's name
    (well-formed, its signature not hers) was kept, and the import's chain then did not
    verify from the replica's own documents."""
    r = sites.replica
    alice = Store(r.store).operator("alice").key.key_id
    planted = r.store / "approvals" / sites.trust / f"{alice}.json"
    planted.parent.mkdir(parents=True)
    planted.write_text(json.dumps({"_type": "approval", "subject": sites.trust, "key_id": alice,
                                   "signature": base64.b64encode(bytes(64)).decode()}))
    done = r("domain", "import", str(sites.bundle), "--pin", sites.trust[:12])
    assert "does not verify was there (planted?): replaced" in done.stderr
    r("domain", "verify", "payroll")
    r("trust", "verify", sites.trust)
