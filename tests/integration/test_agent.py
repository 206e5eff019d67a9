"""kmsfs-hsmd end to end: a real agent process on real SoftHSM2 tokens, real clients.

One agent per module serves a Unix socket (mode 0666, so other uids reach it and the policy,
not the file mode, decides) and a TLS port on 127.0.0.1. The operators' store is a copy of
the agent's store without the HSM access files: it can propose and approve, but every HSM
action has to go through the agent.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmsfs.agent import protocol
from kmsfs.agent.client import AgentAddress, AgentClient, AgentDeriver
from kmsfs.crypto.content import HEADER_SIZE, FileHeader
from kmsfs.crypto.names import NAMES_KEY_INFO
from kmsfs.errors import (
    AgentUnavailableError,
    ChainError,
    FormatError,
    IntegrityError,
    QuorumNotMetError,
    UsageError,
)
from kmsfs.service import domains
from kmsfs.service.context import Context
from tests.integration.agent_helpers import (
    AgentMount,
    AgentProcess,
    Identity,
    TestCA,
    clean_env,
    free_port,
    root_policy,
)
from tests.integration.fault_helpers import drop_cache, kmsfs, wait_for
from tests.kms_helpers import ADMIN, Admin, drop_rivals

pytestmark = pytest.mark.timeout(600)

NOBODY = 65534
STRANGER = 65533  # a uid the policy does not name


@dataclass
class World:
    agent_admin: Admin  # the agent's own store (holds the HSM PINs)
    ops: Admin  # the operators' store: no HSM access
    agent: AgentProcess
    trust: str
    tls_port: int
    ca: TestCA
    mount_a: Identity  # in the policy: may derive for payroll
    unlisted: Identity  # same CA, not in the policy
    stranger_ca_cert: Identity  # signed by another CA
    root: Path

    def tls_args(self, who: Identity) -> list[str]:
        return [
            "--agent", f"127.0.0.1:{self.tls_port}", "--agent-cert", str(who.cert),
            "--agent-key", str(who.key), "--agent-ca", str(self.ca.path),
        ]


def _as_uid(uid: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
        capture_output=True, text=True, timeout=60, env=clean_env(HOME="/"), check=False,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("agent")
    agent_admin = Admin.under(root, "agent-store")
    agent_admin("init", "--hsms", "2")
    agent_admin.create_operators("alice", "bob", "carol")
    ops_store = root / "ops-store"
    shutil.copytree(agent_admin.store, ops_store, symlinks=True)
    shutil.rmtree(ops_store / "private" / "hsm-access")
    ops = Admin(ops_store, root / "pins")

    ca = TestCA(root / "tls")
    server = ca.issue("agent", server=True)
    mount_a, unlisted = ca.issue("mount-a"), ca.issue("unlisted")
    stranger_ca_cert = TestCA(root / "tls-other", "other CA").issue("mount-a")
    port = free_port()
    policy = root_policy(
        f'[[client]]\nname = "nobody"\nuids = [{NOBODY}]\ndomains = ["other"]\n'
        'allow = ["derive"]\n'
        f'[[client]]\nname = "mount-a"\ncerts = ["{mount_a.fingerprint}"]\n'
        'domains = ["payroll"]\nallow = ["derive"]\n'
    )
    sock_dir = Path(tempfile.mkdtemp(prefix="kmsfs-agent-"))
    sock_dir.chmod(0o755)
    agent = AgentProcess(
        agent_admin.store, root / "agent", policy, socket_mode="0666",
        socket_path=sock_dir / "hsmd.sock",
        extra=("--listen", f"127.0.0.1:{port}", "--tls-cert", str(server.cert),
               "--tls-key", str(server.key), "--tls-client-ca", str(ca.path)),
    ).start()
    try:
        trust = ops.propose(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
        ops.sign(trust, "alice", "bob")
        ops("--agent", agent.address, "trust", "seal", trust)
        ops("--agent", agent.address, "domain", "create", "payroll", "--trust", trust)
        yield World(agent_admin, ops, agent, trust, port, ca, mount_a, unlisted,
                    stranger_ca_cert, root)
    finally:
        agent.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
        assert "Traceback" not in agent.log(), agent.log()


def _hello(world: World) -> object:
    with world.agent.client() as client:
        return client.call("hello", {})["client"]


def _records(agent: AgentProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in agent.audit.read_text().splitlines()]


# -- the ceremony through the agent ---------------------------------------------------------


def test_seal_and_create_through_agent_land_in_both_stores(world: World) -> None:
    ops, agent_store = world.ops.store, world.agent_admin.store
    for store in (ops, agent_store):
        assert list((store / "seals" / world.trust).glob("*.json")), store
        verified = domains.current(Context.at(store), "payroll")
        assert verified.trust.id == world.trust
    world.ops("trust", "verify", world.trust)
    events = [(r["op"], r["decision"]) for r in _records(world.agent) if r["type"] == "event"]
    assert ("seal-genesis-successor", "allowed") in events  # the ceremony's own action
    assert ("create-domain", "allowed") in events


def test_rotate_through_agent_and_derive_each_epoch(world: World) -> None:
    address = world.agent.address
    world.ops("--agent", address, "domain", "create", "rotated", "--trust", world.trust)
    out = world.ops("--json", "--agent", address, "domain", "rotate", "rotated").json
    assert out["generation"] == 2 and out["epochs"] == 2
    bundle = world.ops("domain", "export", "rotated").stdout.strip().encode()
    info = b"kmsfs/v1/file-key\x00" + bytes(16)
    with AgentDeriver(world.agent.client(), bundle).open() as remote:
        assert remote.current_epoch == 2
        via_agent = [remote.derive(info, 1), remote.derive(info, 2), remote.derive(info)]
        with pytest.raises(IntegrityError, match="no key epoch 3"):
            remote.derive(info, 3)
    ctx = Context.at(world.agent_admin.store)
    with domains.open_keys(ctx, domains.export_bundle(ctx, "rotated")) as local:
        assert via_agent == [local.derive(info, 1), local.derive(info, 2), local.derive(info, 2)]


def test_retire_through_agent_refuses_retired_contents(world: World) -> None:
    """domain retire --agent: the agent seals the retiring generation (audited as a lasting
    operation) and from then on refuses file keys of the retired epoch to every client, while
    a volume's epoch-1 keys (names, symlinks, xattrs) stay served."""
    address = world.agent.address
    world.ops("--agent", address, "domain", "create", "retiring", "--trust", world.trust)
    world.ops("--agent", address, "domain", "rotate", "retiring")
    out = world.ops(
        "--json", "--agent", address, "domain", "retire", "retiring", "--below", "2", "--yes"
    ).json
    assert (out["generation"], out["epochs"], out["retired_below"]) == (3, 2, 2)
    bundle = world.ops("domain", "export", "retiring").stdout.strip().encode()
    info = b"kmsfs/v1/file-key\x00" + bytes(16)
    with AgentDeriver(world.agent.client(), bundle).open() as remote:
        with pytest.raises(IntegrityError, match="key epoch 1 of Domain retiring is retired"):
            remote.derive(info, 1)
        names, content = remote.derive(NAMES_KEY_INFO, 1), remote.derive(info, 2)
    ctx = Context.at(world.agent_admin.store)
    with domains.open_keys(ctx, domains.export_bundle(ctx, "retiring")) as local:
        assert (names, content) == (local.derive(NAMES_KEY_INFO, 1), local.derive(info, 2))
    events = [(r["op"], r["decision"], r.get("detail")) for r in _records(world.agent)
              if r["type"] == "event"]
    assert ("retire", "allowed", {"below": 2}) in events


