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
import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import stat
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
from kmsfs.agent import service as agent_service
from kmsfs.agent.audit import AuditLog, verify_log
from kmsfs.agent.client import AgentAddress, AgentClient, AgentDeriver
from kmsfs.agent.policy import Peer, Policy
from kmsfs.agent.refusals import RefusalCoalescer
from kmsfs.agent.service import Agent
from kmsfs.crypto.names import NAMES_KEY_INFO
from kmsfs.errors import (
    AgentRefusedError,
    ChainError,
    FormatError,
    IntegrityError,
    KmsfsError,
    NotFoundError,
    QuorumNotMetError,
    UsageError,
)
from kmsfs.model import contexts
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.canonical import b64encode
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.trust import Member, Signature, Trust
from kmsfs.model.verify import Anchor
from kmsfs.service import domains, operators, trusts
from kmsfs.service.context import Context, HsmSession, open_hsm, utc_now
from tests.integration.agent_helpers import AgentProcess, root_policy
from tests.integration.fault_helpers import tmpfs
from tests.kms_helpers import ADMIN, Admin, rogue_genesis_successor, tree_snapshot
from tests.unit.model_fixtures import ed25519_key, public_key

pytestmark = pytest.mark.timeout(300)

ALL = '["derive", "create-domain", "rewrap", "seal-trust", "seal-genesis-successor", "health"]'
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


STRANGER_CLIENT = """\
import base64, json, socket, struct, sys
answers = []
for payload in json.load(sys.stdin):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(sys.argv[1])
        try:
            sock.sendall(base64.b64decode(payload))
        except OSError:
            pass  # the agent hung up on a frame it did not read: its answer is still queued
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except OSError:
            pass
    if len(data) < 4:
        answers.append(None)
    else:
        (length,) = struct.unpack(">I", data[:4])
        answers.append(json.loads(data[4 : 4 + length]))
print(json.dumps(answers))
"""


def as_stranger(path: Path, payloads: list[bytes]) -> list[dict[str, Any] | None]:
    """Send each payload on a connection of its own from uid STRANGER, whom no policy here
    names (the kernel vouches for the uid); the agent's answer to each, None if it gave none."""
    result = subprocess.run(
        ["setpriv", f"--reuid={STRANGER}", f"--regid={STRANGER}", "--clear-groups",
         sys.executable, "-c", STRANGER_CLIENT, str(path)],
        input=json.dumps([b64encode(p) for p in payloads]),
        capture_output=True, text=True, timeout=240, check=True,
    )
    answers: list[dict[str, Any] | None] = json.loads(result.stdout)
    return answers


def header(length: int) -> bytes:
    """A frame's 4-byte length header alone."""
    return struct.pack(">I", length)


# -- the policy: one peer's Domain is not another's ------------------------------------------


def test_an_unlisted_peers_hello_is_answered_and_counted(kms: Kms, tmp_path: Path) -> None:
    """Review: `hello` from a peer the policy does not name was answered and left no record
    and no count, though every refusal is counted (threat-model.md §8). It is still answered
    (``client: null`` tells a misconfigured client why nothing else works), and recorded as
    the refusal it is, coalesced per identity like the others."""
    audit = tmp_path / "audit.log"
    with in_process_agent(kms.store, POLICY, audit) as agent:
        for _ in range(3):
            assert call(agent, peer(STRANGER), "hello", {}) == {
                "peer": peer(STRANGER).describe(), "client": None}
        assert call(agent, peer(MOUNT_A), "hello", {})["client"] == "mount-a"
        agent.flush_refusals(everything=True)
    mine = [e for e in events(audit) if e["who"] == peer(STRANGER).describe()]
    assert mine and {(e["op"], e["decision"]) for e in mine} <= {("hello", "refused"),
                                                                ("suppressed", "refused")}
    counted = sum(e["detail"]["suppressed"] if e["op"] == "suppressed" else 1 for e in mine)
    assert counted == 3, mine
    assert not [e for e in events(audit) if e["who"] == peer(MOUNT_A).describe()]


def test_a_handle_tells_no_client_which_domains_are_open(kms: Kms, tmp_path: Path) -> None:
    """Review: handles are public (sealed-Domain ids), and derive and domain-status looked one
    up before the policy: a client allowed only ``health`` told an open Domain ("refused ...
    may not derive for Domain payroll") from one not open ("not open", and no audit record),
    and so learnt which Domains were in use and which Domain a handle was. Now a peer that may
    not derive at all is refused whatever the handle, and one that may derive for other
    Domains gets the same answer for an open handle of a Domain not its own as for one not
    open; each such probe is recorded."""
    monitor = 4343
    policy = POLICY + f'[[client]]\nname = "monitor"\nuids = [{monitor}]\nallow = ["health"]\n'
    audit = tmp_path / "audit.log"
    with in_process_agent(kms.store, policy, audit) as agent:
        opened = call(agent, peer(MOUNT_A), "open-domain", {"bundle": kms.bundle("payroll")})
        closed = "ab" * 32
        answers: dict[tuple[int, str], list[str]] = {}
        for uid in (monitor, MOUNT_B):
            for op, extra in (("domain-status", {}), ("derive", {"infos": [b64encode(b"i")]})):
                for handle in (opened["handle"], closed):
                    with pytest.raises(KmsfsError) as caught:
                        call(agent, peer(uid), op, {"handle": handle, **extra})
                    said = f"{type(caught.value).__name__}: {caught.value}"
                    answers.setdefault((uid, op), []).append(said.replace(handle[:12], "H"))
        for (uid, op), (open_one, closed_one) in answers.items():
            assert open_one == closed_one, (uid, op, open_one, closed_one)
            assert "payroll" not in open_one
        assert answers[(monitor, "derive")][0].startswith("AgentRefusedError: client uid=4343")
        assert answers[(MOUNT_B, "derive")][0].startswith("NotFoundError: Domain handle H is")
    refused = [(e["who"], e["op"], e["domain"]) for e in events(audit)
               if e["decision"] == "refused"]
    assert refused.count((peer(MOUNT_B).describe(), "domain-status", "payroll")) == 1
    assert refused.count((peer(MOUNT_B).describe(), "derive", "payroll")) == 1
    assert sum(who == peer(monitor).describe() for who, _, _ in refused) == 4


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
        with pytest.raises(NotFoundError, match="is not open"):  # as if it were not open
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


def test_a_re_pinned_store_stops_derivation_through_handles_already_open(
    kms: Kms, tmp_path: Path
) -> None:
    """Everyone verifies, a long-running agent too: once the store's pin changes so that an
    open Domain's chain no longer holds (here: another successor of the genesis pinned, as an
    operator does to shut out a rival line), the next derive through the handle opened before
    is refused and audited, not served from the verification done at open-domain."""
    ctx = kms.ctx
    before = ctx.store.anchor()
    audit = tmp_path / "audit.log"
    try:
        with in_process_agent(kms.store, POLICY, audit) as agent:
            handle = call(agent, peer(MOUNT_A), "open-domain", {"bundle": kms.bundle("payroll")})[
                "handle"
            ]
            derive = {"handle": handle, "infos": [b64encode(b"file-id")]}
            call(agent, peer(MOUNT_A), "derive", derive)
            ctx.store.write_config(Anchor(before.root, "cd" * 32))
            with pytest.raises(ChainError):
                call(agent, peer(MOUNT_A), "derive", derive)
            ctx.store.write_config(before)
            call(agent, peer(MOUNT_A), "derive", derive)  # the pin as it was: served again
    finally:
        ctx.store.write_config(before)
    outcomes = [e["reason"].split(" ")[0] for e in events(audit) if e["op"] == "derive"]
    assert outcomes[-3:] == ["ok", "failed:", "ok"], outcomes


