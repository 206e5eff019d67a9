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

pjdfstest's ``tests/conf`` selects expectations by file system name; both runs use the same
file, so whatever it says applies to both alike.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import kmsfs_hsm, unmount

RESULT = re.compile(r"^(ok|not ok) (\d+)")


def outcomes(scripts: list[Path], base: Path, cwd: Path, timeout: float
             ) -> dict[str, dict[int, str]]:
    """{test file under *base*: {subtest: 'ok' | 'not ok'}} from ``prove -v`` run in *cwd*."""
    out: dict[str, dict[int, str]] = {}
    for script in scripts:
        name = str(script.relative_to(base))
        try:
            run = subprocess.run(["prove", "-v", str(script)], cwd=cwd, capture_output=True,
                                 text=True, timeout=timeout)
            lines = run.stdout.splitlines()
        except subprocess.TimeoutExpired:
            lines = ["not ok 0 - timed out"]
        results: dict[int, str] = {}
        for line in lines:
            m = RESULT.match(line)
            if m:
                # "# TODO" marks a failure the suite expects on this system: it counts as passed.
                results[int(m.group(2))] = "ok" if "# TODO" in line else m.group(1)
        out[name] = results
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
    base = suite / "tests"
    dirs = [base / d for d in args.only.split(",") if d] or [base]

    with tempfile.TemporaryDirectory(prefix="kmsfs-conformance-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # the suite runs as other users too: they must reach both trees
        plain = work / "plain"
        plain.mkdir()
        proc, mountpoint = kmsfs_hsm(work, "allow_other")
        for top in (mountpoint, plain):  # kmsfs init makes the volume root 0700
            top.chmod(0o755)
        try:
            kmsfs_runs, plain_runs = {}, {}
            for d in dirs:
                print(f"conformance: {d.name} on kmsfs, then on {plain}", flush=True)
                scripts = sorted(d.rglob("*.t"))
                kmsfs_runs.update(outcomes(scripts, base, mountpoint, args.timeout))
                plain_runs.update(outcomes(scripts, base, plain, args.timeout))
        finally:
            unmount(mountpoint)
            proc.wait(timeout=30)

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
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
