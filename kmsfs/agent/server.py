"""The agent's transports: a Unix socket (peer uid from SO_PEERCRED) and TCP with mutual TLS.

One thread per connection, requests on a connection answered in order. A connection can do
nothing to the process but get error responses: a malformed request gets an error naming what
is wrong and the connection stays usable; a frame that breaks the framing (too long, cut
short) gets one error and the connection is closed, because the stream cannot be resynced. An
unexpected exception in a handler is logged with its traceback and answered as an internal
error; it never reaches the accept loop.

A peer the policy does not name costs the agent little: one of a few slots, one request, and
a frame of at most MAX_STRANGER_FRAME bytes read and parsed. A longer one is refused from its
length alone, unread: a 2 MiB frame of ``[{},{},...]`` takes ~0.5 s of CPU (holding the GIL)
and ~50 MiB to parse, and 16 such peers in a loop slowed listed mounts' derives a thousandfold.
A peer it names may send frames as long as what its policy entries allow needs
(:func:`frame_limit`): a client listed for ``health`` alone is held to the same small limit.
Both are decided per frame, by the policy as it is then: after a reload, a peer the policy no
longer names is served like any unlisted peer on the connections it still has (one more
request, and an idle one is closed within POLICY_RECHECK seconds).

The process log gets per-connection lines (refused connections, failed TLS handshakes,
connections that ended badly) at most LOG_BURST times a minute per kind, then a count: a
stream of connections would otherwise fill the journal, whose rate limit then drops the lines
operators keep (the audit checkpoints). Each line held back is still logged at DEBUG.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import ipaddress
import logging
import os
import socket
import ssl
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from kmsfs.agent import protocol
from kmsfs.agent.policy import Peer, Policy
from kmsfs.agent.refusals import RefusalCoalescer
from kmsfs.agent.service import Agent
from kmsfs.errors import KmsfsError, UsageError
from kmsfs.ownership import first_replaceable

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # connections of peers the policy names, local and remote each
MAX_PER_PEER = 64  # ... of which one identity (uid, certificate) may hold
#: ... and one that the policy allows none of LARGE_OPS (``health`` alone: a monitor): four
#: such certificates could hold every remote slot, and with one pool for both, every local
#: one too, so that root's own mounts on the Unix socket were refused (found by review).
MAX_PER_SMALL_PEER = 4
MAX_STRANGERS = 16  # connections of peers it does not name: one refused request each
#: Bytes of a frame of a peer the policy does not name that are read and parsed. An honest
#: request it can be refused for (hello, health, a derive of a few infos, a small create-domain)
#: fits, so its refusal names the operation; a longer one is refused from its header alone.
MAX_STRANGER_FRAME = 4096
#: ... and of a peer the policy names for none of LARGE_OPS (``health`` alone): its longest
#: honest request is a few dozen bytes.
MAX_SMALL_FRAME = MAX_STRANGER_FRAME
#: The actions whose requests may be long, so a peer allowed any of them may send frames of up
#: to protocol.MAX_FRAME: a derive of 1024 infos of the largest size (protocol.MAX_INFO) takes
#: 348 KiB, an open-domain (the ``derive`` action) a Domain bundle with its Trust chain, and
#: the others carry bundles, chains and approvals.
LARGE_OPS = frozenset({"derive"}) | Agent.LASTING_OPS
#: Seconds between looks at the policy while a listed peer's connection is idle: one the
#: policy no longer names (a reload) is closed, not left holding a listed slot.
POLICY_RECHECK = 1.0
LOG_WINDOW = 60.0  # seconds: per-connection log lines of one kind get LOG_BURST lines, ...
LOG_BURST = 5  # ... then only a count, logged once the window has passed
MAX_HANDSHAKES = 64  # TLS handshakes in progress (the peer is not known before)
#: ... of which one source address may hold: a peer that opens idle connections from one
#: address cannot take every handshake slot (from many addresses, only a firewall helps).
MAX_HANDSHAKES_PER_ADDRESS = 4
BODY_TIMEOUT = 30.0  # seconds to receive a whole frame once its header began (no slow-loris)
IDLE_TIMEOUT = 600.0  # seconds a connection may wait between requests (clients reconnect)
HANDSHAKE_TIMEOUT = 3.0  # a TLS 1.3 handshake is one round trip and two signatures
_UCRED = struct.Struct("iII")  # pid, uid, gid (uid_t and gid_t are unsigned)
ACCEPT_POLL = 0.5  # seconds: how often an accept loop looks at the stop flag


@dataclass(frozen=True)
class TlsFiles:
    """The agent's certificate and key, and the CA whose client certificates it accepts."""

    cert: Path
    key: Path
    client_ca: Path


