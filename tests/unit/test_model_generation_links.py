"""A Domain generation follows exactly the one before it: number + 1, and ``previous`` naming it.

``verify_generation_step`` (kmsfs.model.verify) is what makes a Domain's history a chain rather
than a set: a generation sealed by an HSM of the *same* Trust, carrying the *same* keys and
bindings, passes every other check (the Trust descends, no epoch is dropped, every binding is
kept). Only the generation number and the ``previous`` link tell a rival or a spliced
generation from the real next one, so each case below is refused by that check alone.
"""

import dataclasses
import re

import pytest

from kmsfs.errors import ChainError
from kmsfs.model.domain import Domain
from kmsfs.model.verify import VerifiedDomain, verify_domain, verify_generation_step
from tests.unit.model_fixtures import seal_domain, world


def _verified(domain: Domain) -> VerifiedDomain:
    """``domain`` sealed by h1 of T2 and verified on the honest chain: only the step is left."""
    w = world()
    return verify_domain(seal_domain(domain, w.h1), w.chain, w.root)


def _next(previous: Domain, created: str = "2024-02-01T00:00:00Z", **changes: object) -> Domain:
    """The honest next generation of ``previous`` (same Trust, same keys), with ``changes``."""
    return dataclasses.replace(
        previous,
        generation=previous.generation + 1,
        previous=previous.id,
        created=created,
        **changes,  # type: ignore[arg-type]
    )


def _refusal(old: Domain, new: Domain) -> str:
    """The generation check's own message, in full, for ``new`` after ``old``."""
    return re.escape(
        f"domain {new.name} generation {new.generation} ({new.id[:12]}) does not follow "
        f"generation {old.generation} ({old.id[:12]}) of the store"
    )


def test_the_honest_next_generation_is_taken() -> None:
    """The baseline the refusals below differ from by one field: a rewrap's generation 2 of the
    same Trust, same keys and bindings, follows generation 1."""
    first = world().domain.domain
    second = _next(first)
    verify_generation_step(_verified(first), _verified(second))
    verify_generation_step(_verified(second), _verified(_next(second)))


def test_a_rival_of_the_same_number_under_the_same_trust_is_refused() -> None:
    """Users rely on one history per Domain: a second generation 2 (or a second generation 1),
    sealed by an HSM of the same Trust with the same keys, is a fork, not a successor. Without
    the number check, each rival verified as the "next" generation of the other, so a holder of
    one HSM's PIN could fork a Domain's history without any other check noticing."""
    first = world().domain.domain
    second = _next(first)
    rival_second = _next(first, created="2024-03-01T00:00:00Z")
    assert rival_second.id != second.id and rival_second.previous == second.previous
    with pytest.raises(ChainError, match=_refusal(second, rival_second)):
        verify_generation_step(_verified(second), _verified(rival_second))
    rival_first = dataclasses.replace(first, created="2024-03-01T00:00:00Z")
    assert rival_first.generation == 1 and rival_first.id != first.id
    with pytest.raises(ChainError, match=_refusal(first, rival_first)):
        verify_generation_step(_verified(first), _verified(rival_first))


def test_a_next_number_whose_previous_names_another_document_is_refused() -> None:
    """The ``previous`` link is what ties a generation to the one it follows. A generation 2
    whose ``previous`` names a rival generation 1 (or any other id) is spliced onto a history
    it was not made from; with only the number checked it was taken."""
    first = world().domain.domain
    rival_first = dataclasses.replace(first, created="2024-03-01T00:00:00Z")
    spliced = _next(rival_first)
    assert spliced.generation == first.generation + 1 and spliced.previous != first.id
    with pytest.raises(ChainError, match=_refusal(first, spliced)):
        verify_generation_step(_verified(first), _verified(spliced))
    unknown = dataclasses.replace(_next(first), previous="ab" * 32)
    with pytest.raises(ChainError, match=_refusal(first, unknown)):
        verify_generation_step(_verified(first), _verified(unknown))


def test_a_skipped_or_backward_number_is_refused_even_with_the_right_previous() -> None:
    """``previous`` right but the number wrong: generation 3 straight after generation 1 (a
    gap hides what generation 2 did, say a rewrap that revoked an HSM), or a generation that
    goes back to 1. Both were taken without the check."""
    first = world().domain.domain
    skipped = dataclasses.replace(_next(first), generation=3)
    assert skipped.previous == first.id
    with pytest.raises(ChainError, match=_refusal(first, skipped)):
        verify_generation_step(_verified(first), _verified(skipped))
    second = _next(first)
    back = dataclasses.replace(first, created="2024-04-01T00:00:00Z")
    with pytest.raises(ChainError, match=_refusal(second, back)):
        verify_generation_step(_verified(second), _verified(back))