def test_hsm_health_through_agent(world: World) -> None:
    rows = world.ops("--json", "--agent", world.agent.address, "hsm", "health").json
    assert sorted(r["label"] for r in rows) == ["hsm1", "hsm2"]
    assert all(r["ok"] for r in rows)


# -- the agent enforces quorums and verifies what clients send ------------------------------


def test_agent_refuses_to_seal_without_quorum(world: World) -> None:
    trust = world.ops.propose(["hsm1"], ["alice", "bob"], 2, predecessor=world.trust)
    world.ops.sign(trust, "alice")  # 1 of 2
    result = world.ops("--agent", world.agent.address, "trust", "seal", trust, check=3)
    assert "quorum not met" in result.stderr
    assert not (world.agent_admin.store / "seals" / trust).exists()
    assert not (world.ops.store / "seals" / trust).exists()


def test_agent_refuses_to_seal_without_the_predecessors_quorum(world: World) -> None:
    """alice alone meets the successor's own quorum (1 of 1) but not its predecessor's (2 of
    3): the agent must not seal, however the client asks."""
    trust = world.ops.propose(["hsm1"], ["alice"], 1, predecessor=world.trust)
    world.ops.sign(trust, "alice")
    result = world.ops("--agent", world.agent.address, "trust", "seal", trust, check=3)
    assert "predecessor" in result.stderr and "quorum not met" in result.stderr
    assert not (world.agent_admin.store / "seals" / trust).exists()


def test_agent_drops_forged_approvals(world: World) -> None:
    """A client that forges bob's approval (alice's real one plus bytes flipped in a copy)
    gets no seal, and nothing is written to the agent's store."""
    trust = world.ops.propose(["hsm1"], ["alice", "bob"], 2, predecessor=world.trust)
    world.ops.sign(trust, "alice")
    ctx = Context.at(world.ops.store)
    alice = ctx.store.signatures("approval", trust)[0]
    bob_key = ctx.store.operator("bob").key.key_id
    forged = {"_type": "approval", "subject": trust, "key_id": bob_key,
              "signature": base64.b64encode(bytes(64)).decode()}
    chain = [link.to_dict() for link in domains.trusts.verified_chain(ctx, world.trust)]
    with world.agent.client() as client, pytest.raises(QuorumNotMetError):
        client.call("seal-trust", {"trust": ctx.store.trust(trust).payload(),
                                   "approvals": [alice.to_dict("approval"), forged],
                                   "chain": chain}, retry=False)
    # Without both quorums nothing of the request is written: not the forgery, not alice's
    # real approval, not even the proposal.
    assert not (world.agent_admin.store / "approvals" / trust).exists()
    assert not (world.agent_admin.store / "trusts" / f"{trust}.json").exists()


def test_agent_refuses_a_bundle_of_another_store(world: World, tmp_path: Path) -> None:
    other = Admin(tmp_path / "other", world.root / "pins")
    other("init", "--hsms", "1")
    other.create_operators("alice")
    trust = other.sealed_trust(["hsm1"], ["alice"], 1)
    other("domain", "create", "payroll", "--trust", trust)
    bundle = other("domain", "export", "payroll").stdout.strip().encode()
    with world.agent.client() as client, pytest.raises(ChainError, match="pins root"):
        AgentDeriver(client, bundle).open()


def test_agent_refuses_a_tampered_bundle(world: World) -> None:
    bundle = json.loads(world.ops("domain", "export", "payroll").stdout)
    bundle["domain"]["domain"]["created"] = "2000-01-01T00:00:00Z"
    raw = json.dumps(bundle, sort_keys=True, separators=(",", ":")).encode()
    with world.agent.client() as client, pytest.raises(IntegrityError):
        AgentDeriver(client, raw).open()


# -- the policy: uids, actions, Domains ---------------------------------------------------


def test_uid_not_in_policy_is_refused(world: World) -> None:
    result = _as_uid(STRANGER, [*ADMIN, "--agent", world.agent.address, "hsm", "health"])
    assert result.returncode == 9, result.stderr
    assert result.stderr.count("\n") == 1
    assert f"uid={STRANGER}" in result.stderr and "not in the agent's policy" in result.stderr
    refused = [r for r in _records(world.agent) if r.get("who", "").startswith(f"uid={STRANGER}")]
    assert refused and refused[-1]["decision"] == "refused"


