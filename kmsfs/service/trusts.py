"""Trust actions: propose, approve (operator signature), seal (HSM signature), verify.

Sealing is where the policy is enforced: an HSM of the Trust signs only after this code has
re-verified the whole chain to the pinned root and counted ``quorum`` valid approvals of the
Trust's own operators and, for a successor, ``quorum`` of the predecessor's.
"""

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from kmsfs.errors import (
    AlreadyExistsError,
    ChainError,
    IntegrityError,
    KmsfsError,
    NotFoundError,
    StoreError,
    UsageError,
)
from kmsfs.hsm.pins import PinSource
from kmsfs.model import contexts
from kmsfs.model import line as line_model
from kmsfs.model.records import HsmRecord
from kmsfs.model.trust import (
    Member,
    QuorumResult,
    SealedTrust,
    Signature,
    Trust,
    quorum_result,
    valid_approvals,
)
from kmsfs.model.verify import Anchor, verify_approvals, verify_chain, verify_hsm_seal, verify_trust
from kmsfs.service import hsms, operators
from kmsfs.service.context import Context, open_hsm, utc_now

log = logging.getLogger(__name__)

_PROPOSE_ATTEMPTS = 3  # tries, a second apart, for a timestamp no identical proposal has


def resolve_trust(ctx: Context, ref: str) -> str:
    return ctx.store.resolve("trust", ref, ctx.store.trust_ids())


def valid_seal(ctx: Context, trust: Trust) -> Signature | None:
    """A stored seal that is a valid signature by an HSM of the Trust, if any: one by an HSM
    its predecessor lists too, where there is one.

    Why the preference: a successor of the genesis must be sealed by an HSM of the genesis
    (verify_trust). Taking the first valid seal in file order, one more valid seal by another
    of its HSMs (whose PIN holder needs no quorum to add it) that sorted first made every chain
    through the Trust fail.
    """
    previous = None
    if trust.predecessor is not None:
        with contextlib.suppress(KmsfsError):  # missing or damaged: the chain says so
            previous = ctx.store.trust(trust.predecessor)
    other_valid = None
    for seal in ctx.store.signatures("seal", trust.id):
        try:
            verify_hsm_seal(trust, seal, contexts.HSM_SEALS_TRUST, trust.signed_bytes(), "trust")
        except IntegrityError:
            continue
        if previous is None or previous.hsm(seal.key_id) is not None:
            return seal
        other_valid = other_valid or seal
    return other_valid


def sealed_trust(ctx: Context, trust_id: str) -> SealedTrust:
    trust = ctx.store.trust(trust_id)
    seal = valid_seal(ctx, trust)
    if seal is None:
        raise ChainError(f"trust {trust_id[:12]} is not sealed")
    return SealedTrust(trust, tuple(ctx.store.signatures("approval", trust_id)), seal)


def chain_to(ctx: Context, trust_id: str) -> list[SealedTrust]:
    """The sealed Trusts from the root to ``trust_id`` (unverified: pass to verify_chain)."""
    chain: list[SealedTrust] = []
    seen: set[str] = set()
    current: str | None = trust_id
    while current is not None:
        if current in seen:
            raise ChainError(f"trust {current[:12]}: the chain loops")
        seen.add(current)
        try:
            link = sealed_trust(ctx, current)
        except NotFoundError:
            raise ChainError(f"trust {current[:12]} is missing from {ctx.store.root}") from None
        chain.append(link)
        current = link.trust.predecessor
    return list(reversed(chain))


def verified_chain(ctx: Context, trust_id: str) -> list[SealedTrust]:
    chain = chain_to(ctx, trust_id)
    verify_chain(chain, ctx.store.anchor())
    return chain


@dataclass(frozen=True)
class Line:
    """This store's line of Trusts as its head pins it (:mod:`kmsfs.model.line`).

    ``chain``: head's verified chain, root first; None where the store has no head (its line
    forked before it kept one, or this process cannot read its private area): every link's
    rivals are then a fork, as before heads were kept. ``lost``: why the head the store
    pinned is gone (:func:`line` refuses such a store; ``trust list`` shows it)."""

    head: str | None
    chain: tuple[str, ...] | None
    lost: str | None = None
    #: The part of ``chain`` the operators chose (up to :meth:`Store.decided`): a rival of a
    #: link in it is no fork for this store. Past it, the head moved by itself, as the store's
    #: documents allowed: a replica that got a rival line first and then the honest one must
    #: still see a fork there, not take whichever came first for its own (review of the day).
    decided_chain: tuple[str, ...] | None = None

    def place(self, chain: Sequence[str]) -> str | None:
        """:func:`kmsfs.model.line.place` of *chain* (ids from the root); None with no head."""
        return None if self.chain is None else line_model.place(chain, self.chain)


def line(ctx: Context) -> Line:
    """This store's line of Trusts: its head, moved forward to the newest Trust this store
    can verify along links that do not fork, and written back where the private area can be
    written (:func:`resolve_line`). ChainError if the head's document is missing or no longer
    verifies: whoever can write the public documents removed the newest link (and maybe
    planted a rival line in its place), or the store was synced from an older copy. Followed
    as it is, the store would take the rival line for its own and wrap Domain keys to it."""
    found = resolve_line(ctx)
    if found.lost is not None:
        assert found.head is not None
        raise ChainError(lost_head(ctx, found))
    return found


def lost_head(ctx: Context, found: Line) -> str:
    """The one line that says *found*'s head is gone (:func:`line`)."""
    return (
        f"this store's head, trust {(found.head or '')[:12]} (the newest Trust of its line it "
        f"verified, pinned in {ctx.store.head_path}), is missing or no longer verifies "
        f"({found.lost}): the store lost the newest link of its line of Trusts (a rollback, or "
        "a sync from an older copy); restore it from a sync or a backup"
    )


