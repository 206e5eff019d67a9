"""Administrators' integration: the shipped systemd units and the mount(8) helper, for real.

The ``installed`` fixture (conftest.py) runs tools/install-system.sh (links into /usr/local/bin
and /usr/sbin, the unit into /etc/systemd/system) and removes exactly that afterwards.
"""

import fnmatch
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from kmsfs import exitcodes
from tests.integration.fs_helpers import Mount, is_mounted, make_volume
from tests.kms_helpers import Admin

ROOT = Path(__file__).resolve().parent.parent.parent
UNITS = sorted((ROOT / "systemd").iterdir())
MOUNT_SERVICE = ROOT / "systemd" / "kmsfs@.service"
AGENT_SERVICE = ROOT / "systemd" / "kmsfs-hsmd.service"
MOUNT_UNIT = ROOT / "systemd" / "srv-payroll.mount"
OPERATORS_GUIDE = ROOT / "docs" / "operators.md"


@pytest.fixture
def volume(initialized: Admin, tmp_path: Path) -> dict[str, str]:
    """A real Domain and a ciphertext directory bound to it; the unit's environment file."""
    initialized.real_domain()
    env = {
        "KMSFS_CIPHERDIR": str(tmp_path / "cipher"),
        "KMSFS_MOUNTPOINT": str(tmp_path / "mnt"),
        "KMSFS_DOMAIN": "payroll",  # required: the unit refuses a volume of any other Domain
        "KMSFS_STORE": str(initialized.store),
        "KMSFS_OPTIONS": "allow_other",
    }
    subprocess.run(
        [
            "/usr/local/bin/kmsfs",
            "init",
            env["KMSFS_CIPHERDIR"],
            "--domain",
            "payroll",
            "--store",
            env["KMSFS_STORE"],
        ],
        check=True,
        capture_output=True,
    )
    Path(env["KMSFS_MOUNTPOINT"]).mkdir()
    return env