def _client_as_nobody(
    world: World, code: str, *argv: str, stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run *code* as uid NOBODY (in the policy for Domain "other" only), with ``client`` an
    AgentClient of the agent and ``sys.argv[1:]`` *argv*."""
    probe = (
        "import sys\nfrom kmsfs.agent.client import *\n"
        f"client = AgentClient(AgentAddress.parse({world.agent.address!r}))\n{code}\n"
    )
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", probe, *argv],
        input=stdin, capture_output=True, timeout=60, env=clean_env(), check=False,
    )


def test_policy_limits_actions_and_domains(world: World) -> None:
    health = _as_uid(NOBODY, [*ADMIN, "--agent", world.agent.address, "hsm", "health"])
    assert health.returncode == 9 and "may not health" in health.stderr, health.stderr
    bundle = world.ops("domain", "export", "payroll").stdout.strip()
    opened = _client_as_nobody(
        world, "AgentDeriver(client, sys.stdin.buffer.read()).open()", stdin=bundle.encode()
    )
    assert opened.returncode != 0
    assert b"AgentRefusedError" in opened.stderr
    assert b"may not derive for Domain payroll" in opened.stderr


def test_domain_status_answers_who_may_derive_and_leaves_no_record(world: World) -> None:
    """domain-status (a mount asks it once a second which epochs are retired) is answered to
    a client the policy lets derive for the handle's Domain, without an audit record (one
    per mount per second would bury the derivations); another client is refused, answered as
    for a handle that is not open, and that refusal is recorded."""
    bundle = world.ops("domain", "export", "payroll").stdout.strip()
    with AgentDeriver(world.agent.client(), bundle.encode()).open() as remote:
        handle = remote.description["handle"]
        assert remote.description["retired_below"] == 1
        before = len(_records(world.agent))
        with world.agent.client() as client:
            for _ in range(3):
                assert client.call("domain-status", {"handle": handle}) == {
                    "retired_below": 1, "newest_epoch": 1}
        assert len(_records(world.agent)) == before
    asked = _client_as_nobody(world, "client.call('domain-status', {'handle': sys.argv[1]})",
                              handle)
    assert asked.returncode != 0
    # The answer of a handle that is not open: "refused" would tell a client of another
    # Domain that payroll is open (review); the refusal is recorded all the same.
    assert b"NotFoundError" in asked.stderr and b"is not open" in asked.stderr
    assert b"payroll" not in asked.stderr
    refused = [r for r in _records(world.agent) if r.get("who", "").startswith(f"uid={NOBODY}")]
    assert (refused[-1]["op"], refused[-1]["decision"]) == ("domain-status", "refused")


# -- mounts through the agent -----------------------------------------------------------------


def test_a_mount_through_the_agent_moves_to_a_rotation_made_on_the_agent_store(
    world: World, tmp_path: Path
) -> None:
    """``domain rotate`` run on the agent's own store (which closes no handle of the agent)
    while a volume is mounted through it: within a second or so the mount serves the new
    generation, so its next new file is keyed with the new epoch, not the one the rotation
    was for (DESIGN §2.7)."""
    address = world.agent.address
    world.ops("--agent", address, "domain", "create", "spun", "--trust", world.trust)
    cipherdir = tmp_path / "cipher"
    made = kmsfs("init", str(cipherdir), "--domain", "spun", "--store", str(world.ops.store))
    assert made.returncode == 0, made.stderr
    mount = AgentMount(cipherdir, tmp_path / "mnt", tmp_path / "mnt.log",
                       ["--agent", address]).start()
    try:
        (mount.mountpoint / "before").write_bytes(b"keyed with epoch 1")
        world.agent_admin("domain", "rotate", "spun")
        assert wait_for(lambda: "new files get key epoch 2" in mount.log()), mount.log()
        (mount.mountpoint / "after").write_bytes(b"keyed with epoch 2")
        assert (mount.mountpoint / "before").read_bytes() == b"keyed with epoch 1"
    finally:
        mount.stop()
    epochs = sorted(FileHeader.parse(p.read_bytes()[:HEADER_SIZE]).epoch
                    for p in cipherdir.iterdir() if p.is_file() and not p.name.startswith("kmsfs."))
    assert epochs == [1, 2]


@pytest.mark.parametrize("where", ["through the agent", "on the agent's store"])
def test_a_mount_through_the_agent_takes_in_a_retirement_with_no_derivation(
    world: World, tmp_path: Path, where: str
) -> None:
    """``domain rotate`` and ``domain retire`` while a volume is mounted through the agent,
    made through the agent (which closes the Domain's open handles) or on the agent's own store
    (which closes none): within a second or so, with no request of a user in between, the
    mount moves to the Domain's newest generation and stops using the keys it derived before.
    A file it holds open reads and writes EIO; a file first written then gets none of the keys
    it derived ahead with the retired epoch, but a new one of the current epoch, so the next
    mount reads it (it is made, empty, before: the root's names are keyed with the retired
    epoch, and no new name is made there). The agent's audit log gets no record of the
    mount's questions."""
    address = world.agent.address
    name = "watched" if where == "through the agent" else "watched-here"
    world.ops("--agent", address, "domain", "create", name, "--trust", world.trust)
    cipherdir = tmp_path / "cipher"
    made = kmsfs("init", str(cipherdir), "--domain", name, "--store", str(world.ops.store))
    assert made.returncode == 0, made.stderr
    admin = world.ops if where == "through the agent" else world.agent_admin
    via = ["--agent", address] if where == "through the agent" else []
    mount = AgentMount(cipherdir, tmp_path / "mnt", tmp_path / "mnt.log",
                       ["--agent", address]).start()
    mp = mount.mountpoint
    try:
        (mp / "first").write_bytes(b"keyed with epoch 1")  # keys for new files derived ahead
        (mp / "second").write_bytes(b"")  # no header yet: its first write makes one
        with open(mp / "first", "r+b") as held:
            assert held.read() == b"keyed with epoch 1"
            admin(*via, "domain", "rotate", name)
            admin(*via, "domain", "retire", name, "--below", "2", "--yes")
            assert wait_for(lambda: "the agent retires key epochs below 2" in mount.log())
            drop_cache(mp / "first")
            for action in (lambda: os.pread(held.fileno(), 5, 0),
                           lambda: os.pwrite(held.fileno(), b"forged", 0)):
                with pytest.raises(OSError) as refused:
                    action()
                assert refused.value.errno == errno.EIO
        (mp / "second").write_bytes(b"after the retirement")
    finally:
        mount.stop()
    mount.start()
    try:
        assert (mp / "second").read_bytes() == b"after the retirement"
        with pytest.raises(OSError) as refused:
            (mp / "first").read_bytes()
        assert refused.value.errno == errno.EIO
    finally:
        mount.stop()
    statuses = [r for r in _records(world.agent)
                if r["op"] == "domain-status" and r["who"].startswith("uid=0(")]
    assert statuses == []  # asked once a second, about open and closed handles alike


def _volume(world: World, tmp_path: Path) -> Path:
    cipherdir = tmp_path / "cipher"
    result = kmsfs("init", str(cipherdir), "--domain", "payroll", "--store", str(world.ops.store))
    assert result.returncode == 0, result.stderr
    return cipherdir


def test_mount_through_agent_reads_what_an_in_process_mount_wrote(
    world: World, tmp_path: Path
) -> None:
    cipherdir = _volume(world, tmp_path)
    local = AgentMount(cipherdir, tmp_path / "m1", tmp_path / "m1.log",
                       ["--store", str(world.agent_admin.store)])  # in-process PKCS#11
    local.start()
    try:
        (local.mountpoint / "report.txt").write_text("written in-process\n")
    finally:
        local.stop()
    via_agent = AgentMount(cipherdir, tmp_path / "m2", tmp_path / "m2.log",
                           ["--agent", world.agent.address]).start()
    try:
        assert (via_agent.mountpoint / "report.txt").read_text() == "written in-process\n"
        (via_agent.mountpoint / "second.txt").write_text("through the agent\n")
    finally:
        via_agent.stop()
    local.start()
    try:
        assert (local.mountpoint / "second.txt").read_text() == "through the agent\n"
    finally:
        local.stop()


def test_mount_over_tls_from_a_second_process(world: World, tmp_path: Path) -> None:
    cipherdir = _volume(world, tmp_path)
    mount = AgentMount(cipherdir, tmp_path / "mnt", tmp_path / "mnt.log",
                       world.tls_args(world.mount_a)).start()
    try:
        (mount.mountpoint / "over-tls").write_bytes(b"x" * 100_000)
        assert (mount.mountpoint / "over-tls").read_bytes() == b"x" * 100_000
    finally:
        mount.stop()
    peers = {r["who"] for r in _records(world.agent) if r.get("op") == "derive"}
    assert any(str(w).startswith("tls:mount-a:") for w in peers)


def test_the_first_tls_client_of_a_fresh_agent_keeps_its_connection(
    world: World, tmp_path: Path
) -> None:
    """SoftHSM2's C_Initialize leaves an OpenSSL error on the calling thread's queue, and the
    next TLS read on that thread took it for its own failure: the first TLS client of a fresh
    agent, whose request loaded the module, lost its connection right after the reply
    ("connection ended: [ENGINE: NO_SUCH_ENGINE]"); admin commands do not retry."""
    store = world.agent_admin.copy(tmp_path / "store")
    port = free_port()
    server = world.ca.issue("agent-fresh", server=True)
    policy = root_policy(
        f'[[client]]\nname = "mount-a"\ncerts = ["{world.mount_a.fingerprint}"]\n'
        'domains = ["payroll"]\nallow = ["derive"]\n'
    )
    sock_dir = Path(tempfile.mkdtemp(prefix="kmsfs-agent-"))
    agent = AgentProcess(
        store.store, tmp_path / "agent", policy, socket_path=sock_dir / "hsmd.sock",
        extra=("--listen", f"127.0.0.1:{port}", "--tls-cert", str(server.cert),
               "--tls-key", str(server.key), "--tls-client-ca", str(world.ca.path)),
    ).start()
    try:
        bundle = domains.export_bundle(Context.at(store.store), "payroll").to_bytes()
        client = AgentClient(AgentAddress.parse(
            f"127.0.0.1:{port}", str(world.mount_a.cert), str(world.mount_a.key),
            str(world.ca.path)))
        try:
            opened = client.call("open-domain", {"bundle": base64.b64encode(bundle).decode()},
                                 retry=False)
            assert opened["current_epoch"] == 1
            assert client.call("hello", {}, retry=False)["client"] == "mount-a"
        finally:
            client.close()
    finally:
        agent.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert "connection ended" not in agent.log(), agent.log()


def test_tls_sessions_are_never_resumed(world: World) -> None:
    """A resumed TLS 1.3 session skips the client certificate's checks: a certificate that
    had expired went on authenticating for the session ticket's lifetime, two hours."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(world.ca.path)
    context.load_cert_chain(world.mount_a.cert, world.mount_a.key)

    def hello(session: ssl.SSLSession | None) -> tuple[ssl.SSLSession | None, bool, dict]:
        with socket.create_connection(("127.0.0.1", world.tls_port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
            request = b'{"args":{},"id":1,"op":"hello","v":1}'
            tls.sendall(struct.pack(">I", len(request)) + request)
            data = b""
            while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
                chunk = tls.recv(65536)
                assert chunk, "the agent closed the connection"
                data += chunk
            return tls.session, tls.session_reused, json.loads(data[4:])

    session, _, first = hello(None)
    assert first["ok"] and first["result"]["client"] == "mount-a"
    assert session is not None and not session.has_ticket
    _, reused, again = hello(session)
    assert again["ok"] and not reused


def test_mount_refused_with_one_line_and_nothing_mounted(world: World, tmp_path: Path) -> None:
    cipherdir = _volume(world, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    cases = [
        (world.tls_args(world.unlisted), 9, "not in the agent's policy"),
        (world.tls_args(world.stranger_ca_cert), 4, "TLS refused"),
        (["--agent", str(tmp_path / "no-such.sock")], 4, "No such file"),
    ]
    for args, code, text in cases:
        result = kmsfs("mount", *args, str(cipherdir), str(mountpoint))
        assert result.returncode == code, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kmsfs: error:") and text in lines[0]
        assert not os.path.ismount(mountpoint)
    assert world.agent.alive()


def test_fstab_style_mount_through_agent(world: World, tmp_path: Path) -> None:
    """mount.kmsfs (what mount(8) runs for an fstab line) with -o agent=SOCKET."""
    cipherdir = _volume(world, tmp_path)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "payroll.log"  # an fstab line's own log file
    helper = [sys.executable, "-m", "kmsfs.fs.mounthelper", str(cipherdir), str(mountpoint),
              "-o", f"agent={world.agent.address},_netdev,noauto,log_file={log}"]
    result = subprocess.run(helper, capture_output=True, text=True, timeout=60, env=clean_env(),
                            check=False)
    assert result.returncode == 0, result.stderr
    try:
        (mountpoint / "fstab.txt").write_text("via mount.kmsfs and the agent\n")
        assert (mountpoint / "fstab.txt").read_text() == "via mount.kmsfs and the agent\n"
        assert f"mounted {cipherdir} on {mountpoint}" in log.read_text()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
        # mount -o remount,ro: one line of mount.kmsfs's own, the mount left as it is
        again = subprocess.run([*helper[:5], "-o", "remount,ro"], capture_output=True,
                               text=True, timeout=60, env=clean_env(), check=False)
        assert again.returncode == 2 and again.stderr.startswith("mount.kmsfs: error: ")
        assert "cannot be changed in place (-o remount)" in again.stderr
        (mountpoint / "still-writable").write_text("yes")
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False)
    assert not os.path.ismount(mountpoint)


def test_decrypt_and_fsck_through_agent(world: World, tmp_path: Path) -> None:
    """A host with no HSM access decrypts a single file and checks a volume via the agent."""
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"quarterly figures\n" * 1000)
    sealed = tmp_path / "plain.kmsfs"
    agent = ["--agent", world.agent.address]
    store = ["--store", str(world.ops.store)]
    assert kmsfs("encrypt", *store, "--domain", "payroll", str(plain), str(sealed)).returncode == 4
    result = kmsfs("encrypt", *store, *agent, "--domain", "payroll", str(plain), str(sealed))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out.txt"
    result = kmsfs("decrypt", *agent, str(sealed), str(out))  # no store at all
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == plain.read_bytes()
    cipherdir = _volume(world, tmp_path)
    mount = AgentMount(cipherdir, tmp_path / "mnt", tmp_path / "mnt.log", agent).start()
    try:
        (mount.mountpoint / "a.txt").write_bytes(b"a" * 10_000)
    finally:
        mount.stop()
    report = kmsfs("fsck", *agent, "--json", str(cipherdir))
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["problems"] == []


def test_admin_refuses_agent_for_commands_that_make_local_hsms(world: World) -> None:
    for args in (["init"], ["hsm", "create"]):
        result = world.ops("--agent", world.agent.address, *args, check=2)
        assert "--agent" in result.stderr and result.stderr.count("\n") == 1


def test_tcp_without_tls_is_not_offered(world: World, tmp_path: Path) -> None:
    cipherdir = _volume(world, tmp_path)
    (tmp_path / "mnt").mkdir()
    result = kmsfs("mount", "--agent", f"127.0.0.1:{world.tls_port}", str(cipherdir),
                   str(tmp_path / "mnt"))
    assert result.returncode == 2 and "TLS only" in result.stderr
    with socket.create_connection(("127.0.0.1", world.tls_port), timeout=10) as raw:
        raw.sendall(protocol.frame({"v": 1, "id": 1, "op": "hello", "args": {}}))
        raw.settimeout(10)
        try:
            answer = raw.recv(100)
        except ConnectionResetError:
            answer = b""
    assert b'"ok":true' not in answer  # a plaintext request never gets an answer
    assert world.agent.alive()


# -- malformed requests: an error answer, never a crash ------------------------------------


def _raw_exchange(address: str, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(15)
        sock.connect(address)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _first_response(raw: bytes) -> dict[str, object]:
    (length,) = struct.unpack(">I", raw[:4])
    return json.loads(raw[4 : 4 + length])


def _framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


MALFORMED = [
    (_framed(b"not json"), "format"),
    (_framed(b"[]"), "format"),
    (_framed(b'{"v":1,"id":7,"op":"derive","args":{"handle":"zz","infos":[]}}'), "format"),
    (_framed(b'{"v":1,"id":7,"op":"derive","args":{"handle":"' + b"a" * 64
             + b'","infos":["!!"]}}'), "format"),
    (_framed(b'{"v":1,"id":7,"op":"derive","args":{"handle":"' + b"a" * 64
             + b'","infos":[]}}'), "format"),
    (_framed(b'{"v":2,"id":7,"op":"hello","args":{}}'), "format"),
    (_framed(b'{"v":1,"id":7,"op":"launch-missiles","args":{}}'), "format"),
    (_framed(b'{"v":1,"id":7,"op":"hello","args":{},"extra":1}'), "format"),
    (_framed(b'{"v":1,"id":7,"op":"hello","args":{"x":1.5}}'), "format"),
    (_framed(b'{"v":1,"id":7,"op":"seal-trust","args":{"trust":{},"approvals":[],"chain":[]}}'),
     "format"),
    (_framed(b'{"v":1,"id":7,"op":"open-domain","args":{"bundle":"e30="}}'), "format"),
    (_framed(b'{"v":1,"id":7,"op":"create-domain","args":{"name":"x","trust":"'
             + b"0" * 64 + b'","chain":[]}}'), "chain"),
    # over what any client may send: refused unread, and recorded as refusals are
    (struct.pack(">I", protocol.MAX_FRAME + 1), "refused"),
]


@pytest.mark.parametrize(("payload", "code"), MALFORMED)
def test_malformed_request_gets_an_error_answer(
    world: World, payload: bytes, code: str
) -> None:
    answer = _first_response(_raw_exchange(world.agent.address, payload))
    assert answer["ok"] is False
    assert answer["error"]["code"] == code, answer  # type: ignore[index]
    assert _hello(world) == "root"


def test_connection_stays_usable_after_a_bad_request(world: World) -> None:
    bad = _framed(b'{"v":1,"id":1,"op":"nope","args":{}}')
    good = _framed(b'{"v":1,"id":2,"op":"hello","args":{}}')
    raw = _raw_exchange(world.agent.address, bad + good)
    first = _first_response(raw)
    (length,) = struct.unpack(">I", raw[:4])
    second = _first_response(raw[4 + length :])
    assert (first["id"], first["ok"]) == (1, False)
    assert (second["id"], second["ok"]) == (2, True)


def test_random_garbage_never_crashes_the_agent(world: World) -> None:
    import random

    rng = random.Random(1234)
    templates = [payload for payload, _ in MALFORMED[:-1]]
    for _ in range(300):
        payload = bytearray(rng.choice(templates))
        for _ in range(rng.randint(1, 6)):
            payload[rng.randrange(len(payload))] = rng.randrange(256)
        if rng.random() < 0.2:
            payload = payload[: rng.randrange(len(payload))]
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            _raw_exchange(world.agent.address, bytes(payload))
    assert world.agent.alive()
    assert _hello(world) == "root"
    assert "internal error" not in world.agent.log()


def test_half_sent_frame_does_not_block_other_clients(world: World) -> None:
    with socket.socket(socket.AF_UNIX) as stalled:
        stalled.connect(world.agent.address)
        stalled.sendall(struct.pack(">I", 1000) + b"{")  # and then nothing
        assert _hello(world) == "root"


# -- load: many clients at once -------------------------------------------------------------


def test_eight_concurrent_clients_get_the_keys_in_process_pkcs11_gives(world: World) -> None:
    bundle = world.ops("domain", "export", "payroll").stdout.strip().encode()
    infos = [b"kmsfs/v1/file\x00" + i.to_bytes(16, "big") for i in range(400)]
    with domains.open_keys(Context.at(world.agent_admin.store),
                           domains.DomainBundle.from_bytes(bundle)) as local:
        want = [local.derive(i) for i in infos[:50]]
    results: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            with AgentDeriver(world.agent.client(), bundle).open() as deriver:
                keys = deriver.derive_many(infos)  # one batch
                keys_single = [deriver.derive(i) for i in infos[:20]]  # one request each
            assert keys_single == keys[:20]
            results[n] = keys
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 8
    for keys in results.values():
        assert keys == results[0]
        assert keys[:50] == want


def test_eight_concurrent_mounts_through_one_agent(world: World, tmp_path: Path) -> None:
    mounts = []
    try:
        for n in range(8):
            cipherdir = tmp_path / f"cipher{n}"
            assert kmsfs("init", str(cipherdir), "--domain", "payroll",
                         "--store", str(world.ops.store)).returncode == 0
            mounts.append(AgentMount(cipherdir, tmp_path / f"mnt{n}", tmp_path / f"m{n}.log",
                                     ["--agent", world.agent.address]).start())
        errors: list[BaseException] = []

        def work(mount: AgentMount, n: int) -> None:
            try:
                for i in range(30):
                    (mount.mountpoint / f"f{i}").write_bytes(f"{n}:{i}".encode() * 100)
                for i in range(30):
                    assert (mount.mountpoint / f"f{i}").read_bytes() == f"{n}:{i}".encode() * 100
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(m, n)) for n, m in enumerate(mounts)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors, errors
    finally:
        for mount in mounts:
            mount.stop()
    for mount in mounts:
        assert "ERROR" not in mount.log(), mount.log()


# -- the agent restarting under a live mount ------------------------------------------------


def _own_agent_and_mount(world: World, tmp_path: Path) -> tuple[AgentProcess, AgentMount]:
    """An agent of this test's own (uid 0 may do everything) and a volume mounted through it;
    a failed mount does not leave the agent running past the test."""
    cipherdir = _volume(world, tmp_path)
    agent = AgentProcess(world.agent_admin.store, tmp_path / "agent2", root_policy()).start()
    try:
        mount = AgentMount(cipherdir, tmp_path / "mnt", tmp_path / "mnt.log",
                           ["--agent", agent.address]).start()
    except BaseException:
        agent.stop()
        raise
    return agent, mount


def test_agent_restart_under_a_live_mount(world: World, tmp_path: Path) -> None:
    agent, mount = _own_agent_and_mount(world, tmp_path)
    try:
        for name in ("open-before", "closed-before"):
            (mount.mountpoint / name).write_bytes(name.encode() * 1000)
        held = open(mount.mountpoint / "open-before", "r+b")  # noqa: SIM115
        try:
            held.read()
            assert agent.stop() == 0
            # Down: the open file keeps its key and keeps working ...
            held.seek(0)
            assert held.read() == b"open-before" * 1000
            held.write(b"more")
            held.flush()
            os.fsync(held.fileno())
            # ... a file whose key is not held cannot be read: EIO, and the log says why.
            closed = mount.mountpoint / "closed-before"
            drop_cache(closed)
            with pytest.raises(OSError) as err:
                closed.read_bytes()
            assert err.value.errno == errno.EIO
            assert f"agent {agent.address}" in mount.log()
            # Back: the mount reconnects by itself (at most one retry a second).
            agent.start()
            assert wait_for(lambda: _reads(closed, b"closed-before" * 1000), timeout=15)
            assert _can_create(mount.mountpoint / "new-after")
            held.seek(0)
            assert held.read() == b"open-before" * 1000 + b"more"
        finally:
            held.close()
    finally:
        mount.stop()
        agent.stop()
    assert "Traceback" not in mount.log()


def test_a_policy_reloaded_to_refuse_the_mount_gives_eacces_and_one_line_each(
    world: World, tmp_path: Path
) -> None:
    """The agent's policy reloaded under a live mount so that it may no longer derive: each
    open of a file whose key is not held, and each create once the keys derived ahead are
    used up, is EACCES with one log line naming the refusal (each logged a 44-line traceback
    as an 'unexpected error', and was EIO; found by review)."""
    agent, mount = _own_agent_and_mount(world, tmp_path)
    try:
        closed = mount.mountpoint / "closed"
        closed.write_bytes(b"written before the reload")
        agent.policy.write_text(
            '[[client]]\nname = "root"\nuids = [0]\ndomains = ["other"]\nallow = ["derive"]\n'
        )
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: " reloaded (" in agent.log(), timeout=15), agent.log()
        drop_cache(closed)
        with pytest.raises(OSError) as refused:
            closed.read_bytes()
        assert refused.value.errno == errno.EACCES
        created = 0
        with pytest.raises(OSError) as exhausted:
            for created in range(1, 10_000):  # the keys derived ahead run out
                (mount.mountpoint / f"new-{created}").write_bytes(b"x")
        assert exhausted.value.errno == errno.EACCES, created
        lines = [x for x in mount.log().splitlines() if "may not derive for Domain payroll" in x]
        assert len(lines) >= 2 and all(" refused: agent: " in x for x in lines), mount.log()
    finally:
        mount.stop()
        agent.stop()
    assert "Traceback" not in mount.log() and "unexpected error" not in mount.log()


def _reads(path: Path, want: bytes) -> bool:
    """Read *path* from its ciphertext (the page cache dropped): True if it gives *want*."""
    try:
        drop_cache(path)
        return path.read_bytes() == want
    except OSError:
        return False


def _can_create(path: Path) -> bool:
    try:
        path.write_bytes(b"back")
    except OSError:
        return False
    return path.read_bytes() == b"back"


# -- the audit log ----------------------------------------------------------------------------


def test_audit_log_verifies_and_records_refusals(world: World) -> None:
    _as_uid(STRANGER, [*ADMIN, "--agent", world.agent.address, "hsm", "health"])
    result = world.agent_admin("--json", "audit", "verify", str(world.agent.audit))
    report = result.json
    assert report["problems"] == []
    assert report["records"] >= 3
    decisions = {r["decision"] for r in _records(world.agent) if r["type"] == "event"}
    assert decisions == {"allowed", "refused"}


def test_idle_agent_signs_its_tail_and_a_stopped_one_leaves_it_signed(
    world: World, tmp_path: Path
) -> None:
    agent = AgentProcess(world.agent_admin.store, tmp_path / "agent", root_policy(),
                         extra=("--audit-seconds", "0.5")).start()
    try:
        with agent.client() as client:
            client.call("health", {})
        assert wait_for(lambda: _verify(world, agent)["unsigned_tail"] == 0, timeout=10)
        with agent.client() as client:
            client.call("health", {})  # signed by the final checkpoint on SIGTERM at the latest
    finally:
        assert agent.stop() == 0
    report = _verify(world, agent)
    assert report["unsigned_tail"] == 0 and report["checkpoints"] >= 2


def test_sighup_after_log_rotation_continues_in_a_new_file(
    world: World, tmp_path: Path
) -> None:
    """logrotate's way: move the log aside, then SIGHUP (systemctl reload). The agent signs
    and closes the old file and continues in a new one that names where it left off; both
    verify on their own, and nothing is written to the old file after the move."""
    log_file = tmp_path / "hsmd-own.log"
    agent = AgentProcess(world.agent_admin.store, tmp_path / "agent", root_policy(),
                         extra=("--log-file", str(log_file))).start()
    rotated = agent.audit.with_name("audit.log.1")
    try:
        with agent.client() as client:
            client.call("health", {})
        agent.audit.rename(rotated)
        log_file.rename(log_file.with_name("hsmd-own.log.1"))  # --log-file rotated as well
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        assert wait_for(agent.audit.exists, timeout=10)
        assert wait_for(log_file.exists, timeout=10)  # it went on writing the old one
        with agent.client() as client:
            client.call("health", {})
    finally:
        assert agent.stop() == 0
    old = world.agent_admin("--json", "audit", "verify", str(rotated)).json
    assert old["problems"] == [] and old["unsigned_tail"] == 0
    new = world.agent_admin("--json", "audit", "verify", str(agent.audit)).json
    assert new["problems"] == [] and new["unsigned_tail"] == 0
    first = json.loads(agent.audit.read_text().splitlines()[0])
    assert first["op"] == "reopen" and first["detail"]["previous"]["seq"] == old["records"] - 1
    ops = [json.loads(line).get("op") for line in agent.audit.read_text().splitlines()]
    assert "health" in ops
    assert "audit log" in log_file.read_text() and "reopened" in log_file.read_text()


def _verify(world: World, agent: AgentProcess) -> dict[str, object]:
    return world.agent_admin("--json", "audit", "verify", str(agent.audit)).json


def test_client_refuses_a_socket_served_by_another_user(tmp_path: Path) -> None:
    """Someone else's process at the agent's path could hand out keys of its choosing."""
    sock_dir = Path(tempfile.mkdtemp(prefix="kmsfs-squat-"))
    sock_dir.chmod(0o777)
    path = sock_dir / "hsmd.sock"
    squatter = subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
         "-c", "import socket,sys,time\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\n"
         "s.listen()\nprint('ready',flush=True)\ntime.sleep(60)", str(path)],
        stdout=subprocess.PIPE, text=True, env=clean_env(),
    )
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "ready"
        with AgentClient(AgentAddress.parse(str(path))) as client, \
                pytest.raises(AgentUnavailableError, match=f"served by uid {NOBODY}"):
            client.call("hello", {})
    finally:
        squatter.kill()
        squatter.communicate()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_client_of_a_stopped_agent_says_so(tmp_path: Path) -> None:
    with AgentClient(AgentAddress.parse(str(tmp_path / "gone.sock"))) as client, \
            pytest.raises(AgentUnavailableError, match=r"agent .*gone\.sock"):
        client.call("hello", {})



# -- the socket: one agent per path -------------------------------------------------------------


def _hsmd(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    """Run ``agent``'s command to its end (for agents expected to refuse to start)."""
    return subprocess.run(agent.command(), capture_output=True, text=True, timeout=120,
                          env=clean_env(), check=False)


def test_second_agent_on_a_served_socket_refuses_and_changes_nothing(
    world: World, tmp_path: Path
) -> None:
    """It used to take the path over as "stale": the first agent ran on, unreachable."""
    path = world.agent.socket
    before = path.lstat()
    second = AgentProcess(world.agent_admin.store, tmp_path / "second", root_policy(),
                          socket_path=path)
    result = _hsmd(second)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"kmsfs-hsmd: error: another process is listening on {path} (another kmsfs-hsmd?); "
        "stop it first or choose another --socket"
    ]
    assert not second.audit.exists()  # refused before its audit log was opened
    assert path.lstat().st_ino == before.st_ino
    assert world.agent.alive() and _hello(world) == "root"
    with world.agent.client() as client:
        client.call("health", {})


