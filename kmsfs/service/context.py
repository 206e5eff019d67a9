"""What every service function works on: the store, its private area, and HSM sessions."""

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pkcs11

from kmsfs.errors import (
    FormatError,
    HsmError,
    HsmUnavailableError,
    KmsfsError,
    NotFoundError,
    PinError,
)
from kmsfs.hsm import keypairs, library
from kmsfs.model.records import HsmRecord
from kmsfs.store.documents import Store
from kmsfs.store.private import PrivateArea

log = logging.getLogger(__name__)


#: What :func:`default_store_path` gives, as --store's help says it.
STORE_DEFAULT = "$KMSFS_STORE, then /var/lib/kmsfs/store for root, else ~/.local/share/kmsfs/store"


def default_store_path() -> Path:
    """``$KMSFS_STORE``, else /var/lib/kmsfs/store for root, else ~/.local/share/kmsfs/store."""
    if os.environ.get("KMSFS_STORE"):
        return Path(os.environ["KMSFS_STORE"])
    if os.geteuid() == 0:
        return Path("/var/lib/kmsfs/store")
    return Path.home() / ".local" / "share" / "kmsfs" / "store"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Context:
    store: Store
    private: PrivateArea

    @classmethod
    def at(cls, root: Path) -> "Context":
        return cls(Store(root), PrivateArea(Path(root) / "private"))


@dataclass
class HsmSession:
    """An open session on one HSM, checked to hold the keys its record names."""

    record: HsmRecord
    session: "pkcs11.Session"

    def sign(self, message: bytes) -> bytes:
        with library.hsm_errors(f"HSM {self.record.label}"):
            return bytes(keypairs.sign(self.session, self.record.sign_key.scheme, message))


def open_one_hsm(
    ctx: Context, record: HsmRecord, stack: contextlib.ExitStack, rw: bool = False
) -> "pkcs11.Session":
    """A session on this one HSM, closed by ``stack``, checked to hold its record's keys;
    the error says why not (absent, PIN refused, other keys), for this HSM alone."""
    location, pin_source = ctx.private.access("hsm", record.id)
    if pin_source is None:
        raise PinError("no PIN source recorded")
    session = stack.enter_context(library.session(location, pin_source.read(), rw=rw))
    with library.hsm_errors(f"HSM {record.label}"):
        if keypairs.sign_public_key(session) != record.sign_key:
            raise HsmError("the token holds other keys than this HSM's record")
    return session


@contextlib.contextmanager
def open_hsm(ctx: Context, records: Sequence[HsmRecord], rw: bool = False) -> Iterator[HsmSession]:
    """Open the first HSM of ``records`` that answers: any HSM of a Trust serves.

    An HSM that is absent, refuses its PIN or holds other keys than its record is skipped with
    a warning; if none answers, HsmUnavailableError lists why for each, or PinError if every
    one refused its PIN (exit code 5, not 4: the HSMs are there, the PINs are wrong).
    """
    problems: list[tuple[str, KmsfsError]] = []  # (label, why)
    pin_refusals = 0
    for record in records:
        with contextlib.ExitStack() as stack:
            try:
                session = open_one_hsm(ctx, record, stack, rw)
            except (HsmError, NotFoundError, PinError, FormatError) as exc:  # next HSM
                problems.append((record.label, exc))
                pin_refusals += isinstance(exc, PinError)
                continue
            for label, why in problems:  # said once another HSM serves; otherwise in the error
                log.warning("HSM %s unavailable (%s); %s serves instead", label, why, record.label)
            yield HsmSession(record, session)
            return
    detail = "; ".join(f"{label}: {why}" for label, why in problems) or "no HSM given"
    if problems and pin_refusals == len(problems):
        raise PinError(f"no HSM could serve ({detail})")
    raise HsmUnavailableError(f"no HSM could serve ({detail})")
