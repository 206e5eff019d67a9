"""A volume keeps its Domain: ``kmsfs.conf`` pointed at another Domain of the store is refused.

The attack (a cryptography review): nothing signs ``kmsfs.conf`` as a whole, so someone who can
write the ciphertext directory puts in the bundle (and id) of another Domain of the same store,
public documents that verify. The mount went on, and what users wrote from then on was keyed
with a Domain others may derive with. The defences tested here, with a real store, real
SoftHSM2 tokens, the real ``kmsfs`` and ``mount.kmsfs`` commands and real FUSE mounts:

- a config whose ``domain_name``/``domain_id`` are not its bundle's is refused by every command
  that reads a volume (:meth:`kmsfs.fs.config.VolumeConfig.validate`), and ``kmsfs info`` shows
  the name that verified;
- ``kmsfs mount --domain NAME`` / ``-o domain=NAME`` (fstab, the systemd unit) refuses any other
  Domain, even on a volume this machine never saw;
- ``kmsfs init`` and the first mount record the volume's Domain on the machine
  (:mod:`kmsfs.fs.volumepin`); a later mount of another Domain is refused, while a newer
  generation of the same Domain (rotate, rewrap) still mounts.

Every refusal: one line, a non-zero exit, nothing mounted, nothing written (the volume, the
machine's records).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from kmsfs import api, exitcodes
from kmsfs.errors import IntegrityError, UsageError
from kmsfs.fs import cli, daemon, volumepin
from kmsfs.fs import config as volconfig
from kmsfs.fs.volume import is_mount_point, lock_exclusive
from tests.integration.agent_helpers import AgentProcess, root_policy
from tests.integration.fault_helpers import clean_env
from tests.integration.fs_helpers import make_volume
from tests.integration.test_systemd import MOUNT_SERVICE, _exec_start, restart_prevented
from tests.kms_helpers import Admin, tree_snapshot

KMSFS = [sys.executable, "-m", "kmsfs.fs.cli"]
MOUNT_HELPER = [sys.executable, "-m", "kmsfs.fs.mounthelper"]


@dataclass
class Store:
    """A store and the Trust its Domains are under."""

    admin: Admin
    trust: str

    @property
    def path(self) -> Path:
        return self.admin.store

    def bundle(self, domain: str) -> tuple[bytes, str]:
        """Domain *domain*'s bundle and id: public documents, anyone can export them."""
        bundle = bytes(api.export_domain_bundle(self.path, domain))
        return bundle, str(api.bundle_facts(bundle)["domain_id"])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """One store for the module, with Domains payroll and public (the attacker may derive with
    public, say through a kmsfs-hsmd policy); no test changes it."""
    admin = Admin.under(tmp_path_factory.mktemp("pin-store"))
    admin("init", "--hsms", "2")
    trust = admin.real_domain("payroll")
    admin("domain", "create", "public", "--trust", trust)
    return Store(admin, trust)


