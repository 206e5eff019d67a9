"""The wire protocol between ``kmsfs-hsmd`` and its clients: framed canonical JSON.

A frame is a 4-byte big-endian length followed by that many bytes of canonical JSON (the same
strict parser as every kmsfs document: no duplicate keys, no floats). A frame larger than
:data:`MAX_FRAME` is refused before it is read, so a client cannot make the agent allocate
without bound.

Requests:  ``{"v": 1, "id": N, "op": "derive", "args": {...}}``
Responses: ``{"id": N, "ok": true, "result": {...}}`` or
           ``{"id": N, "ok": false, "error": {"code": "refused", "message": "..."}}``

Error codes name a class of :mod:`kmsfs.errors`, so a client re-raises the agent's refusal as
the same kind of error it would have met in-process, and the CLIs give the same exit code.
Binary values (key derivation info, derived keys, bundles) travel as base64.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from kmsfs.errors import (
    AgentRefusedError,
    ChainError,
    FormatError,
    HsmError,
    HsmUnavailableError,
    IntegrityError,
    KmsfsError,
    NotFoundError,
    PinError,
    QuorumNotMetError,
    StoreError,
    UsageError,
)
from kmsfs.model import fields
from kmsfs.model.canonical import canonical_bytes, parse_json

VERSION = 1
MAX_FRAME = 2 * 1024 * 1024  # bounds what one connection makes the agent hold in memory
MAX_BATCH = 1024  # infos per derive request
MAX_INFO = 256  # bytes of one key derivation info (kmsfs's own are under 64)
HEADER = struct.Struct(">I")
"""A frame's header: its body's length, big-endian, 4 bytes."""

# Most specific first: the first class an error is an instance of gives its code.
_CODES: tuple[tuple[str, type[KmsfsError]], ...] = (
    ("refused", AgentRefusedError),
    ("quorum", QuorumNotMetError),
    ("chain", ChainError),
    ("verification", IntegrityError),
    ("pin", PinError),
    ("hsm-unavailable", HsmUnavailableError),
    ("hsm", HsmError),
    ("not-found", NotFoundError),
    ("store", StoreError),
    ("usage", UsageError),
    ("format", FormatError),
    ("error", KmsfsError),
)
_CLASS_OF = dict(_CODES)


class ProtocolError(FormatError):
    """A frame or message that does not follow this protocol."""


def error_code(exc: KmsfsError) -> str:
    for code, cls in _CODES:
        if isinstance(exc, cls):
            return code
    return "error"


def printable(text: str, limit: int | None = None) -> str:
    """``text`` with control characters escaped, cut to ``limit`` characters (if given): what
    the other side controls (an operation name, an echoed value, an error message) never
    forges audit rows or table lines, nor drives a terminal."""
    cut = text if limit is None else text[:limit]
    clean = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut
    )
    if limit is not None and len(text) > limit:
        clean += f"... ({len(text)} characters)"
    return clean


def error_from(code: str, message: str) -> KmsfsError:
    """The local error for an agent's error response (unknown codes become KmsfsError)."""
    return _CLASS_OF.get(code, KmsfsError)(message)


def frame(message: dict[str, Any]) -> bytes:
    body = canonical_bytes(message)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return int(length)


HEADER_SIZE = HEADER.size


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"v": VERSION, "id": self.id, "op": self.op, "args": self.args}

    @classmethod
    def parse(cls, body: bytes) -> Request:
        data = fields.obj(parse_json(body), "request")
        fields.exact_keys(data, {"v", "id", "op", "args"}, "request")
        version = fields.integer(data, "v", "request")
        if version != VERSION:
            raise ProtocolError(f"request: protocol version {version} (this agent speaks 1)")
        return cls(
            id=fields.integer(data, "id", "request"),
            op=fields.string(data, "op", "request"),
            args=fields.obj(data["args"], "request.args"),
        )


def request_id_of(body: bytes) -> int:
    """The id of a request that failed to parse, if it can be found (else 0)."""
    try:
        data = parse_json(body)
    except KmsfsError:
        return 0
    if isinstance(data, dict) and isinstance(data.get("id"), int) and not isinstance(
        data.get("id"), bool
    ):
        return int(data["id"])
    return 0


def ok(request_id: int, result: dict[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


MAX_MESSAGE = 1024  # characters of an error message sent back


def failed(request_id: int, exc: KmsfsError) -> dict[str, Any]:
    """An error answer; the message is cut to MAX_MESSAGE so it always fits in a frame (it
    may echo what the client sent)."""
    message = str(exc)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + f"... ({len(message)} characters)"
    return {
        "id": request_id,
        "ok": False,
        "error": {"code": error_code(exc), "message": message},
    }


def parse_response(body: bytes, want_id: int) -> dict[str, Any]:
    """The result of a response, or the agent's error raised as the matching local error.

    An error with id 0 answers the request in flight too: the agent sends it when it could not
    read the request's id (a malformed request, or a frame of a peer the policy does not name
    that it refused unread), and a client has one request in flight per connection."""
    data = fields.obj(parse_json(body), "response")
    if data.get("id") != want_id and not (data.get("id") == 0 and data.get("ok") is False):
        raise ProtocolError(f"response to request {data.get('id')!r}, want {want_id}")
    if data.get("ok") is True:
        fields.exact_keys(data, {"id", "ok", "result"}, "response")
        return fields.obj(data["result"], "response.result")
    fields.exact_keys(data, {"id", "ok", "error"}, "response")
    error = fields.obj(data["error"], "response.error")
    raise error_from(
        fields.string(error, "code", "response.error"),
        # escaped, not cut again: the agent cut it (MAX_MESSAGE) and said how long it was
        "agent: " + printable(fields.string(error, "message", "response.error")),
    )
