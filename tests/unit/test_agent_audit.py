"""The agent's audit log (kmsfs/agent/audit.py; docs/format.md, "Agent audit log").

Pure: an in-memory Ed25519 key stands in for the HSM that signs checkpoints. Each adversarial
case is a test that fails if its detection broke: a changed, removed, swapped or repeated
record, a forged, re-signed or stripped checkpoint, garbage, and a cut tail, which the file
alone cannot prove but which is reported as an unsigned tail, never as a fully signed log.
"""

import errno
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsfs.agent import audit
from kmsfs.agent.audit import AuditLog, AuditReport, line_hash, signed_message, verify_log
from kmsfs.errors import FormatError, HsmError, IntegrityError, KmsfsError
from kmsfs.model.canonical import b64encode, canonical_bytes
from kmsfs.model.publickeys import PublicKey
from tests.unit.model_fixtures import ed25519_key, public_key

HSM_KEY = ed25519_key("audit", "hsm")
HSM_ID = "a" * 64
ROGUE_KEY = ed25519_key("audit", "rogue")
ROGUE_ID = "b" * 64
STORE: dict[str, PublicKey] = {HSM_ID: public_key(HSM_KEY)}


def sign(message: bytes) -> tuple[str, bytes]:
    return HSM_ID, HSM_KEY.sign(message)


def event(log: AuditLog, n: int, **extra: Any) -> int:
    return log.append(
        who=f"uid:{1000 + n}",
        op="derive",
        domain="payroll" if n % 2 else None,
        allowed=n % 3 != 0,
        reason="policy rule 2" if n % 3 else "not in the policy",
        **extra,
    )


def make_log(path: Path, events: int = 10, every: int = 4) -> Path:
    """``events`` events with a checkpoint after every ``every``, closed by a checkpoint."""
    with AuditLog(path, sign, checkpoint_every=every) as log:
        for n in range(events):
            event(log, n)
    return path


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines(path)]


def write(path: Path, recs: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(canonical_bytes(r) + b"\n" for r in recs))


def rechain(recs: list[dict[str, Any]], key: Any, hsm_id: str) -> list[dict[str, Any]]:
    """What someone who can write the file but holds no store HSM can do: renumber, relink
    every record and re-sign every checkpoint with a key of their own."""
    prev = audit.GENESIS_PREV
    out = []
    for seq, rec in enumerate(recs):
        rec = {**rec, "seq": seq, "prev": prev}
        if rec["type"] == "checkpoint":
            rec["hsm"] = hsm_id
            rec["signature"] = b64encode(key.sign(signed_message(rec)))
        out.append(rec)
        prev = line_hash(canonical_bytes(rec))
    return out


