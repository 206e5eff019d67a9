"""Where a chain of Trusts stands against a store's *head*: pure decisions over ids.

Why a head: a successor is approved by its predecessor's quorum, and a Trust keeps that power
once superseded. Operators a successor removed (a stolen key) and one more of the old Trust's
can approve a rival successor of it, sealed by an "HSM" of their own, and every link of that
rival line verifies: nothing in the signatures tells two lines apart (threat model, section 3,
"Forks"). Without a pin, a store followed whatever its public documents held today, so whoever
can write them could delete the honest successor and plant the rival (a rollback), and a
Domain's fresh ``k`` was wrapped to the rival's key; or plant the rival next to the honest one,
and the honest line was refused as forked (a denial of service).

So each store pins, in its private area, the newest Trust of its line it has verified (its
head), as a TUF client pins the newest root it has seen. It only moves forward. Against it, a
chain (ids from the root, as :func:`kmsfs.model.verify.verify_chain` takes them) is:

- :data:`BEFORE`: a prefix of head's chain (superseded on this line, or the genesis);
- :data:`HEAD`: head's own chain;
- :data:`AFTER`: head's chain is a prefix of it (newer links of this line);
- :data:`RIVAL`: it leaves head's chain somewhere: another line, refused as a successor and
  for any Domain key.

A rival of a link up to head is no fork for this store: it decided. Only links after head can
still fork (:func:`links_after_head`).
"""

from collections.abc import Sequence

BEFORE = "before-head"
HEAD = "head"
AFTER = "after-head"
RIVAL = "rival"


def place(chain: Sequence[str], head_chain: Sequence[str]) -> str:
    """Where *chain* stands against the line whose head's chain is *head_chain*."""
    common = divergence(chain, head_chain)
    if common == len(chain) == len(head_chain):
        return HEAD
    if common == len(chain):
        return BEFORE
    if common == len(head_chain):
        return AFTER
    return RIVAL


def divergence(chain: Sequence[str], head_chain: Sequence[str]) -> int:
    """How many links, from the root, *chain* and *head_chain* share: for a :data:`RIVAL`,
    the index of the first link of *chain* that is not on head's line."""
    common = 0
    for mine, theirs in zip(chain, head_chain, strict=False):
        if mine != theirs:
            break
        common += 1
    return common


def links_after_head(chain: Sequence[str], head_chain: Sequence[str] | None) -> range:
    """The indices of *chain*'s links whose rivals still fork it for a store whose head's
    chain is *head_chain*: those after head (each a descendant of head, and so is any rival
    of one). With no head (a store whose line forked before it kept one), every link past the
    genesis, as before heads were kept. None for a :data:`RIVAL` or a chain up to head."""
    if head_chain is None:
        return range(1, len(chain))
    if place(chain, head_chain) != AFTER:
        return range(0)
    return range(len(head_chain), len(chain))
