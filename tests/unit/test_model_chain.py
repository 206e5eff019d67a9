"""Trust chains back to the pinned root (kmsfs/model/verify.py; DESIGN §2.2, §2.3).

Like TUF root rotation: a successor is serial + 1, names its predecessor's id, and needs both
its own quorum and its predecessor's, so a dishonest group cannot replace honest operators.
"""

import dataclasses
import functools
from collections.abc import Sequence

import pytest

from kmsfs.errors import ChainError, IntegrityError, QuorumNotMetError
from kmsfs.model.trust import SealedTrust
from kmsfs.model.verify import verify_chain
from tests.unit.model_fixtures import (
    SoftOperator,
    make_operator,
    make_trust,
    seal_trust,
    world,
)


@functools.cache
def newcomers() -> tuple[SoftOperator, ...]:
    return tuple(make_operator(n) for n in ("xavier", "yvonne", "zoe"))


def successor(approvers: Sequence[SoftOperator], serial: int | None = None) -> SealedTrust:
    """T3 after T2: operators xavier, yvonne, zoe with quorum 2, sealed by h1."""
    w = world()
    trust = make_trust(w.hsms, newcomers(), 2, w.t2, serial=serial)
    return seal_trust(trust, approvers, w.h1)


def both_quorums() -> list[SoftOperator]:
    w = world()
    return [*newcomers()[:2], w.op("alice"), w.op("bob"), w.op("carol")]


def test_genesis_alone_verifies() -> None:
    """The genesis (no operators, quorum 0) sealed by one of its HSMs is a valid chain."""
    w = world()
    assert w.genesis.trust.is_genesis
    assert verify_chain([w.genesis], w.root) is w.genesis


def test_genesis_sealed_by_an_outside_hsm_fails() -> None:
    w = world()
    forged = SealedTrust(w.genesis.trust, (), w.outsider.seal_trust(w.genesis.trust))
    with pytest.raises(IntegrityError, match="not in trust"):
        verify_chain([forged], w.root)


def test_a_successor_of_the_genesis_sealed_by_an_hsm_the_genesis_lacks_fails() -> None:
    """Approved by nobody (the genesis has no operators), a successor of the genesis is tied
    to the store by its seal alone: one sealed by an HSM it lists but the genesis does not (an
    attacker's own, beside the store's public keys) verified, and an unpinned store took it."""
    w = world()
    rogue = seal_trust(make_trust([w.h1, w.outsider], [w.mallory], 1, w.genesis), [w.mallory],
                       w.outsider)
    with pytest.raises(ChainError, match="not sealed by an HSM of it"):
        verify_chain([w.genesis, rogue], w.root)
    honest = seal_trust(make_trust([w.h1, w.outsider], [w.mallory], 1, w.genesis), [w.mallory],
                        w.h1)
    assert verify_chain([w.genesis, honest], w.root) is honest


def test_first_operator_trust_verifies() -> None:
    w = world()
    assert verify_chain(w.chain, w.root) is w.t2


def test_successor_needs_its_predecessors_quorum() -> None:
    """Its own quorum is not enough: T2's operators must approve T3 too."""
    w = world()
    own_only = successor(newcomers()[:2])
    with pytest.raises(QuorumNotMetError, match=r"predecessor .* signed by 0"):
        verify_chain([*w.chain, own_only], w.root)
    short = successor([*newcomers()[:2], w.op("alice"), w.op("bob")])
    with pytest.raises(QuorumNotMetError, match=r"predecessor .* signed by 2"):
        verify_chain([*w.chain, short], w.root)


def test_successor_needs_its_own_quorum() -> None:
    w = world()
    old_only = successor([w.op("alice"), w.op("bob"), w.op("carol"), newcomers()[0]])
    with pytest.raises(QuorumNotMetError, match="its own quorum not met: signed by 1"):
        verify_chain([*w.chain, old_only], w.root)


def test_successor_with_both_quorums_verifies() -> None:
    w = world()
    t3 = successor(both_quorums())
    assert verify_chain([*w.chain, t3], w.root) is t3


