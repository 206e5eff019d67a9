"""A volume keeps the newest Domain generation a mount used (DESIGN.md §2.7, threat-model §2).

A store writer can hide a Domain's newer generations, so that a mount falls back to an older
one: after a rotation, new files would then be written under the old epoch, which an HSM
removed before the rotation can still derive. Once a mount has used the newer generation, the
volume's ``kmsfs.conf`` carries it, and hiding it from the store changes nothing. Real store,
real SoftHSM2 tokens, the real ``kmsfs`` commands and FUSE mounts.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from kmsfs import api
from kmsfs.crypto.content import HEADER_SIZE, FileHeader
from kmsfs.fs import config as volconfig
from kmsfs.fs.volume import lock_exclusive
from tests.integration.test_fs_epochs import _kmsfs
from tests.kms_helpers import Admin


def _generation(cipher: Path) -> int:
    return int(api.bundle_facts(volconfig.load(cipher).domain_bundle)["generation"])


def _epoch_of_the_new_file(cipher: Path, before: set[str]) -> int:
    """The key epoch in the header of the one ciphertext file made since *before*."""
    (new,) = {p.name for p in cipher.iterdir() if not p.name.startswith("kmsfs.")} - before
    return FileHeader.parse((cipher / new).read_bytes()[:HEADER_SIZE]).epoch


def _names(cipher: Path) -> set[str]:
    return {p.name for p in cipher.iterdir() if not p.name.startswith("kmsfs.")}


def _write_through_a_mount(cipher: Path, mp: Path, env: dict[str, str], *options: str) -> None:
    proc = _kmsfs("mount", str(cipher), str(mp), *options, env=env)
    assert proc.returncode == 0, proc.stderr
    try:
        if "ro" not in options:
            (mp / f"f{len(_names(cipher))}").write_bytes(os.urandom(5000))
    finally:
        assert _kmsfs("umount", str(mp)).returncode == 0


@pytest.mark.slow
def test_a_hidden_newer_generation_is_still_used_once_a_mount_used_it(
    tmp_path: Path, initialized: Admin
) -> None:
    initialized.real_domain()
    env = {"KMSFS_STORE": str(initialized.store)}
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    mp.mkdir()
    assert _kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    first = volconfig.load(cipher)
    initialized("domain", "rotate", "payroll")  # generation 2: key epoch 2

    # A read-only mount, and a mount that fails once it has opened the Domain (the volume is
    # busy, as under kmsfs reencrypt), leave the config as it was.
    _write_through_a_mount(cipher, mp, env, "-o", "ro")
    held = lock_exclusive(cipher)
    try:
        failed = _kmsfs("mount", str(cipher), str(mp), env=env)
    finally:
        os.close(held)
    assert failed.returncode != 0 and ": busy: " in failed.stderr, failed.stderr
    assert volconfig.load(cipher) == first

    before = _names(cipher)
    _write_through_a_mount(cipher, mp, env)
    assert _epoch_of_the_new_file(cipher, before) == 2
    now = volconfig.load(cipher)
    assert _generation(cipher) == 2 and now.domain_id != first.domain_id
    assert now.feature_flags == first.feature_flags and now.domain_name == "payroll"

    # The store writer hides generation 2: the volume still writes under epoch 2.
    hidden = initialized.store / "domains" / f"{now.domain_id}.json"
    kept = hidden.read_bytes()
    hidden.unlink()
    before = _names(cipher)
    _write_through_a_mount(cipher, mp, env)
    assert _epoch_of_the_new_file(cipher, before) == 2
    assert volconfig.load(cipher) == now
    info = _kmsfs("info", str(cipher), "--json", env=env)
    assert info.returncode == 0 and json.loads(info.stdout)["generation"] == 2

    # Generation 3 (the store has 2 back), used once; then both hidden: the mount is refused.
    hidden.write_bytes(kept)
    initialized("domain", "rotate", "payroll")
    _write_through_a_mount(cipher, mp, env)
    third = volconfig.load(cipher)
    assert _generation(cipher) == 3
    (initialized.store / "domains" / f"{third.domain_id}.json").unlink()
    hidden.unlink()
    proc = _kmsfs("mount", str(cipher), str(mp), env=env)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "history" in proc.stderr and not os.path.ismount(mp)
    assert volconfig.load(cipher) == third


def test_a_deriver_that_does_not_say_its_generation_changes_nothing(tmp_path: Path) -> None:
    """Through kmsfs-hsmd the chain is the agent's, verified against its own store: the volume
    keeps its copy."""
    from kmsfs.fs import kms
    from tests.integration.fs_helpers import SoftDeriver, make_volume

    volume = make_volume(tmp_path / "cipher")
    before = (volume / volconfig.CONFIG_NAME).read_bytes()
    assert kms.keep_newest_copy(volume, SoftDeriver()) is None
    assert (volume / volconfig.CONFIG_NAME).read_bytes() == before


def _mounted_after_a_rotation(
    initialized: Admin, tmp_path: Path
) -> tuple[dict[str, str], Path, Path, bytes]:
    """A volume made at generation 1, the Domain rotated (generation 2), then mounted once
    here: (env, cipherdir, mountpoint, the volume's kmsfs.conf as made)."""
    initialized.real_domain()
    env = {"KMSFS_STORE": str(initialized.store)}
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    mp.mkdir()
    assert _kmsfs("init", str(cipher), "--domain", "payroll", env=env).returncode == 0
    old_conf = (cipher / volconfig.CONFIG_NAME).read_bytes()
    initialized("domain", "rotate", "payroll")
    _write_through_a_mount(cipher, mp, env)
    return env, cipher, mp, old_conf


@pytest.mark.slow
def test_a_store_and_volume_rolled_back_together_are_refused_here(
    tmp_path: Path, initialized: Admin, machine_state: Path
) -> None:
    """Whoever writes both the store and the ciphertext directory can put the older copy back
    in kmsfs.conf too; this machine remembers the generation it mounted and refuses, until an
    operator who restored the store on purpose removes the record the error names."""
    env, cipher, mp, old_conf = _mounted_after_a_rotation(initialized, tmp_path)
    newer = volconfig.load(cipher)
    assert _generation(cipher) == 2 and list(machine_state.rglob("*.json"))
    # Made by the daemon (umask 0): closed to other users all the same.
    for directory in (machine_state, machine_state / "domains"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory

    (initialized.store / "domains" / f"{newer.domain_id}.json").unlink()
    (cipher / volconfig.CONFIG_NAME).chmod(0o644)
    (cipher / volconfig.CONFIG_NAME).write_bytes(old_conf)
    proc = _kmsfs("mount", str(cipher), str(mp), env=env)
    assert proc.returncode == 3, proc.stderr  # verification failed
    (line,) = proc.stderr.strip().splitlines()
    assert "generation 2" in line and "generation 1" in line and "rolled back" in line
    assert not os.path.ismount(mp)
    (record,) = (machine_state / "domains").glob("*.json")  # beside it: volumes/ (volumepin)
    assert str(record) in line
    # `kmsfs info` says so too: scripts read its `verified` (docs/operators.md).
    info = json.loads(_kmsfs("--json", "info", str(cipher), env=env).stdout)
    assert info["verified"] is False and "rolled back" in info["problem"], info
    assert str(record) in info["problem"]

    # What else writes new data refuses the older generation too.
    plain = tmp_path / "plain"
    plain.write_bytes(b"new data")
    proc = _kmsfs("encrypt", "--domain", "payroll", str(plain), str(tmp_path / "enc"), env=env)
    assert proc.returncode == 3 and "rolled back" in proc.stderr
    assert not (tmp_path / "enc").exists()
    proc = _kmsfs("reencrypt", str(cipher), env=env)
    assert proc.returncode == 3 and "rolled back" in proc.stderr

    record.unlink()  # the operator restored the store on purpose
    info = json.loads(_kmsfs("--json", "info", str(cipher), env=env).stdout)
    assert info["verified"] is True and info["problem"] is None, info
    before = _names(cipher)
    _write_through_a_mount(cipher, mp, env)
    assert _epoch_of_the_new_file(cipher, before) == 1


def test_the_generation_a_deriver_serves_is_checked_against_the_record(
    initialized: Admin,
) -> None:
    """The mount checks the store's answer before it forks, and the deriver it then opens
    again (the store may have changed in between): both refuse an older generation."""
    from kmsfs.errors import IntegrityError
    from kmsfs.fs import kms, seen

    initialized.real_domain()
    bundle = api.export_domain_bundle(initialized.store, "payroll")
    facts = api.bundle_facts(bundle)
    desc = api.describe_bundle(initialized.store, bundle)
    with api.open_domain(initialized.store, bundle) as deriver:
        kms.check_in_use(deriver)
        kms.check_not_rolled_back(desc)
        assert kms.remember_in_use(deriver) == facts["generation"]
        assert kms.remember_in_use(deriver) is None  # already recorded
        newer = seen.Offered(
            facts["root_id"], "payroll", facts["generation"] + 1, "newer",
            tuple(facts["chain_ids"]),
        )
        seen.remember(newer)
        with pytest.raises(IntegrityError, match="rolled back"):
            kms.check_in_use(deriver)
        with pytest.raises(IntegrityError, match="rolled back"):
            kms.check_not_rolled_back(desc)


@pytest.mark.slow
def test_a_store_rolled_back_between_the_check_and_the_open_is_refused(
    tmp_path: Path, initialized: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mount checks the store's newest generation before it forks; the child then opens
    the Domain again. A store writer who hides generation 2 in between (the volume's copy put
    back to 1) must not get a mount that serves generation 1."""
    from contextlib import contextmanager

    from kmsfs.fs import cli, daemon, daemonlog, kms

    _, cipher, mp, old_conf = _mounted_after_a_rotation(initialized, tmp_path)
    second = initialized.store / "domains" / f"{volconfig.load(cipher).domain_id}.json"
    (cipher / volconfig.CONFIG_NAME).chmod(0o644)
    (cipher / volconfig.CONFIG_NAME).write_bytes(old_conf)

    real_open = kms.open_deriver

    @contextmanager
    def open_after_the_store_changed(*args: Any, **kwargs: Any) -> Any:
        second.unlink()  # between the check and the open
        with real_open(*args, **kwargs) as deriver:
            yield deriver

    def serve(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a rolled-back generation was served")

    monkeypatch.setattr(kms, "open_deriver", open_after_the_store_changed)
    monkeypatch.setattr(daemon, "serve", serve)
    monkeypatch.setattr(daemonlog, "setup_logging", lambda **kwargs: None)
    store = str(initialized.store)
    code = cli.main(["mount", "--foreground", "--store", store, str(cipher), str(mp)])
    assert code == 3 and not second.exists()
