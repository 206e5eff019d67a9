"""Every kmsfs-admin command through the real CLI, with real SoftHSM2 tokens, and its errors.

The error contract (DESIGN.md §2.6): one line on stderr, a stable non-zero exit code, and
nothing changed on disk.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kmsfs import exitcodes
from tests.kms_helpers import Admin, hsm_seal, one_error_line, tree_snapshot

REPO = Path(__file__).resolve().parents[2]


def test_init_creates_store_hsms_and_sealed_genesis(admin: Admin) -> None:
    genesis = admin("init", "--hsms", "2").last_line
    hsms = admin("--json", "hsm", "list").json
    assert [h["label"] for h in hsms] == ["hsm1", "hsm2"]
    assert all(len(h["id"]) == 64 for h in hsms)
    assert {h["sign"] for h in hsms} == {"ed25519"}  # probed: SoftHSM 2.6 does CKM_EDDSA
    assert {h["wrap"] for h in hsms} <= {"rsa-oaep-sha1", "rsa-oaep-sha256"}
    shown = admin("--json", "trust", "show", genesis).json
    assert (
        shown["quorum"] == 0 and shown["operators"] == [] and shown["sealed_by"] in ("hsm1", "hsm2")
    )
    admin("trust", "verify", genesis)
    assert json.loads((admin.store / "store.json").read_text())["root"] == genesis


def test_secrets_stay_private_and_out_of_documents(initialized: Admin) -> None:
    private = initialized.store / "private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    pins = list((private / "pins").iterdir())
    assert len(pins) == 2
    for pin in pins:
        assert stat.S_IMODE(pin.stat().st_mode) == 0o600
        secret = pin.read_text().strip().encode()
        for path in initialized.store.rglob("*"):
            if path.is_file() and private not in path.parents:
                assert secret not in path.read_bytes(), f"a PIN leaked into {path}"


def test_init_refuses_an_existing_store_and_changes_nothing(initialized: Admin) -> None:
    before = tree_snapshot(initialized.store)
    result = initialized("init", check=exitcodes.STORE)
    assert "already" in one_error_line(result)
    assert tree_snapshot(initialized.store) == before


def test_init_refuses_a_non_empty_directory(admin: Admin) -> None:
    admin.store.mkdir()
    (admin.store / "precious.txt").write_text("keep me")
    result = admin("init", check=exitcodes.STORE)
    assert "not an empty directory" in one_error_line(result)
    assert tree_snapshot(admin.store) == {"precious.txt": b"keep me"}


@pytest.mark.parametrize("count", ["0", "17", "x"])
def test_init_rejects_bad_hsm_counts_without_creating_anything(admin: Admin, count: str) -> None:
    result = admin("init", "--hsms", count, check=exitcodes.USAGE)
    assert "error" in result.stderr
    assert not admin.store.exists()


def test_hsm_create_adds_a_token_with_its_own_keys(initialized: Admin) -> None:
    created = initialized("--json", "hsm", "create", "--label", "vault3").json
    assert created["label"] == "vault3"
    assert len(initialized("--json", "hsm", "list").json) == 3
    result = initialized("hsm", "create", "--label", "vault3", check=exitcodes.STORE)
    assert "already exists" in one_error_line(result)


def _softhsm_token(admin: Admin, label: str, pin: str) -> None:
    """An existing token made outside kmsfs, as an administrator would with softhsm2-util."""
    env = dict(os.environ, SOFTHSM2_CONF=str(admin.store / "private" / "softhsm2.conf"))
    subprocess.run(
        [
            "softhsm2-util",
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin,
            "--so-pin",
            "so-123456",
        ],
        env=env,
        check=True,
        capture_output=True,
    )


def test_hsm_enroll_probes_an_existing_pkcs11_token(initialized: Admin) -> None:
    _softhsm_token(initialized, "external", "ext-pin-4242")
    pin_file = initialized.pin_file("external", "ext-pin-4242")
    module = "/usr/lib/softhsm/libsofthsm2.so"
    enrolled = initialized(
        "--json", "hsm", "enroll", "--module", module, "--token", "external", "--pin-file", pin_file
    ).json
    assert enrolled["sign"] == "ed25519" and enrolled["wrap"].startswith("rsa-oaep-")
    assert enrolled["id"] in [h["id"] for h in initialized("--json", "hsm", "list").json]
    again = initialized(
        "hsm",
        "enroll",
        "--module",
        module,
        "--token",
        "external",
        "--pin-file",
        pin_file,
        check=exitcodes.STORE,
    )
    assert "already" in one_error_line(again)


def test_hsm_enroll_errors_change_nothing(initialized: Admin) -> None:
    _softhsm_token(initialized, "external", "right-pin-1")
    module = "/usr/lib/softhsm/libsofthsm2.so"
    before = tree_snapshot(initialized.store / "hsms")
    wrong = initialized(
        "hsm",
        "enroll",
        "--module",
        module,
        "--token",
        "external",
        "--pin-file",
        initialized.pin_file("wrong", "wrong-pin-1"),
        check=exitcodes.PIN,
    )
    assert "wrong PIN" in one_error_line(wrong)
    absent = initialized(
        "hsm",
        "enroll",
        "--module",
        module,
        "--token",
        "nosuch",
        "--pin-file",
        initialized.pin_file("wrong"),
        check=exitcodes.HSM,
    )
    assert "not present" in one_error_line(absent)
    nomodule = initialized(
        "hsm",
        "enroll",
        "--module",
        "/nonexistent/p11.so",
        "--token",
        "x",
        "--pin-file",
        initialized.pin_file("wrong"),
        check=exitcodes.HSM,
    )
    assert "/nonexistent/p11.so" in one_error_line(nomodule)
    assert tree_snapshot(initialized.store / "hsms") == before


def test_operator_create_and_its_errors(initialized: Admin) -> None:
    initialized.create_operators("alice")
    listed = initialized("--json", "operator", "list").json
    assert [(o["name"], o["protection"]) for o in listed] == [("alice", "token")]
    dup = initialized(
        "operator",
        "create",
        "alice",
        "--pin-file",
        initialized.pin_file("alice"),
        check=exitcodes.STORE,
    )
    assert "already exists" in one_error_line(dup)
    bad = initialized(
        "operator",
        "create",
        "../evil",
        "--pin-file",
        initialized.pin_file("x"),
        check=exitcodes.USAGE,
    )
    assert "error: argument NAME: '../evil' is not a name" in bad.stderr
    empty = initialized.pins / "empty.pin"
    empty.write_text("")
    no_pin = initialized("operator", "create", "bob", "--pin-file", str(empty), check=exitcodes.PIN)
    assert "empty" in one_error_line(no_pin)
    missing = initialized(
        "operator", "create", "bob", "--pin-file", "/nonexistent/pin", check=exitcodes.PIN
    )
    assert "/nonexistent/pin" in one_error_line(missing)
    assert [o["name"] for o in initialized("--json", "operator", "list").json] == ["alice"]


def test_passphrase_operator_signs_only_with_its_passphrase(initialized: Admin) -> None:
    phrase = initialized.pin_file("dora", "correct horse battery")
    initialized("operator", "create", "dora", "--passphrase", "--pin-file", phrase)
    key_file = initialized.store / "private" / "operator-keys" / "dora.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert b"correct horse" not in key_file.read_bytes()
    trust = initialized.propose(["hsm1"], ["dora"], 1)
    wrong = initialized(
        "trust",
        "sign",
        trust,
        "--as",
        "dora",
        "--pin-file",
        initialized.pin_file("nope", "wrong horse battery"),
        check=exitcodes.PIN,
    )
    assert "wrong passphrase" in one_error_line(wrong)
    initialized("trust", "sign", trust, "--as", "dora", "--pin-file", phrase)
    initialized("trust", "seal", trust)


def test_trust_propose_rejects_bad_arguments(initialized: Admin) -> None:
    initialized.create_operators("alice", "bob")
    before = tree_snapshot(initialized.store / "trusts")
    cases = [
        (
            ["--hsm", "hsm1", "--operator", "alice", "--quorum", "2"],
            exitcodes.USAGE,
            "between 1 and 1",
        ),
        (
            ["--hsm", "hsm1", "--operator", "alice", "--quorum", "0"],
            exitcodes.USAGE,
            "between 1 and 1",
        ),
        (["--hsm", "nosuch", "--operator", "alice", "--quorum", "1"], exitcodes.STORE, "nosuch"),
        (["--hsm", "hsm1", "--operator", "mallory", "--quorum", "1"], exitcodes.STORE, "mallory"),
        (["--hsm", "hsm1", "--quorum", "1"], exitcodes.USAGE, "--operator"),
        (["--operator", "alice", "--quorum", "1"], exitcodes.USAGE, "--hsm"),
        (
            ["--hsm", "hsm1", "--operator", "alice", "--operator", "alice", "--quorum", "1"],
            exitcodes.USAGE,
            "twice",
        ),
        (
            ["--hsm", "hsm1", "--operator", "alice", "--quorum", "1", "--predecessor", "ffff"],
            exitcodes.STORE,
            "ffff",
        ),
    ]
    for args, code, words in cases:
        assert words in one_error_line(initialized("trust", "propose", *args, check=code))
    assert tree_snapshot(initialized.store / "trusts") == before


def test_trust_show_list_and_tolerance(initialized: Admin) -> None:
    initialized.create_operators("alice", "bob", "carol")
    trust = initialized.propose(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    text = initialized("trust", "show", trust[:8]).stdout
    assert "resists 1 dishonest signer(s) for forgery, 1 refusing for denial" in text
    initialized.sign(trust, "alice")
    shown = initialized("--json", "trust", "show", trust).json
    assert shown["approvals"]["signed"] == ["alice"] and shown["tolerates"] == {
        "forgery": 1,
        "denial": 1,
    }
    assert [t["id"] for t in initialized("--json", "trust", "list", "--unsigned").json] == [trust]
    assert [t["id"] for t in initialized("--json", "trust", "list", "--mine", "bob").json] == [
        trust
    ]
    assert initialized("--json", "trust", "list", "--mine", "alice").json == []
    initialized.sign(trust, "bob")
    initialized("trust", "seal", trust, "--hsm", "hsm2")
    assert trust in [t["id"] for t in initialized("--json", "trust", "list", "--signed").json]
    assert initialized("--json", "trust", "show", trust).json["sealed_by"] == "hsm2"


def test_seal_refuses_an_hsm_outside_the_trust(initialized: Admin) -> None:
    initialized.create_operators("alice")
    trust = initialized.propose(["hsm1"], ["alice"], 1)
    initialized.sign(trust, "alice")
    result = initialized("trust", "seal", trust, "--hsm", "hsm2", check=exitcodes.USAGE)
    assert "not in trust" in one_error_line(result)
    assert not (initialized.store / "seals" / trust).exists()


def test_non_member_cannot_sign(initialized: Admin) -> None:
    initialized.create_operators("alice", "mallory")
    trust = initialized.propose(["hsm1"], ["alice"], 1)
    result = initialized(
        "trust",
        "sign",
        trust,
        "--as",
        "mallory",
        "--pin-file",
        initialized.pin_file("mallory"),
        check=exitcodes.USAGE,
    )
    assert "not in trust" in one_error_line(result)
    assert not (initialized.store / "approvals" / trust).exists()


def test_domain_lifecycle_create_verify_export_rewrap(initialized: Admin) -> None:
    initialized.create_operators("alice", "bob", "carol")
    genesis = initialized("--json", "trust", "list").json[0]["id"]
    refused = initialized("domain", "create", "early", "--trust", genesis, check=exitcodes.USAGE)
    assert "genesis" in one_error_line(refused)
    trust = initialized.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 2)
    created = initialized("--json", "domain", "create", "payroll", "--trust", trust).json
    assert created["generation"] == 1 and created["hsms"] == ["hsm1", "hsm2"]
    dup = initialized("domain", "create", "payroll", "--trust", trust, check=exitcodes.STORE)
    assert "exists already" in one_error_line(dup)
    assert [d["name"] for d in initialized("--json", "domain", "list").json] == ["payroll"]
    initialized("domain", "verify", "payroll")
    bundle = json.loads(initialized("domain", "export", "payroll").stdout)
    assert bundle["_type"] == "domain-bundle" and len(bundle["chain"]) == 2

    # Revoke hsm2 and add carol: a successor approved by the old quorum and its own.
    successor = initialized.sealed_trust(
        ["hsm1"], ["alice", "carol"], 2, signers=["alice", "bob", "carol"], predecessor=trust
    )
    rewrapped = initialized("--json", "domain", "rewrap", "payroll", "--trust", successor).json
    assert rewrapped["generation"] == 2 and rewrapped["hsms"] == ["hsm1"]
    assert rewrapped["trust"] == successor
    new_bundle = json.loads(initialized("domain", "export", "payroll").stdout)
    old_k = {w["hsm"]: w["data"] for w in bundle["domain"]["domain"]["k"]}
    new_k = {w["hsm"]: w["data"] for w in new_bundle["domain"]["domain"]["k"]}
    assert set(new_k) == {
        h["id"] for h in initialized("--json", "hsm", "list").json if h["label"] == "hsm1"
    }
    assert new_k[next(iter(new_k))] != old_k[next(iter(new_k))], "rewrap must make a fresh k"
    assert (
        new_bundle["domain"]["domain"]["mk"] != bundle["domain"]["domain"]["mk"]
    )  # rewrapped by new k


def test_rewrap_refuses_a_trust_that_is_not_a_successor(initialized: Admin) -> None:
    initialized.create_operators("alice", "bob")
    base = initialized.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
    first = initialized.sealed_trust(["hsm1"], ["alice"], 1, predecessor=base)
    initialized("domain", "create", "d1", "--trust", first)  # before the fork (test_forked_line)
    sibling = initialized.sealed_trust(["hsm2"], ["bob"], 1, ["alice", "bob"], predecessor=base,
                                       fork=True)
    before = tree_snapshot(initialized.store / "domains")
    result = initialized("domain", "rewrap", "d1", "--trust", sibling, check=exitcodes.USAGE)
    assert "not a successor" in one_error_line(result)
    assert tree_snapshot(initialized.store / "domains") == before


def test_a_damaged_document_is_reported_by_name(initialized: Admin) -> None:
    initialized.create_operators("alice")
    trust = initialized.sealed_trust(["hsm1"], ["alice"], 1)
    path = initialized.store / "trusts" / f"{trust}.json"
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    result = initialized("trust", "verify", trust, check=exitcodes.FORMAT)
    assert f"trusts/{trust}.json" in one_error_line(result)
    path.write_bytes(original.replace(b'"quorum":1', b'"quorum":1 '))  # same meaning, other bytes
    initialized("trust", "verify", trust)  # content-addressed: the parsed content still matches
    hsm_doc = next((initialized.store / "hsms").iterdir())
    hsm_doc.write_bytes(hsm_doc.read_bytes().replace(b'"label":"hsm', b'"label":"xsm'))
    result = initialized("hsm", "list", check=exitcodes.VERIFICATION)
    assert hsm_doc.name in one_error_line(result)


def test_a_domain_of_another_store_is_refused(initialized: Admin, tmp_path: Path) -> None:
    other = Admin(tmp_path / "other-store", initialized.pins)
    other("init", "--hsms", "1")
    other.create_operators("zed")
    trust = other.sealed_trust(["hsm1"], ["zed"], 1)
    other("domain", "create", "theirs", "--trust", trust)
    (initialized.store / "domains").mkdir()
    shutil.copy(next((other.store / "domains").iterdir()), initialized.store / "domains")
    result = initialized("domain", "verify", "theirs", check=exitcodes.VERIFICATION)
    assert "missing" in one_error_line(result) or "another store" in result.stderr


def test_concurrent_signers_lose_nothing(initialized: Admin) -> None:
    names = ["alice", "bob", "carol", "dave"]
    initialized.create_operators(*names)
    trust = initialized.propose(["hsm1"], names, 4)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: initialized.sign(trust, n), names))
    assert initialized("--json", "trust", "show", trust).json["approvals"]["signed"] == names
    initialized("trust", "seal", trust)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["init"],
        ["hsm", "create"],
        ["hsm", "enroll"],
        ["hsm", "list"],
        ["operator", "create"],
        ["operator", "list"],
        ["trust", "propose"],
        ["trust", "list"],
        ["trust", "show"],
        ["trust", "sign"],
        ["trust", "seal"],
        ["trust", "verify"],
        ["domain", "create"],
        ["domain", "list"],
        ["domain", "verify"],
        ["domain", "rewrap"],
        ["domain", "export"],
    ],
)
def test_every_command_has_help_with_an_example(admin: Admin, command: list[str]) -> None:
    result = admin(*command, "--help")
    assert "example" in result.stdout.lower()


def test_pins_never_appear_in_output_or_logs(initialized: Admin) -> None:
    """Even with debug logging, no command prints a PIN (DESIGN.md: never log key material)."""
    pin = "s3cret-pin-4711"
    pin_file = initialized.pin_file("alice", pin)
    outputs = [
        initialized("-v", "operator", "create", "alice", "--pin-file", pin_file),
        initialized("-v", "trust", "list"),
    ]
    trust = initialized.propose(["hsm1"], ["alice"], 1)
    outputs.append(
        initialized("-v", "trust", "sign", trust, "--as", "alice", "--pin-file", pin_file)
    )
    outputs.append(initialized("-v", "trust", "seal", trust))
    outputs.append(initialized("-v", "domain", "create", "d", "--trust", trust))
    wrong = initialized.pin_file("wrong", "wr0ng-pin-0815")
    # a Trust alice has not signed: on `trust`, signing again is a no-op that reads no PIN
    unsigned = initialized.propose(["hsm1"], ["alice"], 1, predecessor=trust)
    outputs.append(
        initialized(
            "-v", "trust", "sign", unsigned, "--as", "alice", "--pin-file", wrong,
            check=exitcodes.PIN,
        )
    )
    hsm_pins = [p.read_text().strip() for p in (initialized.store / "private" / "pins").iterdir()]
    for result in outputs:
        for secret in [pin, "wr0ng-pin-0815", *hsm_pins]:
            assert secret not in result.stdout + result.stderr


def test_the_genesis_has_one_successor_per_store(initialized: Admin) -> None:
    """Quorum 0 must not let an HSM PIN holder found a rival line of Trusts (DESIGN.md §2.3)."""
    initialized.create_operators("alice", "mallory")
    honest = initialized.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
    assert json.loads((initialized.store / "store.json").read_text())["successor"] == honest
    genesis = json.loads((initialized.store / "store.json").read_text())["root"]
    result = initialized(
        "trust",
        "propose",
        "--hsm",
        "hsm1",
        "--operator",
        "mallory",
        "--quorum",
        "1",
        "--predecessor",
        genesis,
        check=exitcodes.USAGE,
    )
    assert "already has its successor" in one_error_line(result)
    result = initialized(
        "trust",
        "propose",
        "--hsm",
        "hsm1",
        "--operator",
        "mallory",
        "--quorum",
        "1",
        check=exitcodes.USAGE,
    )
    assert "--predecessor" in one_error_line(result)


def _union(source: Path, target: Path) -> None:
    """Sync *source*'s documents into *target* by union (``rsync -a --ignore-existing
    --exclude private/``)."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.parts[0] == "private" or (target / relative).exists():
            continue
        if path.is_dir():
            (target / relative).mkdir()
        else:
            shutil.copy2(path, target / relative)


