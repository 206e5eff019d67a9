"""The agent's wire protocol and policy file: pure, no sockets, no HSM."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kmsfs import exitcodes
from kmsfs.agent import protocol
from kmsfs.agent.client import AgentAddress
from kmsfs.agent.policy import Peer, Policy
from kmsfs.errors import (
    AgentRefusedError,
    AgentUnavailableError,
    ChainError,
    FormatError,
    HsmUnavailableError,
    IntegrityError,
    KmsfsError,
    NotFoundError,
    PinError,
    QuorumNotMetError,
    UsageError,
)

# -- framing and messages ---------------------------------------------------------------------


def test_frame_is_length_prefixed_canonical_json() -> None:
    framed = protocol.frame({"b": 1, "a": "x"})
    assert framed == struct.pack(">I", 15) + b'{"a":"x","b":1}'
    assert protocol.frame_length(framed[:4]) == 15


def test_oversized_frames_are_refused_before_reading() -> None:
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.frame_length(struct.pack(">I", protocol.MAX_FRAME + 1))
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.frame({"x": "a" * protocol.MAX_FRAME})


def test_request_round_trip() -> None:
    request = protocol.Request(7, "derive", {"handle": "ab", "infos": []})
    body = protocol.frame(request.to_dict())[4:]
    assert protocol.Request.parse(body) == request


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b'{"v":1,"id":1,"op":"hello"}', "missing args"),
        (b'{"v":1,"id":1,"op":"hello","args":{},"x":0}', "unknown x"),
        (b'{"v":9,"id":1,"op":"hello","args":{}}', "version 9"),
        (b'{"v":1,"id":"1","op":"hello","args":{}}', "want int"),
        (b'{"v":1,"id":1,"op":2,"args":{}}', "want str"),
        (b'{"v":1,"id":1,"op":"hello","args":[]}', "want an object"),
        (b'{"v":1,"id":1,"id":2,"op":"hello","args":{}}', "duplicate"),
        (b'{"v":1,"id":1.5,"op":"hello","args":{}}', "not valid"),
        (b"\xff", "UTF-8"),
    ],
)
def test_malformed_requests_fail_with_a_named_reason(body: bytes, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        protocol.Request.parse(body)


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_a_format_error(body: bytes) -> None:
    with contextlib.suppress(FormatError):
        protocol.Request.parse(body)
    assert isinstance(protocol.request_id_of(body), int)


@pytest.mark.parametrize(
    "error",
    [
        AgentRefusedError("no"),
        QuorumNotMetError("q"),
        ChainError("c"),
        IntegrityError("i"),
        PinError("p"),
        HsmUnavailableError("h"),
        NotFoundError("n"),
        UsageError("u"),
        FormatError("f"),
        KmsfsError("k"),
    ],
)
def test_errors_cross_the_wire_as_the_same_class_and_exit_code(error: KmsfsError) -> None:
    response = protocol.frame(protocol.failed(3, error))[4:]
    with pytest.raises(KmsfsError) as raised:
        protocol.parse_response(response, 3)
    assert type(raised.value) is type(error)
    assert str(raised.value) == f"agent: {error}"
    assert exitcodes.for_error(raised.value) == exitcodes.for_error(error)


def test_refusal_has_its_own_exit_code_and_unreachable_agent_is_an_hsm_failure() -> None:
    assert exitcodes.for_error(AgentRefusedError("x")) == exitcodes.REFUSED == 9
    assert exitcodes.for_error(AgentUnavailableError("x")) == exitcodes.HSM


def test_response_to_another_request_is_refused() -> None:
    with pytest.raises(protocol.ProtocolError, match="response to request 4"):
        protocol.parse_response(protocol.frame(protocol.ok(4, {}))[4:], 5)


def test_an_error_with_id_0_answers_the_request_in_flight() -> None:
    """The agent refuses an unlisted peer's long frame unread, so without its id: the client
    must still see the refusal (exit 9), not a protocol error. A success with id 0 is no
    answer to request 5."""
    refused = protocol.frame(protocol.failed(0, AgentRefusedError("not in the policy")))[4:]
    with pytest.raises(AgentRefusedError, match="agent: not in the policy"):
        protocol.parse_response(refused, 5)
    with pytest.raises(protocol.ProtocolError, match="response to request 0"):
        protocol.parse_response(protocol.frame(protocol.ok(0, {}))[4:], 5)


def test_unknown_error_code_becomes_a_plain_error() -> None:
    body = b'{"error":{"code":"new-kind","message":"m"},"id":1,"ok":false}'
    with pytest.raises(KmsfsError, match="agent: m") as raised:
        protocol.parse_response(body, 1)
    assert type(raised.value) is KmsfsError


# -- addresses ------------------------------------------------------------------------------


def test_addresses() -> None:
    assert AgentAddress.parse("/run/kmsfs/hsmd.sock").path is not None
    assert str(AgentAddress.parse("unix:hsmd.sock").path) == "hsmd.sock"
    tcp = AgentAddress.parse("hsm.example.org:7440", "c.crt", "c.key", "ca.pem")
    assert (tcp.host, tcp.port) == ("hsm.example.org", 7440)
    v6 = AgentAddress.parse("[::1]:7440", "c.crt", "c.key", "ca.pem")
    assert v6.host == "::1"


@pytest.mark.parametrize("text", ["hsm:0", "hsm:99999", "hsm:", ":7440", "hsm"])
def test_bad_addresses_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError):
        AgentAddress.parse(text, "c", "k", "ca")


def test_tcp_without_tls_files_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KMSFS_AGENT_CERT", "KMSFS_AGENT_KEY", "KMSFS_AGENT_CA"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="TLS only"):
        AgentAddress.parse("hsm:7440")
    monkeypatch.setenv("KMSFS_AGENT_CERT", "c")
    monkeypatch.setenv("KMSFS_AGENT_KEY", "k")
    monkeypatch.setenv("KMSFS_AGENT_CA", "ca")
    assert AgentAddress.parse("hsm:7440").cert is not None


# -- the policy ---------------------------------------------------------------------------------

FP = "sha256:" + "ab" * 32
POLICY = f"""
[[client]]
name = "mounts"
uids = [1000]
users = ["kmsfs"]
domains = ["payroll"]
allow = ["derive"]