def _unmount(path: str) -> None:
    for _ in range(50):
        if not os.path.ismount(path):
            return
        subprocess.run(["fusermount3", "-u", "-z", path], capture_output=True, check=False)
        time.sleep(0.1)


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_analyze_verify_passes(installed: None, unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert unit.name.split("@")[0] not in result.stderr, result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_the_units_documentation_is_installed_where_they_point(installed: None, unit: Path
                                                              ) -> None:
    """`systemctl help` opens Documentation=: it named a placeholder web address."""
    pages = values(unit, "Documentation")
    assert pages and all(page.startswith("file:///") for page in pages), pages
    for page in pages:
        assert Path(page.removeprefix("file://")).is_file(), page


def test_systemd_analyze_would_catch_a_broken_unit(installed: None, tmp_path: Path) -> None:
    """The check above is not vacuous: a unit with a missing binary fails it."""
    broken = tmp_path / "kmsfs-broken@.service"
    text = (ROOT / "systemd" / "kmsfs@.service").read_text()
    broken.write_text(text.replace("/usr/local/bin/kmsfs", "/usr/local/bin/kmsfs-missing"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(broken)], capture_output=True, text=True
    )
    assert result.returncode != 0


def _exec_start(env: dict[str, str]) -> list[str]:
    """The unit's own ExecStart line, expanded as systemd does from EnvironmentFile: ${VAR} is
    one word; a word that is just $VAR splits into words, none if VAR is empty or unset."""
    text = (ROOT / "systemd" / "kmsfs@.service").read_text()
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    expanded: list[str] = []
    for word in line.removeprefix("ExecStart=").split():
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            expanded += env.get(whole.group(1), "").split()
        else:
            expanded.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return expanded


def test_unit_exec_start_notifies_ready_once_serving_and_unmounts_on_sigterm(
    installed: None, volume: dict[str, str], tmp_path: Path
) -> None:
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(60)
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF",)}
    env.update(volume, NOTIFY_SOCKET=notify_path)
    proc = subprocess.Popen(_exec_start(volume), env=env, stderr=subprocess.PIPE, text=True)
    mnt = volume["KMSFS_MOUNTPOINT"]
    try:
        message = listener.recv(4096).decode()
        assert "READY=1" in message
        # at READY the mount must already answer
        assert os.path.ismount(mnt)
        Path(mnt, "hello.txt").write_text("served")
        assert Path(mnt, "hello.txt").read_text() == "served"
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in listener.recv(4096).decode()
        assert proc.wait(timeout=60) == 0
        assert not os.path.ismount(mnt)
        assert proc.stderr is not None
        log = proc.stderr.read()
        assert "mounted" in log and "unmounted" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _unmount(mnt)
        listener.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_mount_t_kmsfs_and_an_fstab_line(
    installed: None, volume: dict[str, str], tmp_path: Path
) -> None:
    cipher, mnt, store = (
        volume["KMSFS_CIPHERDIR"],
        volume["KMSFS_MOUNTPOINT"],
        volume["KMSFS_STORE"],
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "KMSFS_STORE")}
    try:
        subprocess.run(
            ["mount", "-t", "kmsfs", cipher, mnt, "-o", f"store={store},allow_other"],
            check=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert os.path.ismount(mnt)
        Path(mnt, "via-mount.txt").write_text("mount -t kmsfs")
        subprocess.run(["umount", mnt], check=True, capture_output=True, timeout=60)
        assert not os.path.ismount(mnt)

        fstab = tmp_path / "fstab"
        fstab.write_text(f"{cipher} {mnt} kmsfs store={store},allow_other,_netdev,noauto 0 0\n")
        subprocess.run(
            ["mount", "--fstab", str(fstab), mnt],
            check=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert Path(mnt, "via-mount.txt").read_text() == "mount -t kmsfs"
        subprocess.run(["umount", mnt], check=True, capture_output=True, timeout=60)

        # mount -a twice: the second skips the line as mounted, as for any file system. The
        # source was "kmsfs", which mount(8) could not match with the line: exit 32.
        fstab.write_text(f"{cipher} {mnt} kmsfs store={store},allow_other 0 0\n")
        for _ in range(2):
            done = subprocess.run(["mount", "-a", "--fstab", str(fstab)], capture_output=True,
                                  text=True, env=env, timeout=60)
            assert done.returncode == 0, done.stderr
        shown = subprocess.run(["findmnt", "-n", "-o", "SOURCE", mnt], capture_output=True,
                               text=True, check=True).stdout.split()
        assert shown == [os.path.realpath(cipher)]
        subprocess.run(["umount", mnt], check=True, capture_output=True, timeout=60)
    finally:
        _unmount(mnt)


def test_mount_helper_reports_errors_in_one_line(installed: None, volume: dict[str, str]) -> None:
    cipher, mnt = volume["KMSFS_CIPHERDIR"], volume["KMSFS_MOUNTPOINT"]
    result = subprocess.run(
        ["mount", "-t", "kmsfs", cipher, mnt, "-o", "store=/nonexistent/store"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "kmsfs: error:" in result.stderr and "/nonexistent/store" in result.stderr
    assert not os.path.ismount(mnt)
    assert shutil.which("mount.kmsfs") or Path("/usr/sbin/mount.kmsfs").exists()


# -- the unit files as systemd reads them ---------------------------------------------------------


def unit_settings(path: Path) -> list[tuple[str, str, str]]:
    """Every ``(section, key, value)`` of a unit file as systemd reads it: comment lines are
    skipped, and a line ending in a backslash goes on with the next (the backslash read as a
    space), comment lines in between skipped too."""
    settings: list[tuple[str, str, str]] = []
    section, pending = "", ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith(("#", ";")):
            continue
        line, pending = pending + line, ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif "=" in line:
            key, _, value = line.partition("=")
            settings.append((section, key.strip(), value.strip()))
    return settings


def values(path: Path, key: str) -> list[str]:
    """The values of ``key=`` in order; an empty assignment resets the list, as in systemd."""
    found: list[str] = []
    for _, name, value in unit_settings(path):
        if name == key:
            found = [*found, value] if value else []
    return found


def exec_line(path: Path, key: str, env: dict[str, str]) -> list[str]:
    """A unit's one ``key=`` command line as systemd runs it: ``${VAR}`` is replaced inside a
    word, a word that is just ``$VAR`` splits into words, ``$$`` is a literal ``$``, and the
    executable's prefixes (``-`` ignore failure, ...) are not part of it."""
    (line,) = values(path, key)
    words: list[str] = []
    for word in shlex.split(line):
        whole = re.fullmatch(r"\$(\w+)", word)
        if whole:
            words += env.get(whole.group(1), "").split()
            continue
        words.append(re.sub(
            r"\$\$|\$\{(\w+)\}",
            lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), ""),
            word,
        ))
    words[0] = words[0].lstrip("-@:+!")
    return words


def _char_device_group(node: str) -> str | None:
    """The /proc/devices name of a character device's major number (misc for /dev/fuse)."""
    try:
        major = os.major(os.stat(node).st_rdev)
    except FileNotFoundError:
        return None
    char = False
    for line in Path("/proc/devices").read_text().splitlines():
        if line.startswith("Character devices:"):
            char = True
        elif line.startswith("Block devices:"):
            char = False
        elif char and line.split() and int(line.split()[0]) == major:
            return line.split()[1]
    return None


PSEUDO_DEVICES = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"}


def device_allowed(unit: Path, node: str, access: str) -> bool:
    """Whether a unit's processes may open the device *node* for *access* (r, w), as
    systemd.resource-control(5) and systemd.exec(5) say: every device under the default
    DevicePolicy=auto with no DeviceAllow=; else only the pseudo devices (not under strict) and
    the allow-list. ProtectClock=yes implies DeviceAllow=char-rtc r, so it closes the policy
    too; PrivateDevices=yes gives a /dev of the pseudo devices only."""
    yes = ("yes", "true", "on", "1")
    allow = [entry.split() for entry in values(unit, "DeviceAllow")]
    if values(unit, "ProtectClock")[-1:] and values(unit, "ProtectClock")[-1] in yes:
        allow.append(["char-rtc", "r"])
    policy = (values(unit, "DevicePolicy") or ["auto"])[-1]
    if values(unit, "PrivateDevices")[-1:] and values(unit, "PrivateDevices")[-1] in yes:
        return node in PSEUDO_DEVICES
    if policy == "auto" and not allow:
        return True
    if policy != "strict" and node in PSEUDO_DEVICES:
        return True
    group = _char_device_group(node)
    for spec, *rights in allow:
        if not set(access) <= set(rights[0] if rights else "rwm"):
            continue
        if spec == node or (
            spec.startswith("char-") and group is not None and fnmatch.fnmatch(group, spec[5:])
        ):
            return True
    return False


@pytest.mark.parametrize(
    ("node", "access"), [("/dev/fuse", "rw"), ("/dev/cpu_dma_latency", "w")],
    ids=["fuse", "low_latency"],
)
def test_the_mount_unit_can_open_the_devices_a_mount_needs(node: str, access: str) -> None:
    """/dev/fuse for every mount, /dev/cpu_dma_latency for -o low_latency (opened write-only)."""
    assert device_allowed(MOUNT_SERVICE, node, access), (
        f"{MOUNT_SERVICE.name}: {node} ({access}) is blocked by its device policy"
    )


def test_the_device_check_knows_that_protect_clock_closes_the_policy(tmp_path: Path) -> None:
    """The check above is not vacuous: ProtectClock=yes alone shuts /dev/fuse out."""
    unit = tmp_path / "clock.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nProtectClock=yes\n")
    assert not device_allowed(unit, "/dev/fuse", "rw")
    assert device_allowed(unit, "/dev/null", "rw")
    unit.write_text("[Service]\nExecStart=/bin/true\n")
    assert device_allowed(unit, "/dev/fuse", "rw")


def test_the_mount_unit_gives_the_daemon_the_kernels_open_file_ceiling() -> None:
    """Every file open on the mount holds a daemon fd, for every user; the daemon cannot raise
    its hard limit under the unit's capabilities, so the unit sets it (fs.nr_open's default)."""
    assert "CAP_SYS_RESOURCE" not in values(MOUNT_SERVICE, "CapabilityBoundingSet")[-1]
    assert values(MOUNT_SERVICE, "LimitNOFILE") == ["1048576"]


@pytest.mark.parametrize("unit", [MOUNT_SERVICE, AGENT_SERVICE])
def test_the_units_allow_no_core_dump(unit: Path) -> None:
    """The daemons hold keys and plaintext; no core file of them, even before kmsfs runs."""
    assert values(unit, "LimitCORE") == ["0"]


PERMANENT_ERRORS = {
    exitcodes.USAGE, exitcodes.VERIFICATION, exitcodes.PIN, exitcodes.STORE, exitcodes.FORMAT
}


def restart_prevented(unit: Path) -> set[int]:
    return {int(c) for value in values(unit, "RestartPreventExitStatus") for c in value.split()}


@pytest.mark.parametrize(
    ("unit", "also"), [(MOUNT_SERVICE, {exitcodes.REFUSED}), (AGENT_SERVICE, set())],
    ids=[MOUNT_SERVICE.name, AGENT_SERVICE.name],
)
def test_a_configuration_error_is_not_restarted_forever(unit: Path, also: set[int]) -> None:
    """Restart=on-failure at a RestartSec= this slow never reaches the start limit: exit codes
    that a restart cannot cure must stop the restarts. Those it can (no HSM answered, any other
    error) must not."""
    assert values(unit, "Restart") == ["on-failure"]
    prevented = restart_prevented(unit)
    assert PERMANENT_ERRORS | also <= prevented
    assert not prevented & {exitcodes.OK, exitcodes.ERROR, exitcodes.HSM}


def test_configuration_errors_exit_with_codes_the_mount_unit_does_not_restart_on(
    installed: None, volume: dict[str, str], tmp_path: Path
) -> None:
    """The unit's own ExecStart, given an unknown option, a missing mount point, a store that
    is not there, exits with a code RestartPreventExitStatus= lists."""
    prevented = restart_prevented(MOUNT_SERVICE)
    base = {k: v for k, v in os.environ.items() if k not in ("SOFTHSM2_CONF", "KMSFS_STORE")}
    for change in (
        {"KMSFS_OPTIONS": "allow_other,no_such_option"},
        {"KMSFS_MOUNTPOINT": str(tmp_path / "no-such-mountpoint")},
        {"KMSFS_STORE": str(tmp_path / "no-such-store")},
    ):
        env = {**volume, **change}
        result = subprocess.run(
            _exec_start(env), env={**base, **env}, capture_output=True, text=True, timeout=60
        )
        assert result.returncode in prevented, (change, result.returncode, result.stderr)
        assert not is_mounted(Path(volume["KMSFS_MOUNTPOINT"]))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_exec_stop_post_detaches_a_dead_mount_and_nothing_else(
    tmp_path: Path, mounter
) -> None:  # type: ignore[no-untyped-def]
    """ExecStopPost= runs as root once the daemon has exited, whatever became of its start: it
    must clear its dead mount, even with a file still open on it, and leave alone what is not
    one (fusermount3 -u -z as root would detach any file system at that path)."""

    def stop_post(mountpoint: Path) -> None:
        line = exec_line(MOUNT_SERVICE, "ExecStopPost", {"KMSFS_MOUNTPOINT": str(mountpoint)})
        subprocess.run(line, capture_output=True, timeout=30, check=False)

    plain = tmp_path / "plain"
    plain.mkdir()
    stop_post(plain)
    stop_post(tmp_path / "missing")
    assert plain.is_dir() and not is_mounted(plain)

    other = tmp_path / "tmpfs"  # another file system at the mount point
    other.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(other)], check=True)
    try:
        stop_post(other)
        assert is_mounted(other), "ExecStopPost took away a tmpfs"
    finally:
        subprocess.run(["umount", str(other)], capture_output=True, check=False)

    # another daemon's live kmsfs mount, say from /etc/fstab, that made this start fail
    live: Mount = mounter(make_volume(tmp_path / "cipher-live"), name="live")
    stop_post(live.mountpoint)
    assert live.alive() and is_mounted(live.mountpoint), "ExecStopPost took away a live mount"
    (live.mountpoint / "f").write_text("still served")
    assert (live.mountpoint / "f").read_text() == "still served"

    # this unit's own mount, its daemon killed while a file is open on it
    dead: Mount = mounter(make_volume(tmp_path / "cipher-dead"), name="dead")
    (dead.mountpoint / "f").write_text("open")
    os.stat(dead.mountpoint)  # fresh attributes in the kernel's cache, as on a busy mount
    fd = os.open(dead.mountpoint / "f", os.O_RDONLY)
    try:
        assert dead.proc is not None
        dead.proc.send_signal(signal.SIGKILL)
        dead.proc.wait()
        assert is_mounted(dead.mountpoint)
        stop_post(dead.mountpoint)
        assert not is_mounted(dead.mountpoint), "the dead mount is still there"
    finally:
        os.close(fd)