def resolve_line(ctx: Context) -> Line:
    """:func:`line` without the refusal: a lost head comes back with ``lost`` set.

    The head moves forward only, one sealed link at a time, and only while exactly one sealed
    successor of the current head verifies: two are a fork the operators settle (``trust
    pin`` names one), and the store must not settle it by what it happened to read first. It
    never steps from the genesis to a successor this store has not pinned (that is the
    operators' choice too: ``trust pin``). A store with no head yet (made before heads were
    kept) gets one here, walking from the genesis, unless its line forks on the way.
    """
    stored, decided = ctx.store.head(), ctx.store.decided()
    anchor = ctx.store.anchor()
    try:
        start = verified_chain(ctx, stored if stored is not None else anchor.root)
        chosen = verified_chain(ctx, decided) if decided is not None else None
    except KmsfsError as exc:
        if stored is None:
            return Line(None, None)  # no verifying genesis: every command says why
        return Line(stored, None, lost=str(exc))
    chain, forked = _walk_forward(ctx, start)
    if stored is None and forked:
        return Line(None, None)  # no head until the operators name one
    head = chain[-1].id
    ids = tuple(link.id for link in chain)
    if chosen is None:  # a first use: the operators chose what the store pinned
        decided = anchor.successor or anchor.root
        chosen_ids: tuple[str, ...] = ids[: ids.index(decided) + 1] if decided in ids else ids[:1]
    else:
        chosen_ids = tuple(link.id for link in chosen)
    # What was chosen, as far as it is on head's line (a head set back by hand: the common part)
    chosen_ids = ids[: line_model.divergence(chosen_ids, ids)]
    if head != stored:
        try:
            ctx.store.set_head(head, expect=stored, decided=chosen_ids[-1])
        except KmsfsError as exc:  # a full disk: the head in memory serves this command
            log.warning("%s", exc)
    return Line(head, ids, decided_chain=chosen_ids)


def _walk_forward(
    ctx: Context, chain: list[SealedTrust]
) -> tuple[list[SealedTrust], bool]:
    """*chain* extended by each next link while its tip has exactly one sealed successor
    that verifies; and whether it stopped at a fork (two or more)."""
    anchor = ctx.store.anchor()
    children: dict[str, list[str]] = {}
    for other in ctx.store.trust_ids():
        try:
            parent = ctx.store.trust(other).predecessor
        except KmsfsError:
            continue  # a damaged document: the commands that read it say so
        if parent is not None:
            children.setdefault(parent, []).append(other)
    while True:
        tip = chain[-1].id
        if tip == anchor.root and anchor.successor is None:
            return chain, False
        found = []
        for child in children.get(tip, []):
            with contextlib.suppress(KmsfsError):  # a proposal, or a seal without quorums
                found.append(verified_chain(ctx, child))
        if len(found) != 1:
            return chain, len(found) > 1
        chain = found[0]


def successor(ctx: Context, trust_id: str) -> SealedTrust | None:
    """The newest sealed Trust of this store's line (:func:`line`) that descends from
    ``trust_id``; None if none does. A Trust of a rival line is never one: that is what the
    head is for. ChainError where the store lost its head (:func:`line`).

    A successor is how operators revoke: the HSMs (and operators) it leaves out still hold
    their keys, and under the older Trust one of those HSMs alone can seal a Domain or a
    generation that verifies. So nothing new is made under a superseded Trust, and a client
    does not bind a new volume to a Domain still governed by one (it is rewrapped first).
    """
    ours = line(ctx)
    # Which Trusts descend from it, by their predecessor ids alone (no signature checked):
    # usually none, so a mount pays for parsing the Trusts, not for verifying each one's chain.
    parents: dict[str, str | None] = {}
    for other in ctx.store.trust_ids():
        try:
            parents[other] = ctx.store.trust(other).predecessor
        except KmsfsError:
            continue

    def ancestors(node: str) -> list[str]:
        found: list[str] = []
        parent = parents.get(node)
        while parent is not None and parent not in found:
            found.append(parent)
            parent = parents.get(parent)
        return found

    descendants = [t for t in parents if trust_id in ancestors(t)]
    for candidate in sorted(descendants, key=lambda t: len(ancestors(t)), reverse=True):
        try:
            chain = verified_chain(ctx, candidate)  # newest first: the first that verifies
        except KmsfsError:
            continue  # a proposal not sealed yet, or a Trust that does not verify
        if ours.place([link.id for link in chain]) == line_model.RIVAL:
            continue  # another line than this store's: never its successor
        if trust_id in (link.id for link in chain[:-1]):
            return chain[-1]
    return None


def trusted_hsms(ctx: Context) -> dict[str, HsmRecord]:
    """The HSMs of every Trust in the store whose chain verifies from its pinned root, by id.

    Not every record in ``hsms/``: a record is only self-signed, so whoever can write the store
    can add one. What signs or verifies on the store's behalf (audit checkpoints) uses these."""
    found: dict[str, HsmRecord] = {}
    for trust_id in ctx.store.trust_ids():
        try:
            chain = verified_chain(ctx, trust_id)
        except KmsfsError:
            continue  # a proposal not sealed yet, or a Trust that does not verify
        for hsm in chain[-1].trust.hsms:
            found[hsm.id] = hsm
    return found


