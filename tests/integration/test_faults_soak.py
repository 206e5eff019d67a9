"""On-demand soak (``pytest -m soak``; excluded by default): tools/soak.py for a short while."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parents[2] / "tools" / "soak.py"


@pytest.mark.soak
def test_soak() -> None:
    minutes = os.environ.get("KMSFS_SOAK_MINUTES", "10")
    proc = subprocess.run([sys.executable, str(SOAK), "--minutes", minutes],
                          capture_output=True, text=True, timeout=float(minutes) * 60 + 300)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