def test_a_retirement_made_without_the_agent_reaches_handles_already_open(
    fresh: Admin, tmp_path: Path
) -> None:
    """kmsfs-admin domain retire run on the agent's store itself (not through --agent, as
    operators.md §6 shows it): a handle opened before it, which any client allowed the Domain
    may use (it is the Domain's public id), stops serving the retired epoch's file keys at
    once, not when the agent restarts; names (epoch 1) are still served (found by review)."""
    fresh.create_operators("carol")
    trust = fresh.sealed_trust(["hsm1"], ["alice", "bob", "carol"], 1, signers=["alice"])
    fresh("domain", "create", "ledger", "--trust", trust)
    fresh("domain", "rotate", "ledger")
    ctx = Context.at(fresh.store)
    bundle = b64encode(domains.export_bundle(ctx, "ledger").to_bytes())
    file_key = b64encode(b"kmsfs/v1/file-key\x00" + bytes(16))
    with in_process_agent(fresh.store, ROOT_ALL) as agent:
        handle = call(agent, peer(0), "open-domain", {"bundle": bundle})["handle"]
        old = {"handle": handle, "infos": [file_key], "epoch": 1}
        call(agent, peer(0), "derive", old)
        fresh("domain", "retire", "ledger", "--below", "2", "--yes")
        with pytest.raises(IntegrityError, match="key epoch 1 of Domain ledger is retired"):
            call(agent, peer(0), "derive", old)
        names = {"handle": handle, "infos": [b64encode(NAMES_KEY_INFO)], "epoch": 1}
        assert len(call(agent, peer(0), "derive", names)["keys"]) == 1
        call(agent, peer(0), "derive", {**old, "epoch": 2})
        # A document that does not parse lands in domains/ (a sync under way): the handles
        # keep serving as they were, the retirement kept, and the agent says so once.
        (fresh.store / "domains" / f"{'ab' * 32}.json").write_text("{")
        for _ in range(3):
            call(agent, peer(0), "derive", {**old, "epoch": 2})
            with pytest.raises(IntegrityError, match="is retired"):
                call(agent, peer(0), "derive", old)


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
        agent.refusals.window = 0.0  # each refusal its own record (else they are coalesced)
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


