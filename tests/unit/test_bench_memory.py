"""tools/bench.py --warm-memory: the VM's free page reporting is held off for the run and put
back as it was afterwards, whatever happens in between.

The knob is a root-writable kernel module parameter, so a run that left it changed would slow
every later workload on the machine that frees and reuses memory; these tests point the
context manager at a file of their own, never at /sys.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import bench  # noqa: E402

SMALL_GIB = 1 / 256  # 4 MiB: the pages are written, the test stays quick


def test_reporting_is_held_off_during_the_run_and_restored_after(tmp_path: Path) -> None:
    knob = tmp_path / "page_reporting_order"
    knob.write_text("9\n")
    with bench.warm_memory(SMALL_GIB, knob) as line:
        assert knob.read_text() == bench.NO_REPORTING_ORDER
        assert "held off" in line and "9 -> 11" in line
    assert knob.read_text() == "9"


def test_the_knob_is_restored_when_the_run_fails(tmp_path: Path) -> None:
    knob = tmp_path / "page_reporting_order"
    knob.write_text("7\n")
    with pytest.raises(RuntimeError), bench.warm_memory(SMALL_GIB, knob):
        raise RuntimeError("a mount failed")
    assert knob.read_text() == "7"


def test_a_machine_without_page_reporting_gets_warm_pages_and_no_knob(tmp_path: Path) -> None:
    knob = tmp_path / "absent"
    with bench.warm_memory(SMALL_GIB, knob) as line:
        assert "no free page reporting" in line
    assert not knob.exists()


def test_the_largest_buddy_order_cannot_be_reported() -> None:
    """Order 10 (4 MiB blocks) is the largest the kernel keeps on x86-64 with 4 KiB pages
    (MAX_PAGE_ORDER); a reporting order at or below it would still hand blocks back."""
    assert int(bench.NO_REPORTING_ORDER) > 10
