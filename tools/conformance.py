#!/usr/bin/env python3
"""Run pjdfstest, the independent POSIX conformance suite, on kmsfs and on the local file system.

Usage (as root, from the repo, with the venv):

    .venv/bin/python tools/conformance.py PJDFSTEST_DIR [--only chmod,rename]

PJDFSTEST_DIR is a built checkout of https://github.com/pjd/pjdfstest (``autoreconf -ifs &&
./configure && make pjdfstest``; it is not vendored here). kmsfs is mounted by the product path
(SoftHSM2, as tools/bench.py does) with ``-o allow_other``, which brings the kernel's
permission checks, as a multi-user deployment has them. Each test directory of the suite runs
with ``prove`` inside the mount and inside a plain directory beside the ciphertext (ext4 on
Debian), and the script prints, per test file, every subtest whose outcome differs. The bar is
none: exit 0 when kmsfs gives what the local file system gives, 1 otherwise.

pjdfstest picks some expectations by file system name (``tests/conf`` reads it with ``df``:
FUSE.KMSFS in the mount). The suite is copied into the work directory and its conf told the
local file system's name for both runs, so both are held to the same expectations. A subtest
the suite marks as expected to fail (``# TODO``) is compared as it came out, pass or fail.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import kmsfs_hsm, unmount

RESULT = re.compile(r"^(ok|not ok) (\d+)(.*# TODO)?")


def copy_suite(suite: Path, work: Path, fs: str) -> Path:
    """The binary and tests/ of *suite* under *work*, with the conf's file system fixed."""
    copy = work / "pjdfstest"
    copy.mkdir()
    shutil.copy2(suite / "pjdfstest", copy / "pjdfstest")
    shutil.copytree(suite / "tests", copy / "tests")
    with open(copy / "tests" / "conf", "a", encoding="utf-8") as conf:
        conf.write(f'\nfs="{fs}"  # tools/conformance.py: the same expectations for both runs\n')
    return copy


def fs_type(path: Path) -> str:
    out = subprocess.run(["df", "-PT", str(path)], check=True, capture_output=True, text=True)
    return out.stdout.splitlines()[-1].split()[1].upper()


def prove(script: Path, cwd: Path, timeout: float) -> list[str]:
    """``prove -v`` of one test file in *cwd*: its output lines; on a timeout, the whole
    process group is killed (a hung test must not keep the mount busy) and one failure added."""
    proc = subprocess.Popen(["prove", "-v", str(script)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return out.splitlines()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return [*out.splitlines(), "not ok 0 - timed out"]


def outcomes(scripts: list[Path], base: Path, cwd: Path, timeout: float
             ) -> dict[str, dict[int, str]]:
    """{test file under *base*: {subtest: 'ok' | 'not ok'}} from ``prove -v`` run in *cwd*."""
    out: dict[str, dict[int, str]] = {}
    for script in scripts:
        results: dict[int, str] = {}
        for line in prove(script, cwd, timeout):
            m = RESULT.match(line)
            if m:
                results[int(m.group(2))] = m.group(1) + (" # TODO" if m.group(3) else "")
        out[str(script.relative_to(base))] = results
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pjdfstest", type=Path, help="a built pjdfstest checkout")
    parser.add_argument("--only", default="", help="comma-separated test directories, e.g. chmod")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test file")
    args = parser.parse_args()
    suite = args.pjdfstest.resolve()
    if not (suite / "pjdfstest").is_file() or not (suite / "tests").is_dir():
        parser.error(f"{suite}: not a built pjdfstest checkout (no pjdfstest binary or tests/)")
    only = [d for d in args.only.split(",") if d]
    missing = [d for d in only if not (suite / "tests" / d).is_dir()]
    if missing:
        parser.error(f"no such test directory in {suite / 'tests'}: {', '.join(missing)}")

    with tempfile.TemporaryDirectory(prefix="kmsfs-conformance-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # the suite runs as other users too: they must reach both trees
        plain = work / "plain"
        plain.mkdir()
        base = copy_suite(suite, work, fs_type(plain)) / "tests"
        dirs = [base / d for d in only] or [base]
        proc, mountpoint = kmsfs_hsm(work, "allow_other")
        try:
            for top in (mountpoint, plain):  # kmsfs init makes the volume root 0700
                top.chmod(0o755)
            kmsfs_runs, plain_runs = {}, {}
            for d in dirs:
                print(f"conformance: {d.name} on kmsfs, then on {plain}", flush=True)
                scripts = sorted(d.rglob("*.t"))
                kmsfs_runs.update(outcomes(scripts, base, mountpoint, args.timeout))
                plain_runs.update(outcomes(scripts, base, plain, args.timeout))
        finally:
            stop(proc, mountpoint)

    differing = 0
    for name in sorted(plain_runs):
        want, have = plain_runs[name], kmsfs_runs.get(name, {})
        bad = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
        if bad:
            differing += 1
            print(f"{name}: subtests {bad} differ (local fs: "
                  f"{[want.get(n) for n in bad]}, kmsfs: {[have.get(n) for n in bad]})")
    subtests = sum(len(r) for r in plain_runs.values())
    print(f"conformance: {len(plain_runs)} files, {subtests} subtests; "
          f"{differing} file(s) where kmsfs differs from the local file system")
    return 1 if differing or not subtests else 0


def stop(proc: subprocess.Popen[bytes], mountpoint: Path) -> None:
    """Unmount and wait for the daemon; lazily if something still holds the mount."""
    unmount(mountpoint)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        subprocess.run(["fusermount3", "-uz", str(mountpoint)], check=False)
        proc.terminate()
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while os.path.ismount(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main())
