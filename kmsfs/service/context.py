"""What every service function works on: the store, its private area, and HSM sessions."""

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pkcs11

from kmsfs.errors import FormatError, HsmError, HsmUnavailableError, NotFoundError, PinError
from kmsfs.hsm import keypairs, library
from kmsfs.model.records import HsmRecord
from kmsfs.store.documents import Store
from kmsfs.store.private import PrivateArea

log = logging.getLogger(__name__)


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


@contextlib.contextmanager
def open_hsm(ctx: Context, records: Sequence[HsmRecord], rw: bool = False) -> Iterator[HsmSession]:
    """Open the first HSM of ``records`` that answers: any HSM of a Trust serves.

    An HSM that is absent, refuses its PIN or holds other keys than its record is skipped with
    a warning; if none answers, HsmUnavailableError lists why for each, or PinError if every
    one refused its PIN (exit code 5, not 4: the HSMs are there, the PINs are wrong).
    """
    problems: list[str] = []
    pin_refusals = 0
    for record in records:
        with contextlib.ExitStack() as stack:
            try:
                location, pin_source = ctx.private.access("hsm", record.id)
                if pin_source is None:
                    raise PinError("no PIN source recorded")
                session = stack.enter_context(library.session(location, pin_source.read(), rw=rw))
                with library.hsm_errors(f"HSM {record.label}"):
                    if keypairs.sign_public_key(session) != record.sign_key:
                        raise HsmError("the token holds other keys than this HSM's record")
            except (HsmError, NotFoundError, PinError, FormatError) as exc:  # next HSM
                problems.append(f"{record.label}: {exc}")
                pin_refusals += isinstance(exc, PinError)
                continue
            for problem in problems:  # said once another HSM serves; otherwise in the error
                log.warning("HSM %s unavailable, %s serves instead", problem, record.label)
            yield HsmSession(record, session)
            return
    detail = "; ".join(problems) or "no HSM given"
    if problems and pin_refusals == len(problems):
        raise PinError(f"no HSM could serve ({detail})")
    raise HsmUnavailableError(f"no HSM could serve ({detail})")
