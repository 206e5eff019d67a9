"""`kmsfs-admin operator change-pin`: an operator changes their own secret, the key stays.

Operators made before the 12-character rule (operators.check_token_pin) kept their short PINs,
there being no way to change one. Here, on real SoftHSM2 tokens: after a change only the new
secret signs, and the key, its record and the signatures made with it stay valid; a wrong
current secret, an unknown operator, a weak or unchanged new secret are refused in one line
with nothing changed (DESIGN.md §2.6); no secret is ever printed.
"""

import json
import shutil
import stat
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from kmsfs import exitcodes
from kmsfs.hsm.pins import PinSource
from kmsfs.model import contexts
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.records import OperatorRecord
from kmsfs.service import operators
from kmsfs.service.context import Context
from kmsfs.store.documents import Store
from tests.integration.terminal_helpers import at_terminal
from tests.kms_helpers import Admin, Result, one_error_line, self_signed, tree_snapshot

NEW_PIN = "n3w-pin-of-alice-42"
#: The installed console script, as a user runs it.
CONSOLE_SCRIPT = Path(sys.executable).parent / "kmsfs-admin"


def _change(admin: Admin, name: str, old: str, new: str, *extra: str, check: int = 0) -> Result:
    return admin(
        *extra, "operator", "change-pin", name, "--pin-file", old, "--new-pin-file", new,
        check=check,
    )


def _signs(admin: Admin, trust: str, name: str, pin_file: str) -> int:
    """The exit code of ``trust sign TRUST --as NAME`` with that PIN or passphrase."""
    result = admin("trust", "sign", trust, "--as", name, "--pin-file", pin_file, check=None)
    return result.returncode


def _documents(admin: Admin) -> dict[str, bytes]:
    """The store less SoftHSM2's token.object files, which it rewrites at every C_Login, a
    failed one included (the same for a wrong PIN at `trust sign`)."""
    return {k: v for k, v in tree_snapshot(admin.store).items() if not k.endswith("token.object")}


def _no_secret_shown(results: list[Result], *secrets: str) -> None:
    for result in results:
        for secret in secrets:
            assert secret not in result.stdout + result.stderr


