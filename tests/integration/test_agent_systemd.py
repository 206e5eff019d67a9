"""The shipped kmsfs-hsmd units, for real: systemd-analyze, socket activation, sd_notify, reload.

The agent runs as the units say: its command is the service's own ExecStart line (variables and
specifiers expanded as systemd would, to this test's store, policy and state directory), started
by ``systemd-socket-activate`` on the socket path of the .socket unit (moved to a temporary
directory), with ``NOTIFY_SOCKET`` pointing at a datagram socket the test reads. The store is a
real SoftHSM2 one (``initialized``); clients are the real ``kmsfs-admin --agent``.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from kmsfs import exitcodes
from kmsfs.agent.cli import default_audit_log, default_socket
from kmsfs.agent.client import AgentAddress, AgentClient
from tests.integration.agent_helpers import TestCA, clean_env, free_port, root_policy
from tests.kms_helpers import Admin

ROOT = Path(__file__).resolve().parent.parent.parent
SERVICE = ROOT / "systemd" / "kmsfs-hsmd.service"
SOCKET = ROOT / "systemd" / "kmsfs-hsmd.socket"
HSMD = "/usr/local/bin/kmsfs-hsmd"
SYSTEM_STATE = "/var/lib"  # what %S means for a system service


def unit_values(path: Path, key: str) -> list[str]:
    """Every value of ``key=`` in a unit file, in order (comments and sections ignored)."""
    values = []
    for line in path.read_text().splitlines():
        if line.startswith(f"{key}="):
            values.append(line.removeprefix(f"{key}="))
    return values


def unit_value(path: Path, key: str) -> str:
    values = unit_values(path, key)
    assert len(values) == 1, f"{path.name}: want one {key}=, have {values}"
    return values[0]


def unit_environment(path: Path) -> dict[str, str]:
    """The Environment= defaults of a unit (before EnvironmentFile= overrides them)."""
    env: dict[str, str] = {}
    for value in unit_values(path, "Environment"):
        for assignment in shlex.split(value):
            name, _, val = assignment.partition("=")
            env[name] = val
    return env


def expand(line: str, env: dict[str, str], state: str) -> list[str]:
    """An Exec line as systemd runs it: ``${VAR}`` is one word, ``$VAR`` splits at
    whitespace (empty: no word at all), ``%S`` is the state directory root."""
    words: list[str] = []
    for word in shlex.split(line):
        word = word.replace("%S", state)
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            words += env[whole.group(1)].split()
            continue
        words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return words


class ActivatedAgent:
    """kmsfs-hsmd as the units start it, under systemd-socket-activate; reads its sd_notify."""

    def __init__(self, admin: Admin, workdir: Path) -> None:
        workdir.mkdir()
        self.admin = admin
        self.workdir = workdir
        self.socket = workdir / "hsmd.sock"  # the .socket unit's ListenStream=, moved here
        self.policy = workdir / "hsmd-policy.toml"
        self.state = workdir / "state"  # %S
        self.log_path = workdir / "hsmd.log"
        self.env_file: dict[str, str] = {}  # EnvironmentFile=-/etc/kmsfs/hsmd.env
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(str(workdir / "notify.sock"))
        self.notify.settimeout(60)

    def command(self) -> list[str]:
        """ExecStart=, with what /etc/kmsfs/hsmd.env would set over the unit's defaults."""
        env = unit_environment(SERVICE)
        env.update(KMSFS_STORE=str(self.admin.store), KMSFS_HSMD_POLICY=str(self.policy))
        env.update(self.env_file)
        return expand(unit_value(SERVICE, "ExecStart"), env, str(self.state))

    def start(self, wrapper: tuple[str, ...] = ()) -> None:
        """Listen on the socket; the agent is executed at the first connection."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *wrapper,
                    "systemd-socket-activate", "-l", str(self.socket),
                    "-E", f"NOTIFY_SOCKET={self.workdir / 'notify.sock'}",
                    *self.command(),
                ],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=clean_env(),
            )
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "systemd-socket-activate did not listen"
            time.sleep(0.02)

    def next_state(self) -> str:
        return self.notify.recv(4096).decode()

    def health(self, check: int = 0) -> str:
        result = self.admin("--agent", str(self.socket), "hsm", "health", check=check)
        return result.stdout + result.stderr

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log():
            assert time.monotonic() < deadline, f"{text!r} not in the agent's log:\n{self.log()}"
            time.sleep(0.05)

    def reload(self) -> None:
        """The unit's own ExecReload=, with $MAINPID the agent's pid."""
        assert self.proc is not None
        words = expand(unit_value(SERVICE, "ExecReload"), {"MAINPID": str(self.proc.pid)}, "")
        subprocess.run(words, check=True, capture_output=True, timeout=10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        code, self.proc = self.proc.returncode, None
        return code

    def close(self) -> None:
        self.stop()
        self.notify.close()


@pytest.fixture
def agent(installed: None, initialized: Admin, tmp_path: Path) -> Iterator[ActivatedAgent]:
    """A socket-activated agent (not yet connected to) on a fresh store; root may do anything."""
    activated = ActivatedAgent(initialized, tmp_path / "agent")
    activated.policy.write_text(root_policy())
    try:
        yield activated
    finally:
        activated.close()


# -- the unit files ------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", [SERVICE, SOCKET], ids=lambda u: u.name)
def test_systemd_analyze_verify_passes(installed: None, unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "kmsfs-hsmd" not in result.stderr, result.stderr


def test_units_agree_with_each_other_and_with_the_agents_defaults() -> None:
    """The socket is where clients look by default; the audit log is in the state directory,
    where the agent would put it for root anyway; nothing the unit needs comes from argv."""
    assert unit_value(SOCKET, "ListenStream") == "/run/kmsfs/hsmd.sock"
    if os.geteuid() == 0:
        assert default_socket() == Path(unit_value(SOCKET, "ListenStream"))
    assert unit_value(SOCKET, "SocketMode") == "0660"
    assert unit_value(SERVICE, "Type") == "notify"
    assert unit_value(SERVICE, "NotifyAccess") == "main"
    exec_start = expand(unit_value(SERVICE, "ExecStart"), unit_environment(SERVICE), SYSTEM_STATE)
    assert exec_start[0] == HSMD  # the link tools/install-system.sh makes
    assert "--socket" not in exec_start, "socket activation: the agent must not bind its own"
    audit = Path(exec_start[exec_start.index("--audit-log") + 1])
    state_dir = Path(SYSTEM_STATE) / unit_value(SERVICE, "StateDirectory")
    assert audit.parent == state_dir
    if os.geteuid() == 0:
        assert audit == default_audit_log()
    assert not any("pin" in w.lower() for w in exec_start), "PINs never on a command line"


def test_the_socket_outlives_the_agents_restarts_and_stopping_it_stops_the_agent() -> None:
    """Clients wait in the socket's backlog while the agent restarts only if a restart of the
    service leaves the socket alone: no PartOf=/BindsTo= on the service. The service Requires=
    the socket, so stopping (or restarting) the socket stops (or restarts) the agent too."""
    for key in ("PartOf", "BindsTo"):
        assert not any("kmsfs-hsmd" in v for v in unit_values(SOCKET, key)), f"socket {key}="
    assert "kmsfs-hsmd.socket" in unit_value(SERVICE, "Requires").split()
    assert "kmsfs-hsmd.socket" in unit_value(SERVICE, "After").split()


# -- the service's ExecStart under socket activation ---------------------------------------------


def test_exec_start_serves_the_activated_socket_and_notifies_ready_then_stopping(
    agent: ActivatedAgent,
) -> None:
    agent.start()
    inode = agent.socket.stat().st_ino
    assert "ok" in agent.health()  # the first connection starts the agent
    assert agent.next_state().startswith("READY=1")
    # it serves the socket it was given: the same inode, and no listener of its own
    assert agent.socket.stat().st_ino == inode
    assert f"on {agent.socket}\n" in agent.log(), agent.log()
    agent.health()  # a second connection, to the same process
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in agent.next_state()
    assert agent.stop() == 0
    assert "kmsfs-hsmd stopped" in agent.log()
    audit = agent.state / "kmsfs" / "hsmd" / "audit.log"
    assert audit.exists() and b'"health"' in audit.read_bytes()


def test_reload_keeps_the_old_policy_when_the_new_one_is_broken_then_applies_a_good_one(
    agent: ActivatedAgent,
) -> None:
    agent.start()
    agent.health()
    assert agent.next_state().startswith("READY=1")

    agent.policy.write_text("[[client]\nname = 'half a table")
    agent.reload()
    agent.wait_for_log("policy not reloaded, the old one stays")
    assert "ok" in agent.health(), "the old policy stays in force"

    agent.policy.write_text(
        '[[client]]\nname = "root, mounts only"\nuids = [0]\ndomains = ["*"]\n'
        'allow = ["derive"]\n'
    )
    agent.reload()
    agent.wait_for_log("reloaded (1 clients)")
    refused = agent.health(check=exitcodes.REFUSED)
    assert "may not health" in refused, refused
    assert agent.proc is not None and agent.proc.poll() is None
    agent.proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in agent.next_state()
    assert agent.stop() == 0
    # Both reloads are in the signed audit log, with the file read: a policy widened, used
    # and put back left no trace there (found by review).
    audit = agent.state / "kmsfs" / "hsmd" / "audit.log"
    reloads = [r for r in map(json.loads, audit.read_text().splitlines())
               if r.get("op") == "policy-reload"]
    assert [(r["decision"], r["detail"]["sha256"]) for r in reloads] == [
        ("refused", hashlib.sha256(b"[[client]\nname = 'half a table").hexdigest()),
        ("allowed", hashlib.sha256(agent.policy.read_bytes()).hexdigest()),
    ]
    assert reloads[0]["reason"].startswith("the old one stays: ")
    agent.admin("audit", "verify", str(audit))  # still a valid, signed log


def test_configuration_errors_exit_with_codes_the_unit_does_not_restart_on(
    agent: ActivatedAgent, tmp_path: Path
) -> None:
    """A malformed policy, a store that is not there and an audit log whose checkpoints this
    store's HSMs did not sign (KMSFS_STORE changed under it) stop the agent with a code
    RestartPreventExitStatus= lists: restarting cannot cure them."""
    prevented = {
        int(code) for value in unit_values(SERVICE, "RestartPreventExitStatus")
        for code in value.split()
    }
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    held.bind(str(agent.socket))
    held.listen(16)
    try:
        agent.policy.write_text("[[client]\nname = 'half a table")
        with open(agent.log_path, "ab") as log:
            code = _start_on_fd(agent, held, log).wait(timeout=60)
        assert code == exitcodes.FORMAT and code in prevented, agent.log()

        agent.policy.write_text(root_policy())
        agent.env_file["KMSFS_STORE"] = str(tmp_path / "no-such-store")
        with open(agent.log_path, "ab") as log:
            code = _start_on_fd(agent, held, log).wait(timeout=60)
        assert code == exitcodes.STORE and code in prevented, agent.log()

        # the audit log of the store the agent served, then another store
        del agent.env_file["KMSFS_STORE"]
        with open(agent.log_path, "ab") as log:
            first = _start_on_fd(agent, held, log)
        assert agent.next_state().startswith("READY=1")
        agent.health()
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0  # a final checkpoint, signed by this store's HSM
        other = Admin.under(tmp_path / "other")
        other("init", "--hsms", "1")
        agent.env_file["KMSFS_STORE"] = str(other.store)
        with open(agent.log_path, "ab") as log:
            code = _start_on_fd(agent, held, log).wait(timeout=60)
        assert code == exitcodes.VERIFICATION and code in prevented, agent.log()
        assert "refusing to extend" in agent.log()
    finally:
        held.close()


# -- MemoryDenyWriteExecute=yes ------------------------------------------------------------------

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
# The kernel's form of MemoryDenyWriteExecute= (Linux 6.3+): no mapping both writable and
# executable, none made executable later; kept across execve, so it covers the agent.
_MDWE_EXEC = (
    "import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
    f"assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0; "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)
MDWE = (sys.executable, "-c", _MDWE_EXEC)


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0)


@pytest.mark.skipif(not _mdwe_supported(), reason="the kernel has no PR_SET_MDWE (Linux < 6.3)")
def test_the_agent_works_without_writable_executable_memory_and_takes_args_from_the_env_file(
    agent: ActivatedAgent, tmp_path: Path
) -> None:
    """What MemoryDenyWriteExecute=yes in the unit relies on: CPython, cryptography (chain
    verification), python-pkcs11 and SoftHSM2 (seal, key generation, signing) and ssl (the TLS
    listener given by KMSFS_HSMD_ARGS, as /etc/kmsfs/hsmd.env would) need no W+X memory."""
    assert unit_value(SERVICE, "MemoryDenyWriteExecute") == "yes"
    probe = "import mmap; mmap.mmap(-1, 4096, prot=7)"  # PROT_READ|PROT_WRITE|PROT_EXEC
    refused = subprocess.run([*MDWE, sys.executable, "-c", probe], capture_output=True, text=True)
    assert "PermissionError" in refused.stderr, "the wrapper must really forbid W+X memory"

    admin = agent.admin
    admin.create_operators("alice")
    trust = admin.propose(["hsm1", "hsm2"], ["alice"], 1)
    admin.sign(trust, "alice")
    ca = TestCA(tmp_path / "tls")
    server, client = ca.issue("localhost", server=True), ca.issue("mount1.example.org")
    agent.policy.write_text(
        root_policy(f'\n[[client]]\nname = "mount1"\ncerts = ["{client.fingerprint}"]\n'
                    'allow = ["health"]\n')
    )
    port = free_port()
    agent.env_file["KMSFS_HSMD_ARGS"] = (
        f"--listen 127.0.0.1:{port} --tls-cert {server.cert} --tls-key {server.key} "
        f"--tls-client-ca {ca.path}"
    )
    agent.start(wrapper=MDWE)
    via_agent = ("--agent", str(agent.socket))
    admin(*via_agent, "trust", "seal", trust)
    assert agent.next_state().startswith("READY=1")
    admin(*via_agent, "domain", "create", "payroll", "--trust", trust)
    admin("domain", "verify", "payroll")
    remote = AgentClient(
        AgentAddress.parse(f"localhost:{port}", str(client.cert), str(client.key), str(ca.path))
    )
    try:
        assert remote.call("hello", {})["client"] == "mount1"
        assert all(row["ok"] for row in remote.call("health", {})["hsms"])
    finally:
        remote.close()
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in agent.next_state()
    assert agent.stop() == 0, agent.log()
    assert "checkpoint" in agent.log()  # the final audit checkpoint was signed in an HSM


# -- systemd keeps the socket across agent restarts -----------------------------------------------


# Puts the passed socket at fd 3 and sets LISTEN_PID to its own pid, then becomes the command.
_LISTEN_EXEC = (
    "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def _start_on_fd(
    agent: ActivatedAgent, sock: socket.socket, log: IO[bytes] | None
) -> subprocess.Popen[bytes]:
    """The agent's ExecStart with ``sock`` as fd 3 and LISTEN_PID/LISTEN_FDS set, as systemd
    starts it; unlike systemd-socket-activate, the test keeps its own copy of the socket."""
    output = log if log is not None else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-c", _LISTEN_EXEC, str(sock.fileno()), *agent.command()],
        pass_fds=(sock.fileno(),), stdout=output, stderr=output, stdin=subprocess.DEVNULL,
        env=clean_env(NOTIFY_SOCKET=str(agent.workdir / "notify.sock")),
    )


def test_a_restarted_agent_serves_the_socket_that_systemd_keeps(
    agent: ActivatedAgent,
) -> None:
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    held.bind(str(agent.socket))
    held.listen(16)
    first = second = None
    try:
        with open(agent.log_path, "ab") as log:
            first = _start_on_fd(agent, held, log)
        assert agent.next_state().startswith("READY=1")
        agent.admin("--agent", str(agent.socket), "hsm", "health")
        first.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in agent.next_state()
        assert first.wait(timeout=30) == 0

        # The failing agent logs a traceback per failed accept() without pause: no log file.
        second = _start_on_fd(agent, held, None)
        assert agent.next_state().startswith("READY=1")
        agent.admin("--agent", str(agent.socket), "hsm", "health")
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        held.close()


def test_a_tcp_socket_from_systemd_is_served_with_tls_or_not_at_all(
    agent: ActivatedAgent, tmp_path: Path
) -> None:
    """What kmsfs-hsmd.socket says of a ListenStream=HOST:PORT added to it: without the TLS
    files the agent refuses to start (exit 2, one line); with them it serves the socket with
    mutual TLS only, and a plaintext request gets no answer."""
    port = free_port()
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    held.bind(("127.0.0.1", port))
    held.listen(16)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(agent.log_path, "ab") as log:
            procs.append(_start_on_fd(agent, held, log))
        assert procs[0].wait(timeout=60) == exitcodes.USAGE
        assert "systemd passed a TCP socket: give --tls-cert" in agent.log()

        ca = TestCA(tmp_path / "tls")
        server, client = ca.issue("localhost", server=True), ca.issue("mount1.example.org")
        agent.policy.write_text(
            root_policy(f'\n[[client]]\nname = "mount1"\ncerts = ["{client.fingerprint}"]\n'
                        'allow = ["health"]\n')
        )
        agent.env_file["KMSFS_HSMD_ARGS"] = (
            f"--tls-cert {server.cert} --tls-key {server.key} --tls-client-ca {ca.path}"
        )
        with open(agent.log_path, "ab") as log:
            procs.append(_start_on_fd(agent, held, log))
        assert agent.next_state().startswith("READY=1")
        assert f"on tls://127.0.0.1:{port}" in agent.log()
        remote = AgentClient(
            AgentAddress.parse(f"localhost:{port}", str(client.cert), str(client.key),
                               str(ca.path))
        )
        try:
            assert remote.call("hello", {})["client"] == "mount1"
        finally:
            remote.close()
        hello = b'{"args":{},"id":1,"op":"hello","v":1}'
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(len(hello).to_bytes(4, "big") + hello)
            try:
                answer = raw.recv(100)
            except (ConnectionResetError, TimeoutError):
                answer = b""
        assert b'"ok":true' not in answer
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        held.close()
