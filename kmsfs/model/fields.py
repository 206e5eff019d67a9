"""Typed access to fields of a parsed document, with errors that name the field.

Every ``from_dict`` goes through these so a malformed document fails with one clear line
("trust: field 'quorum': want int, have str") instead of a KeyError or TypeError traceback.
"""

import re
from typing import Any

from kmsfs.errors import BadVersionError, FormatError

HEX_ID = re.compile(r"[0-9a-f]{64}")
#: ``created`` of every document: UTC to the second, as kmsfs writes it (utc_now).
TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")


def obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise FormatError(f"{what}: want an object, have {type(value).__name__}")
    return value


def exact_keys(data: dict[str, Any], keys: set[str], what: str) -> None:
    """Refuse missing and unknown fields: an unknown field could carry unverified meaning."""
    have = set(data)
    if have != keys:
        missing = sorted(keys - have)
        extra = sorted(have - keys)
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(extra)}" if extra else "",
            )
            if part
        )
        raise FormatError(f"{what}: {detail}")


def string(data: dict[str, Any], key: str, what: str) -> str:
    value = data.get(key)
    if not isinstance(value, str):
        raise FormatError(f"{what}: field {key!r}: want str, have {type(value).__name__}")
    return value


def integer(data: dict[str, Any], key: str, what: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{what}: field {key!r}: want int, have {type(value).__name__}")
    return value


def boolean(data: dict[str, Any], key: str, what: str) -> bool:
    value = data.get(key)
    if not isinstance(value, bool):
        raise FormatError(f"{what}: field {key!r}: want bool, have {type(value).__name__}")
    return value


def array(data: dict[str, Any], key: str, what: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise FormatError(f"{what}: field {key!r}: want list, have {type(value).__name__}")
    return value


def hex_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not HEX_ID.fullmatch(value):
        raise FormatError(f"{what}: want a 64-digit lowercase hex id, have {value!r:.80}")
    return value


def timestamp(value: Any, what: str) -> str:
    """A ``created`` time, ``YYYY-MM-DDTHH:MM:SSZ``. Nothing else: the field is printed
    (``trust show``, ``hsm list``) above what an operator checks before signing, so free text
    there could draw fake lines over the real ones (a newline, a terminal escape that hides
    what follows)."""
    if not isinstance(value, str) or not TIMESTAMP.fullmatch(value):
        raise FormatError(f"{what}: want a time as YYYY-MM-DDTHH:MM:SSZ, have {value!r:.40}")
    return value


def type_and_format(data: dict[str, Any], type_name: str, version: int) -> None:
    """Check ``_type`` and ``format`` first, so a wrong document says so plainly."""
    have_type = data.get("_type")
    if have_type != type_name:
        raise FormatError(f"want a {type_name} document, have _type {have_type!r:.40}")
    have_version = data.get("format")
    if type(have_version) is not int or have_version != version:
        raise BadVersionError(f"{type_name}: format want {version}, have {have_version!r:.20}")
