"""Several sessions on one token in one process (the agent's normal state), on real SoftHSM2.

PKCS#11 login state is per application: before kmsfs shared one login per token, a second
session failed with CKR_USER_ALREADY_LOGGED_IN, and closing any session logged all out.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from kmsfs.errors import PinError
from kmsfs.hsm import library, softhsm
from kmsfs.hsm.library import TokenLocation
from kmsfs.model import contexts
from kmsfs.service.context import Context, open_hsm
from tests.kms_helpers import Admin

MESSAGE = contexts.message(b"kmsfs/v1/test-only\x00", b"payload")


def _hsm1(admin: Admin):  # type: ignore[no-untyped-def]
    ctx = Context.at(admin.store)
    record = next(ctx.store.hsm(i) for i in ctx.store.hsm_ids() if ctx.store.hsm(i).label == "hsm1")
    return ctx, record


def test_two_sessions_on_one_token_and_either_may_close_first(initialized: Admin) -> None:
    ctx, record = _hsm1(initialized)
    with contextlib.ExitStack() as first_stack:
        first = first_stack.enter_context(open_hsm(ctx, [record]))
        with open_hsm(ctx, [record]) as second:
            record.sign_key.verify(second.sign(MESSAGE), MESSAGE)
            record.sign_key.verify(first.sign(MESSAGE), MESSAGE)
            first_stack.close()  # the session that logged in goes first
            record.sign_key.verify(second.sign(MESSAGE), MESSAGE)
        with open_hsm(ctx, [record]) as third:  # and a fresh login works afterwards
            record.sign_key.verify(third.sign(MESSAGE), MESSAGE)


def test_open_domain_keeps_deriving_while_other_sessions_come_and_go(initialized: Admin) -> None:
    from kmsfs.service import domains

    initialized.create_operators("alice")
    trust = initialized.sealed_trust(["hsm1"], ["alice"], 1)
    initialized("domain", "create", "payroll", "--trust", trust)
    ctx, record = _hsm1(initialized)
    with domains.open_keys(ctx, domains.export_bundle(ctx, "payroll")) as keys:
        before = keys.derive(b"info")
        for _ in range(3):
            with open_hsm(ctx, [record]) as other:
                other.sign(MESSAGE)
        assert keys.derive(b"info") == before


def test_a_refused_pin_is_not_sent_to_the_token_again_until_it_changes(
    initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount retries its HSMs every second while none serves: it sent a wrong PIN each time,
    and a real HSM locks its PIN after a few wrong tries."""
    private = initialized.store / "private"
    location = TokenLocation(softhsm.default_module(), "hsm1", str(private / "softhsm2.conf"))
    right = (private / "pins" / "hsm1.pin").read_text().strip()
    sent: list[str] = []
    real_retrying = library._retrying

    def counting(action):  # type: ignore[no-untyped-def]
        sent.append("call")
        return real_retrying(action)

    monkeypatch.setattr(library, "_retrying", counting)

    def attempt(pin: str) -> int:
        sent.clear()
        with library.session(location, pin):
            pass
        return len(sent)

    with pytest.raises(PinError, match="wrong PIN") as first:
        attempt("wrong-pin-0001")
    assert "refused before" not in str(first.value)
    for _ in range(3):
        with pytest.raises(PinError, match="refused before: not sent again"):
            attempt("wrong-pin-0001")
        assert sent == ["call"]  # the token lookup alone: no C_Login
    with pytest.raises(PinError, match="wrong PIN"):
        attempt("wrong-pin-0002")  # another PIN is tried
    assert attempt(right) == 3  # lookup, login, session: the right PIN still works


def test_a_module_link_repointed_while_a_session_is_open_keeps_the_counts(
    initialized: Admin, tmp_path: Path
) -> None:
    """The module is resolved once per location: re-pointing its link while a session was
    open (a vendor's upgrade) made the session's end fail (KeyError), its login and count
    left behind, so the module was never re-initialized again in that process."""
    private = initialized.store / "private"
    right = (private / "pins" / "hsm1.pin").read_text().strip()
    link = tmp_path / "libvendor-pkcs11.so"
    link.symlink_to(softhsm.default_module())
    location = TokenLocation(str(link), "hsm1", str(private / "softhsm2.conf"))
    with library.session(location, right):
        link.unlink()
        shutil.copy(softhsm.default_module(), tmp_path / "upgraded.so")
        link.symlink_to(tmp_path / "upgraded.so")
    assert library._open_sessions.get(location.library, 0) == 0
    assert all(key[0] != location.library for key in library._logins)
    with library.session(location, right):
        pass
