"""Strict base64url (RFC 4648 section 5, no padding) and the SHA-256 names built on it.

Names and symlink targets are stored as base64url text. Python's decoder is lenient (it accepts
padding, the ``+/`` alphabet and non-canonical trailing bits), which would give one ciphertext
several spellings on disk; a deterministic name scheme must have exactly one. So decoding here
accepts only the canonical encoding: the text must be what :func:`b64url_encode` would produce.

See docs/format.md, section "Encodings".
"""

import base64
import hashlib
import re

_ALPHABET = re.compile(r"[A-Za-z0-9_-]*")

SHA256_B64URL_CHARS = 43
"""Length of :func:`sha256_b64url`: 32 bytes in unpadded base64url."""
SHA256_B64URL_PATTERN = f"[A-Za-z0-9_-]{{{SHA256_B64URL_CHARS}}}"
"""Regular expression matching one :func:`sha256_b64url` value."""


def b64url_encode(data: bytes) -> str:
    """Encode ``data`` as base64url without ``=`` padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode canonical unpadded base64url; raise ValueError for anything else."""
    if not _ALPHABET.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not canonical unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("not canonical unpadded base64url")
    return data


def sha256_b64url(text: str) -> str:
    """Return base64url(SHA-256(text as ASCII)): 43 characters, used to name long entries."""
    return b64url_encode(hashlib.sha256(text.encode("ascii")).digest())
