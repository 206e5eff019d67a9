#!/usr/bin/env python3
"""Benchmark kmsfs against gocryptfs and a plain directory with one workload, in one run.

Usage (as root, from the repo, with the venv):  .venv/bin/python tools/bench.py [--size-mb 512]

Workload: dd write (conv=fsync), drop caches, dd read; extract a tarball of ~5000 small files;
ls -lR; read every file back; rm -rf; fio 4k randread and randwrite. Caches are dropped before
every step that reads. All three systems are mounted at once and each step runs on all three
back to back (the order rotates every round), so background writeback and disk noise hit them
alike; with ``--rounds N`` each figure is the median of N rounds. The kmsfs daemon's RSS is
sampled throughout.

kmsfs runs the product path by default: a throwaway key store under the work directory
(``kmsfs-admin init`` with one SoftHSM2 token, two operators, a Trust signed and sealed, a
Domain), ``kmsfs init`` and ``kmsfs mount --foreground``, so every per-file key derivation is an
HSM call. ``--deriver stub`` mounts with the TEST stand-in instead (software HMAC,
tests/integration/fs_mount_stub.py), which isolates the data path from the HSM.

``--low-latency`` bounds CPU wake-up latency to 0 us for the whole run (all three systems): on a
VM whose idle vCPUs halt, waking the client after each small request can cost more than serving
it, for kmsfs and gocryptfs alike, and this takes that machine cost out of the comparison.

``--warm-memory GIB`` takes out another machine cost. On a VM that reports free pages to its
host (virtio-balloon free page reporting: ``/sys/module/page_reporting``), every free block of
2 MiB or more (order 9, this VM's setting) is handed back to the host some seconds after it
becomes free, and the next write into it faults it in from the host again. Measured on this
project's VM: 3 GiB written into tmpfs ran at 330-900 MB/s into such pages and at 1.6-2.4 GB/s
into pages written before; a kmsfs ``dd`` that followed gocryptfs's ran at 78-190 MB/s, and at
490-550 MB/s with the same files in place and warm pages. Which system meets cold pages depends
on what the others freed just before it, so one figure moved by a factor of 3 from one round to
the next. The option turns reporting off for the run (its order set above the largest free
block the kernel keeps, or to that block where the kernel refuses more; put back afterwards,
also on SIGTERM), then writes GIB GiB of memory once and frees it. The kernel hands out the
pages freed last first, so the run writes into those; blocks reported before the run stay cold
on the free lists, so a run that needs more than GIB GiB meets them again. It prints how much
was handed back to the host during the run, where the kernel counts it (``reported_kib``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
sys.path.insert(0, str(REPO))

SYSTEMS = ("plain", "gocryptfs", "kmsfs")

#: A VM guest's free page reporting (module page_reporting, root-writable): free blocks of
#: 2**page_reporting_order pages or more are handed back to the host, some 2 s after they
#: become free; reported_kib (on some kernels) counts what was handed back.
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")
#: A column of free-block counts per order, 0 to the largest the allocator keeps.
BUDDYINFO = Path("/proc/buddyinfo")


def largest_block_order(buddyinfo: Path = BUDDYINFO) -> int:
    """The largest order of free block the kernel's allocator keeps (10 on x86-64; more on
    arm64 with 16 or 64 KiB pages), read off /proc/buddyinfo rather than assumed."""
    fields = buddyinfo.read_text().splitlines()[0].split()  # Node 0, zone DMA <counts...>
    return len(fields) - 4 - 1


def write_knob(knob: Path, value: str) -> None:
    """Write a kernel parameter (a module-level function, so tests can make it refuse)."""
    knob.write_text(value)


class WarmMemory:
    """What ``--warm-memory`` did: the line printed before the run, and after it how much
    memory the guest handed back to the host meanwhile (where the kernel counts it)."""

    def __init__(self, params: Path) -> None:
        self.line = ""
        self._reported = params / "reported_kib"
        self._reported_before = self._read_reported()

    def _read_reported(self) -> int | None:
        try:
            return int(self._reported.read_text())
        except (OSError, ValueError):
            return None

    def after(self) -> str | None:
        now = self._read_reported()
        if now is None or self._reported_before is None:
            return None
        mib = (now - self._reported_before) // 1024
        return f"memory handed back to the host during the run: {mib} MiB"


@contextlib.contextmanager
def warm_memory(
    gib: float, params: Path = PAGE_REPORTING, buddyinfo: Path = BUDDYINFO
) -> Iterator[WarmMemory]:
    """Turn the VM's free page reporting off for the run (its order above the largest free
    block, or the largest block where the kernel refuses that), and write *gib* GiB of memory
    once, so that the pages the run writes into are, as far as can be, pages the host has
    backed (see the module docstring). The knob is put back on the way out, whatever happens;
    where the kernel will not take its old value back, a warning says what to write."""
    knob = params / "page_reporting_order"
    before = knob.read_text().strip() if knob.exists() else None
    done = WarmMemory(params)
    changed = False
    try:
        if before is None:
            how = "no free page reporting on this machine"
        elif not before.isdigit():  # -1: no reporting device has registered
            how = f"no free page reporting device ({knob} is {before})"
        else:
            largest = largest_block_order(buddyinfo)
            for order in (largest + 1, largest):
                try:
                    write_knob(knob, str(order))
                except OSError:
                    continue
                changed = True
                break
            now = knob.read_text().strip()
            if changed and now == str(largest + 1):
                how = f"free page reporting off ({knob}: {before} -> {now})"
            elif changed:
                how = (f"free page reporting reduced to free blocks of order {now} ({knob}: "
                       f"{before} -> {now}; the kernel refused {largest + 1})")
            else:
                how = f"free page reporting left on (the kernel refused a new {knob.name})"
        touch_memory(int(gib * (1 << 30)))
        done.line = f"{gib:g} GiB written before the run; {how}"
        yield done
    finally:
        if changed:
            try:
                write_knob(knob, before)  # type: ignore[arg-type]
            except OSError as exc:
                print(f"WARNING: could not put {knob} back to {before} ({exc.strerror}); "
                      f"write it by hand: echo {before} > {knob}", file=sys.stderr)


def touch_memory(size: int) -> None:
    """Write every page of *size* bytes (rounded up to MiB) of fresh private memory, then give
    it back: the kernel keeps those pages, now backed by the host, on its free lists."""
    chunk = bytes(1 << 20)
    chunks = -(-size // len(chunk))
    if not chunks:
        return
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    with mmap.mmap(-1, chunks * len(chunk), flags=flags) as area:
        for _ in range(chunks):
            area.write(chunk)


def stolen_seconds(proc_stat: Path = Path("/proc/stat")) -> float:
    """CPU time the hypervisor gave to others while this VM's CPUs wanted to run (steal, the
    eighth figure of /proc/stat's cpu line), summed over all CPUs; 0 where there is none."""
    fields = proc_stat.read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


