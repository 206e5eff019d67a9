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
    """Create operator ``name`` whose key only ``secret`` unlocks (a token PIN or a passphrase)."""
    check_name(name, "operator")
    if name in ctx.store.operator_names():
        raise AlreadyExistsError(f"operator {name!r} already exists in {ctx.store.root}")
    ctx.private.ensure()
    value = secret.read()
    if protection == "token":
        if not ctx.private.softhsm_conf.exists():
            softhsm.write_config(ctx.private.softhsm_conf, ctx.private.token_dir)
        label = _token_label(name)
        location = softhsm.create_token(ctx.private.softhsm_conf, label, value)
        try:
            key = operator_keys.token_generate(location, value)
        except BaseException:
            softhsm.delete_token(ctx.private.softhsm_conf, label)
            raise
        ctx.private.save_access("operator", name, location, None)
    elif protection == "passphrase":
        if len(value) < 8:
            raise UsageError("a passphrase needs at least 8 characters")
        key = operator_keys.keyfile_generate(ctx.private.operator_key_file(name), name, value)
    else:
        raise UsageError(f"unknown protection {protection!r} (token or passphrase)")
    record = OperatorRecord(name=name, key=key, protection=protection, created=utc_now())
    record = replace(
        record,
        signature=sign_as(ctx, record, value, contexts.OPERATOR_RECORD, record.signed_bytes()),
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
