"""Strict base64url (RFC 4648 section 5, no padding) and the SHA-256 names built on it.

Names and symlink targets are stored as base64url text. Python's decoder is lenient (it accepts
padding, the ``+/`` alphabet and non-canonical trailing bits), which would give one ciphertext
several spellings on disk; a deterministic name scheme must have exactly one. So decoding here
accepts only the canonical encoding: the text must be what :func:`b64url_encode` would produce.

See docs/format.md, section "Encodings".
"""

import base64
import binascii
import hashlib

SHA256_B64URL_CHARS = 43
"""Length of :func:`sha256_b64url`: 32 bytes in unpadded base64url."""
SHA256_B64URL_PATTERN = f"[A-Za-z0-9_-]{{{SHA256_B64URL_CHARS}}}"
"""Regular expression matching one :func:`sha256_b64url` value."""

_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
URLSAFE_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_VALUES = {c: i for i, c in enumerate(URLSAFE_ALPHABET)}
#: Bits of the last character that carry no data, by ``len(text) % 4``: they must be zero.
_SPARE_BITS = {0: 0, 2: 0x0F, 3: 0x03}


def b64url_encode(data: bytes) -> str:
    """Encode ``data`` as base64url without ``=`` padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode canonical unpadded base64url; raise ValueError for anything else.

    Canonical: only the url-safe alphabet, no padding, a length that a byte string can have,
    and zero spare bits in the last character (so no other text decodes to the same bytes).
    Checked directly rather than by re-encoding: this runs for every name a listing shows.
    """
    raw = text.encode("ascii", "replace")  # a non-ASCII character becomes "?": refused below
    spare = _SPARE_BITS.get(len(raw) % 4)
    if spare is None or b"+" in raw or b"/" in raw or b"=" in raw:
        raise ValueError("not canonical unpadded base64url")
    if spare and _VALUES.get(raw[-1], 0) & spare:
        raise ValueError("not canonical unpadded base64url")
    try:  # strict: any character outside the alphabet (or "=") is an error
        return binascii.a2b_base64(
            raw.translate(_TO_STANDARD) + b"=" * (-len(raw) % 4), strict_mode=True
        )
    except binascii.Error:
        raise ValueError("not canonical unpadded base64url") from None


def sha256_b64url(text: str) -> str:
    """Return base64url(SHA-256(text as ASCII)): 43 characters, used to name long entries."""
    return b64url_encode(hashlib.sha256(text.encode("ascii")).digest())