@pytest.fixture
def before_the_rule(initialized: Admin) -> Admin:
    """Operator ``old`` with the 4-digit PIN 1234, made as kmsfs made operators before the
    12-character rule (the rule switched off for this one create)."""
    source = PinSource(file=initialized.pin_file("old", "1234"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(operators, "check_token_pin", lambda pin, hint="": None)
        operators.create_operator(Context.at(initialized.store), "old", source)
    return initialized


def test_a_pin_from_before_the_rule_is_changed_and_only_the_new_one_signs(
    before_the_rule: Admin,
) -> None:
    """The old PIN stops signing, the new one signs a Trust that seals and verifies; the key
    id, the record and the Trust sealed with the old PIN are untouched and still verify."""
    admin = before_the_rule
    old, new = admin.pin_file("old"), admin.pin_file("old-new", NEW_PIN)
    t1 = admin.sealed_trust(["hsm1"], ["old"], 1)
    record = (admin.store / "operators" / "old.json").read_bytes()
    key_id = Store(admin.store).operator("old").key.key_id

    changed = _change(admin, "old", old, new, "-v")
    assert changed.last_line == key_id and "PIN changed" in changed.stdout
    _no_secret_shown([changed], "1234", NEW_PIN)

    t2 = admin.propose(["hsm1", "hsm2"], ["old"], 1, predecessor=t1)
    refused = admin("trust", "sign", t2, "--as", "old", "--pin-file", old, check=exitcodes.PIN)
    assert "wrong PIN" in one_error_line(refused)
    admin("trust", "sign", t2, "--as", "old", "--pin-file", new)
    admin("trust", "seal", t2)
    assert admin("--json", "trust", "verify", t2).json["chain"][-2:] == [t1, t2]
    admin("trust", "verify", t1)
    assert (admin.store / "operators" / "old.json").read_bytes() == record
    # the change took the rule: 1234 is no new PIN (and the new one is no old one)
    weak = _change(admin, "old", new, old, check=exitcodes.USAGE)
    assert "needs at least 12 characters" in one_error_line(weak)


def test_a_wrong_current_pin_changes_nothing(initialized: Admin) -> None:
    """Exit 5 in one line; the PIN stays the old one (it signs, the would-be new one does
    not) and no document or file of kmsfs changes."""
    admin = initialized
    admin.create_operators("alice")
    trust = admin.propose(["hsm1"], ["alice"], 1)
    wrong = admin.pin_file("wrong", "not-alices-pin-77")
    new = admin.pin_file("alice-new", NEW_PIN)
    before = _documents(admin)
    result = _change(admin, "alice", wrong, new, "-v", check=exitcodes.PIN)
    assert "wrong PIN" in one_error_line(result) and result.stdout == ""
    _no_secret_shown([result], "not-alices-pin-77", NEW_PIN, "pin-of-alice-0123")
    assert _documents(admin) == before
    assert _signs(admin, trust, "alice", new) == exitcodes.PIN
    assert _signs(admin, trust, "alice", admin.pin_file("alice")) == exitcodes.OK


@pytest.mark.parametrize(
    ("new_pin", "want"),
    [
        ("1234", "needs at least 12 characters, 4 of them different"),
        ("ab" * 8, "needs at least 12 characters, 4 of them different"),
        ("abcd" * 64, "has at most 255 bytes"),
        ("pin-of-alice-0123", "is the current one"),
    ],
    ids=["short", "few-distinct", "too-long", "identical"],
)
def test_a_weak_or_unchanged_new_pin_is_refused_before_the_token_is_touched(
    initialized: Admin, new_pin: str, want: str
) -> None:
    """Exit 2, one line; not even a login happened (every file, token files included, is as
    it was), and the current PIN still signs."""
    admin = initialized
    admin.create_operators("alice")
    trust = admin.propose(["hsm1"], ["alice"], 1)
    new = admin.pin_file("alice-new", new_pin)
    before = tree_snapshot(admin.store)
    line = one_error_line(_change(admin, "alice", admin.pin_file("alice"), new, check=2))
    assert want in line, line
    assert "--passphrase" not in line  # create's advice; a change keeps the kind of key
    assert tree_snapshot(admin.store) == before
    assert _signs(admin, trust, "alice", admin.pin_file("alice")) == exitcodes.OK


def test_an_unknown_operator_is_refused_before_any_secret_is_read(initialized: Admin) -> None:
    """Exit 6 naming the operator, although neither PIN file exists: the name is checked
    first, so nobody types a PIN for a typo."""
    before = tree_snapshot(initialized.store)
    result = _change(initialized, "mallory", "/nonexistent/a", "/nonexistent/b", check=6)
    assert "no operator named 'mallory'" in one_error_line(result)
    assert tree_snapshot(initialized.store) == before


def test_a_passphrase_key_file_is_sealed_again_under_the_new_passphrase(
    initialized: Admin,
) -> None:
    """Same key (the record, and a Trust sealed before, still verify), a new file (fresh salt,
    0600, no temporary left beside it); the old passphrase no longer opens it. A wrong
    current passphrase or a short new one leaves the file's bytes as they were."""
    admin = initialized
    old = admin.pin_file("dora", "correct horse battery")
    new = admin.pin_file("dora-new", "staple horse battery correct")
    admin("operator", "create", "dora", "--passphrase", "--pin-file", old)
    t1 = admin.sealed_trust(["hsm1"], ["dora"], 1)
    key_file = admin.store / "private" / "operator-keys" / "dora.key"
    sealed_before = key_file.read_bytes()
    key_id = Store(admin.store).operator("dora").key.key_id

    wrong = _change(admin, "dora", new, admin.pin_file("x", "yet another phrase"), check=5)
    assert "wrong passphrase for operator dora" in one_error_line(wrong)
    short = _change(admin, "dora", old, admin.pin_file("short", "short"), check=2)
    assert "a passphrase needs at least 8 characters" in one_error_line(short)
    assert key_file.read_bytes() == sealed_before

    changed = _change(admin, "dora", old, new)
    assert changed.last_line == key_id and "passphrase changed" in changed.stdout
    sealed_after = key_file.read_bytes()
    assert sealed_after != sealed_before
    assert json.loads(sealed_after)["salt"] != json.loads(sealed_before)["salt"]
    assert b"staple horse" not in sealed_after
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["dora.key"]

    t2 = admin.propose(["hsm1"], ["dora"], 1, predecessor=t1)
    assert _signs(admin, t2, "dora", old) == exitcodes.PIN
    admin("trust", "sign", t2, "--as", "dora", "--pin-file", new)
    admin("trust", "seal", t2)
    admin("trust", "verify", t2)
    assert Store(admin.store).operator("dora").key.key_id == key_id


def test_json_prints_the_operator_and_what_changed(initialized: Admin) -> None:
    admin = initialized
    admin.create_operators("alice")
    admin("operator", "create", "dora", "--passphrase", "--pin-file",
          admin.pin_file("dora", "correct horse battery"))
    alice = _change(
        admin, "alice", admin.pin_file("alice"), admin.pin_file("a2", NEW_PIN), "--json"
    ).json
    dora = admin(
        "operator", "change-pin", "dora", "--json", "--pin-file", admin.pin_file("dora"),
        "--new-pin-env", "NEW", env={"NEW": "another horse battery"},
    ).json
    listed = {o["name"]: o for o in admin("--json", "operator", "list").json}
    assert alice == {**listed["alice"], "changed": "pin"}
    assert dora == {**listed["dora"], "changed": "passphrase"}
    failed = admin(
        "--json", "operator", "change-pin", "alice", "--pin-file", admin.pin_file("alice"),
        "--new-pin-env", "NEW", env={"NEW": "another-pin-99"}, check=exitcodes.PIN,
    )
    assert failed.stdout == "" and "wrong PIN" in one_error_line(failed)


def test_a_replaced_record_is_refused_and_the_pin_stays(initialized: Admin) -> None:
    """A store writer put another key under alice's name: changing the PIN of a token whose
    key the record does not name would report a key id the new PIN does not unlock. Exit 3
    naming the record; the PIN is not changed (the old one signs once the record is back)."""
    admin = initialized
    admin.create_operators("alice")
    path = admin.store / "operators" / "alice.json"
    saved = path.with_suffix(".saved")
    shutil.copy(path, saved)
    real = Store(admin.store).operator("alice")
    fake = ed25519.Ed25519PrivateKey.generate()
    planted = PublicKey("ed25519", fake.public_key().public_bytes_raw())
    path.unlink()
    Store(admin.store).save_operator(
        self_signed(
            OperatorRecord("alice", planted, real.protection, real.created),
            fake,
            contexts.OPERATOR_RECORD,
        )
    )
    new = admin.pin_file("alice-new", NEW_PIN)
    line = one_error_line(_change(admin, "alice", admin.pin_file("alice"), new, check=3))
    assert f"is not the key {planted.key_id[:12]}" in line and "operators/alice.json" in line
    assert "nothing was changed" in line
    shutil.move(saved, path)
    trust = admin.propose(["hsm1"], ["alice"], 1)
    assert _signs(admin, trust, "alice", new) == exitcodes.PIN
    assert _signs(admin, trust, "alice", admin.pin_file("alice")) == exitcodes.OK


def _at_terminal(admin: Admin, args: list[str], typed: list[bytes]) -> Result:
    """The installed console script at a terminal: each line of ``typed`` is typed once the
    prompt before it shows."""
    command = [str(CONSOLE_SCRIPT), "--store", str(admin.store), *args]
    return at_terminal(command, [line + b"\n" for line in typed])


def test_the_new_pin_is_asked_twice_at_the_terminal(initialized: Admin) -> None:
    """Through the installed console script. Two different entries: exit 5, the old PIN
    stays; the same twice: changed. Nothing typed is echoed."""
    admin = initialized
    admin.create_operators("alice")
    args = ["operator", "change-pin", "alice", "--pin-file", admin.pin_file("alice")]
    differ = _at_terminal(admin, args, [NEW_PIN.encode(), b"n3w-pin-of-alice-43"])
    assert differ.returncode == exitcodes.PIN, differ
    assert "new PIN or passphrase of operator alice (again): " in differ.stderr
    assert "the two typed differ" in differ.stderr.splitlines()[-1]
    trust = admin.propose(["hsm1"], ["alice"], 1)
    assert _signs(admin, trust, "alice", admin.pin_file("alice")) == exitcodes.OK

    same = _at_terminal(admin, args, [NEW_PIN.encode(), NEW_PIN.encode()])
    assert same.returncode == 0, same
    _no_secret_shown([differ, same], NEW_PIN, "n3w-pin-of-alice-43", "pin-of-alice-0123")
    # a Trust alice has not signed yet: on `trust`, signing again asks for no PIN at all
    fresh = admin.propose(["hsm1"], ["alice"], 1)
    assert _signs(admin, fresh, "alice", admin.pin_file("alice")) == exitcodes.PIN
    assert _signs(admin, fresh, "alice", admin.pin_file("alice-new", NEW_PIN)) == exitcodes.OK


def test_without_a_terminal_the_new_pin_must_come_from_a_file_or_the_environment(
    initialized: Admin,
) -> None:
    admin = initialized
    admin.create_operators("alice")
    result = admin(
        "operator", "change-pin", "alice", "--pin-file", admin.pin_file("alice"), check=2
    )
    assert "give --new-pin-file or --new-pin-env" in one_error_line(result)
    both = admin(
        "operator", "change-pin", "alice", "--new-pin-file", "a", "--new-pin-env", "B", check=2
    )
    assert "not allowed with" in both.stderr


def test_help_teaches_and_completion_knows_the_command(admin: Admin) -> None:
    text = admin("operator", "change-pin", "--help").stdout
    assert "example:\n  kmsfs-admin operator change-pin alice --pin-file" in text
    assert "passphrase of its key file" in text and "--new-pin-file" in text
    assert "change-pin" in admin("operator", "--help").stdout
    script = admin("completion", "bash").stdout
    assert '"operator change-pin") opts=' in script and "--new-pin-env" in script
