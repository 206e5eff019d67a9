"""Canonical encoding, round trips and content addressing (kmsfs/model/canonical.py, DESIGN §2.2).

Signatures and ids are over canonical bytes, so the encoding must be unique (one spelling per
value), strict on input (anything ambiguous is a FormatError) and stable through every
document's to_dict/from_dict.
"""

import base64
import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsfs.errors import FormatError
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.canonical import (
    MAX_INTEGER,
    b64decode,
    b64encode,
    canonical_bytes,
    digest,
    parse_json,
)
from kmsfs.model.domain import Domain, MasterKeyEpoch, SealedDomain, WrappedKey
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.records import HsmRecord, OperatorRecord
from kmsfs.model.trust import Member, SealedTrust, Signature, Trust
from tests.unit.model_fixtures import world

QUICK = settings(database=None, deadline=None, max_examples=100)

json_scalars = (
    st.none() | st.booleans() | st.integers(-MAX_INTEGER, MAX_INTEGER) | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def reordered(value: Any, permute: Callable[[list[str]], list[str]]) -> Any:
    """The same JSON value with every object's keys inserted in another order."""
    if isinstance(value, dict):
        return {k: reordered(value[k], permute) for k in permute(list(value))}
    if isinstance(value, list):
        return [reordered(v, permute) for v in value]
    return value


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


# -- canonical bytes ------------------------------------------------------------------------------


@QUICK
@given(json_values, st.randoms(use_true_random=False))
def test_bytes_do_not_depend_on_insertion_order(value: Any, rnd: Any) -> None:
    """Two machines building the same document in another order sign the same bytes."""
    shuffled = reordered(value, lambda keys: rnd.sample(keys, len(keys)))
    backwards = reordered(value, lambda keys: keys[::-1])
    assert canonical_bytes(shuffled) == canonical_bytes(value) == canonical_bytes(backwards)
    assert parse_json(canonical_bytes(value)) == value


def test_exact_spelling() -> None:
    """Sorted keys, no whitespace, ASCII only: the one spelling of a value."""
    value = {"b": 1, "a": [True, None, "é", -3], "A": {}}
    assert canonical_bytes(value) == b'{"A":{},"a":[true,null,"\\u00e9",-3],"b":1}'


def test_trust_id_does_not_depend_on_field_order() -> None:
    """A Trust payload read back with its fields in another order has the same id."""
    trust = world().t2.trust
    again = Trust.from_dict(reordered(trust.payload(), lambda keys: keys[::-1]))
    assert again.id == trust.id
    assert again.signed_bytes() == trust.signed_bytes()


@pytest.mark.parametrize(
    "value",
    [1.5, 1.0, {"quorum": 3.0}, [0.1], float("nan"), float("inf"), b"bytes", (1, 2), {1: "a"}, {2}],
    ids=repr,
)
def test_values_without_one_spelling_are_refused(value: Any) -> None:
    """Floats, bytes, tuples, sets and non-string keys have no canonical encoding."""
    with pytest.raises(FormatError):
        canonical_bytes(value)


@pytest.mark.parametrize(
    "data",
    [b"1.5", b'{"quorum":3.0}', b"[1e3]", b"1E3", b"NaN", b"Infinity", b"-Infinity", b"[-0.0]"],
)
def test_parse_refuses_floats_and_constants(data: bytes) -> None:
    """Floats and NaN/Infinity are refused on input, not silently rounded."""
    with pytest.raises(FormatError):
        parse_json(data)


@pytest.mark.parametrize("data", [b'{"a":1,"a":1}', b'{"a":1,"a":2}', b'{"x":[{"q":1,"q":3}]}'])
def test_parse_refuses_duplicate_keys(data: bytes) -> None:
    """A duplicated key could mean one thing to the verifier and another to a reader."""
    with pytest.raises(FormatError, match="duplicate"):
        parse_json(data)


@pytest.mark.parametrize(
    "data", [b'"\xff"', b'{"a":"\xc3"}', b"\xfe\xff\x00\x31", b'"\xed\xa0\x80"']
)
def test_parse_refuses_non_utf8(data: bytes) -> None:
    """Documents are UTF-8; anything else is a FormatError, not a UnicodeDecodeError."""
    with pytest.raises(FormatError):
        parse_json(data)


@pytest.mark.parametrize("depth", [18, 64, 100_000])
def test_parse_refuses_deep_nesting(depth: int) -> None:
    """Deep nesting is refused as a FormatError (never a RecursionError)."""
    with pytest.raises(FormatError, match="deep"):
        parse_json(b"[" * depth + b"]" * depth)


def test_canonical_refuses_deep_nesting_and_accepts_shallow() -> None:
    """The same depth bound applies when encoding; real documents are far shallower."""
    assert parse_json(canonical_bytes(nested(10))) == nested(10)
    with pytest.raises(FormatError, match="deep"):
        canonical_bytes(nested(40))


def test_parse_refuses_huge_integer_as_format_error() -> None:
    """A 5000-digit integer in a document is a FormatError, not a ValueError from int()."""
    with pytest.raises(FormatError):
        parse_json(b'{"serial":' + b"1" * 5000 + b"}")


def test_canonical_refuses_huge_integer_as_format_error() -> None:
    """Encoding an integer Python cannot print is a FormatError, not a ValueError."""
    with pytest.raises(FormatError):
        canonical_bytes({"serial": 10**5000})


def test_parse_refuses_garbage() -> None:
    with pytest.raises(FormatError, match="not JSON"):
        parse_json(b'{"a":')


# -- base64 ---------------------------------------------------------------------------------------


@QUICK
@given(st.binary(max_size=80))
def test_base64_round_trip(data: bytes) -> None:
    assert b64decode(b64encode(data), "x") == data


@pytest.mark.parametrize(
    "text",
    ["AAE", "AAE==", "AAE=\n", " AAE=", "AA E=", "AB==", "AAF=", "-_8=", "AA==AA==", "ä==="],
)
def test_non_canonical_base64_is_refused(text: str) -> None:
    """Missing/extra padding, whitespace, non-zero pad bits, URL alphabet: all refused."""
    with pytest.raises(FormatError):
        b64decode(text, "x")


@pytest.mark.parametrize("value", [None, 5, b"AAE=", ["AAE="]])
def test_base64_of_non_text_is_refused(value: Any) -> None:
    with pytest.raises(FormatError, match="want base64 text"):
        b64decode(value, "x")


def test_non_canonical_signature_spelling_in_a_document_is_refused() -> None:
    """The same signature bytes spelled another way (pad bits set) do not parse."""
    doc = world().t2.to_dict()
    text = doc["approvals"][0]["signature"]
    assert text.endswith("==")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = alphabet.index(text[-3])
    doc["approvals"][0]["signature"] = text[:-3] + alphabet[last | 1] + "=="
    assert base64.b64decode(doc["approvals"][0]["signature"]) == base64.b64decode(text)
    with pytest.raises(FormatError, match="canonical"):
        SealedTrust.from_dict(doc)


# -- round trips of every document type -----------------------------------------------------------


def _round_trips() -> list[tuple[str, Any, Callable[[Any], Any], Callable[[Any], Any]]]:
    w = world()
    hsm = w.h1.record
    op = w.op("alice").record("token")
    trust = w.t2.trust
    approval = w.t2.approvals[0]
    domain = w.domain.domain
    return [
        ("public key", hsm.wrap_key, lambda o: o.to_dict(), lambda d: PublicKey.from_dict(d, "k")),
        ("hsm record", hsm, lambda o: o.to_dict(), HsmRecord.from_dict),
        ("operator record", op, lambda o: o.to_dict(), OperatorRecord.from_dict),
        ("member", trust.operators[0], lambda o: o.to_dict(), Member.from_dict),
        ("trust", trust, lambda o: o.payload(), Trust.from_dict),
        ("genesis", w.genesis.trust, lambda o: o.payload(), Trust.from_dict),
        (
            "approval",
            approval,
            lambda o: o.to_dict("approval"),
            lambda d: Signature.from_dict(d, "approval"),
        ),
        ("seal", w.t2.seal, lambda o: o.to_dict("seal"), lambda d: Signature.from_dict(d, "seal")),
        ("sealed trust", w.t2, lambda o: o.to_dict(), SealedTrust.from_dict),
        ("wrapped k", domain.wrapped_k[0], lambda o: o.to_dict(), WrappedKey.from_dict),
        ("mk epoch", domain.master_keys[0], lambda o: o.to_dict(), MasterKeyEpoch.from_dict),
        ("domain", domain, lambda o: o.payload(), Domain.from_dict),
        ("sealed domain", w.domain, lambda o: o.to_dict(), SealedDomain.from_dict),
        ("bundle", w.bundle, lambda o: o.to_dict(), DomainBundle.from_dict),
    ]


@pytest.mark.parametrize("index", range(14), ids=lambda i: _round_trips()[i][0])
def test_every_document_round_trips(index: int) -> None:
    """to_dict/from_dict, also through canonical bytes, gives an equal object and equal bytes."""
    _, original, to_dict, from_dict = _round_trips()[index]
    via_dict = from_dict(to_dict(original))
    via_bytes = from_dict(parse_json(canonical_bytes(to_dict(original))))
    for again in (via_dict, via_bytes):
        assert again == original
        assert canonical_bytes(to_dict(again)) == canonical_bytes(to_dict(original))
        if hasattr(original, "signed_bytes"):
            assert again.signed_bytes() == original.signed_bytes()
        if hasattr(original, "signature"):
            assert again.signature == original.signature


def test_bundle_bytes_round_trip() -> None:
    bundle = world().bundle
    again = DomainBundle.from_bytes(bundle.to_bytes())
    assert again == bundle
    assert again.to_bytes() == bundle.to_bytes()
    assert json.loads(bundle.to_bytes()) == bundle.to_dict()


# -- ids are SHA-256 of canonical bytes ------------------------------------------------------------


def test_ids_are_sha256_of_canonical_bytes() -> None:
    """Content addresses: a document's id is the SHA-256 of exactly the bytes that are signed."""
    w = world()
    for doc in (w.genesis.trust, w.t2.trust, w.domain.domain):
        assert doc.id == hashlib.sha256(doc.signed_bytes()).hexdigest()
        assert doc.id == digest(doc.payload())
        assert doc.signed_bytes() == canonical_bytes(doc.payload())
    assert w.t2.id == w.t2.trust.id
    assert w.domain.id == w.domain.domain.id


def test_hsm_id_is_sha256_of_its_public_keys() -> None:
    """An HSM is named by the SHA-256 of its canonical public keys, whatever its label."""
    record = world().h1.record
    keys = {"wrap_key": record.wrap_key.to_dict(), "sign_key": record.sign_key.to_dict()}
    assert record.id == hashlib.sha256(canonical_bytes(keys)).hexdigest()
    relabelled = dataclasses.replace(record, label="renamed", created="2030-01-01T00:00:00Z")
    assert relabelled.id == record.id
    assert world().h2.record.id != record.id


def test_key_id_is_sha256_of_scheme_and_key() -> None:
    key = world().op("alice").key
    assert key.key_id == hashlib.sha256(b"ed25519\x00" + key.data).hexdigest()


def test_ids_change_with_any_field() -> None:
    """Two Trusts differing in one field have different ids (nothing is left out of the hash)."""
    trust = world().t2.trust
    variants = [
        dataclasses.replace(trust, quorum=2),
        dataclasses.replace(trust, created="2024-01-01T00:00:01Z"),
        dataclasses.replace(trust, serial=3),
        dataclasses.replace(trust, operators=trust.operators[:4]),
        dataclasses.replace(trust, hsms=trust.hsms[:1]),
        dataclasses.replace(trust, predecessor="0" * 64),
    ]
    ids = {trust.id, *(v.id for v in variants)}
    assert len(ids) == len(variants) + 1


@pytest.mark.parametrize(
    "data, want",
    [
        (b'{"a": "ab', "Unterminated string starting at line 1 column 7"),
        (b'{\n "a" 1}', "Expecting ':' delimiter at line 2 column 6"),
        (b"", "Expecting value at line 1 column 1"),
    ],
)
def test_not_json_says_line_and_column(data: bytes, want: str) -> None:
    """L6: a cut document read "Unterminated string starting at at line 1" (no column)."""
    with pytest.raises(FormatError) as caught:
        parse_json(data)
    assert str(caught.value) == f"not JSON ({want})"
