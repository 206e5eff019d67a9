"""Domain actions: create, list, verify, rewrap for a successor Trust, export, open.

Opening a Domain is the filesystem's entry point: verify the whole chain, pick any reachable HSM
of the Trust, unwrap ``k`` then ``mk`` inside it, and hand out a deriver whose keys are
HMAC-SHA256(mk, info) computed by the token.
"""

import contextlib
import dataclasses
import hmac
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pkcs11

from kmsfs.crypto.names import NAMES_KEY_INFO
from kmsfs.crypto.symlinks import SYMLINK_KEY_INFO
from kmsfs.crypto.xattrs import XATTR_KEY_INFO
from kmsfs.errors import (
    AlreadyExistsError,
    ChainError,
    HsmError,
    HsmUnavailableError,
    IntegrityError,
    KmsfsError,
    NotFoundError,
    UsageError,
)
from kmsfs.hsm import domainkeys, library
from kmsfs.model import contexts
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.domain import (
    BINDING_INFO_PREFIX,
    Domain,
    MasterKeyEpoch,
    SealedDomain,
    WrappedKey,
    binding_info,
)
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.records import HsmRecord, check_name
from kmsfs.model.trust import SealedTrust, Signature, Trust
from kmsfs.model.verify import (
    VerifiedDomain,
    verify_domain,
    verify_generation_descent,
    verify_generation_step,
)
from kmsfs.service import trusts
from kmsfs.service.context import Context, HsmSession, open_hsm, utc_now

log = logging.getLogger(__name__)

#: What DomainKeys._open_generation opens: the stack that closes it, the unwrapped current
#: ``mk``, the HSM session.
_Opened = tuple[contextlib.ExitStack, domainkeys.MasterKey, HsmSession]
#: Seconds close() waits for the following thread to end (it may be moving the handle).
CLOSE_WAIT = 2.0
#: A store directory changed this recently (ns) is read again at the next look (follow_store).
RACY_STAMP_NS = 2_000_000_000

#: A volume's own keys, not a file's: names (at each directory's epoch), symlink targets and
#: xattrs (at epoch 1 for its whole life): docs/format.md, "Key epochs". The only derivations a
#: retired epoch still serves: a directory still there holds files written since at newer
#: epochs, and kmsfs reencrypt must move its names.
VOLUME_KEY_INFOS = frozenset({NAMES_KEY_INFO, SYMLINK_KEY_INFO, XATTR_KEY_INFO})


def _recipients(trust: Trust) -> list[tuple[str, PublicKey]]:
    return [(h.id, h.wrap_key) for h in trust.hsms]


def _seal(hsm: HsmSession, domain: Domain) -> SealedDomain:
    value = hsm.sign(contexts.message(contexts.HSM_SEALS_DOMAIN, domain.signed_bytes()))
    return SealedDomain(domain, Signature(domain.id, hsm.record.id, value))


#: What create and rewrap will not do on a rival line of Trusts, nor on a forked one
#: (trusts.refuse_forked_line: a superseded Trust's old quorum, removed operators included,
#: can approve a rival line; the store's head says which line is its own).
WRAP_KEYS = "wrap a Domain's keys for its HSMs"


def _governing_trust(ctx: Context, trust_ref: str) -> list[SealedTrust]:
    chain = trusts.verified_chain(ctx, trusts.resolve_trust(ctx, trust_ref))
    if not chain[-1].trust.operators:
        raise UsageError("the genesis trust has no operators and cannot govern a Domain")
    refuse_superseded(ctx, chain[-1].trust.id, "make a Domain or generation under it")
    return chain


def refuse_superseded(ctx: Context, trust_id: str, what: str) -> None:
    """Nothing new under a Trust a successor replaced: its removed HSMs could unwrap it.
    (Also before asking an HSM agent, whose store may not know the successor yet.)"""
    newer = trusts.successor(ctx, trust_id)
    if newer is not None:
        raise UsageError(
            f"trust {trust_id[:12]} is superseded by trust {newer.id[:12]}; will not {what} "
            f"(the HSMs the successor left out could still unwrap it): use trust {newer.id[:12]}"
        )


def create(ctx: Context, name: str, trust_ref: str) -> VerifiedDomain:
    """New ``k`` and ``mk`` inside an HSM of the Trust, wrapped for all its HSMs, sealed."""
    check_name(name, "domain")
    with ctx.store.exclusive():  # "the name is free" must still hold when the Domain is saved
        return _create(ctx, name, trust_ref)


def _create(ctx: Context, name: str, trust_ref: str) -> VerifiedDomain:
    if any(ctx.store.domain(i).domain.name == name for i in ctx.store.domain_ids()):
        raise AlreadyExistsError(f"a domain named {name!r} exists already (rewrap it instead)")
    chain = _governing_trust(ctx, trust_ref)
    trusts.refuse_forked_line(ctx, chain, WRAP_KEYS)  # no fresh k on a contested line
    with open_hsm(ctx, chain[-1].trust.hsms) as hsm:
        sealed = new_domain(hsm, name, chain[-1].trust, chain[0].id)
    verified = verify_domain(sealed, chain, ctx.store.anchor())
    ctx.store.save_domain(sealed)
    return verified


def new_domain(hsm: HsmSession, name: str, trust: Trust, root_id: str) -> SealedDomain:
    """Generation 1 of Domain *name* under *trust* (of the store whose first Trust is
    *root_id*): ``k`` and ``mk`` made inside *hsm*, wrapped for all the Trust's HSMs, sealed
    by *hsm*. Checks nothing: :func:`create` verifies the chain first and the result after."""
    with library.hsm_errors(f"HSM {hsm.record.label}"):
        wrapped_k, wrapped_mk, binding = domainkeys.create(
            hsm.session, _recipients(trust), binding_info(name, 1, root_id)
        )
    domain = Domain(
        name=name,
        generation=1,
        previous=None,
        trust=trust.id,
        wrapped_k=tuple(WrappedKey(i, scheme, w) for i, (scheme, w) in wrapped_k.items()),
        master_keys=(MasterKeyEpoch(1, wrapped_mk, binding),),
        created=utc_now(),
    )
    return _seal(hsm, domain)


