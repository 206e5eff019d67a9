"""The one canonical encoding of kmsfs documents: the bytes that are hashed and signed.

Canonical JSON: UTF-8, keys sorted, no insignificant whitespace, ASCII only (non-ASCII escaped),
and only the JSON types that have one spelling (strings, integers, booleans, null, lists,
objects). Floats are refused because their text form is not unique. Binary values travel as
standard base64 with padding. The same document gives the same bytes on every machine, so a
document's id (its SHA-256) and its signatures can be re-checked anywhere.
"""

import base64
import binascii
import hashlib
import json
from typing import Any

from kmsfs.errors import FormatError

_MAX_DEPTH = 16
MAX_INTEGER = 2**63 - 1


def _check(value: Any, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        raise FormatError("document nests too deeply")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not -MAX_INTEGER <= value <= MAX_INTEGER:
            raise FormatError("an integer in the document is out of range")
        return
    if isinstance(value, list):
        for item in value:
            _check(item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise FormatError(f"document key {key!r} is not a string")
            _check(item, depth + 1)
        return
    raise FormatError(f"a {type(value).__name__} has no canonical encoding")


def canonical_bytes(value: Any) -> bytes:
    """Encode ``value`` canonically; raise FormatError for values with no single spelling."""
    _check(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def digest(value: Any) -> str:
    """Hex SHA-256 of the canonical encoding: the content address of a document."""
    return hashlib.sha256(canonical_bytes(value)).hexdigest()


def _reject_constant(name: str) -> Any:
    raise FormatError(f"{name} is not valid in a kmsfs document")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise FormatError(f"duplicate key {key!r}")
        result[key] = value
    return result


def parse_json(data: bytes) -> Any:
    """Parse a document strictly: UTF-8, no duplicate keys, no NaN/Infinity, no floats."""
    try:
        text = data.decode("utf-8")
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_float=lambda s: _reject_constant(f"the number {s}"),
        )
    except UnicodeDecodeError as exc:
        raise FormatError("not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise FormatError(f"not JSON ({_where_not_json(exc)})") from exc
    except RecursionError as exc:
        raise FormatError("document nests too deeply") from exc
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise FormatError(f"not a valid document ({type(exc).__name__})") from exc
    _check(value)
    return value


def _where_not_json(exc: json.JSONDecodeError) -> str:
    """"<what> at line L column C". Some of json's messages end in "at" already, to be
    followed by the position ("Unterminated string starting at"): that one is not doubled."""
    what = exc.msg.removesuffix(" at")
    return f"{what} at line {exc.lineno} column {exc.colno}"


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: Any, what: str) -> bytes:
    """Decode strict base64 (canonical form only), naming ``what`` in the error."""
    if not isinstance(text, str):
        raise FormatError(f"{what}: want base64 text, have {type(text).__name__}")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise FormatError(f"{what}: not base64") from exc
    if base64.b64encode(data).decode("ascii") != text:
        raise FormatError(f"{what}: base64 is not in canonical form")
    return data
