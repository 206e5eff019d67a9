"""Driving the real ``kmsfs-admin`` in subprocesses against a store of the test's own.

Every store keeps its own softhsm2.conf and token directory, so each test has its own tokens
and nothing system-wide is touched.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives.asymmetric import ed25519

from kmsfs.model import contexts
from kmsfs.model.records import HsmRecord, OperatorRecord

if TYPE_CHECKING:
    from kmsfs.model.trust import Signature

ADMIN = [sys.executable, "-m", "kmsfs.admin.cli"]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def last_line(self) -> str:
        return self.stdout.strip().splitlines()[-1]


@dataclass
class Admin:
    """``kmsfs-admin --store STORE ...`` as a subprocess; ``check`` asserts the exit code."""

    store: Path
    pins: Path

    @classmethod
    def under(cls, root: Path, store: str = "store") -> "Admin":
        """An Admin for ``root/<store>`` (not created yet), its PIN files in ``root/pins``
        (created here, 0700, with *root* if need be)."""
        pins = root / "pins"
        pins.mkdir(mode=0o700, parents=True)
        return cls(root / store, pins)

    def __call__(
        self, *args: str, check: int | None = 0, env: dict[str, str] | None = None
    ) -> Result:
        full_env = {
            k: v for k, v in os.environ.items() if k not in ("KMSFS_STORE", "SOFTHSM2_CONF")
        }
        full_env.update(env or {})
        proc = subprocess.run(
            [*ADMIN, "--store", str(self.store), *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=120,
            check=False,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if check is not None:
            assert proc.returncode == check, (
                f"kmsfs-admin {' '.join(args)}: exit {proc.returncode}, want {check}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return result

    def pin_file(self, name: str, secret: str | None = None) -> str:
        path = self.pins / f"{name}.pin"
        if not path.exists():
            path.write_text((secret or f"pin-of-{name}-0123") + "\n")
            path.chmod(0o600)
        return str(path)

    def create_operators(self, *names: str) -> None:
        for name in names:
            self("operator", "create", name, "--pin-file", self.pin_file(name))

    def propose(
        self, hsms: list[str], operators: list[str], quorum: int, predecessor: str | None = None
    ) -> str:
        args = ["trust", "propose", "--quorum", str(quorum)]
        for h in hsms:
            args += ["--hsm", h]
        for o in operators:
            args += ["--operator", o]
        if predecessor:
            args += ["--predecessor", predecessor]
        return self(*args).last_line

    def sign(self, trust: str, *names: str) -> None:
        for name in names:
            self("trust", "sign", trust, "--as", name, "--pin-file", self.pin_file(name))

    def sealed_trust(
        self,
        hsms: list[str],
        operators: list[str],
        quorum: int,
        signers: list[str] | None = None,
        predecessor: str | None = None,
        fork: bool = False,
    ) -> str:
        """Propose, sign and seal; *fork*: although *predecessor* has a sealed successor."""
        trust = self.propose(hsms, operators, quorum, predecessor)
        self.sign(trust, *(signers if signers is not None else operators[:quorum]))
        self("trust", "seal", trust, *(["--fork"] if fork else []))
        return trust

    def copy(self, store: Path) -> "Admin":
        """An Admin for a copy of this store made at *store* (its private area, and so its HSM
        access, included), with the same PIN files: a replica, or a second host's store."""
        shutil.copytree(self.store, store, symlinks=True)
        return Admin(store, self.pins)

    def export(self, domain: str, to: Path) -> Path:
        """``domain export`` of *domain* written to the file *to*; returns *to*."""
        to.write_text(self("domain", "export", domain).stdout)
        return to

    def real_domain(self, name: str = "payroll") -> str:
        """Operator alice, a sealed Trust of hsm1 + hsm2 (quorum 1) and Domain *name* on it;
        returns the trust id."""
        self.create_operators("alice")
        trust = self.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
        self("domain", "create", name, "--trust", trust)
        return trust


def hsm_seal(store: Path, trust_id: str, hsm_label: str) -> "Signature":
    """What an HSM's PIN holder can do: have the HSM seal a Trust, quorums or not (in this
    process; nothing is written)."""
    from kmsfs.model.trust import Signature
    from kmsfs.service import hsms
    from kmsfs.service.context import Context, open_hsm

    ctx = Context.at(store)
    record = hsms.resolve_hsm(ctx, hsm_label)
    trust = ctx.store.trust(trust_id)
    with open_hsm(ctx, [record]) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_TRUST, trust.signed_bytes()))
    return Signature(trust_id, record.id, value)


