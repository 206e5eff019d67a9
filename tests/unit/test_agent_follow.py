"""How a deriver through the agent learns of retired key epochs (``AgentDeriver``), against a
scripted stand-in for the connection: the agent's side is tested for real in
tests/integration/test_agent.py."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from kmsfs.agent.client import AgentDeriver
from kmsfs.errors import AgentUnavailableError, FormatError, NotFoundError
from kmsfs.model.canonical import b64encode

HANDLE_1, HANDLE_2 = "11" * 32, "22" * 32
KEY = b64encode(bytes(32))


class ScriptedAgent:
    """Answers open-domain and derive as an agent would, and domain-status from a script:
    each entry is an answer (a dict) or an exception to raise."""

    address = "unix:/nowhere"

    def __init__(self, statuses: list[Any], retired_on_open: int = 1) -> None:
        self.statuses = statuses
        self.retired_on_open = retired_on_open
        self.epoch_on_open: int | list[int] = 2
        self.same_handle = False  # open-domain gives back HANDLE_1 every time
        self.open_fails: list[Exception] = []  # raised by the next open-domains, in turn
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.opened = 0
        self.closed = 0
        self.asked = threading.Event()  # set once the script has run out
        self.slow_status = 0.0  # seconds each domain-status takes

    def call(self, op: str, args: dict[str, Any], *, retry: bool = True) -> dict[str, Any]:
        self.calls.append((op, args))
        if op == "open-domain":
            if self.open_fails:
                raise self.open_fails.pop(0)
            self.opened += 1
            handle = HANDLE_1 if self.opened == 1 or self.same_handle else HANDLE_2
            epoch = self.epoch_on_open
            if isinstance(epoch, list):  # one per open-domain, the last one kept
                epoch = epoch.pop(0) if len(epoch) > 1 else epoch[0]
            return {"handle": handle, "name": "payroll", "current_epoch": epoch,
                    "retired_below": self.retired_on_open}
        if op == "derive":
            return {"keys": [KEY] * len(args["infos"]), "retired_below": 3}
        assert op == "domain-status"
        time.sleep(self.slow_status)
        if not self.statuses:
            self.asked.set()
            return {"retired_below": 1}
        answer = self.statuses.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def close(self) -> None:
        self.closed += 1


def _following(agent: ScriptedAgent, **then: Any) -> AgentDeriver:
    """A deriver opened through *agent*, whose attributes *then* are set once it is open
    (what the agent answers from then on), following it every millisecond."""
    deriver = AgentDeriver(agent, b"bundle").open()  # type: ignore[arg-type]
    for name, value in then.items():
        setattr(agent, name, value)
    deriver.FOLLOW_INTERVAL = 0.001
    deriver.follow_in_background()
    return deriver


def test_answers_raise_the_retirement_and_nothing_lowers_it() -> None:
    agent = ScriptedAgent([], retired_on_open=2)
    deriver = AgentDeriver(agent, b"bundle").open()  # type: ignore[arg-type]
    assert deriver.retired_below == 2  # from open-domain
    deriver.derive(b"info")
    assert deriver.retired_below == 3  # from derive
    for answer in ({"retired_below": 1}, {"retired_below": "9"}, {}):
        deriver._take_in(answer)
    assert deriver.retired_below == 3


def test_what_the_first_opening_finds_retired_is_no_warning_and_a_later_rise_is(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every kmsfs command through the agent printed the retirement as news ("refused from
    now on"), long after it was made: the first opening's is where the deriver starts."""
    caplog.set_level(logging.WARNING)
    agent = ScriptedAgent([], retired_on_open=2)
    deriver = AgentDeriver(agent, b"bundle").open()  # type: ignore[arg-type]
    assert deriver.retired_below == 2
    assert "retires key epochs" not in caplog.text
    deriver.derive(b"info")  # the agent now says 3: news
    assert deriver.retired_below == 3
    assert "the agent retires key epochs below 3" in caplog.text


