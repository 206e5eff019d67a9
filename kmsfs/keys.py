"""The seam between key management and the filesystem.

The filesystem never sees a master key. It holds a :class:`KeyDeriver` whose ``derive`` runs
HMAC-SHA256 keyed by one of the Domain's master keys inside an HSM (in-process through PKCS#11,
or through the HSM agent) and returns 32 bytes. Tests of the pure core may use a software
stand-in; integration tests use real SoftHSM tokens.

Key epochs: a Domain's ``mk`` is a list of epochs (1, 2, ...). Rotating ``mk`` adds an epoch
wrapped only by the current ``k``, so an HSM removed before the rotation can never compute the
new epoch's keys. New data is keyed by ``current_epoch``; data written earlier names the epoch
it was keyed with and is read with that epoch's key until it is re-encrypted.

Both derivers (in-process and the agent's) also offer ``derive_many(infos, epoch=None)``: the
keys of many infos in one call, which the file system uses to refill the keys it holds ready
for new files (one agent round trip, one HSM lock for them all). It is optional.

Retired epochs (``kmsfs-admin domain retire``): both also offer ``retired_below``, the epoch
below which their Domain now refuses file keys, raised while they serve, and
``follow_in_background()``, which a mount starts so that it rises within a second of a
retirement (the in-process deriver reads its store, the agent's asks the agent). The
filesystem then stops using keys of those epochs that it derived before
(``kmsfs.fs.files.ContentKeys.refuses``). Both are optional: a deriver without them retires
nothing while it serves.
"""

from typing import Protocol

DERIVED_KEY_SIZE = 32
FIRST_EPOCH = 1


class KeyDeriver(Protocol):
    """Derives per-purpose keys from a Domain's master keys without ever exposing them."""

    @property
    def current_epoch(self) -> int:
        """The newest ``mk`` epoch of the Domain: the one new data is keyed with."""
        ...

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        """HMAC-SHA256(mk of ``epoch``, info), 32 bytes, the same on every HSM of the Trust.

        ``epoch`` None means ``current_epoch``. An epoch the Domain does not have raises
        :class:`kmsfs.errors.IntegrityError` (the data names a key that does not exist)."""
        ...
