"""Tokens that are not the embedded default: what kmsfs needs of a PKCS#11 token, checked when
it is enrolled, and the RSA-PSS signing path (tokens without Ed25519) end to end.

SoftHSM2 can hide mechanisms from its slots (``slots.mechanisms`` in softhsm2.conf), which makes
a real token lacking what another vendor's token may lack: Ed25519, AES key wrap with padding,
HMAC-SHA256, RSA-OAEP. Each such token lives under a SoftHSM config of its own beside the
store's embedded tokens, as a token of another module would.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kmsfs import exitcodes
from kmsfs.hsm import library
from tests.kms_helpers import Admin, one_error_line, tree_snapshot

MODULE = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "token-pin-4242"


def _token_without(tmp_path: Path, label: str, mechanisms: list[str]) -> tuple[Path, Path]:
    """A fresh SoftHSM token *label* whose slot hides *mechanisms*: (its config, its files)."""
    files = tmp_path / f"{label}-tokens"
    files.mkdir()
    conf = tmp_path / f"{label}.conf"
    # SoftHSM 2.6.1 keeps the minus sign on the first name of a "-" list, so that name matches
    # nothing and stays enabled: a placeholder goes first.
    conf.write_text(
        f"directories.tokendir = {files}\nobjectstore.backend = file\n"
        f"slots.mechanisms = -CKM_PLACEHOLDER,{','.join(mechanisms)}\n"
    )
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN,
         "--so-pin", "so-pin-123456"],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True, capture_output=True,
    )
    return conf, files


def _enroll(admin: Admin, conf: Path, label: str, check: int = 0):  # type: ignore[no-untyped-def]
    return admin(
        "--json", "hsm", "enroll", "--module", MODULE, "--token", label,
        "--pin-file", admin.pin_file(label, PIN), "--label", label,
        env={"SOFTHSM2_CONF": str(conf)}, check=check,
    )


def _objects_in(files: Path) -> list[str]:
    """The objects stored in a SoftHSM token (the file backend keeps one file per object)."""
    return sorted(p.name for p in files.rglob("*.object") if p.name != "token.object")


@pytest.mark.parametrize(("hidden", "said"), [
    (["CKM_AES_KEY_WRAP_PAD"], "(CKM_AES_KEY_WRAP_PAD: MechanismInvalid)"),
    (["CKM_SHA256_HMAC"], "(CKM_SHA256_HMAC: MechanismInvalid)"),
    (["CKM_RSA_PKCS_OAEP"], "cannot wrap with RSA-OAEP"),
    (["CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_SHA256_RSA_PKCS_PSS"], "neither Ed25519"),
])
def test_a_token_lacking_what_a_domain_needs_is_not_enrolled(
    initialized: Admin, tmp_path: Path, hidden: list[str], said: str
) -> None:
    """Without the check, such a token was enrolled, put in a Trust, and failed only when a
    Domain was created on it or a mount asked it for keys."""
    conf, files = _token_without(tmp_path, "lacking", hidden)
    before = tree_snapshot(initialized.store / "hsms")
    result = _enroll(initialized, conf, "lacking", check=exitcodes.HSM)
    assert said in one_error_line(result)
    assert tree_snapshot(initialized.store / "hsms") == before
    assert [h["label"] for h in initialized("--json", "hsm", "list").json] == ["hsm1", "hsm2"]
    # Refused before its key pairs are made, or they are removed again: left as it was.
    assert _objects_in(files) == []


def _flip_a_bit_of_the_seal(store: Path, trust: str) -> None:
    (seal,) = (store / "seals" / trust).iterdir()
    doc = json.loads(seal.read_bytes())
    signature = bytearray(base64.b64decode(doc["signature"]))
    signature[len(signature) // 2] ^= 0x01
    doc["signature"] = base64.b64encode(bytes(signature)).decode()
    seal.chmod(0o644)
    seal.write_text(json.dumps(doc, sort_keys=True, separators=(",", ":")))


def _kmsfs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kmsfs.fs.cli", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_an_hsm_signing_with_rsa_pss_seals_trusts_and_serves_a_mount(
    initialized: Admin, tmp_path: Path
) -> None:
    """Tokens without Ed25519 sign with RSA-PSS: its seals and Domain signatures verify, a mount
    gets its keys from it (its SoftHSM config found through the store, not the environment),
    and a seal with one bit flipped is refused."""
    conf, _ = _token_without(tmp_path, "pss", ["CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA"])
    enrolled = _enroll(initialized, conf, "pss").json
    assert enrolled["sign"] == "rsa-pss-sha256" and enrolled["wrap"] == "rsa-oaep-sha1"
    initialized.create_operators("alice")
    first = initialized.sealed_trust(["hsm1", "pss"], ["alice"], 1)
    trust = initialized.propose(["pss"], ["alice"], 1, predecessor=first)
    initialized.sign(trust, "alice")
    assert "sealed by HSM pss" in initialized("trust", "seal", trust).stdout
    (seal,) = (initialized.store / "seals" / trust).iterdir()
    assert seal.stem == enrolled["id"]
    initialized("trust", "verify", trust)
    initialized("domain", "create", "payroll", "--trust", trust)
    initialized("domain", "verify", "payroll")

    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    env["KMSFS_STORE"] = str(initialized.store)
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    mp.mkdir()
    assert _kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    for round_ in range(2):
        proc = _kmsfs("mount", str(cipher), str(mp), "--log-file", str(tmp_path / "log"),
                      env=env)
        assert proc.returncode == 0, proc.stderr
        try:
            if round_ == 0:
                (mp / "f").write_bytes(b"served by an RSA-PSS HSM")
            assert (mp / "f").read_bytes() == b"served by an RSA-PSS HSM"
        finally:
            assert _kmsfs("umount", str(mp), env=env).returncode == 0
    assert "keys served by HSM pss" in (tmp_path / "log").read_text()

    _flip_a_bit_of_the_seal(initialized.store, trust)
    refused = initialized("trust", "verify", trust, check=exitcodes.VERIFICATION)
    assert trust[:12] in one_error_line(refused)
    proc = _kmsfs("mount", str(cipher), str(mp), env=env)
    assert proc.returncode == exitcodes.VERIFICATION, proc.stderr
    assert not os.path.ismount(mp)


def test_an_hsm_that_cannot_wrap_with_sha256_makes_a_domain_for_one_that_can(
    initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each HSM records the best OAEP hash it can do: SoftHSM2 SHA-1, a real HSM SHA-256.
    Domain create in the Trust's first HSM (SoftHSM2) wrapped k for the other with SHA-256,
    which the token refused (ArgumentsBad, exit 4). It now wraps with SHA-1 where it cannot
    do SHA-256, the Domain records the scheme of each wrapping, and the other HSM opens it."""
    from kmsfs.hsm import domainkeys, keypairs
    from kmsfs.service import domains, hsms
    from kmsfs.service.context import Context, open_hsm

    ctx = Context.at(initialized.store)
    with monkeypatch.context() as patched:  # the record of an HSM that does OAEP-SHA256
        patched.setattr(keypairs, "_probe_oaep", lambda *_: "sha256")
        vendor = hsms.create_hsm(ctx, "vendor")
    assert vendor.wrap_key.scheme == "rsa-oaep-sha256"
    initialized.create_operators("alice")
    trust = initialized.sealed_trust(["hsm1", "vendor"], ["alice"], 1)
    initialized("domain", "create", "payroll", "--trust", trust)

    domain = domains.current(ctx, "payroll").sealed.domain
    wrapped = domain.wrapped_for(vendor.id)
    assert wrapped is not None and wrapped.scheme == "rsa-oaep-sha1"
    info = b"kmsfs/test/oaep-mix"
    derived = []
    for hsm in ("hsm1", "vendor"):
        record = hsms.resolve_hsm(ctx, hsm)
        with open_hsm(ctx, [record]) as opened, library.CALLS:
            mine = domain.wrapped_for(record.id)
            assert mine is not None
            mk = domainkeys.unwrap(opened.session, mine.scheme, mine.data,
                                   domain.current_epoch.data)
            derived.append(mk.derive_many([info])[0])
            mk.destroy()
    assert derived[0] == derived[1]