[[client]]
name = "remote"
certs = ["{FP}"]
subjects = ["mount1.example.org"]
domains = ["*"]
allow = ["derive", "health"]

[[client]]
name = "ops"
uids = [0]
allow = ["seal-trust", "create-domain"]
domains = ["hr"]
"""


def test_policy_allows_what_it_lists() -> None:
    policy = Policy.parse(POLICY, "p.toml")
    assert policy.check(Peer(uid=1000), "derive", "payroll") == "mounts"
    assert policy.check(Peer(uid=5, user="kmsfs"), "derive", "payroll") == "mounts"
    assert policy.check(Peer(fingerprint=FP), "derive", "anything") == "remote"
    assert policy.check(Peer(fingerprint="sha256:" + "0" * 64, subject="mount1.example.org"),
                        "health") == "remote"
    assert policy.check(Peer(uid=0), "seal-trust") == "ops"
    assert policy.check(Peer(uid=0), "create-domain", "hr") == "ops"


@pytest.mark.parametrize(
    ("peer", "action", "domain", "match"),
    [
        (Peer(uid=1000), "derive", "hr", "may not derive for Domain hr"),
        (Peer(uid=1000), "health", None, "may not health"),
        (Peer(uid=1000), "derive", None, "may not derive"),
        (Peer(uid=1001), "derive", "payroll", "not in the agent's policy"),
        (Peer(uid=0), "create-domain", "payroll", "may not create-domain"),
        (Peer(uid=0), "rewrap", "hr", "may not rewrap"),
        # A TLS peer is never matched by uid, and a local peer never by certificate.
        (Peer(uid=1000, fingerprint="sha256:" + "1" * 64), "derive", "payroll", "not in"),
        (Peer(uid=7, user="mount1.example.org"), "health", None, "not in"),
    ],
)
def test_policy_refuses_everything_else(
    peer: Peer, action: str, domain: str | None, match: str
) -> None:
    with pytest.raises(AgentRefusedError, match=match):
        Policy.parse(POLICY, "p.toml").check(peer, action, domain)


def test_empty_policy_refuses_everyone() -> None:
    with pytest.raises(AgentRefusedError, match="not in the agent's policy"):
        Policy.parse("", "p.toml").check(Peer(uid=0), "health")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[[client]]\nuids=[0]\nallow=['derive']\nallow_all=true\n", "unknown key 'allow_all'"),
        ("[[client]]\nuids=[0]\nallow=['drive']\n", "unknown action 'drive'"),
        ("[[client]]\nallow=['derive']\n", "names no client"),
        ("[[client]]\nuids=['root']\nallow=['derive']\n", "'uids' must be"),
        ("[[client]]\nuids=[-1]\nallow=['derive']\n", "'uids' must be"),
        ("[[client]]\ncerts=['ab12']\nallow=['derive']\n", "sha256:<64 hex"),
        ("[[client]]\nuids=[0]\ndomains='payroll'\n", "'domains' must be"),
        ("[clients]\nuids=[0]\n", "unknown key 'clients'"),
        ("client = 1\n", "array of tables"),
        ("[[client]\n", "not TOML"),
    ],
)
def test_policy_typos_are_refused_at_load(text: str, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        Policy.parse(text, "p.toml")


def test_tls_handshakes_in_progress_count_per_ipv4_address_and_per_ipv6_64() -> None:
    """One host commonly has a whole IPv6 /64: counted per address, it could take every
    handshake slot from one network (review)."""
    from kmsfs.agent.server import handshake_source

    assert handshake_source("192.0.2.7") == "192.0.2.7"
    assert handshake_source("::ffff:192.0.2.7") == "192.0.2.7"
    assert handshake_source("2001:db8:1:2::7") == handshake_source("2001:db8:1:2:ffff::1") == (
        "2001:db8:1:2::/64")
    assert handshake_source("2001:db8:1:3::7") != handshake_source("2001:db8:1:2::7")


def test_the_ceremonys_seal_action_gets_the_frame_of_a_long_request() -> None:
    """A seal request carries a Trust, its approvals and a chain: a peer allowed only
    ``seal-genesis-successor`` (the ceremony's grant) may send as long a frame as one allowed
    ``seal-trust``, and a monitor allowed ``health`` only may not."""
    from kmsfs.agent.server import MAX_SMALL_FRAME, frame_limit

    policy = Policy.parse(
        '[[client]]\nname = "ceremony"\nuids = [0]\nallow = ["seal-genesis-successor"]\n'
        '[[client]]\nname = "monitor"\nuids = [7]\nallow = ["health"]\n', "test")
    assert frame_limit(policy, Peer(uid=0)) == protocol.MAX_FRAME
    assert frame_limit(policy, Peer(uid=7)) == MAX_SMALL_FRAME < protocol.MAX_FRAME
