"""Structural validation of every model document (kmsfs/model/*.py; DESIGN §2.6).

A malformed document is refused with FormatError (BadVersionError for an unknown version) before
anything is verified or used: unknown fields could carry unverified meaning, and names become
file names in the store.
"""

import base64
import copy
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from kmsfs.errors import BadVersionError, FormatError, IntegrityError
from kmsfs.model import contexts, fields
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.domain import Domain, MasterKeyEpoch, SealedDomain, WrappedKey
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.records import HsmRecord, OperatorRecord, check_name
from kmsfs.model.trust import Member, SealedTrust, Trust
from tests.unit.model_fixtures import (
    make_domain,
    make_hsm,
    make_operator,
    make_trust,
    rsa_wrap_spki,
    world,
)

Path = tuple[str | int, ...]


def at(doc: Any, path: Path) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def docs() -> dict[str, tuple[Any, Callable[[Any], Any]]]:
    """Every document type as a valid dict and the parser that reads it."""
    w = world()
    return {
        "hsm": (w.h1.record.to_dict(), HsmRecord.from_dict),
        "operator": (w.op("alice").record().to_dict(), OperatorRecord.from_dict),
        "sealed-trust": (w.t2.to_dict(), SealedTrust.from_dict),
        "sealed-domain": (w.domain.to_dict(), SealedDomain.from_dict),
        "bundle": (w.bundle.to_dict(), DomainBundle.from_dict),
    }


# Every object in every document type: (document, path to the object).
OBJECTS: list[tuple[str, Path]] = [
    ("hsm", ()),
    ("hsm", ("signed",)),
    ("hsm", ("signed", "wrap_key")),
    ("hsm", ("signed", "sign_key")),
    ("operator", ()),
    ("operator", ("signed",)),
    ("operator", ("signed", "key")),
    ("sealed-trust", ()),
    ("sealed-trust", ("trust",)),
    ("sealed-trust", ("trust", "hsms", 0)),
    ("sealed-trust", ("trust", "hsms", 1, "wrap_key")),
    ("sealed-trust", ("trust", "operators", 0)),
    ("sealed-trust", ("trust", "operators", 4, "key")),
    ("sealed-trust", ("approvals", 0)),
    ("sealed-trust", ("seal",)),
    ("sealed-domain", ()),
    ("sealed-domain", ("domain",)),
    ("sealed-domain", ("domain", "k", 0)),
    ("sealed-domain", ("domain", "mk", 0)),
    ("sealed-domain", ("seal",)),
    ("bundle", ()),
    ("bundle", ("chain", 0, "trust")),
    ("bundle", ("chain", 1, "approvals", 2)),
]


def _id(value: Any) -> str:
    return "/".join(str(p) for p in value) or "top" if isinstance(value, tuple) else str(value)


@pytest.mark.parametrize(("name", "path"), OBJECTS, ids=[f"{n}:{_id(p)}" for n, p in OBJECTS])
def test_valid_document_parses(name: str, path: Path) -> None:
    """The control for the two tests below: the unmodified document parses."""
    doc, parse = docs()[name]
    parse(copy.deepcopy(doc))


@pytest.mark.parametrize(("name", "path"), OBJECTS, ids=[f"{n}:{_id(p)}" for n, p in OBJECTS])
def test_unknown_field_is_refused(name: str, path: Path) -> None:
    """An extra field anywhere is a FormatError (it could carry unverified meaning)."""
    doc, parse = docs()[name]
    for extra in ("extra", "_extra", "Quorum"):
        mutated = copy.deepcopy(doc)
        at(mutated, path)[extra] = 1
        with pytest.raises(FormatError):
            parse(mutated)


@pytest.mark.parametrize(("name", "path"), OBJECTS, ids=[f"{n}:{_id(p)}" for n, p in OBJECTS])
def test_missing_field_is_refused(name: str, path: Path) -> None:
    """Dropping any one field anywhere is a FormatError, never a KeyError."""
    doc, parse = docs()[name]
    for key in list(at(doc, path)):
        mutated = copy.deepcopy(doc)
        del at(mutated, path)[key]
        with pytest.raises(FormatError):
            parse(mutated)