def propose(
    ctx: Context,
    hsm_refs: Sequence[str],
    operator_names: Sequence[str],
    quorum: int,
    predecessor_ref: str | None = None,
) -> Trust:
    """Write a Trust proposal; it is inert until approved and sealed."""
    if not hsm_refs:
        raise UsageError("a trust needs at least one --hsm")
    if not operator_names:
        raise UsageError("a trust needs at least one --operator (only the genesis has none)")
    if len(set(operator_names)) != len(operator_names):
        raise UsageError("an --operator is given twice")
    if not 1 <= quorum <= len(operator_names):
        raise UsageError(
            f"--quorum must be between 1 and {len(operator_names)} (the operator count)"
        )
    records = _distinct_hsms(ctx, hsm_refs)
    members = tuple(Member(r.name, r.key) for r in (ctx.store.operator(n) for n in operator_names))
    anchor = ctx.store.anchor()
    if predecessor_ref:
        predecessor = resolve_trust(ctx, predecessor_ref)
    elif anchor.successor is None:
        predecessor = anchor.root  # the first Trust with operators succeeds the genesis
    else:
        raise UsageError("give --predecessor: the trust this one succeeds")
    _check_genesis_successor(anchor, predecessor)
    serial = verified_chain(ctx, predecessor)[-1].trust.serial + 1
    for attempt in range(_PROPOSE_ATTEMPTS):
        if attempt:
            time.sleep(1.0 - time.time() % 1.0 + 0.01)  # into the next second
        trust = Trust(serial, predecessor, tuple(records), members, quorum, utc_now())
        if ctx.store.save_trust(trust):
            return trust
        # The same content proposed in the same second has the same id: that proposal may
        # carry approvals already, or be sealed. Every propose writes a new one.
    raise AlreadyExistsError(
        f"trust {trust.id} exists already with the same content, at each of "
        f"{_PROPOSE_ATTEMPTS} tries a second apart: another proposer is writing it; try again"
    )


def _distinct_hsms(ctx: Context, hsm_refs: Sequence[str]) -> list[HsmRecord]:
    """The HSMs the refs name, each once: two refs of one HSM (its label and an id prefix)
    are a usage error here, not a malformed Trust (exit 7) once the document is built."""
    records: list[HsmRecord] = []
    named: dict[str, str] = {}
    for ref in hsm_refs:
        record = hsms.resolve_hsm(ctx, ref)
        if record.id in named:
            raise UsageError(
                f"--hsm {named[record.id]} and --hsm {ref} name the same HSM ({record.label})"
            )
        named[record.id] = ref
        records.append(record)
    return records


def _pinned_rival(anchor: Anchor, predecessor: str | None, trust_id: str | None) -> str | None:
    """The pinned successor of the genesis, if ``predecessor`` is the genesis and that
    successor is another Trust than ``trust_id``: a rival of it is refused everywhere
    (verify_chain), so it can never be sealed here.

    Only the genesis: a later Trust may have two sealed successors (each approved by its
    quorum, which is the operators' choice), so a rival of those is not dead.
    """
    if predecessor == anchor.root and anchor.successor not in (None, trust_id):
        return anchor.successor
    return None


def _check_genesis_successor(anchor: Anchor, predecessor: str, trust_id: str | None = None) -> None:
    """The genesis has exactly one successor per store: the first one sealed here is pinned.

    ``trust_id`` None is a proposal (``--predecessor`` is the way out); otherwise the Trust
    is being sealed, and seal has no option that could help."""
    pinned = _pinned_rival(anchor, predecessor, trust_id)
    if pinned is None:
        return
    if trust_id is None:
        raise UsageError(
            f"the genesis already has its successor {pinned[:12]} (pinned by this "
            "store); a rival would be refused everywhere: give --predecessor "
            f"{pinned[:12]} (or a later Trust of its line)"
        )
    raise UsageError(
        f"trust {trust_id[:12]} can never be sealed: the genesis already has its successor "
        f"{pinned[:12]} (pinned by this store) and a rival would be refused everywhere; use "
        f"trust {pinned[:12]}, or propose a successor of it ('trust propose --predecessor "
        f"{pinned[:12]}')"
    )


def sealed_rivals(ctx: Context, trust: Trust) -> tuple[str, ...]:
    """The other Trusts of the store that succeed *trust*'s predecessor, are sealed and verify:
    with *trust* sealed too, two valid lines of Trusts (:func:`list_status`)."""
    if trust.predecessor is None:
        return ()
    rivals = []
    for other_id in ctx.store.trust_ids():
        if other_id == trust.id:
            continue
        try:
            other = ctx.store.trust(other_id)
            if other.predecessor == trust.predecessor and _verifies(ctx, other_id):
                rivals.append(other_id)
        except KmsfsError:
            continue  # a damaged document is no rival (the commands that read it say so)
    return tuple(sorted(rivals))


def first_fork(
    ctx: Context, chain: Sequence[SealedTrust], ours: Line | None = None
) -> tuple[str, str] | None:
    """(link, rival) for the first link of *chain* whose predecessor has another sealed
    successor in the store that verifies, among the links that can still fork for this
    store (:func:`kmsfs.model.line.links_after_head`: those after its head; all past the
    genesis where it has none, or for *ours* None); None if none does. Verifying a sibling
    is the cost, so only siblings sealed by some HSM are."""
    ids = [link.id for link in chain]
    decided = ours.decided_chain if ours is not None else None
    for index in line_model.links_after_head(ids, decided):
        rivals = sealed_rivals(ctx, chain[index].trust)
        if rivals:
            return chain[index].id, rivals[0]
    return None


