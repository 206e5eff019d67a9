"""``kmsfs-admin``: the operators' tool. Each command parses, calls one service function,
and renders the result as text or, with ``--json``, as JSON (lists are arrays of objects, each
with an ``id``)."""

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kmsfs import __version__
from kmsfs.admin import audit_cmd, render
from kmsfs.admin.render import short
from kmsfs.agent import remote
from kmsfs.agent.client import AgentAddress, AgentClient
from kmsfs.cliutil import (
    Parser,
    add_agent_options,
    emit_json,
    emit_table,
    merge_store,
    run,
    setup_logging,
)
from kmsfs.completion import bash_script
from kmsfs.errors import FormatError, HsmError, KmsfsError, StoreError, UsageError
from kmsfs.fs import config as volconfig
from kmsfs.hsm.pins import PinSource, loose_pin_file, pin_source_from_args
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.fields import HEX_ID
from kmsfs.model.records import NAME_PATTERN
from kmsfs.model.verify import VerifiedDomain
from kmsfs.service import domains, hsms, imports, operators, store_init, trusts
from kmsfs.service.context import STORE_DEFAULT, Context, default_store_path
from kmsfs.statusline import Steps
from kmsfs.store.documents import MAX_DOCUMENT_BYTES

PROG = "kmsfs-admin"

EXAMPLES = """\
example, a key ceremony from nothing to a Domain:
  kmsfs-admin --store /srv/kms init --hsms 2
  kmsfs-admin --store /srv/kms operator create alice --pin-file alice.pin
  kmsfs-admin --store /srv/kms operator create bob --pin-file bob.pin
  T=$(kmsfs-admin --store /srv/kms trust propose --hsm hsm1 --hsm hsm2 \\
        --operator alice --operator bob --quorum 2 | tail -n 1)
  kmsfs-admin --store /srv/kms trust sign $T --as alice --pin-file alice.pin
  kmsfs-admin --store /srv/kms trust sign $T --as bob --pin-file bob.pin
  kmsfs-admin --store /srv/kms trust seal $T
  kmsfs-admin --store /srv/kms domain create payroll --trust $T
"""


# The same words wherever a command takes a trust or an HSM.
TRUST_REF = "its id or a unique prefix of it (at least 4 hex digits)"
TRUST_HELP = f"the trust: {TRUST_REF}"
HSM_REF = "its label, its id or a unique prefix of it"

#: Said after "verifies" of a Domain made before key binding (kmsfs.model.domain).
_UNBOUND_NOTE = (
    "\nbut it predates key binding: no mount or derivation uses it until it is bound with "
    "'kmsfs-admin domain rewrap {0} --trust TRUST' (its own trust, or a successor)"
)
#: Where an operator's key is kept, by its protection: said by `operator create`.
_KEY_KEPT = {
    "token": "key in a SoftHSM2 token of its own",
    "passphrase": "key file sealed with a passphrase",
}
# Commands that create or enroll HSM tokens in the local store; with --agent that would be a
# mistake (the agent's HSMs are on its host), so they refuse the flag instead of ignoring it.
LOCAL_HSM_COMMANDS = frozenset({"init", "hsm_create", "hsm_enroll"})
# Commands the agent has no request for, which act on this host's store (and an operator's own
# token or key file): with --agent they would act here while the user meant the agent's host.
LOCAL_STORE_COMMANDS = frozenset({"domain_import", "operator_change_pin"})
# Commands that need no store: the one that makes it, and shell completion.
NO_STORE_COMMANDS = frozenset({"init", "completion"})


