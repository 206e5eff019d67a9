"""Operator actions: create an operator (key in its own token, or passphrase file), sign,
change the PIN or passphrase."""

import contextlib
import logging
from dataclasses import replace
from pathlib import Path

from kmsfs.errors import AlreadyExistsError, IntegrityError, NotFoundError, PinError, UsageError
from kmsfs.hsm import softhsm
from kmsfs.hsm.pins import PinSource
from kmsfs.model import contexts
from kmsfs.model.records import OperatorRecord, check_name
from kmsfs.service import operator_keys
from kmsfs.service.context import Context, utc_now

log = logging.getLogger(__name__)

TOKEN_LABEL_PREFIX = "op-"
TOKEN_LABEL_MAX = 32


def _token_label(name: str) -> str:
    label = TOKEN_LABEL_PREFIX + name
    if len(label) > TOKEN_LABEL_MAX:
        raise UsageError(f"operator name {name!r} is too long for a token label (max 29)")
    return label


#: The shortest passphrase of an operator key file (each guess costs an scrypt).
MIN_SECRET_LENGTH = 8

#: The shortest operator token PIN (see :func:`check_token_pin`).
MIN_TOKEN_PIN_LENGTH = 12
#: How many different characters an operator token PIN has at least.
MIN_TOKEN_PIN_DISTINCT = 4


#: What a refused token PIN's message advises at ``operator create``; a change cannot turn a
#: token into a key file, so :func:`change_secret` advises only a longer PIN.
CREATE_HINT = "use a longer PIN, or --passphrase"


def check_token_pin(pin: str, hint: str = CREATE_HINT) -> None:
    """Refuse a PIN too weak to guard an operator key in the store's embedded SoftHSM2 token.

    The one rule for an operator's token PIN, whatever it comes from (--pin-file, --pin-env, the
    prompt). The token lives in the store's ``private/tokens`` beside the HSM PINs, and SoftHSM2
    has no retry counter and no lockout: whoever can read that directory (root on the store's
    machine, docs/threat-model.md §4) can call C_Login guess after guess, a few milliseconds
    each (every 4-digit PIN fell in about 30 s), or attack the token files offline, faster
    still. The PIN is then all that keeps them from signing as the operator, and, the tokens of
    all operators being there, from sealing a Trust as a whole quorum alone (DESIGN.md §2.3).

    So a token PIN needs 12 characters, 4 of them different: 10^12 guesses at the least (12
    digits, the usual PIN); a letter earns no shorter PIN (one letter and 7 digits is 250 times
    fewer guesses than that), and a repeated character or whitespace no length. That is a floor,
    not strength: a passphrase key file costs every guess an scrypt (~0.3 s and 128 MiB) and
    stays the stronger choice (docs/threat-model.md §7). HSM PINs are random (``secrets``) and
    keep SoftHSM2's own limits (:data:`softhsm.MIN_PIN_LENGTH`).
    """
    why = "SoftHSM2 has no lockout, so whoever can read the store's private/tokens could guess"
    if len(pin) < MIN_TOKEN_PIN_LENGTH or len(set(pin)) < MIN_TOKEN_PIN_DISTINCT:
        raise UsageError(
            f"an operator's token PIN needs at least {MIN_TOKEN_PIN_LENGTH} characters, "
            f"{MIN_TOKEN_PIN_DISTINCT} of them different ({why} a weaker one); {hint}"
        )
    if len(pin.encode()) > softhsm.MAX_PIN_LENGTH:
        raise UsageError(
            f"an operator's token PIN has at most {softhsm.MAX_PIN_LENGTH} bytes (SoftHSM2's "
            "limit); use a shorter one"
        )


def check_new_secret(protection: str, value: str, hint: str = CREATE_HINT) -> None:
    """The one rule for a new operator secret, at ``operator create`` and at a change alike:
    :func:`check_token_pin` for a token PIN, :data:`MIN_SECRET_LENGTH` for a passphrase."""
    if protection == "token":
        check_token_pin(value, hint)
    elif len(value) < MIN_SECRET_LENGTH:
        raise UsageError(f"a passphrase needs at least {MIN_SECRET_LENGTH} characters")


