"""Retired key epochs (``Domain.retired_below``, ``kmsfs-admin domain retire``) in the document.

An HSM removed from a Trust keeps the ``mk`` of every epoch it held, so until those epochs are
retired it can make file contents that verify. The retirement is a field of a sealed Domain
generation: these tests hold its encoding (absent at 1, so older documents keep their ids and a
kmsfs that predates it refuses a retiring Domain instead of ignoring it) and the generation
check that never lets a later generation bring retired epochs back.
"""

import dataclasses
import json

import pytest

from kmsfs.errors import ChainError, FormatError
from kmsfs.model.canonical import canonical_bytes
from kmsfs.model.domain import Domain
from kmsfs.model.verify import VerifiedDomain, verify_domain, verify_generation_step
from tests.unit.model_fixtures import make_domain, seal_domain, world


def _two_epochs() -> Domain:
    return make_domain(world().t2, epochs=2)


def _next(previous: Domain, **changes: object) -> Domain:
    return dataclasses.replace(
        previous, generation=previous.generation + 1, previous=previous.id,
        created="2024-02-01T00:00:00Z", **changes,  # type: ignore[arg-type]
    )


def _verified(domain: Domain) -> VerifiedDomain:
    w = world()
    return verify_domain(seal_domain(domain, w.h1), w.chain, w.root)


def test_nothing_retired_leaves_the_payload_and_the_id_as_before() -> None:
    domain = _two_epochs()
    assert domain.retired_below == 1 and not domain.retired(1)
    assert "retired_below" not in domain.payload()
    assert Domain.from_dict(domain.payload()) == domain


def test_a_retirement_is_signed_and_read_back() -> None:
    domain = dataclasses.replace(_two_epochs(), retired_below=2)
    payload = domain.payload()
    assert payload["retired_below"] == 2
    assert domain.id != _two_epochs().id  # the seal covers it
    again = Domain.from_dict(json.loads(canonical_bytes(payload)))
    assert again == domain and again.retired(1) and not again.retired(2)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1, "written only above 1"),  # two payloads for one Domain would be two ids
        (0, "written only above 1"),
        (3, "retired_below wants 1 to the current epoch 2"),  # would retire the newest
        (True, "want int"),
        ("2", "want int"),
    ],
)
def test_a_malformed_retirement_is_refused(value: object, message: str) -> None:
    payload = _two_epochs().payload()
    payload["retired_below"] = value
    with pytest.raises(FormatError, match=message):
        Domain.from_dict(payload)


def test_the_newest_epoch_cannot_be_retired() -> None:
    with pytest.raises(FormatError, match="wants 1 to the current epoch 2"):
        dataclasses.replace(_two_epochs(), retired_below=3)


def test_later_generations_keep_a_retirement() -> None:
    """A rewrap or a rotation after a retirement carries it; one that lowers it is a
    generation that would make the removed HSM's contents verify again: refused."""
    first = _two_epochs()
    retired = _next(first, retired_below=2)
    verify_generation_step(_verified(first), _verified(retired))
    kept = _next(retired)
    verify_generation_step(_verified(retired), _verified(kept))
    lowered = _next(retired, retired_below=1)
    with pytest.raises(ChainError, match="brings back mk epochs below 2"):
        verify_generation_step(_verified(retired), _verified(lowered))
