"""A volume's symlink and xattr ciphers, keyed by the Domain's ``mk`` epochs.

Symlink targets and ``user.*`` xattr values are sealed at the Domain's current epoch, which
their nonce names (:mod:`kmsfs.crypto.epoch_nonces`), so an HSM removed before a rotation cannot
read new ones, and ``kmsfs reencrypt`` moves old ones; xattr names stay keyed with epoch 1 (a
lookup must find a name without knowing its epoch: docs/format.md, "Key epochs"). Each epoch's
key is derived in the HSM once, when first needed. A target or value of a retired epoch is
refused (EIO), as a file's contents are: whoever still holds that epoch's ``mk`` could have
sealed it. (Names of a retired epoch are not: :func:`kmsfs.fs.names.names_of_volume`; but no
new name is made in a directory of one: :func:`check_new_name`.) A
volume made before ``SymlinkXattrEpochs`` had all of them at epoch 1: on a Domain that retired
epoch 1 since, they read EIO until ``kmsfs reencrypt --upgrade`` moves them, the one run that
reads retired ones (*read_retired*), on such a volume only (one with the flag has no genuine
one to move).
"""

from __future__ import annotations

from collections.abc import Callable

from kmsfs.crypto.names import epoch_of
from kmsfs.crypto.symlinks import SYMLINK_KEY_INFO, SymlinkCipher
from kmsfs.crypto.xattrs import XATTR_KEY_INFO, XattrCipher
from kmsfs.errors import IntegrityError
from kmsfs.keys import FIRST_EPOCH, KeyDeriver


def retired_below(deriver: KeyDeriver) -> int:
    """The epochs below which the deriver refuses file keys (1 where it retires none)."""
    return int(getattr(deriver, "retired_below", FIRST_EPOCH))


def writing_epoch(deriver: KeyDeriver, what: str) -> int:
    """The epoch new names, targets and values are keyed with: the Domain's current one,
    which a mount following its Domain's rotations moves. IntegrityError (EIO) if that epoch
    is retired (a mount not yet moved to the generation that retired it): what it wrote would
    be the retired HSM's to read, as a new file's contents would, which are refused too.
    *what* ends the error's message ("no new directory")."""
    epoch = int(deriver.current_epoch)
    below = retired_below(deriver)
    if epoch < below:
        raise IntegrityError(
            f"key epoch {epoch} is retired (epochs below {below}): {what} until this mount "
            "serves a newer generation of its Domain"
        )
    return epoch


def check_new_name(deriver: KeyDeriver, dir_iv: bytes) -> None:
    """IntegrityError (EIO) if no new name may be made in the directory whose ``kmsfs.diriv``
    is *dir_iv*: its names are keyed with a retired epoch (the deriver's ``retired_below``, read
    at each call: a mount takes in a retirement while it serves). Such a directory is one
    ``kmsfs reencrypt`` did not reach before the retirement, or one whose ``kmsfs.diriv`` a
    writer of the ciphertext rolled back (the epoch field dropped: no key needed); a name made
    there would be the retired HSM's to read. Its names still read, and can be removed or
    renamed away (:func:`kmsfs.fs.names.names_of_volume`). Cheap: the epoch comes from the
    cached IV bytes."""
    epoch = epoch_of(dir_iv)
    below = retired_below(deriver)
    if epoch < below:
        raise IntegrityError(
            f"its names are keyed with mk epoch {epoch}, which is retired (epochs below "
            f"{below}; a directory 'kmsfs reencrypt' missed, or its kmsfs.diriv rolled back): "
            "no new name there until 'kmsfs reencrypt' moves its names to the current epoch"
        )


def links_of_volume(deriver: KeyDeriver, read_retired: bool = False) -> SymlinkCipher:
    """Symlink targets of every epoch but the retired ones (all, with *read_retired*); new
    ones at :func:`writing_epoch`."""
    return SymlinkCipher.of_volume(
        lambda epoch: deriver.derive(SYMLINK_KEY_INFO, epoch=epoch),
        lambda: writing_epoch(deriver, "no new symlink"),
        lambda: int(deriver.current_epoch),
        _refused_below(deriver, read_retired),
    )


def xattrs_of_volume(deriver: KeyDeriver, read_retired: bool = False) -> XattrCipher:
    """Xattr values of every epoch but the retired ones (all, with *read_retired*; names:
    epoch 1); new values at :func:`writing_epoch`."""
    return XattrCipher.of_volume(
        lambda epoch: deriver.derive(XATTR_KEY_INFO, epoch=epoch),
        lambda: writing_epoch(deriver, "no xattr is set"),
        lambda: int(deriver.current_epoch),
        _refused_below(deriver, read_retired),
    )


def _refused_below(deriver: KeyDeriver, read_retired: bool) -> Callable[[], int]:
    if read_retired:
        return lambda: FIRST_EPOCH
    return lambda: retired_below(deriver)