def _generations(ctx: Context, name: str) -> list[SealedDomain]:
    found = [
        d for d in (ctx.store.domain(i) for i in ctx.store.domain_ids()) if d.domain.name == name
    ]
    if not found:
        raise NotFoundError(f"no domain named {name!r} in {ctx.store.root}")
    return sorted(found, key=lambda d: d.domain.generation)


def history(ctx: Context, name: str) -> list[VerifiedDomain]:
    """Every generation of Domain ``name`` in the store, oldest first, each fully verified and
    each the next step of the one before (``verify_generation_step``).

    Any break fails closed: rival generations with one number (a forked store, or a forgery by
    an HSM that a successor Trust removed), a missing generation, or a generation that goes
    back to an older Trust. Looking only at the highest number would let a removed HSM seal a
    "newer" generation under the Trust it was removed from.
    """
    generations = _generations(ctx, name)
    numbers = [g.domain.generation for g in generations]
    for number in sorted(set(numbers)):
        if numbers.count(number) > 1:
            rivals = ", ".join(g.id[:12] for g in generations if g.domain.generation == number)
            raise ChainError(
                f"the store holds rival generations {number} of domain {name} ({rivals}): it "
                "was forked or forged; keep the one the operators made and remove the other "
                "from domains/"
            )
    anchor = ctx.store.anchor()
    verified = [verify_domain(g, trusts.chain_to(ctx, g.domain.trust), anchor) for g in generations]
    for previous, following in itertools.pairwise(verified):
        verify_generation_step(previous, following)
    return verified


def current(ctx: Context, name: str) -> VerifiedDomain:
    """The newest generation of Domain ``name``, its whole history verified."""
    return history(ctx, name)[-1]


def list_domains(ctx: Context) -> list[tuple[SealedDomain, str | None]]:
    """Each Domain's newest generation, with why its history does not verify (None if it does)."""
    names = sorted({ctx.store.domain(i).domain.name for i in ctx.store.domain_ids()})
    listed: list[tuple[SealedDomain, str | None]] = []
    for name in names:
        try:
            listed.append((history(ctx, name)[-1].sealed, None))
        except IntegrityError as exc:
            listed.append((_generations(ctx, name)[-1], str(exc)))
    return listed


def refuse_unbound(domain: Domain, ctx: Context | None = None) -> None:
    """A Domain made before key binding (format 1) is not used until a rewrap binds it: its
    wrapped keys could be another Domain's (:mod:`kmsfs.model.domain`). The command named is
    one that works: into the newest Trust (of the store *ctx*), where the Domain's own one is
    superseded."""
    if domain.bound:
        return
    trust = domain.trust
    if ctx is not None and (newer := trusts.successor(ctx, trust)) is not None:
        trust = newer.id
    raise ChainError(
        f"domain {domain.name} (generation {domain.generation}) predates key binding, so "
        "nothing shows its keys are its own: an operator must bind it first with "
        f"'kmsfs-admin domain rewrap {domain.name} --trust {trust[:12]}'"
    )


#: The HMAC that tells whether two Domains hold the same ``mk`` (:func:`_refuse_foreign_keys`).
#: It starts with the binding prefix, which clients of the agent may not derive with.
SAME_KEY_PROBE = BINDING_INFO_PREFIX + b"same-key probe"


def _sealer(verified: VerifiedDomain) -> HsmRecord:
    """The HSM that sealed a generation (its Trust lists it: verify_domain checked the seal)."""
    record = verified.trust.trust.hsm(verified.sealed.seal.key_id)
    assert record is not None
    return record


def _bindings_from_sealer(
    ctx: Context, old: VerifiedDomain, infos: Sequence[bytes]
) -> list[bytes]:
    """The bindings of a generation made before key binding, computed in the HSM that sealed
    it, once that HSM has shown its keys are its own (:func:`_refuse_foreign_keys`)."""
    sealer, domain = _sealer(old), old.sealed.domain
    with contextlib.ExitStack() as stack:
        try:
            hsm = stack.enter_context(open_hsm(ctx, [sealer]))
        except HsmError as exc:
            raise type(exc)(
                f"binding domain {domain.name} needs HSM {sealer.label}, which sealed its "
                f"generation {domain.generation} (the one HSM that can show its keys are its "
                f"own): {exc}"
            ) from None
        return _refuse_foreign_keys(ctx, hsm, domain, infos)


