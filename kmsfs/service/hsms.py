"""HSM actions: create an embedded SoftHSM2 token, enroll any PKCS#11 token, list them."""

import contextlib
import logging
import os
import secrets
from dataclasses import replace
from pathlib import Path

from kmsfs.errors import AlreadyExistsError, IntegrityError, KmsfsError, UsageError
from kmsfs.hsm import domainkeys, keypairs, library, softhsm
from kmsfs.hsm.library import TokenLocation
from kmsfs.hsm.pins import PinSource
from kmsfs.model import contexts
from kmsfs.model.records import HsmRecord, check_name
from kmsfs.service import operators
from kmsfs.service.context import Context, HsmSession, open_one_hsm, utc_now

log = logging.getLogger(__name__)

TOKEN_LABEL_MAX = 32


def _next_label(ctx: Context) -> str:
    taken = {ctx.store.hsm(i).label for i in ctx.store.hsm_ids()}
    number = 1
    while f"hsm{number}" in taken:
        number += 1
    return f"hsm{number}"


def _check_label_free(ctx: Context, label: str) -> None:
    check_name(label, "HSM")
    if label.startswith(operators.TOKEN_LABEL_PREFIX):
        # The tokens of operators are labelled op-NAME in the same token directory: an HSM
        # labelled op-alice would make alice's token ambiguous (she could no longer sign).
        raise UsageError(
            f"HSM label {label!r}: labels starting with {operators.TOKEN_LABEL_PREFIX!r} are "
            "kept for operators' tokens"
        )
    if any(ctx.store.hsm(i).label == label for i in ctx.store.hsm_ids()):
        raise AlreadyExistsError(f"an HSM labelled {label!r} already exists in {ctx.store.root}")


def _provision(
    ctx: Context,
    location: TokenLocation,
    pin_source: PinSource,
    label: str,
    later_pin: PinSource | None = None,
    serial_update: bool = False,
) -> HsmRecord:
    """Generate (or find) the kmsfs key pairs in the token and write the self-signed record.
    With ``serial_update``, a token enrolled already gets its access record (with the serial
    the location names) rewritten instead of a refusal, and the label is checked only for a
    new HSM."""
    with (
        library.session(location, pin_source.read(), rw=True) as session,
        library.hsm_errors(label),
    ):
        domainkeys.self_test(session)  # before the key pairs: a refused token is left as it was
        wrap_key, sign_key = keypairs.provision(session)
        record = HsmRecord(label=label, wrap_key=wrap_key, sign_key=sign_key, created=utc_now())
        message = contexts.message(contexts.HSM_RECORD, record.signed_bytes())
        record = replace(record, signature=bytes(keypairs.sign(session, sign_key.scheme, message)))
    record.verify_self_signature()
    if record.id in ctx.store.hsm_ids():
        if serial_update:
            stored = ctx.store.hsm(record.id)
            ctx.private.save_access("hsm", record.id, location, later_pin or pin_source)
            log.warning("this token is HSM %s already: how to reach it (serial %s) is recorded "
                        "now", stored.label, location.token_serial)
            return stored
        raise AlreadyExistsError(f"this token is already enrolled as HSM {record.id[:12]}")
    if serial_update:
        _check_label_free(ctx, label)
    ctx.private.save_access("hsm", record.id, location, later_pin or pin_source)
    try:
        ctx.store.save_hsm(record)
    except AlreadyExistsError:
        raise  # a concurrent enroll of this token won: the access record is its too
    except BaseException:
        ctx.private.forget_access("hsm", record.id)
        raise
    return record


def create_hsm(ctx: Context, label: str | None = None) -> HsmRecord:
    """A new embedded SoftHSM2 token with a random PIN kept in the private area."""
    ctx.private.ensure()
    conf = ctx.private.softhsm_conf_to_make_tokens()
    label = _next_label(ctx) if label is None else label  # "" is a bad label, not none
    _check_label_free(ctx, label)
    pin = secrets.token_hex(16)
    pin_file = ctx.private.write_pin(label, pin)
    try:
        with softhsm.new_token(conf, label, pin) as location:
            return _provision(ctx, location, PinSource(file=str(pin_file)), label)
    except BaseException:
        pin_file.unlink(missing_ok=True)
        raise