def refuse_forked_line(ctx: Context, chain: Sequence[SealedTrust], what: str) -> None:
    """UsageError unless *chain* is on this store's line of Trusts (:func:`line`) and does
    not fork after its head: nothing new is keyed on a rival line, nor on one that another
    valid line contests. ChainError where the store lost its head.

    Why at use, not only at seal: a successor needs its predecessor's quorum, counted over the
    predecessor's operators, and a superseded Trust keeps that power. Operators a successor
    removed (a stolen key), or fewer operators than a successor's raised quorum, can still
    approve a rival successor of the older Trust, sealed by an "HSM" of their own that it
    lists, and it verifies (review). Rewrapped into it, a Domain's fresh ``k`` would be theirs.

    The store's head decides between lines it has seen: a chain that leaves head's line is a
    rival, refused whatever else the store holds (deleting the honest successor does not make
    the rival this store's: :func:`line` refuses a lost head), and a rival of a link up to
    head is no fork (planting one no longer blocks the honest line). Links after head can
    still fork (two sealed successors of head, from two sites): refused until the operators
    keep one (``trust pin`` one, or remove the other's documents). A store without a head
    treats every link so, as before heads were kept."""
    ours = line(ctx)
    ids = [link.id for link in chain]
    if ours.place(ids) == line_model.RIVAL:
        assert ours.chain is not None and ours.head is not None
        at = line_model.divergence(ids, ours.chain)
        raise UsageError(
            f"trust {ids[-1][:12]} is not on this store's line of Trusts: its link "
            f"{ids[at][:12]} is a rival of {ours.chain[at][:12]}, which this store's line "
            f"(head {ours.head[:12]}) holds, and was sealed with its predecessor's quorum too "
            f"(in each line, what the other removed still governs); will not {what} on a "
            "rival line (trust list shows it)"
        )
    fork = first_fork(ctx, chain, ours)
    if fork is not None:
        link, rival = fork
        raise UsageError(
            f"trust {chain[-1].id[:12]}'s line of Trusts forks: its link {link[:12]} has the "
            f"rival {rival[:12]}, sealed with its predecessor's quorum too (in each line, what "
            f"the other removed still governs); will not {what} on a forked line: the "
            "operators keep one line ('trust pin' the one to keep, or remove the other's "
            "Trust documents from the store; trust list shows the fork)"
        )


def refuse_second_genesis_successor(ctx: Context, trust: Trust) -> None:
    """UsageError before sealing *trust*, a successor of the genesis, in a store that has not
    pinned one yet but holds another that verifies (synced there): the genesis has one
    successor per store, and which one is the operators' choice (``trust pin``), never who
    seals first (review: through the agent, any client allowed ``seal-trust``, with no PIN,
    could pin its own over the operators' sealed one). ``--fork`` does not change this."""
    anchor = ctx.store.anchor()
    if trust.predecessor == anchor.root and anchor.successor is None:
        refuse_rival_successors(ctx, anchor.root, trust.id, then="seal")


def needs_no_seal(ctx: Context, status: "TrustStatus") -> bool:
    """True if ``trust seal`` has nothing to do for *status*'s Trust: it is sealed, its chain
    verifies, and a successor of the genesis is the one this store pins. Anything less (a
    seal without the quorums, by an HSM the genesis lacks, a synced successor not pinned
    yet, a rival of the pinned one) goes to :func:`seal`, which refuses or completes it."""
    trust = status.trust
    if not status.sealed_by or not _verifies(ctx, trust.id):
        return False
    anchor = ctx.store.anchor()
    return trust.predecessor != anchor.root or anchor.successor == trust.id


def refuse_fork(ctx: Context, trust: Trust) -> None:
    """UsageError, before any HSM signs, if sealing *trust* would fork its line here: the
    store holds another sealed successor of its predecessor that verifies. Two sites that
    each sealed one before a sync make such a fork, which ``trust list`` shows; one site that
    seals both (two proposals of one change, say: propose warns of those) made it with no
    word, and in each line what the other removed still governs. ``trust seal --fork`` is
    how operators who mean a second line (the first one's operators lost, say) say so."""
    if lost_to(ctx, trust) is not None:
        return  # a rival of the genesis's pinned successor: seal's own refusal says why
    rivals = sealed_rivals(ctx, trust)
    if rivals:
        before = (trust.predecessor or "")[:12]
        raise UsageError(
            f"trust {trust.id[:12]} is not sealed: its predecessor {before} already has the "
            f"sealed successor {rivals[0][:12]}, and a second forks the line of Trusts (two "
            "valid lines, in each of which what the other removed still governs); propose "
            f"the change as a successor of {rivals[0][:12]}, or add --fork if a second line "
            "is meant"
        )


def lost_to(ctx: Context, trust: Trust) -> str | None:
    """The sealed successor that makes the proposal ``trust`` dead, if any: its predecessor is
    the genesis, whose one successor this store pinned, and that is another Trust. Such a
    proposal can be neither sealed nor usefully signed (a duplicate proposed twice, say)."""
    return _pinned_rival(ctx.store.anchor(), trust.predecessor, trust.id)


def refuse_dead(ctx: Context, trust: Trust) -> None:
    """UsageError if ``trust`` is a dead proposal (:func:`lost_to`), before anyone's PIN is
    read for it or anything is written."""
    winner = lost_to(ctx, trust)
    if winner is not None:
        raise UsageError(
            f"trust {trust.id[:12]} can never be sealed: the genesis already has its sealed "
            f"successor {winner[:12]} (pinned by this store); nothing signed"
        )


@dataclass(frozen=True)
class Pinned:
    """What :func:`pin` did: the Trust named, whether the genesis's successor was pinned
    already (``already_pinned``), and the store's head after it, moved or not."""

    sealed: SealedTrust
    already_pinned: bool
    head: str
    head_moved: bool


