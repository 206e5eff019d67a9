"""The client side of ``kmsfs-hsmd``: a connection, and a KeyDeriver that derives through it.

:class:`AgentDeriver` is the second implementation of :class:`kmsfs.keys.KeyDeriver` (the first
is the in-process PKCS#11 ``DomainKeys``): the filesystem cannot tell them apart. It reconnects
by itself when the agent restarts: a lost connection or a handle the new agent process does not
know is re-opened and the request sent again, once. With the agent down, ``derive`` raises
AgentUnavailableError (an HsmUnavailableError, so a mount answers EIO and logs why) and tries
again at most once a second; keys already derived stay with the open files that hold them,
except those of key epochs the Domain retires since: the agent says which in its answers, and
a mount asks it once a second (:meth:`AgentDeriver.follow_in_background`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsfs.agent import protocol
from kmsfs.errors import (
    AgentUnavailableError,
    FormatError,
    KmsfsError,
    NotFoundError,
    UsageError,
)
from kmsfs.keys import DERIVED_KEY_SIZE, FIRST_EPOCH
from kmsfs.model import fields
from kmsfs.model.canonical import b64decode, b64encode

CONNECT_TIMEOUT = 5.0
REPLY_TIMEOUT = 60.0  # an HSM operation (a Domain create) can take seconds, never minutes
ENV_CERT, ENV_KEY, ENV_CA = "KMSFS_AGENT_CERT", "KMSFS_AGENT_KEY", "KMSFS_AGENT_CA"

#: Seconds close() waits for the thread of follow_in_background to end.
CLOSE_WAIT = 2.0

log = logging.getLogger(__name__)


class _StatusUnknown(FormatError):
    """The agent does not know the domain-status request (it predates it)."""


@dataclass(frozen=True)
class AgentAddress:
    """Where the agent listens: a Unix socket path, or HOST:PORT with the client's TLS files."""

    path: Path | None = None
    host: str | None = None
    port: int | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @classmethod
    def parse(
        cls,
        text: str,
        cert: str | None = None,
        key: str | None = None,
        ca: str | None = None,
    ) -> AgentAddress:
        """``/run/kmsfs/hsmd.sock``, ``unix:PATH`` or ``HOST:PORT`` (TLS: cert, key and CA
        from the arguments or $KMSFS_AGENT_CERT, $KMSFS_AGENT_KEY, $KMSFS_AGENT_CA)."""
        if text.startswith("unix:"):
            return cls(path=Path(text[5:]))
        if "/" in text:
            return cls(path=Path(text))
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--agent {text!r}: want a socket path or HOST:PORT")
        cert = cert or os.environ.get(ENV_CERT)
        key = key or os.environ.get(ENV_KEY)
        ca = ca or os.environ.get(ENV_CA)
        if not (cert and key and ca):
            raise UsageError(
                f"--agent {text}: TCP is TLS only; give --agent-cert, --agent-key and "
                f"--agent-ca (or ${ENV_CERT}, ${ENV_KEY}, ${ENV_CA})"
            )
        return cls(
            host=host.strip("[]"), port=int(port), cert=Path(cert), key=Path(key), ca=Path(ca)
        )

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"{self.host}:{self.port}"

    def tls_context(self) -> ssl.SSLContext:
        """TLS 1.3, the agent's certificate checked against ``ca`` and the host name."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            context.load_verify_locations(cafile=self.ca)
            context.load_cert_chain(self.cert, self.key)  # type: ignore[arg-type]
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"agent TLS files: {exc}") from None
        return context


class AgentClient:
    """One connection to the agent, shared by threads (one request at a time)."""

    def __init__(self, address: AgentAddress) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._next_id = 1
        self._tls = address.tls_context() if address.host is not None else None

    def _connect(self) -> socket.socket:
        what = f"agent {self.address}"
        try:
            if self.address.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.settimeout(CONNECT_TIMEOUT)
                try:
                    sock.connect(str(self.address.path))
                    _check_agent_uid(sock, self.address.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                raw = socket.create_connection(
                    (self.address.host, self.address.port), timeout=CONNECT_TIMEOUT
                )
                assert self._tls is not None
                try:
                    sock = self._tls.wrap_socket(raw, server_hostname=self.address.host)
                except BaseException:
                    raw.close()
                    raise
        except ssl.SSLError as exc:
            raise AgentUnavailableError(f"{what}: TLS refused: {exc.reason or exc}") from None
        except OSError as exc:
            raise AgentUnavailableError(f"{what}: {exc.strerror or exc}") from None
        sock.settimeout(REPLY_TIMEOUT)
        return sock

    def _exchange(self, sock: socket.socket, request: protocol.Request) -> dict[str, Any]:
        sock.sendall(protocol.frame(request.to_dict()))
        header = _recv_exact(sock, protocol.HEADER_SIZE)
        body = _recv_exact(sock, protocol.frame_length(header))
        return protocol.parse_response(body, request.id)

    def call(self, op: str, args: dict[str, Any], *, retry: bool = True) -> dict[str, Any]:
        """Send one request; the agent's refusal raises the matching kmsfs error.

        ``retry``: after a lost connection (agent restarted), connect again and resend once.
        Only for requests that are safe to repeat.
        """
        with self._lock:
            request = protocol.Request(self._next_id, op, args)
            self._next_id += 1
            for attempt in (1, 2):
                fresh = self._sock is None
                if self._sock is None:
                    self._sock = self._connect()
                try:
                    return self._exchange(self._sock, request)
                except (OSError, ConnectionError, ssl.SSLError) as exc:
                    self._close_locked()
                    if attempt == 2 or not retry or fresh:  # only a stale connection retries
                        raise AgentUnavailableError(
                            f"agent {self.address}: connection lost ({_reason(exc)})"
                        ) from None
            raise AssertionError("unreachable")

    def _close_locked(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_agent_uid(sock: socket.socket, path: Path) -> None:
    """The process behind a Unix socket must be root or ourselves: anyone else could have
    put a socket at that path and would hand us keys of its choosing."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("iII"))
    _pid, uid, _gid = struct.unpack("iII", creds)
    if uid not in (0, os.getuid()):
        raise AgentUnavailableError(
            f"agent {path}: served by uid {uid}, not by root or by us; refusing to use it"
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):  # TLS 1.3: a refused client certificate shows up here
        return f"TLS refused: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        chunks += chunk
    return bytes(chunks)


