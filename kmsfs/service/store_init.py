"""``init``: a new store with its embedded HSMs and the genesis Trust.

All or nothing: if anything fails, what was created is removed again, so a failed init leaves
the directory as it was (missing, or empty).
"""

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

from kmsfs.errors import StoreError, UsageError
from kmsfs.model.trust import SealedTrust
from kmsfs.model.verify import Anchor
from kmsfs.service import hsms, trusts
from kmsfs.service.context import Context

MAX_INITIAL_HSMS = 16


def init_store(
    root: Path,
    hsm_count: int = 2,
    step: Callable[[str], None] | None = None,
    parents_mode: int | None = None,
) -> SealedTrust:
    """``step`` (if given) is told what starts next ("HSM 3 of 16", "genesis trust"): creating
    an HSM takes about a second, so a big init would otherwise look stuck. *parents_mode*: for
    the tool's default path only, make its missing parents (:meth:`Store.make_root`)."""
    say = step or (lambda what: None)
    if not 1 <= hsm_count <= MAX_INITIAL_HSMS:
        raise UsageError(f"--hsms must be between 1 and {MAX_INITIAL_HSMS}")
    root = Path(root)
    existed = root.exists()
    if existed and (not root.is_dir() or any(root.iterdir())):
        if (root / "store.json").exists():
            raise StoreError(f"{root} is a kmsfs store already")
        raise StoreError(f"{root} exists and is not an empty directory")
    ctx = Context.at(root)
    # refuses a missing parent of a path given (a mistyped --store): nothing to undo then
    made = ctx.store.make_root(parents_mode)
    try:
        records = []
        for number in range(1, hsm_count + 1):
            say(f"HSM {number} of {hsm_count}")
            records.append(hsms.create_hsm(ctx))
        say("genesis trust")
        genesis = trusts.genesis(ctx, records)
        # The head of the store's line of Trusts starts at the genesis (trusts.line).
        ctx.store.set_head(genesis.id, expect=None)
        ctx.store.write_config(Anchor(genesis.id), new=True)  # last: no store.json, no store
        return genesis
    except BaseException:
        if existed:
            for child in root.iterdir():
                shutil.rmtree(
                    child
                ) if child.is_dir() and not child.is_symlink() else child.unlink()
        else:
            shutil.rmtree(root, ignore_errors=True)
        for directory in reversed(made):  # the default path's parents this init made
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