def pin(ctx: Context, trust_ref: str) -> Pinned:
    """Pin a Trust the operators name as this store's: the genesis's successor of its line
    (in a store that received it by sync rather than sealing), and their choice
    (:meth:`Store.decided`), with the store's head (:func:`line`) moved to it where it is not
    on head's line yet.

    Forward only from what the operators chose before: the Trust must verify and its chain
    hold that choice. One before it (backwards), or on another line (sideways), is refused
    before anything is written. Past the choice, the head may have moved by itself onto a
    line a replica happened to get first: naming a Trust of another line there is how the
    operators settle that fork, as naming one of two successors of the head settles one."""
    trust_id = resolve_trust(ctx, trust_ref)
    anchor = ctx.store.anchor()
    chain = verified_chain(ctx, trust_id)
    if len(chain) < 2:
        raise UsageError(f"trust {trust_id[:12]} is the genesis: pin a successor of it")
    if anchor.successor is not None and anchor.successor != chain[1].id:
        raise UsageError(f"this store already pinned {anchor.successor[:12]}")  # unreachable
    ours = line(ctx)
    ids = [link.id for link in chain]
    chosen = ours.decided_chain
    if chosen is not None and line_model.place(ids, chosen) in (line_model.BEFORE,
                                                                line_model.RIVAL):
        at = line_model.divergence(ids, chosen)
        where = ("comes before" if at == len(ids) else
                 f"is on another line (its link {ids[at][:12]} is a rival of "
                 f"{chosen[at][:12]}) than")
        raise UsageError(
            f"trust {trust_id[:12]} {where} trust {chosen[-1][:12]}, which this store's "
            "operators chose last (sealed here or pinned): their choice only moves forward; "
            "nothing written"
        )
    already = anchor.successor == chain[1].id
    if not already:  # pinned already: nothing written (a read-only store too)
        ctx.store.write_config(Anchor(anchor.root, chain[1].id))
    # On head's line already (its head moved past it by itself): the head stays, and the
    # choice is recorded. After it, or beside a part the store took by itself (a replica
    # that got a rival line first): the head moves there.
    on_line = ours.place(ids) in (line_model.BEFORE, line_model.HEAD)
    head = ours.head if on_line and ours.head is not None else trust_id
    moved = head != ours.head
    if not ctx.store.set_head(head, expect=ours.head, decided=trust_id, required=True):
        raise StoreError(
            f"{ctx.store.head_path}: the head of this store's line of Trusts moved while "
            f"trust {trust_id[:12]} was being pinned (another command): run trust pin again"
        )
    return Pinned(chain[-1], already, head, moved)


def refuse_rival_successors(ctx: Context, root: str, chosen: str, then: str = "import") -> None:
    """Before a store pins *chosen*, met in a document from elsewhere (``domain import
    --pin``), as the successor of its genesis *root*: refuse if it holds another successor of
    the genesis that verifies too. Choosing between them is the operators' decision, made by
    naming one to ``trust pin`` (:func:`pin`), not the order in which documents arrived."""
    rivals = []
    for trust_id in ctx.store.trust_ids():
        if trust_id == chosen:
            continue
        try:
            if ctx.store.trust(trust_id).predecessor != root:
                continue
            verify_chain(chain_to(ctx, trust_id), Anchor(root))
        except KmsfsError:
            continue  # not a successor of the genesis that verifies: no rival
        rivals.append(trust_id)
    if rivals:
        raise UsageError(
            f"the store holds another verified successor of the genesis ({rivals[0]}) besides "
            f"{chosen}: ask the operators which one is theirs, pin it with 'kmsfs-admin trust "
            f"pin ID', then {then}"
        )


@dataclass(frozen=True)
class Change:
    """What a Trust lists behind a name (an operator's key id, an HSM's id: ``now``) where
    ``known_from`` gives that name to ``before``: "predecessor" (the Trust it succeeds) or
    "record" (the store's ``operators/NAME.json``, or an HSM record of that label in
    ``hsms/``). For an HSM that neither knows by any label, ``before`` and ``known_from`` are
    None."""

    before: str | None
    now: str
    known_from: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before, "now": self.now, "known_from": self.known_from}


def key_changes(ctx: Context, trust: Trust) -> dict[str, Change]:
    """Operators the Trust lists with another key than its predecessor lists under their name,
    or, for an operator new in the Trust, than the store's record of that name, or with no
    such record at all (review F2): name -> change.

    An operator record is only self-signed, so whoever can write the store can put their own
    key under a colleague's name before a Trust is proposed, and put the real record back; the
    names then read as expected. Such a change must be seen and accepted by the people
    approving, by key, not by name. (A planted record left in place shows nowhere but in that
    operator's own signature, which :func:`operators.sign_as` checks.)
    """
    if trust.predecessor is None:
        return {}
    before = {m.name: m.key.key_id for m in ctx.store.trust(trust.predecessor).operators}
    changes: dict[str, Change] = {}
    for m in trust.operators:
        if m.name in before:
            if before[m.name] != m.key.key_id:
                changes[m.name] = Change(before[m.name], m.key.key_id, "predecessor")
            continue
        try:
            record = ctx.store.operator(m.name)
        except KmsfsError:
            # No record of that name here (moved away while the proposal is signed, or a
            # Trust imported with a Domain): nobody can tell whose key it is (review).
            changes[m.name] = Change(None, m.key.key_id, None)
            continue
        if record.key.key_id != m.key.key_id:
            changes[m.name] = Change(record.key.key_id, m.key.key_id, "record")
    return changes


def _unaccepted(changes: dict[str, Change], accepted: Sequence[str]) -> str | None:
    """``name: before -> now; ...`` of the *changes* the signer did not name in *accepted*;
    None if there is none left."""
    left = sorted(((n, c) for n, c in changes.items() if n not in accepted), key=lambda nc: nc[0])
    if not left:
        return None
    return "; ".join(
        f"{n}: {c.before[:12] if c.before else 'unknown'} -> {c.now[:12]}" for n, c in left
    )


