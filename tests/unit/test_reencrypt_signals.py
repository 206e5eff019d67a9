"""``kmsfs reencrypt`` holds SIGINT, SIGTERM and SIGHUP back while it renames a file's hard
links onto the new inode (:func:`kmsfs.fs.reencrypt_rewrite.signals_deferred`): cut in the
middle, the link stayed split in two files for good (found by review). Real signals, sent to
this process."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from kmsfs.fs.reencrypt_rewrite import DEFERRED_SIGNALS, signals_deferred


class Stopped(Exception):
    """What the test's own SIGTERM handler raises, as the CLI's raises Terminated."""


@pytest.fixture(autouse=True)
def handlers() -> Iterator[None]:
    """The test's handlers: SIGTERM raises Stopped, SIGHUP ignored; all put back after."""
    saved = {sig: signal.getsignal(sig) for sig in DEFERRED_SIGNALS}

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_signal_in_the_block_takes_effect_after_it() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        signal.raise_signal(signal.SIGINT)
        done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_does_not_hide_one_that_stops() -> None:
    """SIGHUP ignored (nohup), then SIGTERM: only the first caught was raised again, which was
    ignored, and the job went on (review)."""
    with pytest.raises(Stopped), signals_deferred():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # not held: ignored
        signal.raise_signal(signal.SIGHUP)
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def test_every_signal_held_is_taken_in_order() -> None:
    # SIGTERM came first, and its handler raises: not the KeyboardInterrupt of SIGINT
    with pytest.raises(Stopped), signals_deferred():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
    # a handler that does not raise (one that logs, say) is not the last one taken
    taken: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: taken.append(signum))
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGINT)
        assert taken == []
    assert taken == [signal.SIGTERM]


def test_the_same_signal_twice_is_not_held_again() -> None:
    """A second Ctrl-C while the block hangs (a directory fsync on a stuck disk) ends it."""
    done = []
    with pytest.raises(KeyboardInterrupt), signals_deferred():
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
        done.append("not reached")
    assert done == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
