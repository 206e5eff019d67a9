"""The successor of the genesis, the one choice a store makes for itself (docs/threat-model.md
§3, "The genesis"): real SoftHSM2 tokens and the real CLI.

The genesis has no operators, so its successor is approved by nobody: only its seal ties it to
the store. It must be sealed by an HSM of the genesis; and a store that holds two successors
that verify does not pin either by itself."""

from __future__ import annotations

import shutil
from pathlib import Path

from kmsfs import exitcodes
from kmsfs.model import contexts
from kmsfs.model.trust import Signature
from kmsfs.model.verify import Anchor
from kmsfs.service import hsms
from kmsfs.service.context import Context, open_hsm
from tests.kms_helpers import Admin, one_error_line, tree_snapshot


def test_only_an_hsm_of_the_genesis_seals_its_successor(initialized: Admin) -> None:
    a = initialized
    a.create_operators("alice")
    a("hsm", "create", "--label", "hsm3")
    alone = a.propose(["hsm3"], ["alice"], 1)
    a.sign(alone, "alice")
    before = tree_snapshot(a.store)
    refused = a("trust", "seal", alone, check=exitcodes.USAGE)
    assert "must be sealed by an HSM of the genesis (hsm1, hsm2)" in one_error_line(refused)
    assert tree_snapshot(a.store) == before  # no seal, no pin

    # Sealed anyway, by hsm3 itself (what someone with an HSM of their own can do): no
    # verifier takes it.
    ctx = Context.at(a.store)
    trust = ctx.store.trust(ctx.store.resolve("trust", alone, ctx.store.trust_ids()))
    with open_hsm(ctx, [hsms.resolve_hsm(ctx, "hsm3")]) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_TRUST, trust.signed_bytes()))
        ctx.store.save_signature("seal", Signature(trust.id, hsm.record.id, value))
    rejected = a("trust", "verify", alone, check=exitcodes.VERIFICATION)
    assert "not sealed by an HSM of it" in one_error_line(rejected)

    both = a.propose(["hsm1", "hsm3"], ["alice"], 1)
    a.sign(both, "alice")
    a("trust", "seal", both, "--hsm", "hsm3", check=exitcodes.USAGE)
    a("trust", "seal", both)  # by hsm1, the one of the genesis it lists
    assert ctx.store.anchor().successor == ctx.store.resolve("trust", both, ctx.store.trust_ids())


def test_a_second_seal_by_an_hsm_outside_the_genesis_does_not_break_the_chain(
    initialized: Admin,
) -> None:
    """The first successor lists hsm1 (of the genesis) and an HSM of its own, which sorts first
    in the store; whoever holds that HSM's PIN adds a valid seal of their own (no quorum needed
    for that). The chain took the first valid seal, which is not one of the genesis: every
    Domain under the Trust stopped verifying (exit 3, "not sealed by an HSM of it")."""
    a = initialized
    hsm1 = hsms.resolve_hsm(Context.at(a.store), "hsm1")
    for n in range(3, 24):  # an HSM whose id sorts before hsm1's: half of them do
        a("hsm", "create", "--label", f"hsm{n}")
        outsider = hsms.resolve_hsm(Context.at(a.store), f"hsm{n}")
        if outsider.id < hsm1.id:
            break
    assert outsider.id < hsm1.id, "21 new HSMs, none sorting first (a 1 in 2 million chance)"
    a.create_operators("alice")
    trust_id = a.sealed_trust(["hsm1", outsider.label], ["alice"], 1)
    a("domain", "create", "payroll", "--trust", trust_id)
    ctx = Context.at(a.store)
    trust = ctx.store.trust(ctx.store.resolve("trust", trust_id, ctx.store.trust_ids()))
    with open_hsm(ctx, [outsider]) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_TRUST, trust.signed_bytes()))
    ctx.store.save_signature("seal", Signature(trust.id, outsider.id, value))
    assert [s.key_id for s in ctx.store.signatures("seal", trust.id)] == [outsider.id, hsm1.id]
    a("trust", "verify", trust_id)
    a("domain", "verify", "payroll")
    assert a("--json", "trust", "show", trust_id).json["sealed_by"] == "hsm1"


def test_an_import_does_not_pin_where_two_successors_verify(
    initialized: Admin, tmp_path: Path
) -> None:
    main = initialized
    main.create_operators("alice", "bob")
    replica = main.copy(tmp_path / "replica")
    ours = main.sealed_trust(["hsm1", "hsm2"], ["alice"], 1)
    main("domain", "create", "payroll", "--trust", ours)
    bundle = main.export("payroll", tmp_path / "payroll.domain")
    theirs = replica.sealed_trust(["hsm1", "hsm2"], ["bob"], 1)  # sealed there: pinned there
    store = Context.at(replica.store).store
    store.write_config(Anchor(store.anchor().root, None))  # as if both came by sync, unpinned
    for folder in ("trusts", "approvals", "seals"):
        shutil.copytree(main.store / folder, replica.store / folder, dirs_exist_ok=True)

    before = tree_snapshot(replica.store)
    refused = replica("domain", "import", str(bundle), "--pin", ours, check=exitcodes.USAGE)
    assert "another verified successor of the genesis" in one_error_line(refused)
    assert theirs in one_error_line(refused)
    assert tree_snapshot(replica.store) == before
    # The operators choose, by naming it: then the import goes through.
    replica("trust", "pin", ours)
    replica("domain", "import", str(bundle))
    assert replica("--json", "domain", "verify", "payroll").json["trust"] == ours