@pytest.mark.parametrize(
    ("name", "path", "wrong"),
    [
        ("hsm", ("signed",), "operator"),
        ("operator", ("signed",), "hsm"),
        ("sealed-trust", ("trust",), "domain"),
        ("sealed-trust", ("approvals", 0), "seal"),
        ("sealed-trust", ("seal",), "approval"),
        ("sealed-domain", ("domain",), "trust"),
        ("sealed-domain", ("seal",), "approval"),
        ("bundle", (), "domain"),
        ("bundle", (), "Domain-Bundle"),
    ],
)
def test_wrong_type_is_refused(name: str, path: Path, wrong: str) -> None:
    doc, parse = docs()[name]
    mutated = copy.deepcopy(doc)
    at(mutated, path)["_type"] = wrong
    with pytest.raises(FormatError, match="want a"):
        parse(mutated)


VERSIONED = [
    ("hsm", ("signed",)),
    ("operator", ("signed",)),
    ("sealed-trust", ("trust",)),
    ("sealed-domain", ("domain",)),
    ("bundle", ()),
]


@pytest.mark.parametrize(("name", "path"), VERSIONED, ids=[n for n, _ in VERSIONED])
@pytest.mark.parametrize("version", [0, 3, -1, 99, "1", None, [1]])
def test_unknown_format_version_is_refused(name: str, path: Path, version: Any) -> None:
    doc, parse = docs()[name]
    mutated = copy.deepcopy(doc)
    at(mutated, path)["format"] = version
    with pytest.raises(BadVersionError):
        parse(mutated)


# Every document's ``created`` (where it sits in the parsed dict).
CREATED_AT: list[tuple[str, Path]] = [
    ("hsm", ("signed",)),
    ("operator", ("signed",)),
    ("sealed-trust", ("trust",)),
    ("sealed-trust", ("trust", "hsms", 0)),
    ("sealed-domain", ("domain",)),
    ("bundle", ("chain", 1, "trust")),
]
#: What a dishonest proposer wrote in ``created``: fake lines that ``trust show`` printed above
#: the real HSM list, then a terminal escape (SGR 8) that hid the real lines after it.
SPOOF = "2026-11-28T14:13:17Z\n  HSMs         hsm1, hsm2\n  quorum       2 of 3\x1b[8m"


@pytest.mark.parametrize(("name", "path"), CREATED_AT, ids=[f"{n}:{_id(p)}" for n, p in CREATED_AT])
@pytest.mark.parametrize(
    "created",
    [SPOOF, "2026-11-28T14:13:17Z\n", "2026-11-28 14:13:17", "2026-11-28T14:13:17+00:00", ""],
)
def test_created_is_a_time_and_nothing_else(name: str, path: Path, created: str) -> None:
    """``created`` is printed above what an operator checks before signing (``trust show``,
    ``hsm list``): free text there drew fake lines over the real ones and hid them."""
    doc, parse = docs()[name]
    mutated = copy.deepcopy(doc)
    assert fields.TIMESTAMP.fullmatch(at(mutated, path)["created"])  # the control
    at(mutated, path)["created"] = created
    with pytest.raises(FormatError, match="created: want a time as YYYY-MM-DDTHH:MM:SSZ"):
        parse(mutated)


def test_format_true_is_not_version_1() -> None:
    """JSON ``true`` is not the version number 1 (Python's True == 1 must not leak through)."""
    for name, path in VERSIONED:
        doc, parse = docs()[name]
        mutated = copy.deepcopy(doc)
        at(mutated, path)["format"] = True
        with pytest.raises(BadVersionError):
            parse(mutated)


