"""Keys of new files derived ahead (ContentKeys.derive_ahead), without FUSE.

The daemon calls ``derive_ahead`` while it waits for the next request. What a user relies on:
a file written with a key derived ahead reads back with the key a later mount derives from its
header; a mount that never writes a new file never derives ahead (no HSM calls, no audit
records for nothing); KEYS_AHEAD_MIN keys wait at first, more (never over KEYS_AHEAD_MAX) only
while new files come fast; refills come in runs, each bounded in time (requests wait
meanwhile); a rotation is never missed; and an HSM failure there stays there (the write that
needs the key reports it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from kmsfs.errors import HsmError
from kmsfs.fs import files
from kmsfs.fs.files import (
    AHEAD_BUDGET_SECONDS,
    AHEAD_FAST_SECONDS,
    KEYS_AHEAD_MAX,
    KEYS_AHEAD_MIN,
    ContentKeys,
    FileContent,
)


class _Clock:
    """Stands in for the time module in kmsfs.fs.files: time moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(files, "time", fake)
    return fake


class _CountingDeriver:
    """Derives like an HSM would (HMAC), counts calls, and can fail or take time."""

    def __init__(self, current_epoch: int = 1, clock: _Clock | None = None) -> None:
        self.current_epoch = current_epoch
        self.calls: list[bytes] = []
        self.fail = False
        self.clock = clock
        self.seconds_per_call = 0.0

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        if self.fail:
            raise HsmError("token removed")
        self.calls.append(info)
        if self.clock is not None:
            self.clock.now += self.seconds_per_call
        key = b"k" * 31 + bytes([epoch or self.current_epoch])
        return hmac.new(key, info, hashlib.sha256).digest()


def _drain(keys: ContentKeys, deriver: _CountingDeriver) -> int:
    """Call derive_ahead until it has nothing to do, as the idle daemon would; keys derived."""
    before = len(deriver.calls)
    for _ in range(1000):
        if not keys.derive_ahead():
            return len(deriver.calls) - before
    raise AssertionError("derive_ahead never says it is done")


def _use(keys: ContentKeys, n: int) -> None:
    for _ in range(n):
        keys.new_file()


def test_a_mount_that_writes_no_new_file_never_derives_ahead() -> None:
    deriver = _CountingDeriver()
    keys = ContentKeys(deriver, key_epochs=True)
    assert _drain(keys, deriver) == 0
    assert deriver.calls == []


def test_after_a_new_file_a_few_keys_wait_and_the_next_files_use_them() -> None:
    deriver = _CountingDeriver()
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    assert len(deriver.calls) == 1
    assert _drain(keys, deriver) == KEYS_AHEAD_MIN
    headers = [keys.new_file()[0] for _ in range(KEYS_AHEAD_MIN)]
    assert len(deriver.calls) == 1 + KEYS_AHEAD_MIN  # no derivation on those files' paths
    assert len({h.file_id for h in headers}) == KEYS_AHEAD_MIN  # every file its own id and key
    keys.new_file()  # none left: derived now
    assert len(deriver.calls) == 2 + KEYS_AHEAD_MIN