def _hsm_records(ctx: Context) -> list[HsmRecord]:
    """The HSM records of the store that read and verify (a record is only self-signed)."""
    records = []
    for hsm_id in ctx.store.hsm_ids():
        try:
            records.append(ctx.store.hsm(hsm_id))
        except KmsfsError:
            continue
    return records


def hsm_changes(ctx: Context, trust: Trust) -> dict[str, Change]:
    """HSMs the Trust lists under a label that its predecessor (or else an HSM record of the
    store) gives to another HSM, and HSMs that neither the predecessor nor any record of the
    store knows at all: label -> change.

    A Trust carries its HSMs' public keys, and an HSM is known by those keys alone (its id), not
    by its label. Whoever can write the store can write a proposal that lists ``hsm2`` with keys
    they hold in software; once sealed, that key is an HSM of the Trust: it seals anything under
    it, and every Domain rewrapped into it has ``k`` wrapped to the writer (review F2). Such a
    change must be seen and accepted by the people approving, after checking the new id out of
    band. An HSM added with ``hsm create`` or ``hsm enroll`` and proposed by its label is no
    change: the store's record knows it under that label.
    """
    if trust.predecessor is None:
        return {}
    before = {h.label: h.id for h in ctx.store.trust(trust.predecessor).hsms}
    recorded: dict[str, set[str]] = {}
    for record in _hsm_records(ctx):
        recorded.setdefault(record.label, set()).add(record.id)
    known = set(before.values()).union(*recorded.values())
    changes: dict[str, Change] = {}
    for h in trust.hsms:
        if h.label in before:
            if before[h.label] != h.id:
                changes[h.label] = Change(before[h.label], h.id, "predecessor")
        elif recorded.get(h.label, {h.id}) != {h.id}:
            # Another record of that label: a planted one (resolve_hsm refuses the label) or
            # the real one beside the Trust's planted HSM; either way, not one HSM by that name.
            others = sorted(recorded[h.label] - {h.id})
            changes[h.label] = Change(others[0], h.id, "record")
        elif h.id not in known:
            changes[h.label] = Change(None, h.id, None)
    return changes


@dataclass(frozen=True)
class Approved:
    """What :func:`approve` did: ``already`` if the operator's valid approval was in the
    store before (nothing was signed or written: a no-op, so a script may sign again)."""

    signature: Signature
    already: bool


def approve(
    ctx: Context,
    trust_ref: str,
    operator_name: str,
    secret: PinSource,
    accept_key_changes: Sequence[str] = (),
    accept_hsm_changes: Sequence[str] = (),
) -> Approved:
    """Operator ``operator_name`` signs the Trust; only members of it or its predecessor may.
    One who has signed it already is told so, without a PIN being asked for.

    Refused, before the PIN is read, if the Trust lists the signer's name with a key that is not
    the signer's, or changes the key behind any name (:func:`key_changes`) that the signer did
    not name in ``accept_key_changes``, or an HSM (:func:`hsm_changes`) whose label the signer
    did not name in ``accept_hsm_changes``.
    """
    trust = ctx.store.trust(resolve_trust(ctx, trust_ref))
    refuse_dead(ctx, trust)
    record = ctx.store.operator(operator_name)
    groups = [trust.operators]
    if trust.predecessor is not None:
        groups.append(ctx.store.trust(trust.predecessor).operators)
    if not any(m.key == record.key for group in groups for m in group):
        raise UsageError(
            f"operator {operator_name} is not in trust {trust.id[:12]} or its predecessor"
        )
    listed = next((m for m in trust.operators if m.name == operator_name), None)
    if listed is not None and listed.key != record.key:
        raise IntegrityError(
            f"trust {trust.id[:12]} lists operator {operator_name} with key "
            f"{listed.key.key_id[:12]}, not yours ({record.key.key_id[:12]}): someone proposed "
            "it with another key under your name; do not approve it"
        )
    if (changes := _unaccepted(key_changes(ctx, trust), accept_key_changes)) is not None:
        raise IntegrityError(
            f"trust {trust.id[:12]} changes the key of operator(s) its predecessor (or, for a "
            f"new one, the store's record) lists ({changes}); approve only if each of them "
            "asked for it, with --accept-key-change NAME for each"
        )
    if (changes := _unaccepted(hsm_changes(ctx, trust), accept_hsm_changes)) is not None:
        raise IntegrityError(
            f"trust {trust.id[:12]} lists HSM(s) under a label that its predecessor or the "
            f"store's records give to another HSM, or that neither knows ({changes}); approve "
            "only after checking each id out of band with whoever holds that HSM, with "
            "--accept-hsm-change LABEL for each"
        )
    mine = [m for group in groups for m in group if m.key == record.key][:1]
    earlier = valid_approvals(trust, ctx.store.signatures("approval", trust.id), mine)
    if earlier:  # before the PIN is asked for: signing again would change nothing
        log.info("operator %s had already signed trust %s", operator_name, trust.id[:12])
        return Approved(earlier[0][1], already=True)
    # The approval goes into the store: a read-only one refuses before the PIN is read and
    # the operator's token signs, not after.
    ctx.store.require_writable("an approval")
    log.info(
        "operator %s (key %s) signs trust %s", operator_name, record.key.key_id[:12],
        trust.id[:12],
    )
    value = operators.sign_as(
        ctx, record, secret.read(), contexts.OPERATOR_APPROVES_TRUST, trust.signed_bytes()
    )
    approval = Signature(trust.id, record.key.key_id, value)
    ctx.store.save_signature(
        "approval", approval, valid=lambda there: bool(valid_approvals(trust, [there], mine))
    )
    return Approved(approval, already=False)