def _refuse_foreign_keys(
    ctx: Context, hsm: HsmSession, domain: Domain, infos: Sequence[bytes]
) -> list[bytes]:
    """Before a Domain made before key binding is bound, in *hsm*, the HSM that sealed it:
    refuse it unless its keys are its own, as far as an HSM can tell; else return the
    bindings of its epochs (*infos*), computed here.

    The HSM computes a binding for whatever keys the document carries, and anyone holding an
    HSM's PIN can still seal an unbound document, one carrying another Domain's wrapped ``k``
    and ``mk`` (copied bytes; without ``k`` nobody can wrap them anew). Two checks:

    - every honest generation is sealed by an HSM that holds its ``k``: the one that made the
      keys (create), that unwrapped ``k`` (rotate), or an HSM of the Trust they were just
      wrapped for (rewrap). So the sealer must unwrap ``k`` and every ``mk``. A forger seals
      with its own HSM, to which it cannot wrap another Domain's ``k`` unless it had that
      ``k`` (then it also had every ``mk`` wrapped under it: binding those to another name gives
      nobody keys the forger lacks). This holds whatever else the store holds or lacks;
    - as a second line, no other Domain document of the store that verifies and that *hsm*
      can unwrap holds one of these master keys (a fingerprint HMAC per ``mk``, in the HSM).

    The sealer only checks: the fresh ``k`` is made by an HSM the new Trust keeps (the sealer
    may be one a successor removed), whose bindings must then equal these.
    """
    def hmacs(d: Domain, per_epoch: Sequence[Sequence[bytes]]) -> list[list[bytes]]:
        wrapped = d.wrapped_for(hsm.record.id)
        if wrapped is None:
            return []
        with library.hsm_errors(f"HSM {hsm.record.label}"):
            return domainkeys.epoch_hmacs(
                hsm.session, wrapped.scheme, wrapped.data, [m.data for m in d.master_keys],
                per_epoch,
            )

    try:
        own = hmacs(domain, [[SAME_KEY_PROBE, info] for info in infos])
    except HsmError as exc:
        raise IntegrityError(
            f"domain {domain.name} ({domain.id[:12]}): its keys do not unwrap in HSM "
            f"{hsm.record.label}, which sealed it ({exc}): they are not its own, or that HSM "
            "failed; refusing to bind it"
        ) from None
    mine = {prints[0] for prints in own}
    anchor = ctx.store.anchor()
    for other_id in ctx.store.domain_ids():
        try:
            sealed = ctx.store.domain(other_id)
            other = sealed.domain
            if other.name == domain.name or other.wrapped_for(hsm.record.id) is None:
                continue
            verify_domain(sealed, trusts.chain_to(ctx, other.trust), anchor)
            theirs = {p[0] for p in hmacs(other, [[SAME_KEY_PROBE]] * len(other.master_keys))}
        except (KmsfsError, OSError) as exc:  # unverified or not unwrappable: nothing to compare
            log.warning("domain document %s not compared with %s: %s", other_id[:12],
                        domain.name, exc)
            continue
        if mine & theirs:
            raise IntegrityError(
                f"domain {domain.name} ({domain.id[:12]}) holds master keys of domain "
                f"{other.name} ({other_id[:12]}), and both verify: one of the two is a forgery; "
                f"remove the one your operators did not make from {ctx.store.root / 'domains'}"
            )
    return [prints[1] for prints in own]


def _unbound(domain: Domain, epoch: int) -> IntegrityError:
    return IntegrityError(
        f"domain {domain.name} ({domain.id[:12]}): mk epoch {epoch} is not bound to it (its "
        "wrapped keys belong to another Domain, or were altered): refusing to use them"
    )


def rewrap(ctx: Context, name: str, trust_ref: str) -> VerifiedDomain:
    """A fresh ``k`` for the successor Trust's HSMs; ``mk`` unchanged, so data stays readable.

    The new Trust must descend from the Domain's current Trust: a Domain never moves sideways
    into a Trust its operators did not approve as a successor. A Domain made before key
    binding may also be rewrapped into its own Trust: that binds it, once the HSM that sealed
    it has checked that its keys are its own (:func:`_refuse_foreign_keys`). A binding that
    does not match its ``mk`` is refused.
    """
    with ctx.store.exclusive():  # one generation N+1, not two rival ones
        return _rewrap(ctx, name, trust_ref)


def _rewrap(ctx: Context, name: str, trust_ref: str) -> VerifiedDomain:
    old = current(ctx, name)
    chain = _governing_trust(ctx, trust_ref)
    new_trust = chain[-1].trust
    old_domain = old.sealed.domain
    # Into the same Trust only to bind a Domain made before key binding (format 1).
    same = old.trust.id == new_trust.id and not old_domain.bound
    if old.trust.id not in [link.id for link in chain] or (
        old.trust.id == new_trust.id and not same
    ):
        raise UsageError(
            f"trust {new_trust.id[:12]} is not a successor of the domain's trust "
            f"{old.trust.id[:12]}"
        )
    trusts.refuse_forked_line(ctx, chain, WRAP_KEYS)
    infos = [binding_info(name, m.epoch, chain[0].id) for m in old_domain.master_keys]
    # Binding a Domain made before key binding: checked in the HSM that sealed it.
    expected = [m.binding for m in old_domain.master_keys]
    if not old_domain.bound:
        expected = list(_bindings_from_sealer(ctx, old, infos))
    # The fresh k is made in an HSM the new Trust keeps, never in one a successor removed
    # while one it keeps exists: the removed one would hold it, if only for this call.
    kept = [h for h in old.trust.trust.hsms if new_trust.hsm(h.id) is not None]
    with open_hsm(ctx, kept or old.trust.trust.hsms) as unwrapper:
        wrapped = old_domain.wrapped_for(unwrapper.record.id)
        assert wrapped is not None
        with library.hsm_errors(f"HSM {unwrapper.record.label}"):
            new_k, mks, bindings = domainkeys.rewrap(
                unwrapper.session,
                wrapped.scheme,
                wrapped.data,
                [m.data for m in old_domain.master_keys],
                _recipients(new_trust),
                infos,
            )
    for m, want, binding in zip(old_domain.master_keys, expected, bindings, strict=True):
        if want is None or not hmac.compare_digest(want, binding):
            raise _unbound(old_domain, m.epoch)
    domain = Domain(
        name=name,
        generation=old_domain.generation + 1,
        previous=old_domain.id,
        trust=new_trust.id,
        wrapped_k=tuple(
            WrappedKey(i, scheme, w) for i, (scheme, w) in new_k.items()
        ),
        master_keys=tuple(
            MasterKeyEpoch(m.epoch, d, b)
            for m, d, b in zip(old_domain.master_keys, mks, bindings, strict=True)
        ),
        created=utc_now(),
        retired_below=old_domain.retired_below,
    )
    with open_hsm(ctx, new_trust.hsms) as signer:
        sealed = _seal(signer, domain)
    verified = verify_domain(sealed, chain, ctx.store.anchor())
    ctx.store.save_domain(sealed)
    return verified


def refuse_rotation_under_superseded(ctx: Context, name: str, trust_id: str) -> None:
    """A new mk epoch only once the Domain is rewrapped into the newest Trust."""
    if (newer := trusts.successor(ctx, trust_id)) is not None:
        raise UsageError(
            f"domain {name} is governed by trust {trust_id[:12]}, which trust {newer.id[:12]} "
            f"supersedes: rewrap it first (kmsfs-admin domain rewrap {name} --trust "
            f"{newer.id[:12]}), or the new mk epoch is wrapped under a k that the HSMs the "
            "successor left out can unwrap"
        )