def test_trust_pin_for_a_store_copied_before_the_ceremony(
    initialized: Admin, tmp_path: Path
) -> None:
    initialized.create_operators("alice", "bob")
    copy = initialized.copy(tmp_path / "copy")  # taken before the seal: nothing pinned
    rival_site = initialized.copy(tmp_path / "rival")
    honest = initialized.sealed_trust(["hsm1"], ["alice"], 1)
    rival = rival_site.sealed_trust(["hsm2"], ["bob"], 1)  # sealed elsewhere, pinned there
    _union(initialized.store, copy.store)
    _union(rival_site.store, copy.store)  # both arrived by sync
    copy("trust", "verify", rival)  # without a pin, nothing tells them apart...
    copy("trust", "pin", honest)  # ...so the operators tell the copy which one it is
    assert json.loads((copy.store / "store.json").read_text())["successor"] == honest
    result = copy("trust", "verify", rival, check=exitcodes.VERIFICATION)
    assert "rival" in one_error_line(result)
    again = copy("trust", "pin", rival, check=exitcodes.VERIFICATION)
    assert "rival" in one_error_line(again)


def test_a_store_json_replaced_by_a_sync_changes_no_pin(
    initialized: Admin, tmp_path: Path
) -> None:
    """store.json is among the synced documents: a plain ``rsync -a`` of another store
    replaced this store's pinned root, and that store's Domains verified here while this
    store's own did not. The store's own copy of its pins, in private/, is what counts."""
    initialized.real_domain("payroll")
    other = Admin.under(tmp_path / "elsewhere")
    other("init", "--hsms", "1")
    other.create_operators("mallory")
    trust = other.sealed_trust(["hsm1"], ["mallory"], 1)
    other("domain", "create", "forged", "--trust", trust)
    kept = (initialized.store / "store.json").read_bytes()
    for name in ("store.json", "trusts", "approvals", "seals", "domains", "hsms", "operators"):
        source = other.store / name
        if source.is_dir():
            shutil.copytree(source, initialized.store / name, dirs_exist_ok=True)
        else:  # plain rsync -a: the other store's pins over this one's
            (initialized.store / name).chmod(0o644)
            shutil.copy2(source, initialized.store / name)
    verified = initialized("domain", "verify", "payroll")
    warning = verified.stderr.strip().splitlines()
    assert len(warning) == 1 and "a copy or sync replaced it, and it is ignored" in warning[0]
    assert warning[0].startswith(f"kmsfs-admin: warning: {initialized.store / 'store.json'} ")
    assert f"install -m 0644 {initialized.store / 'private' / 'anchor.json'}" in warning[0]
    refused = initialized("domain", "verify", "forged", check=exitcodes.VERIFICATION)
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("kmsfs-admin: error: ") and "but this store pins root" in error
    assert (initialized.store / "private" / "anchor.json").read_bytes() == kept