@pytest.mark.parametrize(
    ("name", "path", "value"),
    [
        ("sealed-trust", ("trust", "serial"), True),
        ("sealed-trust", ("trust", "serial"), "2"),
        ("sealed-trust", ("trust", "quorum"), False),
        ("sealed-trust", ("trust", "quorum"), "3"),
        ("sealed-trust", ("trust", "quorum"), None),
        ("sealed-trust", ("trust", "created"), 5),
        ("sealed-trust", ("trust", "hsms"), {}),
        ("sealed-trust", ("trust", "operators"), "alice"),
        ("sealed-trust", ("trust", "hsms", 0), []),
        ("sealed-trust", ("approvals",), {}),
        ("sealed-trust", ("seal",), []),
        ("sealed-domain", ("domain", "generation"), True),
        ("sealed-domain", ("domain", "mk", 0, "epoch"), True),
        ("sealed-domain", ("domain", "mk", 0, "epoch"), "1"),
        ("sealed-domain", ("domain", "k"), None),
        ("sealed-domain", ("domain", "k", 0, "scheme"), "rsa-oaep-md5"),
        ("sealed-domain", ("domain", "mk", 0, "scheme"), "aes-gcm"),
        ("hsm", ("signed", "label"), 7),
        ("hsm", ("signed", "wrap_key", "scheme"), None),
        ("hsm", ("signature",), None),
        ("operator", ("signed", "protection"), "sticky-note"),
        ("bundle", ("chain",), {}),
        ("bundle", ("domain",), "x"),
    ],
)
def test_wrong_field_type_is_refused(name: str, path: Path, value: Any) -> None:
    doc, parse = docs()[name]
    mutated = copy.deepcopy(doc)
    at(mutated, path[:-1])[path[-1]] = value
    with pytest.raises(FormatError):
        parse(mutated)


# -- Trust invariants -----------------------------------------------------------------------------


def _trust_variants() -> dict[str, Callable[[], Trust]]:
    w = world()
    trust = w.t2.trust
    alice, bob = trust.operators[:2]
    return {
        "quorum-0-with-operators": lambda: dataclasses.replace(trust, quorum=0),
        "quorum-negative": lambda: dataclasses.replace(trust, quorum=-1),
        "quorum-above-operators": lambda: dataclasses.replace(trust, quorum=6),
        "duplicate-operator-key": lambda: dataclasses.replace(
            trust, operators=(*trust.operators, Member("zed", alice.key))
        ),
        "duplicate-operator-name": lambda: dataclasses.replace(
            trust, operators=(*trust.operators, Member("alice", w.mallory.key))
        ),
        "duplicate-hsm": lambda: dataclasses.replace(trust, hsms=(*trust.hsms, trust.hsms[0])),
        "same-hsm-keys-under-two-labels": lambda: dataclasses.replace(
            trust, hsms=(*trust.hsms, dataclasses.replace(trust.hsms[0], label="again"))
        ),
        "no-hsms": lambda: dataclasses.replace(trust, hsms=()),
        "serial-0": lambda: dataclasses.replace(trust, serial=0, predecessor=None),
        "root-with-serial-2": lambda: dataclasses.replace(trust, predecessor=None),
        "successor-with-serial-1": lambda: dataclasses.replace(trust, serial=1),
        "successor-without-operators": lambda: dataclasses.replace(trust, operators=(), quorum=0),
        "genesis-with-quorum": lambda: dataclasses.replace(w.genesis.trust, quorum=1),
        "bad-predecessor-id": lambda: dataclasses.replace(trust, predecessor="AB" * 32),
        "bob-twice": lambda: dataclasses.replace(trust, operators=(alice, bob, bob), quorum=2),
    }


@pytest.mark.parametrize("variant", list(_trust_variants()))
def test_invalid_trust_is_refused(variant: str) -> None:
    with pytest.raises(FormatError):
        _trust_variants()[variant]()


@pytest.mark.parametrize(
    "variant",
    [
        "quorum-0-with-operators",
        "quorum-above-operators",
        "duplicate-operator-key",
        "duplicate-operator-name",
    ],
)
def test_invalid_trust_is_refused_when_parsed(variant: str) -> None:
    """The same checks run on a Trust read from a document."""
    w = world()
    payload = w.t2.trust.payload()
    operators = payload["operators"]
    if variant == "quorum-0-with-operators":
        payload["quorum"] = 0
    elif variant == "quorum-above-operators":
        payload["quorum"] = 6
    elif variant == "duplicate-operator-key":
        operators.append({"name": "zed", "key": operators[0]["key"]})
    else:
        operators.append({"name": "alice", "key": w.mallory.key.to_dict()})
    with pytest.raises(FormatError):
        Trust.from_dict(payload)


