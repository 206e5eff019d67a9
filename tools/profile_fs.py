#!/usr/bin/env python3
"""Where the kmsfs daemon spends its time, phase by phase of the bench's metadata workload.

Usage (as root, from the repo, with the venv):
    .venv/bin/python tools/profile_fs.py [--workdir /dev/shm] [--cprofile 25] [--json]

It mounts kmsfs with the TEST stand-in key deriver (as ``bench.py --deriver stub``: no HSM) in
a child process that times every request handler, runs the workload ``bench.py`` times (tar -x
of ~5,000 small files, ls -lR, read every file back, rm -rf; caches dropped before the reads)
and prints, for each phase: its wall time, the daemon's CPU time, and each handler's calls,
mean and total time inside the daemon. With ``--cprofile N`` it adds the N functions with the
most time of their own (cProfile makes the daemon up to twice as slow on tar -x: read those
figures as shares, not as times).

Why a tool of its own: a handler takes 3-6 times longer inside the serving daemon than in a
loop that calls it in-process (every request runs other code on other data, between the
kernel's own work), so in-process timings mislead. Measured where they run, the handlers
showed a repr built in every close (15 us of 27). Figures only: no test asserts a time.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import inspect
import io
import json
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

#: The steps of bench.py's workload this tool times, in order (bench.steps; caches dropped
#: before those in bench.COLD, as bench.py does).
PHASES = ("tar extract s", "ls -lR s", "read back s", "rm -rf s")


# --- the daemon (child process) ---------------------------------------------------------
def serve(cipherdir: Path, mountpoint: Path, report: Path, top: int) -> None:
    """Serve the mount with every handler timed; each SIGUSR1 appends what happened since the
    last one to *report* (a JSON line) and starts counting again."""
    import pyfuse3

    from kmsfs.fs import daemon, daemonlog
    from kmsfs.fs.entries import KmsfsOps
    from tests.integration.fs_helpers import SoftDeriver

    calls: collections.Counter[str] = collections.Counter()
    seconds: collections.Counter[str] = collections.Counter()

    def timed(name: str, handler: Any) -> Any:
        async def wrapper(self: Any, *args: Any) -> Any:
            started = time.perf_counter()
            try:
                return await handler(self, *args)
            finally:
                calls[name] += 1
                seconds[name] += time.perf_counter() - started

        return wrapper

    for name in dir(pyfuse3.Operations):
        handler = getattr(KmsfsOps, name, None)
        if not name.startswith("_") and inspect.iscoroutinefunction(handler):
            setattr(KmsfsOps, name, timed(name, handler))

    profiler = cProfile.Profile() if top else None
    cpu = [time.process_time()]

    def dump(*_: Any) -> None:
        phase: dict[str, Any] = {
            "daemon_cpu_s": time.process_time() - cpu[0],
            "handlers": {n: {"calls": calls[n], "total_ms": seconds[n] * 1e3} for n in calls},
        }
        if profiler is not None:
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
            phase["cprofile"] = text.getvalue()
            profiler.clear()
            profiler.enable()
        with report.open("a") as f:
            f.write(json.dumps(phase) + "\n")
        calls.clear()
        seconds.clear()
        cpu[0] = time.process_time()

    signal.signal(signal.SIGUSR1, dump)
    daemonlog.setup_logging(foreground=True)
    if profiler is not None:
        profiler.enable()
    daemon.serve(cipherdir, mountpoint, SoftDeriver(), daemon.mount_options([]),
                 on_ready=lambda: None)


# --- the workload (parent process) ------------------------------------------------------
def _collect(proc: subprocess.Popen[bytes], report: Path, count: int) -> dict[str, Any]:
    """Have the daemon write its figures so far (the *count*-th line of *report*)."""
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 30
    while True:
        lines = report.read_text().splitlines() if report.exists() else []
        if len(lines) >= count:
            return dict(json.loads(lines[count - 1]))
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the profiled daemon did not report")
        time.sleep(0.02)


def run(work: Path, files: int, top: int, only: str | None) -> list[dict[str, Any]]:
    import bench

    from tests.integration.fs_helpers import make_volume

    tarball = work / "tree.tar"
    bench.make_tarball(tarball, files)
    cipherdir, mp, report = make_volume(work / "kc"), work / "km", work / "report.jsonl"
    mp.mkdir()
    args = [sys.executable, __file__, "--serve", str(cipherdir), str(mp), str(report),
            "--cprofile", str(top)]
    with open(work / "kmsfs.log", "ab") as log:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log)
    steps = dict(bench.steps(tarball, size_mb=512, fio_s=8))
    chosen = [n for n in steps if n.startswith(tuple(only.split(",")))] if only else PHASES
    phases = []
    try:
        bench.wait_mounted(mp, proc)
        lines = 1
        _collect(proc, report, lines)  # start counting from here
        for name in chosen:
            if name in bench.COLD:
                bench.drop_caches()
            wall = steps[name](mp)
            lines += 1
            phases.append({"phase": name.removesuffix(" s"), "wall_s": wall,
                           **_collect(proc, report, lines)})
    finally:
        bench.unmount(mp)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    return phases


def render(phases: list[dict[str, Any]]) -> str:
    out = []
    for p in phases:
        handlers = p["handlers"]
        requests = sum(h["calls"] for h in handlers.values())
        inside = sum(h["total_ms"] for h in handlers.values())
        out.append(f"== {p['phase']}: {p['wall_s']:.2f} s, {requests} requests, daemon CPU "
                   f"{p['daemon_cpu_s']:.2f} s (in handlers {inside / 1e3:.2f} s)")
        out.append(f"  {'handler':<12} {'calls':>7} {'mean us':>9} {'total ms':>9}")
        for name, h in sorted(handlers.items(), key=lambda kv: -kv[1]["total_ms"]):
            mean = h["total_ms"] * 1e3 / h["calls"]
            out.append(f"  {name:<12} {h['calls']:>7} {mean:>9.1f} {h['total_ms']:>9.1f}")
        if "cprofile" in p:
            out.append(p["cprofile"].rstrip())
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Time every kmsfs request handler inside the serving daemon (stand-in "
        "deriver), phase by phase: tar -x, ls -lR, read back, rm -rf.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to make the volume (default: a temp dir on /tmp); "
                        "/dev/shm leaves the disk out")
    parser.add_argument("--files", type=int, default=5000,
                        help="files in the tarball (default 5000, as bench.py)")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="also print each phase's N functions with the most own time")
    parser.add_argument("--only", default=None,
                        help="comma-separated prefixes of bench.py's steps to run instead, in "
                        "its order, e.g. 'fio' or 'dd,rm' (a step may need the one before it: "
                        "dd read reads what dd write wrote)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--serve", nargs=3, metavar=("CIPHERDIR", "MOUNTPOINT", "REPORT"),
                        help=argparse.SUPPRESS)  # the daemon side, started by this script
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), Path(args.serve[1]), Path(args.serve[2]), args.cprofile)
        return 0
    if os.geteuid() != 0:
        print("profile_fs: run as root (it drops the page cache between phases)",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kmsfs-profile-", dir=args.workdir))
    try:
        phases = run(work, args.files, args.cprofile, args.only)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(phases, indent=2) if args.json else render(phases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