def test_dishonest_group_cannot_replace_honest_operators() -> None:
    """Predecessor {a,b,c} quorum 2; attackers {x,y,z} quorum 2 sign and get an HSM seal: no."""
    w = world()
    honest = [make_operator(n) for n in ("a", "b", "c")]
    attackers = [make_operator(n) for n in ("x", "y", "z")]
    previous = seal_trust(make_trust(w.hsms, honest, 2, w.genesis), honest[:2], w.h2)
    chain = [w.genesis, previous]
    assert verify_chain(chain, w.root) is previous
    takeover = make_trust(w.hsms, attackers, 2, previous)
    with pytest.raises(QuorumNotMetError, match="predecessor"):
        verify_chain([*chain, seal_trust(takeover, attackers, w.h1)], w.root)
    with pytest.raises(QuorumNotMetError, match=r"predecessor .* signed by 1"):
        verify_chain([*chain, seal_trust(takeover, [*attackers, honest[0]], w.h1)], w.root)
    # The control: with two honest approvals the same takeover is a legitimate rotation.
    rotation = seal_trust(takeover, [*attackers, *honest[:2]], w.h1)
    assert verify_chain([*chain, rotation], w.root) is rotation


@pytest.mark.parametrize("delta", [0, 2, 5])
def test_serial_must_be_predecessor_plus_one(delta: int) -> None:
    w = world()
    serial = w.t2.trust.serial + delta
    with pytest.raises(ChainError, match=f"serial want 3, have {serial}"):
        verify_chain([*w.chain, successor(both_quorums(), serial=serial)], w.root)


def test_chain_of_another_store_is_refused() -> None:
    """A chain that starts at another genesis does not lead to the pinned root."""
    w = world()
    other_root = seal_trust(make_trust(w.hsms, created="2024-06-01T00:00:00Z"), [], w.h1)
    other_t2 = seal_trust(make_trust(w.hsms, w.ops, 3, other_root), w.ops[:3], w.h1)
    with pytest.raises(ChainError, match="another store"):
        verify_chain([other_root, other_t2], w.root)
    with pytest.raises(ChainError, match="another store"):
        verify_chain(w.chain, other_root.id)


def test_chain_must_start_at_the_root() -> None:
    w = world()
    with pytest.raises(ChainError, match="another store"):
        verify_chain([w.t2], w.root)
    with pytest.raises(ChainError, match="empty"):
        verify_chain([], w.root)


def test_missing_middle_link_is_refused() -> None:
    w = world()
    t3 = successor(both_quorums())
    with pytest.raises(ChainError, match="missing"):
        verify_chain([w.genesis, t3], w.root)


def test_reordered_links_are_refused() -> None:
    w = world()
    t3 = successor(both_quorums())
    with pytest.raises(ChainError):
        verify_chain([w.genesis, t3, w.t2], w.root)
    with pytest.raises(ChainError):
        verify_chain([*w.chain, w.t2], w.root)


def test_root_after_a_predecessor_is_refused() -> None:
    """A second root (genesis-like or with operators) cannot follow a link."""
    w = world()
    second_genesis = seal_trust(make_trust(w.hsms, created="2024-06-01T00:00:00Z"), [], w.h1)
    with pytest.raises(ChainError, match="is a root"):
        verify_chain([w.genesis, second_genesis], w.root)
    rooted = seal_trust(make_trust(w.hsms, w.ops, 3), w.ops[:3], w.h1)
    with pytest.raises(ChainError, match="is a root"):
        verify_chain([*w.chain, rooted], w.root)


def test_every_link_is_verified_not_just_the_last() -> None:
    """A broken middle link (bad seal, or no quorum) breaks the chain after it."""
    w = world()
    t3 = successor(both_quorums())
    bad_seal = dataclasses.replace(w.t2, seal=w.outsider.seal_trust(w.t2.trust))
    with pytest.raises(IntegrityError, match="not in trust"):
        verify_chain([w.genesis, bad_seal, t3], w.root)
    no_quorum = dataclasses.replace(w.t2, approvals=w.t2.approvals[:2])
    with pytest.raises(QuorumNotMetError, match="its own quorum"):
        verify_chain([w.genesis, no_quorum, t3], w.root)
    unsealed_root = dataclasses.replace(w.genesis, seal=w.outsider.seal_trust(w.genesis.trust))
    with pytest.raises(IntegrityError):
        verify_chain([unsealed_root, *w.chain[1:]], w.root)
