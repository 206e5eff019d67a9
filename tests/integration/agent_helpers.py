"""Helpers for the agent tests: a real ``kmsfs-hsmd`` process, real TLS certificates, mounts.

Nothing is mocked: the agent is the installed entry point in a subprocess with a real
SoftHSM2-backed store, TLS is the ssl module with certificates made here by ``cryptography``,
and a mount is ``kmsfs mount --foreground --agent ...`` on /dev/fuse.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kmsfs.agent.client import AgentAddress, AgentClient
from tests.integration.fault_helpers import RealMount, clean_env

HSMD = [sys.executable, "-m", "kmsfs.agent.cli"]
ALL_ACTIONS = (
    '["derive", "create-domain", "rewrap", "rotate", "retire", "seal-trust",'
    ' "seal-genesis-successor", "health"]'
)


def root_policy(extra: str = "") -> str:
    """uid 0 may do everything; ``extra`` adds more [[client]] tables."""
    return (
        f'[[client]]\nname = "root"\nuids = [0]\ndomains = ["*"]\nallow = {ALL_ACTIONS}\n'
        + extra
    )


class AgentProcess:
    """``kmsfs-hsmd`` in a subprocess, on a Unix socket (and TLS if ``listen`` is given)."""

    def __init__(
        self,
        store: Path,
        workdir: Path,
        policy_text: str,
        extra: tuple[str, ...] = (),
        socket_mode: str = "0660",
        socket_path: Path | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.socket = socket_path or workdir / "hsmd.sock"
        self.policy = workdir / "policy.toml"
        self.audit = workdir / "audit.log"
        self.log_path = workdir / "hsmd.log"
        self.policy.write_text(policy_text)
        self.extra = extra
        self.socket_mode = socket_mode
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return str(self.socket)

    def command(self) -> list[str]:
        return [
            *HSMD, "--store", str(self.store), "--policy", str(self.policy),
            "--socket", str(self.socket), "--socket-mode", self.socket_mode,
            "--audit-log", str(self.audit), *self.extra,
        ]

    def start(self, timeout: float = 30.0) -> AgentProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=clean_env())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kmsfs-hsmd did not start:\n{self.log()}")
            try:
                client = AgentClient(AgentAddress.parse(self.address))
                client.call("hello", {})
                client.close()
                return self
            except Exception:
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def client(self) -> AgentClient:
        return AgentClient(AgentAddress.parse(self.address))


class AgentMount(RealMount):
    """``kmsfs mount --foreground`` with ``agent_args`` (``--agent ...``, or ``--store`` for an
    in-process mount to compare with); its log in a file."""

    def __init__(
        self, cipherdir: Path, mountpoint: Path, log_path: Path, agent_args: list[str]
    ) -> None:
        super().__init__(Path("."), cipherdir, mountpoint, log_path)
        self.agent_args = agent_args

    def key_args(self) -> list[str]:
        return self.agent_args


# -- TLS ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path
    fingerprint: str  # "sha256:<hex of the DER certificate>", as the agent's policy names it


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


class TestCA:
    """A certificate authority made for one test: signs the agent's and clients' certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "kmsfs test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / f"{name.replace(' ', '-')}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, *, server: bool = False) -> Identity:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        der = cert.public_bytes(serialization.Encoding.DER)
        return Identity(cert_path, key_path, "sha256:" + hashlib.sha256(der).hexdigest())


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