class Command:
    """Holds the parsed arguments and the output mode for one invocation."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json = args.json
        self.ctx = Context.at(args.store)
        if args.handler not in NO_STORE_COMMANDS and not getattr(args, "agent", None) and not (
            self.ctx.store.exists()
        ):
            # Before anything is written: `operator create` on a mistyped --store made half a
            # store there (operators/, private/) and exited 0; a listing printed an empty table.
            # (With --agent, the agent's store is the one that counts.)
            raise StoreError(
                f"{self.ctx.store.root} is not a kmsfs store (no store.json): check --store "
                "or KMSFS_STORE, or make one with kmsfs-admin init"
            )
        if getattr(args, "agent", None) and args.handler in LOCAL_HSM_COMMANDS:
            raise UsageError(
                "--agent: this command makes HSMs on this host; run it on the agent's host "
                "without --agent"
            )
        if getattr(args, "agent", None) and args.handler in LOCAL_STORE_COMMANDS:
            raise UsageError(
                "--agent: this command works on a store of this host, not through the agent; "
                "run it where the store is, without --agent"
            )

    def agent(self) -> AgentClient | None:
        """The agent client if ``--agent`` was given: HSM actions then happen in the agent."""
        a = self.args
        if not a.agent:
            return None
        return AgentClient(AgentAddress.parse(a.agent, a.agent_cert, a.agent_key, a.agent_ca))

    def pin(self, prompt: str) -> PinSource:
        return _pin_source(self.args.pin_file, self.args.pin_env, prompt)

    def rows(self, rows: list[dict[str, Any]], columns: list[str]) -> None:
        """JSON arrays of objects with full ids; tables with ids cut to 12 digits."""
        if self.json:
            emit_json(rows)
        else:
            emit_table([{k: _shorten(v) for k, v in r.items()} for r in rows], columns)

    def one(self, value: dict[str, Any], text: str) -> None:
        if self.json:
            emit_json(value)
        else:
            print(text)

    # -- init and HSMs ---------------------------------------------------------------------

    def init(self) -> None:
        # About a second per HSM: say what is being made, on a terminal only (not with --json).
        with Steps(f"{PROG} init: making", wanted=not self.json) as steps:
            genesis = store_init.init_store(
                self.ctx.store.root, self.args.hsms, steps, _default_parents_mode(self.args)
            )
        labels = ", ".join(h.label for h in genesis.trust.hsms)
        self.one(
            {
                "id": genesis.id,
                "store": str(self.ctx.store.root),
                "hsms": [render.hsm(h) for h in genesis.trust.hsms],
            },
            f"store {self.ctx.store.root} created with HSMs {labels}\n"
            f"genesis trust (pinned root, quorum 0, no operators):\n{genesis.id}",
        )

    def hsm_create(self) -> None:
        record = hsms.create_hsm(self.ctx, self.args.label)
        self.one(
            render.hsm(record),
            f"HSM {record.label} created ({record.wrap_key.scheme}, "
            f"{record.sign_key.scheme})\n{record.id}",
        )

    def hsm_enroll(self) -> None:
        a = self.args
        later = PinSource(credential=a.pin_credential) if a.pin_credential else None
        record = hsms.enroll_hsm(
            self.ctx, a.module, a.token, self.pin(f"PIN of token {a.token}"), a.label, later,
            a.token_serial,
        )
        self.one(
            render.hsm(record),
            f"HSM {record.label} enrolled ({record.wrap_key.scheme}, "
            f"{record.sign_key.scheme})\n{record.id}",
        )

    def hsm_health(self) -> None:
        client = self.agent()
        rows = remote.health(client) if client else hsms.health(self.ctx)
        if self.json:
            emit_json(rows)
        else:
            emit_table(
                [
                    {"id": short(r["id"]), "label": r["label"],
                     "state": "ok" if r["ok"] else f"FAILED: {r['problem']}"}
                    for r in rows
                ],
                ["id", "label", "state"],
            )
        if not all(r["ok"] for r in rows):
            raise HsmError(
                f"{sum(not r['ok'] for r in rows)} of {len(rows)} HSMs failed the health check"
            )

    def hsm_list(self) -> None:
        self.rows(
            [render.hsm(r) for r in hsms.list_hsms(self.ctx)],
            ["id", "label", "wrap", "sign", "created"],
        )

    # -- operators -------------------------------------------------------------------------

    def operator_create(self) -> None:
        protection = "passphrase" if self.args.passphrase else "token"
        what = "passphrase" if self.args.passphrase else "PIN"
        record = operators.create_operator(
            self.ctx,
            self.args.name,
            self.pin(f"new {what} for operator {self.args.name}"),
            protection,
        )
        self.one(
            render.operator(record),
            f"operator {record.name} created ({_KEY_KEPT[protection]})\n{record.key.key_id}",
        )

    def operator_change_pin(self) -> None:
        a = self.args
        if not (a.new_pin_file or a.new_pin_env or sys.stdin.isatty()):
            raise UsageError(
                "no terminal to ask for the new PIN or passphrase on: give --new-pin-file or "
                "--new-pin-env"
            )
        record = operators.change_secret(
            self.ctx,
            a.name,
            self.pin(f"current PIN or passphrase of operator {a.name}"),
            _pin_source(
                a.new_pin_file, a.new_pin_env, f"new PIN or passphrase of operator {a.name}"
            ),
        )
        what = "PIN" if record.protection == "token" else "passphrase"
        self.one(
            {**render.operator(record), "changed": what.lower()},
            f"operator {record.name}: {what} changed; the key and the signatures made with it "
            f"stay valid\n{record.key.key_id}",
        )

    def operator_list(self) -> None:
        self.rows(
            [render.operator(r) for r in operators.list_operators(self.ctx)],
            ["id", "name", "protection", "created"],
        )

    # -- trusts ----------------------------------------------------------------------------

    def trust_propose(self) -> None:
        a = self.args
        _refuse_repeats("--hsm", a.hsm or [])
        _refuse_repeats("--operator", a.operator or [])
        trust = trusts.propose(self.ctx, a.hsm or [], a.operator or [], a.quorum, a.predecessor)
        status = trusts.status(self.ctx, trust.id)
        twins = trusts.pending_duplicates(self.ctx, trust)
        if twins:
            _warn_duplicates(twins)
        self.one(
            {**status.to_dict(), "pending_duplicates": [t.trust.id for t in twins]},
            f"trust proposed: serial {trust.serial}, quorum {trust.quorum} of "
            f"{len(trust.operators)}; operators sign it with "
            f"'trust sign ID --as NAME', then 'trust seal ID'\n{trust.id}",
        )

    def trust_list(self) -> None:
        ours = self._line_shown()
        statuses = everyone = trusts.list_status(self.ctx, ours)
        a = self.args
        if a.unsigned:
            statuses = [s for s in statuses if not s.sealed_by]
        if a.signed:
            statuses = [s for s in statuses if s.sealed_by]
        if a.mine:
            if not any(a.mine in (m.name for m in s.trust.operators) for s in everyone):
                self.ctx.store.operator(a.mine)  # a misspelt name: "no operator named", exit 6
            statuses = [s for s in statuses if _awaits(s, a.mine)]
        rows = [render.trust_row(s) for s in statuses]
        for s in statuses:
            if s.rivals and s.trust.id < min(s.rivals):  # once per fork
                forked = " and ".join(short(i) for i in sorted((s.trust.id, *s.rivals)))
                print(
                    f"{PROG}: warning: trusts {forked} are sealed successors of trust "
                    f"{short(s.trust.predecessor or '')}: two lines of Trusts (sealed at two "
                    "sites, then merged?), in each of which what the other removed still "
                    "governs; the operators must keep one",
                    file=sys.stderr,
                )
        if self.json:
            emit_json(rows)
        else:
            emit_table([render.trust_cells(r) for r in rows], render.TRUST_COLUMNS)

    def _line_shown(self) -> trusts.Line:
        """The store's line for ``trust list`` and ``trust show``, which still work where the
        store lost its head (operators need them to see what happened): a warning says so."""
        ours = trusts.resolve_line(self.ctx)
        if ours.lost is not None:
            print(f"{PROG}: warning: {trusts.lost_head(self.ctx, ours)}", file=sys.stderr)
            return trusts.Line(None, None)
        return ours

    def trust_show(self) -> None:
        trust_id = trusts.resolve_trust(self.ctx, self.args.trust)
        ours = self._line_shown()
        status = trusts.status_with_rivals(self.ctx, trust_id, ours)
        info = status.to_dict()
        if self.json:
            emit_json(info)
            return
        t = status.trust
        lines = [
            f"trust {t.id}",
            f"  serial       {t.serial}",
            f"  predecessor  {t.predecessor or '(none: root)'}",
            f"  created      {t.created}",
            f"  HSMs         {', '.join(f'{h.label} ({short(h.id)})' for h in t.hsms)}",
            f"  operators    "
            f"{', '.join(f'{m.name} ({short(m.key.key_id)})' for m in t.operators) or '(none)'}",
            f"  quorum       {t.quorum} of {len(t.operators)}: resists "
            f"{info['tolerates']['forgery']} dishonest signer(s) for forgery, "
            f"{info['tolerates']['denial']} refusing for denial",
            f"  approvals    {len(status.own.signed)}/{t.quorum}: signed by "
            f"{', '.join(sorted(status.own.signed)) or 'nobody'}; missing "
            f"{', '.join(sorted(status.own.unsigned)) or 'nobody'}",
        ]
        if status.predecessor is not None:
            p = status.predecessor
            lines.append(
                f"  predecessor  {len(p.signed)}/{p.threshold} of its operators: "
                f"{', '.join(sorted(p.signed)) or 'nobody'}"
            )
        for name, change in sorted(status.key_changes.items()):
            where = (
                "the predecessor" if change.known_from == "predecessor"
                else f"operators/{name}.json"
            )
            known = (
                f"{short(change.before)} in {where}" if change.before is not None
                else f"no key in the predecessor nor in operators/{name}.json"
            )
            lines.append(
                f"  KEY CHANGE   operator {name}: {known}, {short(change.now)} here (approve "
                f"only if {name} asked for it)"
            )
        for label, change in sorted(status.hsm_changes.items()):
            lines.append(f"  HSM CHANGE   {_hsm_change_text(label, change)}")
        lines.append(f"  state        {_state_text(status)}")
        if ours.head is not None:
            lines.append(f"  line         {_line_text(status, ours.head)}")
        if status.rivals:
            lines.append(
                f"  FORK         {', '.join(short(r) for r in status.rivals)} also sealed as "
                f"successor of {short(t.predecessor or '')}: two valid lines of Trusts, in "
                "each of which what the other removed still governs; the operators must keep one"
            )
        print("\n".join(lines))

    def trust_sign(self) -> None:
        done = trusts.approve(
            self.ctx,
            self.args.trust,
            self.args.as_,
            self.pin(f"PIN or passphrase of operator {self.args.as_}"),
            self.args.accept_key_change,
            self.args.accept_hsm_change,
        )
        status = trusts.status(self.ctx, done.signature.subject)
        count = f"{len(status.own.signed)}/{status.trust.quorum}"
        subject = short(done.signature.subject)
        self.one(
            {**status.to_dict(), "already_signed": done.already},
            f"{self.args.as_} had already signed trust {subject} ({count} approvals)"
            if done.already
            else f"{self.args.as_} signed trust {subject}: {count} approvals",
        )

    def trust_seal(self) -> None:
        client = self.agent()
        if client and self.args.hsm:
            raise UsageError("--hsm cannot be used with --agent: the agent chooses its HSM")
        trust_id = trusts.resolve_trust(self.ctx, self.args.trust)
        before = trusts.status(self.ctx, trust_id)
        if not client and self.args.hsm is None and trusts.needs_no_seal(self.ctx, before):
            self.one(
                {**before.to_dict(), "already_sealed": True},
                f"trust {short(trust_id)} was already sealed by HSM {before.sealed_by}; "
                f"nothing signed\n{trust_id}",
            )
            return
        if client:
            # The agent seals into its own store, and pins there; it refuses a fork there,
            # this store's is checked here (before the request, one line either way).
            if not self.args.fork and before.ready and not before.sealed_by:
                trusts.refuse_fork(self.ctx, before.trust)
            sealed = remote.seal_trust(client, self.ctx, trust_id, fork=self.args.fork)
        else:
            sealed = trusts.seal(self.ctx, trust_id, self.args.hsm, fork=self.args.fork)
        label = sealed.trust.hsm(sealed.seal.key_id).label  # type: ignore[union-attr]
        self.one(
            {**trusts.status(self.ctx, sealed.id).to_dict(), "already_sealed": False},
            f"trust sealed by HSM {label}\n{sealed.id}",
        )

    def trust_verify(self) -> None:
        chain = trusts.verify(self.ctx, self.args.trust)
        self.one(
            {"id": chain[-1].id, "verified": True, "chain": [c.id for c in chain]},
            f"trust {short(chain[-1].id)} verifies: chain of {len(chain)} back to the pinned root, "
            "every seal and quorum valid",
        )

    def trust_pin(self) -> None:
        done = trusts.pin(self.ctx, self.args.trust)
        successor = self.ctx.store.anchor().successor or ""
        head = (f"its head is now trust {short(done.head)}" if done.head_moved
                else f"its head was trust {short(done.head)} already")
        self.one(
            {"id": done.sealed.id, "pinned": True, "already_pinned": done.already_pinned,
             "head": done.head, "head_moved": done.head_moved},
            f"this store {'already pinned' if done.already_pinned else 'now pins'} trust "
            f"{short(successor)} as the genesis's successor; {head} (the newest Trust of its "
            "line)",
        )

    # -- domains ---------------------------------------------------------------------------

    def domain_create(self) -> None:
        client = self.agent()
        if client:
            verified = remote.create_domain(client, self.ctx, self.args.name, self.args.trust)
        else:
            verified = domains.create(self.ctx, self.args.name, self.args.trust)
        self.one(
            render.verified_domain(verified),
            f"domain {self.args.name} created\n{verified.sealed.id}",
        )

    def domain_list(self) -> None:
        self.rows(
            [
                {**render.domain(d), "verified": problem is None, "problem": problem}
                for d, problem in domains.list_domains(self.ctx)
            ],
            ["id", "name", "generation", "trust", "epochs", "verified", "created"],
        )

    def domain_verify(self) -> None:
        verified = domains.current(self.ctx, self.args.name)
        # As kmsfs info and mount say: a successor of its Trust means a rewrap is due (the
        # HSMs it left out can still unwrap the keys and seal generations under the old one).
        newer = trusts.successor(self.ctx, verified.trust.id)
        due = "" if newer is None else (
            f"; its trust is superseded by trust {short(newer.id)}: rewrap it "
            f"('kmsfs-admin domain rewrap {self.args.name} --trust {short(newer.id)}')"
        )
        self.one(
            {**render.verified_domain(verified),
             "superseded_by": newer.id if newer is not None else None},
            f"domain {self.args.name} verifies (generation {verified.sealed.domain.generation}, "
            f"trust {short(verified.trust.id)}, chain of {len(verified.chain)}){due}"
            + ("" if verified.sealed.domain.bound else _UNBOUND_NOTE.format(self.args.name)),
        )

    def domain_rewrap(self) -> None:
        done = _already_under(self.ctx, self.args.name, self.args.trust)
        if done is not None:
            self.one(
                {**render.verified_domain(done), "rewrapped": False},
                f"domain {self.args.name} is already under trust {short(done.trust.id)} "
                f"(generation {done.sealed.domain.generation}): nothing to do\n{done.sealed.id}",
            )
            return
        client = self.agent()
        if client:
            verified = remote.rewrap(client, self.ctx, self.args.name, self.args.trust)
        else:
            verified = domains.rewrap(self.ctx, self.args.name, self.args.trust)
        self.one(
            {**render.verified_domain(verified), "rewrapped": True},
            f"domain {self.args.name} rewrapped for trust {short(verified.trust.id)} "
            f"(generation {verified.sealed.domain.generation}, fresh k)\n{verified.sealed.id}",
        )

    def domain_rotate(self) -> None:
        client = self.agent()
        if client:
            verified = remote.rotate(client, self.ctx, self.args.name)
        else:
            verified = domains.rotate(self.ctx, self.args.name)
        domain = verified.sealed.domain
        self.one(
            render.verified_domain(verified),
            f"domain {self.args.name}: new key epoch {domain.current_epoch.epoch} "
            f"(generation {domain.generation}); new data uses it, 'kmsfs reencrypt' moves old "
            f"data to it\n{verified.sealed.id}",
        )

    def domain_retire(self) -> None:
        if not self.args.yes:
            raise UsageError(
                f"domain retire cannot be undone: whatever is still keyed with epochs below "
                f"{self.args.below} (volume files 'kmsfs fsck' counts, 'kmsfs encrypt' files, "
                "backups of either) becomes unreadable; check and re-encrypt first "
                "(operators.md §6), then add --yes"
            )
        client = self.agent()
        if client:
            verified = remote.retire(client, self.ctx, self.args.name, self.args.below)
        else:
            verified = domains.retire(self.ctx, self.args.name, self.args.below)
        domain = verified.sealed.domain
        self.one(
            render.verified_domain(verified),
            f"domain {self.args.name}: key epochs below {domain.retired_below} retired "
            f"(generation {domain.generation}); files still keyed with them read and write "
            f"EIO: mounts and agents on this store take it in within about a second, "
            f"others once this generation reaches their store\n{verified.sealed.id}",
        )

    def completion(self) -> None:
        if self.json:  # as kmsfs completion: a script is no JSON, and no flag goes unheeded
            raise UsageError("--json: completion prints a shell script")
        print(bash_script(build_parser(), PROG), end="")

    def audit(self) -> int | None:
        return audit_cmd.run(self)

    def domain_export(self) -> None:
        sys.stdout.buffer.write(domains.export_bundle(self.ctx, self.args.name).to_bytes() + b"\n")

    def domain_import(self) -> None:
        done = imports.import_bundle(self.ctx, _read_bundle(self.args.source), pin=self.args.pin)
        domain = done.verified.sealed.domain
        in_store = done.domain_added or domain.id in self.ctx.store.domain_ids()
        if done.domain_added:
            what = f"imported generation {domain.generation}"
        elif in_store:
            what = f"already in the store: generation {domain.generation}"
        else:  # older than the store's history (imports._needs_writing)
            what = (f"generation {domain.generation} not taken in: the store's newer "
                    "generations keep its keys")
        self.one(
            {
                **render.verified_domain(done.verified),
                "domain_added": done.domain_added,
                "in_store": in_store,  # False: older than the store's history, not taken in
                "trusts_added": done.trusts_added,
            },
            f"domain {domain.name}: {what}, "
            f"{done.trusts_added} trust(s) added\n{done.verified.sealed.id}",
        )


def _default_parents_mode(args: argparse.Namespace) -> int | None:
    """The mode of the directories ``init`` may make above the default store (None: a path
    the user gave, whose parent must exist). Root's /var/lib/kmsfs is readable by all, since
    other users may verify with a root store; a user's ~/.local/share/kmsfs is the user's."""
    if not getattr(args, "store_is_default", False):
        return None
    return 0o755 if os.geteuid() == 0 else 0o700


def _read_bundle(source: str) -> DomainBundle:
    """A Domain bundle from a file (``domain export``), ``-`` (standard input), or a ciphertext
    directory (the copy its kmsfs.conf carries). Errors name the source."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_DOCUMENT_BYTES + 1)
        elif Path(source).is_dir():
            data = volconfig.load(Path(source)).domain_bundle
        else:  # as given: a pipe (<(kmsfs-admin domain export ...)) is read as cat would
            with open(source, "rb") as handle:
                data = handle.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:  # the command line named it: a usage error (2), not the store (6)
        raise UsageError(f"{source}: {exc.strerror}") from None
    if len(data) > MAX_DOCUMENT_BYTES:
        raise FormatError(f"{source}: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return DomainBundle.from_bytes(data)
    except KmsfsError as exc:
        raise type(exc)(f"{source}: {exc}") from None


def _pin_source(pin_file: str | None, pin_env: str | None, prompt: str) -> PinSource:
    """The PIN source the options name; a PIN file that group or others can read is used,
    with a warning on stderr (as ssh warns of a key file), before anything is done."""
    source = pin_source_from_args(pin_file, pin_env, prompt)
    warning = loose_pin_file(source)
    if warning:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    return source


def _shorten(value: Any) -> Any:
    return short(value) if isinstance(value, str) and HEX_ID.fullmatch(value) else value


def _awaits(status: trusts.TrustStatus, name: str) -> bool:
    """Trusts ``name`` still has to sign: a member of it or its predecessor, not yet signed,
    in a proposal that can still be sealed (not a dead one: ``trust sign`` refuses those)."""
    if status.state in ("sealed", "dead"):
        return False
    groups = [status.own] + ([status.predecessor] if status.predecessor else [])
    return any(name in g.unsigned for g in groups)


def _hsm_change_text(label: str, change: trusts.Change) -> str:
    """The ``HSM CHANGE`` line of ``trust show`` for one HSM, after the tag."""
    check = "approve only after checking its id out of band, with whoever holds it"
    if change.before is None:
        return (
            f"{label}: {short(change.now)} is an HSM that neither the predecessor nor the "
            f"store's HSM records know ({check})"
        )
    where = "the predecessor" if change.known_from == "predecessor" else "the store's record"
    return f"{label}: {short(change.before)} in {where}, {short(change.now)} here ({check})"


def _state_text(status: trusts.TrustStatus) -> str:
    """The ``state`` line of ``trust show``: what, if anything, is left to do."""
    if status.sealed_by:
        return f"sealed by {status.sealed_by}"
    if status.lost_to:
        return (
            f"dead: the genesis already has its sealed successor {short(status.lost_to)}; this "
            "proposal can never be sealed"
        )
    return "ready to seal" if status.ready else "awaiting approvals"


def _line_text(status: trusts.TrustStatus, head: str) -> str:
    """The ``line`` line of ``trust show``: where the Trust stands against the store's head."""
    return {
        "head": "the head of this store's line of Trusts (the newest one it verified)",
        "before-head": f"on this store's line of Trusts, before its head {short(head)}",
        "after-head": f"after this store's head {short(head)}, on its line of Trusts",
        "rival": f"NOT on this store's line of Trusts (head {short(head)}): a rival line, "
        "on which no Domain key is wrapped here",
    }.get(status.line or "", f"unknown (its predecessors are not all in the store; head "
                                f"{short(head)})")


def _refuse_repeats(option: str, values: list[str]) -> None:
    """A value given twice to a repeatable option is a usage error (exit 2), before anything
    is resolved or built: ``--hsm hsm1 --hsm hsm1`` exited 7, from the malformed Trust."""
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise UsageError(f"{option} {value} is given twice")
        seen.add(value)


def _warn_duplicates(twins: list[trusts.TrustStatus]) -> None:
    """One stderr line naming the proposals the new one repeats: only one of them can be
    sealed, so their signers should be told which one to sign."""
    names = ", ".join(f"{t.trust.id[:12]} ({t.state}, created {t.trust.created})" for t in twins)
    print(
        f"{PROG}: warning: already proposed with the same HSMs, operators, quorum and "
        f"predecessor, awaiting its seal: {names}; have one of them signed, not both",
        file=sys.stderr,
    )


def _already_under(ctx: Context, name: str, trust_ref: str) -> VerifiedDomain | None:
    """The Domain's verified current generation if ``domain rewrap NAME --trust T`` has nothing
    to do (it is bound and under T already: a second run of the same rewrap), else None.

    Then it exits 0 as the other repeatable commands do (a second seal, a second signature),
    rather than "trust T is not a successor of the domain's trust T". Any problem (no such
    Domain, an unknown trust) is left to the rewrap itself to report."""
    try:
        verified = domains.current(ctx, name)
        trust_id = trusts.resolve_trust(ctx, trust_ref)
    except KmsfsError:
        return None
    if verified.trust.id == trust_id and verified.sealed.domain.bound:
        return verified
    return None


def _new_name(text: str) -> str:
    """argparse type of a name a command gives something new (a Domain, an operator, an HSM):
    a bad one is a usage error naming the option (``argument --label: ...``, exit 2), not a
    malformed document (exit 7, what ``check_name`` means for a name read from the store)."""
    if not NAME_PATTERN.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text!r:.70} is not a name: want 1-64 of A-Z a-z 0-9 . _ - "
            "(not starting with . _ -)"
        )
    return text