def relink(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Renumber and relink *recs*, re-signing nothing (what a writer without an HSM can do)."""
    prev, out = audit.GENESIS_PREV, []
    for seq, rec in enumerate(recs):
        rec = {**rec, "seq": seq, "prev": prev}
        out.append(rec)
        prev = line_hash(canonical_bytes(rec))
    return out


def verify(path: Path) -> AuditReport:
    return verify_log(path, STORE)


def first_problem(path: Path) -> str:
    report = verify(path)
    assert not report.ok, "tampering went undetected"
    return report.problems[0]


# -- the good path ---------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.log", events=10, every=4)
    recs = records(path)
    # 4 events, checkpoint, 4 events, checkpoint, 2 events, final checkpoint
    assert [r["type"][0] for r in recs] == list("eeeeceeeeceec")
    assert [r["seq"] for r in recs] == list(range(13))
    assert recs[0]["prev"] == "0" * 64
    assert recs[1] == {
        "seq": 1,
        "prev": line_hash(lines(path)[0].rstrip(b"\n")),
        "time": recs[1]["time"],
        "type": "event",
        "who": "uid:1001",
        "op": "derive",
        "domain": "payroll",
        "decision": "allowed",
        "reason": "policy rule 2",
    }
    assert recs[4]["hsm"] == HSM_ID and set(recs[4]) == audit.CHECKPOINT_KEYS
    for line in lines(path):  # canonical JSON, one per line
        assert canonical_bytes(json.loads(line)) + b"\n" == line
    report = verify(path)
    assert report == AuditReport(13, 3, 12, 0, [])
    assert report.ok and report.to_dict()["ok"] is True
    assert (path.stat().st_mode & 0o777) == 0o600


def test_detail_is_kept_and_floats_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, sign) as log:
        assert event(log, 1, detail={"info": "AAAA", "n": 3}) == 0
        with pytest.raises(FormatError):
            event(log, 2, detail={"ratio": 0.5})
        with pytest.raises(FormatError, match="who"):
            log.append(who=7, op="x", domain=None, allowed=True, reason="")  # type: ignore[arg-type]
        assert event(log, 3) == 1  # nothing was written for the refused ones
    assert records(path)[0]["detail"] == {"info": "AAAA", "n": 3}
    assert verify(path).ok


def test_reopen_continues_seq_and_chain(tmp_path: Path) -> None:
    path = make_log(tmp_path / "audit.log", events=3, every=100)  # 3 events + checkpoint
    with AuditLog(path, sign, checkpoint_every=100) as log:
        assert event(log, 7) == 4
        assert event(log, 8) == 5
    recs = records(path)
    assert [r["seq"] for r in recs] == list(range(7))
    assert recs[4]["prev"] == line_hash(lines(path)[3].rstrip(b"\n"))
    assert verify(path) == AuditReport(7, 2, 6, 0, [])


def test_reopen_of_an_unsigned_tail_signs_it_at_close(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, None) as log:
        event(log, 1)
        event(log, 2)
    assert verify(path) == AuditReport(2, 0, None, 2, [])
    AuditLog(path, sign).close()
    # a note that two records were found unsigned, then the checkpoint that covers all three
    assert verify(path) == AuditReport(4, 1, 3, 0, [])
    note = records(path)[2]
    assert (note["who"], note["op"]) == ("kmsfs-hsmd", "start")
    assert note["reason"].startswith("2 record(s) before this one (seq 0 to 1) were not signed")


def test_reopen_after_rotation_signs_the_old_file_and_chains_the_new_one(tmp_path: Path) -> None:
    """logrotate moved the log aside, then SIGHUP: the old file ends with a checkpoint, the new
    one starts a chain of its own whose first record names the old file's last seq and head."""
    path, rotated = tmp_path / "audit.log", tmp_path / "audit.log.1"
    with AuditLog(path, sign, checkpoint_every=100) as log:
        event(log, 1)
        assert log.reopen() is False  # not moved: nothing to do, nothing written
        event(log, 2)
        path.rename(rotated)
        assert log.reopen() is True
        assert event(log, 3) == 1
    old, new = records(rotated), records(path)
    assert verify(rotated) == AuditReport(3, 1, 2, 0, [])  # two events and the checkpoint
    assert old[-1]["type"] == "checkpoint"
    assert verify(path) == AuditReport(3, 1, 2, 0, [])  # the note, one event, the checkpoint
    note = new[0]
    assert (note["seq"], note["prev"], note["who"], note["op"]) == (
        0, audit.GENESIS_PREV, "kmsfs-hsmd", "reopen"
    )
    assert note["detail"] == {
        "previous": {"seq": 2, "head": line_hash(lines(rotated)[-1].rstrip(b"\n"))}
    }
    assert oct(path.stat().st_mode & 0o777) == oct(audit.LOG_MODE)


def test_reopen_takes_an_empty_file_made_by_logrotate_create_and_makes_it_0600(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, sign) as log:
        event(log, 1)
        path.rename(tmp_path / "old")
        path.touch(mode=0o644)
        path.chmod(0o644)  # logrotate's "create 0644"
        assert log.reopen() is True
    assert verify(path).ok and records(path)[0]["op"] == "reopen"
    assert path.stat().st_mode & 0o777 == audit.LOG_MODE


def test_a_reopen_that_cannot_write_its_link_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk when the new file's first record (the link to the old one) is written: the
    new file is not kept, and the log goes on in the old one, whole and linked."""
    path, rotated = tmp_path / "audit.log", tmp_path / "audit.log.1"
    with AuditLog(path, sign) as log:
        event(log, 1)
        path.rename(rotated)
        real = AuditLog._append_locked

        def full(self: AuditLog, *args: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(AuditLog, "_append_locked", full)
        with pytest.raises(OSError):
            log.reopen()
        monkeypatch.setattr(AuditLog, "_append_locked", real)
        assert not path.exists()
        event(log, 2)
        assert log.reopen() is True  # the next try makes the new file, link first
    kinds = [(r["type"], r.get("op")) for r in records(rotated)]
    assert verify(rotated).ok and ("event", "derive") == kinds[0] == kinds[-2]
    assert kinds[-1] == ("checkpoint", None)  # the event after the failed try, then signed
    assert records(path)[0]["op"] == "reopen"
    assert records(path)[0]["detail"]["previous"]["seq"] == len(records(rotated)) - 1


@pytest.mark.parametrize("planted", ["symlink", "fifo", "other user"])
def test_reopen_refuses_what_is_not_the_agents_own_file(tmp_path: Path, planted: str) -> None:
    path, rotated, target = tmp_path / "audit.log", tmp_path / "audit.log.1", tmp_path / "t"
    with AuditLog(path, sign) as log:
        event(log, 1)
        path.rename(rotated)
        if planted == "symlink":
            target.write_bytes(b"")
            path.symlink_to(target)
        elif planted == "fifo":
            os.mkfifo(path)
        else:
            path.write_bytes(b"")
            os.chown(path, 1000, 1000)
        with pytest.raises(KmsfsError, match=str(path)):
            log.reopen()
        event(log, 2)
    assert verify(rotated).ok and len(records(rotated)) >= 3
    assert not target.exists() or target.read_bytes() == b""


def test_reopen_onto_a_damaged_file_keeps_writing_the_old_one(tmp_path: Path) -> None:
    """The file now at the path does not verify: the agent refuses to extend it (as at start)
    and goes on in the file it has, which stays whole."""
    path, rotated = tmp_path / "audit.log", tmp_path / "audit.log.1"
    with AuditLog(path, sign) as log:
        event(log, 1)
        path.rename(rotated)
        path.write_bytes(b"not a record\n")
        with pytest.raises(IntegrityError):
            log.reopen()
        event(log, 2)
    assert path.read_bytes() == b"not a record\n"
    assert verify(rotated).ok and len(records(rotated)) >= 3


def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    with AuditLog(path, sign), pytest.raises(KmsfsError, match="in use"):
        AuditLog(path, sign)


def test_concurrent_appends_from_8_threads(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    per_thread = 150
    with AuditLog(path, sign, checkpoint_every=37) as log:

        def work(t: int) -> None:
            for n in range(per_thread):
                log.append(who=f"t{t}", op=f"op{n}", domain=None, allowed=True, reason="")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    report = verify(path)
    assert report.ok and report.unsigned_tail == 0, report.problems
    events = [(r["who"], r["op"]) for r in records(path) if r["type"] == "event"]
    assert sorted(events) == sorted(
        (f"t{t}", f"op{n}") for t in range(8) for n in range(per_thread)
    )
    assert report.checkpoints == report.records - len(events) >= 8 * per_thread // 37


def test_automatic_checkpoint_by_count(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, sign, checkpoint_every=5)
    for n in range(12):
        event(log, n)
    assert [r["seq"] for r in records(path) if r["type"] == "checkpoint"] == [5, 11]
    log.close()
    assert verify(path) == AuditReport(15, 3, 14, 0, [])


def test_automatic_checkpoint_by_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(audit, "_clock", lambda: now[0])
    path = tmp_path / "audit.log"
    log = AuditLog(path, sign, checkpoint_seconds=60.0)
    event(log, 1)
    now[0] += 59.0
    event(log, 2)
    assert [r["type"] for r in records(path)] == ["event", "event"]
    now[0] += 1.0
    event(log, 3)
    assert [r["type"] for r in records(path)] == ["event", "event", "event", "checkpoint"]
    now[0] += 30.0
    event(log, 4)  # the timer restarted at the checkpoint
    assert len(records(path)) == 5
    log.close()
    assert verify(path).ok


def test_signer_failure_keeps_the_log_valid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(message: bytes) -> tuple[str, bytes]:
        raise HsmError("no HSM could serve (hsm1: token absent)")

    path = tmp_path / "audit.log"
    with caplog.at_level(logging.WARNING, logger="kmsfs.agent.audit"):
        log = AuditLog(path, broken, checkpoint_every=2)
        for n in range(5):
            event(log, n)
        log.checkpoint()
        log.close()
    assert [r["type"] for r in records(path)] == ["event"] * 5
    assert verify(path) == AuditReport(5, 0, None, 5, [])
    assert "checkpoint not signed" in caplog.text and "token absent" in caplog.text
    with AuditLog(path, sign) as log:  # the HSM is back: the tail gets signed, with a note
        event(log, 5)
    assert verify(path) == AuditReport(8, 1, 7, 0, [])


def test_a_signer_returning_nonsense_appends_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.log"
    with (
        caplog.at_level(logging.WARNING, logger="kmsfs.agent.audit"),
        AuditLog(path, lambda m: ("hsm1", b"sig")) as log,
    ):
        event(log, 1)
    assert verify(path) == AuditReport(1, 0, None, 1, [])
    assert "64-digit" in caplog.text


# -- what verify_log detects ------------------------------------------------------------------


@pytest.fixture
def signed(tmp_path: Path) -> Path:
    """13 records: events 0-3, checkpoint 4, events 5-8, checkpoint 9, events 10-11, cp 12."""
    return make_log(tmp_path / "audit.log", events=10, every=4)


def test_a_changed_field_of_a_middle_record(signed: Path) -> None:
    recs = records(signed)
    recs[6]["decision"] = "allowed" if recs[6]["decision"] == "refused" else "refused"
    write(signed, recs)
    assert first_problem(signed).startswith("record 7 (line 8): prev is not the hash of record 6")


def test_a_changed_record_rechained_but_not_resigned(signed: Path) -> None:
    """Relinking the whole chain hides the change from the links, not from the checkpoint."""
    recs = records(signed)
    recs[2]["who"] = "uid:0"
    signatures = [r.get("signature") for r in recs]
    recs = rechain(recs, HSM_KEY, HSM_ID)
    for rec, signature in zip(recs, signatures, strict=True):
        if signature:
            rec["signature"] = signature  # keep the genuine, now stale, signatures
    write(signed, recs)
    problem = first_problem(signed)
    assert problem.startswith("record 4 (line 5): bad checkpoint signature"), problem


def test_a_changed_log_resigned_with_an_unknown_key(signed: Path) -> None:
    recs = records(signed)
    recs[2]["who"] = "uid:0"
    write(signed, rechain(recs, ROGUE_KEY, HSM_ID))  # claims the store's HSM
    assert first_problem(signed).startswith("record 4 (line 5): bad checkpoint signature")
    write(signed, rechain(recs, ROGUE_KEY, ROGUE_ID))  # admits its own key
    assert first_problem(signed) == (
        f"record 4 (line 5): checkpoint signed by HSM {ROGUE_ID[:12]}, which is in no trust of "
        "the store that verifies"
    )


def test_a_deleted_middle_record(signed: Path) -> None:
    data = lines(signed)
    signed.write_bytes(b"".join(data[:6] + data[7:]))
    report = verify(signed)
    assert report.problems == [
        "record 6 (line 7): seq 7, want 6: 1 record(s) missing before it; prev is not the hash "
        "of record 5: record 5 was changed, or records were removed or reordered"
    ]


def test_a_deleted_first_record(signed: Path) -> None:
    signed.write_bytes(b"".join(lines(signed)[1:]))
    problem = first_problem(signed)
    assert problem.startswith("record 0 (line 1): seq 1, want 0") and "64 zeros" in problem


def test_two_swapped_records(signed: Path) -> None:
    data = lines(signed)
    data[5], data[6] = data[6], data[5]
    signed.write_bytes(b"".join(data))
    assert first_problem(signed).startswith("record 5 (line 6): seq 6, want 5")


def test_a_duplicated_record(signed: Path) -> None:
    data = lines(signed)
    signed.write_bytes(b"".join([*data[:7], data[6], *data[7:]]))
    assert first_problem(signed).startswith(
        "record 7 (line 8): seq 6, want 7: a repeated or reordered record"
    )


def test_a_forged_checkpoint_by_a_key_not_in_the_store(signed: Path) -> None:
    recs = records(signed)
    head = line_hash(lines(signed)[-1].rstrip(b"\n"))
    cp = {"seq": len(recs), "prev": head, "time": recs[-1]["time"], "type": "checkpoint"}
    cp["hsm"] = ROGUE_ID
    cp["signature"] = b64encode(ROGUE_KEY.sign(signed_message(cp)))
    write(signed, [*recs, cp])
    assert first_problem(signed) == (
        f"record 13 (line 14): checkpoint signed by HSM {ROGUE_ID[:12]}, which is in no trust "
        "of the store that verifies"
    )
    cp["hsm"] = HSM_ID  # claiming the store's HSM does not help
    write(signed, [*recs, cp])
    assert first_problem(signed).startswith("record 13 (line 14): bad checkpoint signature")


def test_a_checkpoint_stripped_of_its_signature(signed: Path) -> None:
    recs = records(signed)
    del recs[9]["signature"]
    write(signed, recs)
    assert first_problem(signed) == "record 9 (line 10): checkpoint: missing signature"


def test_a_checkpoint_turned_into_nothing_is_not_a_checkpoint(signed: Path) -> None:
    """Dropping the last checkpoint leaves a valid chain, but the tail is reported unsigned."""
    signed.write_bytes(b"".join(lines(signed)[:-1]))
    report = verify(signed)
    assert report.ok and report.last_signed_seq == 9 and report.unsigned_tail == 2


def test_a_cut_tail_is_reported_as_unsigned(signed: Path) -> None:
    signed.write_bytes(b"".join(lines(signed)[:11]))  # records 0-10: cut after event 10
    assert verify(signed) == AuditReport(11, 2, 9, 1, [])


def test_a_cut_at_a_checkpoint_is_undetectable_from_the_file_alone(signed: Path) -> None:
    """The documented limit (docs/threat-model.md): compare the head with a copy elsewhere."""
    signed.write_bytes(b"".join(lines(signed)[:10]))
    assert verify(signed) == AuditReport(10, 2, 9, 0, [])


def test_a_cut_in_the_middle_of_a_line(signed: Path) -> None:
    signed.write_bytes(signed.read_bytes()[:-10])
    problem = first_problem(signed)
    assert problem.startswith("record 12 (line 13): no newline at the end"), problem


@pytest.mark.parametrize(
    ("garbage", "want"),
    [
        (b"garbage\n", "not JSON"),
        (b"\n", "not JSON"),
        (b"[1,2]\n", "want an object, have list"),
        (
            b'{"type":"event"}\n',
            "event: missing decision, domain, op, prev, reason, seq, time, who",
        ),
        (b'{"seq": 5}\n', "want event or checkpoint"),
        (b"\xff\xfe\n", "not UTF-8"),
        (b'{"a":1.5}\n', "not valid in a kmsfs document"),
    ],
)
def test_a_garbage_line(signed: Path, garbage: bytes, want: str) -> None:
    data = lines(signed)
    signed.write_bytes(b"".join([*data[:3], garbage, *data[3:]]))
    problem = first_problem(signed)
    assert problem.startswith("record 3 (line 4): ") and want in problem, problem


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("seq", "6", "field 'seq': want int, have str"),
        ("seq", True, "field 'seq': want int, have bool"),
        ("seq", -1, "want >= 0"),
        ("prev", "A" * 64, "field 'prev'"),
        ("time", "2024-13-01T00:00:00Z", "field 'time'"),
        ("time", "2024-01-01 00:00:00", "field 'time'"),
        ("who", None, "field 'who': want str"),
        ("domain", 3, "field 'domain': want str"),
        ("decision", "maybe", "want allowed or refused"),
        ("detail", [1], "field 'detail': want an object"),
        ("extra", 1, "unknown extra"),
    ],
)
def test_wrong_fields_are_named(signed: Path, field: str, value: Any, want: str) -> None:
    recs = records(signed)
    recs[6][field] = value
    write(signed, recs)
    problem = first_problem(signed)
    assert problem.startswith("record 6 (line 7): ") and want in problem, problem


def test_a_non_canonical_line(signed: Path) -> None:
    data = lines(signed)
    data[6] = json.dumps(json.loads(data[6])).encode() + b"\n"  # same record, with spaces
    signed.write_bytes(b"".join(data))
    assert first_problem(signed) == "record 6 (line 7): not in canonical form"


def test_many_problems_are_capped(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b"x\n" * (audit.MAX_PROBLEMS + 5))
    report = verify(path)
    assert len(report.problems) == audit.MAX_PROBLEMS + 1
    assert report.problems[-1] == "... and 5 more problems"


def test_a_damaged_log_is_refused_on_open_and_left_alone(signed: Path) -> None:
    recs = records(signed)
    recs[6]["who"] = "uid:0"
    write(signed, recs)
    before = signed.read_bytes()
    with pytest.raises(IntegrityError) as caught:
        AuditLog(signed, sign)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{signed}: record 7 (line 8): prev is not the hash of record 6")
    assert message.endswith("refusing to extend a damaged audit log")
    assert signed.read_bytes() == before
    AuditLog(signed.parent / "other.log", sign).close()  # the lock went with the failed open


def test_a_torn_last_line_is_refused_on_open(signed: Path) -> None:
    signed.write_bytes(signed.read_bytes() + b'{"seq":13,"pr')
    with pytest.raises(IntegrityError, match=r"record 13 .*no newline"):
        AuditLog(signed, sign)


# -- fuzzing: verify_log never crashes and never passes a changed log --------------------------

FUZZ = settings(
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _meaning(data: bytes) -> list[Any]:
    return [json.loads(line) for line in data.splitlines()]


@FUZZ
@given(st.data())
def test_single_byte_mutations_are_reported_or_harmless(signed: Path, data: st.DataObject) -> None:
    original = signed.read_bytes()
    position = data.draw(st.integers(0, len(original) - 1), label="position")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != original[position]), label="byte")
    mutated = bytearray(original)
    mutated[position] = byte
    path = signed.with_suffix(".mutated")
    path.write_bytes(bytes(mutated))
    report = verify(path)  # must not raise
    if report.ok:
        assert _meaning(bytes(mutated)) == _meaning(original)


@FUZZ
@given(st.data())
def test_cutting_bytes_out_is_reported_or_an_unsigned_tail(
    signed: Path, data: st.DataObject
) -> None:
    original = signed.read_bytes()
    start = data.draw(st.integers(0, len(original) - 1), label="start")
    end = data.draw(st.integers(start + 1, len(original)), label="end")
    path = signed.with_suffix(".cut")
    path.write_bytes(original[:start] + original[end:])
    report = verify(path)
    if report.ok:
        # What can pass: the signed part (up to the last valid checkpoint) as it was, and
        # after it an unsigned tail, reported, which nothing covers (docs/format.md, "What it
        # does not detect"): a cut there may drop tail records or splice two into one that
        # still parses, e.g. one record's start joined to another's end.
        cut = lines(path)
        signed_part = report.records - report.unsigned_tail
        assert cut[:signed_part] == lines(signed)[:signed_part]
        if not original.startswith(path.read_bytes()):
            assert report.unsigned_tail > 0
        assert report.records < len(lines(signed)) or report.unsigned_tail > 0


def test_a_full_disk_at_an_idle_checkpoint_is_a_warning_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent calls checkpoint() every --audit-seconds; on a full disk it raised "short
    write" and the agent exited. Now: a warning naming ENOSPC, the log still whole."""
    path = tmp_path / "audit.log"
    log = AuditLog(path, sign, checkpoint_every=100)
    for n in range(3):
        event(log, n)
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        if len(data) > 20:
            real_write(fd, bytes(data[:20]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with caplog.at_level(logging.WARNING, logger="kmsfs.agent.audit"):
        log.checkpoint()
    assert "checkpoint not written (No space left on device)" in caplog.text
    monkeypatch.undo()
    assert verify(path) == AuditReport(3, 0, None, 3, [])  # the torn checkpoint was cut off
    log.close()  # space is back: the tail gets signed
    assert verify(path) == AuditReport(4, 1, 3, 0, [])


def test_a_rewritten_log_is_not_extended_or_is_signed_with_a_note(signed: Path) -> None:
    """Someone who can edit the log while the agent is stopped removes a refusal and rebuilds
    the chain. Keeping the old checkpoints, their signatures no longer hold: the agent, which
    now checks them with the store's keys, refuses to start on it. Stripping the checkpoints
    too, nothing is left to check: the agent starts, but its first checkpoint signs a record
    saying how many records it found unsigned, so the change cannot pass as its own."""
    recs = records(signed)
    refused = next(i for i, r in enumerate(recs) if r.get("decision") == "refused")
    kept = recs[:refused] + recs[refused + 1 :]
    write(signed, relink(kept))
    with pytest.raises(IntegrityError, match="refusing to extend a damaged audit log"):
        AuditLog(signed, sign, keys=STORE)

    events = [r for r in kept if r["type"] == "event"]
    write(signed, relink(events))
    AuditLog(signed, sign, keys=STORE).close()
    after = records(signed)
    assert verify(signed).ok and after[-1]["type"] == "checkpoint"
    assert after[-2]["reason"].startswith(f"{len(events)} record(s) before this one")
