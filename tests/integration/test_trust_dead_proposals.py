"""Proposals that can never be sealed, and the small refusals around `trust propose` and
`domain rewrap`, as operators met them in review: real CLI, real SoftHSM2 tokens.

The genesis has one successor per store (the first sealed here is pinned): a second proposal
of it, a duplicate proposed twice, is dead once the first is sealed. It was signable, shown
"ready to seal", offered by `trust list --mine`, and only `trust seal` refused it, advising an
option seal does not have."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

import pytest

from kmsfs import exitcodes
from kmsfs.errors import AlreadyExistsError
from kmsfs.service import trusts
from kmsfs.service.context import Context
from tests.kms_helpers import Admin, one_error_line, tree_snapshot

OPERATORS = ["alice", "bob", "carol"]


def _two_proposals_one_sealed(a: Admin) -> tuple[str, str]:
    """The same proposal twice (ids differ by creation time); the first signed and sealed."""
    a.create_operators(*OPERATORS)
    first = a.propose(["hsm1", "hsm2"], OPERATORS, 2)
    second = a.propose(["hsm1", "hsm2"], OPERATORS, 2)  # every propose writes a new one
    a.sign(first, "alice", "bob")
    a("trust", "seal", first)
    return first, second


def test_a_dead_duplicate_is_shown_dead_and_offered_to_nobody(initialized: Admin) -> None:
    a = initialized
    won, dead = _two_proposals_one_sealed(a)

    shown = a("trust", "show", dead).stdout
    state = next(line for line in shown.splitlines() if line.strip().startswith("state"))
    assert "dead" in state and won[:12] in state and "ready to seal" not in state, state
    info = a("--json", "trust", "show", dead).json
    assert (info["state"], info["lost_to"]) == ("dead", won)
    assert a("--json", "trust", "show", won).json["state"] == "sealed"

    rows = {r["id"]: r for r in a("--json", "trust", "list").json}
    assert (rows[dead]["state"], rows[dead]["lost_to"]) == ("dead", won)
    assert rows[won]["lost_to"] is None
    line = next(x for x in a("trust", "list").stdout.splitlines() if x.startswith(dead[:12]))
    assert f"dead (lost to {won[:12]})" in line and " ready " not in line

    for name in OPERATORS:  # carol was still asked to sign it
        mine = a("--json", "trust", "list", "--mine", name).json
        assert dead not in [r["id"] for r in mine], name


def test_a_dead_proposal_is_not_signed_and_no_pin_is_asked(initialized: Admin) -> None:
    """Signing it exited 0 and wrote an approval no seal could ever use."""
    a = initialized
    won, dead = _two_proposals_one_sealed(a)
    before = tree_snapshot(a.store)
    # No --pin-file and no terminal: had the PIN been asked for, this would exit 5.
    refused = a("trust", "sign", dead, "--as", "carol", check=exitcodes.USAGE)
    line = one_error_line(refused)
    assert f"trust {dead[:12]} can never be sealed" in line and won[:12] in line
    assert "PIN" not in line
    a("trust", "sign", dead, "--as", "alice", "--pin-file", a.pin_file("alice"),
      check=exitcodes.USAGE)
    assert tree_snapshot(a.store) == before


def test_sealing_a_dead_proposal_advises_nothing_seal_lacks(initialized: Admin) -> None:
    """"give --predecessor" is advice for propose; seal has no such option."""
    a = initialized
    won, dead = _two_proposals_one_sealed(a)
    before = tree_snapshot(a.store)
    line = one_error_line(a("trust", "seal", dead, check=exitcodes.USAGE))
    assert "already has its successor" in line and won[:12] in line
    assert "give --predecessor" not in line
    assert f"'trust propose --predecessor {won[:12]}'" in line
    assert tree_snapshot(a.store) == before


def test_a_rival_of_a_later_trust_is_not_dead_but_sealed_only_with_fork(
    initialized: Admin,
) -> None:
    """Only the genesis has one successor per store: a later Trust may have two sealed
    successors, each approved by its operators (verify_chain takes both), so a second
    proposal after it stays an ordinary proposal. But sealing it forks the line, which one
    site did with no word (two proposals of one change, both signed): refused, with nothing
    written, unless --fork says a second line is meant; `trust show` then names the fork
    as `trust list` does."""
    a = initialized
    a.create_operators("alice", "bob")
    t1 = a.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
    sealed = a.sealed_trust(["hsm1"], ["alice"], 1, predecessor=t1)
    other = a.propose(["hsm2"], ["alice", "bob"], 1, predecessor=t1)
    assert a("--json", "trust", "show", other).json["state"] == "proposed"
    a.sign(other, "alice")
    assert a("--json", "trust", "show", other).json["state"] == "ready"
    before = tree_snapshot(a.store)
    line = one_error_line(a("trust", "seal", other, check=exitcodes.USAGE))
    assert f"trust {other[:12]} is not sealed" in line and f"successor {sealed[:12]}" in line
    assert "--fork" in line
    assert tree_snapshot(a.store) == before
    assert a("--json", "trust", "show", sealed).json["rivals"] == []

    a("trust", "seal", other, "--fork")
    a("trust", "verify", other)
    a("trust", "verify", sealed)
    assert a("--json", "trust", "show", sealed).json["rivals"] == [other]
    assert a("--json", "trust", "show", other).json["rivals"] == [sealed]
    shown = a("trust", "show", sealed).stdout
    (fork,) = [x for x in shown.splitlines() if x.strip().startswith("FORK")]
    assert other[:12] in fork and "must keep one" in fork


def test_sealing_or_pinning_again_says_already_and_writes_nothing(initialized: Admin) -> None:
    """Both printed what a first time prints ("trust sealed by HSM ...", "now pins")."""
    a = initialized
    a.create_operators("alice")
    t1 = a.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
    before = tree_snapshot(a.store)
    stamps = {n: os.stat(a.store / n).st_mtime_ns for n in ("store.json", "private/anchor.json")}
    again = a("trust", "seal", t1)
    assert "already sealed by HSM" in again.stdout and "nothing signed" in again.stdout
    assert a("--json", "trust", "seal", t1).json["already_sealed"] is True
    pinned = a("--json", "trust", "pin", t1).json
    assert pinned["pinned"] is True and pinned["already_pinned"] is True
    assert "already pinned" in a("trust", "pin", t1).stdout
    assert tree_snapshot(a.store) == before
    assert stamps == {n: os.stat(a.store / n).st_mtime_ns for n in stamps}  # not even rewritten
    t2 = a.propose(["hsm1"], ["alice"], 1, predecessor=t1)
    a.sign(t2, "alice")
    assert a("--json", "trust", "seal", t2).json["already_sealed"] is False


def test_trust_list_mine_refuses_a_name_that_is_nobody(initialized: Admin) -> None:
    """A misspelt name listed nothing to sign, exit 0, where every other command says "no
    operator named"; a member of a Trust whose record this store lacks is still a name."""
    a = initialized
    a.create_operators("alice")
    a.propose(["hsm1"], ["alice"], 1)
    line = one_error_line(a("trust", "list", "--mine", "alcie", check=exitcodes.STORE))
    assert "no operator named 'alcie'" in line
    assert len(a("--json", "trust", "list", "--mine", "alice").json) == 1