@dataclass(frozen=True)
class TrustStatus:
    """A Trust as the store has it. ``lost_to``: for a proposal that can never be sealed, the
    sealed successor of its predecessor that won (:func:`lost_to`)."""

    trust: Trust
    own: QuorumResult
    predecessor: QuorumResult | None
    sealed_by: str | None
    key_changes: dict[str, Change]
    hsm_changes: dict[str, Change]
    lost_to: str | None = None
    #: Other sealed successors of this sealed Trust's predecessor (:func:`list_status`).
    rivals: tuple[str, ...] = ()
    #: Where it stands against the store's head (:func:`kmsfs.model.line.place`, by
    #: predecessor ids), None where the store has no head or it was not asked
    #: (:func:`with_line`); "head" for the head itself.
    line: str | None = None

    @property
    def ready(self) -> bool:
        """Sealable now: both quorums met, and not a dead proposal."""
        quorums = self.own.met and (self.predecessor is None or self.predecessor.met)
        return quorums and self.lost_to is None

    @property
    def state(self) -> str:
        """sealed, dead (never sealable: see ``lost_to``), ready (to seal) or proposed."""
        if self.sealed_by:
            return "sealed"
        if self.lost_to:
            return "dead"
        return "ready" if self.ready else "proposed"

    def to_dict(self) -> dict[str, Any]:
        def result(r: QuorumResult | None) -> dict[str, Any] | None:
            if r is None:
                return None
            return {
                "threshold": r.threshold,
                "signed": sorted(r.signed),
                "unsigned": sorted(r.unsigned),
            }

        t = self.trust
        return {
            "id": t.id,
            "serial": t.serial,
            "predecessor": t.predecessor,
            "hsms": [{"id": h.id, "label": h.label} for h in t.hsms],
            "operators": [m.name for m in t.operators],
            "operator_keys": [{"name": m.name, "key_id": m.key.key_id} for m in t.operators],
            "key_changes": {n: c.to_dict() for n, c in self.key_changes.items()},
            "hsm_changes": {label: c.to_dict() for label, c in self.hsm_changes.items()},
            "quorum": t.quorum,
            "tolerates": t.tolerance(),
            "created": t.created,
            "approvals": result(self.own),
            "predecessor_approvals": result(self.predecessor),
            "sealed_by": self.sealed_by,
            "state": self.state,
            "lost_to": self.lost_to,
            "rivals": list(self.rivals),
            "head": self.line == line_model.HEAD,
            "line": self.line,
        }


def status(ctx: Context, trust_id: str) -> TrustStatus:
    trust = ctx.store.trust(trust_id)
    approvals = ctx.store.signatures("approval", trust.id)
    own = quorum_result(trust, approvals, trust.operators, trust.quorum)
    before = None
    if trust.predecessor is not None:
        old = ctx.store.trust(trust.predecessor)
        before = quorum_result(trust, approvals, old.operators, old.quorum)
    seal = valid_seal(ctx, trust)
    sealed_by = trust.hsm(seal.key_id).label if seal else None  # type: ignore[union-attr]
    dead = None if sealed_by else lost_to(ctx, trust)
    return TrustStatus(
        trust, own, before, sealed_by, key_changes(ctx, trust), hsm_changes(ctx, trust), dead
    )


def status_with_rivals(ctx: Context, trust_id: str, ours: Line | None = None) -> TrustStatus:
    """:func:`status` of one Trust, with its ``rivals`` as :func:`list_status` finds them
    (``trust show`` said nothing of a fork that ``trust list`` showed), and where it stands
    against *ours* (:func:`with_line`)."""
    return with_line(ctx, _with_rivals(ctx, status(ctx, trust_id)), ours)


def with_line(ctx: Context, found: TrustStatus, ours: Line | None) -> TrustStatus:
    """*found* with its ``line``: where it stands against the head of *ours* (the store's
    line, :func:`resolve_line`), by predecessor ids (a proposal stands where it would once
    sealed), so that operators see which Trust is the head and which are on a rival line."""
    if ours is None or ours.chain is None:
        return found
    ids: list[str] = []
    current: str | None = found.trust.id
    while current is not None and current not in ids:
        ids.append(current)
        try:
            current = ctx.store.trust(current).predecessor
        except KmsfsError:
            return found  # a missing or damaged predecessor: nowhere to place it
    return replace(found, line=line_model.place(ids[::-1], ours.chain))


def _with_rivals(ctx: Context, found: TrustStatus) -> TrustStatus:
    """*found* with its :func:`sealed_rivals`, if it is sealed and verifies (a Trust sealed
    by its own HSM alone, without its quorums, does not: it is no line of Trusts)."""
    if not found.sealed_by or not _verifies(ctx, found.trust.id):
        return found
    return replace(found, rivals=sealed_rivals(ctx, found.trust))


def list_status(ctx: Context, ours: Line | None = None) -> list[TrustStatus]:
    """Every Trust of the store. Successors of one Trust that each verify (sealed at two
    sites, then merged) are each other's ``rivals``: two lines of Trusts, each valid, in each
    of which the HSMs and operators the other removed still govern (review: nothing said so).
    Only Trusts with a sealed sibling are verified for it: a fork is rare, a chain check not
    cheap. With *ours* (:func:`resolve_line`), each says where it stands against the store's
    head (:func:`with_line`)."""
    statuses = [with_line(ctx, status(ctx, i), ours) for i in ctx.store.trust_ids()]
    sealed_after = Counter(
        s.trust.predecessor for s in statuses if s.sealed_by and s.trust.predecessor is not None
    )
    statuses = [
        _with_rivals(ctx, s) if sealed_after[s.trust.predecessor] > 1 else s for s in statuses
    ]
    return sorted(statuses, key=lambda s: (s.trust.serial, s.trust.created, s.trust.id))


def _verifies(ctx: Context, trust_id: str) -> bool:
    try:
        verified_chain(ctx, trust_id)
    except KmsfsError:
        return False
    return True