def server_tls_context(files: TlsFiles) -> ssl.SSLContext:
    """TLS 1.3 only, client certificate required and checked against ``client_ca``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    # No session tickets: a resumed session skips the certificate's checks, so a client
    # certificate that had expired went on working for the ticket's lifetime, two hours (the
    # policy itself is checked on every request).
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    try:
        context.load_cert_chain(files.cert, files.key)
        context.load_verify_locations(cafile=files.client_ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"TLS set-up: {exc}") from None
    return context


#: Seconds a starting agent waits for another one's set-up of the same socket.
SOCKET_LOCK_WAIT = 10.0
PROBE_TIMEOUT = 2.0  # seconds: connecting to an existing socket file to see if it is served


def check_unix_socket(path: Path) -> bool:
    """Whether ``path`` is a stale socket file (True) or absent (False); UsageError if it is
    anything else: not a socket, or a socket some process accepts connections on. Only a
    socket whose connect is refused (ECONNREFUSED: nobody listens) counts as stale."""
    path = Path(path)
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise UsageError(f"{path}: exists and is not a socket")
    except FileNotFoundError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return True
        except FileNotFoundError:  # removed meanwhile
            return False
        except (BlockingIOError, TimeoutError):  # a full backlog: someone listens
            pass
        except OSError as exc:
            raise UsageError(
                f"{path}: cannot tell whether a process is listening on it ({exc.strerror}); "
                "remove it if it is stale, or choose another --socket"
            ) from None
    raise UsageError(
        f"another process is listening on {path} (another kmsfs-hsmd?); "
        "stop it first or choose another --socket"
    )


@contextlib.contextmanager
def _socket_lock(path: Path) -> Iterator[None]:
    """Hold ``PATH.lock`` (flock) while checking, replacing and binding the socket: two agents
    started at once cannot both find the name free or stale, since the first one listens
    before it lets go. The file is left in place (removing a lock file races its next user)."""
    lock_path = path.with_name(path.name + ".lock")
    flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock_path, flags, 0o600)
    except OSError as exc:
        raise UsageError(f"{lock_path}: cannot open (the socket's lock): {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{lock_path}: exists and is not a regular file")
        deadline = time.monotonic() + SOCKET_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UsageError(
                        f"{lock_path}: held by another process (another kmsfs-hsmd starting?)"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def unix_listener(path: Path, mode: int = 0o660) -> socket.socket:
    """Bind a Unix socket at ``path``, replacing a stale socket file but nothing else: not
    another file, and not a socket some process (another agent) is listening on."""
    path = Path(path)
    _check_socket_directory(path.parent)
    with _socket_lock(path):
        if check_unix_socket(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # Made with its mode by bind itself, under a umask: a chmod by path after the bind
        # follows a symlink that another user put in its place meanwhile (root's chmod of any
        # file). The agent starts no thread before its listeners are made.
        with _UMASK_LOCK:
            umask = os.umask(0o777 & ~mode)
            try:
                sock.bind(str(path))
                sock.listen(64)
            except OSError as exc:
                sock.close()
                raise UsageError(f"{path}: cannot listen: {exc.strerror}") from None
            finally:
                os.umask(umask)
    return sock


#: The process's umask is changed around a bind: one at a time (in-process callers, tests).
_UMASK_LOCK = threading.Lock()


def _check_socket_directory(directory: Path) -> None:
    """Refuse a directory where another user could replace the socket (writable by group or
    others without the sticky bit, or owned by another user than the agent's or root), or
    could replace the directory itself, or one on the way to it (a parent they own, a
    symlink in a directory they may write): clients would then reach their program and take
    its answers for keys."""
    try:
        found = first_replaceable(directory, (0, os.geteuid()))
    except OSError as exc:
        raise UsageError(f"{directory}: cannot use for the socket: {exc.strerror}") from None
    if found is not None:
        where, why = found
        what = ("files in it" if where == Path(os.path.realpath(directory))
                else f"{where}, on the way to it")
        raise UsageError(
            f"{directory}: other users may replace {what} ({why}); put the socket in a "
            "directory only the agent's user can write, such as /run/kmsfs"
        )


def remove_unix_socket(path: Path, made: os.stat_result) -> None:
    """On a clean stop, remove the socket file :func:`unix_listener` made (``made``: its
    stat then), so no stale file stays behind; one another agent has put there since (it found
    ours closed, so stale) is left alone. Under the socket's lock, like the bind. Never for a
    socket systemd passed in: that one is systemd's, and stays for the next activation."""
    try:
        with _socket_lock(path):
            now = path.lstat()
            if (now.st_dev, now.st_ino) == (made.st_dev, made.st_ino):
                path.unlink()
    except FileNotFoundError:
        pass
    except (OSError, UsageError) as exc:  # stopping goes on: the next start replaces it
        log.warning("socket %s not removed: %s", path, getattr(exc, "strerror", None) or exc)


def tcp_listener(host: str, port: int) -> socket.socket:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"{host}:{port}: {exc.strerror}") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise UsageError(f"{host}:{port}: cannot listen: {exc.strerror}") from None
    return sock