def test_a_refill_waits_for_a_quarter_left_then_fills_them_all_in_one_run(clock: _Clock) -> None:
    deriver = _CountingDeriver(clock=clock)
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    _drain(keys, deriver)
    clock.now += AHEAD_FAST_SECONDS  # a slow writer: the number kept ready stays
    _use(keys, KEYS_AHEAD_MIN // 2)
    assert _drain(keys, deriver) == 0  # half left: no lone derivations between requests
    _use(keys, KEYS_AHEAD_MIN - KEYS_AHEAD_MIN // 4 - KEYS_AHEAD_MIN // 2)
    before = len(deriver.calls)
    assert keys.derive_ahead() is True
    assert len(deriver.calls) - before == KEYS_AHEAD_MIN - KEYS_AHEAD_MIN // 4  # one call
    assert keys.wanted == KEYS_AHEAD_MIN


def test_only_files_made_fast_raise_the_number_kept_ready_and_never_past_the_cap(
    clock: _Clock,
) -> None:
    deriver = _CountingDeriver(clock=clock)
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    _drain(keys, deriver)
    seen = [keys.wanted]
    for _ in range(12):  # tar: the keys run low right after each refill
        _use(keys, keys.wanted)
        clock.now += AHEAD_FAST_SECONDS / 10
        _drain(keys, deriver)
        seen.append(keys.wanted)
    assert seen[:4] == [KEYS_AHEAD_MIN, 2 * KEYS_AHEAD_MIN, 4 * KEYS_AHEAD_MIN, 8 * KEYS_AHEAD_MIN]
    assert max(seen) == seen[-1] == KEYS_AHEAD_MAX
    # A mount that stops writing holds at most the cap, however long it then idles.
    assert _drain(keys, deriver) == 0
    clock.now += 3600
    assert _drain(keys, deriver) == 0


def test_one_call_derives_for_at_most_its_budget_and_the_next_call_goes_on(clock: _Clock) -> None:
    deriver = _CountingDeriver(clock=clock)
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    deriver.seconds_per_call = AHEAD_BUDGET_SECONDS / 2.5  # e.g. a network HSM
    before = len(deriver.calls)
    assert keys.derive_ahead() is True
    assert len(deriver.calls) - before == 3  # the budget is spent: back to the requests
    assert keys.derive_ahead() is True  # the refill goes on, though more than a quarter is in
    assert len(deriver.calls) - before == KEYS_AHEAD_MIN
    assert keys.derive_ahead() is False
    deriver.seconds_per_call = 10 * AHEAD_BUDGET_SECONDS  # slower than the budget: one a call
    _use(keys, KEYS_AHEAD_MIN)
    before = len(deriver.calls)
    keys.derive_ahead()
    assert len(deriver.calls) - before == 1


def test_a_file_written_with_a_key_derived_ahead_reads_back_after_remount(tmp_path: Path) -> None:
    deriver = _CountingDeriver()
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    _drain(keys, deriver)
    data = os.urandom(10_000)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    FileContent(fd, keys).write(0, data)
    os.close(fd)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:  # a new mount: nothing ahead, the key comes from the header's file id
        assert bytes(FileContent(fd, ContentKeys(deriver, key_epochs=True)).read(0, 20_000)) == data
    finally:
        os.close(fd)


def test_keys_derived_before_a_rotation_are_not_used_after_it() -> None:
    deriver = _CountingDeriver(current_epoch=1)
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    _drain(keys, deriver)
    deriver.current_epoch = 2
    header, _ = keys.new_file()
    assert header.epoch == 2


def test_an_hsm_failure_while_deriving_ahead_is_left_to_the_next_write() -> None:
    deriver = _CountingDeriver()
    keys = ContentKeys(deriver, key_epochs=False)
    keys.new_file()
    deriver.fail = True
    assert keys.derive_ahead() is False  # no exception into the daemon's wait loop
    deriver.fail = False
    assert _drain(keys, deriver) == 0  # stopped until a new file asks again
    keys.new_file()
    assert _drain(keys, deriver) == KEYS_AHEAD_MIN


class _BatchingDeriver(_CountingDeriver):
    """Also takes batches (``derive_many``), as the agent does: one request for many keys."""

    def __init__(self, clock: _Clock | None = None) -> None:
        super().__init__(clock=clock)
        self.batches: list[int] = []
        self.seconds_per_request = 0.0

    def derive_many(self, infos: list[bytes], epoch: int | None = None) -> list[bytes]:
        self.batches.append(len(infos))
        if self.clock is not None:
            self.clock.now += self.seconds_per_request
        return [self.derive(info, epoch) for info in infos]


def test_a_deriver_that_takes_batches_gets_each_refill_in_one_request(tmp_path: Path) -> None:
    deriver = _BatchingDeriver()
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    assert keys.derive_ahead() is True
    assert deriver.batches == [KEYS_AHEAD_MIN]
    data = os.urandom(5000)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:  # a file started with a key from the batch reads back with the key of its header
        FileContent(fd, keys).write(0, data)
        assert bytes(FileContent(fd, ContentKeys(deriver, key_epochs=True)).read(0, 9000)) == data
    finally:
        os.close(fd)
    assert deriver.batches == [KEYS_AHEAD_MIN]  # the write took a key ready, asked for none


def test_batches_shrink_to_what_the_budget_allows_and_grow_back(clock: _Clock) -> None:
    deriver = _BatchingDeriver(clock=clock)
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    deriver.seconds_per_call = 2 * AHEAD_BUDGET_SECONDS  # a far HSM: a key takes too long
    keys.derive_ahead()
    assert deriver.batches == [KEYS_AHEAD_MIN]
    keys.derive_ahead()
    keys.derive_ahead()  # at that cost one key per request, so each wait is one key
    assert deriver.batches == [KEYS_AHEAD_MIN]
    _use(keys, KEYS_AHEAD_MIN)
    clock.now += AHEAD_FAST_SECONDS
    keys.derive_ahead()
    keys.derive_ahead()
    assert deriver.batches == [KEYS_AHEAD_MIN, 1, 1]
    deriver.seconds_per_call = 0.0  # near again: batches grow back, up to the cap
    for _ in range(10):
        _drain(keys, deriver)
        _use(keys, keys.wanted)
    assert max(deriver.batches) == KEYS_AHEAD_MAX
