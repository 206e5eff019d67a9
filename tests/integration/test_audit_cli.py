"""``kmsfs-admin audit verify|show`` through the real CLI, on logs checkpointed by a real
SoftHSM2 HSM of the store (docs/format.md, "Agent audit log"; docs/threat-model.md).

The signer is what the agent uses: ``open_hsm`` on the store's HSM records, ``HsmSession.sign``
and the serving record's id.
"""

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from kmsfs import exitcodes
from kmsfs.agent.audit import AuditLog, Signer, line_hash, signed_message
from kmsfs.errors import IntegrityError
from kmsfs.model import contexts
from kmsfs.model.canonical import b64encode, canonical_bytes
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.records import HsmRecord
from kmsfs.service.context import Context, open_hsm
from kmsfs.store.documents import Store
from tests.kms_helpers import Admin, one_error_line, self_signed


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Admin:
    """One store for the module: two embedded SoftHSM2 HSMs (hsm1, hsm2)."""
    root = tmp_path_factory.mktemp("audit")
    admin = Admin.under(root)
    admin("init", "--hsms", "2")
    return admin


@pytest.fixture(scope="module")
def hsm_signer(kms: Admin) -> Iterator[Signer]:
    ctx = Context.at(kms.store)
    records = sorted((ctx.store.hsm(i) for i in ctx.store.hsm_ids()), key=lambda r: r.label)
    with open_hsm(ctx, records) as hsm:
        yield lambda message: (hsm.record.id, hsm.sign(message))


@pytest.fixture
def log(tmp_path: Path, hsm_signer: Signer) -> Path:
    """13 records: events 0-3, checkpoint 4, events 5-8, checkpoint 9, events 10-11, cp 12."""
    path = tmp_path / "audit.log"
    with AuditLog(path, hsm_signer, checkpoint_every=4) as audit:
        for n in range(10):
            audit.append(
                who=f"uid:{1000 + n}",
                op="derive",
                domain="payroll",
                allowed=n != 6,
                reason="policy" if n != 6 else "not in the policy",
            )
    return path


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def write(path: Path, recs: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(canonical_bytes(r) + b"\n" for r in recs))


def test_an_intact_log_verifies(kms: Admin, log: Path) -> None:
    result = kms("audit", "verify", str(log))
    assert result.stdout.strip() == (
        f"audit log {log}: chain intact, 13 records, 3 checkpoints, last signed seq 12"
    )
    assert result.stderr == ""
    want = {
        "log": str(log),
        "ok": True,
        "records": 13,
        "checkpoints": 3,
        "last_signed_seq": 12,
        "unsigned_tail": 0,
        "problems": [],
    }
    assert kms("audit", "verify", str(log), "--json").json == want
    assert kms("--json", "audit", "verify", str(log)).json == want
    hsm_ids = {h["id"] for h in kms("--json", "hsm", "list").json}
    assert {r["hsm"] for r in records(log) if r["type"] == "checkpoint"} <= hsm_ids


def test_an_unsigned_tail_passes_with_a_warning(kms: Admin, log: Path) -> None:
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:-1]))
    result = kms("audit", "verify", str(log))
    assert "12 records, 2 checkpoints, last signed seq 9" in result.stdout
    assert result.stderr.strip() == (
        f"kmsfs-admin: warning: {log}: the last 2 records follow the last checkpoint and are "
        "not signed: a cut there would not show"
    )
    report = kms("--json", "audit", "verify", str(log)).json
    assert (report["ok"], report["unsigned_tail"], report["last_signed_seq"]) == (True, 2, 9)


def test_a_changed_record_exits_3_naming_it(kms: Admin, log: Path) -> None:
    recs = records(log)
    recs[7]["decision"] = "allowed"  # hide the refusal
    write(log, recs)
    result = kms("audit", "verify", str(log), check=exitcodes.VERIFICATION)
    assert result.stdout == ""
    assert result.stderr.splitlines()[0].startswith(
        f"kmsfs-admin: error: {log}: record 8 (line 9): prev is not the hash of record 7"
    )
    report = kms("audit", "verify", str(log), "--json", check=exitcodes.VERIFICATION).json
    assert report["ok"] is False and report["problems"][0].startswith("record 8 (line 9)")


def test_a_log_resigned_with_a_key_outside_the_store_exits_3(kms: Admin, log: Path) -> None:
    """Whoever can rewrite the file can relink the chain, but cannot sign as a store HSM."""
    rogue = ed25519.Ed25519PrivateKey.generate()
    recs = records(log)
    del recs[7]  # drop the refusal, relink, re-sign the checkpoints after it
    prev, rewritten = "0" * 64, []
    for seq, rec in enumerate(recs):
        rec = {**rec, "seq": seq, "prev": prev}
        if rec["type"] == "checkpoint" and seq > 7:
            rec["signature"] = b64encode(rogue.sign(signed_message(rec)))
        rewritten.append(rec)
        prev = line_hash(canonical_bytes(rec))
    write(log, rewritten)
    result = kms("audit", "verify", str(log), check=exitcodes.VERIFICATION)
    assert result.stderr.splitlines()[0].startswith(
        f"kmsfs-admin: error: {log}: record 8 (line 9): bad checkpoint signature"
    )


