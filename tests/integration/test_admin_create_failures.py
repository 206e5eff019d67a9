"""A creation that fails or is cut short leaves nothing that blocks doing it again (DESIGN.md §2.6).

Operator and HSM tokens live in the store's one SoftHSM2 token directory, found by label. A
token left behind by a failed ``operator create`` or ``hsm create`` made every later use of its
label ambiguous ("several tokens have this label"): the retry failed, and so did the signatures
of an operator whose label an HSM took.
"""

import errno
import json
import os
import select
import shutil
import subprocess
from pathlib import Path

import pytest

from kmsfs.hsm import library, softhsm
from kmsfs.hsm.pins import PinSource
from kmsfs.service import hsms, operators
from kmsfs.service.context import Context
from kmsfs.store.documents import Store
from tests.integration.fault_helpers import clean_env, tmpfs
from tests.kms_helpers import ADMIN, Admin, Result, one_error_line, tree_snapshot


def _labelled(admin: Admin, label: str) -> int:
    """How many tokens carry ``label`` in the store's token directory."""
    conf = admin.store / "private" / "softhsm2.conf"
    location = library.TokenLocation(softhsm.default_module(), label, str(conf))
    library.refresh(location)
    return len(library.token_serials(location))


#: Operator token PINs refused, and what the refusal says. The embedded token has no lockout,
#: so root on the store's machine tried every 4-digit PIN with C_Login in about 30 s.
WEAK_PINS = [
    ("abc", "needs at least 12 characters, 4 of them different"),
    ("1234", "needs at least 12 characters, 4 of them different"),
    ("12345678901", "needs at least 12 characters, 4 of them different"),
    ("1234 5678-9", "needs at least 12 characters, 4 of them different"),
    ("a1234567", "needs at least 12 characters, 4 of them different"),  # a letter earns nothing
    ("password", "needs at least 12 characters, 4 of them different"),
    (" " * 12, "needs at least 12 characters, 4 of them different"),
    ("ab" * 8, "needs at least 12 characters, 4 of them different"),
    ("abcd" * 64, "has at most 255 bytes"),
]


def _refused_and_nothing_written(admin: Admin, result: Result, want: str) -> None:
    line = one_error_line(result)
    assert want in line, line
    if "at most" not in want:
        assert "no lockout" in line and "--passphrase" in line, line
    assert _labelled(admin, "op-zed") == 0
    assert not (admin.store / "private" / operators.PENDING_DIR / "zed").exists()
    assert not Context.at(admin.store).private.has_access("operator", "zed")
    assert admin("operator", "list").stdout.count("zed") == 0


@pytest.mark.parametrize(("pin", "want"), WEAK_PINS, ids=lambda v: f"{v[:12]}")
def test_a_weak_operator_token_pin_is_refused_and_leaves_nothing(
    initialized: Admin, pin: str, want: str
) -> None:
    admin = initialized
    before = tree_snapshot(admin.store)
    result = admin(
        "operator", "create", "zed", "--pin-file", admin.pin_file("zed", pin), check=2
    )
    assert tree_snapshot(admin.store) == before
    _refused_and_nothing_written(admin, result, want)


def test_a_weak_operator_token_pin_from_the_environment_is_refused(initialized: Admin) -> None:
    admin = initialized
    before = tree_snapshot(admin.store)
    result = admin(
        "operator", "create", "zed", "--pin-env", "ZED_PIN", env={"ZED_PIN": "4711"}, check=2
    )
    assert tree_snapshot(admin.store) == before
    _refused_and_nothing_written(admin, result, "needs at least 12 characters")


def test_a_pin_from_the_environment_loses_its_trailing_newline_as_from_a_file(
    initialized: Admin,
) -> None:
    """``ZED_PIN=$(printf 'abcdefghijk\\n')`` or an env file's line end: 11 characters and a
    newline passed the floor, and then only --pin-env (not a --pin-file of the same text)
    could sign with the key."""
    admin = initialized
    result = admin("operator", "create", "zed", "--pin-env", "ZED_PIN",
                   env={"ZED_PIN": "abcdefghijk\n"}, check=2)
    _refused_and_nothing_written(admin, result, "needs at least 12 characters")
    admin("operator", "create", "zed", "--pin-env", "ZED_PIN", env={"ZED_PIN": "abcdefghijkl\n"})
    trust = admin.propose(["hsm1"], ["zed"], 1)
    pin_file = admin.pin_file("zed", "abcdefghijkl")
    admin("trust", "sign", trust, "--as", "zed", "--pin-file", pin_file)