def rotate(ctx: Context, name: str) -> VerifiedDomain:
    """A new ``mk`` epoch for Domain ``name`` (a new generation, same Trust and ``k``).

    New data is keyed with the newest epoch; old data keeps reading with its own until it is
    re-encrypted (``kmsfs reencrypt``). Done after a rewrap that removed an HSM, the new epoch
    is wrapped only by the fresh ``k``, which the removed HSM never had.
    """
    with ctx.store.exclusive():
        return _rotate(ctx, name)


def _rotate(ctx: Context, name: str) -> VerifiedDomain:
    old = current(ctx, name)
    old_domain = old.sealed.domain
    trust = old.trust.trust
    refuse_rotation_under_superseded(ctx, name, trust.id)
    # A generation already on a rival line (rewrapped where the honest one was not known): its
    # k is the rival's, and a new epoch under it would be too (review).
    trusts.refuse_forked_line(ctx, old.chain, "add a key epoch to a Domain")
    check_bindings(ctx, old)  # no new epoch, sealed by an honest HSM, on keys not its own
    epoch = max(m.epoch for m in old_domain.master_keys) + 1
    with open_hsm(ctx, trust.hsms) as hsm:
        wrapped = old_domain.wrapped_for(hsm.record.id)
        assert wrapped is not None  # verify_domain checked k is wrapped to every HSM
        with library.hsm_errors(f"HSM {hsm.record.label}"):
            info = binding_info(name, epoch, old.chain[0].id)
            new_mk, binding = domainkeys.rotate(hsm.session, wrapped.scheme, wrapped.data, info)
        domain = Domain(
            name=name,
            generation=old_domain.generation + 1,
            previous=old_domain.id,
            trust=trust.id,
            wrapped_k=old_domain.wrapped_k,
            master_keys=(*old_domain.master_keys, MasterKeyEpoch(epoch, new_mk, binding)),
            created=utc_now(),
            retired_below=old_domain.retired_below,
        )
        sealed = _seal(hsm, domain)
    verified = verify_domain(sealed, list(old.chain), ctx.store.anchor())
    ctx.store.save_domain(sealed)
    return verified


def retire(ctx: Context, name: str, below: int) -> VerifiedDomain:
    """Retire the ``mk`` epochs below ``below`` for file contents: a new generation (same
    Trust, ``k`` and ``mk``) whose ``retired_below`` makes every opening of the Domain refuse
    content keyed with them, read or write (:class:`DomainKeys`).

    The last step of revoking an HSM (rewrap, rotate, ``kmsfs reencrypt`` of every volume):
    until then the removed HSM, which keeps the ``mk`` of the epochs it held, can make file
    contents that verify. Data still keyed with a retired epoch can no longer be read, so
    this is never undone (``verify_generation_step`` refuses a generation that lowers it).
    """
    with ctx.store.exclusive():
        return _retire(ctx, name, below)


def _retire(ctx: Context, name: str, below: int) -> VerifiedDomain:
    generations = history(ctx, name)
    old = generations[-1]
    old_domain = old.sealed.domain
    trust = old.trust.trust
    newest = old_domain.current_epoch.epoch
    if below <= old_domain.retired_below:
        already = (
            f"epochs below {old_domain.retired_below} are retired"
            if old_domain.retired_below > 1
            else "no epoch is retired"
        )
        raise UsageError(
            f"domain {name}: {already}; --below {below} retires nothing more (a retirement "
            "is never undone)"
        )
    if below > newest:
        raise UsageError(
            f"domain {name}: its newest key epoch is {newest}, which new data uses: --below "
            f"{below} would retire it (rotate first: kmsfs-admin domain rotate {name})"
        )
    if (newer := trusts.successor(ctx, trust.id)) is not None:
        raise UsageError(
            f"domain {name} is governed by trust {trust.id[:12]}, which trust {newer.id[:12]} "
            f"supersedes: rewrap it first (kmsfs-admin domain rewrap {name} --trust "
            f"{newer.id[:12]}) and rotate, so that the retirement is sealed under the Trust "
            "that left the removed HSMs out"
        )
    # The epochs kept must be out of reach of every HSM the Trust no longer has: an HSM that
    # had the k of a generation holding epoch `below` (or a later one) holds their mk too.
    # Who had a k: the HSMs it was wrapped for, and the one that made it, which is one of
    # them, except for a rewrap into a Trust that kept none of the old HSMs: made in one of
    # those (kmsfs.service.domains._rewrap).
    current_hsms = {h.id for h in trust.hsms}
    labels = {h.id: h.label for g in generations for h in g.trust.trust.hsms}
    had: set[str] = set()  # the HSMs that had the k of the generation looked at
    before: tuple[WrappedKey, ...] = ()
    for g in generations:
        wrapped = g.sealed.domain.wrapped_k
        if wrapped != before:  # a fresh k: made at create, or by a rewrap
            recipients = {w.hsm for w in wrapped}
            made_elsewhere = before and not recipients & {w.hsm for w in before}
            had = recipients | ({w.hsm for w in before} if made_elsewhere else set())
        before = wrapped
        left = sorted(had - current_hsms)
        if len(g.sealed.domain.master_keys) >= below and left:
            raise UsageError(
                f"domain {name}: HSM {labels.get(left[0], left[0][:12])}, which its trust no "
                f"longer has, had the k of generation {g.sealed.domain.generation}, which wraps "
                f"key epoch {below}: retiring below it leaves that HSM able to make contents; "
                f"rotate (kmsfs-admin domain rotate {name}) and retire below the new epoch, "
                "once the k is one only the trust's HSMs had (a rewrap kept one of them)"
            )
    domain = dataclasses.replace(  # the same Trust, k and mk: only the retirement is new
        old_domain,
        generation=old_domain.generation + 1,
        previous=old_domain.id,
        created=utc_now(),
        retired_below=below,
    )
    with open_hsm(ctx, trust.hsms) as hsm:
        sealed = _seal(hsm, domain)
    verified = verify_domain(sealed, list(old.chain), ctx.store.anchor())
    ctx.store.save_domain(sealed)
    return verified


