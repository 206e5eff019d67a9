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
from kmsfs.model.domain import BINDING_SIZE, Domain, MasterKeyEpoch
from kmsfs.model.verify import (
    VerifiedDomain,
    verify_domain,
    verify_generation_descent,
    verify_generation_step,
)
from tests.unit.model_fixtures import make_trust, seal_domain, seal_trust, world


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


# --- an older generation across a gap (a store rebuilt from an export of its newest) ---------
def _descent_refusal(older: Domain, newer: Domain, why: str) -> str:
    return re.escape(f"domain {older.name} generation {older.generation} ({older.id[:12]}) {why}")


def test_an_older_generation_across_a_gap_is_linked_by_its_key_bindings() -> None:
    """Review: a store that lost a Domain and imported only its newest generation (operators.md
    §4) refused every volume and `kmsfs encrypt` file made at an older one, though the newest
    holds the very master keys they need. Generation 1 and generation 3 (2 not at hand) keep
    the same epochs with the same bindings and the Trust: the descent holds, and it still holds
    once generation 3 has added an epoch."""
    first = world().domain.domain
    third = _next(_next(first))
    verify_generation_descent(_verified(first), _verified(third))
    extra = MasterKeyEpoch(2, b"\x02" * 40, b"\x03" * BINDING_SIZE)
    rotated = _next(third, master_keys=(*third.master_keys, extra))
    verify_generation_descent(_verified(first), _verified(rotated))


def test_a_gap_does_not_hide_a_changed_key_a_rival_trust_or_a_retirement_undone() -> None:
    """What the step check refuses of the next generation, the descent refuses across a gap:
    an epoch whose binding changed (another mk: the Domain's keys swapped), a Domain governed
    by a Trust that does not descend from the older one's, epochs dropped, retired epochs
    brought back, another Domain's name, a generation not older, and an older one made before
    key binding (nothing then links it)."""
    w = world()
    first = w.domain.domain
    third = _next(_next(first))
    swapped = dataclasses.replace(
        third, master_keys=(dataclasses.replace(third.master_keys[0], binding=b"\x07" * 32),)
    )
    with pytest.raises(ChainError, match="changes mk epoch 1 of generation 1"):
        verify_generation_descent(_verified(first), _verified(swapped))
    epoch_2 = MasterKeyEpoch(2, b"\x02" * 40, b"\x03" * BINDING_SIZE)
    two_epochs = dataclasses.replace(first, master_keys=(*first.master_keys, epoch_2))
    with pytest.raises(ChainError, match="drops mk epochs of generation 1"):
        verify_generation_descent(_verified(two_epochs), _verified(third))
    retired = dataclasses.replace(two_epochs, retired_below=2)
    back = _next(_next(retired), retired_below=1)
    with pytest.raises(ChainError, match="brings back mk epochs below 2"):
        verify_generation_descent(_verified(retired), _verified(back))
    # Governed by the genesis's rival line: a Trust that is not on the newer one's chain.
    rival_t2 = make_trust([w.h1, w.h2], w.ops, 3, w.genesis, created="2024-05-05T00:00:00Z")
    rival = seal_trust(rival_t2, w.ops[:3], w.h2)
    older = dataclasses.replace(first, trust=rival.id)
    older_verified = verify_domain(seal_domain(older, w.h1), (w.genesis, rival), w.root)
    with pytest.raises(ChainError, match="a Domain never goes back to an older or rival trust"):
        verify_generation_descent(older_verified, _verified(third))
    other = dataclasses.replace(third, name="other")
    with pytest.raises(ChainError, match=_descent_refusal(first, other,
                                                         "is not a generation of domain other")):
        verify_generation_descent(_verified(first), _verified(other))
    with pytest.raises(ChainError, match="is not older than generation 1"):
        verify_generation_descent(_verified(first), _verified(first))
    unbound = dataclasses.replace(first, master_keys=(
        dataclasses.replace(first.master_keys[0], binding=None),))
    with pytest.raises(ChainError, match="has no key binding"):
        verify_generation_descent(_verified(unbound), _verified(third))


def test_no_gap_means_the_previous_link_is_checked() -> None:
    """Review of the day: the descent's bindings are public, so a rival generation 1 (sealed by
    an HSM of the same Trust, copying them) passed as the one generation 2 descends from. Where
    there is no gap, the ``previous`` link says which it is."""
    first = world().domain.domain
    second = _next(first)
    verify_generation_descent(_verified(first), _verified(second))
    rival_first = dataclasses.replace(first, created="2024-03-01T00:00:00Z")
    with pytest.raises(ChainError, match="is not the generation that generation 2 follows"):
        verify_generation_descent(_verified(rival_first), _verified(second))