def test_a_weak_operator_token_pin_typed_at_the_prompt_is_refused(initialized: Admin) -> None:
    """No --pin-file or --pin-env: the PIN is typed on the terminal (here a pseudo-terminal
    without a controlling one, so getpass reads it from stdin and prompts on stderr)."""
    admin = initialized
    before = tree_snapshot(admin.store)
    prompt = b"new PIN for operator zed: "
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [*ADMIN, "--store", str(admin.store), "operator", "create", "zed"],
        stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(),
        start_new_session=True,
    )
    try:
        os.close(slave)
        assert proc.stderr is not None and proc.stdout is not None
        seen = b""
        while not seen.endswith(prompt):  # getpass flushes what is typed before it asks
            ready, _, _ = select.select([proc.stderr], [], [], 60)
            chunk = os.read(proc.stderr.fileno(), 4096) if ready else b""
            assert chunk, f"no prompt: {seen!r}"
            seen += chunk
        os.write(master, b"12345678\n")
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    assert proc.returncode == 2, seen + err
    assert tree_snapshot(admin.store) == before
    result = Result(proc.returncode, out.decode(), err.decode())
    _refused_and_nothing_written(admin, result, "needs at least 12 characters")


@pytest.mark.parametrize("pin", ["abcdefghijkl", "123456789012", "1234-5678-90", "abcabcabcabd"])
def test_an_operator_token_pin_at_the_floor_is_taken_and_signs(
    initialized: Admin, pin: str
) -> None:
    admin = initialized
    admin("operator", "create", "zed", "--pin-file", admin.pin_file("zed", pin))
    trust = admin.propose(["hsm1"], ["zed"], 1)
    admin("trust", "sign", trust, "--as", "zed", "--pin-file", admin.pin_file("zed"))


def test_a_passphrase_still_needs_8_characters(initialized: Admin) -> None:
    admin = initialized
    before = tree_snapshot(admin.store)
    line = one_error_line(admin(
        "operator", "create", "zed", "--passphrase", "--pin-file",
        admin.pin_file("zed", "seven77"), check=2,
    ))
    assert "a passphrase needs at least 8 characters" in line
    assert tree_snapshot(admin.store) == before
    digits = admin.pin_file("zed2", "12345678")  # scrypt: no letter needed
    admin("operator", "create", "zed", "--passphrase", "--pin-file", digits)


