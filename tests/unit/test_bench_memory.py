"""tools/bench.py --warm-memory: the VM's free page reporting is turned off for the run and put
back as it was afterwards, whatever happens in between.

The knob is a root-writable kernel module parameter, so a run that left it changed would slow
every later workload on the machine that frees and reuses memory; these tests point the
context manager at files of their own, never at /sys or /proc.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

import bench  # noqa: E402

SMALL_GIB = 1 / 256  # 4 MiB: the pages are written, the test stays quick
#: /proc/buddyinfo of an x86-64 machine: orders 0 to 10.
BUDDYINFO = "Node 0, zone      DMA" + "      0" * 8 + "      1      1      3 \n"


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """A page_reporting parameter directory whose order is 9 (this VM's)."""
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "page_reporting_order").write_text("9\n")
    (tmp_path / "buddyinfo").write_text(BUDDYINFO)
    return tmp_path / "params"


def warm(params: Path):  # type: ignore[no-untyped-def]
    return bench.warm_memory(SMALL_GIB, params, params.parent / "buddyinfo")


def test_the_largest_order_is_read_off_buddyinfo(tmp_path: Path) -> None:
    (tmp_path / "b").write_text(BUDDYINFO)
    assert bench.largest_block_order(tmp_path / "b") == 10


def test_reporting_is_off_during_the_run_and_restored_after(params: Path) -> None:
    knob = params / "page_reporting_order"
    with warm(params) as done:
        assert knob.read_text() == "11"  # above order 10: no free block is ever reported
        assert "reporting off" in done.line and "9 -> 11" in done.line
    assert knob.read_text() == "9"


def test_the_knob_is_restored_when_the_run_fails(params: Path) -> None:
    knob = params / "page_reporting_order"
    with pytest.raises(RuntimeError), warm(params):
        raise RuntimeError("a mount failed")
    assert knob.read_text() == "9"


def test_a_kernel_that_refuses_the_order_past_the_largest_gets_the_largest(
    params: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels that bound the parameter to MAX_PAGE_ORDER refuse 11 (EINVAL): 10 then, which
    still reports free 4 MiB blocks, and the line says so instead of claiming it is off."""
    knob = params / "page_reporting_order"
    real = bench.write_knob

    def bounded(path: Path, value: str) -> None:
        if int(value) > 10:
            raise OSError(errno.EINVAL, "Invalid argument")
        real(path, value)

    monkeypatch.setattr(bench, "write_knob", bounded)
    with warm(params) as done:
        assert knob.read_text() == "10"
        assert "reduced" in done.line and "off" not in done.line.split("(")[0]
    assert knob.read_text() == "9"


def test_no_reporting_device_is_left_alone(params: Path) -> None:
    """-1: no device has registered; writing an order would set one for a device to come."""
    knob = params / "page_reporting_order"
    knob.write_text("-1\n")
    with warm(params) as done:
        assert knob.read_text() == "-1\n"
        assert "no free page reporting device" in done.line
    assert knob.read_text() == "-1\n"


def test_a_machine_without_page_reporting_gets_warm_pages_and_no_knob(tmp_path: Path) -> None:
    (tmp_path / "buddyinfo").write_text(BUDDYINFO)
    with bench.warm_memory(SMALL_GIB, tmp_path / "absent", tmp_path / "buddyinfo") as done:
        assert "no free page reporting" in done.line
    assert not (tmp_path / "absent").exists()


def test_a_restore_the_kernel_refuses_is_a_warning_with_what_to_write(
    params: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = bench.write_knob

    def refuse_restore(path: Path, value: str) -> None:
        if value == "9":
            raise OSError(errno.EINVAL, "Invalid argument")
        real(path, value)

    monkeypatch.setattr(bench, "write_knob", refuse_restore)
    with warm(params):
        pass
    assert "echo 9 > " in capsys.readouterr().err


def test_what_was_handed_back_during_the_run_is_reported(params: Path) -> None:
    counter = params / "reported_kib"
    counter.write_text("1000\n")
    with warm(params) as done:
        counter.write_text(str(1000 + 3 * 1024) + "\n")
    assert done.after() == "memory handed back to the host during the run: 3 MiB"


def test_steal_is_read_off_the_cpu_line(tmp_path: Path) -> None:
    """The eighth figure of /proc/stat's first line, in clock ticks: what the bench prints as
    the CPU time the host took from the VM during the run."""
    stat = tmp_path / "stat"
    stat.write_text("cpu  137146 0 160069 497715 28474 0 952 26747 0 0\ncpu0 1 2 3 4 5 6 7 8\n")
    assert bench.stolen_seconds(stat) == 26747 / os.sysconf("SC_CLK_TCK")