def test_an_enrolled_hsm_can_take_its_pin_from_a_systemd_credential(
    initialized: Admin, tmp_path: Path
) -> None:
    _softhsm_token(initialized, "vault", "vault-pin-77")
    module = "/usr/lib/softhsm/libsofthsm2.so"
    initialized(
        "hsm",
        "enroll",
        "--module",
        module,
        "--token",
        "vault",
        "--label",
        "vault",
        "--pin-file",
        initialized.pin_file("vault", "vault-pin-77"),
        "--pin-credential",
        "vault.pin",
    )
    initialized.create_operators("alice")
    # The genesis's successor is sealed by an HSM of the genesis; the vault's Trust follows it.
    first = initialized.sealed_trust(["hsm1"], ["alice"], 1)
    trust = initialized.propose(["vault"], ["alice"], 1, predecessor=first)
    initialized.sign(trust, "alice")
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "vault.pin").write_text("vault-pin-77\n")
    service = {"CREDENTIALS_DIRECTORY": str(creds)}
    without = initialized("trust", "seal", trust, check=exitcodes.PIN)  # the only HSM: no PIN
    assert "LoadCredential" in one_error_line(without)
    initialized("trust", "seal", trust, env=service)
    initialized("domain", "create", "d", "--trust", trust, env=service)


