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
"""

from __future__ import annotations

import contextlib
import fcntl
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
from kmsfs.agent.policy import Peer
from kmsfs.agent.service import Agent
from kmsfs.errors import KmsfsError, UsageError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256  # connections of peers the policy names
MAX_PER_PEER = 64  # ... of which one identity (uid, certificate) may hold
MAX_STRANGERS = 16  # connections of peers it does not name: one refused request each
#: Bytes of a frame of a peer the policy does not name that are read and parsed. An honest
#: request it can be refused for (hello, health, a derive of a few infos, a small create-domain)
#: fits, so its refusal names the operation; a longer one is refused from its header alone.
MAX_STRANGER_FRAME = 4096
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
    others without the sticky bit, or owned by another user than the agent's or root): clients
    would then reach their program and take its answers for keys."""
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise UsageError(f"{directory}: cannot use for the socket: {exc.strerror}") from None
    others_write = st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
    if others_write or st.st_uid not in (0, os.geteuid()):
        raise UsageError(
            f"{directory}: other users may replace files in it (mode "
            f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}); put the socket in a "
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
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._strangers = threading.BoundedSemaphore(MAX_STRANGERS)
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._handshakes_from: dict[str, int] = {}  # source address -> handshakes in progress
        self._per_peer: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()

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

    def _accept_loop(self, listener: socket.socket) -> None:
        is_tls = listener.fileno() in self._tls_fds
        listener.settimeout(ACCEPT_POLL)
        failures = 0
        while not self._stopping.is_set():
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
        try:
            if is_tls:
                conn = self._handshake(conn)
                peer = peer_of_tls(conn)  # type: ignore[arg-type]
            else:
                peer = peer_of_unix(conn)
            listed = self.agent.policy.client_name(peer) is not None
            if not self._admit(peer, listed, release):
                return
            log.debug("connection from %s", peer.describe())
            self._requests(conn, peer, listed=listed)
        except (OSError, ssl.SSLError, ConnectionError) as exc:
            if not self._stopping.is_set():
                log.info("connection ended: %s", exc)
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

    def _handshake(self, conn: socket.socket) -> socket.socket:
        assert self._tls is not None
        address = _source_address(conn)
        with self._lock:
            if self._handshakes_from.get(address, 0) >= MAX_HANDSHAKES_PER_ADDRESS:
                log.warning("refusing a TLS connection from %s: handshakes in progress", address)
                raise ConnectionError(f"{address}: too many TLS handshakes in progress")
            self._handshakes_from[address] = self._handshakes_from.get(address, 0) + 1
        try:
            if not self._handshakes.acquire(blocking=False):
                log.warning("refusing a TLS connection: %d handshakes in progress", MAX_HANDSHAKES)
                raise ConnectionError(f"{MAX_HANDSHAKES} TLS handshakes in progress, refused")
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT)
                tls_conn = self._tls.wrap_socket(conn, server_side=True)
            finally:
                self._handshakes.release()
        finally:
            with self._lock:
                left = self._handshakes_from[address] - 1
                if left:
                    self._handshakes_from[address] = left
                else:
                    del self._handshakes_from[address]
        with self._lock:
            self._connections.add(tls_conn)
        return tls_conn

    def _admit(self, peer: Peer, listed: bool, release: list[Callable[[], None]]) -> bool:
        pool = self._slots if listed else self._strangers
        if not pool.acquire(blocking=False):
            log.warning("refusing a connection of %s: no free slot", peer.describe())
            return False
        release.append(pool.release)
        if not listed:
            return True
        key = peer.describe()
        with self._lock:
            if self._per_peer.get(key, 0) >= MAX_PER_PEER:
                log.warning("refusing a connection of %s: %d open", key, MAX_PER_PEER)
                return False
            self._per_peer[key] = self._per_peer.get(key, 0) + 1

        def leave() -> None:
            with self._lock:
                self._per_peer[key] -= 1
                if not self._per_peer[key]:
                    del self._per_peer[key]

        release.append(leave)
        return True

    def _requests(self, conn: socket.socket, peer: Peer, listed: bool) -> None:
        """Answer ``peer``'s requests in order; an unlisted peer's first one only, and a frame
        of it over MAX_STRANGER_FRAME is refused without reading (let alone parsing) it."""
        idle = IDLE_TIMEOUT if listed else BODY_TIMEOUT
        while not self._stopping.is_set():
            try:
                header = _recv_exact(conn, protocol.HEADER_SIZE, time.monotonic() + idle)
            except TimeoutError:
                return  # an idle connection is closed; a client reconnects when it needs to
            if header is None:
                return
            try:
                length = protocol.frame_length(header)
            except protocol.ProtocolError as exc:
                conn.sendall(protocol.frame(protocol.failed(0, exc)))
                return
            if not listed and length > MAX_STRANGER_FRAME:
                refusal = self.agent.refuse_unread(peer, length)
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