def test_socket_activated_agent_serves_systemds_socket_named_by_socket(
    world: World, tmp_path: Path
) -> None:
    """Started by systemd's socket (socket activation) with ``--socket`` naming that same
    path, the agent took its own inherited socket for another agent's and refused to start."""

    class Activated(AgentProcess):
        def command(self) -> list[str]:
            return ["systemd-socket-activate", "-l", str(self.socket), *super().command()]

    sock_dir = Path(tempfile.mkdtemp(prefix="kmsfs-activated-"))
    try:
        agent = Activated(world.agent_admin.store, tmp_path / "agent", root_policy(),
                          socket_path=sock_dir / "hsmd.sock").start()
        try:
            with agent.client() as client:
                assert client.call("hello", {})["client"] == "root"
        finally:
            assert agent.stop() == 0
        assert "another process is listening" not in agent.log()
        assert agent.socket.is_socket()  # systemd's: left for the next activation
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_stale_socket_file_is_taken_over_but_not_another_file(
    world: World, tmp_path: Path
) -> None:
    sock_dir = Path(tempfile.mkdtemp(prefix="kmsfs-stale-"))
    try:
        path = sock_dir / "hsmd.sock"
        with socket.socket(socket.AF_UNIX) as old:  # an agent that died: its file stays
            old.bind(str(path))
        agent = AgentProcess(world.agent_admin.store, tmp_path / "agent", root_policy(),
                             socket_path=path).start()
        try:
            with agent.client() as client:
                assert client.call("hello", {})["client"] == "root"
        finally:
            assert agent.stop() == 0
        # a clean stop removes the socket file it made (it stayed, for the next start to
        # replace); the lock beside it stays (removing a lock file races its next user)
        assert not path.exists() and path.with_name("hsmd.sock.lock").exists()
        path.write_text("not a socket")
        result = _hsmd(AgentProcess(world.agent_admin.store, tmp_path / "other", root_policy(),
                                    socket_path=path))
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [
            f"kmsfs-hsmd: error: {path}: exists and is not a socket"
        ]
        assert path.read_text() == "not a socket"
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)

