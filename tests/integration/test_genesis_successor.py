"""The successor of the genesis, the one choice a store makes for itself (docs/threat-model.md
§3, "The genesis"): real SoftHSM2 tokens and the real CLI.

The genesis has no operators, so its successor is approved by nobody: only its seal ties it to
the store. It must be sealed by an HSM of the genesis; and a store that holds two successors
that verify does not pin either by itself."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kmsfs import exitcodes
from kmsfs.model import contexts
from kmsfs.model.trust import Signature
from kmsfs.model.verify import Anchor
from kmsfs.service import domains, hsms, trusts
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
    initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first successor lists hsm1 (of the genesis) and hsm3, an HSM of its own; whoever
    holds hsm3's PIN adds a valid seal of their own (no quorum needed for that). The chain took
    the first valid seal in the store's order, and where hsm3's sorted first (its file is named
    by its random id), every Domain under the Trust stopped verifying (exit 3, "not sealed by
    an HSM of it"). The store's order is forced here, both ways."""
    a = initialized
    a("hsm", "create", "--label", "hsm3")
    a.create_operators("alice")
    trust_id = a.sealed_trust(["hsm1", "hsm3"], ["alice"], 1)
    a("domain", "create", "payroll", "--trust", trust_id)
    ctx = Context.at(a.store)
    hsm1, hsm3 = hsms.resolve_hsm(ctx, "hsm1"), hsms.resolve_hsm(ctx, "hsm3")
    trust = ctx.store.trust(ctx.store.resolve("trust", trust_id, ctx.store.trust_ids()))
    with open_hsm(ctx, [hsm3]) as hsm:
        value = hsm.sign(contexts.message(contexts.HSM_SEALS_TRUST, trust.signed_bytes()))
    ctx.store.save_signature("seal", Signature(trust.id, hsm3.id, value))
    a("trust", "verify", trust_id)  # in the store's own order, whichever it is
    a("domain", "verify", "payroll")
    listed = type(ctx.store).signatures

    def in_order(first: str) -> Callable[..., list[Signature]]:
        def signatures(store: Any, kind: str, subject: str) -> list[Signature]:
            return sorted(listed(store, kind, subject), key=lambda sig: sig.key_id != first)

        return signatures

    for first in (hsm3.id, hsm1.id):
        monkeypatch.setattr(type(ctx.store), "signatures", in_order(first))
        assert ctx.store.signatures("seal", trust.id)[0].key_id == first
        assert len(trusts.verify(ctx, trust_id)) == 2
        domains.current(ctx, "payroll")
        assert trusts.status(ctx, trust.id).sealed_by == "hsm1"


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
    assert store.set_head(store.anchor().root, expect=theirs, decided=store.anchor().root)
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
