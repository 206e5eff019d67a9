"""The plaintext path of a ciphertext path, for the reports of offline jobs.

A user knows their files by plaintext path: a report that names only ``yoyDT7lHo6T.../frUe...``
sends them to decrypt names by hand. fsck finds plaintext paths as it walks; a job that meets
a file some other way (``kmsfs reencrypt``'s failures) asks here, once per failure.
"""

from __future__ import annotations

import os

from kmsfs.crypto.names import VolumeNames
from kmsfs.errors import IntegrityError
from kmsfs.fs.names import read_dir_iv, sidecar_of


def plain_path(root: bytes, rel: bytes, names: VolumeNames) -> str | None:
    """``/``-rooted plaintext path of *rel* (a ciphertext path relative to the volume's root
    *root*), or None if a name on the way does not decrypt or cannot be read."""
    plain: list[str] = []
    cdir = root
    for disk in filter(None, rel.split(b"/")):
        here = cdir

        def read_sidecar(here: bytes = here, disk: bytes = disk) -> str:
            return sidecar_of(here, os.fsdecode(disk))

        try:
            name = names.decrypt_from_disk(read_dir_iv(here), os.fsdecode(disk), read_sidecar)
        except (OSError, IntegrityError, UnicodeDecodeError):
            return None
        plain.append(os.fsdecode(name))
        cdir = here + b"/" + disk
    return "/" + "/".join(plain)