# -- last: these supersede world.trust ---------------------------------------------------------


def test_operators_store_has_no_hsm_of_its_own(world: World) -> None:
    """Without --agent the same seal fails: the HSM PINs are only in the agent's store.

    Near the end: the Trust the agent then seals supersedes ``world.trust``."""
    trust = world.ops.propose(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2,
                              predecessor=world.trust)
    world.ops.sign(trust, "alice", "bob")
    result = world.ops("trust", "seal", trust, check=4)
    assert "no HSM could serve" in result.stderr
    assert not (world.ops.store / "seals" / trust).exists()
    world.ops("--agent", world.agent.address, "trust", "seal", trust)  # the agent can


def test_agent_refuses_to_fork_its_line_of_trusts(world: World) -> None:
    """A client whose store lacks the sealed successor the agent's store holds (the test
    before sealed one of world.trust) passes its own fork check; the agent's store must not
    get a second line of Trusts unless the client says --fork (``"fork": true``)."""
    trust = world.ops.propose(["hsm1"], ["alice", "bob", "carol"], 2, predecessor=world.trust)
    world.ops.sign(trust, "alice", "bob")
    ctx = Context.at(world.ops.store)
    request = {
        "trust": ctx.store.trust(trust).payload(),
        "approvals": [a.to_dict("approval") for a in ctx.store.signatures("approval", trust)],
        "chain": [link.to_dict() for link in domains.trusts.verified_chain(ctx, world.trust)],
    }
    with world.agent.client() as client:
        with pytest.raises(UsageError, match=r"forks the line of Trusts.*add --fork"):
            client.call("seal-trust", request, retry=False)
        assert not (world.agent_admin.store / "trusts" / f"{trust}.json").exists()
        assert not (world.agent_admin.store / "approvals" / trust).exists()
        with pytest.raises(FormatError, match="'fork': want bool"):
            client.call("seal-trust", {**request, "fork": "yes"}, retry=False)
        sealed = client.call("seal-trust", {**request, "fork": True}, retry=False)
    assert sealed["seal"]["subject"] == trust
    assert list((world.agent_admin.store / "seals" / trust).glob("*.json"))