def test_mounts_are_ordered_after_the_agent_without_depending_on_it() -> None:
    """A mount through the agent starts after its socket and, at shutdown, stops before the
    agent does. Ordering only: a Requires=/BindsTo=/PartOf= on the agent would take every
    mount down with a restart of the agent's socket. The guide's fstab lines that mount through
    the agent carry the same ordering."""
    after = " ".join(values(MOUNT_SERVICE, "After")).split()
    assert {"kmsfs-hsmd.socket", "kmsfs-hsmd.service"} <= set(after)
    for key in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert not any("kmsfs-hsmd" in v for v in values(MOUNT_SERVICE, key)), key
    fstab_lines = [
        line for line in OPERATORS_GUIDE.read_text().splitlines()
        if "/etc/fstab" in line and " kmsfs " in line
    ]
    through_agent = [line for line in fstab_lines if "agent=" in line]
    assert fstab_lines and through_agent
    for line in through_agent:
        assert "x-systemd.after=kmsfs-hsmd.socket" in line, line
        assert "x-systemd.after=kmsfs-hsmd.service" in line, line


def test_the_example_mount_unit_is_the_fstab_line_it_names() -> None:
    """srv-payroll.mount says it equals an fstab line, and the guide says so of its own line."""
    comment = next(
        line for line in MOUNT_UNIT.read_text().splitlines()
        if re.match(r"#\s+/\S+\s+/\S+\s+kmsfs\s", line)
    )
    what, where, fstype, options = comment.lstrip("#").split()[:4]
    unit = (values(MOUNT_UNIT, "What"), values(MOUNT_UNIT, "Where"), values(MOUNT_UNIT, "Type"))
    assert unit == ([what], [where], [fstype])
    assert values(MOUNT_UNIT, "Options") == [options]
    assert "_netdev" in options.split(",")
    guide = next(
        line for line in OPERATORS_GUIDE.read_text().splitlines()
        if "/etc/fstab" in line and f"{what} {where} kmsfs " in line
    )
    assert guide.split("'")[1].split()[:4] == [what, where, fstype, options]
