"""Whether someone else could replace what a directory holds: one definition for every place
kmsfs trusts a path it will use by name later (a volume as root, the agent's socket, a SoftHSM
config kept outside a read-only store)."""

from __future__ import annotations

import os
import stat
from collections.abc import Collection


def others_may_replace_in(st: os.stat_result, owners: Collection[int]) -> bool:
    """True if a user other than *owners* could rename or replace entries of the directory
    *st* describes: it belongs to someone else, or group or others may write it without the
    sticky bit (with it, as on /tmp, nobody renames what is not theirs)."""
    return st.st_uid not in owners or bool(
        st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX
    )
