"""Keys of new files derived ahead (ContentKeys.derive_ahead), without FUSE.

The daemon calls ``derive_ahead`` while it waits for the next request. What a user relies on:
a file written with a key derived ahead reads back with the key a later mount derives from its
header; a mount that never writes a new file never derives ahead (no HSM calls, no audit
records for nothing); at most KEYS_AHEAD keys wait; a rotation is never missed; and an HSM
failure there stays there (the write that needs the key reports it).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from kmsfs.errors import HsmError
from kmsfs.fs.files import KEYS_AHEAD, ContentKeys, FileContent


class _CountingDeriver:
    def __init__(self, current_epoch: int = 1) -> None:
        self.current_epoch = current_epoch
        self.calls: list[bytes] = []
        self.fail = False

    def derive(self, info: bytes, epoch: int | None = None) -> bytes:
        if self.fail:
            raise HsmError("token removed")
        self.calls.append(info)
        key = b"k" * 31 + bytes([epoch or self.current_epoch])
        return hmac.new(key, info, hashlib.sha256).digest()


def _drain(keys: ContentKeys) -> int:
    done = 0
    while keys.derive_ahead():
        done += 1
        assert done <= 100, "derive_ahead never says it is done"
    return done


def test_a_mount_that_writes_no_new_file_never_derives_ahead() -> None:
    deriver = _CountingDeriver()
    keys = ContentKeys(deriver, key_epochs=True)
    assert _drain(keys) == 0
    assert deriver.calls == []


def test_after_a_new_file_at_most_keys_ahead_wait_and_the_next_files_use_them() -> None:
    deriver = _CountingDeriver()
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    assert len(deriver.calls) == 1
    assert _drain(keys) == KEYS_AHEAD
    headers = [keys.new_file()[0] for _ in range(KEYS_AHEAD)]
    assert len(deriver.calls) == 1 + KEYS_AHEAD  # no derivation on those files' paths
    assert len({h.file_id for h in headers}) == KEYS_AHEAD  # every file its own id and key
    keys.new_file()  # none left: derived now
    assert len(deriver.calls) == 2 + KEYS_AHEAD


def test_a_file_written_with_a_key_derived_ahead_reads_back_after_remount(tmp_path: Path) -> None:
    deriver = _CountingDeriver()
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    _drain(keys)
    data = os.urandom(10_000)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    FileContent(fd, keys).write(0, data)
    os.close(fd)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:  # a new mount: nothing ahead, the key comes from the header's file id
        assert bytes(FileContent(fd, ContentKeys(deriver, key_epochs=True)).read(0, 20_000)) == data
    finally:
        os.close(fd)


def test_keys_derived_before_a_rotation_are_not_used_after_it() -> None:
    deriver = _CountingDeriver(current_epoch=1)
    keys = ContentKeys(deriver, key_epochs=True)
    keys.new_file()
    _drain(keys)
    deriver.current_epoch = 2
    header, _ = keys.new_file()
    assert header.epoch == 2


def test_an_hsm_failure_while_deriving_ahead_is_left_to_the_next_write() -> None:
    deriver = _CountingDeriver()
    keys = ContentKeys(deriver, key_epochs=False)
    keys.new_file()
    deriver.fail = True
    assert keys.derive_ahead() is False  # no exception into the daemon's wait loop
    deriver.fail = False
    assert _drain(keys) == 0  # stopped until a new file asks again
    keys.new_file()
    assert _drain(keys) == KEYS_AHEAD
