"""tools/profile_fs.py counts every request the mount serves, by handler and phase.

Its times are machine figures and never asserted; what is checked is that each phase reports
the requests the workload must make (one CREATE per file of the tarball, one READ per
non-empty file, one UNLINK per file), so a phase that lost its figures, or a handler that was
not timed, shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILES = 30

sys.path.insert(0, str(REPO / "tools"))


def test_every_phase_counts_the_requests_its_workload_makes(tmp_path: Path) -> None:
    import bench

    tarball = tmp_path / "same.tar"  # what the tool makes: bench.make_tarball is seeded
    bench.make_tarball(tarball, FILES)
    with tarfile.open(tarball) as tar:
        sizes = [m.size for m in tar.getmembers() if m.isfile()]
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "profile_fs.py"), "--files", str(FILES),
         "--workdir", str(tmp_path), "--json"],
        check=True, capture_output=True, text=True, timeout=300,
    ).stdout
    phases = {p["phase"]: p for p in json.loads(out)}
    assert list(phases) == ["tar extract", "ls -lR", "read back", "rm -rf"]

    def calls(phase: str, handler: str) -> int:
        return int(phases[phase]["handlers"].get(handler, {}).get("calls", 0))

    assert calls("tar extract", "create") == len(sizes) == FILES
    assert calls("read back", "read") == sum(1 for s in sizes if s) > 0
    assert calls("rm -rf", "unlink") == FILES
    assert calls("read back", "create") == calls("rm -rf", "read") == 0  # each phase its own
    assert calls("ls -lR", "readdir") > 0
    for phase in phases.values():
        assert phase["wall_s"] > 0 and phase["daemon_cpu_s"] > 0
    assert not list(tmp_path.glob("kmsfs-profile-*")), "the tool left its work directory"


def test_help_says_what_it_measures() -> None:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "profile_fs.py"), "--help"],
                         check=True, capture_output=True, text=True).stdout
    assert "inside the serving daemon" in out