def enroll_hsm(
    ctx: Context,
    module: str,
    token_label: str,
    pin_source: PinSource,
    label: str | None = None,
    later_pin: PinSource | None = None,
    token_serial: str | None = None,
) -> HsmRecord:
    """Enroll an existing token of any PKCS#11 module (``token_serial`` where its label is
    not unique).

    ``pin_source`` unlocks it now; ``later_pin`` (default: the same) is what later uses record,
    e.g. a systemd credential that only the mount service can read.
    """
    if len(token_label.encode()) > TOKEN_LABEL_MAX:
        raise UsageError(f"token label {token_label!r:.40} is longer than {TOKEN_LABEL_MAX} bytes")
    ctx.private.ensure()
    label = _next_label(ctx) if label is None else label  # "" is a bad label, not none
    if token_serial is None:  # else once the token is known not to be enrolled already
        _check_label_free(ctx, label)
    location = TokenLocation(module, token_label, _softhsm_conf_for(ctx, module), token_serial)
    library.refresh(location)
    return _provision(ctx, location, pin_source, label, later_pin, token_serial is not None)


def _softhsm_conf_for(ctx: Context, module: str) -> str | None:
    """SoftHSM needs to know its config: the caller's SOFTHSM2_CONF, else the store's own."""
    if os.environ.get("SOFTHSM2_CONF"):
        return os.environ["SOFTHSM2_CONF"]
    if "softhsm" in Path(module).name and ctx.private.softhsm_conf.exists():
        return str(ctx.private.ensure_softhsm_conf())
    return None


def list_hsms(ctx: Context) -> list[HsmRecord]:
    return sorted((ctx.store.hsm(i) for i in ctx.store.hsm_ids()), key=lambda r: r.label)


def resolve_hsm(ctx: Context, ref: str) -> HsmRecord:
    """An HSM by label or by id prefix.

    A label that two records carry is refused, not resolved to either: a record is only
    self-signed, so whoever can write the store can plant one under a known label (with keys
    held in software) and have ``--hsm hsm2`` pick it for a new Trust.
    """
    records = list_hsms(ctx)
    labelled = [r for r in records if r.label == ref]
    if len(labelled) > 1:
        ids = ", ".join(r.id[:12] for r in labelled)
        raise IntegrityError(
            f"{len(labelled)} HSM records in the store carry the label {ref!r} ({ids}); one was "
            "planted or copied from another store: name the HSM by its id"
        )
    if labelled:
        return labelled[0]
    return ctx.store.hsm(ctx.store.resolve("HSM", ref, [r.id for r in records]))


HEALTH_PROBE = b"kmsfs/v1/hsm-health-probe\x00"


def health(ctx: Context) -> list[dict[str, object]]:
    """Each HSM this host can reach by its store's private area: does it open with its PIN,
    hold the keys of its record, and sign? (One signature of a fixed probe message: the
    probe context is used for nothing else, so the signature is worthless to anyone.)"""
    rows: list[dict[str, object]] = []
    for record in list_hsms(ctx):
        if not ctx.private.has_access("hsm", record.id):
            continue  # an HSM of another host: not ours to report
        problem = None
        try:  # this HSM alone: its own problem, not open_hsm's "no HSM could serve (...)"
            with contextlib.ExitStack() as stack:
                session = open_one_hsm(ctx, record, stack)
                HsmSession(record, session).sign(
                    contexts.message(HEALTH_PROBE, record.id.encode())
                )
        except KmsfsError as exc:
            problem = str(exc)
        rows.append(
            {"id": record.id, "label": record.label, "ok": problem is None, "problem": problem}
        )
    return rows