def test_proposing_after_the_genesis_again_names_the_trust_to_succeed(
    initialized: Admin,
) -> None:
    """"give --predecessor" to a user who had given --predecessor (the genesis)."""
    a = initialized
    a.create_operators("alice")
    t1 = a.sealed_trust(["hsm1"], ["alice"], 1)
    genesis = json.loads((a.store / "store.json").read_text())["root"]
    refused = a("trust", "propose", "--predecessor", genesis, "--hsm", "hsm1",
                "--operator", "alice", "--quorum", "1", check=exitcodes.USAGE)
    assert f"give --predecessor {t1[:12]}" in one_error_line(refused)


def test_proposing_the_same_again_warns_naming_the_pending_one(initialized: Admin) -> None:
    """Not refused (ids differ by creation time, and a fresh one may be wanted), but said."""
    a = initialized
    a.create_operators(*OPERATORS)
    first = a.propose(["hsm1", "hsm2"], OPERATORS, 2)
    quiet = a("trust", "propose", "--hsm", "hsm1", "--hsm", "hsm2", "--quorum", "1",
              *[x for n in OPERATORS for x in ("--operator", n)])
    assert quiet.stderr == ""  # another quorum: another proposal
    again = a("--json", "trust", "propose", "--hsm", "hsm2", "--hsm", "hsm1", "--quorum", "2",
              *[x for n in reversed(OPERATORS) for x in ("--operator", n)])
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kmsfs-admin: warning: "), lines
    assert first[:12] in lines[0] and "same HSMs, operators, quorum and predecessor" in lines[0]
    body = json.loads(again.stdout)
    assert body["id"] != first  # the order of --hsm and --operator is kept in the document
    assert body["pending_duplicates"] == [first]


def _clock(monkeypatch: pytest.MonkeyPatch, times: list[str]) -> list[float]:
    """``trusts.utc_now`` gives ``times`` in turn (then the last again); the sleeps asked for
    are recorded, not slept."""
    given = iter(times)
    slept: list[float] = []
    monkeypatch.setattr(trusts, "utc_now", lambda: next(given, times[-1]))
    # trusts' own clock, not the time module's: a subprocess.run waiting for a CLI under load
    # sleeps through time.sleep too, and those sleeps were counted (a flaky count).
    monkeypatch.setattr(trusts, "time", SimpleNamespace(sleep=slept.append, time=time.time))
    return slept