def kmsfs(store: Store, *args: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    """The real ``kmsfs`` with the store in KMSFS_STORE and this test's machine state (the
    autouse ``machine_state`` fixture's KMSFS_STATE_DIR) unless *env* says otherwise."""
    return subprocess.run(
        [*KMSFS, *args], capture_output=True, text=True, timeout=120,
        env=clean_env(KMSFS_STORE=str(store.path), **(env or {})), check=False,
    )


def init(store: Store, cipher: Path, domain: str, state: Path | None = None) -> None:
    """``kmsfs init``; with *state*, as on another machine (this one keeps no record of it)."""
    env = {"KMSFS_STATE_DIR": str(state)} if state is not None else None
    proc = kmsfs(store, "init", str(cipher), "--domain", domain, env=env)
    assert proc.returncode == 0, proc.stderr


@contextmanager
def mounted(store: Store, cipher: Path, mp: Path, *extra: str) -> Iterator[Path]:
    mp.mkdir(exist_ok=True)
    proc = kmsfs(store, "mount", str(cipher), str(mp), *extra)
    assert proc.returncode == 0, proc.stderr
    try:
        assert is_mount_point(mp)
        yield mp
    finally:
        done = subprocess.run(["fusermount3", "-u", "--", str(mp)], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, done.stderr
        _wait_for_the_daemon(cipher)


def _wait_for_the_daemon(cipher: Path) -> None:
    """Until the unmounted daemon has exited (it holds the volume's lock while it serves, and
    still writes the volume once unmounted: it empties the write journal), so that a test's
    snapshot of the volume is not taken while it does."""
    deadline = time.monotonic() + 30
    while True:
        try:
            os.close(lock_exclusive(cipher))
            return
        except UsageError:
            assert time.monotonic() < deadline, f"{cipher}: its daemon is still there"
            time.sleep(0.05)


def point_at(store: Store, cipher: Path, domain: str, name: str | None = None) -> None:
    """The attack: another Domain's bundle and id in CIPHERDIR/kmsfs.conf, and ``domain_name``
    *name* (default: that Domain's own, which a careful attacker writes; the reviewer left
    ``payroll``). Written as raw JSON: kmsfs's own writer would refuse a mismatch."""
    conf = cipher / volconfig.CONFIG_NAME
    doc = json.loads(conf.read_bytes())
    bundle, domain_id = store.bundle(domain)
    doc.update(domain_bundle=base64.b64encode(bundle).decode(), domain_id=domain_id,
               domain_name=name or domain)
    os.chmod(conf, 0o644)
    conf.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def refused(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The error contract: that exit code, one stderr line ``kmsfs: error: ...`` holding *words*."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("kmsfs: error: "), proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@contextmanager
def nothing_changes(*roots: Path, mp: Path | None = None) -> Iterator[None]:
    """Every file under *roots* (the volume, the machine's records) as it was, nothing mounted
    at *mp* (a mount that should have been refused is taken away before the test fails)."""
    before = {root: tree_snapshot(root) for root in roots}
    try:
        yield
    finally:
        was_mounted = mp is not None and is_mount_point(mp)
        if was_mounted:
            subprocess.run(["fusermount3", "-u", "-z", "--", str(mp)], capture_output=True,
                           check=False)
    assert not was_mounted, f"{mp}: mounted, where it should have been refused"
    assert {root: tree_snapshot(root) for root in roots} == before
    if mp is not None:
        assert not any(mp.iterdir())


# --- the config must name what its bundle holds ---------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bundle_of", "name"), [("public", "payroll"), ("payroll", "public")],
    ids=["bundle-swapped-name-kept", "name-changed-bundle-kept"],
)
def test_a_config_whose_name_is_not_its_bundles_is_refused_by_every_command(
    store: Store, tmp_path: Path, machine_state: Path, bundle_of: str, name: str
) -> None:
    """The reviewer's exact edit (public's bundle and id, ``domain_name`` left payroll), and
    the other way round: mount (in-process, foreground, through an agent: refused before the
    agent is reached), info, fsck, reencrypt and decrypt --cipherdir all refuse it, exit 3,
    one line naming the file; nothing is mounted, written or decrypted."""
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    init(store, cipher, "payroll")
    with mounted(store, cipher, mp) as m:
        (m / "salaries.txt").write_bytes(b"before the edit")
    (one_file,) = [p for p in cipher.iterdir()
                   if p.is_file() and not p.name.startswith("kmsfs.")]
    point_at(store, cipher, bundle_of, name=name)
    conf = cipher / volconfig.CONFIG_NAME
    out = tmp_path / "recovered"
    commands = [
        ["mount", str(cipher), str(mp)],
        ["mount", "--foreground", str(cipher), str(mp)],
        ["mount", str(cipher), str(mp), "--agent", str(tmp_path / "no-agent.sock")],
        ["info", str(cipher)],
        ["info", str(cipher), "--json"],
        ["fsck", str(cipher)],
        ["reencrypt", str(cipher)],
        ["decrypt", "--cipherdir", str(cipher), str(one_file), str(out)],
    ]
    for command in commands:
        with nothing_changes(cipher, machine_state, mp=mp):
            proc = kmsfs(store, *command)
        refused(proc, exitcodes.VERIFICATION, f"{conf}: config names Domain {name}, but its "
                f"domain_bundle holds Domain {bundle_of}: the file was changed")
        assert proc.stdout == "" and not out.exists(), command


def test_info_shows_the_name_that_verified(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``kmsfs info`` prints the Domain name of the bundle that verified, not the config's
    claim of it: with the config's own check taken away (as a kmsfs before it would read the
    file), the reviewer's edit shows ``public``, which is what the volume would be keyed with."""
    cipher = tmp_path / "cipher"
    init(store, cipher, "payroll")
    assert cli.main(["info", str(cipher), "--json", "--store", str(store.path)]) == 0
    honest = json.loads(capsys.readouterr().out)
    assert (honest["domain_name"], honest["verified"]) == ("payroll", True)

    point_at(store, cipher, "public", name="payroll")
    monkeypatch.setattr(volconfig, "bundle_names", lambda bundle: None)
    assert cli.main(["info", str(cipher), "--json", "--store", str(store.path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["domain_name"], shown["verified"]) == ("public", True)
    assert cli.main(["info", str(cipher), "--store", str(store.path)]) == 0
    assert "domain_name:     public\n" in capsys.readouterr().out


# --- this machine's record of each volume's Domain ------------------------------------------


@pytest.mark.slow
def test_a_volume_mounted_before_is_refused_once_pointed_at_another_domain(
    store: Store, tmp_path: Path, machine_state: Path
) -> None:
    """The volume was made on another machine (no record here); its first mount here records
    payroll. The careful attacker's edit (public's bundle, id and name: nothing for the config
    check to see) is then refused, read-only too, through a symlink to the volume, and with
    the root directory's IV replaced as well (the record is keyed on the real path, not on
    anything in the volume). The line names the record; removing it, as it says, lets an
    operator who rebound the volume on purpose mount it."""
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    init(store, cipher, "payroll", state=tmp_path / "elsewhere")
    record = volumepin.record_path(cipher)
    assert not record.exists()
    with mounted(store, cipher, mp) as m:
        (m / "salaries.txt").write_bytes(b"written under payroll")
    assert json.loads(record.read_text())["domain"] == "payroll"

    point_at(store, cipher, "public")
    link = tmp_path / "link-to-cipher"
    link.symlink_to(cipher)
    for where, extra in ((cipher, ()), (cipher, ("-o", "ro")), (link, ())):
        with nothing_changes(cipher, machine_state, mp=mp):
            proc = kmsfs(store, "mount", str(where), str(mp), *extra)
        refused(proc, exitcodes.VERIFICATION, f"this machine uses the volume at {cipher} "
                "with Domain payroll", "now names Domain public", f"remove {record}")
    # `kmsfs info` does not call it verified either (public's chain alone does verify).
    info = json.loads(kmsfs(store, "info", str(cipher), "--json").stdout)
    assert info["verified"] is False and f"remove {record}" in info["problem"], info
    assert info["machine_record"] == "payroll"
    # A report changes nothing: a mount closes records' directories others may write, info
    # leaves them as they are (found by review).
    os.chmod(machine_state, 0o777)
    try:
        info = json.loads(kmsfs(store, "info", str(cipher), "--json").stdout)
        assert info["verified"] is False and f"remove {record}" in info["problem"], info
        assert stat.S_IMODE(machine_state.stat().st_mode) == 0o777
    finally:
        os.chmod(machine_state, 0o755)
    diriv = cipher / "kmsfs.diriv"
    os.chmod(diriv, 0o644)
    diriv.write_bytes(os.urandom(len(diriv.read_bytes())))
    with nothing_changes(cipher, machine_state, mp=mp):
        proc = kmsfs(store, "mount", str(cipher), str(mp))
    refused(proc, exitcodes.VERIFICATION, f"remove {record}")

    record.unlink()  # the operator's override, as the line says
    with mounted(store, cipher, mp):
        pass
    assert json.loads(record.read_text())["domain"] == "public"


@pytest.mark.slow
def test_kmsfs_init_records_the_domain_before_any_mount(
    store: Store, tmp_path: Path, machine_state: Path
) -> None:
    """A volume never mounted: its init on this machine is record enough."""
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    mp.mkdir()
    init(store, cipher, "payroll")
    record = volumepin.record_path(cipher)
    assert json.loads(record.read_text()) == {
        "domain": "payroll", "root": api.bundle_facts(store.bundle("payroll")[0])["root_id"],
        "volume": os.path.realpath(cipher),
    }
    point_at(store, cipher, "public")
    with nothing_changes(cipher, machine_state, mp=mp):
        proc = kmsfs(store, "mount", str(cipher), str(mp))
    refused(proc, exitcodes.VERIFICATION, "now names Domain public", f"remove {record}")


@pytest.mark.slow
def test_kmsfs_init_of_a_new_volume_replaces_the_record_at_its_path(
    store: Store, tmp_path: Path
) -> None:
    """A new volume made where another was is the operator's doing: it mounts."""
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    init(store, cipher, "payroll")
    with mounted(store, cipher, mp):
        pass
    shutil.rmtree(cipher)
    init(store, cipher, "public")
    with mounted(store, cipher, mp, "--domain", "public") as m:
        (m / "f").write_bytes(b"public data")
    assert json.loads(volumepin.record_path(cipher).read_text())["domain"] == "public"


@pytest.mark.slow
def test_a_newer_generation_of_the_same_domain_still_mounts(
    initialized: Admin, tmp_path: Path
) -> None:
    """The record is the Domain's name and store root, not a generation: after a rotation (new
    mk epoch) and a rewrap into a successor Trust (new k), the volume mounts as before, with
    --domain too, the volume's copy moves to the newer generation, and the record stays. (A
    store of its own: the successor Trust supersedes the one its Domains were under.)"""
    store = Store(initialized, initialized.real_domain("ledger"))
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    init(store, cipher, "ledger")
    with mounted(store, cipher, mp, "--domain", "ledger") as m:
        (m / "one").write_bytes(b"generation 1")
    record = volumepin.record_path(cipher)
    pinned = record.read_bytes()
    first = volconfig.load(cipher)

    store.admin("domain", "rotate", "ledger")
    with mounted(store, cipher, mp, "--domain", "ledger") as m:
        (m / "two").write_bytes(b"generation 2")
    successor = store.admin.sealed_trust(["hsm1", "hsm2"], ["alice"], 1,
                                         predecessor=store.trust)
    store.admin("domain", "rewrap", "ledger", "--trust", successor)
    with mounted(store, cipher, mp, "-o", "domain=ledger") as m:
        assert (m / "one").read_bytes() == b"generation 1"
        assert (m / "two").read_bytes() == b"generation 2"
    now = volconfig.load(cipher)
    assert now.domain_name == "ledger" and now.domain_id != first.domain_id
    assert api.bundle_facts(now.domain_bundle)["generation"] == 3
    assert record.read_bytes() == pinned


# --- the Domain named from outside the volume: --domain, -o domain=, the systemd unit --------


def _unit(store: Store, cipher: Path, mp: Path, **change: str
          ) -> tuple[list[str], dict[str, str]]:
    """kmsfs@.service's own ExecStart line, expanded from its env file as systemd does (the
    installed /usr/local/bin/kmsfs replaced by this checkout's), and its environment."""
    unit_env = {"KMSFS_CIPHERDIR": str(cipher), "KMSFS_MOUNTPOINT": str(mp),
                "KMSFS_DOMAIN": "payroll", "KMSFS_STORE": str(store.path),
                "KMSFS_OPTIONS": "allow_other", **change}
    argv = _exec_start(unit_env)
    assert argv[0] == "/usr/local/bin/kmsfs"
    return [*KMSFS, *argv[1:]], {**clean_env(), **unit_env}


def _unit_start(store: Store, cipher: Path, mp: Path, **change: str
                ) -> subprocess.CompletedProcess[str]:
    argv, env = _unit(store, cipher, mp, **change)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env,
                          check=False)


def _kernel_options(mp: Path) -> str:
    """The mount and super options the kernel holds for the mount at *mp*."""
    for line in reversed(Path("/proc/self/mountinfo").read_text().splitlines()):
        fields = line.split(" ")
        if fields[4] == str(mp):
            return f"{fields[5]} {fields[-1]}"
    raise AssertionError(f"{mp} is not in /proc/self/mountinfo")


@pytest.mark.slow
def test_a_volume_never_seen_here_is_refused_when_the_domain_is_named(
    store: Store, tmp_path: Path, machine_state: Path
) -> None:
    """No record on this machine (the volume was made elsewhere and never mounted here), the
    careful attacker's edit: refused by ``--domain payroll``, ``-o domain=payroll``, an fstab
    line's ``domain=payroll`` through mount.kmsfs, and kmsfs@.service's KMSFS_DOMAIN, with an
    exit code the unit does not restart on; no record is written. The honest volume mounts
    all those ways, and ``domain=`` never reaches the kernel."""
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    mp.mkdir()
    init(store, cipher, "payroll", state=tmp_path / "elsewhere")
    honest = (cipher / volconfig.CONFIG_NAME).read_bytes()
    point_at(store, cipher, "public")
    helper = [*MOUNT_HELPER, str(cipher), str(mp), "-o",
              f"store={store.path},domain=payroll,_netdev,noauto"]
    attempts = {
        "--domain": lambda: kmsfs(store, "mount", str(cipher), str(mp), "--domain", "payroll"),
        "-o domain=": lambda: kmsfs(store, "mount", str(cipher), str(mp),
                                    "-o", "ro,domain=payroll"),
        "mount.kmsfs": lambda: subprocess.run(helper, capture_output=True, text=True,
                                              timeout=120, env=clean_env(), check=False),
        "kmsfs@.service": lambda: _unit_start(store, cipher, mp),
    }
    for how, attempt in attempts.items():
        with nothing_changes(cipher, machine_state, mp=mp):
            proc = attempt()
        refused(proc, exitcodes.VERIFICATION, f"{cipher}: the volume's Domain is public, "
                "not payroll")
        assert proc.returncode in restart_prevented(MOUNT_SERVICE), how
    assert not volumepin.record_path(cipher).exists()

    os.chmod(cipher / volconfig.CONFIG_NAME, 0o644)
    (cipher / volconfig.CONFIG_NAME).write_bytes(honest)
    with mounted(store, cipher, mp, "-o", "ro,domain=payroll"):
        assert "ro" in _kernel_options(mp).split(" ")[0].split(",")
        assert "domain" not in _kernel_options(mp)
    proc = subprocess.run(helper, capture_output=True, text=True, timeout=120,
                          env=clean_env(), check=False)
    assert proc.returncode == 0, proc.stderr
    try:
        assert "domain" not in _kernel_options(mp)
    finally:
        assert kmsfs(store, "umount", str(mp)).returncode == 0
        _wait_for_the_daemon(cipher)
    argv, env = _unit(store, cipher, mp)
    unit = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not is_mount_point(mp) and unit.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert is_mount_point(mp), unit.returncode
    finally:
        unit.terminate()
        assert unit.wait(timeout=60) == 0
    assert not is_mount_point(mp)


def test_an_empty_or_conflicting_domain_is_a_usage_error(tmp_path: Path) -> None:
    """kmsfs@.service with no KMSFS_DOMAIN passes ``--domain ''``: refused at once (exit 2,
    which the unit does not restart on), as are two names that differ; checked before the
    volume or a store is read."""
    cipher, mp = make_volume(tmp_path / "cipher"), tmp_path / "mnt"
    mp.mkdir()
    store = Store(Admin(tmp_path / "no-store", tmp_path), "")
    for extra in (["--domain", ""], ["-o", "domain="], ["--domain", "payroll", "-o",
                                                        "ro,domain=public"]):
        with nothing_changes(cipher, mp=mp):
            proc = kmsfs(store, "mount", str(cipher), str(mp), *extra)
        refused(proc, exitcodes.USAGE, "--domain")
    proc = _unit_start(store, cipher, mp, KMSFS_DOMAIN="")
    refused(proc, exitcodes.USAGE, "is empty", "KMSFS_DOMAIN=")
    assert exitcodes.USAGE in restart_prevented(MOUNT_SERVICE)


def test_domain_is_kmsfs_own_option() -> None:
    """``domain=NAME`` comes out of -o wherever it stands; alone, the kernel's filter refuses
    it (so nothing but :func:`kmsfs.fs.daemon.split_domain` can let it through)."""
    assert daemon.split_domain(["ro,domain=payroll", "allow_other"]) == (
        ["payroll"], ["ro", "allow_other"])
    assert daemon.split_domain(["domain"]) == ([], ["domain"])
    with pytest.raises(UsageError, match="unsupported mount option 'domain=payroll'"):
        daemon.mount_options(["domain=payroll"])


# --- through the HSM agent ------------------------------------------------------------------


@pytest.mark.slow
def test_through_the_agent_the_record_and_domain_hold_too(
    store: Store, tmp_path: Path, machine_state: Path
) -> None:
    """A mount through kmsfs-hsmd (whose policy lets this client derive with both Domains)
    records the volume's Domain as an in-process one does, and is refused the same way once
    the volume is pointed at public; on a volume with no record, --domain refuses it."""
    agent = AgentProcess(store.path, tmp_path / "agent", root_policy()).start()
    try:
        cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
        init(store, cipher, "payroll", state=tmp_path / "elsewhere")
        via_agent = ("--agent", agent.address)
        with mounted(store, cipher, mp, *via_agent) as m:
            (m / "f").write_bytes(b"through the agent")
        record = volumepin.record_path(cipher)
        assert json.loads(record.read_text())["domain"] == "payroll"
        point_at(store, cipher, "public")
        with nothing_changes(cipher, machine_state, mp=mp):
            proc = kmsfs(store, "mount", str(cipher), str(mp), *via_agent)
        refused(proc, exitcodes.VERIFICATION, "now names Domain public", f"remove {record}")

        record.unlink()
        with nothing_changes(cipher, machine_state, mp=mp):
            proc = kmsfs(store, "mount", str(cipher), str(mp), *via_agent, "--domain", "payroll")
        refused(proc, exitcodes.VERIFICATION, "the volume's Domain is public, not payroll")
    finally:
        agent.stop()
    assert "Traceback" not in agent.log(), agent.log()


# --- found by the review of the above --------------------------------------------------------


def test_fsck_reencrypt_and_decrypt_hold_the_volume_to_its_domain_too(
    store: Store, tmp_path: Path, machine_state: Path
) -> None:
    """The whole directory replaced by a volume of another Domain, config and all (consistent,
    so the config check has nothing to catch): mount refused it, but decrypt --cipherdir read
    the attacker's content back as good and fsck called it clean."""
    victim, evil, mp = tmp_path / "victim", tmp_path / "evil", tmp_path / "mnt"
    init(store, victim, "payroll")
    init(store, evil, "public", state=tmp_path / "evil-state")
    env = {"KMSFS_STATE_DIR": str(tmp_path / "evil-state")}
    mp.mkdir()
    assert kmsfs(store, "mount", str(evil), str(mp), env=env).returncode == 0
    try:
        (mp / "salaries.txt").write_bytes(b"alice 999999\n")
    finally:
        subprocess.run(["fusermount3", "-u", str(mp)], check=True)
    _wait_for_the_daemon(evil)
    shutil.rmtree(victim)
    shutil.copytree(evil, victim, symlinks=True)
    (forged,) = [p for p in victim.iterdir() if not p.name.startswith("kmsfs.")]
    out = tmp_path / "recovered"
    for args in (("fsck", str(victim)), ("reencrypt", str(victim)),
                 ("decrypt", "--cipherdir", str(victim), str(forged), str(out))):
        with nothing_changes(victim, machine_state):
            proc = kmsfs(store, *args)
        refused(proc, exitcodes.VERIFICATION, "with Domain payroll", "now names Domain public")
    assert not out.exists()
    # With no record here, --domain says it.
    shutil.rmtree(machine_state / "volumes")
    proc = kmsfs(store, "fsck", str(victim), "--domain", "payroll")
    refused(proc, exitcodes.VERIFICATION, "not payroll as --domain")
    info = json.loads(kmsfs(store, "info", str(victim), "--json").stdout)
    assert info["domain_name"] == "public" and info["machine_record"] is None


def test_a_symlink_at_the_mounted_path_does_not_get_past_the_record(
    store: Store, tmp_path: Path, machine_state: Path
) -> None:
    """Keyed on the real path alone: whoever writes the directory above (a synced folder's
    other peer) moved the volume aside, pointed it at another Domain and left a symlink at the
    path the operator mounts; its real path had no record, and it mounted."""
    sync = tmp_path / "sync"
    sync.mkdir()
    vault, mp = sync / "vault", tmp_path / "mnt"
    init(store, vault, "payroll")
    with mounted(store, vault, mp) as m:
        (m / "old.txt").write_bytes(b"payroll data")
    hidden = sync / ".vault-moved"
    os.rename(vault, hidden)
    point_at(store, hidden, "public")
    vault.symlink_to(".vault-moved")
    with nothing_changes(hidden, machine_state, mp=mp):
        proc = kmsfs(store, "mount", str(vault), str(mp))
    refused(proc, exitcodes.VERIFICATION, f"the volume at {vault} with Domain payroll")


def test_records_in_a_directory_of_another_user_or_through_a_symlink_are_refused(
    store: Store, tmp_path: Path, machine_state: Path
) -> None:
    """A ``volumes/`` another user made (in a state directory an earlier version left 0777)
    let them remove records at will; one replaced by a symlink was read through, and no record
    could be written: trusted on first use at every mount."""
    cipher, mp = tmp_path / "cipher", tmp_path / "mnt"
    mp.mkdir()
    init(store, cipher, "payroll")
    volumes = machine_state / volumepin.RECORDS
    os.chown(volumes, 65534, 65534)
    with nothing_changes(cipher, mp=mp):
        proc = kmsfs(store, "mount", str(cipher), str(mp))
    refused(proc, exitcodes.VERIFICATION, f"{volumes}: owned by uid 65534")
    os.chown(volumes, 0, 0)
    elsewhere = tmp_path / "elsewhere"
    volumes.rename(elsewhere)
    volumes.symlink_to(elsewhere)
    with nothing_changes(cipher, mp=mp):
        proc = kmsfs(store, "mount", str(cipher), str(mp))
    refused(proc, exitcodes.VERIFICATION, f"{volumes}: not a directory of its own")


@pytest.mark.slow
def test_a_busy_volume_is_refused_before_the_hsm_or_the_log_file_is_touched(
    store: Store, tmp_path: Path, machine_state: Path
) -> None:
    """A second mount of a mounted volume is refused (DESIGN §2.6) with nothing changed: it
    used to log in to an HSM first (SoftHSM rewrote its token files) and create its
    --log-file, and only then find the volume's lock taken."""
    cipher, mp, second = tmp_path / "cipher", tmp_path / "mnt", tmp_path / "mnt2"
    init(store, cipher, "payroll")
    second.mkdir()
    log = tmp_path / "second.log"
    with mounted(store, cipher, mp):
        with nothing_changes(store.path, machine_state, mp=second):
            proc = kmsfs(store, "mount", str(cipher), str(second), "--log-file", str(log))
        refused(proc, exitcodes.USAGE, f"{cipher}: busy: ")
        assert not log.exists()


def test_a_domain_of_the_same_name_from_another_store_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two stores may each have a Domain payroll: the record holds the store's root Trust
    too, so a kmsfs.conf switched to the other store's payroll (whose HSMs and operators are
    others) is refused, with the line saying it is another store's, and the record kept."""
    monkeypatch.setenv("KMSFS_STATE_DIR", str(tmp_path / "state"))
    cipher = tmp_path / "cipher"
    cipher.mkdir()
    ours, theirs = "a1" * 32, "b2" * 32
    assert volumepin.remember(cipher, "payroll", ours)
    volumepin.check(cipher, "payroll", ours)
    with pytest.raises(IntegrityError, match="names Domain payroll of another store"):
        volumepin.check(cipher, "payroll", theirs)
    assert not volumepin.remember(cipher, "payroll", theirs)  # the first record stands
    volumepin.check(cipher, "payroll", ours)


def test_a_store_rebuilt_from_the_newest_export_opens_older_volumes_and_files(
    tmp_path: Path,
) -> None:
    """operators.md §4: a store that lost a Domain takes it back with `domain import` of the
    newest generation it has. Review: a volume and a `kmsfs encrypt` file made at an older
    generation were then refused for good (exit 3, "not in the store's history ... merge that
    copy first", which a lost history makes impossible), though the newest generation holds
    the master keys they need. Their bindings link them to it now: both open, and the mount
    serves the store's newest generation."""
    admin = Admin.under(tmp_path / "site")
    admin("init", "--hsms", "2")
    store = Store(admin, admin.real_domain("payroll"))
    cipher, mp = tmp_path / "vol", tmp_path / "mnt"
    init(store, cipher, "payroll")
    with mounted(store, cipher, mp):
        (mp / "pay.txt").write_text("salaries at generation 1")
    plain, sealed = tmp_path / "hr.txt", tmp_path / "hr.enc"
    plain.write_text("a file encrypted at generation 1")
    done = kmsfs(store, "encrypt", "--domain", "payroll", str(plain), str(sealed))
    assert done.returncode == 0, done.stderr
    admin("domain", "rotate", "payroll")
    admin("domain", "rotate", "payroll")  # generation 3, with mk epochs 1 to 3
    newest = admin.export("payroll", tmp_path / "payroll.domain")
    rebuilt = Store(admin.copy(tmp_path / "rebuilt"), store.trust)
    shutil.rmtree(rebuilt.path / "domains")  # the Domain's history lost
    rebuilt.admin("domain", "import", str(newest))
    info = json.loads(kmsfs(rebuilt, "info", str(cipher), "--json").stdout)
    assert info["verified"] is True and info["generation"] == 3, info
    # Offered the volume's older generation, the import takes nothing in: written beside the
    # newest, it would leave a hole in the history.
    history = tree_snapshot(rebuilt.path / "domains")
    taken = rebuilt.admin("--json", "domain", "import", str(cipher)).json
    assert (taken["domain_added"], taken["in_store"], taken["generation"]) == (False, False, 1)
    said = rebuilt.admin("domain", "import", str(cipher)).stdout
    assert said.startswith("domain payroll: generation 1 not taken in: the store's newer "), said
    assert tree_snapshot(rebuilt.path / "domains") == history
    rebuilt.admin("domain", "verify", "payroll")
    with mounted(rebuilt, cipher, mp):
        assert (mp / "pay.txt").read_text() == "salaries at generation 1"
        (mp / "new.txt").write_text("written under generation 3")
    out = tmp_path / "hr.out"
    done = kmsfs(rebuilt, "decrypt", str(sealed), str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "a file encrypted at generation 1"


@pytest.mark.parametrize(("cut", "where"), [
    ("SIGINT", "reencrypt_tree"), ("SIGTERM", "reencrypt_tree"), ("SIGINT", "kms.check_bundle")
])
def test_a_reencrypt_cut_short_says_to_run_it_again(
    store: Store, tmp_path: Path, cut: str, where: str
) -> None:
    """Review: a Ctrl-C in `kmsfs reencrypt` said "kmsfs: interrupted" and nothing more, though
    a mount refuses a volume whose re-encryption of names was cut short until it is run again.
    The line now names the volume and the command that finishes it; the exit code stays. Cut
    while it still verifies the Domain, nothing was touched: the line says no more."""
    cipher = tmp_path / "vol"
    init(store, cipher, "payroll")
    code = (
        "import signal, sys\n"
        "from kmsfs.fs import cli, reencrypt\n"
        "def cut(*args, **kwargs):\n"
        f"    signal.raise_signal(signal.{cut})\n"
        f"reencrypt.{where} = cut\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "reencrypt", "--upgrade", str(cipher)], capture_output=True,
        text=True, timeout=120, env=clean_env(KMSFS_STORE=str(store.path)), check=False,
    )
    word, status = ("interrupted", 130) if cut == "SIGINT" else ("terminated", 143)
    assert proc.returncode == status, proc.stderr
    if where != "reencrypt_tree":
        assert proc.stderr.splitlines() == [f"kmsfs: {word}"]
        return
    assert proc.stderr.splitlines() == [
        f"kmsfs: {word}: {cipher} is partly re-encrypted: run 'kmsfs reencrypt --upgrade "
        f"{cipher}' again to finish it (it resumes where it stopped); a mount may refuse the "
        "volume until then"
    ]