def test_unlisted_peers_long_frame_is_refused_unread(
    kms: Kms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2 MiB frame of [{},{},...] from a peer the policy does not name was parsed whole
    (~0.5 s of CPU with the GIL held, ~50 MiB) before it was refused: 16 such peers in a loop
    slowed a listed mount's derive from 0.3 ms to 690 ms. Now a frame of such a peer over
    MAX_STRANGER_FRAME is refused from its header: the answer comes before the body is sent at
    all, and the audit record says the frame was not read. A short one is still read, so its
    refusal names the operation asked for."""
    monkeypatch.setattr(agent_server, "BODY_TIMEOUT", 2.0)  # a body that never comes
    audit = tmp_path / "audit.log"
    flood = b'{"args":{"a":[' + b",".join([b"{}"] * 600_000) + b']},"id":1,"op":"derive","v":1}'
    assert len(flood) > 1 << 20
    health = protocol.frame({"v": 1, "id": 7, "op": "health", "args": {}})
    with short_dir() as d, in_process_agent(kms.store, POLICY, audit) as agent, \
            serving(agent, d) as path:
        agent.refusals.window = 0.0  # every refusal its own record here, to see each
        unread, flooded, short = as_stranger(
            path, [header(len(flood)), header(len(flood)) + flood, health]
        )
    for answer in (unread, flooded):
        assert answer is not None, "no answer: the agent waited for a body it must not read"
        assert (answer["id"], answer["error"]["code"]) == (0, "refused"), answer
        assert f"its frame of {len(flood)} bytes was not read" in answer["error"]["message"]
    assert short is not None and (short["id"], short["error"]["code"]) == (7, "refused")
    mine = [e for e in events(audit) if e["who"] == peer(STRANGER).describe()]
    assert [(e["op"], "was not read" in e["reason"]) for e in mine] == [
        ("unknown", True), ("unknown", True), ("health", False)
    ]


class Clock:
    """A clock a test moves by hand (for the refusal coalescer's window)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_unlisted_peers_refusals_are_coalesced_yet_all_counted(kms: Kms, tmp_path: Path) -> None:
    """One unlisted uid wrote 6,555 audit records in 5 s (~30 GB a day); once the disk is full,
    every listed mount's derive fails (keys that cannot be recorded are not sent). Now such a
    peer gets one record per window, whatever it sends (a request, garbage, an unread long
    frame); the next record, or one written when the agent stops, carries the count of those
    it stood for. Listed peers are still recorded request by request."""
    audit = tmp_path / "audit.log"
    clock = Clock()
    first = (
        [protocol.frame({"v": 1, "id": i, "op": "derive", "args": {}}) for i in range(1, 26)]
        + [header(8) + b"not json"] * 5
        + [header(100_000)] * 5
    )
    with short_dir() as d, in_process_agent(kms.store, ROOT_ALL, audit) as agent, \
            serving(agent, d) as path:
        agent.refusals = RefusalCoalescer(clock=clock)
        answers = as_stranger(path, first)
        for _ in range(3):
            call(agent, peer(0), "health", {})
        during = events(audit)
        clock.now += agent.refusals.window  # the window has passed
        answers += as_stranger(path, first[:3])
        later = events(audit)
    after = events(audit)  # the agent stopped: the count still owed is written
    codes = [a["error"]["code"] if a else None for a in answers]
    assert codes == ["refused"] * 25 + ["format"] * 5 + ["refused"] * 5 + ["refused"] * 3
    who = peer(STRANGER).describe()
    assert [e["op"] for e in during if e["who"] == who] == ["derive"]
    assert len([e for e in during if e["who"] == peer(0).describe()]) == 3
    mine = [e for e in after if e["who"] == who]
    assert [(e["op"], e.get("detail")) for e in mine] == [
        ("derive", None),
        ("derive", {"suppressed": 34}),  # the 35 of the first window but the first
        ("suppressed", {"suppressed": 2}),  # the 2 after it, written when the agent stopped
    ]
    assert len(mine) - 1 + sum(e["detail"]["suppressed"] for e in mine[1:]) == len(answers)
    assert len([e for e in later if e["who"] == who]) == 2
    assert all(e["decision"] == "refused" for e in mine)
    assert verify_log(audit, {}).ok


def test_a_refusal_that_cannot_be_recorded_is_still_a_refusal(kms: Kms, tmp_path: Path) -> None:
    """With the audit log's disk full, an unlisted peer's refusal escaped as OSError ("internal
    error in the agent"), and so did a listed peer's malformed request: both stay what they
    are, and the log stays whole."""
    with tmpfs(tmp_path / "small", "256k") as small:
        log_path = small / "audit.log"
        audit = AuditLog(log_path, None)
        with open(small / "filler", "wb", buffering=0) as filler:
            for size in (4096, 1):
                with contextlib.suppress(OSError):
                    while filler.write(b"x" * size):
                        pass
        with pytest.raises(OSError) as full:  # the disk is full for the log too
            audit.append(who="test", op="health", domain=None, allowed=False, reason="probe")
        assert full.value.errno == errno.ENOSPC
        agent = Agent(kms.store, Policy.parse(POLICY, "test-policy"), audit.append)
        try:
            with pytest.raises(AgentRefusedError, match="not in the agent's policy"):
                call(agent, peer(STRANGER), "derive", {"handle": "ab" * 32, "infos": []})
            with pytest.raises(FormatError):
                call(agent, peer(MOUNT_A), "derive", {"handle": "not hex", "infos": []})
            agent.record_malformed(peer(MOUNT_A), FormatError("not JSON"))
        finally:
            agent.close()
            audit.close()
        assert verify_log(log_path, {}).ok and log_path.stat().st_size == 0


def test_a_client_thread_that_cannot_start_costs_one_connection_not_the_listener(
    kms: Kms, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Thread.start() raising RuntimeError("can't start new thread") ended the accept loop for
    good: every later client waited in the backlog forever. Now that one connection is closed
    and logged, and the next one is served."""
    real_start = threading.Thread.start
    failures = [1]

    def start(self: threading.Thread) -> None:
        if self.name == "client" and failures[0]:
            failures[0] -= 1
            raise RuntimeError("can't start new thread")
        real_start(self)

    caplog.set_level(logging.ERROR, logger="kmsfs.agent")
    with short_dir() as d, in_process_agent(kms.store, ROOT_ALL) as agent, \
            serving(agent, d) as path:
        monkeypatch.setattr(threading.Thread, "start", start)
        with socket.socket(socket.AF_UNIX) as unlucky:
            unlucky.settimeout(20)
            unlucky.connect(str(path))
            assert unlucky.recv(1) == b""  # closed, not left open without a thread
        assert failures == [0]
        with socket.socket(socket.AF_UNIX) as next_one:
            next_one.settimeout(20)
            next_one.connect(str(path))
            raw_request(next_one, {"v": 1, "id": 3, "op": "hello", "args": {}})
            answer = read_frame(next_one)
    assert answer is not None and answer["ok"] is True
    assert "cannot serve a connection (can't start new thread)" in caplog.text


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
    # `trust sign` refuses a proposal the pin has made dead: dave's approval made directly.
    pin = Path(kms.admin.pin_file("dave")).read_text().rstrip("\n")
    value = operators.sign_as(
        ctx, dave, pin, contexts.OPERATOR_APPROVES_TRUST, rival.signed_bytes()
    )
    ctx.store.save_signature("approval", Signature(rival.id, dave.key.key_id, value))
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


def _at_once(agent: Agent, op: str, requests: list[dict[str, Any]]) -> list[object]:
    """Send each request of ``op`` from its own thread, all released together; return each
    one's answer, or the KmsfsError it raised, in order."""
    barrier = threading.Barrier(len(requests))
    outcome: list[object] = [None] * len(requests)

    def send(i: int) -> None:
        barrier.wait()
        try:
            outcome[i] = call(agent, peer(0), op, requests[i])
        except KmsfsError as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), outcome
    return outcome


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
    with in_process_agent(fresh.store, ROOT_ALL) as agent:
        answers = _at_once(agent, "seal-trust", [_seal_args(ctx, t, root) for t in (ta, tb)])
    outcome = dict(zip((ta, tb), answers, strict=True))
    sealed = [t for t, r in outcome.items() if isinstance(r, dict)]
    assert len(outcome) == 2 and len(sealed) == 1, outcome
    assert [t for t in (ta, tb) if (fresh.store / "seals" / t).exists()] == sealed


def test_concurrent_create_domain_of_one_name_makes_one_domain(
    kms: Kms, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(domains, "open_hsm", slow_serialized(domains.open_hsm))
    # t2, the newest Trust: nothing new is made under t1, which t2 supersedes.
    args = {"name": "race", "trust": kms.t2, "chain": kms.chain(kms.t2)}
    with in_process_agent(kms.store, ROOT_ALL) as agent:
        outcome = _at_once(agent, "create-domain", [dict(args), dict(args)])
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


def _stranger_successor(ctx: Context, name: str) -> tuple[Trust, Signature]:
    """A successor of the genesis by one operator the store has never seen, approved by them:
    what anyone allowed seal-trust can send (quorum 1 of its own; the genesis has none)."""
    anchor = ctx.store.anchor()
    genesis = ctx.store.trust(anchor.root)
    key = ed25519_key("rival successor", name)
    member = Member(name, public_key(key))
    trust = Trust(2, anchor.root, genesis.hsms, (member,), 1, utc_now())
    message = contexts.message(contexts.OPERATOR_APPROVES_TRUST, trust.signed_bytes())
    return trust, Signature(trust.id, member.key.key_id, key.sign(message))


def _stranger_seal_args(ctx: Context, trust: Trust, approval: Signature) -> dict[str, Any]:
    root = ctx.store.anchor().root
    return {
        "trust": trust.payload(),
        "approvals": [approval.to_dict("approval")],
        "chain": [link.to_dict() for link in trusts.verified_chain(ctx, root)],
    }


def test_seal_trust_alone_cannot_make_a_client_the_only_operator_of_a_new_line(
    tmp_path: Path,
) -> None:
    """Review: on an agent whose store had no successor of the genesis yet, a client allowed
    only ``seal-trust``, with no PIN and no operator of the store, had the agent seal and pin
    a first Trust whose only operator was a key it had just made (quorum 1): the genesis has no
    operators, so no other quorum stood behind it, and the honest ceremony was then refused as
    a rival. Sealing the genesis's successor is now its own action, granted for the ceremony;
    ``seal-trust`` still seals any later Trust."""
    admin = Admin.under(tmp_path)
    admin("init", "--hsms", "2")
    ctx = Context.at(admin.store)
    genesis = trusts.verified_chain(ctx, ctx.store.anchor().root)[0]
    rogue, approval = rogue_genesis_successor(genesis, "mallory")
    args = {"trust": rogue.payload(), "approvals": [approval.to_dict("approval")],
            "chain": [genesis.to_dict()]}
    sealer = '[[client]]\nname = "operators"\nuids = [0]\nallow = ["seal-trust"]\n'
    before = tree_snapshot(admin.store)
    audit = tmp_path / "audit.log"
    with in_process_agent(admin.store, sealer, audit) as agent, pytest.raises(
        AgentRefusedError, match=r"client uid=0\(root\) may not seal-genesis-successor"
    ):
        call(agent, peer(0), "seal-trust", args)
    assert tree_snapshot(admin.store) == before  # no Trust, approval, seal or pin
    assert Context.at(admin.store).store.anchor().successor is None
    refused = events(audit)[-1]
    assert (refused["op"], refused["decision"]) == ("seal-genesis-successor", "refused"), refused
    # The ceremony's grant: the operators' T1 is sealed and pinned through the agent, and from
    # then on seal-trust alone seals its successors.
    admin.create_operators("alice", "bob")
    t1 = admin.propose(["hsm1", "hsm2"], ["alice", "bob"], 2, predecessor=genesis.id)
    admin.sign(t1, "alice", "bob")
    ceremony = sealer.replace('"seal-trust"]', '"seal-trust", "seal-genesis-successor"]')
    with in_process_agent(admin.store, ceremony) as agent:
        call(agent, peer(0), "seal-trust", _seal_args(ctx, t1, genesis.id))
    assert Context.at(admin.store).store.anchor().successor == t1
    t2 = admin.propose(["hsm1"], ["alice", "bob"], 2, predecessor=t1)
    admin.sign(t2, "alice", "bob")
    with in_process_agent(admin.store, sealer) as agent:
        call(agent, peer(0), "seal-trust", _seal_args(ctx, t2, t1))
    assert trusts.successor(Context.at(admin.store), t1).id == t2


def test_a_rival_successor_of_the_pinned_genesis_leaves_nothing_in_the_store(kms: Kms) -> None:
    """The Trust and its approval were saved before trusts.seal refused the rival: they stayed
    in the agent's store. Now the genesis pin is checked before anything is written."""
    ctx = kms.ctx
    rival, approval = _stranger_successor(ctx, "mallory")
    with in_process_agent(kms.store, ROOT_ALL) as agent, \
            pytest.raises(KmsfsError, match="already has its successor"):
        call(agent, peer(0), "seal-trust", _stranger_seal_args(ctx, rival, approval))
    assert rival.id not in ctx.store.trust_ids()
    assert ctx.store.signatures("approval", rival.id) == []


def test_concurrent_rival_genesis_successors_leave_only_the_sealed_one(
    fresh: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two successors of an unpinned genesis sealed at once: both passed a check made before
    the lock, both were saved, one was sealed and pinned, the other refused but kept. The
    check, the writes and the seal now hold the store's lock together."""
    ctx = Context.at(fresh.store)
    rivals = [_stranger_successor(ctx, name) for name in ("mallory", "trudy")]
    monkeypatch.setattr(trusts, "open_hsm", slow_serialized(trusts.open_hsm))
    with in_process_agent(fresh.store, ROOT_ALL) as agent:
        answers = _at_once(
            agent, "seal-trust", [_stranger_seal_args(ctx, t, a) for t, a in rivals]
        )
    outcome = dict(zip((t.id for t, _ in rivals), answers, strict=True))
    sealed = [t for t, r in outcome.items() if isinstance(r, dict)]
    assert len(outcome) == 2 and len(sealed) == 1, outcome
    assert ctx.store.anchor().successor == sealed[0]
    assert {t.id for t, _ in rivals} & set(ctx.store.trust_ids()) == set(sealed)
    assert [t.id for t, _ in rivals if ctx.store.signatures("approval", t.id)] == sealed


# -- rotate and rewrap: a client's generation is kept only if the history takes it ----------


@dataclass
class Revoked:
    """payroll under t1 (hsm1, hsm2), then rewrapped to t2 (hsm1 only): hsm2 is revoked."""

    admin: Admin
    t1: str
    t2: str

    @property
    def ctx(self) -> Context:
        return Context.at(self.admin.store)


@pytest.fixture
def revoked(tmp_path: Path) -> Revoked:
    admin = Admin.under(tmp_path)
    admin("init", "--hsms", "2")
    admin.create_operators("alice", "bob")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 2)
    admin("domain", "create", "payroll", "--trust", t1)
    t2 = admin.sealed_trust(["hsm1"], ["alice", "bob"], 2, predecessor=t1)
    admin("domain", "rewrap", "payroll", "--trust", t2)
    return Revoked(admin, t1, t2)


def _rival_generation(world: Revoked) -> DomainBundle:
    """What hsm2's PIN holder can still make after the rewrap: a generation 2 of payroll under
    t1, validly sealed by hsm2, beside the operators' generation 2 under t2."""
    ctx = world.ctx
    first = domains.history(ctx, "payroll")[0].sealed
    rival = dataclasses.replace(first.domain, generation=2, previous=first.id, created=utc_now())
    hsm2 = next(h for h in ctx.store.trust(world.t1).hsms if h.label == "hsm2")
    with open_hsm(ctx, [hsm2]) as hsm:
        sealed = domains._seal(hsm, rival)
    return DomainBundle(sealed, tuple(trusts.verified_chain(ctx, world.t1)))


@pytest.mark.parametrize("op", ["rotate", "rewrap"])
def test_a_rival_generation_sent_to_rotate_or_rewrap_is_refused_and_not_written(
    revoked: Revoked, op: str
) -> None:
    """rotate and rewrap saved the client's generation once its seal verified, before checking
    it against the store's history: a rival was written, and from then on every open-domain of
    the Domain failed closed ("rival generations"), for every mount."""
    ctx = revoked.ctx
    bundle = _rival_generation(revoked)
    domains.verify_bundle(ctx, bundle)  # on its own, it verifies: only the history refuses it
    legit = b64encode(domains.export_bundle(ctx, "payroll").to_bytes())
    before = set(ctx.store.domain_ids())
    args: dict[str, Any] = {"bundle": b64encode(bundle.to_bytes())}
    if op == "rewrap":
        chain = trusts.verified_chain(ctx, revoked.t2)
        args.update(trust=revoked.t2, chain=[link.to_dict() for link in chain])
    with in_process_agent(revoked.admin.store, root_policy()) as agent:
        with pytest.raises(ChainError, match="does not follow generation 2"):
            call(agent, peer(0), op, args)
        assert set(ctx.store.domain_ids()) == before
        assert [g.sealed.domain.trust for g in domains.history(ctx, "payroll")] == [
            revoked.t1, revoked.t2
        ]
        opened = call(agent, peer(0), "open-domain", {"bundle": legit})
        assert (opened["generation"], opened["trust_id"]) == (2, revoked.t2)


def test_an_open_racing_a_rewrap_does_not_keep_the_superseded_generation_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: open-domain verified the newest generation without the lock and kept it open
    later, so a rewrap that closed the Domain's generations in between was undone: the old
    generation stayed open and derived through the HSM the rewrap removed, and, the epoch
    unchanged, its mount was never told to move. The open now verifies again."""
    admin = Admin.under(tmp_path)
    admin("init", "--hsms", "2")
    admin.create_operators("alice", "bob")
    t1 = admin.sealed_trust(["hsm1", "hsm2"], ["alice", "bob"], 2)
    admin("domain", "create", "payroll", "--trust", t1)
    t2 = admin.sealed_trust(["hsm1"], ["alice", "bob"], 2, predecessor=t1)  # hsm2 removed
    ctx = Context.at(admin.store)
    old = b64encode(domains.export_bundle(ctx, "payroll").to_bytes())
    verified, go_on = threading.Event(), threading.Event()
    real = domains.newest_verified

    def paused(*args: Any, **kwargs: Any) -> Any:
        found = real(*args, **kwargs)
        if threading.current_thread().name == "opener" and not verified.is_set():
            verified.set()  # the window between the check and keeping it open
            assert go_on.wait(60)
        return found

    monkeypatch.setattr(domains, "newest_verified", paused)
    answers: dict[str, Any] = {}
    with in_process_agent(admin.store, root_policy()) as agent:
        opener = threading.Thread(name="opener", target=lambda: answers.update(
            call(agent, peer(0), "open-domain", {"bundle": old})))
        opener.start()
        assert verified.wait(60)
        chain = [link.to_dict() for link in trusts.verified_chain(ctx, t2)]
        call(agent, peer(0), "rewrap", {"bundle": old, "trust": t2, "chain": chain})
        go_on.set()
        opener.join(60)
        assert (answers["generation"], answers["trust_id"]) == (2, t2), answers
        assert [e.verified.sealed.domain.generation for e in agent._open.values()] == [2]
        first = domains.history(ctx, "payroll")[0].sealed.id
        with pytest.raises(NotFoundError, match="is not open"):
            call(agent, peer(0), "derive", {"handle": first, "infos": [b64encode(b"x" * 16)]})


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


def test_health_asked_in_a_loop_checks_the_hsms_once_in_a_while(
    kms: Kms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client allowed ``health`` asking in a loop: the agent checks its HSMs (open, log in,
    sign with each) at most once per HEALTH_REUSE_SECONDS and gives that answer again
    meanwhile, so monitoring cannot keep the HSMs from derivations; every request is still
    audited."""
    checks: list[float] = []
    real_health = agent_service.hsms.health

    def counted(ctx: Context) -> list[dict[str, object]]:
        checks.append(time.monotonic())
        return real_health(ctx)

    monkeypatch.setattr(agent_service.hsms, "health", counted)
    monkeypatch.setattr(agent_service, "HEALTH_REUSE_SECONDS", 0.5)
    audit = tmp_path / "audit.log"
    with in_process_agent(kms.store, ROOT_ALL, audit) as agent:
        answers = [call(agent, peer(0), "health", {}) for _ in range(10)]
        assert len(checks) == 1 and all(a == answers[0] for a in answers)
        time.sleep(0.6)
        call(agent, peer(0), "health", {})
        assert len(checks) == 2
    assert [e["op"] for e in events(audit)].count("health") == 11


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


@pytest.mark.parametrize("key", ["name", "trust_id", "superseded_by"])
def test_mount_prints_no_agent_controlled_text_in_the_superseded_warning(
    kms: Kms, key: str
) -> None:
    """The warning a mount prints quotes the name and ids the agent sent (the name also in
    the error for a Domain other than the volume's): anything else (escape sequences for
    the client's terminal, say) is refused, not printed."""
    from kmsfs.fs import kms as fskms

    ids = {"trust_id": "ab" * 32, "superseded_by": "cd" * 32}

    def respond(op: str, args: dict[str, Any]) -> dict[str, Any]:
        return {"handle": "ab" * 32, "name": "payroll", **ids, key: "\x1b]0;pwned\x07"}

    bundle = domains.export_bundle(kms.ctx, "payroll").to_bytes()
    with fake_agent(respond) as agent, pytest.raises(FormatError, match=key):
        fskms.describe_via_agent(bundle, fskms.AgentOptions(str(agent.path)))
    with fake_agent(lambda op, args: {"handle": "ab" * 32, "name": "payroll", **ids}) as agent:
        desc = fskms.describe_via_agent(bundle, fskms.AgentOptions(str(agent.path)))
    assert fskms.superseded_warning(desc).startswith(
        f"Domain payroll is governed by trust {'ab' * 6}, which trust {'cd' * 6} supersedes"
    )


def test_an_agents_error_message_reaches_the_client_with_control_characters_escaped(
    kms: Kms,
) -> None:
    def respond(op: str, args: dict[str, Any]) -> dict[str, Any]:
        raise AgentRefusedError("no\x1b]0;pwned\x07 way\nforged line")

    with fake_agent(respond) as agent, agent.client() as client, \
            pytest.raises(AgentRefusedError) as refused:
        client.call("health", {})
    assert str(refused.value) == "agent: no\\x1b]0;pwned\\x07 way\\nforged line"

    def long(op: str, args: dict[str, Any]) -> dict[str, Any]:
        raise AgentRefusedError("x" * 5000)

    with fake_agent(long) as agent, agent.client() as client, \
            pytest.raises(AgentRefusedError) as refused:
        client.call("health", {})
    assert str(refused.value).endswith("x... (5000 characters)")  # cut once, by the agent


def test_the_agent_knows_systemds_socket_under_another_spelling_of_its_directory(
    tmp_path: Path,
) -> None:
    """/var/run is /run on Debian: ``--socket /var/run/kmsfs/hsmd.sock`` names the socket
    systemd listens on at /run/kmsfs/hsmd.sock, which the agent took for another agent's."""
    from kmsfs.agent.cli import _passed_by_systemd

    with short_dir() as d:
        (d / "real").mkdir()
        (d / "link").symlink_to(d / "real")
        with socket.socket(socket.AF_UNIX) as systemds:
            systemds.bind(str(d / "real" / "s.sock"))
            systemds.listen(1)
            assert _passed_by_systemd(d / "link" / "s.sock", [systemds])
            assert _passed_by_systemd(d / "real" / "s.sock", [systemds])
            assert not _passed_by_systemd(d / "real" / "other.sock", [systemds])


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


def test_admin_create_domain_through_an_agent_never_adds_a_rival_of_a_local_domain(
    kms: Kms, tmp_path: Path
) -> None:
    """The agent's store may lack a Domain name this store has; a valid generation 1 of that
    name saved here would make this store refuse the Domain everywhere (rival generations)."""
    elsewhere = tmp_path / "agent-store"
    shutil.copytree(kms.store, elsewhere, symlinks=True)
    ctx = Context.at(elsewhere)
    for domain_id in ctx.store.domain_ids():
        if ctx.store.domain(domain_id).domain.name == "payroll":
            (elsewhere / "domains" / f"{domain_id}.json").unlink()
    Admin(elsewhere, kms.admin.pins)("domain", "create", "payroll", "--trust", kms.t2)
    rival = domains.current(ctx, "payroll")
    answer = {"domain": rival.sealed.to_dict(),
              "bundle": b64encode(domains.DomainBundle(rival.sealed, rival.chain).to_bytes())}
    before = sorted(kms.ctx.store.domain_ids())
    with fake_agent(lambda op, args: answer) as agent, agent.client() as client, \
            pytest.raises(KmsfsError, match="exists already"):
        remote.create_domain(client, kms.ctx, "payroll", kms.t2)
    assert sorted(kms.ctx.store.domain_ids()) == before
    assert domains.current(kms.ctx, "payroll").sealed.id != rival.sealed.id


def test_admin_through_an_agent_makes_nothing_under_a_trust_superseded_here(kms: Kms) -> None:
    """This store knows t2 supersedes t1; the agent's may not yet (it learns Trusts from the
    chains clients send). The rule must hold before the agent is asked at all."""
    asked: list[str] = []

    def respond(op: str, args: dict[str, Any]) -> dict[str, Any]:
        asked.append(op)
        return {}

    with fake_agent(respond) as agent, agent.client() as client:
        with pytest.raises(UsageError, match=f"superseded by trust {kms.t2[:12]}"):
            remote.create_domain(client, kms.ctx, "newcomer", kms.t1)
        with pytest.raises(UsageError, match="rewrap it first"):
            remote.rotate(client, kms.ctx, "other")
        with pytest.raises(UsageError, match=f"superseded by trust {kms.t2[:12]}"):
            remote.rewrap(client, kms.ctx, "other", kms.t1)
    assert asked == []


# -- the socket path: one listener, even for agents started at once -----------------------------


def test_listener_refuses_a_path_another_socket_listens_on() -> None:
    """unix_listener itself refuses (not only kmsfs-hsmd's early check): the file is left."""
    with short_dir() as d, agent_server.unix_listener(d / "hsmd.sock") as first:
        inode = (d / "hsmd.sock").lstat().st_ino
        with pytest.raises(UsageError, match=r"another process is listening on .*hsmd\.sock"):
            agent_server.unix_listener(d / "hsmd.sock")
        assert (d / "hsmd.sock").lstat().st_ino == inode
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(d / "hsmd.sock"))
            first.accept()[0].close()


def test_the_socket_is_made_with_its_mode_never_chmodded_by_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A chmod by path after the bind follows whatever is at the path by then: a user who could
    write the directory swapped in a symlink and had root make any file (/etc/shadow, a PIN
    file) mode 0666. The socket gets its mode from bind itself, and the umask is put back."""
    chmods: list[object] = []
    with short_dir() as d:
        monkeypatch.setattr(os, "chmod", lambda *a, **k: chmods.append(a))
        before = os.umask(0o022)
        try:
            with agent_server.unix_listener(d / "hsmd.sock", 0o660):
                assert stat.S_IMODE((d / "hsmd.sock").lstat().st_mode) == 0o660
            assert os.umask(0o022) == 0o022
        finally:
            os.umask(before)
            monkeypatch.undo()
    assert chmods == []


@pytest.mark.parametrize(("mode", "refused"), [(0o777, True), (0o770, True), (0o1777, False)])
def test_a_socket_directory_others_may_write_is_refused(mode: int, refused: bool) -> None:
    """Where another user can replace files (writable by them, not sticky), clients could be
    handed that user's socket, and take its answers for keys."""
    with short_dir() as d:
        (d / "run").mkdir()
        (d / "run").chmod(mode)
        if refused:
            with pytest.raises(UsageError, match=f"{d}/run: other users may replace files"):
                agent_server.unix_listener(d / "run" / "hsmd.sock")
            assert os.listdir(d / "run") == []
        else:
            agent_server.unix_listener(d / "run" / "hsmd.sock").close()


@pytest.mark.parametrize(
    "way", ["a parent of another user", "a symlink others may repoint", "a sticky link of theirs"]
)
def test_a_socket_directory_others_may_replace_on_the_way_is_refused(way: str) -> None:
    """The directory private, but the way to it is not: the owner of a directory on it, anyone
    who may write where a symlink on it lives, or the owner of such a link in a sticky
    directory (/tmp, which may remove its own link and put another) can put their own
    directory, socket and all, at the path clients connect to."""
    with short_dir() as d:
        private = d / "private"
        private.mkdir(mode=0o700)
        if way == "a parent of another user":
            os.chown(d, 1234, 1234)
            given, named, why = private, d, "owned by uid 1234"
        elif way == "a symlink others may repoint":
            shared = d / "shared"
            shared.mkdir()
            shared.chmod(0o777)
            (shared / "run").symlink_to(private)
            given, named, why = shared / "run", shared, "mode 0777"
        else:
            sticky = d / "sticky"
            sticky.mkdir()
            sticky.chmod(0o1777)
            (sticky / "run").symlink_to(private)
            os.lchown(sticky / "run", 1234, 1234)
            given, named, why = sticky / "run", sticky / "run", "a symbolic link owned by uid 1234"
        with pytest.raises(UsageError) as refused:
            agent_server.unix_listener(given / "hsmd.sock")
        assert f"replace {named}, on the way to it ({why})" in str(refused.value)
        assert str(refused.value).startswith(f"{given}: other users may replace")
        assert os.listdir(private) == []


def _contend(
    path: Path, barrier: threading.Barrier, won: list[socket.socket], refused: list[str]
) -> None:
    barrier.wait()
    try:
        won.append(agent_server.unix_listener(path))
    except UsageError as exc:
        refused.append(str(exc))


def test_agents_started_at_once_on_a_stale_socket_get_one_listener() -> None:
    """Each round: a stale socket file and six threads binding it at the same moment. Exactly
    one may win, and the file must be its socket; without the lock a second one finds the
    winner's socket bound but not yet listening, calls it stale and takes the path."""
    for _ in range(30):
        with short_dir() as d:
            path = d / "hsmd.sock"
            with socket.socket(socket.AF_UNIX) as stale:
                stale.bind(str(path))
            barrier = threading.Barrier(6)
            won: list[socket.socket] = []
            refused: list[str] = []
            threads = [
                threading.Thread(target=_contend, args=(path, barrier, won, refused))
                for _ in range(6)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
            try:
                assert len(won) == 1 and len(refused) == 5, refused
                assert all("another process is listening on" in text for text in refused)
                with socket.socket(socket.AF_UNIX) as client:
                    client.connect(str(path))
                    won[0].settimeout(5)
                    won[0].accept()[0].close()
            finally:
                for sock in won:
                    sock.close()


# -- listed peers, reloads and the process log: what a peer costs the agent ------------------

ROOT_HEALTH = '[[client]]\nname = "root-health"\nuids = [0]\nallow = ["health"]\n'


def _round_trip(sock: socket.socket, body: bytes) -> dict[str, Any] | None:
    sock.sendall(header(len(body)) + body)
    return read_frame(sock)


def test_a_listed_peers_refused_and_malformed_requests_are_coalesced_yet_all_counted(
    kms: Kms, tmp_path: Path
) -> None:
    """A client listed for 'health' alone wrote 22,600 audit records (6 MB) of malformed
    frames in 5 s: only unlisted peers were coalesced, and a full disk stops every listed
    mount's derive. Now a listed identity's refused and malformed requests get LISTED_BURST
    records a window, the rest counted (as an unlisted peer's are); its allowed requests are
    still recorded one by one."""
    from kmsfs.agent.refusals import LISTED_BURST

    audit = tmp_path / "audit.log"
    refused = json.dumps({"v": 1, "id": 9, "op": "create-domain",
                          "args": {"name": "x", "trust": kms.t1, "chain": []}}).encode()
    health = json.dumps({"v": 1, "id": 3, "op": "health", "args": {}}).encode()
    with short_dir() as d, in_process_agent(kms.store, ROOT_HEALTH, audit) as agent, \
            serving(agent, d) as path, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        answers = [_round_trip(sock, b"x") for _ in range(40)]
        answers += [_round_trip(sock, refused) for _ in range(20)]
        healthy = [_round_trip(sock, health) for _ in range(3)]
        during = events(audit)
    after = events(audit)  # the agent stopped: the counts still owed are written
    assert [a["error"]["code"] if a else None for a in answers] == ["format"] * 40 + [
        "refused"
    ] * 20
    assert all(h is not None and h["ok"] for h in healthy)
    who = peer(0).describe()
    mine = [e for e in during if e["who"] == who and e["decision"] == "refused"]
    assert len(mine) == LISTED_BURST
    assert [e["decision"] for e in during if e["who"] == who][-3:] == ["allowed"] * 3
    mine = [e for e in after if e["who"] == who and e["decision"] == "refused"]
    counted = sum(e.get("detail", {}).get("suppressed", 0) for e in mine)
    assert len([e for e in mine if e["op"] != "suppressed"]) + counted == len(answers)
    assert mine[-1]["op"] == "suppressed" and "create-domain" in mine[-1]["reason"]
    assert verify_log(audit, {}).ok


def test_a_policy_refusal_of_a_listed_peer_keeps_its_domain_and_detail(
    kms: Kms, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.log"
    with in_process_agent(kms.store, ROOT_HEALTH, audit) as agent, \
            pytest.raises(AgentRefusedError, match=r"may not derive for Domain payroll"):
        call(agent, peer(0), "open-domain", {"bundle": kms.bundle("payroll")})
    (record,) = events(audit)
    assert (record["op"], record["domain"], record["decision"]) == (
        "derive", "payroll", "refused"
    )
    assert set(record["detail"]) == {"open"}


def test_a_listed_peer_may_send_only_frames_as_long_as_its_policy_needs(
    kms: Kms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client listed for 'health' alone could send 2 MiB frames, each parsed (0.64 s of CPU
    holding the GIL): 8 of them in a loop took a listed mount's derive from 0.75 ms to 202 ms.
    Now its frames are held to MAX_SMALL_FRAME, and a longer one is refused from its header,
    unread; a peer allowed to derive still sends long frames (a derive of 1024 infos)."""
    monkeypatch.setattr(agent_server, "BODY_TIMEOUT", 2.0)  # a body that never comes
    policy = Policy.parse(ROOT_HEALTH, "p")
    assert agent_server.frame_limit(policy, peer(0)) == agent_server.MAX_SMALL_FRAME
    assert agent_server.frame_limit(policy, peer(STRANGER)) is None
    for allow in ("derive", "create-domain", "rewrap", "rotate", "seal-trust"):
        wide = Policy.parse(ROOT_HEALTH + ROOT_HEALTH.replace('"health"', f'"{allow}"'), "p")
        assert agent_server.frame_limit(wide, peer(0)) == protocol.MAX_FRAME
    big = 100_000
    with short_dir() as d, in_process_agent(kms.store, ROOT_HEALTH) as agent, \
            serving(agent, d) as path, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(header(big))  # the header alone: the answer must not wait for a body
        answer = read_frame(sock)
        assert sock.recv(1) == b""  # and the connection is closed: it cannot be resynced
    assert answer is not None, "no answer: the agent waited for a body it must not read"
    assert (answer["id"], answer["error"]["code"]) == (0, "refused")
    # what it may do, not frame sizes: an admin read "frames of at most 4096 bytes" and looked
    # there, where a derive was what the policy did not allow (found by review)
    assert answer["error"]["message"].startswith(
        f"client {peer(0).describe()} may only health (policy test-policy), whose requests "
        f"are at most {agent_server.MAX_SMALL_FRAME} bytes: its request of {big} bytes "
        "was not read"), answer["error"]["message"]
    derive = ROOT_HEALTH.replace('allow = ["health"]', 'domains = ["payroll"]\nallow = ["derive"]')
    request = protocol.frame({"v": 1, "id": 4, "op": "derive", "args": {
        "handle": "ab" * 32, "infos": [b64encode(b"i" * protocol.MAX_INFO)] * protocol.MAX_BATCH,
    }})
    assert len(request) > 256 * 1024
    with short_dir() as d, in_process_agent(kms.store, derive) as agent, \
            serving(agent, d) as path, socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(request)
        answer = read_frame(sock)
    assert answer is not None and answer["id"] == 4  # read and parsed: its handle is not open
    assert answer["error"]["code"] == "not-found", answer


def test_a_peer_the_reloaded_policy_drops_is_unlisted_on_the_connections_it_holds(
    kms: Kms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection's class was fixed when it was accepted: a peer removed from the policy by
    a reload kept its open connections in the listed pool, with 2 MiB frames, for as long as
    it used them. Now each frame is judged by the policy as it is: the dropped peer's next
    frame is an unlisted peer's (refused, unread if long, and the connection's last), and an
    idle connection of it is closed within POLICY_RECHECK seconds."""
    monkeypatch.setattr(agent_server, "POLICY_RECHECK", 0.2)
    hello = protocol.frame({"v": 1, "id": 1, "op": "hello", "args": {}})
    with short_dir() as d, in_process_agent(kms.store, ROOT_ALL) as agent, \
            serving(agent, d) as path, socket.socket(socket.AF_UNIX) as busy, \
            socket.socket(socket.AF_UNIX) as idle:
        for sock in (busy, idle):
            sock.settimeout(30)
            sock.connect(str(path))
            sock.sendall(hello)
            assert read_frame(sock)["result"]["client"] == "root"  # type: ignore[index]
        agent.policy = Policy.parse(POLICY, "reloaded-policy")  # root is no longer named
        busy.sendall(header(1 << 20))  # a listed peer's length; the body never comes
        answer = read_frame(busy)
        assert busy.recv(1) == b""  # an unlisted peer's one request: closed after it
        idle.settimeout(10)
        assert idle.recv(1) == b"", "the dropped peer's idle connection stayed open"
    assert answer is not None and (answer["id"], answer["error"]["code"]) == (0, "refused")
    assert "not in the agent's policy (policy reloaded-policy)" in answer["error"]["message"]
    assert "was not read" in answer["error"]["message"]


def _held_back(caplog: pytest.LogCaptureFixture, words: str) -> tuple[int, int, int]:
    """(lines logged above DEBUG that contain ``words``, the same at DEBUG, and the total
    of the counts of held-back lines that the server logged)."""
    import re

    shown = [
        r for r in caplog.records
        if words in r.getMessage() and "not logged one by one" not in r.getMessage()
    ]
    loud = len([r for r in shown if r.levelno > logging.DEBUG])
    quiet = len([r for r in shown if r.levelno == logging.DEBUG])
    counted = sum(
        int(m.group(1))
        for r in caplog.records
        for m in [re.match(r"(\d+) .* not logged one by one", r.getMessage())]
        if m and r.levelno > logging.DEBUG
    )
    return loud, quiet, counted


def test_refused_connections_do_not_flood_the_process_log(
    kms: Kms, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unlisted uid holding the stranger slots and connecting in a loop wrote one WARNING
    line per connection (7,667 in 5 s): under journald the rate limit then drops the INFO
    lines operators keep (the audit checkpoints). Now LOG_BURST such lines a minute, each
    other one at DEBUG, and a count when the window has passed (or the server stops)."""
    monkeypatch.setattr(agent_server, "MAX_STRANGERS", 1)
    caplog.set_level(logging.DEBUG, logger="kmsfs.agent")
    tries = 30
    with short_dir() as d, in_process_agent(kms.store, POLICY) as agent, \
            serving(agent, d) as path, socket.socket(socket.AF_UNIX) as holder:
        holder.connect(str(path))  # root is not in POLICY: this takes the one stranger slot
        time.sleep(0.3)
        for _ in range(tries):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(30)
                sock.connect(str(path))
                assert sock.recv(1) == b""  # refused: closed without an answer
    loud, quiet, counted = _held_back(caplog, ": no free slot")
    assert loud == agent_server.LOG_BURST, caplog.text[-2000:]
    assert loud + quiet == tries
    assert counted == quiet  # every line held back is counted in a line that is not
    assert "connection(s) of unlisted peers refused (no free slot)" in caplog.text


def test_failed_tls_handshakes_do_not_flood_the_process_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who reaches the TLS port without a certificate got one log line per connection
    ('connection ended: ...'). Now failed handshakes are logged at DEBUG beyond LOG_BURST a
    minute, and counted."""
    import ssl
    import types

    from tests.integration.agent_helpers import TestCA, free_port

    ca = TestCA(tmp_path / "ca")
    agent_id = ca.issue("localhost", server=True)
    tls = agent_server.server_tls_context(
        agent_server.TlsFiles(agent_id.cert, agent_id.key, ca.path)
    )
    port = free_port()
    listener = agent_server.tcp_listener("127.0.0.1", port)
    policy = types.SimpleNamespace(client_name=lambda peer: None)
    server = agent_server.Server(
        types.SimpleNamespace(policy=policy),  # type: ignore[arg-type]
        [listener], tls, frozenset({listener.fileno()}),
    )
    caplog.set_level(logging.DEBUG, logger="kmsfs.agent")
    tries = 25
    server.start()
    try:
        for _ in range(tries):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
                    contextlib.suppress(OSError):  # the agent may hang up at once
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not a ClientHello
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):  # until the agent hangs up
                    pass
        deadline = time.monotonic() + 10
        while _held_back(caplog, "TLS handshake from 127.0.0.1 failed")[:2] != (
            agent_server.LOG_BURST, tries - agent_server.LOG_BURST
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.stop()
    assert isinstance(tls, ssl.SSLContext)
    loud, quiet, counted = _held_back(caplog, "TLS handshake from 127.0.0.1 failed")
    assert (loud, quiet) == (agent_server.LOG_BURST, tries - agent_server.LOG_BURST)
    assert counted == quiet
    assert "failed TLS handshake(s) in the last 60 s" in caplog.text
    assert "connection ended" not in caplog.text


def test_one_client_holds_at_most_max_per_peer_connections(kms: Kms) -> None:
    """One identity may hold MAX_PER_PEER of the listed peers' connections, so one client
    (a runaway mount, a script in a loop) cannot take every slot from the others; a
    connection past it is closed unanswered, and a slot it frees is taken again."""
    hello = {"v": 1, "id": 1, "op": "hello", "args": {}}
    with short_dir() as d, in_process_agent(kms.store, ROOT_ALL) as agent, \
            serving(agent, d) as path, contextlib.ExitStack() as held:
        conns = []
        for _ in range(agent_server.MAX_PER_PEER):
            sock = held.enter_context(socket.socket(socket.AF_UNIX))
            sock.settimeout(30)
            sock.connect(str(path))
            raw_request(sock, hello)
            answer = read_frame(sock)
            assert answer is not None and answer["result"]["client"] == "root"
            conns.append(sock)
        with socket.socket(socket.AF_UNIX) as extra:
            extra.settimeout(30)
            extra.connect(str(path))
            try:
                raw_request(extra, hello)
                answer = read_frame(extra)
            except (BrokenPipeError, ConnectionResetError):
                answer = None
            assert answer is None  # closed, unanswered
        conns[0].close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the close on its own time
            with socket.socket(socket.AF_UNIX) as again, contextlib.suppress(
                BrokenPipeError, ConnectionResetError  # still refused: closed unread
            ):
                again.settimeout(30)
                again.connect(str(path))
                raw_request(again, hello)
                if read_frame(again) is not None:
                    break
            assert time.monotonic() < deadline, "the freed slot was never given back"
            time.sleep(0.05)


def _tls_peer(n: int) -> Peer:
    return Peer(fingerprint="sha256:" + f"{n:02x}" * 32, subject=f"client-{n}")


def test_certificates_cannot_take_local_slots_and_a_monitor_holds_few(
    kms: Kms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four certificates listed for `health` alone, each holding 64 idle connections, took
    every listed slot, and root's own mounts on the Unix socket were refused (found by
    review). Remote peers now have a pool of their own, and a peer allowed none of the long
    actions holds at most MAX_PER_SMALL_PEER connections."""
    monkeypatch.setattr(agent_server, "MAX_CONNECTIONS", 8)
    monitors = [_tls_peer(n) for n in range(3)]
    remote = _tls_peer(9)
    policy = ROOT_ALL + "".join(
        f'[[client]]\nname = "{p.subject}"\ncerts = ["{p.fingerprint}"]\nallow = ["health"]\n'
        for p in monitors
    ) + (f'[[client]]\nname = "remote"\ncerts = ["{remote.fingerprint}"]\n'
         'domains = ["payroll"]\nallow = ["derive"]\n')
    with in_process_agent(kms.store, policy) as agent:
        server = agent_server.Server(agent, [])
        held: list[Callable[[], None]] = []

        def admit(who: Peer) -> bool:
            """As the server does: a refused connection gives back what it took."""
            taken: list[Callable[[], None]] = []
            if server._admit(who, True, taken):
                held.extend(taken)
                return True
            for undo in taken:
                undo()
            return False

        try:
            admitted = [sum(admit(p) for _ in range(10)) for p in monitors]
            # each monitor: four; the third finds the remote pool (8) full
            assert admitted == [agent_server.MAX_PER_SMALL_PEER] * 2 + [0], admitted
            assert not admit(remote)  # the remote pool is full ...
            assert all(admit(peer(0)) for _ in range(8))  # ... not this machine's
        finally:
            for undo in held:
                undo()


@pytest.mark.parametrize("who", ["listed", "unlisted"])
def test_a_frame_over_the_protocols_limit_is_a_recorded_refusal(
    kms: Kms, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, who: str
) -> None:
    """A header announcing more than protocol.MAX_FRAME was answered as a format error, and
    the audit log had no record of it, where every refusal is recorded (found by review)."""
    monkeypatch.setattr(agent_server, "BODY_TIMEOUT", 2.0)  # a body that never comes
    audit = tmp_path / "audit.log"
    big = protocol.MAX_FRAME + 1
    with short_dir() as d, in_process_agent(kms.store, ROOT_ALL, audit) as agent, \
            serving(agent, d) as path:
        agent.refusals.window = 0.0  # every refusal its own record here, to see each
        agent.listed_refusals.window = 0.0
        if who == "listed":
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(30)
                sock.connect(str(path))
                sock.sendall(header(big))
                answer = read_frame(sock)
        else:
            (answer,) = as_stranger(path, [header(big)])
    assert answer is not None and answer["error"]["code"] == "refused", answer
    what = "request" if who == "listed" else "frame"
    assert f"its {what} of {big} bytes was not read" in answer["error"]["message"]
    me = peer(0 if who == "listed" else STRANGER).describe()
    mine = [e for e in events(audit) if e["who"] == me]
    assert [(e["op"], "was not read" in e["reason"]) for e in mine] == [("unknown", True)]