class AgentDeriver:
    """A :class:`kmsfs.keys.KeyDeriver` whose keys come from the agent's HSMs."""

    RETRY_INTERVAL = 1.0
    #: Seconds between two domain-status requests of :meth:`follow_in_background`.
    FOLLOW_INTERVAL = 1.0

    def __init__(self, client: AgentClient, bundle: bytes) -> None:
        self.client = client
        self.bundle = bundle
        self.description: dict[str, Any] = {}
        self._handle: str | None = None
        self._lock = threading.Lock()
        self._next_attempt = 0.0
        self._last_problem = ""
        self._retired_below = FIRST_EPOCH
        self._opened_once = False  # an open-domain has answered (see _open_locked)
        self._retired_lock = threading.Lock()
        self._stop_following: threading.Event | None = None
        self._follower: threading.Thread | None = None
        #: (handle, the agent's newest_epoch) when _look opened the Domain again for being
        #: behind, and got that very handle back: not opened again until either changes.
        self._reopened: tuple[str, object] | None = None
        self._reopen_at = 0.0  # when _look may try to open the Domain again after a failure
        self._reopen_delay = 0.5  # doubled at each failure, up to 60 s

    def open(self) -> AgentDeriver:
        with self._lock:
            self._open_locked()
        return self

    def _open_locked(self) -> None:
        result = self.client.call("open-domain", {"bundle": b64encode(self.bundle)})
        self._handle = fields.hex_id(result.get("handle"), "open-domain.handle")
        self.description = result
        # What the first opening finds retired is where this deriver starts, as a Domain
        # opened in-process starts at its generation's: no news to log (every kmsfs command
        # through the agent printed it, long after the retirement). A later opening's is,
        # the one after a retirement closed the agent's handles above all (review).
        self._take_in(result, news=self._opened_once)
        self._opened_once = True

    @property
    def current_epoch(self) -> int:
        """The Domain's newest mk epoch, as the agent verified it when it opened the Domain."""
        epoch = self.description.get("current_epoch", FIRST_EPOCH)
        return epoch if isinstance(epoch, int) and epoch >= FIRST_EPOCH else FIRST_EPOCH

    @property
    def retired_below(self) -> int:
        """File keys of epochs below this are refused (1: none are), as the agent last said;
        never lowered. The filesystem then drops keys of those epochs that it derived before
        (``ContentKeys.refuses``: open files, keys derived ahead), as with an in-process
        ``DomainKeys``."""
        return self._retired_below

    def _take_in(self, result: dict[str, Any], news: bool = True) -> None:
        """Note the ``retired_below`` of an answer (open-domain, derive, domain-status); an
        agent that predates it sends none. A rise is logged as a warning if it is *news*
        (anything but the first open-domain's answer)."""
        below = result.get("retired_below")
        if not isinstance(below, int):
            return
        with self._retired_lock:
            if below <= self._retired_below:
                return
            self._retired_below = below
        name = self.description.get("name", "?")
        log.log(
            logging.WARNING if news else logging.DEBUG,
            "Domain %s: the agent retires key epochs below %d: files keyed with them are "
            "refused from now on%s", protocol.printable(str(name), 80), below,
            "; this mount's own epoch is among them: it opens the Domain's newest generation"
            if self.current_epoch < below else "",
        )

    def follow_in_background(self) -> None:
        """Ask the agent every :data:`FOLLOW_INTERVAL` seconds which key epochs the Domain
        retires (``domain-status``), from a daemon thread, until :meth:`close`: a mount
        (kmsfs.fs.cli) then refuses the keys it holds of a retired epoch within a second of
        the agent taking the retirement in, with no derivation needed. An agent that does not
        know the request is warned about once and not asked again."""
        if self._stop_following is not None:
            return
        stop = self._stop_following = threading.Event()
        self._follower = threading.Thread(
            target=self._follow, args=(stop,), name="kmsfs-follow-agent", daemon=True
        )
        self._follower.start()

    def _follow(self, stop: threading.Event) -> None:
        problem = ""
        while not stop.wait(self.FOLLOW_INTERVAL):
            try:
                self._look(stop)
            except _StatusUnknown as exc:
                log.warning(
                    "agent %s does not say which key epochs are retired (%s): this mount "
                    "learns of a retirement only from the agent's refusals; upgrade "
                    "kmsfs-hsmd", self.client.address, exc,
                )
                return
            except KmsfsError as exc:  # unavailable, refused by a reloaded policy, a store
                if str(exc) != problem:  # that does not read now: asked again next time
                    problem = str(exc)
                    log.warning("asking the agent which key epochs are retired: %s", exc)
                continue
            except Exception:  # never seen; the thread must not end with it
                log.exception("asking the agent which key epochs are retired failed")
                continue
            problem = ""

    def _look(self, stop: threading.Event) -> None:
        """One look: the agent's domain-status answer for the handle, taken in.

        A handle the agent no longer knows (it restarted, or it made a newer generation of the
        Domain, a rotation, a rewrap or a retirement, and closed the older ones) is replaced,
        as the next derive would replace it, and the open-domain answer tells the same. So is
        one whose generation is no longer the newest by its current epoch (a rotation made on
        the agent's store without the agent, which closes no handle), or whose own epoch is
        now retired: new files then get the newest generation's epoch at once, instead of the
        rotated one (which the HSM it was for can compute) or failing, until the mount starts
        again."""
        handle = self._handle
        if handle is None or stop.is_set():
            return  # the next derive opens the Domain, and its answer says
        try:
            result = self.client.call("domain-status", {"handle": handle})
        except NotFoundError:
            result = None
        except FormatError as exc:
            if "unknown operation" in str(exc):
                raise _StatusUnknown(str(exc)) from None
            raise
        newest: object = None
        if result is not None:
            self._take_in(result)
            newest = result.get("newest_epoch")
            behind = isinstance(newest, int) and newest > self.current_epoch
            if self._reopened == (handle, newest) or not (
                behind or self.current_epoch < self._retired_below
            ):
                return  # current (or opened already: the agent's newest is this one)
        if time.monotonic() < self._reopen_at:
            return  # the last try failed: again after 1, 2, 4... 60 s (each is audited)
        epoch = self.current_epoch
        with self._lock:
            if self._handle != handle or stop.is_set():
                return
            try:
                self._open_locked()
            except KmsfsError:
                self._reopen_delay = min(self._reopen_delay * 2, 60.0)
                self._reopen_at = time.monotonic() + self._reopen_delay
                raise
            if self._handle == handle:  # the agent's newest is this one after all: not
                self._reopened = (handle, newest)  # opened again until it says otherwise
            self._reopen_delay = 0.5
        if self.current_epoch != epoch:
            log.info("Domain %s: now serving generation %s: new files get key epoch %d",
                     protocol.printable(str(self.description.get("name", "?")), 80),
                     protocol.printable(str(self.description.get("generation", "?")), 20),
                     self.current_epoch)

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        return self.derive_many([info], epoch)[0]

    def derive_many(self, infos: Sequence[bytes], epoch: int | None = None) -> list[bytes]:
        """Keys for many infos in as few round trips as the batch limit allows."""
        keys: list[bytes] = []
        for start in range(0, len(infos), protocol.MAX_BATCH):
            keys.extend(self._derive_batch(infos[start : start + protocol.MAX_BATCH], epoch))
        return keys

    def _derive_batch(self, infos: Sequence[bytes], epoch: int | None) -> list[bytes]:
        with self._lock:
            if time.monotonic() < self._next_attempt:
                raise AgentUnavailableError(
                    f"{self._last_problem} (retrying every {self.RETRY_INTERVAL:g} s)"
                )
            try:
                return self._derive_locked(infos, epoch)
            except AgentUnavailableError as exc:
                self._next_attempt = time.monotonic() + self.RETRY_INTERVAL
                self._last_problem = str(exc)
                raise

    def _derive_locked(self, infos: Sequence[bytes], epoch: int | None) -> list[bytes]:
        args: dict[str, Any] = {"infos": [b64encode(i) for i in infos]}
        if epoch is not None:
            args["epoch"] = epoch
        for attempt in (1, 2):
            if self._handle is None:
                self._open_locked()
            try:
                result = self.client.call("derive", {"handle": self._handle, **args})
                break
            except NotFoundError:  # a restarted agent has not opened our Domain yet
                self._handle = None
                if attempt == 2:
                    raise
        raw = fields.array(result, "keys", "derive result")
        keys = [b64decode(k, "derive result key") for k in raw]
        if len(keys) != len(infos) or any(len(k) != DERIVED_KEY_SIZE for k in keys):
            raise FormatError("the agent answered a derive with keys of the wrong number or size")
        self._take_in(result)
        return keys

    def close(self) -> None:
        if self._stop_following is not None:
            self._stop_following.set()
        self.client.close()
        follower = self._follower
        if follower is not None and follower is not threading.current_thread():
            # A look that began before the stop may have connected again: wait for it (a
            # hung agent holds it up to REPLY_TIMEOUT; the mount does not wait that long).
            follower.join(CLOSE_WAIT)
            if not follower.is_alive():
                self.client.close()

    def __enter__(self) -> AgentDeriver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def open_domain(address: AgentAddress, bundle: bytes) -> Iterator[AgentDeriver]:
    """Connect, have the agent verify the bundle and open its keys, yield a deriver."""
    deriver = AgentDeriver(AgentClient(address), bundle).open()
    try:
        yield deriver
    finally:
        deriver.close()