#: A create in progress leaves ``private/operator-pending/NAME`` until just before the operator
#: is saved: what a run killed meanwhile left (a token, a key file) is then known to be its own.
PENDING_DIR = "operator-pending"


def create_operator(
    ctx: Context, name: str, secret: PinSource, protection: str = "token"
) -> OperatorRecord:
    """Create operator ``name`` whose key only ``secret`` unlocks (a token PIN or a passphrase).

    All or nothing: if anything fails or is interrupted (Ctrl-C, SIGTERM), the token, key file
    and access record made for it are removed again, so the same command can simply be run
    again. A run killed outright (kill -9, a power cut) cannot clean up; its pending mark lets
    the next run remove what it left. A token labelled ``op-NAME`` or a key file of NAME with
    no such mark is never removed: it may be an HSM's token (HSM labels could start with
    ``op-`` before) or the key of an operator whose record is missing from this store. The
    command then refuses, saying what is there.
    """
    check_name(name, "operator")
    if protection not in ("token", "passphrase"):
        raise UsageError(f"unknown protection {protection!r} (token or passphrase)")
    label = _token_label(name) if protection == "token" else None
    if name in ctx.store.operator_names():  # before asking for a PIN; checked again below
        raise AlreadyExistsError(f"operator {name!r} already exists in {ctx.store.root}")
    ctx.store.require_writable("a new operator")  # a read-only store: before the PIN prompt
    value = secret.read()
    check_new_secret(protection, value)
    with ctx.store.exclusive():
        if name in ctx.store.operator_names():
            raise AlreadyExistsError(f"operator {name!r} already exists in {ctx.store.root}")
        ctx.private.ensure()
        conf = ctx.private.softhsm_conf
        if label is not None:
            conf = ctx.private.softhsm_conf_to_make_tokens()
        pending = ctx.private.root / PENDING_DIR / name
        _clear_interrupted(ctx, name, pending)
        key_file = ctx.private.operator_key_file(name)
        if key_file.exists():
            raise AlreadyExistsError(
                f"{key_file} exists (the key of an operator {name} whose record is not in "
                f"{ctx.store.root}?); nothing done"
            )
        if label is not None and softhsm.tokens_labelled(conf, label):
            raise AlreadyExistsError(
                f"a token labelled {label!r} exists in {ctx.private.token_dir} (an HSM's, or "
                f"the key of an operator {name} whose record is not in {ctx.store.root}); "
                "nothing done"
            )
        pending.parent.mkdir(mode=0o700, exist_ok=True)
        pending.touch(mode=0o600)
        try:
            if label is None:
                try:
                    key = operator_keys.keyfile_generate(key_file, name, value)
                    return _publish(ctx, OperatorRecord(name, key, protection, utc_now()), value,
                                    pending)
                except BaseException:
                    key_file.unlink(missing_ok=True)
                    raise
            try:
                with softhsm.new_token(conf, label, value) as location:
                    key = operator_keys.token_generate(location, value)
                    ctx.private.save_access("operator", name, location, None)
                    return _publish(ctx, OperatorRecord(name, key, protection, utc_now()), value,
                                    pending)
            except BaseException:
                ctx.private.forget_access("operator", name)
                raise
        finally:
            pending.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # empty now: a failed create leaves nothing
                pending.parent.rmdir()


def _clear_interrupted(ctx: Context, name: str, pending: Path) -> None:
    """Remove what a create of ``name`` that was killed outright left, if its mark says so."""
    if not pending.exists():
        return
    if ctx.private.softhsm_conf.exists():
        softhsm.delete_tokens_labelled(
            ctx.private.softhsm_conf_to_make_tokens(), TOKEN_LABEL_PREFIX + name
        )
    ctx.private.operator_key_file(name).unlink(missing_ok=True)
    ctx.private.forget_access("operator", name)
    pending.unlink()


def _publish(
    ctx: Context, record: OperatorRecord, secret: str, pending: Path
) -> OperatorRecord:
    """Self-sign the new operator's record and save it: the step that makes the operator.

    The pending mark goes first: a run killed between the two leaves a token or key file that
    the next run refuses to touch (safe), never a mark beside a saved operator's key (which a
    later create of the same name, with the record deleted from the store, would remove)."""
    record = replace(
        record,
        signature=sign_as(ctx, record, secret, contexts.OPERATOR_RECORD, record.signed_bytes()),
    )
    record.verify_self_signature()
    pending.unlink(missing_ok=True)
    ctx.store.save_operator(record)
    return record