def test_a_log_resigned_by_an_hsm_record_planted_in_the_store_exits_3(
    kms: Admin, log: Path, tmp_path: Path
) -> None:
    """A store writer adds a self-signed HSM record of their own and re-signs with its key: the
    record is in ``hsms/``, but in no Trust that verifies from the pinned root."""
    store = tmp_path / "store-copy"
    shutil.copytree(kms.store, store)
    rogue = ed25519.Ed25519PrivateKey.generate()
    real = Store(store).hsm(Store(store).hsm_ids()[0])
    raw = rogue.public_key().public_bytes_raw()
    planted = self_signed(
        HsmRecord("hsm9", real.wrap_key, PublicKey("ed25519", raw), real.created),
        rogue,
        contexts.HSM_RECORD,
    )
    Store(store).save_hsm(planted)
    recs = records(log)
    del recs[7]  # drop the refusal, relink, re-sign every checkpoint as the planted "HSM"
    prev, rewritten = "0" * 64, []
    for seq, rec in enumerate(recs):
        rec = {**rec, "seq": seq, "prev": prev}
        if rec["type"] == "checkpoint":
            rec["hsm"] = planted.id
            rec["signature"] = b64encode(rogue.sign(signed_message(rec)))
        rewritten.append(rec)
        prev = line_hash(canonical_bytes(rec))
    write(log, rewritten)
    result = Admin(store, kms.pins)("audit", "verify", str(log), check=exitcodes.VERIFICATION)
    problems = result.stderr.splitlines()
    assert len(problems) == 3  # one per re-signed checkpoint
    assert all(
        f"HSM {planted.id[:12]}, which is in no trust of the store that verifies" in p
        for p in problems
    )


def test_the_agent_refuses_to_extend_a_damaged_log(log: Path, hsm_signer: Signer) -> None:
    data = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(data[:5] + data[6:]))
    with pytest.raises(IntegrityError, match=r"record 5 \(line 6\): seq 6, want 5"):
        AuditLog(log, hsm_signer)


def test_show_prints_records_with_hsm_labels(kms: Admin, log: Path) -> None:
    lines = kms("audit", "show", str(log), "--last", "3").stdout.splitlines()
    assert lines[0].split() == [
        "SEQ", "TIME", "TYPE", "WHO", "OP", "DOMAIN", "DECISION", "REASON"
    ]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["10", "11", "12"]
    assert "checkpoint  HSM hsm1" in lines[3]
    shown = kms("--json", "audit", "show", str(log)).json
    assert shown == records(log)


def test_errors_are_one_line(kms: Admin, tmp_path: Path, log: Path) -> None:
    for action in ("verify", "show"):
        missing = kms("audit", action, str(tmp_path / "nope.log"), check=exitcodes.USAGE)
        assert "nope.log: No such file or directory" in one_error_line(missing)
    elsewhere = Admin(tmp_path / "not-a-store", kms.pins)
    result = elsewhere("audit", "verify", str(log), check=exitcodes.STORE)
    assert "not a kmsfs store" in one_error_line(result)


@pytest.mark.parametrize("action", ["verify", "show"])
def test_help_has_an_example(kms: Admin, action: str) -> None:
    assert "example:\n  kmsfs-admin" in kms("audit", action, "--help").stdout


def test_the_agent_signs_checkpoints_only_with_hsms_of_trusts_that_verify(
    tmp_path: Path,
) -> None:
    """hsm3 is made, with its token on this host, but in no Trust: audit verify would refuse
    its checkpoints, so the agent must not sign with it, even with the others away. (In a
    process of its own: one process serves one store's SoftHSM configuration.)"""
    admin = Admin.under(tmp_path)
    admin("init", "--hsms", "2")
    admin("hsm", "create", "--label", "hsm3")
    ctx = Context.at(admin.store)
    labels = {ctx.store.hsm(i).label: i for i in ctx.store.hsm_ids()}

    def signer_says() -> str:
        script = (
            "import sys\n"
            "from kmsfs.agent.cli import hsm_signer\n"
            "try:\n"
            "    print(hsm_signer(sys.argv[1])(b'checkpoint')[0])\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__)\n"
        )
        proc = subprocess.run([sys.executable, "-c", script, str(admin.store)],
                              capture_output=True, text=True, timeout=60, check=True)
        return proc.stdout.strip()

    assert signer_says() in (labels["hsm1"], labels["hsm2"])
    for label in ("hsm1", "hsm2"):  # both genesis HSMs away
        access = admin.store / "private" / "hsm-access" / f"{labels[label]}.json"
        doc = json.loads(access.read_text())
        access.write_text(json.dumps({**doc, "token_label": f"{label}-unplugged"}))
    assert signer_says() == "HsmUnavailableError"