def test_a_rise_found_by_opening_the_domain_again_is_news(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retirement made through the agent closes its handles: the next derive opens the
    Domain again, and what that opening finds retired is news, not a starting point."""
    caplog.set_level(logging.WARNING)
    agent = ScriptedAgent([], retired_on_open=2)
    deriver = AgentDeriver(agent, b"bundle").open()  # type: ignore[arg-type]
    agent.retired_on_open = 5
    deriver._handle = None  # as _derive_locked leaves it when the agent says NotFound
    deriver.open()
    assert deriver.retired_below == 5
    assert "the agent retires key epochs below 5" in caplog.text


def test_the_thread_asks_about_its_handle_and_takes_the_answer_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = ScriptedAgent([{"retired_below": 2}])
    deriver = _following(agent)
    try:
        assert agent.asked.wait(5)
        assert deriver.retired_below == 2
        assert ("domain-status", {"handle": HANDLE_1}) in agent.calls
        assert "the agent retires key epochs below 2" in caplog.text
        assert "own epoch" not in caplog.text  # its epoch, 2, is kept
    finally:
        deriver.close()


def test_a_handle_the_agent_closed_is_opened_again_and_its_answer_counts() -> None:
    """A new generation (rotate, rewrap, retire) closes the agent's handles: the thread opens
    the Domain again, as the next derive would, and the newest generation's answer says."""
    agent = ScriptedAgent([NotFoundError("Domain handle 1111 is not open")])
    deriver = _following(agent, retired_on_open=2)
    try:
        assert agent.asked.wait(5)
        assert deriver.retired_below == 2 and agent.opened == 2
        assert ("domain-status", {"handle": HANDLE_2}) in agent.calls
    finally:
        deriver.close()


def test_problems_are_warned_about_once_each_and_an_older_agent_is_not_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = AgentUnavailableError("agent unix:/nowhere: connection refused")
    agent = ScriptedAgent([down, down, down, FormatError("unknown operation domain-status")])
    caplog.set_level(logging.WARNING)
    deriver = _following(agent)
    try:
        deadline = time.monotonic() + 5
        while agent.statuses and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # what it would ask after the FormatError, if it went on
        asked = [op for op, _ in agent.calls if op == "domain-status"]
        assert len(asked) == 4 and not agent.asked.is_set()
        assert caplog.text.count("connection refused") == 1
        assert "does not say which key epochs are retired" in caplog.text
    finally:
        deriver.close()


def test_close_ends_the_thread() -> None:
    deriver = _following(ScriptedAgent([]))
    deriver.close()
    time.sleep(0.05)
    assert "kmsfs-follow-agent" not in {t.name for t in threading.enumerate()}


def test_a_format_error_other_than_an_unknown_request_does_not_stop_the_thread(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A store the agent cannot read for a moment (a document half copied into it, found by
    review) fails the open-domain that follows a new generation with a format error: the
    thread warns and asks again; only an agent that does not know domain-status stops it."""
    agent = ScriptedAgent([NotFoundError("not open"), FormatError("bad request"),
                           {"retired_below": 2}])
    deriver = _following(agent, open_fails=[FormatError("agent: domains/abab.json: not JSON")])
    try:
        assert agent.asked.wait(5)
        assert deriver.retired_below == 2
        assert "not JSON" in caplog.text and "bad request" in caplog.text
        assert "does not say which key epochs are retired" not in caplog.text
    finally:
        deriver.close()


def test_a_handle_whose_own_epoch_is_retired_is_replaced_once() -> None:
    """A retirement made on the agent's store without the agent closes no handle: the
    generation the mount holds says its own epoch is retired, and the thread opens the
    Domain's newest generation (the agent then answers with another handle), once."""
    agent = ScriptedAgent([{"retired_below": 2}] * 3 + [{"retired_below": 3}] * 3)
    agent.epoch_on_open = 1
    deriver = _following(agent, epoch_on_open=2)
    try:
        assert agent.asked.wait(5)
        assert agent.opened == 3  # the first open, then once for HANDLE_1, once for HANDLE_2
        assert deriver.current_epoch == 2 and deriver.retired_below == 3
    finally:
        deriver.close()


def test_close_waits_for_a_look_under_way_and_closes_what_it_opened() -> None:
    agent = ScriptedAgent([])
    agent.slow_status = 0.2
    deriver = _following(agent)
    while not any(op == "domain-status" for op, _ in agent.calls):
        time.sleep(0.001)
    deriver.close()
    assert "kmsfs-follow-agent" not in {t.name for t in threading.enumerate()}
    assert agent.closed == 2  # once at once, once after the look that was under way


def test_a_handle_behind_the_agents_newest_epoch_is_replaced_once() -> None:
    """A rotation made on the agent's store closes no handle: the agent says its newest
    generation's epoch, and the thread opens that generation, once for each handle."""
    agent = ScriptedAgent([{"retired_below": 1, "newest_epoch": 2}] * 3)
    agent.epoch_on_open = 1
    deriver = _following(agent, epoch_on_open=2)
    try:
        assert agent.asked.wait(5)
        assert agent.opened == 2 and deriver.current_epoch == 2
    finally:
        deriver.close()


def test_a_reopen_that_fails_is_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    """The agent cannot open the Domain's newest generation just then (its HSM away, found
    by review): the thread warns and opens it at a later look, not never."""
    agent = ScriptedAgent([{"retired_below": 1, "newest_epoch": 2}] * 5000)  # > 1 s of looks
    agent.epoch_on_open = 1
    down = AgentUnavailableError("agent: no HSM of the trust answers")
    deriver = _following(agent, epoch_on_open=2, open_fails=[down])
    try:
        deadline = time.monotonic() + 5
        while deriver.current_epoch != 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert deriver.current_epoch == 2 and agent.opened == 2
        assert caplog.text.count("no HSM of the trust answers") == 1
    finally:
        deriver.close()


def test_opening_a_closed_handle_again_backs_off_too() -> None:
    """The agent says the handle is closed (it restarted, or made a generation) and cannot open
    the Domain just then: each failed open-domain is an audited record, so the thread tries
    again after 1, 2, 4... s, not at every look (found by review)."""
    agent = ScriptedAgent([NotFoundError("not open")] * 100_000)
    down = AgentUnavailableError("agent: no HSM of the trust answers")
    deriver = _following(agent, open_fails=[down] * 100)
    try:
        time.sleep(1.6)
        opens = [op for op, _ in agent.calls if op == "open-domain"]
        assert 2 <= len(opens) <= 3  # the first open, then tries at ~0 s and ~1 s
    finally:
        deriver.close()


def test_a_handle_given_back_after_an_agent_restart_still_moves_to_a_later_rotation() -> None:
    """The agent restarted (the handle is not found), and opening the Domain again gives the
    same handle: a rotation made later on the agent's store is still followed (found by a
    reread: that handle was marked as the newest for good)."""
    agent = ScriptedAgent([NotFoundError("not open"), {"retired_below": 1, "newest_epoch": 1},
                           {"retired_below": 1, "newest_epoch": 2}])
    agent.same_handle = True
    agent.epoch_on_open = [1, 1, 2]
    deriver = _following(agent)
    try:
        assert agent.asked.wait(5)
        assert agent.opened == 3 and deriver.current_epoch == 2
    finally:
        deriver.close()


def test_an_agent_that_gives_the_same_handle_back_is_not_asked_in_a_loop() -> None:
    """The agent says a newer epoch exists but opening the Domain gives back the same handle
    (its store and its answers disagree): the thread opens it once, not at every look (each
    open is an audited derive record)."""
    agent = ScriptedAgent([{"retired_below": 1, "newest_epoch": 2}] * 20)
    agent.same_handle = True
    agent.epoch_on_open = 1
    deriver = _following(agent)
    try:
        assert agent.asked.wait(5)
        assert agent.opened == 2
    finally:
        deriver.close()
