"""``kmsfs-hsmd``: run the HSM agent in the foreground (systemd ``Type=notify``).

Set-up failures (bad policy, unusable store, damaged audit log, a socket that cannot be bound,
unreadable TLS files) are one line and a non-zero exit before anything listens. Once running:
SIGTERM or SIGINT stops it cleanly (final audit checkpoint, HSM sessions closed); SIGHUP
re-reads the policy file, keeping the old policy if the new one does not parse, and continues
the audit log in a new file if the old one was moved aside (log rotation).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from kmsfs import __version__, exitcodes
from kmsfs.agent.audit import AuditLog
from kmsfs.agent.policy import Policy
from kmsfs.agent.protocol import printable
from kmsfs.agent.server import (
    Server,
    TlsFiles,
    check_unix_socket,
    is_tcp,
    remove_unix_socket,
    server_tls_context,
    systemd_listeners,
    tcp_listener,
    unix_listener,
)
from kmsfs.agent.service import MAX_REASON, Agent
from kmsfs.cliutil import Parser, run
from kmsfs.errors import KmsfsError, UsageError
from kmsfs.fs import sdnotify
from kmsfs.service import trusts
from kmsfs.service.context import Context, default_store_path, open_hsm

PROG = "kmsfs-hsmd"
log = logging.getLogger("kmsfs.agent")

EPILOG = """\
examples:
  kmsfs-hsmd --store /var/lib/kmsfs/store --policy /etc/kmsfs/hsmd-policy.toml
  kmsfs-hsmd --store /srv/kms --policy policy.toml --socket /run/kmsfs/hsmd.sock \\
      --listen 0.0.0.0:7440 --tls-cert agent.crt --tls-key agent.key --tls-client-ca clients.pem

The agent alone holds the HSM sessions and PINs (from the store's PIN sources: files or
systemd credentials). Clients: 'kmsfs mount --agent SOCKET|HOST:PORT' and
'kmsfs-admin --agent ...'. Every request is checked against the policy and written to the
hash-chained audit log; 'kmsfs-admin audit verify LOG' checks the log.

