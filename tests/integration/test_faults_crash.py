"""Crash during writes: kill -9 the daemon at random points of a heavy write workload.

A writer process creates files (shuffled partial-block pwrites, then fsync) and appends to a
journal, reporting on stdout only what fsync has confirmed. The daemon is killed at a random
moment; after each remount every file reported as fsync'd must read back exactly, the journal
up to its last fsync'd size too, and ``check_tree`` (fsck's core) may report damage only in the
files being written without fsync at the kill (and past the journal's fsync'd size).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from kmsfs.fs.fsck import check_tree
from tests.integration import fault_workers as w
from tests.integration.fs_helpers import SoftDeriver

ITERATIONS = 5
REPO = Path(__file__).resolve().parents[2]


def _start_writer(root: Path, prefix: str, seed: int) -> subprocess.Popen[str]:
    code = ("import sys; from tests.integration.fault_workers import crash_writer; "
            "crash_writer(sys.argv[1], sys.argv[2], int(sys.argv[3]))")
    return subprocess.Popen([sys.executable, "-c", code, str(root), prefix, str(seed)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill9_during_heavy_writes_loses_only_unsynced_data(volume: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(20240601)
    mount = mounter(volume)
    synced: dict[str, int] = {}
    journal = 0
    kills_mid_file = 0
    for it in range(ITERATIONS):
        writer = _start_writer(mount.mountpoint, f"i{it}", it)
        time.sleep(rng.uniform(0.4, 1.6))
        assert mount.proc is not None
        mount.proc.send_signal(signal.SIGKILL)  # the crash
        mount.proc.wait()
        try:  # the writer sees ENOTCONN and stops; nothing it writes after this counts
            out, err = writer.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            writer.kill()
            out, err = writer.communicate()
            raise AssertionError("the writer hung after the daemon was killed") from None
        finally:
            mount.kill9()  # reaps and lazily unmounts only once the writer is gone
        assert "Traceback" not in err, err
        started, done = set(), set()
        for line in out.splitlines():
            kind, *rest = line.split()
            if kind == "start":
                started.add(rest[0])
            elif kind == "synced":
                synced[rest[0]] = int(rest[1])
                done.add(rest[0])
            elif kind == "journal":
                journal = int(rest[0])
        unsynced = {f"/{n}" for n in started - done}
        kills_mid_file += bool(unsynced)

        mount.start()
        m = mount.mountpoint
        for name, size in synced.items():
            if not (m / name).exists():
                raise AssertionError(f"{name} missing; listing has {len(os.listdir(m))}, "
                                     f"cipher has {len(os.listdir(volume))}, synced "
                                     f"{len(synced)}; tail of writer:\n{out[-600:]}\n{err}")
            got = (m / name).read_bytes()
            assert got == w.payload(w.hash_name(name), 0, size), f"iteration {it}: {name}"
        with open(m / "journal", "rb") as f:
            assert f.read(journal) == w.stream_bytes(0, journal), f"iteration {it}: journal"

        report = check_tree(volume, SoftDeriver())
        for p in report.problems:
            if p.path in unsynced:
                continue
            if p.path == "/journal" and (p.kind == "size" or (p.offset or 0) >= journal):
                continue
            raise AssertionError(f"iteration {it}: damage beyond the unsynced tail: {p}")
        # Recover as an application would: back to the last commit, drop half-written files.
        os.truncate(m / "journal", journal)
        for path in unsynced:  # (the kill may have come before its create reached us)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(m / path.lstrip("/"))
    assert len(synced) >= ITERATIONS, "the workload fsync'd too little to test anything"
    final = check_tree(volume, SoftDeriver())
    assert final.clean, final.problems  # after recovery nothing is left damaged
    assert kills_mid_file >= 1, "no kill landed while a file was being written"