def test_a_path_that_is_not_a_store_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A mistyped --store: `operator create` made half a store there and exited 0, and the
    listings printed empty tables."""
    admin = Admin.under(tmp_path, store="typo")
    for args in (
        ("operator", "create", "x", "--pin-file", admin.pin_file("x")),
        ("hsm", "create", "--label", "h"),
        ("trust", "list"),
        ("domain", "list"),
    ):
        line = one_error_line(admin(*args, check=6))
        assert "is not a kmsfs store (no store.json)" in line, args
    assert not (tmp_path / "typo").exists()


def test_json_goes_before_or_after_the_command(initialized: Admin) -> None:
    """kmsfs takes --json after the command, kmsfs-admin took it only before: a script
    written for one failed on the other with "unrecognized arguments"."""
    before = json.loads(initialized("--json", "hsm", "list").stdout)
    after = json.loads(initialized("hsm", "list", "--json").stdout)
    assert before == after and sorted(h["label"] for h in after) == ["hsm1", "hsm2"]
    assert not initialized("hsm", "list").stdout.lstrip().startswith("[")


def test_tokens_made_in_a_copied_store_are_its_own(initialized: Admin, tmp_path: Path) -> None:
    """A copy carries a softhsm2.conf naming the original's token directory: `operator create`
    and `hsm create` in the copy made their tokens there, where the copy never looks again."""
    original_tokens = initialized.store / "private" / "tokens"
    before = sorted(p.name for p in original_tokens.iterdir())

    with_operator = initialized.copy(tmp_path / "copy1")
    with_operator.create_operators("erin")
    assert sorted(p.name for p in original_tokens.iterdir()) == before
    with_operator.sealed_trust(["hsm1"], ["erin"], 1)  # erin signs with her token

    with_hsm = initialized.copy(tmp_path / "copy2")
    with_hsm("hsm", "create", "--label", "hsm9")
    assert sorted(p.name for p in original_tokens.iterdir()) == before
    with_hsm.create_operators("alice")
    first = with_hsm.sealed_trust(["hsm1", "hsm9"], ["alice"], 1)
    with_hsm.sealed_trust(["hsm9"], ["alice"], 1, predecessor=first)  # hsm9 seals it


def test_a_store_made_before_its_own_pins_gets_them_at_first_use(initialized: Admin) -> None:
    own = initialized.store / "private" / "anchor.json"
    assert own.read_bytes() == (initialized.store / "store.json").read_bytes()
    assert stat.S_IMODE(own.stat().st_mode) == 0o600
    own.unlink()  # as a store made by an earlier kmsfs
    genesis = json.loads((initialized.store / "store.json").read_text())["root"]
    initialized("trust", "verify", genesis)
    assert own.read_bytes() == (initialized.store / "store.json").read_bytes()


def test_a_synced_pin_is_named_and_taken_only_by_trust_pin(
    initialized: Admin, tmp_path: Path
) -> None:
    """An operator's store that mirrors the agent's with rsync -a gets the sealed successor's
    pin in store.json: the store's own pins stay as they were until the operators pin it."""
    initialized.create_operators("alice")
    mirror = initialized.copy(tmp_path / "mirror")  # before the ceremony
    honest = initialized.sealed_trust(["hsm1"], ["alice"], 1)
    _union(initialized.store, mirror.store)
    shutil.copy2(initialized.store / "store.json", mirror.store / "store.json")
    warned = mirror("trust", "verify", honest).stderr
    assert f"pin it with 'kmsfs-admin trust pin {honest}'" in warned
    mirror("trust", "pin", honest)
    assert mirror("trust", "verify", honest).stderr == ""