def _epoch(text: str) -> int:
    """argparse type of a key epoch number (1, 2, ...)."""
    if not text.isdigit() or not 1 <= int(text) <= 2**31:
        raise argparse.ArgumentTypeError(f"{text!r:.20} is not a key epoch: want 1, 2, ...")
    return int(text)


def _pin_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--pin-file",
        metavar="F",
        help=f"read the {what} from file F (all of it, less a final newline)",
    )
    parser.add_argument(
        "--pin-env", metavar="VAR", help=f"read the {what} from environment variable VAR"
    )


def build_parser() -> Parser:
    parser = Parser(
        prog=PROG,
        description="Govern kmsfs keys: HSMs, operators, quorum-signed Trusts and Domains.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help=f"the store directory, before or after the command (default: {STORE_DEFAULT})",
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    add_agent_options(
        parser,
        "have kmsfs-hsmd do the HSM work (trust seal, domain create/rewrap/rotate/retire, "
        "hsm health)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens to stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    def command(sub: Any, name: str, handler: str, help_text: str, example: str) -> Parser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(handler=handler)
        # After the command too (as kmsfs takes it). SUPPRESS: absent here, the global --json
        # before the command stays in force.
        p.add_argument(
            "--json", action="store_true", default=argparse.SUPPRESS, help="print results as JSON"
        )
        # --store too; its own dest, so main() can refuse two different stores.
        p.add_argument(
            "--store",
            dest="store_after",
            type=Path,
            default=argparse.SUPPRESS,
            metavar="STORE",
            help="the store directory (may also come before the command)",
        )
        return p

    p = command(
        groups,
        "init",
        "init",
        "create a store, its embedded SoftHSM2 HSMs and the genesis trust",
        "kmsfs-admin --store /srv/kms init --hsms 2",
    )
    p.add_argument(
        "--hsms", type=int, default=2, metavar="N", help="embedded HSMs to create (default 2)"
    )

    hsm = groups.add_parser("hsm", help="HSMs").add_subparsers(
        dest="sub", metavar="ACTION", required=True
    )
    p = command(
        hsm,
        "create",
        "hsm_create",
        "create a new embedded SoftHSM2 token with kmsfs key pairs",
        "kmsfs-admin hsm create --label hsm3",
    )
    p.add_argument("--label", type=_new_name, help="a name for the HSM (default hsmN)")
    p = command(
        hsm,
        "enroll",
        "hsm_enroll",
        "enroll an existing token of any PKCS#11 module",
        "kmsfs-admin hsm enroll --module /usr/lib/x.so --token HSM-A --pin-file a.pin",
    )
    p.add_argument("--module", required=True, metavar="PATH", help="the PKCS#11 module (.so)")
    p.add_argument("--token", required=True, metavar="LABEL", help="the token's label")
    p.add_argument(
        "--token-serial",
        metavar="SERIAL",
        help="the token's serial number, where other tokens of the module have its label "
        "(every PIV card is PIV_II); kmsfs-admin says which serials it found",
    )
    p.add_argument(
        "--label", type=_new_name, help="a name for the HSM in kmsfs (default hsmN)"
    )
    _pin_options(p, "token's user PIN")
    p.epilog = (
        f"{p.epilog}\n\n"
        "The store records where the PIN comes from, not the PIN: the file's absolute path,\n"
        "the variable's name, or the terminal. Every later use of this HSM (a mount, a seal,\n"
        "hsm health) reads it from there again: keep the file, or give --pin-credential for\n"
        "services (the file then serves only for enrolling)."
    )
    p.add_argument(
        "--pin-credential",
        metavar="NAME",
        help="read the PIN from the systemd credential NAME when used by a service "
        "($CREDENTIALS_DIRECTORY/NAME, see LoadCredential=)",
    )
    command(hsm, "list", "hsm_list", "list the HSMs of the store", "kmsfs-admin --json hsm list")
    command(
        hsm,
        "health",
        "hsm_health",
        "check that each HSM of this host (or of the agent) opens, holds its keys and signs",
        "kmsfs-admin --agent /run/kmsfs/hsmd.sock hsm health",
    )

    op = groups.add_parser(
        "operator", help="operators"
    ).add_subparsers(dest="sub", metavar="ACTION", required=True)
    p = command(
        op,
        "create",
        "operator_create",
        "create an operator: an Ed25519 key in a SoftHSM2 token of its own (or passphrase file)",
        "kmsfs-admin operator create alice --pin-file alice.pin",
    )
    p.description = (
        f"{p.description}\n\n"
        "The token is an embedded SoftHSM2 token in the store's private/tokens, and SoftHSM2\n"
        "has no retry counter or lockout: against whoever can read that directory (root on\n"
        "the store's machine) the key is only as strong as its PIN. The PIN needs at least\n"
        f"{operators.MIN_TOKEN_PIN_LENGTH} characters, {operators.MIN_TOKEN_PIN_DISTINCT} of "
        "them different. A passphrase key file (--passphrase:\n"
        "scrypt, about 0.3 s a guess) is stronger."
    )
    p.add_argument("name", metavar="NAME", type=_new_name, help="the new operator's name")
    p.add_argument(
        "--passphrase",
        action="store_true",
        help="protect the key with a passphrase (scrypt + AES-GCM, at least "
        f"{operators.MIN_SECRET_LENGTH} characters) instead of a token PIN; stronger against "
        "whoever can read the store's private directory",
    )
    _pin_options(p, "operator's new PIN or passphrase")
    p = command(
        op,
        "change-pin",
        "operator_change_pin",
        "change an operator's token PIN, or the passphrase of its key file (the key stays)",
        "kmsfs-admin operator change-pin alice --pin-file alice.pin --new-pin-file alice.new",
    )
    p.description = (
        f"{p.description}\n\n"
        "The operator's key does not change: its key id, the Trusts that list it and every\n"
        "signature made with it stay valid. A new token PIN needs at least "
        f"{operators.MIN_TOKEN_PIN_LENGTH} characters,\n"
        f"{operators.MIN_TOKEN_PIN_DISTINCT} of them different: operators made before that rule "
        "should change theirs.\n"
        f"A new passphrase needs at least {operators.MIN_SECRET_LENGTH} characters. Without "
        "--new-pin-file or\n"
        "--new-pin-env, the new one is asked for twice on the terminal."
    )
    p.add_argument("name", metavar="NAME", help="the operator")
    _pin_options(p, "operator's current PIN or passphrase")
    new = p.add_mutually_exclusive_group()
    new.add_argument(
        "--new-pin-file",
        metavar="F",
        help="read the new PIN or passphrase from file F (all of it, less a final newline)",
    )
    new.add_argument(
        "--new-pin-env",
        metavar="VAR",
        help="read the new PIN or passphrase from environment variable VAR",
    )
    command(
        op, "list", "operator_list", "list the operators of the store", "kmsfs-admin operator list"
    )

    tr = groups.add_parser(
        "trust", help="quorum-signed trusts"
    ).add_subparsers(dest="sub", metavar="ACTION", required=True)
    p = command(
        tr,
        "propose",
        "trust_propose",
        "propose a trust; the new id is the last line of stdout",
        "kmsfs-admin trust propose --hsm hsm1 --operator alice --operator bob --quorum 2",
    )
    p.add_argument(
        "--hsm", action="append", metavar="ID", help=f"an HSM: {HSM_REF}; repeat"
    )
    p.add_argument("--operator", action="append", metavar="NAME", help="an operator; repeat")
    p.add_argument(
        "--quorum", type=int, required=True, metavar="Q", help="approvals needed (1..operators)"
    )
    p.add_argument(
        "--predecessor",
        metavar="TRUST",
        help=f"the trust this one succeeds: {TRUST_REF}. Without it: the genesis, but only "
        "until this store pins the genesis's successor (sealing the first trust pins it, as "
        "does 'trust pin'); required after that",
    )
    p = command(tr, "list", "trust_list", "list trusts", "kmsfs-admin trust list --mine alice")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--unsigned", action="store_true", help="only trusts not sealed yet")
    which.add_argument("--signed", action="store_true", help="only sealed trusts")
    which.add_argument("--mine", metavar="NAME", help="only trusts operator NAME still has to sign")
    p = command(
        tr,
        "show",
        "trust_show",
        "show a trust, its approvals, and what its quorum tolerates",
        "kmsfs-admin trust show 3f2a",
    )
    p.add_argument("trust", metavar="TRUST", help=TRUST_HELP)
    p = command(
        tr,
        "sign",
        "trust_sign",
        "approve a trust as an operator (after checking its content)",
        "kmsfs-admin trust sign 3f2a --as alice --pin-file alice.pin",
    )
    p.add_argument("trust", metavar="TRUST", help=TRUST_HELP)
    p.add_argument("--as", dest="as_", required=True, metavar="NAME", help="the signing operator")
    p.add_argument(
        "--accept-key-change",
        action="append",
        default=[],
        metavar="NAME",
        help="approve although the trust gives operator NAME another key than its predecessor "
        "does (or, for an operator new in it, than the store's record of NAME, or with no such "
        "record): only when NAME asked for it (`trust show` prints KEY CHANGE with the key "
        "ids); repeatable",
    )
    p.add_argument(
        "--accept-hsm-change",
        action="append",
        default=[],
        metavar="LABEL",
        help="approve although the trust lists under LABEL another HSM than its predecessor "
        "(or the store's record of LABEL) does, or an HSM neither knows (`trust show` prints "
        "HSM CHANGE with both ids): only after checking the new id out of band with whoever "
        "holds that HSM (`hsm health` on its host shows the id of the token it opens), since "
        "whoever can write the store can list keys of their own as an HSM; repeatable",
    )
    _pin_options(p, "operator's PIN or passphrase")
    p = command(
        tr,
        "seal",
        "trust_seal",
        "have an HSM of the trust seal it (needs the quorum)",
        "kmsfs-admin trust seal 3f2a --hsm hsm2",
    )
    p.add_argument("trust", metavar="TRUST", help=TRUST_HELP)
    p.add_argument(
        "--hsm", metavar="ID", help=f"the HSM to seal with: {HSM_REF} (default: any of the trust)"
    )
    p.add_argument(
        "--fork",
        action="store_true",
        help="seal although the store (and, with --agent, the agent's) holds another sealed "
        "successor of the same predecessor: the operators mean to start a second line of "
        "Trusts (without it, refused)",
    )
    p = command(
        tr,
        "verify",
        "trust_verify",
        "verify a trust and its chain back to the pinned root",
        "kmsfs-admin trust verify 3f2a",
    )
    p.add_argument("trust", metavar="TRUST", help=TRUST_HELP)
    p = command(
        tr,
        "pin",
        "trust_pin",
        "pin a trust the operators name: the genesis's successor, and the head of the "
        "store's line of trusts (forward only)",
        "kmsfs-admin trust pin 3f2a",
    )
    p.add_argument("trust", metavar="TRUST", help=TRUST_HELP)

    dm = groups.add_parser(
        "domain", help="domains"
    ).add_subparsers(dest="sub", metavar="ACTION", required=True)
    p = command(
        dm,
        "create",
        "domain_create",
        "create a domain: fresh k and mk generated in an HSM",
        "kmsfs-admin domain create payroll --trust 3f2a",
    )
    p.add_argument("name", metavar="NAME", type=_new_name, help="the new domain's name")
    p.add_argument(
        "--trust",
        required=True,
        metavar="TRUST",
        help=f"the sealed trust that governs it: {TRUST_REF}",
    )
    command(
        dm,
        "list",
        "domain_list",
        "list domains (newest generation of each)",
        "kmsfs-admin domain list",
    )
    p = command(
        dm,
        "verify",
        "domain_verify",
        "verify a domain and its whole trust chain",
        "kmsfs-admin domain verify payroll",
    )
    p.add_argument("name", metavar="NAME", help="the domain's name")
    p = command(
        dm,
        "rewrap",
        "domain_rewrap",
        "give a domain a fresh k for a successor trust (mk unchanged)",
        "kmsfs-admin domain rewrap payroll --trust 9c1e",
    )
    p.add_argument("name", metavar="NAME", help="the domain's name")
    p.add_argument(
        "--trust",
        required=True,
        metavar="TRUST",
        help=f"the successor trust: {TRUST_REF}",
    )
    p = command(
        dm,
        "rotate",
        "domain_rotate",
        "start a new key epoch: a fresh mk, generated in an HSM, for new data",
        "kmsfs-admin domain rotate payroll",
    )
    p.add_argument("name", metavar="NAME", help="the domain's name")
    p = command(
        dm,
        "retire",
        "domain_retire",
        "refuse file contents keyed with old key epochs, for good: the last step of removing "
        "an HSM (after rewrap, rotate, and kmsfs reencrypt of every volume)",
        "kmsfs-admin domain retire payroll --below 2 --yes",
    )
    p.add_argument("name", metavar="NAME", help="the domain's name")
    p.add_argument(
        "--below",
        required=True,
        type=_epoch,
        metavar="EPOCH",
        help="retire every epoch below this one (at most the newest epoch); check first with "
        "'kmsfs fsck' on every volume that no file is keyed with them",
    )
    p.add_argument(
        "--yes",
        action="store_true",
        help="confirm: data still keyed with the retired epochs can never be read again",
    )
    p = command(
        dm,
        "export",
        "domain_export",
        "print the domain bundle (domain + trust chain, nothing secret) for a backup or audit",
        "kmsfs-admin domain export payroll > payroll.domain",
    )
    p.add_argument("name", metavar="NAME", help="the domain's name")
    p = command(
        dm,
        "import",
        "domain_import",
        "take a domain bundle (domain export, a backup, a ciphertext directory's copy) into "
        "the store, verified against its pinned root first",
        "kmsfs-admin domain import payroll.domain\n"
        "  kmsfs-admin domain import /srv/cipher/payroll --pin 3f9c1e2d4b5a",
    )
    p.add_argument(
        "source", metavar="FILE|DIR|-",
        help="a bundle file, - for standard input, or a ciphertext directory (its kmsfs.conf)",
    )
    p.add_argument(
        "--pin", metavar="TRUST_ID",
        help="a store that has not pinned the genesis's successor pins the bundle's (its id, "
        "or 12 characters or more of it): check it with the other operators first",
    )
    audit_cmd.add_parser(groups, command)
    p = command(
        groups,
        "completion",
        "completion",
        "print a shell completion script",
        "kmsfs-admin completion bash > /usr/share/bash-completion/completions/kmsfs-admin",
    )
    p.add_argument("shell", choices=["bash"], help="the shell (bash; zsh via bashcompinit)")
    _list_actions(groups)
    return parser


def _list_actions(groups: Any) -> None:
    """End each command group's line of the top-level help with its actions, read from the
    parser: the hand-written summaries had left out domain rotate, trust list, trust pin and
    hsm health, each added after its summary was written."""
    for choice in groups._choices_actions:  # one per command, with the help --help prints
        actions = [
            a for a in groups.choices[choice.dest]._actions
            if isinstance(a, argparse._SubParsersAction)
        ]
        if actions:
            choice.help = f"{choice.help}: {', '.join(actions[0].choices)}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    merge_store(parser, args)
    setup_logging(args.verbose, PROG)
    if args.store is None:
        args.store = default_store_path()
        # The tool's own default, not a path typed (--store, KMSFS_STORE): init makes its
        # missing parents (Store.make_root).
        args.store_is_default = not os.environ.get("KMSFS_STORE")
    return run(PROG, lambda: getattr(Command(args), args.handler)())


if __name__ == "__main__":
    sys.exit(main())