def check_bindings(ctx: Context, verified: VerifiedDomain) -> None:
    """Refuse a Domain generation any of whose ``mk`` epochs is not bound to it, checked in an
    HSM of its Trust: before a generation from elsewhere is written into the store."""
    refuse_unbound(verified.sealed.domain, ctx)
    keys = DomainKeys(ctx, verified)
    try:
        keys.check_every_epoch()
    finally:
        keys.close()


def export_bundle(ctx: Context, name: str) -> DomainBundle:
    verified = current(ctx, name)
    return DomainBundle(verified.sealed, verified.chain)


def verify_bundle(ctx: Context, bundle: DomainBundle) -> VerifiedDomain:
    """Verify a bundle (e.g. a CIPHERDIR's copy) against this store's pinned root."""
    return verify_domain(bundle.domain, bundle.chain, ctx.store.anchor())


class DomainKeys:
    """An opened Domain: derives keys inside an HSM of its Trust, failing over between them.

    If the serving HSM fails (token removed, module error, session lost), the next ``derive``
    reopens the Domain through any other HSM of the Trust and retries once; with none left it
    raises HsmUnavailableError, or PinError if every HSM refused its PIN (the filesystem turns
    either into EIO with a log line), and tries again at most once a second, so service
    resumes by itself when an HSM comes back. Keys already derived (held by the caller for
    open files) are unaffected.

    A token can vanish without the session noticing: SoftHSM2 keeps session objects (``mk``)
    in memory after the token's files are gone. So before deriving, at most every
    ``PROBE_INTERVAL`` seconds, the serving token is asked whether it is still there
    (C_GetTokenInfo, ~30 us); a token that is gone is dropped and another HSM serves.
    """

    RETRY_INTERVAL = 1.0
    PROBE_INTERVAL = 0.25
    FOLLOW_INTERVAL = 1.0

    def __init__(self, ctx: Context, verified: VerifiedDomain) -> None:
        self.verified = verified
        self.hsm_label: str | None = None
        self._ctx = ctx
        self._lock = threading.Lock()
        self._stack: contextlib.ExitStack | None = None
        self._master_key: domainkeys.MasterKey | None = None  # of the current epoch
        self._older: dict[int, domainkeys.MasterKey] = {}  # earlier epochs, unwrapped on use
        self._hsm: HsmSession | None = None
        self._session: pkcs11.Session | None = None
        self._next_attempt = 0.0
        self._probed = 0.0
        self._token_label: str | None = None
        self._last_problem = "no HSM tried yet"
        self._retired_below = verified.sealed.domain.retired_below  # raise_retirement
        self._store_seen: tuple[int, ...] | None = None  # domains/ and trusts/ (follow_store)
        self._follow_problem = ""  # the last warning follow_store gave (each is given once)
        self._retry_at = 0.0  # when follow_store may read a store that did not verify again
        self._retry_delay = 1.0  # doubled at each failure of an unchanged store, up to 60 s
        self._pending_stamp: tuple[int, ...] | None = None  # read again at _retry_at
        self._stop_following: threading.Event | None = None  # follow_in_background
        #: The newest generation's current epoch, as follow_store last read the store (the
        #: agent tells its clients, which then open that generation: domain-status).
        self.newest_epoch = self.current_epoch
        self._moves = False  # follow_store moves to the newest generation (a mount's handle)
        self._move_problem = ""  # the last warning a move gave (each is given once)
        #: Called (from the following thread) after a move: a mount records the generation it
        #: now uses, as when it became ready (kmsfs.fs.cli).
        self.on_move: Callable[[], None] | None = None
        #: Called with a generation before moving to it; a KmsfsError refuses it (a mount:
        #: what a mount started now checks against this machine's record, kmsfs.fs.cli).
        self.check_move: Callable[[VerifiedDomain], None] | None = None
        self._follower: threading.Thread | None = None

    def _connect(self) -> None:
        """Serve the generation in hand through an HSM of its Trust (lock held)."""
        self._serve(self.verified, *self._open_generation(self.verified))

    def _open_generation(self, verified: VerifiedDomain) -> "_Opened":
        """Open an HSM of *verified*'s Trust and unwrap its current ``mk`` there, its binding
        checked; the stack closes both. Changes nothing in this handle (no lock needed: the
        PKCS#11 calls take :data:`library.CALLS`)."""
        domain = verified.sealed.domain
        refuse_unbound(domain, self._ctx)
        stack = contextlib.ExitStack()
        try:
            hsm = stack.enter_context(open_hsm(self._ctx, verified.trust.trust.hsms))
            wrapped = domain.wrapped_for(hsm.record.id)
            if wrapped is None:
                raise ChainError(
                    f"domain {domain.name}: k is not wrapped to HSM {hsm.record.label}"
                )
            with library.hsm_errors(f"HSM {hsm.record.label}"):
                master_key = domainkeys.unwrap(
                    hsm.session, wrapped.scheme, wrapped.data, domain.current_epoch.data
                )
            stack.callback(_quietly, master_key.destroy)
            with library.hsm_errors(f"HSM {hsm.record.label}"):
                _check_binding(verified, master_key, domain.current_epoch)
        except BaseException:
            stack.close()
            raise
        return stack, master_key, hsm

    def _serve(
        self,
        verified: VerifiedDomain,
        stack: contextlib.ExitStack,
        master_key: domainkeys.MasterKey,
        hsm: HsmSession,
    ) -> None:
        """Serve *verified* through what :meth:`_open_generation` opened (lock held; what was
        served before is the caller's to close)."""
        self.verified = verified
        self._stack, self._master_key, self._session = stack, master_key, hsm.session
        self._hsm = hsm
        self.hsm_label = hsm.record.label
        self._token_label = hsm.session.token.label
        self._probed = time.monotonic()
        log.info("Domain %s: keys served by HSM %s", verified.sealed.domain.name,
                 hsm.record.label)

    def _drop(self) -> None:
        for older in self._older.values():
            _quietly(older.destroy)
        self._older = {}
        if self._stack is not None:
            self._stack.close()
        self._stack = self._master_key = self._session = self._hsm = None

    @property
    def current_epoch(self) -> int:
        return self.verified.sealed.domain.current_epoch.epoch

    @property
    def retired_below(self) -> int:
        """File keys of epochs below this are refused (1: none are); see :meth:`follow_store`."""
        return self._retired_below

    def raise_retirement(self, below: int) -> None:
        """Refuse file keys below *below* from now on: a newer generation of the Domain (made
        since this one was opened) retires them. Never lowered."""
        with self._lock:
            self._retired_below = max(self._retired_below, below)

    def follow_store(self) -> None:
        """Take in a retirement that reached the store after this handle was opened: a newer
        generation of the Domain made by ``kmsfs-admin domain retire`` makes this handle refuse
        the file keys it retired, and files that are open with them (ContentKeys.refuses),
        instead of until the mount or the agent starts again. Otherwise a mount would go on
        accepting contents keyed with an epoch that an HSM the Trust removed could compute (and
        so could have made), and writing new files with it that the next mount could not read.
        A mount calls it once a second from a thread of its own (:meth:`follow_in_background`:
        the store may be slow or hung, and a history of many generations takes a tenth of a
        second to verify, neither of which may fall on a request); the agent, before every
        derivation.

        The history is read only when the store's domains/ or trusts/ changed since it last
        verified (a new generation adds a file there): one stat each otherwise. A store whose
        documents do not verify now (a file half copied, a generation whose Trust has not
        arrived yet) leaves the handle as it was, with a warning, and is read again until it
        verifies: at once if it changed, else after 1, 2, 4... up to 60 s. Only a history this
        handle's generation is part of counts (a same-named Domain the store got since is
        another one).

        A mount's handle (:meth:`follow_in_background`) also moves to the newest generation
        (:meth:`_move`): a rotation then reaches new files at once. The agent's handles stay
        on their generation; it notes the newest one's epoch (``newest_epoch``) for its
        clients, which then open it."""
        try:
            stamp = tuple(
                value
                for sub in ("domains", "trusts")
                for st in (os.stat(self._ctx.store.root / sub),)
                # ctime too: whoever owns the store can put an mtime back (utime), not a ctime
                for value in (st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            )
        except OSError:
            return
        if stamp == self._store_seen:
            return
        now = time.monotonic()
        if stamp == self._pending_stamp and now < self._retry_at:
            return  # read again later: a store that stays broken, or one that changed just now
        started = time.time_ns()
        name = self.verified.sealed.domain.name
        try:
            generations = history(self._ctx, name)
        except NotFoundError:  # opened from a bundle the store does not hold
            generations = []
        except KmsfsError as exc:
            problem = str(exc)
            self._look_again_later(stamp, now, bool(self._follow_problem))
            if problem != self._follow_problem:
                self._follow_problem = problem
                log.warning("Domain %s: its documents in the store do not verify now (%s); "
                            "keys are served as they were until they do", name, exc)
            return
        self._follow_problem = ""
        # Git's rule for racy stamps: a directory changed within the last seconds may change
        # again within the same timestamp (a file linked in, its temporary name unlinked, on
        # a file system with coarse timestamps): look again next time rather than trust it.
        if max(stamp[1], stamp[4]) < started - RACY_STAMP_NS:  # the two mtimes
            self._store_seen = stamp
        else:  # at most once a second meanwhile: the agent calls this for every derivation
            self._pending_stamp, self._retry_at = stamp, now + self.FOLLOW_INTERVAL
        if self.verified.sealed.id not in {g.sealed.id for g in generations}:
            return  # another Domain of that name, or none
        newest = generations[-1].sealed.domain
        self.newest_epoch = newest.current_epoch.epoch
        moving = self._moves and generations[-1].sealed.id != self.verified.sealed.id
        serving = newest.current_epoch.epoch if moving else self.current_epoch
        if newest.retired_below > self._retired_below:
            log.warning(
                "Domain %s: generation %d retires key epochs below %d: files keyed with them "
                "are refused from now on%s", name, newest.generation, newest.retired_below,
                "; this handle's own epoch is among them, so new files fail until the Domain "
                "is opened again (remount)" if serving < newest.retired_below else "",
            )
        self.raise_retirement(newest.retired_below)  # first: a move may take a while, or fail
        if moving:
            self._move(generations[-1], stamp, now)

    def _move(self, newest: VerifiedDomain, stamp: tuple[int, ...], now: float) -> None:
        """Serve *newest*, a later generation of this handle's Domain (a rotation, a rewrap,
        a retirement made since it was opened), as a mount started now would: new files get
        its current epoch at once, and its Trust's HSMs serve. Otherwise a mount running
        through a rotation kept keying new files with the old epoch, which the HSM the
        rotation was for can compute, until it was remounted (DESIGN §2.7).

        First, what a mount started now would check: :attr:`check_move` (a mount: this
        machine's record of the newest generation it mounted, kmsfs.fs.seen, which refuses a
        rival). Then the newest generation's ``mk`` is unwrapped in an HSM of its Trust (its
        binding checked) without the handle's lock (PKCS#11 calls still take the process's
        :data:`library.CALLS`, so a slow login there delays derivations); only then does the
        handle serve it. An HSM this process has not seen yet (made since the mount started:
        SoftHSM2 shows a new token only after C_Initialize, which waits until no session of
        the module is open) is opened with the handle's own sessions closed, under its lock
        (:meth:`_move_alone`). If anything fails, the handle serves as it was, with one warning
        per distinct problem, and tries again after 1, 2, 4... up to 60 s. Keys already
        derived stay with the open files that hold them (their epochs stay in the Domain,
        unless retired)."""
        name = newest.sealed.domain.name
        stop = self._stop_following
        try:
            if self.check_move is not None:
                self.check_move(newest)
            try:
                opened: _Opened | None = self._open_generation(newest)
            except HsmUnavailableError:
                self._move_alone(newest, stop)
                opened = None
        except Exception as exc:
            self._move_failed(newest, exc, stamp, now)
            return
        if opened is not None:
            with self._lock:
                if stop is not None and stop.is_set():  # closed meanwhile: serve nothing new
                    opened[0].close()
                    return
                old_stack, old_older = self._stack, self._older
                self._older = {}  # unwrapped in the old session, which goes now
                self._serve(newest, *opened)
            for older in old_older.values():
                _quietly(older.destroy)
            if old_stack is not None:
                old_stack.close()
        elif stop is not None and stop.is_set():
            return
        self._move_problem = ""
        log.info(
            "Domain %s: now serving generation %d: new files get key epoch %d", name,
            newest.sealed.domain.generation, self.current_epoch,
        )
        if self.on_move is not None and not (stop is not None and stop.is_set()):
            self.on_move()

    def _move_alone(self, newest: VerifiedDomain, stop: threading.Event | None) -> None:
        """Serve *newest* through an HSM of its Trust opened with this handle's sessions
        closed first (lock held throughout, so derivations wait): a token made since this
        process started is found only by a rescan, which open sessions prevent. If that fails
        too, the handle serves its old generation again (or the next derive reconnects it),
        and the failure is raised."""
        with self._lock:
            if stop is not None and stop.is_set():
                return
            self._drop()
            try:
                self._serve(newest, *self._open_generation(newest))
            except BaseException:
                with contextlib.suppress(KmsfsError):
                    self._connect()
                raise

    def _look_again_later(self, stamp: tuple[int, ...], now: float, same_problem: bool) -> None:
        """Read the store again after 1 s, or after twice as long as last time (up to 60 s)
        when it has not changed since and the problem is the one it had then."""
        unchanged = same_problem and stamp == self._pending_stamp
        self._retry_delay = min(self._retry_delay * 2, 60.0) if unchanged else 1.0
        self._pending_stamp, self._retry_at = stamp, now + self._retry_delay

    def _move_failed(
        self, newest: VerifiedDomain, exc: Exception, stamp: tuple[int, ...], now: float
    ) -> None:
        """Leave the handle as it was and read the store again after 1, 2, 4... 60 s; one
        warning per distinct problem (a traceback for one that is not kmsfs's own)."""
        problem = str(exc) if isinstance(exc, KmsfsError) else repr(exc)
        self._store_seen = None
        self._look_again_later(stamp, now, problem == self._move_problem)
        if problem == self._move_problem:
            return
        self._move_problem = problem
        epoch = self.current_epoch
        meanwhile = (f"new files keep key epoch {epoch} until it can" if epoch >=
                     self._retired_below else f"new files fail (epoch {epoch} is retired) "
                     "until it can")
        (log.warning if isinstance(exc, KmsfsError) else log.exception)(
            "Domain %s: cannot serve its generation %d yet (%s); %s",
            newest.sealed.domain.name, newest.sealed.domain.generation, problem, meanwhile,
        )

    def follow_in_background(self) -> None:
        """Call :meth:`follow_store` every :data:`FOLLOW_INTERVAL` seconds from a daemon thread
        until :meth:`close` (a mount: kmsfs.fs.cli), moving to each newer generation of the
        Domain as it reaches the store (:meth:`_move`). The agent does not move its handles:
        it closes those of a Domain it makes a generation of, and tells its clients of any
        other (``newest_epoch``), which then open the newest."""
        if self._stop_following is not None:
            return
        self._moves = True
        stop = self._stop_following = threading.Event()

        def follow() -> None:
            while not stop.wait(self.FOLLOW_INTERVAL):
                try:
                    self.follow_store()
                except Exception:  # never seen; the thread must not end with it
                    log.exception("Domain %s: following the store failed",
                                  self.verified.sealed.domain.name)

        self._follower = threading.Thread(target=follow, name="kmsfs-follow-store", daemon=True)
        self._follower.start()

    def _key_of(self, epoch: int) -> domainkeys.MasterKey:
        """The unwrapped ``mk`` of ``epoch`` in the serving HSM (lock held, connected)."""
        assert self._master_key is not None and self._hsm is not None
        if epoch == self.current_epoch:
            return self._master_key
        if epoch not in self._older:
            domain = self.verified.sealed.domain
            wrapped = domain.wrapped_for(self._hsm.record.id)
            assert wrapped is not None
            older = domainkeys.unwrap(
                self._hsm.session, wrapped.scheme, wrapped.data, domain.master_keys[epoch - 1].data
            )
            try:
                self._check_binding(older, domain.master_keys[epoch - 1])
            except BaseException:
                _quietly(older.destroy)
                raise
            self._older[epoch] = older
        return self._older[epoch]

    def _check_binding(self, key: domainkeys.MasterKey, epoch: MasterKeyEpoch) -> None:
        _check_binding(self.verified, key, epoch)

    def open(self) -> "DomainKeys":
        with self._lock:
            self._connect()
        return self

    def check_every_epoch(self) -> None:
        """Check the binding of every ``mk`` epoch now, not only the current one's (an older
        one is otherwise checked when first used)."""
        with self._lock:
            if self._master_key is None:
                self._connect()
            for epoch in self.verified.sealed.domain.master_keys:
                self._key_of(epoch.epoch)

    def _probe(self) -> None:
        """Drop the serving HSM if its token is gone (rate-limited; lock held)."""
        now = time.monotonic()
        if self._session is None or now - self._probed < self.PROBE_INTERVAL:
            return
        self._probed = now
        try:
            library.check_present(self._session, self._token_label or "")
        except HsmError as exc:
            log.error("HSM %s failed (%s); failing over", self.hsm_label, exc)
            self._drop()

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        """HMAC-SHA256(mk of ``epoch``, info) in the HSM; None means the current epoch."""
        return self.derive_many([info], epoch)[0]

    def derive_many(self, infos: Sequence[bytes], epoch: int | None = None) -> list[bytes]:
        """:meth:`derive` for each info, under one lock, probe and failover scope: a mount
        refilling its keys for new files asks for them in one call."""
        epoch = self.current_epoch if epoch is None else epoch
        if any(info.startswith(BINDING_INFO_PREFIX) for info in infos):
            raise UsageError("a key derivation may not use the prefix of Domain key bindings")
        domain = self.verified.sealed.domain
        if domain.epoch(epoch) is None:
            raise IntegrityError(
                f"Domain {domain.name} has no key epoch {epoch} "
                f"(its epochs are 1 to {self.current_epoch})"
            )
        retired_below = self._retired_below
        if epoch < retired_below and not VOLUME_KEY_INFOS.issuperset(infos):
            # Whoever kept this epoch's mk (an HSM the Trust removed) could have made the data.
            raise IntegrityError(
                f"key epoch {epoch} of Domain {domain.name} is retired (kmsfs-admin domain "
                f"retire: epochs below {retired_below}): data keyed with it is refused"
            )
        with self._lock:
            self._probe()
            for _ in range(2):
                if self._master_key is None:
                    if time.monotonic() < self._next_attempt:
                        raise HsmUnavailableError(
                            f"no HSM of the Domain's trust answers: {self._last_problem} "
                            f"(retrying every {self.RETRY_INTERVAL:g} s)"
                        )
                    try:
                        self._connect()
                    except HsmError as exc:
                        self._next_attempt = time.monotonic() + self.RETRY_INTERVAL
                        self._last_problem = str(exc)
                        raise
                assert self._master_key is not None
                try:
                    with library.hsm_errors(f"HSM {self.hsm_label}"):
                        return self._key_of(epoch).derive_many(infos)
                except HsmError as exc:
                    log.error("HSM %s failed (%s); failing over", self.hsm_label, exc)
                    self._drop()
            raise HsmUnavailableError("no HSM of the Domain's trust could derive the key")

    def master_key_is_readable(self) -> bool:
        with self._lock:
            return self._master_key is not None and self._master_key.value_is_readable()

    def fail_session_for_test(self) -> None:
        """Fault injection: close the serving HSM session as a failing token would."""
        with self._lock:
            if self._session is not None:
                self._session.close()

    def stop_following(self) -> None:
        """End :meth:`follow_in_background`, waiting up to :data:`CLOSE_WAIT` seconds for a
        look (a move) under way: a mount calls it before it gives up the volume's lock, since
        a move rewrites the volume's config (:attr:`on_move`)."""
        if self._stop_following is not None:
            self._stop_following.set()
            follower = self._follower
            if follower is not None and follower is not threading.current_thread():
                follower.join(CLOSE_WAIT)  # a hung store or HSM is not waited for

    def close(self) -> None:
        self.stop_following()
        with self._lock:
            self._drop()


def _check_binding(
    verified: VerifiedDomain, key: domainkeys.MasterKey, epoch: MasterKeyEpoch
) -> None:
    """Refuse an ``mk`` epoch whose binding (computed by the HSM now) is not the one the
    Domain carries: its wrapped keys are another Domain's (:mod:`kmsfs.model.domain`)."""
    domain = verified.sealed.domain
    info = binding_info(domain.name, epoch.epoch, verified.chain[0].id)
    if epoch.binding is None or not hmac.compare_digest(key.derive_many([info])[0], epoch.binding):
        raise _unbound(domain, epoch.epoch)


def _quietly(action: "Callable[[], None]") -> None:
    with contextlib.suppress(Exception):
        action()


def newest_verified(
    ctx: Context, bundle: DomainBundle, what: str = "the copy of the domain it carries"
) -> VerifiedDomain:
    """The store's newest generation of the bundle's Domain, if it descends from it, verified.
    *what* names the bundle in a refusal (a volume's copy, or a file being imported).

    A CIPHERDIR carries the Domain as it was when the directory was made; after a rewrap (an
    HSM revoked) the store holds a newer generation, and that is the one to use. A bundle the
    store does not hold is accepted only as the very next generation of the store's newest (a
    store not yet merged with the one that made it), and a bundle older than every generation
    the store holds (a store rebuilt from an export of its newest) only if the key bindings
    show the store's generations keep its master keys (:func:`verify_generation_descent`);
    anything else (a rival generation, one that goes back to an older Trust) is refused,
    whatever seal it carries. The result is verified: callers use it as it is, without
    verifying it again.
    """
    try:
        generations = history(ctx, bundle.domain.domain.name)
    except NotFoundError:  # a store that does not know the Domain: the bundle is verified alone
        return verify_bundle(ctx, bundle)
    if generations[-1].sealed.id == bundle.domain.id:
        return verify_bundle(ctx, bundle)  # the bundle's own chain must verify too
    if any(g.sealed.id == bundle.domain.id for g in generations):
        return generations[-1]  # an older generation: the store's newest, verified in history
    verified = verify_bundle(ctx, bundle)
    if verified.sealed.domain.generation < generations[0].sealed.domain.generation:
        # Older than all the store holds: a store rebuilt from an export of the newest
        # generation (operators.md §4) lacks the ones between. The newest is used, as for an
        # older generation it holds, once the key bindings show it has the same master keys.
        try:
            verify_generation_descent(verified, generations[0])
        except ChainError as exc:
            raise ChainError(f"{exc} ({what} is older than the store's history)") from None
        return generations[-1]
    try:
        verify_generation_step(generations[-1], verified)
    except ChainError as exc:
        raise ChainError(
            f"{exc} ({what} is not in the store's history; if it comes from another copy of "
            "the store, merge that copy first)"
        ) from None
    return verified


@contextlib.contextmanager
def open_keys(ctx: Context, bundle: DomainBundle) -> Iterator[DomainKeys]:
    """Verify the newest generation of ``bundle``'s Domain against this store's root and
    unwrap its current ``mk`` in an HSM of its Trust."""
    keys = DomainKeys(ctx, newest_verified(ctx, bundle)).open()
    try:
        yield keys
    finally:
        keys.close()