def sign_as(
    ctx: Context, record: OperatorRecord, secret: str, context: bytes, payload: bytes
) -> bytes:
    """Sign ``context || payload`` with the operator's private key, unlocked by ``secret``.

    The signature is checked against ``record.key`` before it is returned. A store writer
    needs no key to replace ``operators/NAME.json`` with a self-signed record of a key of
    their own; a Trust proposed after that lists their key under the operator's name, and an
    approval saved under that key id would hold a signature that verifies under no key the
    Trust lists, leaving the approval slot free for the writer's own signature. Checking here
    turns that into a refusal at the operator's first signature, before anything is saved.
    """
    message = contexts.message(context, payload)
    if record.protection == "token":
        location, _ = ctx.private.access("operator", record.name)
        log.info("operator %s signs with its %s", record.name, location.describe())
        value = operator_keys.token_sign(location, secret, message)
    else:
        key_file = ctx.private.operator_key_file(record.name)
        log.info("operator %s signs with its key file %s", record.name, key_file)
        value = operator_keys.keyfile_sign(key_file, record.name, secret, message)
    try:
        record.key.verify(value, message)
    except IntegrityError:
        raise _not_its_key(
            ctx, record, f"the key that signed for operator {record.name}", "nothing was saved"
        ) from None
    return value


def _not_its_key(ctx: Context, record: OperatorRecord, which: str, outcome: str) -> IntegrityError:
    """The refusal when the token or key file on this machine holds another key than the
    operator's record names (see :func:`sign_as` for how a store writer gets there)."""
    return IntegrityError(
        f"{which} is not the key {record.key.key_id[:12]} that operators/{record.name}.json in "
        f"{ctx.store.root} names: the record was replaced, or the token or key file is "
        f"another's; {outcome}"
    )


def change_secret(
    ctx: Context, name: str, current: PinSource, new: PinSource
) -> OperatorRecord:
    """Change the PIN of operator ``name``'s token, or the passphrase of its key file.

    The key stays: the record, its key id and every signature made with it stay valid, so no
    document changes and no Trust needs approving again. This is how an operator made before
    the 12-character rule (:func:`check_token_pin`) gets a PIN that meets it. Refused, with
    nothing changed: an unknown operator, or one whose key is not on this machine (before any
    secret is asked for); a new secret that ``operator create`` would refuse, or the current
    one again (before the key is touched); a wrong current secret.
    """
    record = ctx.store.operator(name)
    what = "PIN" if record.protection == "token" else "passphrase"
    key_file = ctx.private.operator_key_file(name)
    location = ctx.private.access("operator", name)[0] if record.protection == "token" else None
    if location is None and not key_file.exists():
        raise NotFoundError(f"operator {name}: key file {key_file} is not on this machine")
    old = current.read()
    fresh = _read_new(new, what)
    check_new_secret(record.protection, fresh, hint=f"use a longer {what}")
    if fresh == old:
        raise UsageError(f"the new {what} of operator {name} is the current one; nothing changed")
    with ctx.store.exclusive():  # two changes at once: the second finds the old secret wrong
        try:
            if location is not None:
                operator_keys.token_change_pin(location, old, fresh, record.key)
            else:
                operator_keys.keyfile_change_passphrase(key_file, name, old, fresh, record.key)
        except IntegrityError:
            raise _not_its_key(
                ctx, record, f"the key of operator {name} on this machine", "nothing was changed"
            ) from None
    return record


def _read_new(source: PinSource, what: str) -> str:
    """The new secret, asked twice at the prompt: a typo there would lock the key away for
    good, since nobody can reset an operator's PIN (the token's SO PIN is thrown away)."""
    try:
        value = source.read()
        again = replace(source, prompt=f"{source.prompt} (again)") if source.prompt else None
        if again is not None and again.read() != value:
            raise PinError("the two typed differ")
    except PinError as exc:
        raise PinError(f"the new {what}: {exc}; nothing changed") from None
    return value


def list_operators(ctx: Context) -> list[OperatorRecord]:
    return [ctx.store.operator(name) for name in ctx.store.operator_names()]
