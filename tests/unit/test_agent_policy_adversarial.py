"""The agent's policy and protocol against hostile input: pure, no sockets, no HSM.

Tests marked ``xfail(strict=True)`` are open bugs: each fails today and passes once fixed.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from kmsfs.agent import protocol
from kmsfs.agent.policy import ACTIONS, Peer, Policy
from kmsfs.errors import AgentRefusedError, FormatError, KmsfsError

FINGERPRINT = "sha256:" + "ab" * 32
POLICY = f"""\
[[client]]
name = "payroll mounts"
uids = [1001, 1002]
users = ["kmsfs"]
domains = ["payroll", "hr"]
allow = ["derive", "rewrap"]

[[client]]
name = "remote mounts"
certs = ["{FINGERPRINT}"]
subjects = ["mount1.example.org"]
domains = ["*"]
allow = ["derive"]

[[client]]
name = "operators"
uids = [0]
domains = ["payroll"]
allow = ["seal-trust", "health", "create-domain"]
"""

PEERS = [
    Peer(uid=1001),
    Peer(uid=5, user="kmsfs"),
    Peer(uid=0, user="root"),
    Peer(uid=1003, user="mallory"),
    Peer(fingerprint=FINGERPRINT, subject="not-listed"),
    Peer(fingerprint="sha256:" + "cd" * 32, subject="mount1.example.org"),
    Peer(fingerprint="sha256:" + "cd" * 32, subject="mallory"),
]
DOMAINS = [None, "payroll", "hr", "other", "*"]


def permitted(policy: Policy, peer: Peer, action: str, domain: str | None) -> bool:
    try:
        policy.check(peer, action, domain)
    except AgentRefusedError:
        return False
    return True


def grid(policy: Policy) -> set[tuple[int, str, str | None]]:
    return {
        (i, action, domain)
        for (i, peer), action, domain in itertools.product(enumerate(PEERS), ACTIONS, DOMAINS)
        if permitted(policy, peer, action, domain)
    }


def test_tls_peers_are_never_matched_by_uid_nor_local_peers_by_certificate() -> None:
    policy = Policy.parse(
        '[[client]]\nuids = [0]\nusers = ["root"]\ndomains = ["*"]\nallow = ["derive"]\n'
        f'[[client]]\ncerts = ["{FINGERPRINT}"]\nsubjects = ["m1"]\ndomains = ["*"]\n'
        'allow = ["health"]\n',
        "p",
    )
    # A TLS peer that somehow also carried uid 0 / user root gets nothing from the uid rule.
    tls = Peer(uid=0, user="root", fingerprint="sha256:" + "cd" * 32, subject="root")
    assert not permitted(policy, tls, "derive", "payroll")
    # A local peer whose user name equals a listed subject gets nothing from the TLS rule.
    local = Peer(uid=1000, user="m1")
    assert not permitted(policy, local, "health", None)
    # The subject counts only on a TLS peer (the agent sets it from a CA-verified certificate).
    assert permitted(policy, Peer(fingerprint="sha256:" + "ef" * 32, subject="m1"), "health", None)


def test_domain_wildcard_is_a_rule_keyword_not_a_domain_name() -> None:
    """A Domain literally named '*' is impossible (check_name), and a request for Domain '*'
    is refused by a rule that lists only named Domains."""
    policy = Policy.parse(POLICY, "p")
    assert not permitted(policy, Peer(uid=1001), "derive", "*")
    assert permitted(policy, Peer(uid=1001), "derive", "payroll")


def test_a_truncated_policy_never_allows_more_than_the_whole_one() -> None:
    """SIGHUP while an editor is writing the file: any prefix of the policy either fails to
    parse (the old policy stays) or allows a subset of what the finished file allows."""
    full = grid(Policy.parse(POLICY, "p"))
    assert full  # the grid is not trivially empty
    for cut in range(len(POLICY)):
        try:
            partial = Policy.parse(POLICY[:cut], "p")
        except FormatError:
            continue
        extra = grid(partial) - full
        assert not extra, (cut, POLICY[:cut], extra)


def test_unknown_keys_and_actions_in_a_policy_are_refused_not_ignored() -> None:
    for text in (
        '[[client]]\nuids = [0]\nallow = ["derive"]\ndomain = ["*"]\n',  # typo: domain
        '[[client]]\nuids = [0]\nallow = ["derive-all"]\ndomains = ["*"]\n',
        '[[client]]\nuids = [-1]\nallow = ["derive"]\ndomains = ["*"]\n',
        '[[client]]\nuids = [true]\nallow = ["derive"]\ndomains = ["*"]\n',
        '[[client]]\nallow = ["derive"]\ndomains = ["*"]\n',  # names no client
        '[[client]]\ncerts = ["ab"]\nallow = ["derive"]\ndomains = ["*"]\n',
        '[[clients]]\nuids = [0]\n',
    ):
        with pytest.raises(FormatError):
            Policy.parse(text, "p")


@pytest.mark.parametrize(
    "body",
    [
        b'{"id":1,"ok":true}',
        b'{"id":1,"ok":true,"result":[]}',
        b'{"id":1,"ok":"true","result":{}}',
        b'{"id":1,"ok":false}',
        b'{"id":1,"ok":false,"error":"no"}',
        b'{"id":1,"ok":false,"error":{"code":7,"message":"x"}}',
        b'{"id":2,"ok":true,"result":{}}',
        b"[1]",
        b"\xff",
        b'{"id":1,"ok":true,"result":{},"result":{}}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_a_malformed_agent_answer_is_a_format_error_never_a_traceback(body: bytes) -> None:
    with pytest.raises(FormatError):
        protocol.parse_response(body, 1)


def test_an_unknown_error_code_from_the_agent_is_a_plain_error() -> None:
    body = json.dumps(
        {"id": 1, "ok": False, "error": {"code": "launch", "message": "m"}}
    ).encode()
    with pytest.raises(KmsfsError) as caught:
        protocol.parse_response(body, 1)
    assert type(caught.value) is KmsfsError and str(caught.value) == "agent: m"


def test_every_error_answer_fits_in_a_frame() -> None:
    exc = AgentRefusedError("client uid=1 may not create-domain for Domain " + "é" * 2_000_000)
    assert len(protocol.frame(protocol.failed(1, exc))) <= protocol.MAX_FRAME + 4


def _guarded_with_a_full_disk() -> tuple[object, list[str]]:
    """An Agent's _guarded with this module's policy and an audit log that cannot be written."""
    import errno
    import types

    from kmsfs.agent.service import Agent

    acted: list[str] = []

    def audit(**record: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    agent = types.SimpleNamespace(
        policy=Policy.parse(POLICY, "policy.toml"), _audit=audit, LASTING_OPS=Agent.LASTING_OPS
    )
    agent._record = lambda *a, **k: Agent._record(agent, *a, **k)  # type: ignore[attr-defined]
    agent._write = lambda *a, **k: Agent._write(agent, *a, **k)  # type: ignore[attr-defined]

    def guarded(peer: Peer, op: str, domain: str | None) -> object:
        def act() -> dict[str, object]:
            acted.append(op)
            return {"ok": True}

        return Agent._guarded(agent, peer, op, domain, act)  # type: ignore[arg-type]

    return guarded, acted


def test_a_lasting_operation_is_refused_when_its_audit_record_cannot_be_written() -> None:
    """It happened and went unrecorded (the client saw 'internal error'): a Domain created with
    no trace. Now it is refused before anything is done."""
    guarded, acted = _guarded_with_a_full_disk()
    with pytest.raises(AgentRefusedError, match=r"create-domain refused: .*No space left.*"):
        guarded(Peer(uid=0, user="root"), "create-domain", "payroll")  # type: ignore[operator]
    assert acted == []


def test_a_refusal_stays_a_refusal_when_it_cannot_be_recorded() -> None:
    guarded, acted = _guarded_with_a_full_disk()
    with pytest.raises(AgentRefusedError, match=r"not in the agent's policy"):
        guarded(Peer(uid=1003, user="mallory"), "derive", "payroll")  # type: ignore[operator]
    assert acted == []


def test_keys_are_not_sent_when_their_derivation_cannot_be_recorded() -> None:
    guarded, acted = _guarded_with_a_full_disk()
    with pytest.raises(OSError):
        guarded(Peer(uid=1001), "derive", "payroll")  # type: ignore[operator]
    assert acted == ["derive"]  # derived inside the HSM, but the result never leaves


def test_a_policy_that_cannot_be_read_is_a_usage_error_not_a_malformed_one(
    tmp_path: Path,
) -> None:
    """A mistyped --policy exited 7 ("malformed"); it is a usage error (2), named."""
    from kmsfs import exitcodes
    from kmsfs.errors import UsageError

    with pytest.raises(UsageError) as info:
        Policy.load(tmp_path / "nope.toml")
    missing = tmp_path / "nope.toml"
    assert str(info.value) == f"{missing}: cannot read the policy: No such file or directory"
    assert exitcodes.for_error(info.value) == exitcodes.USAGE


def test_a_tls_clients_common_name_cannot_pass_for_another_client() -> None:
    """Review: the audit log and refusals named a TLS client ``tls:CN:fingerprint`` with the
    certificate's common name as it came: a CN of its own choosing with a newline, or with
    ":sha256:<someone else's fingerprint>", read as another client. The name is escaped and cut
    now; the fingerprint that ends the line is the client's own."""
    own, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    honest = Peer(fingerprint=own, subject="mount1.example.org")
    assert honest.describe() == f"tls:mount1.example.org:{own}"
    forged = Peer(fingerprint=own, subject=f"x\nuid=0(root) mount-b:{other}")
    shown = forged.describe()
    assert "\n" not in shown and shown.endswith(f":{own}") and shown.count(":") == 3, shown
    assert f":{other}" not in shown
    assert Peer(fingerprint=own).describe() == f"tls:?:{own}"
