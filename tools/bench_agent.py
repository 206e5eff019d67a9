#!/usr/bin/env python3
"""Benchmark key derivation through kmsfs-hsmd against in-process PKCS#11, in one run.

Usage (as root, from the repo, with the venv):  .venv/bin/python tools/bench_agent.py

Sets up a throwaway store (one SoftHSM2 token, two operators, a sealed Trust, Domain "bench"),
starts ``kmsfs-hsmd`` on a Unix socket, and measures:

1. derivations per second: in-process PKCS#11 (one thread), through the agent with one client
   sending one info per request, with 8 client processes at once (what 8 mounts opening files
   do), and with batches of 256 infos per request;
2. the latency a mount adds per file open: the same volume mounted in-process and through the
   agent, N files written, the volume remounted (so no key is cached) and the page cache
   dropped, then every file opened and read once; the difference of the mean per-file times is
   the agent's cost per open;
3. 8 mounts through one agent at once, each opening and reading its own N files after a
   remount: aggregate file opens per second.

Nothing is asserted; the figures are printed (and written as JSON with ``--json FILE``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
sys.path.insert(0, str(REPO))

from kmsfs.agent.client import AgentAddress, AgentClient, AgentDeriver  # noqa: E402
from kmsfs.model.bundle import DomainBundle  # noqa: E402
from kmsfs.service import domains  # noqa: E402
from kmsfs.service.context import Context  # noqa: E402

POLICY = '[[client]]\nname = "bench"\nuids = [0]\ndomains = ["*"]\nallow = ["derive"]\n'


def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("KMSFS_STORE", "SOFTHSM2_CONF")}


def admin(store: Path, *args: str | Path) -> str:
    proc = subprocess.run(
        [str(BIN / "kmsfs-admin"), "--store", str(store), *map(str, args)],
        capture_output=True, text=True, check=True, env=env(),
    )
    return proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def make_store(work: Path) -> Path:
    store = work / "store"
    admin(store, "init", "--hsms", "1")
    for name in ("alice", "bob"):
        pin = work / f"{name}.pin"
        pin.write_text(f"pin-of-{name}-0123\n")
        admin(store, "operator", "create", name, "--pin-file", pin)
    trust = admin(store, "trust", "propose", "--hsm", "hsm1", "--operator", "alice",
                  "--operator", "bob", "--quorum", "2")
    for name in ("alice", "bob"):
        admin(store, "trust", "sign", trust, "--as", name, "--pin-file", work / f"{name}.pin")
    admin(store, "trust", "seal", trust)
    admin(store, "domain", "create", "bench", "--trust", trust)
    return store


def start_agent(work: Path, store: Path) -> tuple[subprocess.Popen[bytes], str]:
    (work / "policy.toml").write_text(POLICY)
    sock = work / "hsmd.sock"
    proc = subprocess.Popen(
        [str(BIN / "kmsfs-hsmd"), "--store", str(store), "--policy", str(work / "policy.toml"),
         "--socket", str(sock), "--audit-log", str(work / "audit.log")],
        stdout=subprocess.DEVNULL, stderr=open(work / "hsmd.log", "ab"), env=env(),  # noqa: SIM115
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with AgentClient(AgentAddress.parse(str(sock))) as client:
                client.call("hello", {})
            return proc, str(sock)
        except Exception:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("kmsfs-hsmd did not start: " + (work / "hsmd.log").read_text())


def info(i: int, salt: int = 0) -> bytes:
    return b"kmsfs/v1/file\x00" + salt.to_bytes(4, "big") + i.to_bytes(12, "big")


def rate(fn, seconds: float) -> float:  # type: ignore[no-untyped-def]
    """Calls of ``fn(i)`` per second over about ``seconds``."""
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn(count)
        count += 1
    return count / elapsed


def _client_worker(args: tuple[str, bytes, float, int]) -> int:
    address, bundle, seconds, salt = args
    with AgentDeriver(AgentClient(AgentAddress.parse(address)), bundle).open() as deriver:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            deriver.derive(info(count, salt))
            count += 1
    return count


def derivation_rates(store: Path, address: str, bundle: bytes, seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    with domains.open_keys(Context.at(store), DomainBundle.from_bytes(bundle)) as keys:
        out["in-process PKCS#11, 1 thread"] = rate(lambda i: keys.derive(info(i)), seconds)
    with AgentDeriver(AgentClient(AgentAddress.parse(address)), bundle).open() as deriver:
        out["agent, 1 client, 1 per request"] = rate(lambda i: deriver.derive(info(i)), seconds)
        batch = [info(i, 9) for i in range(256)]
        out["agent, 1 client, batches of 256"] = 256 * rate(
            lambda i: deriver.derive_many(batch), seconds
        )
    with multiprocessing.Pool(8) as pool:
        start = time.perf_counter()
        counts = pool.map(_client_worker, [(address, bundle, seconds, s) for s in range(8)])
        out["agent, 8 client processes, 1 per request"] = sum(counts) / (
            time.perf_counter() - start
        )
    return out


def mount(cipherdir: Path, mountpoint: Path, args: list[str]) -> subprocess.Popen[bytes]:
    mountpoint.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [str(BIN / "kmsfs"), "mount", "--foreground", *args, str(cipherdir), str(mountpoint)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(),
    )
    deadline = time.monotonic() + 30
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"mount of {cipherdir} failed")
        time.sleep(0.02)
    return proc


def unmount(mountpoint: Path, proc: subprocess.Popen[bytes]) -> None:
    subprocess.run(["fusermount3", "-u", str(mountpoint)], check=True)
    proc.wait(timeout=30)


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def open_read_all(directory: Path, count: int) -> float:
    """Seconds to open and read each of ``count`` files once."""
    start = time.perf_counter()
    for i in range(count):
        with open(directory / f"f{i:05d}", "rb") as f:
            f.read()
    return time.perf_counter() - start


def open_latency(work: Path, store: Path, address: str, files: int) -> dict[str, float]:
    cipherdir = work / "cipher"
    subprocess.run([str(BIN / "kmsfs"), "init", str(cipherdir), "--domain", "bench", "--store",
                    str(store)], check=True, capture_output=True, env=env())
    mp = work / "mnt"
    proc = mount(cipherdir, mp, ["--store", str(store)])
    for i in range(files):
        (mp / f"f{i:05d}").write_bytes(b"x" * 100)
    unmount(mp, proc)
    out: dict[str, float] = {}
    for label, args in (("in-process", ["--store", str(store)]), ("agent", ["--agent", address])):
        times = []
        for _ in range(3):
            proc = mount(cipherdir, mp, args)
            drop_caches()
            times.append(open_read_all(mp, files))
            unmount(mp, proc)
        out[label] = sorted(times)[1] / files * 1e6  # median, µs per file
    out["added by the agent"] = out["agent"] - out["in-process"]
    return out


def _open_worker(args: tuple[str, int]) -> float:
    directory, files = args
    return open_read_all(Path(directory), files)


def concurrent_mounts(work: Path, store: Path, address: str, files: int) -> dict[str, float]:
    mounts = []
    for n in range(8):
        cipherdir = work / f"cipher{n}"
        subprocess.run([str(BIN / "kmsfs"), "init", str(cipherdir), "--domain", "bench",
                        "--store", str(store)], check=True, capture_output=True, env=env())
        mp = work / f"mnt{n}"
        proc = mount(cipherdir, mp, ["--agent", address])
        for i in range(files):
            (mp / f"f{i:05d}").write_bytes(b"y" * 100)
        unmount(mp, proc)
        mounts.append((cipherdir, mp))
    procs = [mount(c, m, ["--agent", address]) for c, m in mounts]
    drop_caches()
    try:
        with multiprocessing.Pool(8) as pool:
            start = time.perf_counter()
            pool.map(_open_worker, [(str(m), files) for _, m in mounts])
            elapsed = time.perf_counter() - start
    finally:
        for (_, m), p in zip(mounts, procs, strict=True):
            unmount(m, p)
    return {"file opens per second, 8 mounts at once": 8 * files / elapsed}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per derivation figure")
    parser.add_argument("--files", type=int, default=1000, help="files per open-latency run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (mounts, drop_caches)")
    work = Path(tempfile.mkdtemp(prefix="kmsfs-bench-agent-"))
    agent = None
    try:
        store = make_store(work)
        agent, address = start_agent(work, store)
        bundle = subprocess.run(
            [str(BIN / "kmsfs-admin"), "--store", str(store), "domain", "export", "bench"],
            capture_output=True, check=True, env=env(),
        ).stdout.strip()
        figures = {
            "derivations per second": derivation_rates(store, address, bundle, args.seconds),
            "file open + read, µs per file": open_latency(work, store, address, args.files),
            "8 concurrent mounts": concurrent_mounts(work, store, address, args.files // 2),
        }
        figures["agent peak RSS MiB"] = {"kmsfs-hsmd": rss_kib(agent.pid) / 1024}
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    for section, values in figures.items():
        print(section)
        for name, value in values.items():
            print(f"  {name:45} {value:12.1f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
