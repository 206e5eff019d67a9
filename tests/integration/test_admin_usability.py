"""Small defects a usability review of kmsfs-admin found: Ctrl-D at a prompt, a loose PIN
file, -v that said nothing, a second signature, the words of a log line and of a health row.
Real CLI, real SoftHSM2 tokens."""

import json
import os
import re
import select
import shutil
import signal
import subprocess
from pathlib import Path

from kmsfs import exitcodes
from kmsfs.model.canonical import canonical_bytes, digest
from tests.integration.fault_helpers import clean_env, token_dir
from tests.integration.terminal_helpers import at_terminal
from tests.kms_helpers import ADMIN, Admin, Result, one_error_line

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _ctrl_d_at_the_prompt(admin: Admin, *args: str) -> Result:
    """kmsfs-admin at a terminal; Ctrl-D is typed once the prompt shows."""
    return at_terminal([*ADMIN, "--store", str(admin.store), *args], [b"\x04"])


def test_ctrl_d_at_a_pin_prompt_is_one_line_and_the_pin_exit_code(initialized: Admin) -> None:
    """It was an EOFError traceback and exit 1, at `trust sign` and at the new-PIN prompt of
    `operator change-pin`."""
    admin = initialized
    admin.create_operators("carol")
    trust = admin.propose(["hsm1"], ["carol"], 1)
    eof = "no PIN given (end of input at the prompt)"
    for args, line in (
        (["trust", "sign", trust, "--as", "carol"], eof),
        (["operator", "change-pin", "carol", "--pin-file", admin.pin_file("carol")],
         f"the new PIN: {eof}; nothing changed"),
    ):
        result = _ctrl_d_at_the_prompt(admin, *args)
        assert result.returncode == exitcodes.PIN, result
        assert "Traceback" not in result.stderr, result.stderr
        assert result.stderr.splitlines()[-1] == f"kmsfs-admin: error: {line}"  # own line
        assert result.stdout == ""
    assert admin("--json", "trust", "show", trust).json["approvals"]["signed"] == []


def test_ctrl_c_at_a_pin_prompt_is_said_on_a_line_of_its_own(initialized: Admin) -> None:
    """"kmsfs-admin: interrupted" came right after the prompt, on its line (found by review)."""
    admin = initialized
    admin.create_operators("carol")
    trust = admin.propose(["hsm1"], ["carol"], 1)
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [*ADMIN, "--store", str(admin.store), "trust", "sign", trust, "--as", "carol"],
        stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
        start_new_session=True,
    )
    try:
        os.close(slave)
        assert proc.stderr is not None
        seen = b""
        while True:  # the prompt is up, and the command waits at it (quiet for 0.5 s)
            ready, _, _ = select.select([proc.stderr], [], [], 0.5 if seen.endswith(b": ") else 60)
            if not ready and seen.endswith(b": "):
                break
            chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
            assert chunk, f"no prompt: {seen!r}"
            seen += chunk
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.communicate()  # reaped, its pipes closed
        os.close(master)
    assert proc.returncode == exitcodes.INTERRUPTED
    lines = (seen + err).decode().splitlines()
    assert lines[-1] == "kmsfs-admin: interrupted" and lines[-2].endswith(": "), lines
    assert admin("--json", "trust", "show", trust).json["approvals"]["signed"] == []