def _content(trust: Trust) -> tuple[Any, ...]:
    """What a proposal says, less when it was made: two with the same are duplicates."""
    return (
        trust.predecessor,
        frozenset(h.id for h in trust.hsms),
        frozenset((m.name, m.key.key_id) for m in trust.operators),
        trust.quorum,
    )


def pending_duplicates(ctx: Context, trust: Trust) -> list[TrustStatus]:
    """Other proposals still awaiting approvals or a seal with the content of ``trust``.

    Not refused: ids differ by creation time, and operators may want a fresh proposal. But
    whoever proposes the same again (a rerun script, two people) should know, since only one
    can become the genesis's successor and the others' signatures would be wasted."""
    found = []
    for other_id in ctx.store.trust_ids():
        if other_id == trust.id:
            continue
        try:
            if _content(ctx.store.trust(other_id)) != _content(trust):
                continue
            other = status(ctx, other_id)
        except KmsfsError:
            continue  # a damaged document is not a duplicate; commands that read it say so
        if other.state in ("proposed", "ready"):
            found.append(other)
    return sorted(found, key=lambda s: (s.trust.created, s.trust.id))


def seal(
    ctx: Context, trust_ref: str, hsm_ref: str | None = None, fork: bool = True
) -> SealedTrust:
    """Have an HSM of the Trust seal it, after checking the chain and both quorums; without
    *fork*, not while the store holds another sealed successor of its predecessor
    (:func:`refuse_fork`, checked under the store's lock: two seals at once cannot both pass)."""
    with ctx.store.exclusive():  # check the genesis pin, seal and pin as one step
        return _seal(ctx, trust_ref, hsm_ref, fork)


def _seal(ctx: Context, trust_ref: str, hsm_ref: str | None, fork: bool = True) -> SealedTrust:
    trust_id = resolve_trust(ctx, trust_ref)
    trust = ctx.store.trust(trust_id)
    line(ctx)  # a store that lost its head seals nothing: it cannot tell its line
    anchor = ctx.store.anchor()
    if trust.predecessor is not None:  # first: nothing else matters for a dead proposal
        _check_genesis_successor(anchor, trust.predecessor, trust_id)
    chain: list[SealedTrust] = []
    if trust.predecessor is not None:
        chain = verified_chain(ctx, trust.predecessor)
    approvals = tuple(ctx.store.signatures("approval", trust_id))
    candidates: list[HsmRecord] = list(trust.hsms)
    if hsm_ref is not None:
        chosen = hsms.resolve_hsm(ctx, hsm_ref)
        if trust.hsm(chosen.id) is None:
            raise UsageError(
                f"HSM {chosen.label} is not in trust {trust_id[:12]}: it cannot seal it"
            )
        candidates = [chosen]
    predecessor = chain[-1] if chain else None
    if predecessor is not None and predecessor.trust.is_genesis:
        # A successor of the genesis must be sealed by an HSM of the genesis too (verify_trust).
        of_genesis = [h for h in candidates if predecessor.trust.hsm(h.id) is not None]
        if not of_genesis:
            labels = ", ".join(h.label for h in predecessor.trust.hsms)
            raise UsageError(
                f"trust {trust_id[:12]} succeeds the genesis: it must be sealed by an HSM of the "
                f"genesis ({labels}), and {'that HSM is not one' if hsm_ref else 'it lists none'}"
            )
        candidates = of_genesis
    verify_approvals(trust, approvals, predecessor)  # before any HSM signs anything
    refuse_second_genesis_successor(ctx, trust)  # --fork or not
    if not fork and valid_seal(ctx, trust) is None:  # a seal added to a sealed one forks nothing
        refuse_fork(ctx, trust)  # after the quorums: short of them, that is the refusal
    with open_hsm(ctx, candidates) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_TRUST, trust.signed_bytes()))
        seal_sig = Signature(trust_id, hsm.record.id, value)
    sealed = SealedTrust(trust, approvals, seal_sig)
    verify_trust(sealed, predecessor)
    ctx.store.save_signature("seal", seal_sig, valid=lambda there: is_valid_seal(sealed, there))
    if trust.predecessor == anchor.root and anchor.successor is None:
        ctx.store.write_config(Anchor(anchor.root, trust_id))
    ours = line(ctx)  # the head moves to it if it is the one sealed successor of the head
    if ours.head == trust_id:  # sealed here: the operators' own choice (Store.decided)
        ctx.store.set_head(trust_id, expect=trust_id, decided=trust_id)
    return sealed


def is_valid_seal(sealed: SealedTrust, seal: Signature) -> bool:
    """Whether *seal* is a valid seal of *sealed*'s Trust by one of its HSMs."""
    trust = sealed.trust
    try:
        verify_hsm_seal(trust, seal, contexts.HSM_SEALS_TRUST, trust.signed_bytes(), "trust")
    except IntegrityError:
        return False
    return True


def verify(ctx: Context, trust_ref: str) -> list[SealedTrust]:
    """Verify the Trust and every predecessor back to the pinned root."""
    return verified_chain(ctx, resolve_trust(ctx, trust_ref))


def genesis(ctx: Context, records: Sequence[HsmRecord]) -> SealedTrust:
    """The root Trust: the HSMs that exist, no operators, quorum 0, sealed by one of them."""
    trust = Trust(1, None, tuple(records), (), 0, utc_now())
    ctx.store.save_trust(trust)
    with open_hsm(ctx, records) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_TRUST, trust.signed_bytes()))
    sealed = SealedTrust(trust, (), Signature(trust.id, hsm.record.id, value))
    verify_trust(sealed, None)
    ctx.store.save_signature("seal", sealed.seal)
    return sealed