def peer_of_unix(conn: socket.socket) -> Peer:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(creds)
    return Peer.local(uid)


def peer_of_tls(conn: ssl.SSLSocket) -> Peer:
    der = conn.getpeercert(binary_form=True)
    if der is None:  # cannot happen with CERT_REQUIRED; refuse rather than trust
        raise ssl.SSLError("no client certificate")
    cert = conn.getpeercert() or {}
    names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    # A subject with several common names names no one: matching by CN needs exactly one.
    subject = names[0] if len(names) == 1 else None
    return Peer(fingerprint="sha256:" + sha256(der).hexdigest(), subject=subject)


def handshake_source(address: str) -> str:
    """Who a TLS handshake in progress counts against (MAX_HANDSHAKES_PER_ADDRESS): an IPv4
    address, or an IPv6 address's /64, which one host is commonly given whole (one address
    each would let it take every handshake slot: review)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is that IPv4 address
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def frame_limit(policy: Policy, peer: Peer) -> int | None:
    """The longest frame ``peer`` may send under ``policy`` (None: the policy does not name
    it). Sized to the longest request it could honestly make: no more room than that to make
    the agent parse for nothing."""
    if policy.client_name(peer) is None:
        return None
    for rule in policy.rules:
        if rule.matches(peer) and rule.allow & LARGE_OPS:
            return protocol.MAX_FRAME
    return MAX_SMALL_FRAME


#: Kinds of per-connection log lines, rate-limited each on its own, and how their counts read.
_LOG_KINDS = {
    "unlisted-no-slot": "connection(s) of unlisted peers refused (no free slot)",
    "listed-no-slot": "connection(s) of listed peers refused (no free slot)",
    "per-peer": "connection(s) refused (too many of one client open)",
    "handshakes-busy": "TLS connection(s) refused (too many handshakes in progress)",
    "handshake-failed": "failed TLS handshake(s)",
    "ended-listed": "connection(s) of listed peers ended by an error",
    "ended-unlisted": "connection(s) of unlisted peers ended by an error",
    "dropped": "idle connection(s) closed (their client is no longer in the policy)",
}


class _Logged(ConnectionError):
    """A connection refused and logged already: its end is not logged again."""


def _recv_exact(conn: socket.socket, size: int, deadline: float) -> bytes | None:
    """``size`` bytes by ``deadline`` (time.monotonic()), or None at a clean end of stream
    before the first byte; TimeoutError once the deadline passes, however the bytes drip in."""
    chunks = bytearray()
    while len(chunks) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client took too long")
        conn.settimeout(remaining)
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            if not chunks:
                return None
            raise ConnectionError("connection closed in the middle of a frame")
        chunks += chunk
    return bytes(chunks)


class Server:
    """Accepts on every listener, serves each connection in its own thread."""

    def __init__(
        self,
        agent: Agent,
        listeners: list[socket.socket],
        tls: ssl.SSLContext | None = None,
        tls_listeners: frozenset[int] = frozenset(),
    ) -> None:
        self.agent = agent
        self._listeners = listeners
        self._tls = tls
        self._tls_fds = tls_listeners
        self._stopping = threading.Event()
        # Local peers (the Unix socket: this machine's mounts) and remote ones (TLS) have a
        # pool each: no number of certificates can take the slots of this machine's users.
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._local_slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._strangers = threading.BoundedSemaphore(MAX_STRANGERS)
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._handshakes_from: dict[str, int] = {}  # source address -> handshakes in progress
        self._per_peer: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.quiet_log = RefusalCoalescer(window=LOG_WINDOW, burst=LOG_BURST)

    def _note(self, level: int, kind: str, message: str) -> None:
        """Log one per-connection event of ``kind``: at ``level`` while its kind has lines left
        this window, else at DEBUG only and counted (:meth:`_log_counts` writes the count)."""
        admitted = self.quiet_log.admit(kind, message)
        if admitted is None:
            log.debug("%s", message)
            return
        _kind, held_back = admitted
        if held_back:
            message += f" (and {held_back} more since, not logged one by one)"
        log.log(level, "%s", message)

    def _log_counts(self, everything: bool = False) -> None:
        """The counts of per-connection lines held back, once their window has passed (all of
        them when the server stops)."""
        for owed in self.quiet_log.due(everything):
            log.warning(
                "%d %s in the last %.0f s, not logged one by one (the latest: %s)",
                owed.suppressed, _LOG_KINDS.get(owed.who, owed.who), self.quiet_log.window,
                owed.op,
            )

    def start(self) -> None:
        for listener in self._listeners:
            thread = threading.Thread(
                target=self._accept_loop, args=(listener,), name="accept", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop accepting, close every connection; in-flight requests finish or fail.

        Listeners are never shut down, only closed once their accept loop has seen the stop
        flag: a socket passed by systemd is systemd's, and shutdown(2) on it would kill it for
        the next agent too (systemd marks the socket unit failed on the POLLHUP).
        """
        self._stopping.set()
        for thread in self._threads:
            thread.join(ACCEPT_POLL * 4)
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._log_counts(everything=True)

    def _accept_loop(self, listener: socket.socket) -> None:
        is_tls = listener.fileno() in self._tls_fds
        listener.settimeout(ACCEPT_POLL)
        failures = 0
        while not self._stopping.is_set():
            self._log_counts()  # at least every ACCEPT_POLL seconds
            try:
                conn, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # A broken listener must not spin: back off up to 5 s between attempts.
                failures += 1
                log.error("accept failed (%s); retrying", exc.strerror or exc)
                self._stopping.wait(min(5.0, 0.1 * 2 ** min(failures, 6)))
                continue
            failures = 0
            conn.settimeout(None)
            try:
                threading.Thread(
                    target=self._serve, args=(conn, is_tls), name="client", daemon=True
                ).start()
            except RuntimeError as exc:  # "can't start new thread": this client, not the loop
                log.error("cannot serve a connection (%s): closed it, still accepting", exc)
                with contextlib.suppress(OSError):
                    conn.close()

    def _serve(self, conn: socket.socket, is_tls: bool) -> None:
        """Identify the peer, give it a slot from the right pool, answer its requests.

        Peers the policy names share MAX_CONNECTIONS, at most MAX_PER_PEER each; a peer it
        does not name gets one of MAX_STRANGERS slots for a single (refused, audited) request.
        So neither an unknown uid nor one noisy client can lock the others out.
        """
        raw = conn  # tracked as long as it lives; after a handshake, conn is its TLS wrapper
        with self._lock:
            self._connections.add(raw)
        release: list[Callable[[], None]] = []
        kind = "handshake-failed" if is_tls else "ended-unlisted"
        address = _source_address(conn) if is_tls else "local"
        try:
            if is_tls:
                conn = self._handshake(conn, address)
                peer = peer_of_tls(conn)  # type: ignore[arg-type]
            else:
                peer = peer_of_unix(conn)
            listed = self.agent.policy.client_name(peer) is not None
            kind = "ended-listed" if listed else "ended-unlisted"
            if not self._admit(peer, listed, release):
                return
            log.debug("connection from %s", peer.describe())
            self._requests(conn, peer, listed=listed)
        except _Logged:
            pass
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            if not self._stopping.is_set():
                if kind == "handshake-failed":
                    self._note(logging.INFO, kind, f"TLS handshake from {address} failed: {exc}")
                else:
                    self._note(logging.INFO, kind, f"connection ended: {exc}")
        except Exception:
            log.exception("connection failed")
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._connections.discard(raw)
            with contextlib.suppress(OSError):
                conn.close()
            for undo in release:
                undo()

    def _handshake(self, conn: socket.socket, address: str) -> socket.socket:
        assert self._tls is not None
        source = handshake_source(address)
        if not self._count_one(self._handshakes_from, source, MAX_HANDSHAKES_PER_ADDRESS):
            self._note(logging.WARNING, "handshakes-busy",
                       f"refusing a TLS connection from {address}: handshakes in progress")
            raise _Logged(f"{address}: too many TLS handshakes in progress")
        try:
            if not self._handshakes.acquire(blocking=False):
                self._note(logging.WARNING, "handshakes-busy",
                           f"refusing a TLS connection: {MAX_HANDSHAKES} handshakes in progress")
                raise _Logged(f"{MAX_HANDSHAKES} TLS handshakes in progress, refused")
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT)
                tls_conn = self._tls.wrap_socket(conn, server_side=True)
            finally:
                self._handshakes.release()
        finally:
            self._uncount_one(self._handshakes_from, source)
        with self._lock:
            self._connections.add(tls_conn)
        return tls_conn

    def _count_one(self, counts: dict[str, int], key: str, limit: int) -> bool:
        """Count one more for ``key`` unless it holds ``limit`` already (under the lock)."""
        with self._lock:
            if counts.get(key, 0) >= limit:
                return False
            counts[key] = counts.get(key, 0) + 1
            return True

    def _uncount_one(self, counts: dict[str, int], key: str) -> None:
        """Undo one :meth:`_count_one`; a key counted down to none is dropped, so that the
        dicts hold only what is open (a source or a peer seen once is not kept for good)."""
        with self._lock:
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]

    def _admit(self, peer: Peer, listed: bool, release: list[Callable[[], None]]) -> bool:
        if not listed:
            pool = self._strangers
        else:
            pool = self._slots if peer.fingerprint is not None else self._local_slots
        if not pool.acquire(blocking=False):
            self._note(logging.WARNING, "listed-no-slot" if listed else "unlisted-no-slot",
                       f"refusing a connection of {peer.describe()}: no free slot")
            return False
        release.append(pool.release)
        if not listed:
            return True
        key = peer.describe()
        most = MAX_PER_PEER if frame_limit(self.agent.policy, peer) == protocol.MAX_FRAME else (
            MAX_PER_SMALL_PEER)
        if not self._count_one(self._per_peer, key, most):
            self._note(logging.WARNING, "per-peer",
                       f"refusing a connection of {key}: {most} open")
            return False
        release.append(functools.partial(self._uncount_one, self._per_peer, key))
        return True

    def _requests(self, conn: socket.socket, peer: Peer, listed: bool) -> None:
        """Answer ``peer``'s requests in order; an unlisted peer's first one only. A frame
        longer than the peer may send (MAX_STRANGER_FRAME if the policy does not name it, else
        :func:`frame_limit`) is refused without reading (let alone parsing) it. Both are
        decided for each frame by the policy as it is then (it may have been reloaded): a peer
        ``listed`` when it connected that the policy no longer names is an unlisted peer from
        its next frame on, and its idle connection is closed."""
        while not self._stopping.is_set():
            header = self._await_header(conn, peer, listed)
            if header is None:
                return
            # Its length as announced, checked against what this peer may send below: one
            # over protocol.MAX_FRAME, too, is a refusal recorded as every other is (it was
            # answered as a format error, and the audit log had no record of it: review).
            length = protocol.HEADER.unpack(header)[0]
            limit = frame_limit(self.agent.policy, peer) if listed else None
            if limit is None:  # unlisted, or no longer listed: this request is its last
                listed, limit = False, MAX_STRANGER_FRAME
            if length > limit:
                refusal = self.agent.refuse_unread(peer, length, limit)
                conn.settimeout(BODY_TIMEOUT)
                conn.sendall(protocol.frame(protocol.failed(0, refusal)))
                return
            deadline = time.monotonic() + BODY_TIMEOUT
            body = _recv_exact(conn, length, deadline) if length else b""
            if body is None:
                raise ConnectionError("connection closed in the middle of a frame")
            conn.settimeout(BODY_TIMEOUT)
            conn.sendall(protocol.frame(self._answer(peer, body)))
            if not listed:
                return

    def _await_header(self, conn: socket.socket, peer: Peer, listed: bool) -> bytes | None:
        """The next frame's header, or None if the connection ended cleanly or stayed idle
        too long (IDLE_TIMEOUT for a listed peer, BODY_TIMEOUT for another: a client
        reconnects when it needs to). While a listed peer's connection is idle, the policy is
        looked at every POLICY_RECHECK seconds: one it no longer names is closed, so it does
        not hold a listed slot. Once a header began, all of it must come within BODY_TIMEOUT."""
        deadline = time.monotonic() + (IDLE_TIMEOUT if listed else BODY_TIMEOUT)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return None
            conn.settimeout(min(remaining, POLICY_RECHECK) if listed else remaining)
            try:
                first = conn.recv(protocol.HEADER_SIZE)
            except TimeoutError:
                if listed and self.agent.policy.client_name(peer) is None:
                    self._note(logging.INFO, "dropped",
                               f"closing an idle connection of {peer.describe()}: no longer "
                               "in the policy")
                    return None
                continue
            break
        if not first:
            return None
        rest = protocol.HEADER_SIZE - len(first)
        more = _recv_exact(conn, rest, time.monotonic() + BODY_TIMEOUT) if rest else b""
        if more is None:
            raise ConnectionError("connection closed in the middle of a frame")
        return first + more

    def _answer(self, peer: Peer, body: bytes) -> dict[str, object]:
        try:
            request = protocol.Request.parse(body)
        except KmsfsError as exc:
            self.agent.record_malformed(peer, exc)
            return protocol.failed(protocol.request_id_of(body), exc)
        try:
            return protocol.ok(request.id, self.agent.handle(peer, request))
        except KmsfsError as exc:
            return protocol.failed(request.id, exc)
        except Exception:
            log.exception("internal error in %s", request.op)
            return protocol.failed(request.id, KmsfsError("internal error in the agent"))


def systemd_listeners() -> list[socket.socket]:
    """Stream sockets passed by systemd socket activation ($LISTEN_FDS), in order.

    Anything but a listening stream socket is refused: the agent speaks a stream protocol, and
    serving a datagram or a connected socket would fail in ways far from the cause."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    sockets = []
    for fd in range(3, 3 + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or sock.family not in (
            socket.AF_UNIX, socket.AF_INET, socket.AF_INET6
        ):
            raise UsageError(f"systemd passed fd {fd}, which is not a stream socket")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise UsageError(f"systemd passed fd {fd}, which is not listening")
        sockets.append(sock)
    return sockets


def is_tcp(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


StopHook = Callable[[], None]


def _source_address(conn: socket.socket) -> str:
    """The peer's IP address (without the port), or the socket family's name if it has none."""
    try:
        peer = conn.getpeername()
    except OSError:
        return "unknown"
    return str(peer[0]) if isinstance(peer, tuple) else "local"
