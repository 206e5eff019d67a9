"""Concurrency: 8 processes at once on a mount, compared with the same run on a plain directory.

Different files: each process runs a seeded mix of writes, appends, pwrites, truncates and
reads on files of its own; the end state must equal the plain directory's exactly. Same files:
appenders (O_APPEND), slot writers (pwrite of records that share ciphertext blocks with their
neighbours), a truncator and a reader hit three shared files; every record must be whole and
present once, sizes consistent, no EIO anywhere, and nothing may hang (every process has a
deadline).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration import fault_workers as w
from tests.integration.test_fs_model import snapshot

PROCS = 8
DEADLINE = 90.0


def run_all(jobs: list[tuple[Callable[..., list[str]], tuple[Any, ...]]]) -> list[str]:
    """Run every job in its own process at once; fail on a hang; return all problems."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(jobs)) as pool:
        pending = [pool.apply_async(fn, args) for fn, args in jobs]
        problems: list[str] = []
        for job, result in zip(jobs, pending, strict=True):
            try:
                problems += result.get(timeout=DEADLINE)
            except multiprocessing.TimeoutError:
                pool.terminate()
                pytest.fail(f"{job[0].__name__}{job[1]} did not finish in {DEADLINE} s (hang)")
    return problems


@pytest.mark.parametrize("seed", [1])
def test_eight_processes_on_their_own_files_match_a_plain_dir(
    seed: int, tmp_path: Path, mnt  # type: ignore[no-untyped-def]
) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    results = {}
    for root in (plain, mnt.mountpoint):
        results[root] = run_all([(w.own_files, (str(root), i, seed, 250)) for i in range(PROCS)])
    assert results[mnt.mountpoint] == results[plain]
    want = snapshot(plain)
    assert snapshot(mnt.mountpoint) == want
    mnt.stop()
    mnt.start()
    assert snapshot(mnt.mountpoint) == want
    assert "integrity" not in mnt.log() and "Traceback" not in mnt.log(), mnt.log()


def _check_shared(root: Path, appenders: int, appends: int, slotters: int, slots: int) -> None:
    data = (root / "shared.log").read_bytes()
    assert len(data) == os.stat(root / "shared.log").st_size
    found, problem = w.parse_records(data)
    assert problem is None, problem
    assert sorted(found) == sorted((a, s) for a in range(appenders) for s in range(appends))
    for a in range(appenders):  # each writer's own appends stay in order
        assert [s for who, s in found if who == a] == list(range(appends))

    data = (root / "shared.slots").read_bytes()
    assert len(data) == slotters * slots * w.SLOT
    for writer in range(slotters):
        for seq in range(slots):
            slot = writer + slotters * seq
            want = w.record(writer, seq, w.SLOT - w.RECORD_HEADER.size)
            assert data[slot * w.SLOT : (slot + 1) * w.SLOT] == want, f"slot {slot}"

    trunc = root / "shared.trunc"
    assert len(trunc.read_bytes()) == trunc.stat().st_size


@pytest.mark.parametrize("where", ["plain", "mount"])
def test_eight_processes_on_shared_files(where: str, tmp_path: Path, volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    if where == "plain":
        root = tmp_path / "plain"
        root.mkdir()
        mount = None
    else:
        mount = mounter(volume)
        root = mount.mountpoint
    appenders, appends, slotters, slots = 3, 60, 3, 40
    jobs: list[tuple[Callable[..., list[str]], tuple[Any, ...]]] = []
    jobs += [(w.appender, (str(root), a, appends)) for a in range(appenders)]
    jobs += [(w.slot_writer, (str(root), s, slotters, slots)) for s in range(slotters)]
    jobs += [(w.truncator, (str(root), 99, 150)), (w.reader, (str(root), 40))]
    assert len(jobs) == PROCS
    assert run_all(jobs) == []
    _check_shared(root, appenders, appends, slotters, slots)
    if mount is not None:
        assert mount.alive()
        log = mount.log()
        assert "integrity" not in log and "Traceback" not in log, log
        mount.stop()
        mount.start()
        _check_shared(root, appenders, appends, slotters, slots)
