"""The coalescing of unlisted peers' refusals (kmsfs/agent/refusals.py), with a hand-moved clock.

What must hold: one record per identity per window, every refusal counted by some record
(none lost when the identity goes quiet or the agent stops), identities independent, and the
table bounded however many identities there are.
"""

from kmsfs.agent.refusals import OVERFLOW, Pending, RefusalCoalescer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_record_per_window_and_the_next_carries_the_count() -> None:
    clock = Clock()
    quiet = RefusalCoalescer(window=60.0, clock=clock)
    assert quiet.admit("uid=4242(?)", "derive") == ("uid=4242(?)", 0)
    assert [quiet.admit("uid=4242(?)", "health") for _ in range(9)] == [None] * 9
    clock.now += 59.9
    assert quiet.admit("uid=4242(?)", "derive") is None
    clock.now += 0.1
    assert quiet.admit("uid=4242(?)", "derive") == ("uid=4242(?)", 10)
    assert quiet.due(everything=True) == []  # that record carried every count


def test_identities_are_coalesced_apart() -> None:
    quiet = RefusalCoalescer(window=60.0, clock=Clock())
    assert quiet.admit("uid=1(a)", "derive") == ("uid=1(a)", 0)
    assert quiet.admit("uid=2(b)", "derive") == ("uid=2(b)", 0)
    assert quiet.admit("uid=1(a)", "derive") is None


def test_a_quiet_identitys_count_is_due_once_its_window_passed_or_at_stop() -> None:
    clock = Clock()
    quiet = RefusalCoalescer(window=60.0, clock=clock)
    for who in ("uid=1(a)", "uid=2(b)"):
        quiet.admit(who, "derive")
    for _ in range(3):
        quiet.admit("uid=1(a)", "health")
    assert quiet.due() == []  # still within the window: the next record may carry it
    clock.now += 60.0
    assert quiet.due() == [Pending("uid=1(a)", "health", 3)]
    assert quiet.due() == []  # handed out once
    # Its record starts a's next window (b, owing nothing, is forgotten): still one a window.
    assert quiet.admit("uid=1(a)", "derive") is None
    assert quiet.admit("uid=2(b)", "derive") == ("uid=2(b)", 0)
    clock.now += 60.0
    assert quiet.admit("uid=1(a)", "derive") == ("uid=1(a)", 1)
    quiet.admit("uid=1(a)", "derive")
    assert quiet.due(everything=True) == [Pending("uid=1(a)", "derive", 1)]
    assert quiet.due(everything=True) == []


def test_the_table_is_bounded_and_overflow_is_still_counted() -> None:
    """Beyond ``max_identities`` at once (only root or the TLS CA can present so many), the
    rest share one entry: still one record per window, still every refusal counted."""
    quiet = RefusalCoalescer(window=60.0, clock=Clock(), max_identities=4)
    for n in range(4):
        assert quiet.admit(f"uid={n}", "derive") == (f"uid={n}", 0)
    assert quiet.admit("uid=4", "derive") == (OVERFLOW, 0)
    assert [quiet.admit(f"uid={n}", "derive") for n in range(5, 50)] == [None] * 45
    assert quiet.admit("uid=0", "health") is None  # a known identity keeps its own entry
    assert sorted(quiet.due(everything=True), key=lambda p: p.who) == [
        Pending("uid=0", "health", 1), Pending(OVERFLOW, "derive", 45)
    ]


def test_room_is_made_from_expired_identities_keeping_what_they_owe() -> None:
    clock = Clock()
    quiet = RefusalCoalescer(window=60.0, clock=clock, max_identities=2)
    quiet.admit("uid=1(a)", "derive")
    quiet.admit("uid=1(a)", "health")  # owes 1
    quiet.admit("uid=2(b)", "derive")
    clock.now += 60.0
    assert quiet.admit("uid=3(c)", "derive") == ("uid=3(c)", 0)  # a and b made room
    assert quiet.due() == [Pending("uid=1(a)", "health", 1)]


def test_a_burst_of_records_per_window_then_counted() -> None:
    """The refusals of a listed identity (and the agent's per-connection log lines) get a few
    records of their own per window, not one: then they are counted like an unlisted peer's."""
    clock = Clock()
    quiet = RefusalCoalescer(window=60.0, clock=clock, burst=3)
    assert [quiet.admit("uid=0(root)", "health") for _ in range(3)] == [("uid=0(root)", 0)] * 3
    assert [quiet.admit("uid=0(root)", "derive") for _ in range(5)] == [None] * 5
    assert quiet.admit("uid=1(a)", "derive") == ("uid=1(a)", 0)  # identities apart
    clock.now += 60.0
    assert quiet.admit("uid=0(root)", "health") == ("uid=0(root)", 5)  # a new window
    assert quiet.admit("uid=0(root)", "health") == ("uid=0(root)", 0)
    assert quiet.admit("uid=0(root)", "health") == ("uid=0(root)", 0)
    assert quiet.admit("uid=0(root)", "health") is None
    assert quiet.due() == []  # its window has not passed
    clock.now += 60.0
    assert quiet.due() == [Pending("uid=0(root)", "health", 1)]
    # The record about to be written for that count is the first of the next window.
    assert [quiet.admit("uid=0(root)", "health") for _ in range(3)] == [
        ("uid=0(root)", 0), ("uid=0(root)", 0), None
    ]
    assert quiet.due(everything=True) == [Pending("uid=0(root)", "health", 1)]


def test_the_overflow_entry_is_named_by_its_owner() -> None:
    quiet = RefusalCoalescer(window=60.0, clock=Clock(), max_identities=1, overflow="listed")
    assert quiet.admit("uid=0", "derive") == ("uid=0", 0)
    assert quiet.admit("uid=1", "derive") == ("listed", 0)
    assert quiet.admit("uid=2", "derive") is None
    assert quiet.due(everything=True) == [Pending("listed", "derive", 1)]
