"""Operator actions: create an operator (key in its own token, or passphrase file), sign."""

from dataclasses import replace

from kmsfs.errors import AlreadyExistsError, IntegrityError, UsageError
from kmsfs.hsm import softhsm
from kmsfs.hsm.pins import PinSource
from kmsfs.model import contexts
from kmsfs.model.records import OperatorRecord, check_name
from kmsfs.service import operator_keys
from kmsfs.service.context import Context, utc_now

TOKEN_LABEL_PREFIX = "op-"
TOKEN_LABEL_MAX = 32


def _token_label(name: str) -> str:
    label = TOKEN_LABEL_PREFIX + name
    if len(label) > TOKEN_LABEL_MAX:
        raise UsageError(f"operator name {name!r} is too long for a token label (max 29)")
    return label


def create_operator(
    ctx: Context, name: str, secret: PinSource, protection: str = "token"
) -> OperatorRecord:
    """Create operator ``name`` whose key only ``secret`` unlocks (a token PIN or a passphrase).

    All or nothing: if anything fails or is interrupted (Ctrl-C, SIGTERM), the token and the
    access record made for it are removed again, so the same command can simply be run again.
    A token ``op-NAME`` found while the store has no operator NAME is what a killed run left
    (only this function makes tokens with the prefix, and it saves the operator under the
    store's lock before it lets go), so it is removed before a new one is made; so is a key
    file left the same way.
    """
    check_name(name, "operator")
    if protection not in ("token", "passphrase"):
        raise UsageError(f"unknown protection {protection!r} (token or passphrase)")
    label = _token_label(name)
    if name in ctx.store.operator_names():  # before asking for a PIN; checked again below
        raise AlreadyExistsError(f"operator {name!r} already exists in {ctx.store.root}")
    value = secret.read()
    if protection == "passphrase" and len(value) < 8:
        raise UsageError("a passphrase needs at least 8 characters")
    if protection == "token" and len(value) < softhsm.MIN_PIN_LENGTH:
        raise UsageError(f"a token PIN needs at least {softhsm.MIN_PIN_LENGTH} characters")
    with ctx.store.exclusive():
        if name in ctx.store.operator_names():
            raise AlreadyExistsError(f"operator {name!r} already exists in {ctx.store.root}")
        ctx.private.ensure()
        if protection == "passphrase":
            key_file = ctx.private.operator_key_file(name)
            key_file.unlink(missing_ok=True)  # what a killed run left, as for tokens below
            try:
                key = operator_keys.keyfile_generate(key_file, name, value)
                return _publish(ctx, OperatorRecord(name, key, protection, utc_now()), value)
            except BaseException:
                key_file.unlink(missing_ok=True)
                raise
        if not ctx.private.softhsm_conf.exists():
            softhsm.write_config(ctx.private.softhsm_conf, ctx.private.token_dir)
        softhsm.delete_tokens_labelled(ctx.private.softhsm_conf, label)
        try:
            with softhsm.new_token(ctx.private.softhsm_conf, label, value) as location:
                key = operator_keys.token_generate(location, value)
                ctx.private.save_access("operator", name, location, None)
                return _publish(ctx, OperatorRecord(name, key, protection, utc_now()), value)
        except BaseException:
            ctx.private.forget_access("operator", name)
            raise


def _publish(ctx: Context, record: OperatorRecord, secret: str) -> OperatorRecord:
    """Self-sign the new operator's record and save it: the step that makes the operator."""
    record = replace(
        record,
        signature=sign_as(ctx, record, secret, contexts.OPERATOR_RECORD, record.signed_bytes()),
    )
    record.verify_self_signature()
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
        value = operator_keys.token_sign(location, secret, message)
    else:
        value = operator_keys.keyfile_sign(
            ctx.private.operator_key_file(record.name), record.name, secret, message
        )
    try:
        record.key.verify(value, message)
    except IntegrityError:
        raise IntegrityError(
            f"the key that signed for operator {record.name} is not the key "
            f"{record.key.key_id[:12]} that operators/{record.name}.json in {ctx.store.root} "
            "names: the record was replaced, or the token or key file is another's; nothing "
            "was saved"
        ) from None
    return value


def list_operators(ctx: Context) -> list[OperatorRecord]:
    return [ctx.store.operator(name) for name in ctx.store.operator_names()]