def available_gib() -> float:
    """MemAvailable, in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / (1 << 20)
    return 0.0


def sh(cmd: str, cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, cwd=cwd, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def make_tarball(path: Path, count: int = 5000) -> None:
    rng = random.Random(42)
    src = Path(tempfile.mkdtemp(prefix="bench-src-"))
    sizes = [0, 100, 1500, 4096, 9000, 30_000]
    for i in range(count):
        d = src / f"dir{i % 50:02d}" / f"sub{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:05d}.txt").write_bytes(rng.randbytes(rng.choice(sizes)))
    with tarfile.open(path, "w") as tar:
        tar.add(src, arcname="tree")
    shutil.rmtree(src)


def fio(path: Path, rw: str, runtime: int) -> float:
    out = subprocess.run(
        ["fio", "--name=bench", f"--filename={path}", "--size=64M", "--bs=4k", f"--rw={rw}",
         f"--runtime={runtime}", "--time_based", "--ioengine=psync", "--invalidate=1",
         "--output-format=json"], check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["read" if rw == "randread" else "write"]["iops"])


Step = tuple[str, Callable[[Path], float]]


def steps(tarball: Path, size_mb: int, fio_s: int) -> list[Step]:
    """The workload, in order; each step returns its figure (and may depend on the last)."""

    def dd_write(mp: Path) -> float:
        return size_mb / sh(f"dd if=/dev/zero of={mp}/big bs=1M count={size_mb} conv=fsync "
                            "status=none")

    def dd_read(mp: Path) -> float:
        t = sh(f"dd if={mp}/big of=/dev/null bs=1M status=none")
        os.unlink(mp / "big")
        return size_mb / t

    def randwrite(mp: Path) -> float:
        iops = fio(mp / "fio", "randwrite", fio_s)
        os.unlink(mp / "fio")
        return iops

    return [
        ("dd write MB/s", dd_write),
        ("dd read MB/s", dd_read),
        ("tar extract s", lambda mp: sh(f"tar -xf {tarball} -C {mp}")),
        ("ls -lR s", lambda mp: sh(f"ls -lR {mp}/tree > /dev/null")),
        ("read back s", lambda mp: sh(f"find {mp}/tree -type f -exec cat {{}} + > /dev/null")),
        ("rm -rf s", lambda mp: sh(f"rm -rf {mp}/tree")),
        ("fio randread IOPS", lambda mp: fio(mp / "fio", "randread", fio_s)),
        ("fio randwrite IOPS", randwrite),
    ]


#: Steps that start by dropping caches, so they read from the backing store.
COLD = {"dd read MB/s", "ls -lR s", "read back s"}


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.max_kb, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.max_kb = max(self.max_kb, int(line.split()[1]))
            except OSError:
                return
            time.sleep(0.1)


def wait_mounted(mp: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mp):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"kmsfs did not mount on {mp}")
        time.sleep(0.05)


def kmsfs_hsm(work: Path, options: str = "") -> tuple[subprocess.Popen[bytes], Path]:
    """The product path: a throwaway store and ceremony, kmsfs init, kmsfs mount."""
    # The throwaway Domain's rollback record stays in the work directory, not the machine's.
    env = dict(os.environ, KMSFS_STORE=str(work / "store"), KMSFS_STATE_DIR=str(work / "state"),
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")

    def admin(*args: str | Path) -> str:
        return subprocess.run([str(BIN / "kmsfs-admin"), *map(str, args)], env=env, check=True,
                              capture_output=True, text=True).stdout

    admin("init", "--hsms", "1")
    for name in ("alice", "bob"):
        pin = work / f"{name}.pin"
        pin.write_text(os.urandom(9).hex() + "\n")
        pin.chmod(0o600)
        admin("operator", "create", name, "--pin-file", pin)
    trust = admin("trust", "propose", "--hsm", "hsm1", "--operator", "alice", "--operator",
                  "bob", "--quorum", "1").strip().splitlines()[-1]
    admin("trust", "sign", trust, "--as", "alice", "--pin-file", work / "alice.pin")
    admin("trust", "seal", trust)
    admin("domain", "create", "bench", "--trust", trust)
    closed = work / "closed"  # as root, kmsfs serves only ciphertext others cannot reach
    closed.mkdir(mode=0o700)
    kc, km = closed / "kc", work / "km"
    subprocess.run([str(BIN / "kmsfs"), "init", str(kc), "--domain", "bench"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    km.mkdir()
    log = open(work / "kmsfs.log", "ab")  # noqa: SIM115 (kept open for the daemon's lifetime)
    extra = ["-o", options] if options else []
    proc = subprocess.Popen([str(BIN / "kmsfs"), "mount", "--foreground", str(kc), str(km), *extra],
                            env=env, stdout=log, stderr=log)
    log.close()
    wait_mounted(km, proc)
    return proc, km


def kmsfs_stub(work: Path, options: str = "") -> tuple[subprocess.Popen[bytes], Path]:
    """The TEST stand-in KeyDeriver (software HMAC): the data path without the HSM."""
    from tests.integration.fs_helpers import STUB, make_volume

    kc, km = make_volume(work / "kc"), work / "km"
    km.mkdir()
    log = open(work / "kmsfs.log", "ab")  # noqa: SIM115 (kept open for the daemon's lifetime)
    extra = ["-o", options] if options else []
    proc = subprocess.Popen([sys.executable, str(STUB), str(kc), str(km), *extra],
                            stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    wait_mounted(km, proc)
    return proc, km


def unmount(mp: Path) -> None:
    if os.path.ismount(mp):
        subprocess.run(["fusermount3", "-u", str(mp)], check=False)


@contextlib.contextmanager
def fresh_ext4(size_gb: int, where: Path | None) -> Iterator[Path]:
    """A new ext4 file system in a sparse loop image, mounted for the run, then removed.

    Why: on a long-used disk the figures depend on its history. An ext4 without a journal (this
    machine's root file system is one) will not reuse an inode freed in the last minutes and
    scans past each such one, so creating files after many ``rm -rf`` rounds costs up to ten
    times more, and more for whichever system runs later.
    """
    parent = Path(tempfile.mkdtemp(prefix="kmsfs-bench-ext4-", dir=where or "/var/tmp"))
    image, mountpoint = parent / "ext4.img", parent / "mnt"
    mountpoint.mkdir()
    try:
        with open(image, "wb") as f:
            f.truncate(size_gb << 30)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
        try:
            yield mountpoint
        finally:
            subprocess.run(["umount", str(mountpoint)], check=False)
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def kmsfs_better(key: str, kmsfs: float, gocryptfs: float) -> bool:
    """Whether kmsfs did better on figure *key*: seconds are better lower, rates higher."""
    return kmsfs < gocryptfs if key.endswith(" s") else kmsfs > gocryptfs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=512, help="dd file size (default 512)")
    ap.add_argument("--fio-seconds", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1, help="repeat and report medians")
    ap.add_argument("--deriver", choices=("hsm", "stub"), default="hsm",
                    help="hsm: the product mount through SoftHSM (default); stub: test stand-in")
    ap.add_argument("--kmsfs-options", default="", metavar="OPTS",
                    help="mount options for kmsfs, e.g. writeback_cache (default: none)")
    ap.add_argument("--only", default=None,
                    help="comma-separated figure prefixes to run, e.g. 'tar,rm' (default: all)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to put ciphertext dirs (default: a temp dir on /tmp); "
                         "/dev/shm measures the file systems alone, without the disk's noise")
    ap.add_argument("--ext4-image", type=int, default=None, metavar="GB",
                    help="run on a fresh ext4 (with its journal, mkfs defaults) in a sparse "
                         "loop image of GB gigabytes, made in --workdir or /var/tmp and removed "
                         "afterwards (root): a disk whose state no earlier run has touched")
    ap.add_argument("--low-latency", action="store_true",
                    help="hold a CPU wake-up latency bound of 0 us (/dev/cpu_dma_latency) for "
                         "the whole run, for all three systems alike: idle CPUs poll instead "
                         "of halting, which leaves the cost of waking them out (root)")
    ap.add_argument("--warm-memory", type=float, default=None, metavar="GIB",
                    help="turn the VM's free page reporting off for the run and write GIB "
                         "GiB of memory first, for all three systems alike, so that no system "
                         "writes into pages the host must fault in again (root; 4 covers the "
                         "default workload's files and page cache)")
    args = ap.parse_args()
    for stop in (signal.SIGTERM, signal.SIGHUP):  # unwind: unmount, put the VM knob back
        signal.signal(stop, lambda signum, _frame: sys.exit(128 + signum))
    bound = None
    if args.low_latency:  # the same request as kmsfs -o low_latency, held for the whole run
        from kmsfs.fs.latency import CpuLatencyRequest

        bound = CpuLatencyRequest()
        bound.hold()
    with contextlib.ExitStack() as stack:
        if args.ext4_image is not None:
            args.workdir = stack.enter_context(fresh_ext4(args.ext4_image, args.workdir))
        args.memory = "the machine's default (pages the host reclaims are faulted in again)"
        args.warm = None
        if args.warm_memory:
            if args.warm_memory > 0.8 * available_gib():
                ap.error(f"--warm-memory {args.warm_memory:g}: only {available_gib():.1f} GiB "
                         "available; the rest of the run needs memory too")
            print(f"writing {args.warm_memory:g} GiB of memory...", flush=True)
            args.warm = stack.enter_context(warm_memory(args.warm_memory))
            args.memory = args.warm.line
        return run(args, bound)


def run(args: argparse.Namespace, bound: Any) -> int:
    work = Path(tempfile.mkdtemp(prefix="kmsfs-bench-", dir=args.workdir))
    tarball = work / "tree.tar"
    make_tarball(tarball)
    results: dict[str, dict[str, list[float]]] = {s: {} for s in SYSTEMS}
    mounts: dict[str, Path] = {}
    kproc: subprocess.Popen[bytes] | None = None
    sampler: RssSampler | None = None
    how = "SoftHSM2 (product path)" if args.deriver == "hsm" else "TEST stand-in (no HSM)"
    print(f"kmsfs key derivation: {how}; kmsfs mount options: {args.kmsfs_options or '(none)'}")
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(work)], capture_output=True,
                            text=True).stdout.strip() or "?"
    where = f"a fresh {args.ext4_image} GB ext4 image" if args.ext4_image else fstype
    print(f"backing directories: {work} ({where}; --workdir /dev/shm leaves the disk out)")
    print("CPU wake-up latency: " + ("bound to 0 us for every system (--low-latency)"
                                     if bound is not None else "the machine's default"))
    print(f"memory: {args.memory}")
    if "low_latency" in args.kmsfs_options and bound is None:
        print("NOTE: kmsfs alone bounds CPU wake-up latency while busy (-o low_latency): "
              "not a like-for-like comparison; add --low-latency for one")
    try:
        stolen, started = stolen_seconds(), time.monotonic()
        mounts["plain"] = work / "plain"
        mounts["plain"].mkdir()
        gc, gm, pw = work / "gc", work / "gm", work / "pw"
        gc.mkdir()
        gm.mkdir()
        pw.write_text("benchpassword\n")
        subprocess.run(["gocryptfs", "-q", "-init", "-scryptn", "10", "-passfile", pw, gc],
                       check=True)
        subprocess.run(["gocryptfs", "-q", "-passfile", pw, gc, gm], check=True)
        mounts["gocryptfs"] = gm
        start_kmsfs = kmsfs_hsm if args.deriver == "hsm" else kmsfs_stub
        kproc, mounts["kmsfs"] = start_kmsfs(work, args.kmsfs_options)
        sampler = RssSampler(kproc.pid)
        sampler.start()
        chosen = [s for s in steps(tarball, args.size_mb, args.fio_seconds)
                  if not args.only or s[0].startswith(tuple(args.only.split(",")))]
        for rnd in range(args.rounds):
            order = SYSTEMS[rnd % 3:] + SYSTEMS[: rnd % 3]
            for key, step in chosen:
                for system in order:
                    if key in COLD:
                        drop_caches()
                    results[system].setdefault(key, []).append(step(mounts[system]))
    finally:
        if sampler is not None:
            sampler.stop.set()
        for system in ("gocryptfs", "kmsfs"):
            if system in mounts:
                unmount(mounts[system])
        if kproc is not None:
            try:
                kproc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                kproc.kill()
        shutil.rmtree(work, ignore_errors=True)
        if bound is not None:
            bound.close()  # the kernel drops the request with its file

    stolen, wall = stolen_seconds() - stolen, time.monotonic() - started
    rss_mb = sampler.max_kb / 1024 if sampler is not None else 0.0
    spread = args.rounds > 1
    print(f"{'workload':22}" + "".join(f"{s:>12}" for s in SYSTEMS) + f"{'kmsfs/gcfs':>12}"
          + (f"{'round ratios':>14}{'kmsfs won':>11}" if spread else ""))
    for key in results["plain"]:
        row = [statistics.median(results[s][key]) for s in SYSTEMS]
        ratio = row[2] / row[1] if row[1] else float("nan")
        line = f"{key:22}" + "".join(f"{v:12.2f}" for v in row) + f"{ratio:12.2f}"
        if spread:
            pairs = list(zip(results["kmsfs"][key], results["gocryptfs"][key], strict=True))
            ratios = [k / g for k, g in pairs if g]
            won = sum(kmsfs_better(key, k, g) for k, g in pairs)
            line += f"{f'{min(ratios):.2f}-{max(ratios):.2f}':>14}{f'{won}/{len(pairs)}':>11}"
        print(line)
    print("(MB/s and IOPS: higher is better, ratio > 1 means kmsfs is faster; "
          "seconds: lower is better, ratio < 1 means kmsfs is faster)")
    if spread:
        print(f"(medians of {args.rounds} rounds; system order rotated every round; round "
              "ratios: the lowest and highest kmsfs/gocryptfs of one round; kmsfs won: in how "
              "many rounds kmsfs was faster)")
    print(f"kmsfs daemon peak RSS: {rss_mb:.1f} MB")
    print(f"CPU time the host took from this VM during the run: {stolen:.1f} s in {wall:.0f} s "
          f"(steal, all CPUs: a busy host slows every system, unevenly)")
    handed_back = args.warm.after() if args.warm is not None else None
    if handed_back is not None:
        print(handed_back)
    return 0


if __name__ == "__main__":
    sys.exit(main())