def test_an_interrupted_operator_create_is_undone_and_can_be_run_again(
    initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C as the operator is being saved, the last step: the token made for it, and its
    access record, go again."""
    admin = initialized
    ctx = Context.at(admin.store)

    def interrupted(self: Store, record: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Store, "save_operator", interrupted)
        with pytest.raises(KeyboardInterrupt):
            operators.create_operator(ctx, "zed", PinSource(file=admin.pin_file("zed")))
    assert _labelled(admin, "op-zed") == 0
    assert not ctx.private.has_access("operator", "zed")
    assert "zed" not in ctx.store.operator_names()
    admin("operator", "create", "zed", "--pin-file", admin.pin_file("zed"))
    trust = admin.propose(["hsm1"], ["zed"], 1)
    assert "zed signed" in admin("trust", "sign", trust, "--as", "zed", "--pin-file",
                                 admin.pin_file("zed")).stdout


def test_a_token_left_by_a_killed_operator_create_is_cleared_by_the_next(
    initialized: Admin,
) -> None:
    """kill -9 gives no chance to clean up: the token ``op-zed`` stays, with the run's pending
    mark, while the store has no operator zed. The next ``operator create zed`` must not fail
    on two tokens labelled so."""
    admin = initialized
    softhsm.create_token(admin.store / "private" / "softhsm2.conf", "op-zed", "left-over-pin")
    pending = admin.store / "private" / operators.PENDING_DIR
    pending.mkdir(mode=0o700, exist_ok=True)
    (pending / "zed").touch()
    assert _labelled(admin, "op-zed") == 1
    admin("operator", "create", "zed", "--pin-file", admin.pin_file("zed"))
    assert _labelled(admin, "op-zed") == 1
    trust = admin.propose(["hsm1"], ["zed"], 1)
    admin("trust", "sign", trust, "--as", "zed", "--pin-file", admin.pin_file("zed"))


def test_an_hsm_cannot_take_an_operator_token_label(initialized: Admin) -> None:
    admin = initialized
    admin.create_operators("alice")
    before = tree_snapshot(admin.store)
    line = one_error_line(admin("hsm", "create", "--label", "op-alice", check=2))
    assert "kept for operators' tokens" in line
    assert tree_snapshot(admin.store) == before
    trust = admin.propose(["hsm1"], ["alice"], 1)
    admin("trust", "sign", trust, "--as", "alice", "--pin-file", admin.pin_file("alice"))


def test_an_interrupted_hsm_create_removes_its_token_pin_and_access(
    initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = initialized
    ctx = Context.at(admin.store)
    access = sorted(p.name for p in (admin.store / "private" / "hsm-access").iterdir())

    def interrupted(self: Store, record: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Store, "save_hsm", interrupted)
        with pytest.raises(KeyboardInterrupt):
            hsms.create_hsm(ctx, "hsm3")
    assert _labelled(admin, "hsm3") == 0
    assert sorted(p.name for p in (admin.store / "private" / "hsm-access").iterdir()) == access
    admin("hsm", "create", "--label", "hsm3")
    assert _labelled(admin, "hsm3") == 1


def test_a_token_under_an_operator_label_without_a_mark_is_kept_and_refused(
    initialized: Admin,
) -> None:
    """Not every op-NAME token is a leftover: an HSM could be labelled op-foo before that was
    refused, and an operator's record may be missing from the store while the key is not.
    Deleting it could lose the only HSM that wraps a Domain's k, or an operator's key."""
    admin = initialized
    softhsm.create_token(admin.store / "private" / "softhsm2.conf", "op-foo", "an-hsm-pin")
    before = tree_snapshot(admin.store)
    line = one_error_line(
        admin("operator", "create", "foo", "--pin-file", admin.pin_file("foo"), check=6)
    )
    assert "a token labelled 'op-foo' exists in" in line and "nothing done" in line
    assert _labelled(admin, "op-foo") == 1
    def documents(snapshot: dict[str, bytes]) -> dict[str, bytes]:  # not SoftHSM's, the lock
        return {k: v for k, v in snapshot.items() if "tokens/" not in k and k != ".lock"}

    assert documents(tree_snapshot(admin.store)) == documents(before)


def test_a_passphrase_operator_may_have_a_name_too_long_for_a_token_label(
    initialized: Admin,
) -> None:
    name = "a-rather-long-operator-name-of-40-chars"
    admin = initialized
    admin("operator", "create", name, "--passphrase", "--pin-file",
          admin.pin_file(name, "a long enough passphrase"))
    assert name in admin("operator", "list").stdout


def _fill_up(directory: Path) -> None:
    """Fill the file system of *directory* until not one more byte can be written."""
    directory.mkdir()
    for n, size in enumerate((1 << 20, 1 << 16, 4096, 1) * 200):
        try:
            with open(directory / f"filler{n}", "wb") as f:
                f.write(os.urandom(size))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def test_a_sign_or_seal_on_a_full_disk_leaves_no_empty_directory(tmp_path: Path) -> None:
    """Review: on a full disk, `trust sign` and `trust seal` failed (exit 6) as they should,
    but left an empty ``approvals/<id>/`` or ``seals/<id>/`` behind, which a sync then copied
    to every replica. Nothing of theirs is left now, and both work once there is room."""
    def public(admin: Admin) -> dict[str, bytes]:  # SoftHSM rewrites its token at each login
        return {k: v for k, v in tree_snapshot(admin.store).items() if not k.startswith("private")}

    with tmpfs(tmp_path / "small", "24m") as small:
        admin = Admin(small / "store", Admin.under(tmp_path).pins)
        admin("init", "--hsms", "1")
        admin.create_operators("alice")
        root = json.loads((admin.store / "store.json").read_text())["root"]
        trust = admin.propose(["hsm1"], ["alice"], 1, predecessor=root)
        before = public(admin)
        _fill_up(small / "filler")
        line = one_error_line(admin("trust", "sign", trust, "--as", "alice", "--pin-file",
                                    admin.pin_file("alice"), check=6))
        assert "No space left on device" in line, line
        assert public(admin) == before
        shutil.rmtree(small / "filler")
        admin.sign(trust, "alice")
        before = public(admin)
        _fill_up(small / "filler")
        line = one_error_line(admin("trust", "seal", trust, check=6))
        assert "No space left on device" in line, line
        assert public(admin) == before
        shutil.rmtree(small / "filler")
        admin("trust", "seal", trust)


def test_an_operator_created_on_a_full_disk_is_told_so(tmp_path: Path) -> None:
    """Review: `operator create` on a full disk said "softhsm2-util could not create token
    'op-erin': Please check log files", exit 4 (no HSM). It names the full disk now, exit 6 as
    every other write to a full store, and leaves no token or record behind."""
    with tmpfs(tmp_path / "small", "24m") as small:
        admin = Admin(small / "store", Admin.under(tmp_path).pins)
        admin("init", "--hsms", "1")
        before = tree_snapshot(admin.store)
        _fill_up(small / "filler")
        line = one_error_line(admin(
            "operator", "create", "erin", "--pin-file", admin.pin_file("erin"), check=6))
        assert line.endswith("cannot make token 'op-erin': No space left on device"), line
        left = set(tree_snapshot(admin.store)) - {".lock"}  # the store's lock, made once
        assert left == set(before), left ^ set(before)
        shutil.rmtree(small / "filler")
        admin.create_operators("erin")