def test_valid_trust_shapes_are_accepted() -> None:
    """The controls: 1 of 1, n of n, and a genesis."""
    w = world()
    assert make_trust(w.hsms, w.ops[:1], 1, w.genesis).quorum == 1
    assert make_trust(w.hsms, w.ops, 5, w.genesis).quorum == 5
    assert make_trust(w.hsms).is_genesis


# -- names ----------------------------------------------------------------------------------------

BAD_NAMES = [
    "",
    "../x",
    ".x",
    ".",
    "..",
    "_x",
    "-x",
    "a" * 65,
    "a/b",
    "a b",
    "é",
    "x\n",
    "\nx",
    "a\x00b",
    "a\\b",
]
GOOD_NAMES = ["a", "A", "0", "a" * 64, "hsm-1.prod_eu", "9lives"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(FormatError):
        check_name(name, "test")


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_are_accepted(name: str) -> None:
    assert check_name(name, "test") == name


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused_in_every_document(name: str) -> None:
    """HSM labels, operator names (own record and inside a Trust) and Domain names."""
    w = world()
    with pytest.raises(FormatError):
        dataclasses.replace(w.h1.record, label=name)
    with pytest.raises(FormatError):
        dataclasses.replace(w.op("alice").record(), name=name)
    with pytest.raises(FormatError):
        dataclasses.replace(w.domain.domain, name=name)
    payload = w.t2.trust.payload()
    payload["operators"][0]["name"] = name
    with pytest.raises(FormatError):
        Trust.from_dict(payload)
    doc = w.h1.record.to_dict()
    doc["signed"]["label"] = name
    with pytest.raises(FormatError):
        HsmRecord.from_dict(doc)


# -- keys -----------------------------------------------------------------------------------------


@functools.cache
def rsa_spki(bits: int) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _der(tag: int, body: bytes) -> bytes:
    assert len(body) < 128
    return bytes([tag, len(body)]) + body


def unknown_algorithm_spki() -> bytes:
    """A well-formed SubjectPublicKeyInfo whose algorithm OID (1.2.3.4) nobody knows."""
    algorithm = _der(0x30, _der(0x06, bytes([0x2A, 0x03, 0x04])))
    return _der(0x30, algorithm + _der(0x03, b"\x00\x01"))


def test_rsa_3072_is_accepted() -> None:
    for scheme in ("rsa-oaep-sha1", "rsa-oaep-sha256", "rsa-pss-sha256"):
        assert PublicKey(scheme, rsa_wrap_spki()).scheme == scheme


@pytest.mark.parametrize("scheme", ["rsa-oaep-sha1", "rsa-oaep-sha256", "rsa-pss-sha256"])
def test_rsa_under_3072_bits_is_refused(scheme: str) -> None:
    with pytest.raises(FormatError, match="3072"):
        PublicKey(scheme, rsa_spki(2048))


def test_rsa_under_3072_bits_is_refused_in_an_hsm_record() -> None:
    doc = world().h1.record.to_dict()
    doc["signed"]["wrap_key"]["data"] = base64.b64encode(rsa_spki(2048)).decode()
    with pytest.raises(FormatError, match="3072"):
        HsmRecord.from_dict(doc)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_ed25519_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(FormatError, match="32 bytes"):
        PublicKey("ed25519", b"\x01" * size)


@pytest.mark.parametrize(
    "data",
    [b"", b"not der", b"\x30\x00", "ed25519-spki", "unknown-oid"],
    ids=["empty", "text", "empty-seq", "ed25519-spki", "unknown-oid"],
)
def test_rsa_scheme_needs_an_rsa_spki(data: bytes | str) -> None:
    """Anything but an RSA SubjectPublicKeyInfo under an RSA scheme is a FormatError."""
    if data == "ed25519-spki":
        raw = world().op("alice").private.public_key()
        data = raw.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    elif data == "unknown-oid":
        data = unknown_algorithm_spki()
    assert isinstance(data, bytes)
    with pytest.raises(FormatError):
        PublicKey("rsa-oaep-sha1", data)


@pytest.mark.parametrize("scheme", ["ed448", "rsa", "RSA-OAEP-SHA1", "", "ecdsa-p256"])
def test_unknown_key_scheme_is_refused(scheme: str) -> None:
    with pytest.raises(FormatError, match="scheme"):
        PublicKey(scheme, b"\x01" * 32)


def test_key_roles_are_enforced() -> None:
    """An HSM's wrap key must wrap and its sign key sign; an operator's key is Ed25519."""
    w = world()
    record = w.h1.record
    with pytest.raises(FormatError):
        dataclasses.replace(record, wrap_key=record.sign_key)
    with pytest.raises(FormatError):
        dataclasses.replace(record, sign_key=record.wrap_key)
    with pytest.raises(FormatError):
        dataclasses.replace(
            w.op("alice").record(), key=PublicKey("rsa-pss-sha256", rsa_wrap_spki())
        )
    payload = w.t2.trust.payload()
    payload["operators"][0]["key"] = PublicKey("rsa-pss-sha256", rsa_wrap_spki()).to_dict()
    with pytest.raises(FormatError, match="ed25519"):
        Trust.from_dict(payload)


def test_self_signature_is_checked_on_parse() -> None:
    """A record whose self-signature does not verify is not read (IntegrityError)."""
    w = world()
    doc = w.h1.record.to_dict()
    doc["signature"] = w.h2.record.to_dict()["signature"]
    with pytest.raises(IntegrityError):
        HsmRecord.from_dict(doc)
    op = w.op("alice").record().to_dict()
    op["signed"]["protection"] = "token"
    with pytest.raises(IntegrityError):
        OperatorRecord.from_dict(op)


@pytest.mark.parametrize(
    "context",
    [contexts.HSM_SEALS_TRUST, contexts.HSM_SEALS_DOMAIN, contexts.OPERATOR_RECORD, b""],
    ids=["hsm-seals-trust", "hsm-seals-domain", "operator-record", "no-context"],
)
def test_record_self_signature_is_bound_to_its_context(context: bytes) -> None:
    """A record signed by the right key under another context is not self-signed."""
    w = world()
    hsm = w.h1.record
    doc = hsm.to_dict()
    doc["signature"] = base64.b64encode(w.h1.sign(context, hsm.signed_bytes())).decode()
    with pytest.raises(IntegrityError):
        HsmRecord.from_dict(doc)
    alice = w.op("alice")
    op = alice.record().to_dict()
    other = contexts.HSM_RECORD if context == contexts.OPERATOR_RECORD else context
    op["signature"] = base64.b64encode(alice.sign(other, alice.record().signed_bytes())).decode()
    with pytest.raises(IntegrityError):
        OperatorRecord.from_dict(op)


# -- hex ids --------------------------------------------------------------------------------------

BAD_IDS: list[Any] = [
    "A" * 64,
    "a" * 63,
    "a" * 65,
    "g" * 64,
    "0x" + "a" * 62,
    " " + "a" * 63,
    "a" * 64 + "\n",
    "a" * 64 + " ",
    "",
    123,
    None,
    ["a" * 64],
]


@pytest.mark.parametrize("value", BAD_IDS, ids=repr)
def test_hex_id_refuses(value: Any) -> None:
    with pytest.raises(FormatError, match="hex id"):
        fields.hex_id(value, "test")


ID_FIELDS: list[tuple[str, Path]] = [
    ("sealed-trust", ("approvals", 0, "subject")),
    ("sealed-trust", ("approvals", 0, "key_id")),
    ("sealed-trust", ("seal", "subject")),
    ("sealed-trust", ("seal", "key_id")),
    ("sealed-trust", ("trust", "predecessor")),
    ("sealed-domain", ("domain", "trust")),
    ("sealed-domain", ("domain", "k", 0, "hsm")),
    ("sealed-domain", ("seal", "subject")),
]


@pytest.mark.parametrize(("name", "path"), ID_FIELDS, ids=[f"{n}:{_id(p)}" for n, p in ID_FIELDS])
@pytest.mark.parametrize("value", [v for v in BAD_IDS if v != "a" * 64 + "\n"], ids=repr)
def test_bad_hex_ids_are_refused_in_documents(name: str, path: Path, value: Any) -> None:
    """Every id field of every document checks its id (the newline case is tested below)."""
    doc, parse = docs()[name]
    mutated = copy.deepcopy(doc)
    at(mutated, path[:-1])[path[-1]] = value
    with pytest.raises(FormatError):
        parse(mutated)


def test_id_with_trailing_newline_is_refused_in_a_document() -> None:
    """``$`` in a regex also matches before a final newline: ids must still be exactly 64 hex."""
    doc, parse = docs()["sealed-trust"]
    mutated = copy.deepcopy(doc)
    mutated["seal"]["subject"] += "\n"
    with pytest.raises(FormatError, match="hex id"):
        parse(mutated)


def test_domain_previous_must_be_a_hex_id() -> None:
    payload = world().domain.domain.payload()
    payload["generation"] = 2
    payload["previous"] = "a" * 64 + "\n"
    with pytest.raises(FormatError, match="hex id"):
        Domain.from_dict(payload)
    payload["previous"] = "a" * 64
    assert Domain.from_dict(payload).previous == "a" * 64


# -- Domain invariants ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "previous", "ok"),
    [
        (1, None, True),
        (2, "ab" * 32, True),
        (7, "ab" * 32, True),
        (1, "ab" * 32, False),
        (2, None, False),
        (0, None, False),
        (0, "ab" * 32, False),
        (-1, "ab" * 32, False),
    ],
)
def test_generation_and_previous_agree(generation: int, previous: str | None, ok: bool) -> None:
    """Generation 1 has no previous Domain; every later generation names one."""
    base = world().domain.domain
    if ok:
        assert dataclasses.replace(base, generation=generation, previous=previous)
    else:
        with pytest.raises(FormatError, match="generation"):
            dataclasses.replace(base, generation=generation, previous=previous)
        payload = {**base.payload(), "generation": generation, "previous": previous}
        with pytest.raises(FormatError):
            Domain.from_dict(payload)


