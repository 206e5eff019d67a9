#!/usr/bin/env python3
"""Bounded soak test of a kmsfs mount: random mixed operations, checked against a model.

Run on demand (not in CI), as root with /dev/fuse:

    .venv/bin/python tools/soak.py --minutes 10 [--procs 4] [--seed 1]

``--procs`` processes each run a seeded stream of operations (write, pwrite, append, truncate,
mkdir, rmdir, unlink, rename, link, symlink, chmod, read; the generator of
tests/integration/test_fs_model.py) in their own subdirectory, applying every operation to a
plain directory (the model) and to the mount and comparing the outcome (value or errno). At the
end the trees are compared, the volume is remounted and compared again, and fsck's
``check_tree`` must find it clean. Prints ops/s by kind, errors, the daemon's RSS and the
verdict; exit status 0 only if the model check passed. The daemon is the test mount stub with
the software stand-in deriver (the HSM path is exercised by tests/integration/test_faults_hsm).
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kmsfs.fs.fsck import check_tree  # noqa: E402
from tests.integration.fs_helpers import Mount, SoftDeriver, make_volume  # noqa: E402
from tests.integration.test_fs_model import OpGen, apply  # noqa: E402

MAX_DEPTH = 12
"""Renames nest directories ever deeper; past about 130 levels of long names the ciphertext
path exceeds PATH_MAX and kmsfs answers ENAMETOOLONG where a plain directory does not (a known
limit of the path-based backend). The soak keeps trees shallower than that."""


def _depth(root: Path) -> int:
    deepest = 0
    for dirpath, _dirs, _files in os.walk(root):
        deepest = max(deepest, dirpath.count(os.sep) - str(root).count(os.sep))
    return deepest


def prune(m: Path, p: Path, count: collections.Counter[str]) -> None:
    """Remove every top-level directory of the stream from both trees (counted as ``prune``)."""
    for entry in sorted(os.listdir(p)):
        if (p / entry).is_dir() and not (p / entry).is_symlink():
            shutil.rmtree(p / entry)
            shutil.rmtree(m / entry)
            count["prune"] += 1


def worker(args: tuple[int, int, str, str, float]) -> dict:
    """One op stream on MOUNT/p<i> and PLAIN/p<i> until the deadline; returns its figures."""
    index, seed, mount_root, plain_root, deadline = args
    gen = OpGen(seed * 1000 + index)
    m, p = Path(mount_root) / f"p{index}", Path(plain_root) / f"p{index}"
    m.mkdir()
    p.mkdir()
    count: collections.Counter[str] = collections.Counter()
    seconds: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    mismatches: list[str] = []
    n = 0
    while time.monotonic() < deadline:
        if n % 200 == 0 and _depth(p) > MAX_DEPTH:
            prune(m, p, count)
        desc, run = gen.op()
        kind = desc.split()[0]
        want = apply(run, p)
        t0 = time.perf_counter()
        got = apply(run, m)
        seconds[kind] += time.perf_counter() - t0
        count[kind] += 1
        if got[0] == "err":
            errors[str(got[1])] += 1
        if got != want:
            mismatches.append(f"p{index} op {n}: {desc}: mount {got[:1]}{got[1:]!r:.80} "
                              f"plain {want[:1]}{want[1:]!r:.80}")
            if len(mismatches) > 20:
                break
        n += 1
    return {"count": count, "seconds": seconds, "errors": errors, "mismatches": mismatches}


def snapshot(top: Path) -> dict[str, tuple]:
    """Like test_fs_model.snapshot, but through directory fds: renames nest directories deeper
    than PATH_MAX over a long run, and full paths would fail with ENAMETOOLONG."""
    out: dict[str, tuple] = {}
    for dirpath, dirs, files, dfd in os.fwalk(top):
        rel_dir = os.path.relpath(dirpath, top)
        for name in dirs + files:
            rel = os.path.join(rel_dir, name)
            st = os.lstat(name, dir_fd=dfd)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(name, dir_fd=dfd))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd)
                with os.fdopen(fd, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_nlink, st.st_size,
                                f.read())
    return out


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def soak(minutes: float, procs: int, seed: int, workdir: Path) -> bool:
    cipher = make_volume(workdir / "cipher")
    plain = workdir / "plain"
    plain.mkdir()
    mount = Mount(cipher, workdir / "mnt", workdir / "daemon.log").start()
    rss: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            if mount.proc is not None:
                rss.append(rss_kib(mount.proc.pid))
            stop.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    deadline = started + minutes * 60
    try:
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(procs) as pool:
            results = pool.map(worker, [(i, seed, str(mount.mountpoint), str(plain), deadline)
                                        for i in range(procs)])
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
        count: collections.Counter[str] = collections.Counter()
        seconds: collections.Counter[str] = collections.Counter()
        errors: collections.Counter[str] = collections.Counter()
        mismatches: list[str] = []
        for r in results:
            count.update(r["count"])
            seconds.update(r["seconds"])
            errors.update(r["errors"])
            mismatches += r["mismatches"]
        want = snapshot(plain)
        same_live = snapshot(mount.mountpoint) == want
        mount.stop()
        mount.start()
        same_after_remount = snapshot(mount.mountpoint) == want
        mount.stop()
        report = check_tree(cipher, SoftDeriver())
        log = mount.log()
        integrity_lines = sum("integrity" in ln for ln in log.splitlines())
        tracebacks = log.count("Traceback")

        total = sum(count.values())
        print(f"soak: {minutes:g} min, {procs} processes, seed {seed}: {total} ops in "
              f"{elapsed:.0f} s = {total / elapsed:.0f} ops/s")
        print(f"{'kind':10} {'ops':>8} {'ops/s':>8} {'mean ms':>8}")
        for kind in sorted(count):
            print(f"{kind:10} {count[kind]:8} {count[kind] / elapsed:8.1f} "
                  f"{1000 * seconds[kind] / count[kind]:8.3f}")
        expected_errno = ", ".join(f"{k} {v}" for k, v in errors.most_common()) or "none"
        print(f"errors (the same on the model): {expected_errno}")
        print(f"EIO: {errors.get('EIO', 0)}, mismatches with the model: {len(mismatches)}, "
              f"integrity log lines: {integrity_lines}, tracebacks: {tracebacks}")
        for line in mismatches[:10]:
            print(f"  {line}")
        if rss:
            # At each quarter too: caches that fill level off, a leak keeps growing.
            quarters = " -> ".join(
                f"{rss[min(len(rss) - 1, len(rss) * q // 4)] / 1024:.1f}" for q in range(5)
            )
            print(f"daemon RSS: start {rss[0] / 1024:.1f} MiB, end {rss[-1] / 1024:.1f} MiB, "
                  f"max {max(rss) / 1024:.1f} MiB ({len(rss)} samples; by quarter of the run: "
                  f"{quarters} MiB)")
        files = report.checked
        print(f"fsck: {'clean' if report.clean else f'{len(report.problems)} problems'} "
              f"({files['files']} files, {files['directories']} directories, "
              f"{files['blocks']} blocks)")
        ok = (not mismatches and same_live and same_after_remount and report.clean
              and not errors.get("EIO") and not integrity_lines and not tracebacks)
        print(f"model check: {'PASS' if ok else 'FAIL'} (tree equal live: {same_live}, "
              f"after remount: {same_after_remount})")
        return ok
    finally:
        stop.set()
        mount.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kmsfs-soak-"))
    try:
        return 0 if soak(args.minutes, args.procs, args.seed, workdir) else 1
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
