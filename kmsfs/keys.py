"""The seam between key management and the filesystem.

The filesystem never sees a master key. It holds a :class:`KeyDeriver` whose ``derive`` runs
HMAC-SHA256 keyed by the Domain's master key inside an HSM (or, later, inside the HSM agent) and
returns 32 bytes. Tests of the pure core may use a software stand-in; integration tests use real
SoftHSM tokens.
"""

from typing import Protocol

DERIVED_KEY_SIZE = 32


class KeyDeriver(Protocol):
    """Derives per-purpose keys from a Domain's master key without ever exposing it."""

    def derive(self, info: bytes) -> bytes:
        """Return HMAC-SHA256(mk, info): 32 bytes, the same on every HSM of the Domain's Trust."""
        ...
