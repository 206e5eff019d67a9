"""Machine crashes (power cuts), simulated: the ciphertext directory lives on ext4 in a
loop-mounted image, and a copy of the image is what the disk would hold if the power went now
(fault_helpers.ext4_image, after_power_cut). Mounting the copy replays ext4's journal as a boot
would. DESIGN §2.5: what was fsync'd survives a crash of the machine.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.integration.fault_helpers import after_power_cut, ext4_image
from tests.integration.fs_helpers import make_volume

#: Longer than ext4's journal commit interval (5 s: the new size is on the disk by then),
#: shorter than the kernel's dirty_expire (30 s: data not fsync'd is not, yet).
AFTER_COMMIT = 8.0


def test_a_truncate_into_a_block_keeps_its_fsyncd_bytes_across_a_power_cut(
    tmp_path: Path, mounter  # type: ignore[no-untyped-def]
) -> None:
    """A truncate into the middle of a block rewrites the bytes it keeps (a shorter block,
    a fresh nonce). ext4 committed the new size within 5 s, and the rewritten block only when
    its page was written back, 30 s later: a power cut in between left the new size over the
    old ciphertext, and bytes fsync'd long before, which the user never changed, read EIO.
    The truncate now returns only once the shortened block is on the disk."""
    with ext4_image(tmp_path / "img") as (disk, image):
        mount = mounter(make_volume(disk / "cipher"))
        data = mount.mountpoint / "data"
        old = os.urandom(3 * 4096)
        with open(data, "wb") as f:
            f.write(old)
            f.flush()
            os.fsync(f.fileno())
        os.sync()
        keep = 4096 + 4050  # block 1's shortened ciphertext crosses the page boundary at 8192
        os.truncate(data, keep)
        time.sleep(AFTER_COMMIT)
        with after_power_cut(image, tmp_path / "cut") as cut:
            mount.stop()
            after = mounter(cut / "cipher", name="after")
            assert (after.mountpoint / "data").read_bytes() == old[:keep]
            after.stop()