def rogue_genesis_successor(genesis: Any, operator: str) -> tuple[Any, "Signature"]:
    """What anyone can make with a key of their own, no PIN and no operator of the store: a
    successor of the sealed *genesis* (quorum 1) whose only operator, named *operator*, is
    that key, and its approval (the genesis has no operators, so no other quorum stands
    behind it): (Trust, Signature)."""
    from kmsfs.model.publickeys import PublicKey
    from kmsfs.model.trust import Member, Signature, Trust
    from kmsfs.service.context import utc_now

    mallory = ed25519.Ed25519PrivateKey.generate()
    key = PublicKey("ed25519", mallory.public_key().public_bytes_raw())
    rogue = Trust(2, genesis.id, genesis.trust.hsms, (Member(operator, key),), 1, utc_now())
    approval = Signature(rogue.id, key.key_id, mallory.sign(
        contexts.message(contexts.OPERATOR_APPROVES_TRUST, rogue.signed_bytes())))
    return rogue, approval


def software_hsm(label: str, created: str | None = None) -> tuple[Any, Any]:
    """An HSM record whose private keys are in this process (what a writer of the store can
    list in a proposal), and its Ed25519 signing key: (HsmRecord, Ed25519PrivateKey)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from kmsfs.model.publickeys import PublicKey
    from kmsfs.model.records import HsmRecord
    from kmsfs.service.context import utc_now

    wrap = rsa.generate_private_key(public_exponent=65537, key_size=3072).public_key()
    spki = wrap.public_bytes(serialization.Encoding.DER,
                             serialization.PublicFormat.SubjectPublicKeyInfo)
    sign = ed25519.Ed25519PrivateKey.generate()
    record = HsmRecord(label, PublicKey("rsa-oaep-sha1", spki),
                       PublicKey("ed25519", sign.public_key().public_bytes_raw()),
                       created or utc_now())
    return record, sign


def drop_rivals(store: Path, predecessor: str, kept: str) -> None:
    """Remove every other successor of *predecessor* from *store* (its Trust, approvals and
    seals): what operators do to keep one line of Trusts, on which alone a Domain's keys are
    wrapped (test_forked_line.py). Where the store's head was on a line removed (it sealed
    the other one first), they remove its head too (operators.md, §3), and the store takes
    the kept line's newest Trust as its head at its next command (test_line_head.py)."""
    from kmsfs.service import trusts
    from kmsfs.service.context import Context

    ctx = Context.at(store)
    drop_trusts(store, [t for t in ctx.store.trust_ids()
                        if t != kept and ctx.store.trust(t).predecessor == predecessor])
    if trusts.resolve_line(ctx).lost is not None:
        ctx.store.head_path.unlink()


def drop_trusts(store: Path, ids: list[str]) -> None:
    """Remove the Trusts *ids* from *store*, each as ``trusts/ID.json``, ``approvals/ID/`` and
    ``seals/ID/``: what operators do to keep one line of Trusts."""
    for trust_id in ids:
        (store / "trusts" / f"{trust_id}.json").unlink()
        for kind in ("approvals", "seals"):
            shutil.rmtree(store / kind / trust_id, ignore_errors=True)


def one_error_line(result: Result) -> str:
    """The CLI's error contract: exactly one line on stderr, starting with the program name."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"want one stderr line, have {lines}"
    assert lines[0].startswith("kmsfs-admin: error: "), lines[0]
    return lines[0]


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: to prove that a failed command changed nothing."""
    snapshot: dict[str, bytes] = {}
    if not root.exists():
        return snapshot
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        snapshot[rel] = path.read_bytes() if path.is_file() else b"<dir>"
    return snapshot


_Record = TypeVar("_Record", HsmRecord, OperatorRecord)


def self_signed(record: _Record, key: ed25519.Ed25519PrivateKey, context: bytes) -> _Record:
    """*record* self-signed by a software *key*: what anyone who can write a store can plant."""
    signature = key.sign(contexts.message(context, record.signed_bytes()))
    return dataclasses.replace(record, signature=signature)