def _sealed_by_its_own_hsm_alone(admin: Admin, predecessor: str) -> str:
    """A successor of *predecessor* that lists a new HSM and sealed by it, no approval: what
    anyone who writes a replica can plant."""
    from kmsfs.service.context import Context

    admin("hsm", "create", "--label", "planted")
    trust_id = admin.propose(["planted"], ["alice"], 1, predecessor=predecessor)
    seal = hsm_seal(admin.store, trust_id, "planted")
    Context.at(admin.store).store.save_signature("seal", seal)
    return trust_id


def test_a_seal_without_the_quorums_is_not_taken_for_done(initialized: Admin) -> None:
    """A seal by an HSM the Trust lists, without its quorums, is a valid signature: `trust
    seal` took it for "already sealed", exit 0, where it must refuse."""
    initialized.create_operators("alice")
    first = initialized.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
    forged = _sealed_by_its_own_hsm_alone(initialized, first)
    refused = initialized("trust", "seal", forged, check=exitcodes.VERIFICATION)
    assert "already" not in refused.stdout + refused.stderr


def test_successors_sealed_at_two_sites_are_shown_as_a_fork(
    initialized: Admin, tmp_path: Path
) -> None:
    initialized.create_operators("alice", "bob")
    first = initialized.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 1)
    other_site = initialized.copy(tmp_path / "site-b")
    here = initialized.sealed_trust(["hsm1"], ["alice"], 1, predecessor=first)
    there = other_site.sealed_trust(["hsm2"], ["bob"], 1, predecessor=first)
    forged = _sealed_by_its_own_hsm_alone(initialized, first)
    assert initialized("trust", "list").stderr == ""  # a forgery is no fork: it cannot verify
    initialized("trust", "verify", forged, check=exitcodes.VERIFICATION)
    _union(other_site.store, initialized.store)
    listed = initialized("--json", "trust", "list")
    rivals = {row["id"]: row["rivals"] for row in listed.json}
    assert rivals[here] == [there] and rivals[there] == [here] and rivals[first] == []
    (warning,) = listed.stderr.strip().splitlines()
    assert warning.startswith("kmsfs-admin: warning: trusts ") and "must keep one" in warning
    table = initialized("trust", "list").stdout
    assert table.count("sealed, forked (rival ") == 2