def test_rewrap_through_agent_keeps_data_readable(world: World, tmp_path: Path) -> None:
    """Revoke hsm2: a successor Trust of hsm1 only, sealed and rewrapped through the agent.

    Last in the module: the Trust it seals supersedes ``world.trust``, under which nothing
    new may be made afterwards (no Domain, no rotation, no new volume)."""
    address = world.agent.address
    trust = world.ops.propose(["hsm1", "hsm2"], ["alice", "bob"], 1, predecessor=world.trust)
    world.ops.sign(trust, "alice", "bob")
    # --fork: the test before sealed another successor of world.trust in this module's store
    world.ops("--agent", address, "trust", "seal", trust, "--fork")
    # Nothing is wrapped on a forked line (test_forked_line.py): the operators keep this one,
    # and remove the other successors of world.trust that earlier tests sealed.
    for store in (world.ops.store, world.agent_admin.store):
        drop_rivals(store, world.trust, trust)
    world.ops("--agent", address, "domain", "create", "ledger", "--trust", trust)
    cipherdir = tmp_path / "cipher"
    assert kmsfs("init", str(cipherdir), "--domain", "ledger",
                 "--store", str(world.ops.store)).returncode == 0
    mount = AgentMount(cipherdir, tmp_path / "mnt", tmp_path / "mnt.log",
                       ["--agent", address]).start()
    try:
        (mount.mountpoint / "before").write_text("written under generation 1\n")
    finally:
        mount.stop()
    successor = world.ops.propose(["hsm1"], ["alice", "bob"], 1, predecessor=trust)
    world.ops.sign(successor, "alice")
    world.ops("--agent", address, "trust", "seal", successor)
    # Until the rewrap, a mount through the agent keeps working and says a rewrap is due, as
    # one through its own store does (test_superseded_trust.py).
    due = AgentMount(cipherdir, tmp_path / "mnt", tmp_path / "due.log",
                     ["--agent", address]).start()
    try:
        assert (due.mountpoint / "before").read_text() == "written under generation 1\n"
    finally:
        due.stop()
    warning = f"supersedes: ask an operator to rewrap it (kmsfs-admin domain rewrap ledger " \
        f"--trust {successor[:12]})"
    assert warning in (tmp_path / "due.log").read_text()
    out = world.ops("--json", "--agent", address, "domain", "rewrap", "ledger",
                    "--trust", successor).json
    assert out["generation"] == 2
    for store in (world.ops.store, world.agent_admin.store):
        current = domains.current(Context.at(store), "ledger")
        assert current.sealed.domain.generation == 2
        assert [h.label for h in current.trust.trust.hsms] == ["hsm1"]
    mount = AgentMount(cipherdir, tmp_path / "mnt", tmp_path / "mnt.log",
                       ["--agent", address]).start()
    try:
        assert (mount.mountpoint / "before").read_text() == "written under generation 1\n"
    finally:
        mount.stop()
    assert "supersedes" not in (tmp_path / "mnt.log").read_text()
    opened = [r for r in _records(world.agent) if r.get("op") == "derive"
              and r.get("detail", {}).get("open") is not None]
    assert opened, "the mount opened the Domain through the agent"