def test_the_same_proposal_in_the_same_second_is_a_new_one(
    initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its id is its content's hash, creation time included: proposed again within the same
    second, it was the first one, already signed, and `trust sign` of the "new" one asked for
    no signature (a CI failure). A propose now writes a new proposal, a second later."""
    a = initialized
    a.create_operators(*OPERATORS)
    ctx = Context.at(a.store)
    slept = _clock(monkeypatch, ["2026-11-30T10:00:00Z", "2026-11-30T10:00:00Z",
                                 "2026-11-30T10:00:01Z"])
    first = trusts.propose(ctx, ["hsm1"], OPERATORS, 2)
    a.sign(first.id, "alice")
    stored = (a.store / "trusts" / f"{first.id}.json").read_bytes()
    second = trusts.propose(ctx, ["hsm1"], OPERATORS, 2)
    assert second.id != first.id and second.created == "2026-11-30T10:00:01Z"
    assert len(slept) == 1 and 0 < slept[0] <= 1.01
    assert (a.store / "trusts" / f"{first.id}.json").read_bytes() == stored
    assert ctx.store.signatures("approval", second.id) == []


def test_a_proposal_that_keeps_its_id_is_refused_after_three_tries(
    initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A clock that does not move (or a proposer writing the same each second): one error
    naming the Trust, not a propose that hands back an old proposal or loops for ever."""
    a = initialized
    a.create_operators(*OPERATORS)
    ctx = Context.at(a.store)
    slept = _clock(monkeypatch, ["2026-11-30T10:00:00Z"])
    first = trusts.propose(ctx, ["hsm1"], OPERATORS, 2)
    before = tree_snapshot(a.store)
    with pytest.raises(AlreadyExistsError, match=f"trust {first.id} exists already"):
        trusts.propose(ctx, ["hsm1"], OPERATORS, 2)
    assert len(slept) == 2  # between the three tries, not after the last
    assert tree_snapshot(a.store) == before


def test_an_hsm_name_in_the_wrong_case_is_quoted_as_typed(initialized: Admin) -> None:
    """`--hsm HSM1` said "no HSM 'hsm1'", a name that exists. Labels are compared exactly
    (hsm1 and HSM1 may be two HSMs), so it is refused, with the hint."""
    a = initialized
    a.create_operators("alice")
    before = tree_snapshot(a.store)
    result = a("trust", "propose", "--hsm", "HSM1", "--operator", "alice", "--quorum", "1",
               check=exitcodes.STORE)
    line = one_error_line(result)
    assert "no HSM 'HSM1'" in line and "'hsm1'" not in line
    assert "names are case-sensitive; did you mean hsm1?" in line
    line = one_error_line(a("trust", "propose", "--hsm", "nosuch", "--operator", "alice",
                            "--quorum", "1", check=exitcodes.STORE))
    assert "no HSM 'nosuch'" in line and "did you mean" not in line
    assert tree_snapshot(a.store) == before


def test_a_repeated_hsm_or_operator_is_a_usage_error(initialized: Admin) -> None:
    """A duplicate --hsm exited 7 (the Trust built from it was malformed), a duplicate
    --operator 2: both are the command line's fault."""
    a = initialized
    a.create_operators("alice", "bob")
    hsm1 = next(h["id"] for h in a("--json", "hsm", "list").json if h["label"] == "hsm1")
    before = tree_snapshot(a.store)
    base = ["trust", "propose", "--quorum", "1"]
    for extra, said in [
        (["--hsm", "hsm1", "--hsm", "hsm1", "--operator", "alice"], "--hsm hsm1 is given twice"),
        (["--hsm", "hsm1", "--operator", "bob", "--operator", "bob"],
         "--operator bob is given twice"),
        (["--hsm", "hsm1", "--hsm", hsm1[:8], "--operator", "alice"],
         f"--hsm hsm1 and --hsm {hsm1[:8]} name the same HSM (hsm1)"),
    ]:
        line = one_error_line(a(*base, *extra, check=exitcodes.USAGE))
        assert said in line, line
    assert tree_snapshot(a.store) == before


def test_rewrapping_again_into_the_same_trust_is_a_no_op(initialized: Admin) -> None:
    """The second run said "trust T2 is not a successor of the domain's trust T2" (exit 2).
    As a second seal or signature: exit 0, nothing written, saying so."""
    a = initialized
    t1 = a.real_domain("payroll")
    t2 = a.sealed_trust(["hsm1"], ["alice"], 1, predecessor=t1)
    a("domain", "rewrap", "payroll", "--trust", t2)
    before = tree_snapshot(a.store)
    again = a("domain", "rewrap", "payroll", "--trust", t2)
    assert f"already under trust {t2[:12]}" in again.stdout and "nothing to do" in again.stdout
    body = a("--json", "domain", "rewrap", "payroll", "--trust", t2[:8]).json
    assert body["rewrapped"] is False and body["trust"] == t2 and body["generation"] == 2
    assert tree_snapshot(a.store) == before
    # Backwards is still refused, by the rewrap itself.
    a("domain", "rewrap", "payroll", "--trust", t1, check=exitcodes.USAGE)