Signals: SIGTERM/SIGINT stop it (the audit log's tail signed first); SIGHUP re-reads the
policy and, if the audit log was moved aside (log rotation), continues in a new file.
"""


def default_socket() -> Path:
    """/run/kmsfs/hsmd.sock for root, else in $XDG_RUNTIME_DIR or the home directory: never a
    shared directory such as /tmp, where another user could take the name first."""
    if os.geteuid() == 0:
        return Path("/run/kmsfs/hsmd.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime else Path.home() / ".local" / "state" / "kmsfs"
    return base / "kmsfs-hsmd.sock"


def default_audit_log() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/kmsfs/hsmd/audit.log")
    return Path.home() / ".local" / "share" / "kmsfs" / "hsmd-audit.log"


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"want HOST:PORT, have {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="The kmsfs HSM agent: holds the HSM sessions and PINs and serves key "
        "operations to mounts and admin tools, under a policy, with an audit log.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--store", type=Path, help="the agent's store (default: as kmsfs-admin)")
    parser.add_argument("--policy", type=Path, required=True, help="the policy file (TOML)")
    parser.add_argument(
        "--socket", type=Path, help=f"Unix socket to listen on (default {default_socket()})"
    )
    parser.add_argument(
        "--socket-mode", type=lambda s: int(s, 8), default=0o660, metavar="MODE",
        help="permissions of the socket file (default 0660; the policy still decides)",
    )
    parser.add_argument(
        "--listen", type=host_port, metavar="HOST:PORT", help="also listen on TCP, TLS only"
    )
    parser.add_argument("--tls-cert", type=Path, metavar="F", help="the agent's certificate")
    parser.add_argument("--tls-key", type=Path, metavar="F", help="the agent's private key")
    parser.add_argument(
        "--tls-client-ca", type=Path, metavar="F", help="CA that signs client certificates"
    )
    parser.add_argument(
        "--audit-log", type=Path, help=f"the audit log (default {default_audit_log()})"
    )
    parser.add_argument(
        "--audit-every", type=int, default=1000, metavar="N",
        help="sign a checkpoint after N records (default 1000)",
    )
    parser.add_argument(
        "--audit-seconds", type=float, default=60.0, metavar="S",
        help="... or after S seconds with unsigned records (default 60)",
    )
    parser.add_argument("--log-file", type=Path, metavar="F", help="log here instead of stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _setup_logging(log_file: Path | None, verbose: bool) -> None:
    from kmsfs.fs.daemonlog import LINE_FORMAT, LogFile, stderr_formatter

    handler: logging.Handler
    if log_file is not None:
        # The mount daemon's kind of log file: created 0600 whatever the umask (it names
        # clients, Domains and refusals), never through a symlink, only a regular file.
        handler = LogFile(log_file)
        handler.setFormatter(logging.Formatter(LINE_FORMAT))
    else:  # under systemd, the journal: lines carry their priority
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(stderr_formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _record_reload(audit: AuditLog, policy: Path, loaded: bool, reason: str) -> None:
    """A reload of the policy in the signed audit log, with the SHA-256 of the file read: a
    policy widened, used and put back left no trace but the process log (found by review).
    ``op`` ``policy-reload``, ``decision`` ``allowed`` if it took effect."""
    try:
        digest: str | None = hashlib.sha256(policy.read_bytes()).hexdigest()
    except OSError:
        digest = None
    try:
        audit.append(who="kmsfs-hsmd", op="policy-reload", domain=None, allowed=loaded,
                     reason=printable(reason, MAX_REASON),
                     detail={"path": str(policy), "sha256": digest})
    except (KmsfsError, OSError) as exc:
        log.error("policy reload not recorded in the audit log: %s", exc)


def hsm_signer(store: Path) -> Callable[[bytes], tuple[str, bytes]]:
    """Sign audit checkpoints with the first HSM that answers among those of the store's
    Trusts that verify (``audit verify`` accepts no other signer)."""
    ctx = Context.at(store)

    def sign(message: bytes) -> tuple[str, bytes]:
        records = sorted(trusts.trusted_hsms(ctx).values(), key=lambda r: r.id)
        with open_hsm(ctx, records) as hsm:
            return hsm.record.id, hsm.sign(message)

    return sign


def _passed_by_systemd(path: Path, listeners: list[socket.socket]) -> bool:
    """Whether one of systemd's sockets (socket activation) is bound at *path*: the agent
    serves that one, and must not take it for another agent's and refuse to start."""
    want = _real(str(path))
    for sock in listeners:
        if sock.family == socket.AF_UNIX:
            name = sock.getsockname()
            if isinstance(name, bytes):
                name = os.fsdecode(name)
            if name and _real(name) == want:
                return True
    return False


def _real(path: str) -> str:
    """A socket path with its directory resolved (/var/run is /run on Debian); the socket
    itself is not followed."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(directory), name)


def serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_file, args.verbose)
    if args.audit_every < 1 or not args.audit_seconds > 0:
        raise UsageError("--audit-every must be at least 1 and --audit-seconds above 0")
    store = args.store or default_store_path()
    ctx = Context.at(store)
    ctx.store.anchor()  # a missing or damaged store fails here, with its path
    policy = Policy.load(args.policy)
    tls = None
    tls_names = ("tls_cert", "tls_key", "tls_client_ca")
    if args.listen or any(getattr(args, n) for n in tls_names):
        missing = [n for n in tls_names if not getattr(args, n)]
        if missing:
            flags = ", ".join("--" + n.replace("_", "-") for n in missing)
            raise UsageError(f"TCP needs TLS: give {flags} (plain TCP is never offered)")
        tls = server_tls_context(TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca))
    audit_path = args.audit_log or default_audit_log()
    tls_fds: set[int] = set()
    listeners: list[socket.socket] = []
    socket_path: Path | None = None
    try:
        listeners = systemd_listeners()
        for sock in listeners:
            if is_tcp(sock):  # a TCP socket from systemd is served with TLS, or not at all
                if tls is None:
                    raise UsageError(
                        "systemd passed a TCP socket: give --tls-cert, --tls-key and "
                        "--tls-client-ca (plain TCP is never offered)"
                    )
                tls_fds.add(sock.fileno())
        if not listeners or args.socket:
            socket_path = args.socket or default_socket()
            if _passed_by_systemd(socket_path, listeners):
                socket_path = None  # --socket names the one systemd listens on for us
            else:
                # A socket another agent serves is refused before the audit log is opened,
                # so a second agent started by mistake changes nothing (unix_listener checks
                # again, under a lock, for two started at once).
                check_unix_socket(socket_path)
        audit_path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        audit = AuditLog(
            audit_path,
            hsm_signer(store),
            checkpoint_every=args.audit_every,
            checkpoint_seconds=args.audit_seconds,
            keys={i: hsm.sign_key for i, hsm in trusts.trusted_hsms(ctx).items()},
        )
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    agent = Agent(store, policy, audit.append)
    made: os.stat_result | None = None  # the socket file this agent made, removed at the end
    try:
        if socket_path is not None:
            socket_path.parent.mkdir(parents=True, exist_ok=True)
            listeners.append(unix_listener(socket_path, args.socket_mode))
            made = socket_path.lstat()
        if args.listen:
            tcp = tcp_listener(*args.listen)
            listeners.append(tcp)
            tls_fds.add(tcp.fileno())
    except KmsfsError:
        for sock in listeners:
            sock.close()
        if socket_path is not None and made is not None:
            remove_unix_socket(socket_path, made)
        audit.close()
        raise
    server = Server(agent, listeners, tls, frozenset(tls_fds))
    stop, hup, wake = threading.Event(), threading.Event(), threading.Event()

    def on_stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()
        wake.set()

    def on_hup(_signum: int, _frame: object) -> None:
        # Only a flag: the main thread may be inside the audit log's lock right now.
        hup.set()
        wake.set()

    def reload() -> None:
        try:
            agent.policy = Policy.load(args.policy)
            log.info("policy %s reloaded (%d clients)", args.policy, len(agent.policy.rules))
            _record_reload(audit, args.policy, True, f"{len(agent.policy.rules)} clients")
        except KmsfsError as exc:
            log.error("policy not reloaded, the old one stays: %s", exc)
            _record_reload(audit, args.policy, False, f"the old one stays: {exc}")
        if args.log_file is not None:  # --log-file rotated too: opened again by its name
            from kmsfs.fs.daemonlog import reopen_log_files

            reopen_log_files()
        try:  # a rotated audit log: the old file signed and closed, a new one begun
            if audit.reopen():
                log.info("audit log %s reopened", audit.path)
        except (KmsfsError, OSError) as exc:
            log.error("audit log not reopened, it goes on in the old file: %s", exc)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    server.start()
    where = ", ".join(_describe(s) for s in listeners)
    log.info("kmsfs-hsmd %s serving store %s on %s", __version__, store, where)
    sdnotify.notify(f"READY=1\nSTATUS=serving on {where}")
    try:
        # An idle agent still signs its tail: a checkpoint every --audit-seconds when there
        # are unsigned records (AuditLog itself only checks its clock when appending). The
        # counts of unlisted peers' coalesced refusals are written first, so they get signed.
        signed = time.monotonic()
        while not stop.is_set():
            wake.wait(max(0.0, signed + args.audit_seconds - time.monotonic()))
            wake.clear()
            if hup.is_set():
                hup.clear()
                reload()
            if time.monotonic() - signed >= args.audit_seconds:
                agent.flush_refusals()  # coalesced refusals' counts, before they are signed
                audit.checkpoint()
                signed = time.monotonic()
    finally:
        sdnotify.notify("STOPPING=1")
        server.stop()
        if socket_path is not None and made is not None:
            remove_unix_socket(socket_path, made)
        agent.close()
        audit.close()
        log.info("kmsfs-hsmd stopped")
    return exitcodes.OK


def _describe(sock: object) -> str:
    try:
        name = sock.getsockname()  # type: ignore[attr-defined]
    except OSError:
        return "?"
    if isinstance(name, tuple):
        return f"tls://{name[0]}:{name[1]}"
    return str(name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(PROG, lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