def test_a_damaged_store_json_leaves_the_own_pins_serving(initialized: Admin) -> None:
    trust = initialized.real_domain("payroll")
    initialized("domain", "create", "hr", "--trust", trust)
    (initialized.store / "store.json").chmod(0o644)
    (initialized.store / "store.json").write_text('{"_type": "store", "format": 2}')
    listed = initialized("--json", "domain", "list")
    assert [d["verified"] for d in listed.json] == [True, True]
    (warning,) = listed.stderr.strip().splitlines()  # once, though each Domain reads the pins
    assert "store.json" in warning and "this store's own pins" in warning


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to the user nobody")
def test_a_user_who_cannot_read_the_private_area_verifies_by_store_json() -> None:
    """Documents are public, the private area is 0700: a user other than the store's owner
    verifying a Trust failed on private/anchor.json (permission denied, exit 6)."""
    work = Path(tempfile.mkdtemp(prefix="store-other-user-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        admin = Admin.under(work)
        admin("init", "--hsms", "1")
        genesis = json.loads((admin.store / "store.json").read_text())["root"]
        run = subprocess.run(
            [sys.executable, "-m", "kmsfs.admin.cli", "--store", str(admin.store),
             "trust", "verify", genesis],
            cwd="/", capture_output=True, text=True, timeout=120, user="nobody",
            group="nogroup", extra_groups=[],
            env={"PATH": os.environ["PATH"], "HOME": "/", "PYTHONPATH": str(REPO)},
        )
        assert run.returncode == 0, run.stderr
        assert "verifies" in run.stdout
    finally:
        shutil.rmtree(work)


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to the user nobody")
def test_root_reading_a_users_store_leaves_its_own_pins_the_users() -> None:
    """Root's first read of a user's store (made before it kept its own pins) wrote
    private/anchor.json as root, mode 0600: the user's own commands then failed on it."""
    work = Path(tempfile.mkdtemp(prefix="store-of-a-user-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        store = work / "store"

        def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "kmsfs.admin.cli", "--store", str(store), *args],
                cwd="/", capture_output=True, text=True, timeout=120, user="nobody",
                group="nogroup", extra_groups=[],
                env={"PATH": os.environ["PATH"], "HOME": str(work), "PYTHONPATH": str(REPO),
                     "XDG_RUNTIME_DIR": str(work)},
            )

        shutil.chown(work, "nobody", "nogroup")
        made = as_nobody("init", "--hsms", "1")
        assert made.returncode == 0, made.stderr
        own = store / "private" / "anchor.json"
        own.unlink()  # as a store made by an earlier kmsfs
        genesis = json.loads((store / "store.json").read_text())["root"]
        Admin(store, work / "pins")("trust", "verify", genesis)  # root, first use
        assert own.stat().st_uid == store.stat().st_uid != 0
        verified = as_nobody("trust", "verify", genesis)
        assert verified.returncode == 0, verified.stderr
    finally:
        shutil.rmtree(work)


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to the user nobody")
def test_a_new_users_first_init_makes_the_default_store_path() -> None:
    """Review: `kmsfs-admin init` with no --store on a fresh account failed (exit 6) on the
    tool's own default, ~/.local/share/kmsfs/store, whose parents a new user does not have:
    the guard against a mistyped --store caught a path nobody typed. The default's parents are
    made now (0700, the user's), and taken away again by an init that fails."""
    work = Path(tempfile.mkdtemp(prefix="store-new-user-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        home = work / "home"
        home.mkdir()
        shutil.chown(home, "nobody", "nogroup")

        def init(path: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "kmsfs.admin.cli", "init", "--hsms", "1"],
                cwd="/", capture_output=True, text=True, timeout=120, user="nobody",
                group="nogroup", extra_groups=[],
                env={"PATH": path, "HOME": str(home), "PYTHONPATH": str(REPO),
                     "XDG_RUNTIME_DIR": str(work)},
            )

        failed = init("/nonexistent")  # no softhsm2-util: the HSM cannot be made
        assert failed.returncode != 0 and "Traceback" not in failed.stderr, failed.stderr
        assert list(home.iterdir()) == []  # the parents it made are gone again
        made = init(os.environ["PATH"])
        assert made.returncode == 0, made.stderr
        store = home / ".local" / "share" / "kmsfs" / "store"
        assert (store / "store.json").is_file()
        for parent in (home / ".local", home / ".local" / "share", store.parent):
            assert stat.S_IMODE(parent.stat().st_mode) == 0o700, parent
            assert parent.stat().st_uid == store.stat().st_uid != 0
    finally:
        shutil.rmtree(work)
