"""kmsfs.fs.readahead on a stand-in of /sys/class/bdi, and kmsfs.fs.heap in a child process:
what each changes, and that each leaves things alone where it cannot or need not act."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kmsfs.fs.readahead import READAHEAD_KB, raise_readahead

DEVICE = (0, 57)


def knob_in(root: Path, value: str) -> Path:
    bdi = root / "0:57"
    bdi.mkdir(parents=True)
    knob = bdi / "read_ahead_kb"
    knob.write_text(value)
    return knob


def test_a_smaller_window_is_raised(tmp_path: Path) -> None:
    knob = knob_in(tmp_path, "128\n")
    assert raise_readahead(DEVICE, tmp_path) is True
    assert knob.read_text() == str(READAHEAD_KB)


def test_a_bigger_window_is_left_as_it_is(tmp_path: Path) -> None:
    knob = knob_in(tmp_path, "4096\n")
    assert raise_readahead(DEVICE, tmp_path) is True
    assert knob.read_text() == "4096\n"


def test_no_such_device_changes_nothing(tmp_path: Path) -> None:
    knob = knob_in(tmp_path, "128\n")
    assert raise_readahead((0, 58), tmp_path) is False
    assert knob.read_text() == "128\n"


def test_a_device_with_a_major_number_is_never_a_fuse_mount(tmp_path: Path) -> None:
    bdi = tmp_path / "254:0"
    bdi.mkdir()
    (bdi / "read_ahead_kb").write_text("128\n")
    assert raise_readahead((254, 0), tmp_path) is False
    assert (bdi / "read_ahead_kb").read_text() == "128\n"


def test_a_symlink_in_place_of_the_setting_is_not_followed(tmp_path: Path) -> None:
    bystander = tmp_path / "bystander"
    bystander.write_text("128\n")
    (tmp_path / "0:57").mkdir()
    (tmp_path / "0:57" / "read_ahead_kb").symlink_to(bystander)
    assert raise_readahead(DEVICE, tmp_path) is False
    assert bystander.read_text() == "128\n"


def test_an_unreadable_setting_changes_nothing(tmp_path: Path) -> None:
    knob = knob_in(tmp_path, "garbage")
    assert raise_readahead(DEVICE, tmp_path) is False
    assert knob.read_text() == "garbage"


FAULTS_PER_CYCLE = """
import resource, sys
from kmsfs.fs.heap import keep_freed_buffers
if sys.argv[1] == "tuned":
    assert keep_freed_buffers()
def cycle():  # what a 1 MiB WRITE allocates: the request, then its ciphertext
    request = bytearray(1 << 20)
    request[::4096] = bytes(256)
    out = bytearray((1 << 20) + 256 * 28)
    out[::4096] = bytes(len(out[::4096]))
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    cycle()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
"""


def faults_per_cycle(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CYCLE, mode], check=True,
                         capture_output=True, text=True).stdout
    return int(out)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_request_buffers_are_kept_for_the_next_request() -> None:
    # Without the thresholds, glibc hands such buffers back and faults them in again: the
    # measurement is one that can tell the two apart.
    assert faults_per_cycle("default") >= 256
    assert faults_per_cycle("tuned") < 8