def test_signing_twice_says_so_and_changes_nothing(initialized: Admin) -> None:
    """The second `trust sign` printed "signed ... 1/2" again, as if it had added one. It is a
    no-op with exit 0 (scripts may repeat it) that asks for no PIN."""
    admin = initialized
    admin.create_operators("alice", "bob")
    trust = admin.propose(["hsm1"], ["alice", "bob"], 2)
    first = admin("--json", "trust", "sign", trust, "--as", "alice", "--pin-file",
                  admin.pin_file("alice")).json
    assert first["already_signed"] is False
    approvals = sorted((admin.store / "approvals" / trust).iterdir())
    before = [p.read_bytes() for p in approvals]
    again = admin("trust", "sign", trust, "--as", "alice", "--pin-file", admin.pin_file("alice"))
    assert again.stdout == f"alice had already signed trust {trust[:12]} (1/2 approvals)\n"
    assert again.stderr == ""
    # no PIN needed, none asked for (stdin is no terminal: asking would fail)
    listed = admin("--json", "trust", "sign", trust, "--as", "alice").json
    assert listed["already_signed"] is True and listed["approvals"]["signed"] == ["alice"]
    assert sorted((admin.store / "approvals" / trust).iterdir()) == approvals
    assert [p.read_bytes() for p in approvals] == before
    done = admin("trust", "sign", trust, "--as", "bob", "--pin-file", admin.pin_file("bob"))
    assert done.stdout == f"bob signed trust {trust[:12]}: 2/2 approvals\n"


def test_a_pin_file_others_can_read_is_used_with_a_warning(initialized: Admin) -> None:
    """`chmod 644 carol.pin` was taken silently. A warning naming the file, not the PIN."""
    admin = initialized
    admin.create_operators("carol")
    trust = admin.propose(["hsm1"], ["carol"], 1)
    pin = Path(admin.pin_file("carol"))
    pin.chmod(0o644)
    result = admin("trust", "sign", trust, "--as", "carol", "--pin-file", str(pin))
    assert result.stderr.splitlines() == [
        f"kmsfs-admin: warning: PIN file {pin} can be read by group and others (mode 0644): "
        f"chmod 600 {pin}"
    ]
    assert "carol signed trust" in result.stdout
    assert pin.read_text().strip() not in result.stdout + result.stderr
    pin.chmod(0o600)
    quiet = admin("operator", "change-pin", "carol", "--pin-file", str(pin), "--new-pin-file",
                  admin.pin_file("carol-new", "n3w-pin-of-carol-42"))
    assert quiet.stderr == ""


def test_verbose_trust_sign_says_which_key_signs_and_what_is_written(
    initialized: Admin,
) -> None:
    """`-v` ("log what happens to stderr") said nothing at `trust sign`."""
    admin = initialized
    admin.create_operators("carol")
    admin("operator", "create", "dora", "--passphrase", "--pin-file",
          admin.pin_file("dora", "correct horse battery"))
    trust = admin.propose(["hsm1"], ["carol", "dora"], 2)
    carol = admin("-v", "trust", "sign", trust, "--as", "carol", "--pin-file",
                  admin.pin_file("carol")).stderr
    dora = admin("-v", "trust", "sign", trust, "--as", "dora", "--pin-file",
                 admin.pin_file("dora")).stderr
    assert f"operator carol (key {_key(admin, 'carol')[:12]}) signs trust {trust[:12]}" in carol
    assert f"operator carol signs with its token 'op-carol' of {MODULE}" in carol
    key_file = admin.store / "private" / "operator-keys" / "dora.key"
    assert f"operator dora signs with its key file {key_file}" in dora
    for name, log in (("carol", carol), ("dora", dora)):
        written = admin.store / "approvals" / trust / f"{_key(admin, name)}.json"
        assert f"wrote {written}" in log, log
        assert Path(admin.pin_file(name)).read_text().strip() not in log
    again = admin("-v", "trust", "sign", trust, "--as", "carol").stderr
    assert f"operator carol had already signed trust {trust[:12]}" in again


def _key(admin: Admin, name: str) -> str:
    return admin("--json", "operator", "list").json[
        [o["name"] for o in admin("--json", "operator", "list").json].index(name)
    ]["id"]


