"""Fuzzing the parsers and verifiers with mutated documents (DESIGN §2.2, §2.6).

Whatever the bytes, parsing and verifying a sealed Trust or a Domain bundle either succeeds with
the original meaning (the same signed payloads and seals) or raises a KmsfsError subclass: never
a KeyError, TypeError, ValueError, AttributeError, RecursionError or a foreign library's error,
which the CLI would show as a traceback and the mount daemon could die on.
"""

import copy
import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsfs.errors import KmsfsError
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.canonical import canonical_bytes, parse_json
from kmsfs.model.trust import SealedTrust
from kmsfs.model.verify import verify_domain, verify_trust
from tests.unit.model_fixtures import world

FUZZ = settings(
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Path = tuple[str | int, ...]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=12)
    | st.sampled_from(["", "AAAA", "a" * 64, "ed25519", "rsa-oaep-sha1", "trust", "seal"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def all_paths(value: Any, prefix: Path = ()) -> list[Path]:
    """Every path to a value inside ``value`` (the root excluded)."""
    found: list[Path] = []
    items: list[tuple[str | int, Any]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        found.append((*prefix, key))
        found.extend(all_paths(item, (*prefix, key)))
    return found


def retyped(value: Any) -> list[Any]:
    """Plausible wrong-typed or near-miss replacements for ``value``."""
    if isinstance(value, bool):
        return [int(value), not value, str(value).lower()]
    if isinstance(value, int):
        return [str(value), value + 1, value - 1, -value, True, False, None, [value]]
    if isinstance(value, str):
        return [[value], value + "x", value[:-1], value.upper(), value + "\n", {}, 0]
    if isinstance(value, list):
        return [{}, value[::-1], value[:-1], value + value[-1:], None, ""]
    if isinstance(value, dict):
        return [list(value.values()), [], {}, None, "x"]
    return [0, "", [], {}]


@st.composite
def mutated(draw: st.DrawFn, doc: Any) -> bytes:
    """A document after one random mutation, as bytes."""
    raw = canonical_bytes(doc)
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "drop", "replace", "retype", "add"]))
    if kind == "flip":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 3))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if kind == "insert":
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]
    doc = copy.deepcopy(doc)
    path = draw(st.sampled_from(all_paths(doc)))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    key = path[-1]
    if kind == "drop":
        del parent[key]
    elif kind == "replace":
        parent[key] = draw(json_values)
    elif kind == "retype":
        parent[key] = draw(st.sampled_from(retyped(parent[key])))
    elif isinstance(parent[key], dict):  # add: an unknown field, or overwrite a known one
        parent[key][draw(st.sampled_from(["extra", "_type", "format", "signature", "k"]))] = draw(
            json_values
        )
    elif isinstance(parent[key], list):
        parent[key].append(draw(st.sampled_from([*parent[key], None])) if parent[key] else 1)
    else:
        parent[key] = draw(json_values)
    return json.dumps(doc, sort_keys=draw(st.booleans())).encode()


def check(data: bytes, parse_and_verify: Callable[[bytes], None]) -> bool:
    """True if ``data`` was accepted; a KmsfsError is a refusal; anything else propagates."""
    try:
        parse_and_verify(data)
    except KmsfsError:
        return False
    return True


def trust_unchanged(data: bytes) -> None:
    w = world()
    sealed = SealedTrust.from_dict(parse_json(data))
    verify_trust(sealed, w.genesis)
    assert sealed.trust.signed_bytes() == w.t2.trust.signed_bytes()
    assert sealed.seal == w.t2.seal


def bundle_unchanged(data: bytes) -> None:
    w = world()
    bundle = DomainBundle.from_bytes(data)
    verified = verify_domain(bundle.domain, bundle.chain, w.root)
    assert verified.sealed.domain.signed_bytes() == w.domain.domain.signed_bytes()
    assert verified.sealed.seal == w.domain.seal
    assert [t.trust.signed_bytes() for t in bundle.chain] == [
        t.trust.signed_bytes() for t in w.chain
    ]
    assert [t.seal for t in bundle.chain] == [t.seal for t in w.chain]


def test_unmutated_documents_are_accepted() -> None:
    """The control: the fuzzers start from documents that verify."""
    w = world()
    assert check(canonical_bytes(w.t2.to_dict()), trust_unchanged)
    assert check(w.bundle.to_bytes(), bundle_unchanged)
    assert check(json.dumps(w.bundle.to_dict(), indent=2).encode(), bundle_unchanged)


@FUZZ
@given(st.data())
def test_mutated_sealed_trust_is_refused_or_means_the_same(data: st.DataObject) -> None:
    check(data.draw(mutated(world().t2.to_dict())), trust_unchanged)


@FUZZ
@given(st.data())
def test_mutated_domain_bundle_is_refused_or_means_the_same(data: st.DataObject) -> None:
    check(data.draw(mutated(world().bundle.to_dict())), bundle_unchanged)


@settings(database=None, deadline=None, max_examples=100)
@given(st.binary(max_size=200))
def test_random_bytes_are_refused(data: bytes) -> None:
    assert not check(data, bundle_unchanged)
