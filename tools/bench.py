#!/usr/bin/env python3
"""Benchmark kmsfs against gocryptfs and a plain directory with one workload, in one run.

Usage (as root, from the repo, with the venv):  .venv/bin/python tools/bench.py [--size-mb 512]

Workload per system: dd write (conv=fsync), drop caches, dd read; extract a tarball of ~5000
small files; ls -lR; read every file back; rm -rf; fio 4k randread and randwrite. Caches are
dropped before every step that reads. The kmsfs daemon's RSS is sampled throughout.

NOTE: until the KMS wiring is exercised here, kmsfs is mounted with the TEST stand-in
KeyDeriver (tests/integration/fs_mount_stub.py: HMAC-SHA256 in software, no HSM). The data
path is the product's; only the ~20 us per-file key derivation differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUB = REPO / "tests" / "integration" / "fs_mount_stub.py"
sys.path.insert(0, str(REPO))


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
    for i in range(count):
        d = src / f"dir{i % 50:02d}" / f"sub{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:05d}.txt").write_bytes(rng.randbytes(rng.choice([0, 100, 1500, 4096,
                                                                        9000, 30_000])))
    with tarfile.open(path, "w") as tar:
        tar.add(src, arcname="tree")
    shutil.rmtree(src)


def fio(path: Path, rw: str, runtime: int) -> float:
    out = subprocess.run(
        ["fio", "--name=bench", f"--filename={path}", "--size=64M", "--bs=4k", f"--rw={rw}",
         f"--runtime={runtime}", "--time_based", "--ioengine=psync", "--invalidate=1",
         "--output-format=json"], check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return job["read" if rw == "randread" else "write"]["iops"]


def workload(mp: Path, tarball: Path, size_mb: int, fio_s: int) -> dict[str, float]:
    r: dict[str, float] = {}
    t = sh(f"dd if=/dev/zero of={mp}/big bs=1M count={size_mb} conv=fsync status=none")
    r["dd write MB/s"] = size_mb / t
    drop_caches()
    t = sh(f"dd if={mp}/big of=/dev/null bs=1M status=none")
    r["dd read MB/s"] = size_mb / t
    os.unlink(mp / "big")
    r["tar extract s"] = sh(f"tar -xf {tarball} -C {mp}")
    drop_caches()
    r["ls -lR s"] = sh(f"ls -lR {mp}/tree > /dev/null")
    drop_caches()
    r["read back s"] = sh(f"find {mp}/tree -type f -exec cat {{}} + > /dev/null")
    r["rm -rf s"] = sh(f"rm -rf {mp}/tree")
    r["fio randread IOPS"] = fio(mp / "fio", "randread", fio_s)
    r["fio randwrite IOPS"] = fio(mp / "fio", "randwrite", fio_s)
    os.unlink(mp / "fio")
    return r


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--fio-seconds", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where to put ciphertext dirs (default: a temp dir on /tmp)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kmsfs-bench-", dir=args.workdir))
    tarball = work / "tree.tar"
    make_tarball(tarball)
    results: dict[str, dict[str, float]] = {}
    rss_mb = 0.0
    print("NOTE: kmsfs runs with the TEST stand-in KeyDeriver (software HMAC), not an HSM.")
    try:
        plain = work / "plain"
        plain.mkdir()
        results["plain"] = workload(plain, tarball, args.size_mb, args.fio_seconds)

        gc, gm, pw = work / "gc", work / "gm", work / "pw"
        gc.mkdir()
        gm.mkdir()
        pw.write_text("benchpassword\n")
        subprocess.run(["gocryptfs", "-q", "-init", "-scryptn", "10", "-passfile", pw, gc],
                       check=True)
        subprocess.run(["gocryptfs", "-q", "-passfile", pw, gc, gm], check=True)
        try:
            results["gocryptfs"] = workload(gm, tarball, args.size_mb, args.fio_seconds)
        finally:
            subprocess.run(["fusermount3", "-u", gm], check=False)

        from tests.integration.fs_helpers import Mount, make_volume

        kc, km = make_volume(work / "kc"), work / "km"
        mount = Mount(kc, km, work / "kmsfs.log").start()
        assert mount.proc is not None
        sampler = RssSampler(mount.proc.pid)
        sampler.start()
        try:
            results["kmsfs"] = workload(km, tarball, args.size_mb, args.fio_seconds)
        finally:
            sampler.stop.set()
            mount.stop()
        rss_mb = sampler.max_kb / 1024
    finally:
        shutil.rmtree(work, ignore_errors=True)

    systems = ["plain", "gocryptfs", "kmsfs"]
    print(f"{'workload':22}" + "".join(f"{s:>12}" for s in systems) + f"{'kmsfs/gcfs':>12}")
    for key in results["plain"]:
        row = [results[s][key] for s in systems]
        ratio = row[2] / row[1] if row[1] else float("nan")
        print(f"{key:22}" + "".join(f"{v:12.2f}" for v in row) + f"{ratio:12.2f}")
    print("(MB/s and IOPS: higher is better, ratio > 1 means kmsfs is faster; "
          "seconds: lower is better, ratio < 1 means kmsfs is faster)")
    print(f"kmsfs daemon peak RSS: {rss_mb:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