def test_operator_create_says_where_the_key_is_kept(initialized: Admin) -> None:
    """--passphrase said "key in passphrase"."""
    admin = initialized
    phrase = admin("operator", "create", "dora", "--passphrase", "--pin-file",
                   admin.pin_file("dora", "correct horse battery"))
    assert phrase.stdout.splitlines()[0] == (
        "operator dora created (key file sealed with a passphrase)"
    )
    token = admin("operator", "create", "carol", "--pin-file", admin.pin_file("carol"))
    assert token.stdout.splitlines()[0] == (
        "operator carol created (key in a SoftHSM2 token of its own)"
    )


def _take_away(admin: Admin, label: str, away: Path) -> None:
    away.mkdir(exist_ok=True)
    src = token_dir(admin.store, label)
    shutil.move(src, away / src.name)


def test_the_log_line_of_a_missing_hsm_reads_in_order(
    initialized: Admin, tmp_path: Path
) -> None:
    """It said "HSM hsm1: token 'hsm1' of ... is not present unavailable, hsm2 serves
    instead"."""
    admin = initialized
    admin.create_operators("alice")
    trust = admin.propose(["hsm1", "hsm2"], ["alice"], 1)
    admin.sign(trust, "alice")
    _take_away(admin, "hsm1", tmp_path / "away")
    result = admin("trust", "seal", trust)
    assert "trust sealed by HSM hsm2" in result.stdout
    assert result.stderr.splitlines() == [  # as the tool's own warnings read (review)
        f"kmsfs-admin: warning: HSM hsm1 unavailable (token 'hsm1' of {MODULE} is "
        "not present); hsm2 serves instead"
    ]


def test_each_health_row_names_its_own_hsms_problem(initialized: Admin, tmp_path: Path) -> None:
    """With both tokens gone, each row said "FAILED: no HSM could serve (hsm1: ...)"."""
    admin = initialized
    for label in ("hsm1", "hsm2"):
        _take_away(admin, label, tmp_path / "away")
    rows = admin("--json", "hsm", "health", check=exitcodes.HSM).json
    assert {r["label"]: r["problem"] for r in rows} == {
        label: f"token {label!r} of {MODULE} is not present" for label in ("hsm1", "hsm2")
    }
    table = admin("hsm", "health", check=exitcodes.HSM).stdout
    for label in ("hsm1", "hsm2"):
        line = next(x for x in table.splitlines() if f" {label} " in x)
        assert re.search(rf"FAILED: token '{label}' of \S+ is not present$", line), line
        assert "no HSM could serve" not in line
    assert one_error_line(admin("hsm", "health", check=exitcodes.HSM)) == (
        "kmsfs-admin: error: 2 of 2 HSMs failed the health check"
    )


def test_a_proposal_whose_created_draws_fake_lines_is_refused(initialized: Admin) -> None:
    """One dishonest proposer (or anyone who can write the store) wrote a successor adding an
    HSM of their own, with fake "HSMs ... quorum ..." lines and a terminal escape that hides
    what follows in its ``created``: `trust show`, the content every operator checks before
    signing, showed the fake lines and hid the real ones. Now no command reads it: one line,
    exit 7 (a malformed document), and no escape reaches the terminal."""
    admin = initialized
    admin.create_operators("alice", "bob")
    first = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 2)
    proposal = admin.propose(["hsm1", "hsm2"], ["alice", "bob"], 2, predecessor=first)
    path = admin.store / "trusts" / f"{proposal}.json"
    doc = json.loads(path.read_text())
    doc["created"] += "\n  HSMs         hsm1, hsm2\n  quorum       2 of 2\x1b[8m"
    forged = digest(doc)
    (admin.store / "trusts" / f"{forged}.json").write_bytes(canonical_bytes(doc))
    for args in (["trust", "show", forged], ["trust", "sign", forged, "--as", "alice",
                                              "--pin-file", admin.pin_file("alice")]):
        result = admin(*args, check=exitcodes.FORMAT)
        assert "\x1b" not in result.stdout + result.stderr
        assert "created: want a time as YYYY-MM-DDTHH:MM:SSZ" in one_error_line(result)
    assert not (admin.store / "approvals" / forged).exists()
