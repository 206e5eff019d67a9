"""How often a refused peer gets a record in the audit log: once a window if the policy does
not name it, a few times a window if it does.

Every request a listed peer makes that the policy allows is audited one by one. A peer the
policy does not name can
only be refused, and it can ask as fast as it can connect: one record per refusal let a single
unlisted uid write ~6,500 records in 5 s (~30 GB a day) and, once the disk was full, stop every
listed mount's derivations (keys whose derivation cannot be recorded are not sent). So the
refusals of one unlisted identity get at most one record per :data:`WINDOW` seconds; that
record's ``detail`` says how many of its refusals since its previous record were not recorded
one by one (``{"suppressed": N}``). A count still waiting a window after the identity's last
record is handed out by :meth:`RefusalCoalescer.due` (the agent calls it every
``--audit-seconds``, and for every count when it stops) to be written as an ``op``
``"suppressed"`` record, which then is the identity's record for a new window. So every refusal
is counted in the log, and the log grows by at most one record per unlisted identity per
window (docs/format.md, "Agent audit log").

A peer the policy names is audited request by request, but its *refused and malformed*
requests are coalesced the same way, with a small burst (:data:`LISTED_BURST` records of its own
per window, then counted): a client listed for ``health`` alone wrote 22,600 records (6 MB) of
malformed frames in 5 s. Its allowed requests (derivations included) are never coalesced.

The agent's process log uses the same bookkeeping for its per-connection lines (refused
connections, failed TLS handshakes, connections that ended badly: ``kmsfs.agent.server``),
with a kind of line as the "identity" and the latest line's text as its "op": a stream of
connections otherwise wrote one line each, and under journald the rate limit then dropped the
INFO lines operators keep (the audit checkpoints).

Pure bookkeeping with an injectable clock: no I/O, no audit log of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW = 60.0  # seconds: at most one record per unlisted identity in this time
#: Records of its own that one listed identity's refused or malformed requests get per window.
LISTED_BURST = 10
MAX_IDENTITIES = 4096  # identities tracked at once; more share one entry (bounded memory)
#: The ``who`` of the shared entry. Only root or the TLS client CA can present thousands of
#: distinct identities in one window; their refusals are still counted, not named one by one.
OVERFLOW = "unlisted peers (too many at once to name each)"
LISTED_OVERFLOW = "listed peers (too many at once to name each)"


@dataclass
class _Quiet:
    since: float  # when this identity's window began (its first record in it was written)
    records: int = 1  # records of its own written in this window (at most ``burst``)
    suppressed: int = 0  # refusals since then that got no record of their own
    op: str = "unknown"  # the operation of the latest of them


@dataclass(frozen=True)
class Pending:
    """Refusals of ``who`` that no record counts yet, the latest for ``op``."""

    who: str
    op: str
    suppressed: int


class RefusalCoalescer:
    """Decides, per refusal of an identity, whether it gets a record of its own: the first
    ``burst`` of a window do (one, for unlisted identities), the rest are counted."""

    def __init__(
        self,
        window: float = WINDOW,
        clock: Callable[[], float] = time.monotonic,
        max_identities: int = MAX_IDENTITIES,
        burst: int = 1,
        overflow: str = OVERFLOW,
    ) -> None:
        self.window = window
        self.burst = burst
        self.overflow = overflow
        self._clock = clock
        self._max = max_identities
        self._lock = threading.Lock()
        self._seen: dict[str, _Quiet] = {}
        self._owed: dict[str, Pending] = {}  # counts of entries dropped to make room

    def admit(self, who: str, op: str) -> tuple[str, int] | None:
        """None: count this refusal, write nothing. Else (who to write, how many refusals
        before this one the record must say were suppressed)."""
        now = self._clock()
        with self._lock:
            entry = self._seen.get(who)
            if entry is None and len(self._seen) >= self._max:
                self._prune(now)
                if len(self._seen) >= self._max:
                    who = self.overflow
                    entry = self._seen.get(who)
            if entry is not None and now - entry.since < self.window:
                if entry.records < self.burst:  # suppressed is 0 until the burst is spent
                    entry.records += 1
                    return who, 0
                entry.suppressed += 1
                entry.op = op
                return None
            suppressed = entry.suppressed if entry is not None else 0
            self._seen[who] = _Quiet(now)
            return who, suppressed

    def due(self, everything: bool = False) -> list[Pending]:
        """The counts no record carries yet, of identities whose window has passed (all of
        them if ``everything``, when the agent stops): the caller must write one record for
        each, and that record starts the identity's next window (at most one record per window
        still). Identities with nothing pending are forgotten once their window has passed, so
        the table only holds identities refused within the last window."""
        now = self._clock()
        with self._lock:
            pending, self._owed = list(self._owed.values()), {}
            for who, entry in list(self._seen.items()):
                if not (everything or now - entry.since >= self.window):
                    continue
                if entry.suppressed:
                    pending.append(Pending(who, entry.op, entry.suppressed))
                if entry.suppressed and not everything:
                    self._seen[who] = _Quiet(now)  # the record about to be written
                else:
                    del self._seen[who]
        return pending

    def _prune(self, now: float) -> None:
        """Make room (under the lock): drop identities whose window has passed, keeping any
        count they still owe for the next :meth:`due` (at most ``max_identities`` named ones:
        beyond that, counts go to the ``overflow`` entry)."""
        for who, entry in list(self._seen.items()):
            if now - entry.since >= self.window:
                del self._seen[who]
                if entry.suppressed:
                    self._owe(who, entry.op, entry.suppressed)

    def _owe(self, who: str, op: str, count: int) -> None:
        if who not in self._owed and len(self._owed) >= self._max:
            who = self.overflow
        before = self._owed.get(who)
        self._owed[who] = Pending(who, op, count + (before.suppressed if before else 0))