def test_a_module_reached_by_another_path_is_one_library(
    initialized: Admin, tmp_path: Path
) -> None:
    """A token enrolled through a symbolic link to the module that serves the embedded HSMs
    (a distribution's link beside the file): the second C_Initialize of one library failed
    (CKR_CRYPTOKI_ALREADY_INITIALIZED), and that HSM never served beside the others."""
    conf, _ = _token_without(tmp_path, "linked", [])
    link = tmp_path / "libvendor-pkcs11.so"
    link.symlink_to(MODULE)
    initialized(
        "hsm", "enroll", "--module", str(link), "--token", "linked",
        "--pin-file", initialized.pin_file("linked", PIN), "--label", "linked",
        env={"SOFTHSM2_CONF": str(conf)},
    )
    health = initialized("--json", "hsm", "health").json
    assert {h["label"]: h["ok"] for h in health} == {"hsm1": True, "hsm2": True, "linked": True}


def test_tokens_that_share_a_label_are_told_apart_by_serial(
    initialized: Admin, tmp_path: Path
) -> None:
    """Labels are not unique (every PIV card is "PIV_II"): enrolment names the serials it
    found, and --token-serial picks one, which every later use finds again."""
    conf, _ = _token_without(tmp_path, "PIV_II", [])
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", "PIV_II", "--pin", PIN,
         "--so-pin", "so-pin-123456"],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)}, check=True, capture_output=True,
    )
    refused = _enroll(initialized, conf, "PIV_II", check=exitcodes.HSM)
    line = one_error_line(refused)
    assert "several tokens have this label" in line and "--token-serial" in line
    serials = re.search(r"serials ([^)]*)\)", line).group(1).split(", ")  # type: ignore[union-attr]
    assert len(serials) == 2
    def enroll(serial: str, label: str = "card", check: int = 0):  # type: ignore[no-untyped-def]
        return initialized(
            "--json", "hsm", "enroll", "--module", MODULE, "--token", "PIV_II",
            "--token-serial", serial, "--pin-file", initialized.pin_file("PIV_II", PIN),
            "--label", label, env={"SOFTHSM2_CONF": str(conf)}, check=check,
        )

    absent = one_error_line(enroll("0000", check=exitcodes.HSM))
    assert "is not present" in absent and serials[0] in absent and serials[1] in absent
    enrolled = enroll(f" {serials[1].upper()} ").json  # as a person copies it
    assert enrolled["label"] == "card"
    health = {h["label"]: h["ok"] for h in initialized("--json", "hsm", "health").json}
    assert health["card"] is True

    # An HSM enrolled before the second card came (its access record without a serial) gets
    # one by enrolling it again with the serial: its record is the same, its access updated.
    access = initialized.store / "private" / "hsm-access" / f"{enrolled['id']}.json"
    doc = json.loads(access.read_text())
    access.write_text(json.dumps({**doc, "token_serial": None}))
    failed = initialized("--json", "hsm", "health", check=exitcodes.HSM).json
    assert {h["label"]: h["ok"] for h in failed}["card"] is False
    again = enroll(serials[1], label="whatever")
    assert again.json["id"] == enrolled["id"] and again.json["label"] == "card"
    assert "is recorded now" in again.stderr
    health = {h["label"]: h["ok"] for h in initialized("--json", "hsm", "health").json}
    assert health["card"] is True
    initialized.create_operators("alice")
    first = initialized.sealed_trust(["hsm1", "card"], ["alice"], 1)
    trust = initialized.propose(["card"], ["alice"], 1, predecessor=first)
    initialized.sign(trust, "alice")
    assert "sealed by HSM card" in initialized("trust", "seal", trust).stdout