@pytest.mark.parametrize(
    ("epochs", "ok"),
    [
        ((1,), True),
        ((1, 2, 3), True),
        ((), False),
        ((0,), False),
        ((2,), False),
        ((1, 3), False),
        ((2, 1), False),
        ((1, 1), False),
        ((1, 2, 2), False),
    ],
    ids=repr,
)
def test_master_key_epochs_are_1_to_n_in_order(epochs: tuple[int, ...], ok: bool) -> None:
    base = world().domain.domain
    keys = tuple(MasterKeyEpoch(e, bytes([e % 256]) * 40, bytes([e % 256]) * 32) for e in epochs)
    if ok:
        assert dataclasses.replace(base, master_keys=keys).current_epoch.epoch == len(epochs)
    else:
        with pytest.raises(FormatError, match="epoch"):
            dataclasses.replace(base, master_keys=keys)
        payload = {**base.payload(), "mk": [k.to_dict() for k in keys]}
        with pytest.raises(FormatError):
            Domain.from_dict(payload)


def test_k_is_wrapped_at_least_once_and_once_per_hsm() -> None:
    base = world().domain.domain
    with pytest.raises(FormatError, match="at least one"):
        dataclasses.replace(base, wrapped_k=())
    twice = (base.wrapped_k[0], base.wrapped_k[0])
    with pytest.raises(FormatError, match="twice"):
        dataclasses.replace(base, wrapped_k=twice)
    other_data = dataclasses.replace(base.wrapped_k[0], data=b"other")
    with pytest.raises(FormatError, match="twice"):
        dataclasses.replace(base, wrapped_k=(base.wrapped_k[0], other_data))


def test_wrapped_key_scheme_is_checked_when_parsed() -> None:
    doc = world().domain.domain.wrapped_k[0].to_dict()
    assert WrappedKey.from_dict(doc).scheme == "rsa-oaep-sha1"
    doc["scheme"] = "rsa-pkcs1v15"
    with pytest.raises(FormatError, match="scheme"):
        WrappedKey.from_dict(doc)


def test_helpers_build_valid_documents() -> None:
    """Fixture sanity: fresh HSMs, operators and Domains pass their own checks."""
    hsm = make_hsm("fresh")
    hsm.record.verify_self_signature()
    make_operator("fresh").record().verify_self_signature()
    assert make_domain(world().t2, epochs=3).current_epoch.epoch == 3
