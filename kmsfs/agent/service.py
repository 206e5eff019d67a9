"""What ``kmsfs-hsmd`` does for a request: check the policy, re-verify, act in an HSM, audit.

Transport-free, so the same object serves the Unix socket, TLS and tests. Every operation is
one method that takes the peer (as the kernel or TLS vouched for it) and the request's
arguments; the order is always: parse the arguments, check the policy, verify every chain
against the agent's own pinned root, and only then touch an HSM. Each outcome (allowed, refused,
failed) is one record in the audit log, except that refusals and malformed requests are
coalesced (kmsfs.agent.refusals): one record a window for a peer the policy does not name, a few
for one it names, the rest counted. A peer could otherwise fill the disk with them, and a full
disk stops every listed mount's derivations.

Documents a client sends (a Trust chain, approvals, a Domain bundle) are verified before any
is written to the agent's store, and only valid signatures are kept: a client can neither plant
a forged approval nor occupy the file a real one would take.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsfs.agent.policy import SEAL_GENESIS_SUCCESSOR, Peer, Policy
from kmsfs.agent.protocol import MAX_BATCH, MAX_INFO, ProtocolError, Request, printable
from kmsfs.agent.refusals import LISTED_BURST, LISTED_OVERFLOW, RefusalCoalescer
from kmsfs.errors import (
    AgentRefusedError,
    ChainError,
    HsmUnavailableError,
    KmsfsError,
    NotFoundError,
    UsageError,
)
from kmsfs.model import fields
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.canonical import b64decode, b64encode
from kmsfs.model.domain import BINDING_INFO_PREFIX
from kmsfs.model.records import check_name
from kmsfs.model.trust import SealedTrust, Signature, Trust
from kmsfs.model.verify import (
    Anchor,
    VerifiedDomain,
    verify_approvals,
    verify_domain,
)
from kmsfs.service import domains, hsms, imports, trusts
from kmsfs.service.context import Context

log = logging.getLogger(__name__)

AuditSink = Callable[..., Any]  # AuditLog.append(who=, op=, domain=, allowed=, reason=, detail=)
MAX_REASON = 1000  # characters of a reason kept in the audit log
#: Seconds a health answer is given again: clients allowed ``health`` (monitoring) asking in a
#: loop make the agent open, log in to and sign with every HSM at most this often, not once
#: per request, which would take the HSMs (and the token files' lock) from derivations.
HEALTH_REUSE_SECONDS = 2.0
#: How many times an open-domain verifies again when a rewrap or rotation of the Domain closed
#: its generations meanwhile, before it gives up (a client tries again).
OPEN_TRIES = 3


@dataclass
class _OpenDomain:
    verified: VerifiedDomain
    keys: domains.DomainKeys
    anchor: Anchor  # the pinned root the chain was last verified against


class Agent:
    """The agent's state: its store, its policy, the Domains it has opened, its audit log."""

    def __init__(
        self, store_dir: Path, policy: Policy, audit: AuditSink | None = None
    ) -> None:
        self.ctx = Context.at(store_dir)
        self.policy = policy
        self._audit = audit
        self._lock = threading.Lock()
        self._open: dict[str, _OpenDomain] = {}
        #: How many times each Domain's open generations were closed (:meth:`_forget`): an
        #: open that verified before a close must not keep what it verified after it.
        self._closes: dict[str, int] = {}
        self._anchor_cache: tuple[tuple[object, ...], Anchor] | None = None
        self._health_lock = threading.Lock()  # one HSM check at a time; others wait for it
        self._health: tuple[float, list[dict[str, object]]] | None = None  # (when, rows)
        self.refusals = RefusalCoalescer()  # of peers the policy does not name
        #: ... and the refused or malformed requests of peers it names (their allowed ones
        #: are recorded one by one): a client listed for `health` alone could otherwise fill
        #: the disk with malformed frames as fast as it can send them.
        self.listed_refusals = RefusalCoalescer(burst=LISTED_BURST, overflow=LISTED_OVERFLOW)
        self._handlers: dict[str, Callable[[Peer, dict[str, Any]], dict[str, Any]]] = {
            "hello": self.hello,
            "open-domain": self.open_domain,
            "derive": self.derive,
            "domain-status": self.domain_status,
            "create-domain": self.create_domain,
            "rewrap": self.rewrap,
            "rotate": self.rotate,
            "retire": self.retire,
            "seal-trust": self.seal_trust,
            "health": self.health,
        }

    # -- dispatch ----------------------------------------------------------------------------

    def handle(self, peer: Peer, request: Request) -> dict[str, Any]:
        """Answer one request. Every decision is audited: a peer no policy entry names is
        refused before its arguments are read (the transport read at most
        ``server.MAX_STRANGER_FRAME`` bytes of it), and a malformed request is recorded as such."""
        op = request.op if request.op in self._handlers else "unknown"
        if self.policy.client_name(peer) is None:
            refusal = self._unlisted(peer)
            self._refused(peer, op, str(refusal))
            if op != "hello":
                raise refusal
            # hello is answered ("client": null tells a misconfigured client why nothing
            # else works), and counted as the refusal it is: it went unrecorded (review).
        try:
            if op == "unknown":
                raise ProtocolError(f"unknown operation {printable(request.op, 40)}")
            return self._handlers[op](peer, request.args)
        except KmsfsError as exc:
            refusal = getattr(exc, "refusal", None)  # the policy's, from _guarded
            if refusal is not None:
                self._refused(peer, refusal[0], str(exc), refusal[1], refusal[2])
            elif not getattr(exc, "audited", False):  # failed before _guarded: a bad request
                self._refused(peer, op, f"malformed request: {exc}")
            raise

    def record_malformed(self, peer: Peer, exc: KmsfsError) -> None:
        """Audit a frame that is not a request at all (the transport could not parse it)."""
        self._refused(peer, "unknown", f"malformed request: {exc}")

    def refuse_unread(
        self, peer: Peer, length: int, limit: int | None = None
    ) -> AgentRefusedError:
        """The refusal of a frame that the transport does not read at all, longer than any
        request the peer could honestly send (``limit``: the most its policy entries allow,
        server.frame_limit): recorded like any of its refusals."""
        if self.policy.client_name(peer) is None:
            refusal = self._unlisted(peer, f"; its frame of {length} bytes was not read")
        else:
            allowed = sorted({a for r in self.policy.rules if r.matches(peer) for a in r.allow})
            refusal = AgentRefusedError(
                f"client {peer.describe()} may only {', '.join(allowed) or 'nothing'} (policy "
                f"{self.policy.source}), whose requests are at most {limit} bytes: its request "
                f"of {length} bytes was not read"
            )
        self._refused(peer, "unknown", str(refusal))
        return refusal

    def flush_refusals(self, everything: bool = False) -> None:
        """Write the counts of coalesced refusals that no record carries yet (see
        kmsfs.agent.refusals): those of identities quiet for a window, or all of them when the
        agent stops. ``kmsfs-hsmd`` calls this every ``--audit-seconds``."""
        owed_all = [(owed, False) for owed in self.refusals.due(everything)]
        owed_all += [(owed, True) for owed in self.listed_refusals.due(everything)]
        for owed, listed in owed_all:
            if listed:
                what = "refused or malformed request(s)"
                why = f" (policy {self.policy.source})"
            else:
                what = "refused request(s)"
                why = f"; it is not in the agent's policy (policy {self.policy.source})"
            try:
                self._write(
                    owed.who, "suppressed", None, False,
                    f"{owed.suppressed} {what} of this client since its previous records, "
                    f"not recorded one by one (the latest: {owed.op}){why}",
                    {"suppressed": owed.suppressed},
                )
            except OSError as exc:
                log.error("audit log: %d refusal(s) of %s not recorded (%s)",
                          owed.suppressed, owed.who, exc.strerror or exc)

    def _unlisted(self, peer: Peer, more: str = "") -> AgentRefusedError:
        return AgentRefusedError(
            f"client {peer.describe()} is not in the agent's policy "
            f"(policy {self.policy.source}){more}"
        )

    def _refused(
        self,
        peer: Peer,
        op: str,
        reason: str,
        domain: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Record a refusal (by the policy) or a malformed request. Best effort: the answer
        is a refusal (or a format error) whether or not the record can be written
        (docs/format.md: "a refusal that cannot be recorded is still a refusal").

        Coalesced per identity (kmsfs.agent.refusals): a peer the policy does not name gets at
        most one record per ``refusals.window`` seconds, one it names ``listed_refusals.burst``
        records; the next record counts the refusals they suppressed. Nothing a peer does
        without the policy's leave may grow the log without bound, since a full disk stops
        every listed mount's derive."""
        who = peer.describe()
        if self.policy.client_name(peer) is None:
            admitted = self.refusals.admit(who, op)
        else:
            admitted = self.listed_refusals.admit(who, op)
        if admitted is None:
            return
        who, suppressed = admitted
        if suppressed:
            detail = {**(detail or {}), "suppressed": suppressed}
        try:
            self._write(who, op, domain, False, reason, detail)
        except OSError as exc:
            log.error("audit log: refusal of %s not recorded (%s)", who, exc.strerror or exc)

    def _record(
        self,
        peer: Peer,
        op: str,
        domain: str | None,
        allowed: bool,
        reason: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
        self._write(peer.describe(), op, domain, allowed, reason, detail)

    def _write(
        self,
        who: str,
        op: str,
        domain: str | None,
        allowed: bool,
        reason: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """One record to the audit sink (if any), the reason made inert and bounded."""
        if self._audit is not None:
            self._audit(
                who=who, op=op, domain=domain, allowed=allowed,
                reason=printable(reason, MAX_REASON), detail=detail,
            )

    #: Operations with lasting effects on the store: recorded before they start, too.
    LASTING_OPS = frozenset(
        {"create-domain", "rewrap", "rotate", "retire", "seal-trust", SEAL_GENESIS_SUCCESSOR}
    )

    def _guarded(
        self,
        peer: Peer,
        op: str,
        domain: str | None,
        action: Callable[[], dict[str, Any]],
        detail: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Policy check, then ``action``; the outcome goes to the audit log either way.

        An operation that changes the store (LASTING_OPS) is recorded before it starts too, and
        refused if that record cannot be written (a full disk): otherwise it would have happened
        with no trace. A derivation's record comes after it, and if it cannot be written the keys
        are not sent. A refusal (AgentRefusedError) is recorded by :meth:`handle`, coalesced
        per identity like every refusal (``_refused``; allowed requests never are), and stays a
        refusal (exit 9) even if its record cannot be written.
        """
        try:
            rule = self.policy.check(peer, op, domain)
        except AgentRefusedError as exc:
            # Recorded by handle(), with every other refusal: coalesced per identity there.
            exc.refusal = (op, domain, detail)  # type: ignore[attr-defined]
            raise
        if op in self.LASTING_OPS:
            try:
                self._record(peer, op, domain, True, f"starting (client {rule!r})", detail)
            except OSError as audit_exc:
                why = audit_exc.strerror or str(audit_exc)
                raise AgentRefusedError(
                    f"{op} refused: the agent cannot write its audit log ({why}); nothing done"
                ) from None
        try:
            result = action()
        except KmsfsError as exc:
            self._record(peer, op, domain, True, f"failed: {exc} (client {rule!r})", detail)
            exc.audited = True  # type: ignore[attr-defined]
            raise
        self._record(peer, op, domain, True, f"ok (client {rule!r})", detail)
        return result

    # -- operations --------------------------------------------------------------------------

    def hello(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        fields.exact_keys(args, set(), "hello")
        return {"peer": peer.describe(), "client": self.policy.client_name(peer)}

    def open_domain(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        """Verify a Domain bundle (newest generation in the agent's store) and open its keys."""
        fields.exact_keys(args, {"bundle"}, "open-domain")
        bundle = DomainBundle.from_bytes(b64decode(args["bundle"], "open-domain.bundle"))
        name = bundle.domain.domain.name

        def act() -> dict[str, Any]:
            self._require_pinned()
            for _ in range(OPEN_TRIES):
                with self._lock:
                    closes = self._closes.get(name, 0)
                verified = domains.newest_verified(self.ctx, bundle)
                # A successor of its Trust: the client warns that a rewrap is due, as a mount
                # through its own store does (kmsfs.fs.kms.superseded_warning). Before the keys
                # are opened: a store that lost the head of its line opens nothing.
                newer = trusts.successor(self.ctx, verified.sealed.domain.trust)
                handle = verified.sealed.id
                with self._lock:
                    # A rewrap that closed this Domain's generations since the check above
                    # (review): what was verified may be the generation it superseded, which
                    # kept open would go on serving through the HSM the rewrap removed.
                    if self._closes.get(name, 0) != closes:
                        continue
                    if handle not in self._open:
                        keys = domains.DomainKeys(self.ctx, verified).open()
                        self._open[handle] = _OpenDomain(verified, keys, self.ctx.store.anchor())
                    entry = self._open[handle]
                    break
            else:
                raise HsmUnavailableError(
                    f"domain {name}: its generations changed under {OPEN_TRIES} opens in a row "
                    "(rewraps or rotations in progress); try again"
                )
            domain = verified.sealed.domain
            return {
                "handle": handle,
                "name": domain.name,
                "domain_id": domain.id,
                "generation": domain.generation,
                "trust_id": domain.trust,
                "current_epoch": domain.current_epoch.epoch,
                "hsm": entry.keys.hsm_label,
                "superseded_by": newer.id if newer is not None else None,
                "retired_below": entry.keys.retired_below,
            }

        return self._guarded(peer, "derive", name, act, {"open": bundle.domain.id})

    def derive(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        """HMAC-SHA256(mk, info) for each info, in the HSM; the chain re-verified first."""
        if "epoch" in args:
            fields.exact_keys(args, {"handle", "infos", "epoch"}, "derive")
            epoch: int | None = fields.integer(args, "epoch", "derive")
        else:
            fields.exact_keys(args, {"handle", "infos"}, "derive")
            epoch = None
        handle = fields.hex_id(args["handle"], "derive.handle")
        raw = fields.array(args, "infos", "derive")
        if not 1 <= len(raw) <= MAX_BATCH:
            raise ProtocolError(f"derive: want 1 to {MAX_BATCH} infos, have {len(raw)}")
        infos = [b64decode(v, f"derive.infos[{i}]") for i, v in enumerate(raw)]
        for i, info in enumerate(infos):
            if not 1 <= len(info) <= MAX_INFO:
                raise ProtocolError(f"derive.infos[{i}]: want 1 to {MAX_INFO} bytes")
            if info.startswith(BINDING_INFO_PREFIX):  # else a client could bind any Domain
                raise ProtocolError(f"derive.infos[{i}]: the prefix of Domain key bindings")
        entry = self._entry_for(peer, handle, "derive", record_missing=True)

        def act() -> dict[str, Any]:
            # The chain is checked against the store's pinned root as it is now. Verification
            # is a pure function of (documents, anchor) and the documents held here are
            # immutable, so it is redone exactly when the anchor changed (a re-pinned store
            # stops derivation at once); redoing it for an unchanged anchor would cost ~1 ms
            # of signature checks per request and could not give another answer.
            anchor = self._anchor()
            if anchor != entry.anchor:
                verify_domain(entry.verified.sealed, entry.verified.chain, anchor)
                entry.anchor = anchor
            entry.keys.follow_store()  # a retirement made on this store without the agent
            keys = entry.keys.derive_many(infos, epoch)
            return {"keys": [b64encode(k) for k in keys],
                    "retired_below": entry.keys.retired_below}

        name = entry.verified.sealed.domain.name
        detail: dict[str, Any] = {"count": len(infos)}
        if epoch is not None:
            detail["epoch"] = epoch  # which mk a derivation used belongs in its record
        return self._guarded(peer, "derive", name, act, detail)

    def _entry_for(
        self, peer: Peer, handle: str, op: str, record_missing: bool
    ) -> _OpenDomain:
        """The open Domain *handle* names, for a peer that may derive for its Domain.

        Handles are sealed-Domain ids, public in the store. Looked up before the policy (as
        they were), a client allowed only ``health`` learnt which Domains were open, and which
        Domain a handle was, from "refused" against "not open" (review). So a peer that may
        not derive at all is refused first, and one that may not derive for this handle's
        Domain gets the answer of a handle that is not open (its refusal is recorded all the
        same). *record_missing*: whether a handle not open goes to the audit log."""
        if not self.policy.allows_any(peer, "derive"):
            refusal = AgentRefusedError(
                f"client {peer.describe()} may not derive (policy {self.policy.source})"
            )
            refusal.refusal = (op, None, None)  # type: ignore[attr-defined]
            raise refusal
        with self._lock:
            entry = self._open.get(handle)
        recorded = not record_missing
        if entry is not None:
            name = entry.verified.sealed.domain.name
            try:
                self.policy.check(peer, "derive", name)
            except AgentRefusedError as exc:
                self._refused(peer, op, str(exc), name, None)
                entry, recorded = None, True
        if entry is None:
            gone = NotFoundError(f"Domain handle {handle[:12]} is not open (open-domain first)")
            gone.audited = recorded  # type: ignore[attr-defined]
            raise gone
        return entry

    def domain_status(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        """The key epochs an open Domain now retires, for a client that holds keys it derived
        before (a mount's open files and keys derived ahead, kmsfs.agent.client), and the
        current epoch of its newest generation in the agent's store (a client serving an
        older one opens it): a mount asks once a second, so a retirement or a rotation made
        on the agent's store reaches it with no derivation needed.

        Allowed to whoever may derive for the handle's Domain, and not audited when allowed:
        it carries no key, only what the Domain's signed generations say, and one record per
        mount per second would bury the derivations the audit log is for. Refusals are
        recorded like any other."""
        fields.exact_keys(args, {"handle"}, "domain-status")
        handle = fields.hex_id(args["handle"], "domain-status.handle")
        # A handle not open is not recorded: every mount asking about a generation the agent
        # closed (after a rotate, rewrap or retire) would write one. It opens the Domain again
        # next, and that is recorded (as derive).
        entry = self._entry_for(peer, handle, "domain-status", record_missing=False)
        entry.keys.follow_store()
        return {"retired_below": entry.keys.retired_below,
                "newest_epoch": entry.keys.newest_epoch}

    def create_domain(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        fields.exact_keys(args, {"name", "trust", "chain"}, "create-domain")
        name = check_name(fields.string(args, "name", "create-domain"), "domain")
        trust_id = fields.hex_id(args["trust"], "create-domain.trust")
        chain = _chain(args, "create-domain")

        def act() -> dict[str, Any]:
            self._import_chain(chain, trust_id)
            verified = domains.create(self.ctx, name, trust_id)
            return _domain_result(verified)

        return self._guarded(peer, "create-domain", name, act)

    def rewrap(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        fields.exact_keys(args, {"bundle", "trust", "chain"}, "rewrap")
        bundle = DomainBundle.from_bytes(b64decode(args["bundle"], "rewrap.bundle"))
        trust_id = fields.hex_id(args["trust"], "rewrap.trust")
        chain = _chain(args, "rewrap")
        name = bundle.domain.domain.name

        def act() -> dict[str, Any]:
            self._import_chain(chain, trust_id)
            return self._next_generation(bundle, lambda: domains.rewrap(self.ctx, name, trust_id))

        return self._guarded(peer, "rewrap", name, act)

    def rotate(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        """A new mk epoch for a Domain: the client sends the Domain as it knows it."""
        fields.exact_keys(args, {"bundle"}, "rotate")
        bundle = DomainBundle.from_bytes(b64decode(args["bundle"], "rotate.bundle"))
        name = bundle.domain.domain.name

        def act() -> dict[str, Any]:
            return self._next_generation(bundle, lambda: domains.rotate(self.ctx, name))

        return self._guarded(peer, "rotate", name, act)

    def retire(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        """Retire a Domain's mk epochs below ``below`` (domains.retire): the client sends the
        Domain as it knows it."""
        fields.exact_keys(args, {"bundle", "below"}, "retire")
        bundle = DomainBundle.from_bytes(b64decode(args["bundle"], "retire.bundle"))
        below = fields.integer(args, "below", "retire")
        name = bundle.domain.domain.name

        def act() -> dict[str, Any]:
            return self._next_generation(
                bundle, lambda: domains.retire(self.ctx, name, below)
            )

        return self._guarded(peer, "retire", name, act, {"below": below})

    def seal_trust(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        """Seal a Trust with an HSM of it, only with its quorum and its predecessor's; not as
        a second sealed successor of its predecessor in this store (a fork of the line of
        Trusts, :func:`~kmsfs.service.trusts.refuse_fork`) unless the client says ``fork``
        (``trust seal --fork``; sent only then, so older agents serve every other seal); and
        never a second successor of the genesis while the store holds one that verifies, fork
        or not (:func:`~kmsfs.service.trusts.refuse_second_genesis_successor`).

        A successor of the genesis needs the policy action ``seal-genesis-successor``, not
        ``seal-trust``: the genesis has no operators, so only the new Trust's own quorum stands
        behind it, and its seal pins it here for good. Allowed ``seal-trust`` alone, a client
        with no PIN and no operator of the store could make itself the only operator of the
        line (review); the ceremony grants the action for its first seal only."""
        optional = {"fork"} & set(args)
        fields.exact_keys(args, {"trust", "approvals", "chain"} | optional, "seal-trust")
        fork = fields.boolean(args, "fork", "seal-trust") if optional else False
        trust = Trust.from_dict(args["trust"])
        approvals = [
            Signature.from_dict(a, "approval")
            for a in fields.array(args, "approvals", "seal-trust")
        ]
        chain = _chain(args, "seal-trust")

        def act() -> dict[str, Any]:
            if trust.predecessor is None:
                raise UsageError("a root trust is made by 'kmsfs-admin init', not sealed")
            self._import_chain(chain, trust.predecessor, allow_unpinned=True)
            predecessor = chain[-1]
            valid = imports.member_approvals(trust, approvals, predecessor.trust)
            # Both quorums before anything of this request is written: a client without them
            # cannot leave so much as a proposal in the agent's store.
            verify_approvals(trust, valid, predecessor)
            # So is the genesis pin, and under the store's lock until the seal and the pin are
            # written: a rival successor of the pinned genesis, or the loser of two sealed at
            # once, is refused before its Trust and approvals reach the store.
            with self.ctx.store.exclusive():
                trusts._check_genesis_successor(
                    self.ctx.store.anchor(), trust.predecessor, trust.id
                )
                trusts.refuse_second_genesis_successor(self.ctx, trust)  # fork or not
                if not fork and trusts.valid_seal(self.ctx, trust) is None:
                    trusts.refuse_fork(self.ctx, trust)  # as trusts._seal, before any write
                self.ctx.store.save_trust(trust)
                for approval in valid:
                    imports.keep_signature(
                        self.ctx, "approval", approval,
                        imports.approving(trust, predecessor.trust),
                    )
                sealed = trusts._seal(self.ctx, trust.id, None)  # trusts.seal, lock held
            return {"seal": sealed.seal.to_dict("seal")}

        return self._guarded(peer, self._seal_action(trust), None, act, {"trust": trust.id})

    def _seal_action(self, trust: Trust) -> str:
        """The policy action that sealing *trust* takes: :data:`SEAL_GENESIS_SUCCESSOR` for a
        successor of this store's genesis, ``seal-trust`` for any other. A store whose pins
        cannot be read gets the stricter one (fail closed); the seal would fail on them anyway."""
        try:
            root = self.ctx.store.anchor().root
        except KmsfsError:
            return SEAL_GENESIS_SUCCESSOR
        return SEAL_GENESIS_SUCCESSOR if trust.predecessor == root else "seal-trust"

    def health(self, peer: Peer, args: dict[str, Any]) -> dict[str, Any]:
        """Each HSM of the agent's store: does it answer with its PIN and hold its keys? As
        checked at most :data:`HEALTH_REUSE_SECONDS` ago (each request is audited all the
        same)."""
        fields.exact_keys(args, set(), "health")

        def act() -> dict[str, Any]:
            with self._health_lock:
                if self._health is None or (
                    time.monotonic() - self._health[0] >= HEALTH_REUSE_SECONDS
                ):
                    self._health = (time.monotonic(), hsms.health(self.ctx))
                return {"hsms": [dict(row) for row in self._health[1]]}

        return self._guarded(peer, "health", None, act)

    # -- helpers -----------------------------------------------------------------------------

    def _anchor(self) -> Anchor:
        """The store's pinned anchor as it is on disk now, read again whenever store.json or
        the store's own copy of its pins changed. Both are only ever replaced by rename
        (atomicfile), so a change always shows in (inode, mtime, size); this saves re-reading
        and re-parsing them for every derive."""
        try:
            st = os.stat(self.ctx.store.config_path)
        except OSError:
            return self.ctx.store.anchor()  # raises the store's own one-line error
        try:
            own = os.stat(self.ctx.store.own_pins_path)
            own_stamp: tuple[int, int, int] | None = (own.st_ino, own.st_mtime_ns, own.st_size)
        except OSError:
            own_stamp = None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size, own_stamp)
        with self._lock:
            if self._anchor_cache is not None and self._anchor_cache[0] == stamp:
                return self._anchor_cache[1]
        anchor = self.ctx.store.anchor()
        with self._lock:
            self._anchor_cache = (stamp, anchor)
        return anchor

    def _next_generation(
        self, bundle: DomainBundle, make: Callable[[], VerifiedDomain]
    ) -> dict[str, Any]:
        """Take in the client's Domain (verified against this store's root), make its next
        generation with ``make`` (rewrap or rotate), and retire the open older ones.

        The client's generation is written only if the store's history takes it: one the store
        holds, the very next generation of the store's newest, or the first of a Domain the
        store does not know (``domains.newest_verified``). A validly sealed rival (say by an HSM
        a successor Trust removed) is refused and never written: once in the store it would
        make ``domains.history`` fail closed for every client of the Domain."""
        self._import_chain(list(bundle.chain), bundle.domain.domain.trust)
        imports.take_generation(self.ctx, bundle)
        verified = make()
        self._forget(bundle.domain.domain.name)
        return _domain_result(verified)

    def _forget(self, name: str) -> None:
        """Close the open generations of Domain ``name`` after a rewrap: their clients get
        "not open", open the Domain again and so move to the new generation (the revoked HSM
        no longer serves them)."""
        with self._lock:
            self._closes[name] = self._closes.get(name, 0) + 1
            stale = [h for h, e in self._open.items() if e.verified.sealed.domain.name == name]
            entries = [self._open.pop(h) for h in stale]
        for entry in entries:
            entry.keys.close()

    def _require_pinned(self) -> None:
        if self.ctx.store.anchor().successor is None:
            raise ChainError(
                f"the agent's store {self.ctx.store.root} has not pinned the genesis's successor "
                "(seal it through the agent, or 'kmsfs-admin trust pin' on the agent host)"
            )

    def _import_chain(
        self, chain: Sequence[SealedTrust], last: str, allow_unpinned: bool = False
    ) -> None:
        """Verify a client's Trust chain against the agent's root, then keep its documents;
        not one off the store's line of Trusts (its head), nor one that forks after the head
        (:func:`trusts.refuse_forked_line`), checked before anything is written: a rival line
        kept after a refused request made the store's honest line fork too, and blocked its
        rewraps (review)."""
        if not (allow_unpinned and len(chain) == 1):
            self._require_pinned()
        imports.check_chain(self.ctx, chain, last)
        trusts.refuse_forked_line(self.ctx, chain, "take a client's Trusts into the agent's store")
        imports.save_chain(self.ctx, chain)

    def close(self) -> None:
        """Write the refusal counts still owed to the audit log, close every open Domain."""
        self.flush_refusals(everything=True)
        with self._lock:
            entries, self._open = list(self._open.values()), {}
        for entry in entries:
            entry.keys.close()


def _chain(args: dict[str, Any], what: str) -> list[SealedTrust]:
    return [SealedTrust.from_dict(t) for t in fields.array(args, "chain", what)]


def _domain_result(verified: VerifiedDomain) -> dict[str, Any]:
    bundle = DomainBundle(verified.sealed, verified.chain)
    return {
        "domain": verified.sealed.to_dict(),
        "bundle": b64encode(bundle.to_bytes()),
    }
