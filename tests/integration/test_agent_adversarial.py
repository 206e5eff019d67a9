"""kmsfs-hsmd under attack: a hostile client, a dishonest operator, a malicious agent.

The agent here is the real service object (``kmsfs.agent.service.Agent``) and, where the
transport matters, the real ``Server`` on a Unix socket, in this process, over real SoftHSM2
tokens: that lets one test play several peers (the policy names uids that are not ours) and
move the agent's timing knobs. The admin-side tests talk to a fake agent, a few lines of socket
server that answers whatever the test wants, because that is what a malicious or buggy agent is.

Tests marked ``xfail(strict=True)`` are open bugs: each fails today and passes once fixed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kmsfs.agent import protocol, remote
from kmsfs.agent import server as agent_server
from kmsfs.agent.audit import AuditLog
from kmsfs.agent.client import AgentAddress, AgentClient, AgentDeriver
from kmsfs.agent.policy import Peer, Policy
from kmsfs.agent.service import Agent
from kmsfs.errors import (
    AgentRefusedError,
    FormatError,
    IntegrityError,
    KmsfsError,
    QuorumNotMetError,
)
from kmsfs.model.canonical import b64encode
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.trust import Member, Trust
from kmsfs.service import domains, trusts
from kmsfs.service.context import Context, HsmSession, utc_now
from tests.integration.agent_helpers import AgentProcess, root_policy
from tests.kms_helpers import ADMIN, Admin

pytestmark = pytest.mark.timeout(300)

ALL = '["derive", "create-domain", "rewrap", "seal-trust", "health"]'
MOUNT_A, MOUNT_B, STRANGER = 1001, 1002, 4242  # uids: two listed peers and one nobody names
POLICY = (
    f'[[client]]\nname = "mount-a"\nuids = [{MOUNT_A}]\ndomains = ["payroll"]\n'
    'allow = ["derive"]\n'
    f'[[client]]\nname = "mount-b"\nuids = [{MOUNT_B}]\ndomains = ["other"]\n'
    'allow = ["derive"]\n'
)
ROOT_ALL = f'[[client]]\nname = "root"\nuids = [0]\ndomains = ["*"]\nallow = {ALL}\n'


@dataclass
class Kms:
    admin: Admin
    store: Path
    t1: str  # hsm1+hsm2, alice/bob/carol, quorum 2 (the genesis's pinned successor)
    t2: str  # successor of t1: hsm1 only, alice/bob, quorum 2
    root: Path

    @property
    def ctx(self) -> Context:
        return Context.at(self.store)

    def bundle(self, name: str) -> str:
        return b64encode(domains.export_bundle(self.ctx, name).to_bytes())

    def chain(self, trust_id: str) -> list[dict[str, Any]]:
        return [link.to_dict() for link in trusts.verified_chain(self.ctx, trust_id)]


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Kms:
    root = tmp_path_factory.mktemp("adversarial")
    admin = Admin.under(root)
    admin("init", "--hsms", "2")
    admin.create_operators("alice", "bob", "carol", "dave")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    admin("domain", "create", "payroll", "--trust", t1)
    admin("domain", "create", "other", "--trust", t1)
    t2 = admin.sealed_trust(["hsm1"], ["alice", "bob"], 2, predecessor=t1)
    return Kms(admin, admin.store, t1, t2, root)


@pytest.fixture
def fresh(tmp_path: Path) -> Admin:
    """A store of its own, genesis only (unpinned), operators alice and bob."""
    admin = Admin.under(tmp_path)
    admin("init", "--hsms", "1")
    admin.create_operators("alice", "bob")
    return admin


@contextlib.contextmanager
def in_process_agent(
    store: Path, policy: str, audit_path: Path | None = None
) -> Iterator[Agent]:
    audit = AuditLog(audit_path, None) if audit_path is not None else None
    agent = Agent(store, Policy.parse(policy, "test-policy"), audit.append if audit else None)
    try:
        yield agent
    finally:
        agent.close()
        if audit is not None:
            audit.close()


def call(agent: Agent, peer: Peer, op: str, args: dict[str, Any]) -> dict[str, Any]:
    return agent.handle(peer, protocol.Request(1, op, args))


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(path: Path) -> list[dict[str, Any]]:
    return [r for r in records(path) if r["type"] == "event"]


def peer(uid: int) -> Peer:
    return Peer.local(uid)


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A directory whose socket paths fit in sun_path, readable by other uids."""
    path = Path(tempfile.mkdtemp(prefix="kmsfs-adv-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def serving(agent: Agent, sock_dir: Path) -> Iterator[Path]:
    """The real Server on a Unix socket (mode 0666: the policy, not the mode, decides)."""
    path = sock_dir / "hsmd.sock"
    server = agent_server.Server(agent, [agent_server.unix_listener(path, 0o666)])
    server.start()
    try:
        yield path
    finally:
        server.stop()


def raw_request(sock: socket.socket, message: dict[str, Any]) -> None:
    body = json.dumps(message, ensure_ascii=False).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        if not chunk:
            return None
        header += chunk
    (length,) = struct.unpack(">I", header)
    body = bytearray()
    while len(body) < length:
        chunk = sock.recv(min(1 << 20, length - len(body)))
        if not chunk:
            return None
        body += chunk
    return json.loads(bytes(body))


# -- the policy: one peer's Domain is not another's ------------------------------------------


def test_handle_opened_by_one_peer_is_useless_to_a_peer_of_another_domain(
    kms: Kms, tmp_path: Path
) -> None:
    """Handles are shared in the agent (Domain ids, public): derive re-checks the policy on the
    verified name of the Domain behind the handle, for the peer that asks, and audits it."""
    audit = tmp_path / "audit.log"
    with in_process_agent(kms.store, POLICY, audit) as agent:
        handle = call(agent, peer(MOUNT_A), "open-domain", {"bundle": kms.bundle("payroll")})[
            "handle"
        ]
        infos = {"handle": handle, "infos": [b64encode(b"file-id-1")]}
        assert len(call(agent, peer(MOUNT_A), "derive", infos)["keys"]) == 1
        with pytest.raises(AgentRefusedError, match="may not derive for Domain payroll"):
            call(agent, peer(MOUNT_B), "derive", infos)
        with pytest.raises(AgentRefusedError, match="may not derive for Domain payroll"):
            call(agent, peer(MOUNT_B), "open-domain", {"bundle": kms.bundle("payroll")})
        other = call(agent, peer(MOUNT_B), "open-domain", {"bundle": kms.bundle("other")})
        assert other["name"] == "other" and other["handle"] != handle
    refused = [
        (e["op"], e["domain"]) for e in events(audit)
        if e["who"] == peer(MOUNT_B).describe() and e["decision"] == "refused"
    ]
    assert refused == [("derive", "payroll"), ("derive", "payroll")]


def test_a_reloaded_policy_applies_to_handles_already_open(kms: Kms) -> None:
    """What SIGHUP does (cli.on_hup swaps agent.policy): a peer removed from the policy loses
    derivation at once, through handles it opened under the old policy."""
    with in_process_agent(kms.store, POLICY) as agent:
        handle = call(agent, peer(MOUNT_A), "open-domain", {"bundle": kms.bundle("payroll")})[
            "handle"
        ]
        derive = {"handle": handle, "infos": [b64encode(b"file-id")]}
        call(agent, peer(MOUNT_A), "derive", derive)
        agent.policy = Policy.parse("[[client]]" + POLICY.split("[[client]]")[2], "new")
        with pytest.raises(AgentRefusedError, match="not in the agent's policy"):
            call(agent, peer(MOUNT_A), "derive", derive)


def test_unlisted_peer_derive_is_refused_and_audited_whether_or_not_the_handle_is_open(
    kms: Kms, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.log"
    with in_process_agent(kms.store, POLICY, audit) as agent:
        handle = call(agent, peer(MOUNT_A), "open-domain", {"bundle": kms.bundle("payroll")})[
            "handle"
        ]
        for probe in (handle, "ab" * 32):
            with pytest.raises(AgentRefusedError, match="not in the agent's policy"):
                call(agent, peer(STRANGER), "derive",
                     {"handle": probe, "infos": [b64encode(b"x")]})
    refused = [e for e in events(audit) if e["who"].startswith(f"uid={STRANGER}")]
    assert len(refused) == 2 and all(e["decision"] == "refused" for e in refused)


def test_malformed_request_of_an_unlisted_peer_is_in_the_audit_log(
    kms: Kms, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.log"
    with in_process_agent(kms.store, POLICY, audit) as agent:
        with pytest.raises(KmsfsError):
            call(agent, peer(STRANGER), "create-domain",
                 {"name": "payroll", "trust": "not-a-trust-id", "chain": []})
        with pytest.raises(KmsfsError):
            call(agent, peer(STRANGER), "seal-trust", {"trust": {}, "approvals": [], "chain": []})
    mine = [e for e in events(audit) if e["who"].startswith(f"uid={STRANGER}")]
    assert [e["op"] for e in mine] == ["create-domain", "seal-trust"], mine


# -- the audit log: what a client controls stays bounded and inert ---------------------------


def test_refused_request_cannot_bloat_the_audit_log(kms: Kms, tmp_path: Path) -> None:
    audit = tmp_path / "audit.log"
    name = "\u00e9" * 100_000  # 200 kB of UTF-8 on the wire, 600 kB once escaped
    with in_process_agent(kms.store, POLICY, audit) as agent:
        for who in (STRANGER, MOUNT_A):
            with pytest.raises(KmsfsError):
                call(agent, peer(who), "create-domain",
                     {"name": name, "trust": kms.t1, "chain": kms.chain(kms.t1)})
    assert audit.stat().st_size < 16 * 1024, f"audit log grew to {audit.stat().st_size} bytes"


def test_audit_show_prints_no_client_controlled_control_characters(
    kms: Kms, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.log"
    forged = "payroll\n99  2030-01-01T00:00:00Z  event  uid=0(root)  derive  payroll  allowed  ok"
    with in_process_agent(kms.store, POLICY, audit) as agent:
        with pytest.raises(KmsfsError):
            call(agent, peer(STRANGER), "create-domain",
                 {"name": forged + "\x1b[2K\x1b[1A", "trust": kms.t1, "chain": []})
        with pytest.raises(KmsfsError):
            call(agent, peer(STRANGER), "health", {})
    count = len(records(audit))
    shown = subprocess.run([*ADMIN, "--store", str(kms.store), "audit", "show", str(audit)],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "\x1b" not in shown
    assert len(shown.splitlines()) == count + 1, shown  # a header and one line per record


# -- the transport: one client cannot take the agent away from the others -------------------


def test_oversized_refusal_is_answered_not_dropped(
    kms: Kms, caplog: pytest.LogCaptureFixture
) -> None:
    policy = (
        '[[client]]\nname = "root-derive"\nuids = [0]\ndomains = ["payroll"]\n'
        'allow = ["derive"]\n'
    )
    caplog.set_level(logging.INFO, logger="kmsfs.agent")
    with short_dir() as d, in_process_agent(kms.store, policy) as agent, \
            serving(agent, d) as path, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        raw_request(sock, {"v": 1, "id": 5, "op": "create-domain",
                           "args": {"name": "\u00e9" * 900_000, "trust": kms.t1,
                                    "chain": []}})
        answer = read_frame(sock)
        assert answer is not None, "the agent hung up instead of answering"
        assert answer["id"] == 5 and answer["ok"] is False
        raw_request(sock, {"v": 1, "id": 6, "op": "hello", "args": {}})
        assert read_frame(sock)["ok"] is True  # type: ignore[index]
    assert "Traceback" not in caplog.text and "connection failed" not in caplog.text


def test_slow_frame_is_cut_after_body_timeout(
    kms: Kms, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_server, "BODY_TIMEOUT", 0.5)
    with short_dir() as d, in_process_agent(kms.store, ROOT_ALL) as agent, \
            serving(agent, d) as path, socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(struct.pack(">I", 10_000))
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 4.0:
            try:
                sock.sendall(b" ")
                if sock.recv(1, socket.MSG_DONTWAIT) == b"":
                    closed = True
                    break
            except BlockingIOError:
                pass
            except OSError:
                closed = True
                break
            time.sleep(0.2)
        assert closed, "a frame dripped in over 4 s was still being read (BODY_TIMEOUT 0.5 s)"


HOLD = """\
import socket, sys
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
print("holding", flush=True)
sys.stdin.read()
"""


def test_unlisted_peer_cannot_take_every_connection_slot(
    kms: Kms, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_server, "MAX_CONNECTIONS", 4)
    with short_dir() as d, in_process_agent(kms.store, ROOT_ALL) as agent, \
            serving(agent, d) as path:
        hog = subprocess.Popen(
            ["setpriv", f"--reuid={STRANGER}", f"--regid={STRANGER}", "--clear-groups",
             sys.executable, "-c", HOLD, str(path), "4"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert hog.stdout is not None and hog.stdout.readline().strip() == "holding"
            time.sleep(0.3)  # let the accept loop hand out the slots
            deadline, served = time.monotonic() + 3.0, False
            while not served and time.monotonic() < deadline:
                try:
                    with AgentClient(AgentAddress(path=path)) as client:
                        served = client.call("hello", {})["client"] == "root"
                except KmsfsError:
                    time.sleep(0.2)
            assert served, "a listed peer was locked out by an unlisted peer's idle sockets"
        finally:
            hog.kill()
            hog.communicate()


# -- the HSMs: many connection threads, one PKCS#11 library ----------------------------------


def test_concurrent_hsm_use_does_not_crash_the_agent(fresh: Admin, tmp_path: Path) -> None:
    trust = fresh.sealed_trust(["hsm1"], ["alice", "bob"], 2)
    for name in ("payroll", "other"):
        fresh("domain", "create", name, "--trust", trust)
    ctx = Context.at(fresh.store)
    bundles = [domains.export_bundle(ctx, n).to_bytes() for n in ("payroll", "other")]
    infos = [b"file-%d" % i for i in range(300)]
    agent = AgentProcess(fresh.store, tmp_path / "agent", root_policy()).start()
    errors: list[BaseException] = []

    def mount(n: int) -> None:
        try:
            with AgentDeriver(agent.client(), bundles[n % 2]).open() as deriver:
                for _ in range(15):
                    deriver.derive_many(infos)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=mount, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert agent.alive(), f"the agent died:\n{agent.log()[-2000:]}"
        assert not errors, errors
    finally:
        agent.stop()


# -- seal-trust: quorums, the genesis's one successor, what lands in the store -------------


def _seal_args(ctx: Context, trust_id: str, chain_to: str) -> dict[str, Any]:
    return {
        "trust": ctx.store.trust(trust_id).payload(),
        "approvals": [a.to_dict("approval") for a in ctx.store.signatures("approval", trust_id)],
        "chain": [link.to_dict() for link in trusts.verified_chain(ctx, chain_to)],
    }


def test_agent_refuses_a_successor_without_its_predecessors_quorum(
    kms: Kms, tmp_path: Path
) -> None:
    """TUF's rule through the agent: dave alone (quorum 1 of the new Trust) plus one of t1's
    operators (1 of the 2 t1 needs) must not get a successor of t1 sealed."""
    ctx = kms.ctx
    t1 = ctx.store.trust(kms.t1)
    dave = ctx.store.operator("dave")
    proposal = Trust(t1.serial + 1, t1.id, t1.hsms, (Member("dave", dave.key),), 1, utc_now())
    ctx.store.save_trust(proposal)
    kms.admin.sign(proposal.id, "dave", "alice")
    audit = tmp_path / "audit.log"
    with in_process_agent(kms.store, ROOT_ALL, audit) as agent, \
            pytest.raises(QuorumNotMetError, match="predecessor"):
        call(agent, peer(0), "seal-trust", _seal_args(ctx, proposal.id, kms.t1))
    assert not (kms.store / "seals" / proposal.id).exists()
    assert events(audit)[-1]["reason"].startswith("failed:")


def test_agent_refuses_a_rival_successor_of_the_genesis_once_pinned(
    kms: Kms, tmp_path: Path
) -> None:
    ctx = kms.ctx
    anchor = ctx.store.anchor()
    genesis = ctx.store.trust(anchor.root)
    dave = ctx.store.operator("dave")
    rival = Trust(2, anchor.root, genesis.hsms, (Member("dave", dave.key),), 1, utc_now())
    ctx.store.save_trust(rival)
    kms.admin.sign(rival.id, "dave")
    with in_process_agent(kms.store, ROOT_ALL, tmp_path / "audit.log") as agent, \
            pytest.raises(KmsfsError, match="already has its successor"):
        call(agent, peer(0), "seal-trust", _seal_args(ctx, rival.id, anchor.root))
    assert not (kms.store / "seals" / rival.id).exists()
    assert ctx.store.anchor() == anchor


_PKCS11 = threading.Lock()


def slow_serialized(open_hsm: Callable[..., Any]) -> Callable[..., Any]:
    """``open_hsm`` as a slow HSM would be, one caller at a time.

    A slow HSM widens a check-then-act window without deciding its outcome. The PKCS#11 calls
    themselves are serialized here because concurrent ones crash this process (see
    test_concurrent_hsm_use_does_not_crash_the_agent)."""

    @contextlib.contextmanager
    def wrapper(*args: Any, **kwargs: Any) -> Iterator[HsmSession]:
        time.sleep(0.3)
        with _PKCS11, open_hsm(*args, **kwargs) as hsm:
            yield hsm

    return wrapper


def test_concurrent_rival_genesis_successors_get_one_seal(
    fresh: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    ta = fresh.propose(["hsm1"], ["alice"], 1)
    fresh.sign(ta, "alice")
    tb = fresh.propose(["hsm1"], ["bob"], 1)
    fresh.sign(tb, "bob")
    ctx = Context.at(fresh.store)
    root = ctx.store.anchor().root
    monkeypatch.setattr(trusts, "open_hsm", slow_serialized(trusts.open_hsm))
    outcome: dict[str, object] = {}
    barrier = threading.Barrier(2)
    with in_process_agent(fresh.store, ROOT_ALL) as agent:

        def seal(trust_id: str) -> None:
            args = _seal_args(ctx, trust_id, root)
            barrier.wait()
            try:
                outcome[trust_id] = call(agent, peer(0), "seal-trust", args)
            except KmsfsError as exc:
                outcome[trust_id] = exc

        threads = [threading.Thread(target=seal, args=(t,)) for t in (ta, tb)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    sealed = [t for t, r in outcome.items() if isinstance(r, dict)]
    assert len(outcome) == 2 and len(sealed) == 1, outcome
    assert [t for t in (ta, tb) if (fresh.store / "seals" / t).exists()] == sealed


def test_concurrent_create_domain_of_one_name_makes_one_domain(
    kms: Kms, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(domains, "open_hsm", slow_serialized(domains.open_hsm))
    args = {"name": "race", "trust": kms.t1, "chain": kms.chain(kms.t1)}
    barrier = threading.Barrier(2)
    outcome: list[object] = []
    with in_process_agent(kms.store, ROOT_ALL) as agent:

        def create() -> None:
            barrier.wait()
            try:
                outcome.append(call(agent, peer(0), "create-domain", dict(args)))
            except KmsfsError as exc:
                outcome.append(exc)

        threads = [threading.Thread(target=create) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    ctx = kms.ctx
    named = [i for i in ctx.store.domain_ids() if ctx.store.domain(i).domain.name == "race"]
    assert len(named) == 1, outcome


def test_seal_trust_cannot_plant_a_document_the_store_then_refuses(fresh: Admin) -> None:
    ctx = Context.at(fresh.store)
    anchor = ctx.store.anchor()
    genesis = ctx.store.trust(anchor.root)
    members = tuple(
        Member(f"o{i}", PublicKey("ed25519", os.urandom(32))) for i in range(45_000)
    )
    huge = Trust(2, anchor.root, genesis.hsms, members, 1, utc_now())
    assert len(huge.signed_bytes()) > 4 << 20
    args = {"trust": huge.payload(), "approvals": [],
            "chain": [link.to_dict() for link in trusts.verified_chain(ctx, anchor.root)]}
    with in_process_agent(fresh.store, ROOT_ALL) as agent, pytest.raises(KmsfsError):
        call(agent, peer(0), "seal-trust", args)
    fresh("trust", "list")  # exit 0: the agent's store is still readable


# -- key material never reaches a log ----------------------------------------------------------


def test_no_key_or_pin_in_agent_log_or_audit_log(
    kms: Kms, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    audit = tmp_path / "audit.log"
    with in_process_agent(kms.store, ROOT_ALL, audit) as agent:
        opened = call(agent, peer(0), "open-domain", {"bundle": kms.bundle("payroll")})
        keys = call(agent, peer(0), "derive", {
            "handle": opened["handle"], "infos": [b64encode(bytes([i]) * 16) for i in range(8)],
        })["keys"]
        health = call(agent, peer(0), "health", {})
    secrets = list(keys) + [base64.b64decode(k).hex() for k in keys]
    secrets += [p.read_text().strip() for p in (kms.store / "private" / "pins").glob("*")]
    assert len(secrets) >= 17
    logged = caplog.text + audit.read_text()
    for secret in secrets:
        assert secret not in logged
    for row in health["hsms"]:  # the probe signature stays in the agent
        assert set(row) == {"id", "label", "ok", "problem"}


# -- the admin side: a malicious agent's answers are verified, not believed ----------------


class FakeAgent:
    """A socket that answers each request with ``respond(op, args)`` (a result, or raise)."""

    def __init__(self, path: Path, respond: Callable[[str, dict[str, Any]], dict[str, Any]]):
        self.path, self.respond = path, respond
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                while (request := read_frame(conn)) is not None:
                    try:
                        answer = protocol.ok(request["id"],
                                             self.respond(request["op"], request["args"]))
                    except KmsfsError as exc:
                        answer = protocol.failed(request["id"], exc)
                    conn.sendall(protocol.frame(answer))

    def client(self) -> AgentClient:
        return AgentClient(AgentAddress(path=self.path))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(5)


@contextlib.contextmanager
def fake_agent(respond: Callable[[str, dict[str, Any]], dict[str, Any]]) -> Iterator[FakeAgent]:
    with short_dir() as d:
        agent = FakeAgent(d / "fake.sock", respond)
        try:
            yield agent
        finally:
            agent.close()


def _domain_answer(kms: Kms, name: str) -> dict[str, Any]:
    verified = domains.current(kms.ctx, name)
    bundle = domains.DomainBundle(verified.sealed, verified.chain)
    return {"domain": verified.sealed.to_dict(), "bundle": b64encode(bundle.to_bytes())}


def test_admin_create_domain_refuses_another_domain_from_the_agent(kms: Kms) -> None:
    with fake_agent(lambda op, args: _domain_answer(kms, "payroll")) as agent, \
            agent.client() as client, pytest.raises(KmsfsError):
        remote.create_domain(client, kms.ctx, "hr", kms.t1)


def test_admin_rewrap_refuses_an_answer_that_is_not_the_rewrap(kms: Kms) -> None:
    before = domains.current(kms.ctx, "payroll").sealed.id
    with fake_agent(lambda op, args: _domain_answer(kms, "payroll")) as agent, \
            agent.client() as client, pytest.raises(KmsfsError):
        remote.rewrap(client, kms.ctx, "payroll", kms.t2)
    assert domains.current(kms.ctx, "payroll").sealed.id == before


def test_admin_seal_refuses_a_forged_seal_and_writes_nothing(kms: Kms) -> None:
    trust = kms.admin.propose(["hsm1", "hsm2"], ["alice", "bob"], 2, predecessor=kms.t1)
    kms.admin.sign(trust, "alice", "bob")
    hsm1 = next(h for h in kms.ctx.store.trust(trust).hsms if h.label == "hsm1")
    forged = {"_type": "seal", "subject": trust, "key_id": hsm1.id,
              "signature": b64encode(bytes(64))}
    before = kms.ctx.store.anchor()
    with fake_agent(lambda op, args: {"seal": forged}) as agent, agent.client() as client, \
            pytest.raises(IntegrityError):
        remote.seal_trust(client, kms.ctx, trust)
    assert not (kms.store / "seals" / trust).exists()
    assert kms.ctx.store.anchor() == before


@pytest.mark.parametrize(
    "keys", [["AAAA"], [b64encode(bytes(32))] * 3, [b64encode(bytes(31)), b64encode(bytes(32))]]
)
def test_deriver_refuses_keys_of_the_wrong_count_or_size(kms: Kms, keys: list[str]) -> None:
    def respond(op: str, args: dict[str, Any]) -> dict[str, Any]:
        if op == "open-domain":
            return {"handle": "ab" * 32, "name": "payroll"}
        return {"keys": keys}

    bundle = domains.export_bundle(kms.ctx, "payroll").to_bytes()
    with fake_agent(respond) as agent, AgentDeriver(agent.client(), bundle).open() as deriver, \
            pytest.raises(FormatError, match="wrong number or size"):
        deriver.derive_many([b"one", b"two"])


def test_agent_refusal_keeps_its_error_class_on_the_client(kms: Kms) -> None:
    """The client re-raises what the agent said as the local class (the CLI's exit code)."""

    def respond(op: str, args: dict[str, Any]) -> dict[str, Any]:
        raise AgentRefusedError("client uid=1 is not in the agent's policy")

    with fake_agent(respond) as agent, agent.client() as client, \
            pytest.raises(AgentRefusedError, match=r"^agent: client uid=1 "):
        client.call("health", {})


def test_closed_tls_connections_are_all_forgotten(tmp_path: Path) -> None:
    """The server tracked each TLS connection twice (the socket, then its TLS wrapper) and
    forgot only the wrapper: one socket object kept per connection, for the agent's life."""
    import ssl
    import types

    from kmsfs.agent.server import Server, TlsFiles, server_tls_context
    from tests.integration.agent_helpers import TestCA

    ca = TestCA(tmp_path / "ca")
    agent_id, client_id = ca.issue("localhost", server=True), ca.issue("client")
    tls = server_tls_context(TlsFiles(agent_id.cert, agent_id.key, ca.path))
    policy = types.SimpleNamespace(client_name=lambda peer: None)  # a stranger: one request
    server = Server(types.SimpleNamespace(policy=policy), [], tls)  # type: ignore[arg-type]
    client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_tls.load_verify_locations(cafile=ca.path)
    client_tls.load_cert_chain(client_id.cert, client_id.key)
    for _ in range(5):
        ours, theirs = socket.socketpair()
        serving = threading.Thread(target=server._serve, args=(theirs, True))
        serving.start()
        with client_tls.wrap_socket(ours, server_hostname="localhost"):
            pass  # handshake, then close without a request
        serving.join(10)
        assert not serving.is_alive()
    assert server._connections == set()


def test_idle_connections_from_one_address_do_not_lock_tls_clients_out(tmp_path: Path) -> None:
    """About 32 idle TCP connections from anywhere took every handshake slot, for 10 s each,
    again and again: no TLS client got in. Now one address holds at most a few."""
    import ssl
    import types

    from kmsfs.agent import server as server_module
    from kmsfs.agent.server import Server, TlsFiles, server_tls_context, tcp_listener
    from tests.integration.agent_helpers import TestCA, free_port

    ca = TestCA(tmp_path / "ca")
    agent_id, client_id = ca.issue("localhost", server=True), ca.issue("client")
    tls = server_tls_context(TlsFiles(agent_id.cert, agent_id.key, ca.path))
    port = free_port()
    listener = tcp_listener("127.0.0.1", port)
    policy = types.SimpleNamespace(client_name=lambda peer: None)
    server = Server(
        types.SimpleNamespace(policy=policy),  # type: ignore[arg-type]
        [listener],
        tls,
        frozenset({listener.fileno()}),
    )
    server.start()
    idle = []
    try:
        for _ in range(server_module.MAX_HANDSHAKES + 10):  # all from 127.0.0.2
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))
            sock.connect(("127.0.0.1", port))
            idle.append(sock)
        time.sleep(0.5)  # every one accepted and waiting in its handshake, or refused
        client_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_tls.load_verify_locations(cafile=ca.path)
        client_tls.load_cert_chain(client_id.cert, client_id.key)
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        with client_tls.wrap_socket(raw, server_hostname="localhost") as conn:
            assert conn.version() == "TLSv1.3"  # the handshake went through
    finally:
        for sock in idle:
            sock.close()
        server.stop()
