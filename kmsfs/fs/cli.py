"""``kmsfs``: make, mount, unmount and describe encrypted volumes.

Each command parses, calls one function and renders. Every check that can fail runs before
anything is mounted or written, and fails with one ``kmsfs: error: ...`` line and a stable exit
code (:mod:`kmsfs.exitcodes`). The key management system is reached only through
:mod:`kmsfs.fs.kms`.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shlex
import subprocess
import sys
from argparse import SUPPRESS
from collections.abc import Callable
from pathlib import Path

from kmsfs import __version__, exitcodes
from kmsfs.cliutil import (
    Parser,
    Terminated,
    add_agent_options,
    emit_json,
    merge_store,
    run,
    say_what_is_left,
    setup_logging,
)
from kmsfs.completion import bash_script
from kmsfs.errors import FormatError, IntegrityError, KmsfsError, UsageError
from kmsfs.fs import (
    daemon,
    daemonlog,
    fsck,
    fusermount,
    kms,
    latency,
    reencrypt,
    singlefile,
    volumepin,
)
from kmsfs.fs.config import CONFIG_NAME, VolumeConfig, bundle_names, shown
from kmsfs.fs.reencrypt_names import check_not_rekeying
from kmsfs.fs.volume import (
    check_mountpoint,
    check_outside,
    check_root_only,
    create_volume,
    is_mount_point,
    lock_for_mount,
    mount_at,
    open_volume,
    volume_served,
)
from kmsfs.service.context import STORE_DEFAULT

log = logging.getLogger(__name__)

PROG = "kmsfs"

EPILOGS = {
    "init": "example:\n  kmsfs init /srv/cipher --domain payroll --store /srv/kms\n",
    "mount": "examples:\n  kmsfs mount /srv/cipher /mnt/payroll\n"
    "  kmsfs mount /srv/cipher /mnt/payroll --domain payroll   # refuse any other Domain\n"
    "  kmsfs mount /srv/cipher /mnt/payroll -o allow_other --foreground\n"
    "  kmsfs mount /srv/cipher /mnt/payroll --agent /run/kmsfs/hsmd.sock\n"
    "  kmsfs mount /srv/cipher /mnt/payroll --agent hsm.example.org:7440 \\\n"
    "      --agent-cert me.crt --agent-key me.key --agent-ca agent-ca.pem\n",
    "umount": "example:\n  kmsfs umount /mnt/payroll\n",
    "info": "example:\n  kmsfs info /srv/cipher --json\n",
    "completion": "example:\n"
    "  kmsfs completion bash > /usr/share/bash-completion/completions/kmsfs\n",
    "encrypt": "examples:\n  kmsfs encrypt --domain payroll report.pdf report.pdf.kmsfs\n"
    "  tar c data/ | kmsfs encrypt --domain payroll - - > data.tar.kmsfs\n"
    "\nOUT is written atomically (temporary file, fsync, link) and never replaces an existing\n"
    "file unless --force. The file carries its Domain and Trust chain, so 'kmsfs decrypt'\n"
    "needs only the store and an HSM of the Trust.\n",
    "decrypt": "examples:\n  kmsfs decrypt report.pdf.kmsfs report.pdf\n"
    "  kmsfs decrypt data.tar.kmsfs - | tar x\n"
    "  kmsfs decrypt --cipherdir /srv/cipher /srv/cipher/Xr3k...Q /tmp/recovered\n"
    "\nNothing is written to OUT unless every chunk authenticates (OUT appears by link, and an\n"
    "existing OUT is refused unless --force). To stdout, a seekable IN is verified in full\n"
    "first; if IN and OUT are both pipes, output stops before the first bad chunk and only the\n"
    "exit status tells that it was cut short.\n"
    "--cipherdir reads one file of a kmsfs volume (the filesystem format), which cannot detect\n"
    "blocks dropped at its end.\n",
    "fsck": "examples:\n  kmsfs fsck /srv/cipher\n  kmsfs fsck /srv/cipher --json | jq .problems\n"
    f"\nexit status: 0 clean, {exitcodes.DAMAGED} damage found, others as for any command.\n",
    "reencrypt": "examples:\n  kmsfs umount /mnt/payroll\n"
    "  kmsfs-admin domain rotate payroll      # after removing an HSM from the Trust\n"
    "  kmsfs reencrypt /srv/cipher --store /srv/kms\n"
    "  kmsfs reencrypt /srv/old-cipher --upgrade --json | jq .epochs_after\n"
    "\nRewrites every file keyed with an older mk epoch at the Domain's current epoch, one file\n"
    "at a time, each atomically (temporary file, fsync, rename), then seals every symlink\n"
    "target and xattr value of an older epoch again at it, then moves every directory's names\n"
    "keyed with an older epoch to it (each entry renamed to its name under the new key).\n"
    "Interrupted, it can simply be run again: what is at the current epoch is skipped, and a\n"
    "directory left half moved is finished (until then kmsfs mount refuses the volume). The\n"
    "volume must not be mounted. Directories whose names it moves from a retired epoch are\n"
    "listed (one a run missed before the retirement, or one rolled back). --upgrade first adds\n"
    "the flags a volume made before them lacks (KeyEpochs, LongXattrNames, NameEpochs; kmsfs\n"
    "versions older than a flag then refuse to mount it). On a volume without\n"
    "SymlinkXattrEpochs (made before it), it also moves symlink targets and xattr values of\n"
    "retired epochs, listing each (a volume whose Domain retired epoch 1 since), and adds that\n"
    "flag once all are moved; on any other volume they stay refused, as by the mount.\n"
    f"\nexit status: 0 done, {exitcodes.DAMAGED} some files or names could not be re-keyed "
    "(listed; run kmsfs fsck),\n2 mounted or a flag missing, others as for any command.\n",
}


def cmd_init(args: argparse.Namespace) -> int:
    """Export the Domain from the store, check it verifies, write a new volume."""
    store = kms.store_dir(args.store)
    bundle = kms.export_bundle(store, args.domain)
    desc = kms.describe(store, bundle)
    if not desc.get("verified"):
        raise IntegrityError(f"Domain {args.domain}: does not verify: {desc.get('problem')}")
    if desc.get("superseded_by"):
        raise UsageError(kms.superseded_warning(desc) + "; a new volume waits for that")
    if not desc.get("key_binding"):  # it would never mount until then
        raise IntegrityError(
            f"domain {args.domain} predates key binding: an operator must bind it first "
            f"('kmsfs-admin domain rewrap {args.domain} --trust {str(desc.get('trust_id'))[:12]}')"
            "; a new volume waits for that"
        )
    config = VolumeConfig(
        domain_name=str(desc.get("name") or args.domain),
        domain_id=kms.domain_id_of(desc),
        domain_bundle=bundle,
    )
    # The root's names at the Domain's current epoch (its epochs are 1 to "epochs").
    create_volume(Path(args.cipherdir), config, int(desc.get("epochs") or 1))
    try:  # a new volume here is the operator's doing: whatever the record said, it is this now
        volumepin.remember(Path(args.cipherdir), config.domain_name, _store_root(config),
                           replace=True)
    except (OSError, KmsfsError) as exc:
        print(f"kmsfs: warning: cannot record on this machine which Domain {args.cipherdir} "
              f"uses: {_why(exc)} (its first mount here will record it)", file=sys.stderr)
    if args.json:
        emit_json({"cipherdir": str(Path(args.cipherdir).resolve()),
                   "domain_name": config.domain_name, "domain_id": config.domain_id})
    else:
        print(f"volume {args.cipherdir} created for Domain {config.domain_name} "
              f"({config.domain_id})")
    return exitcodes.OK


def _checked_config(args: argparse.Namespace) -> tuple[VolumeConfig, Path, set[str]]:
    """Everything ``mount`` checks before forking: volume, mount point, options, Domain, and
    that the Domain is the one the volume should use (:func:`_check_volume_domain`)."""
    expected = _expected_domain(args)
    options = daemon.mount_options(args.options, Path(args.cipherdir))
    if daemon.LOW_LATENCY in options and (why := latency.check_available()) is not None:
        raise UsageError(f"-o {daemon.LOW_LATENCY}: {why}")
    config = open_volume(Path(args.cipherdir))  # its names are its bundle's (config.validate)
    check_root_only(Path(args.cipherdir))
    check_outside(Path(args.cipherdir), Path(args.mountpoint))
    check_mountpoint(Path(args.mountpoint))
    # Busy (mounted, being re-encrypted) is said before anything is touched: the daemon takes
    # the lock for good only after its HSM login and its log file (DESIGN §2.6).
    os.close(lock_for_mount(Path(args.cipherdir)))
    check_not_rekeying(Path(args.cipherdir))  # after "busy": a running reencrypt has it too
    agent = _agent(args)
    store = Path(".")
    if agent is not None:  # the agent verifies against its own root and checks its policy
        desc = kms.describe_via_agent(config.domain_bundle, agent)
        if desc.get("name") != config.domain_name:
            raise IntegrityError(
                f"{args.cipherdir}: config names Domain {config.domain_name}, "
                f"the agent opened {desc.get('name')}"
            )
    else:
        store = kms.store_dir(args.store)
        try:
            desc = kms.describe(store, config.domain_bundle)
        except FormatError as exc:  # the config's bundle itself is malformed: name the file
            raise type(exc)(
                f"{Path(args.cipherdir) / CONFIG_NAME}: domain_bundle: {exc}"
            ) from None
        if not desc.get("verified"):
            raise kms.problem_error(desc)(
                f"{args.cipherdir}: Domain {config.domain_name} does not verify: "
                f"{desc.get('problem')}"
            )
        kms.check_not_rolled_back(desc)
    _check_volume_domain(Path(args.cipherdir), config, expected)
    _warn_if_superseded(args, desc)
    return config, store, options


def _domain_option(p: argparse.ArgumentParser, before: str = "", also: str = "") -> None:
    p.add_argument(
        "--domain",
        metavar="NAME",
        help=f"{before}refuse unless the volume's Domain is NAME (its kmsfs.conf cannot vouch "
        f"for itself){also}",
    )


def _check_volume_before_reading(args: argparse.Namespace, cipherdir: Path) -> None:
    """fsck, reencrypt and decrypt --cipherdir hold a volume to its Domain as mount does
    (--domain, and this machine's record): whoever can write CIPHERDIR and derive with another
    Domain of the store could put a volume of that Domain in its place, config and all, which
    would then read back, or check, as good."""
    if args.domain is not None and not args.domain:
        raise UsageError("--domain is empty: name the Domain the volume must use")
    _check_volume_domain(cipherdir, open_volume(cipherdir), args.domain)


def _expected_domain(args: argparse.Namespace) -> str | None:
    """The Domain the caller says the volume must use: ``--domain NAME``, or kmsfs's own mount
    option ``-o domain=NAME`` (the /etc/fstab form, which mount.kmsfs passes on), taken out of
    ``args.options`` here so that it never reaches the kernel. None if neither is given;
    UsageError for an empty NAME (kmsfs@.service with no KMSFS_DOMAIN) or two that differ."""
    named, rest = daemon.split_domain(args.options)
    args.options = [",".join(rest)] if rest else []
    if args.domain is not None:
        named.insert(0, args.domain)
    if any(not name for name in named):
        raise UsageError(
            "--domain (or -o domain=) is empty: name the Domain the volume must use "
            "(for kmsfs@.service, KMSFS_DOMAIN= in its /etc/kmsfs/NAME.env)"
        )
    if len(set(named)) > 1:
        raise UsageError(f"--domain / -o domain=: {' and '.join(sorted(set(named)))} conflict")
    return named[0] if named else None


def _check_volume_domain(cipherdir: Path, config: VolumeConfig, expected: str | None) -> None:
    """IntegrityError unless the volume's verified Domain is the one it should use: the one
    ``expected`` names (--domain), and the one this machine recorded for the volume at its
    first mount or ``kmsfs init`` (:mod:`kmsfs.fs.volumepin`). Its config cannot say: whoever
    can write CIPHERDIR can put another verified Domain of the store there."""
    if expected is not None and config.domain_name != expected:
        raise IntegrityError(
            f"{cipherdir}: the volume's Domain is {config.domain_name}, not {expected} as "
            "--domain (or -o domain=) says: a misspelt name, another volume, or a kmsfs.conf "
            "changed since; nothing done"
        )
    volumepin.check(cipherdir, config.domain_name, _store_root(config))


def _store_root(config: VolumeConfig) -> str | None:
    """The root Trust id of the store the volume's Domain belongs to (its bundle verified)."""
    names = bundle_names(config.domain_bundle)
    return names.root if names is not None else None


def _warn_if_superseded(args: argparse.Namespace, desc: dict[str, object]) -> None:
    """Warn (stderr, and the daemon's log: cmd_mount) that the Domain's Trust has a successor
    and a rewrap is due; the mount goes on, since volumes were bound before it."""
    if desc.get("superseded_by"):
        args.warning = kms.superseded_warning(desc)
        print(f"kmsfs: warning: {args.warning}", file=sys.stderr)


def cmd_mount(args: argparse.Namespace) -> int:
    config, store, options = _checked_config(args)
    cipherdir, mountpoint = Path(args.cipherdir).resolve(), Path(args.mountpoint).resolve()
    # The daemon leaves the caller's directory once it serves (daemon.daemonize): what it may
    # reach by path later (the store, the token config, the log file) must not be relative.
    store = store.resolve()
    if args.log_file is not None:
        args.log_file = Path(args.log_file).resolve()
    for var in ("SOFTHSM2_CONF", "KMSFS_AGENT_CERT", "KMSFS_AGENT_KEY", "KMSFS_AGENT_CA"):
        if os.environ.get(var):
            os.environ[var] = os.path.abspath(os.environ[var])
    for name in ("agent_cert", "agent_key", "agent_ca"):
        if getattr(args, name, None):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    agent = getattr(args, "agent", None)  # unix:PATH, a socket path (with a "/"), HOST:PORT
    if agent and agent.startswith("unix:"):
        args.agent = "unix:" + os.path.abspath(agent[5:])
    elif agent and "/" in agent:
        args.agent = os.path.abspath(agent)

    def child(report_ready: Callable[[], None]) -> None:
        daemonlog.setup_logging(
            foreground=args.foreground, debug=args.debug, log_file=args.log_file
        )
        if getattr(args, "warning", None) and not args.foreground:  # else stderr has it
            log.warning("%s", args.warning)
        with kms.open_deriver(store, config.domain_bundle, _agent(args)) as deriver:
            kms.check_in_use(deriver)  # again: the store may have changed since the check
            if hasattr(deriver, "check_move"):  # a move is checked as this mount was
                deriver.check_move = kms.check_move  # against this machine's record
            follow = getattr(deriver, "follow_in_background", None)
            if follow is not None:  # take in retirements: from the store, or asking the agent
                follow()

            def record_generation() -> None:
                # A read-only mount writes nothing in the volume. The machine's record is its
                # own (kmsfs.fs.seen).
                conf = cipherdir / CONFIG_NAME
                if "ro" not in options:
                    _keep_record(
                        f"the Domain generation in use in {conf}",
                        lambda: kms.keep_newest_copy(cipherdir, deriver),
                        f"{conf} now carries Domain generation %d",
                    )
                _keep_record(
                    "the Domain generation this machine mounted",
                    lambda: kms.remember_in_use(deriver),
                    "this machine has now mounted Domain generation %d",
                )

            def ready() -> None:
                # Only now, so a failed mount changes nothing.
                record_generation()
                if hasattr(deriver, "on_move"):  # and again for each generation it moves to
                    deriver.on_move = record_generation
                _keep_record(
                    f"which Domain {cipherdir} uses",
                    lambda: config.domain_name if volumepin.remember(
                        cipherdir, config.domain_name, _store_root(config)) else None,
                    f"this machine now holds {cipherdir} to Domain %s (kmsfs.fs.volumepin)",
                )
                report_ready()

            daemon.serve(cipherdir, mountpoint, deriver, options, on_ready=ready)

    summary = {"cipherdir": str(cipherdir), "mountpoint": str(mountpoint),
               "domain_name": config.domain_name, "domain_id": config.domain_id,
               "foreground": bool(args.foreground)}

    def mounted() -> None:
        if args.json:
            emit_json(summary)
            sys.stdout.flush()
        else:
            print(f"kmsfs: mounted {cipherdir} on {mountpoint}", file=sys.stderr)

    if args.foreground:
        child(lambda: mounted())
        return exitcodes.OK
    code = daemon.daemonize(child)
    if code == exitcodes.OK and args.json:
        emit_json(summary)
    return code


def _keep_record(what: str, record: Callable[[], int | str | None], done: str) -> None:
    """Keep one record of what a mount uses (the generation: the volume's copy, the machine's;
    the volume's Domain: the machine's): a config or state directory that cannot be written
    costs a warning, never the mount. *done* is logged with what *record* returns, if not None.
    """
    try:
        written = record()
    except (OSError, KmsfsError) as exc:
        log.warning("cannot record %s: %s", what, _why(exc))
        return
    if written is not None:
        log.info(done, written)


def _why(exc: OSError | KmsfsError) -> object:
    """What went wrong, for a one-line warning: an OSError's strerror without its errno."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else exc


def _agent(args: argparse.Namespace) -> kms.AgentOptions | None:
    if not getattr(args, "agent", None):
        return None
    return kms.AgentOptions(args.agent, args.agent_cert, args.agent_key, args.agent_ca)


def _agent_options(parser: argparse.ArgumentParser, store_needed: bool = False) -> None:
    add_agent_options(
        parser,
        "get keys from kmsfs-hsmd instead of opening the HSMs in this process (the agent "
        + ("verifies the Domain; the store still names it)" if store_needed
           else "verifies the Domain; --store is then not needed)"),
    )


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = Path(args.mountpoint)
    if not is_mount_point(mountpoint):  # a dead mount (its daemon killed) is one too
        if not os.path.lexists(mountpoint):
            raise UsageError(f"{mountpoint}: no such directory")
        raise UsageError(f"{mountpoint}: not a mount point")
    # As root, fusermount3 -u unmounts whatever is there: a typo must not take a disk away.
    # Any FUSE mount of this kind passes (-o subtype= and fsname= rename kmsfs's own); block
    # devices (fuseblk: ntfs-3g, exfat-fuse) and other file systems do not.
    found = mount_at(mountpoint)
    if found is not None and found[0] != "fuse" and not found[0].startswith("fuse."):
        raise UsageError(
            f"{mountpoint}: not a kmsfs mount ({found[0]} from {found[1]}); nothing unmounted"
        )
    lazily = False
    done, why = fusermount.unmount(mountpoint)
    if not done and fusermount.busy(why):
        # A mount whose daemon is gone has nothing left to write back: detached lazily, or a
        # file still open on it keeps it there for good, and no mount can go there again.
        if not _daemon_gone(mountpoint, found[1] if found is not None else None):
            raise UsageError(
                f"{mountpoint}: busy: a file or directory on it is in use; nothing unmounted "
                "(close them and try again, or stop the daemon with SIGTERM, which detaches "
                "the mount and serves them until they are closed)"
            )
        lazily = True
        done, why = fusermount.unmount(mountpoint, lazy=True)
    if not done:
        raise KmsfsError(f"{mountpoint}: cannot unmount: {why}")
    if args.json:
        emit_json({"mountpoint": os.path.abspath(mountpoint), "lazily": lazily})
    elif lazily:
        print(f"{mountpoint}: detached, its daemon gone (what still has it open gets ENOTCONN)")
    return exitcodes.OK


#: How long ``kmsfs umount`` waits for a mount's statfs before taking its daemon as alive.
STATFS_WAIT_SECONDS = 2.0


def _daemon_gone(mountpoint: Path, source: str | None) -> bool:
    """Whether the daemon of the busy mount at *mountpoint* is gone, asked without entering
    the mount where it can be helped.

    A kmsfs volume as the mount's source (the default, :func:`daemon.source_name`): its
    daemon holds the volume's lock for as long as it serves, so a lock nobody holds means
    no daemon. Otherwise statfs(2), which a dead FUSE connection fails with ENOTCONN at once
    (stat(2) would not do: the kernel answers it from its attribute cache for a while), asked
    by a child process killed after a short wait: a stopped daemon never answers, and a caller
    waiting in the mount would keep it busy."""
    if source is not None and os.path.isabs(source) and (Path(source) / CONFIG_NAME).is_file():
        held = volume_served(Path(source))
        if held is not None:
            return not held
    try:
        asked = subprocess.run(
            ["stat", "-f", "-c", "%t", "--", str(mountpoint)], capture_output=True, text=True,
            timeout=STATFS_WAIT_SECONDS, env=fusermount.c_locale(),
        )
    except subprocess.TimeoutExpired:
        return False
    return asked.returncode != 0 and os.strerror(errno.ENOTCONN) in asked.stderr


def _not_a_mount_point(cipherdir: Path, command: str) -> None:
    """UsageError if *cipherdir* is where a kmsfs volume is mounted (the plaintext view):
    "kmsfs.conf: no such file (not a kmsfs volume?)" left the user to find the mix-up."""
    if os.path.lexists(cipherdir / CONFIG_NAME):
        return  # a volume made inside a mount's plaintext view is a volume all the same
    mounted = mount_at(cipherdir)
    if mounted is not None and mounted[0] == "fuse.kmsfs":
        raise UsageError(
            f"{cipherdir} is the mount point of the kmsfs volume {mounted[1]}: give the "
            f"ciphertext directory ('kmsfs {command} {mounted[1]}')"
        )


def cmd_info(args: argparse.Namespace) -> int:
    _not_a_mount_point(Path(args.cipherdir), "info")
    config = open_volume(Path(args.cipherdir))
    info: dict[str, object] = {
        "cipherdir": str(args.cipherdir),
        "format_version": config.format_version,
        "feature_flags": list(config.feature_flags),
        "domain_name": config.domain_name,
        "domain_id": config.domain_id,
        "creator": config.creator,
    }
    try:
        pin = volumepin.load(Path(args.cipherdir))
    except KmsfsError as exc:
        info["machine_record"] = f"unreadable: {exc}"
    else:  # what this machine holds the volume to (kmsfs.fs.volumepin): a mount checks it
        info["machine_record"] = pin.domain if pin is not None else None
    # Every key is there whatever the outcome (null when unknown): scripts index them.
    for key in ("verified", "problem", "generation", "epochs", "retired_below", "key_binding",
                "trust_id", "hsms", "superseded_by"):
        info[key] = None
    try:
        desc = kms.describe(kms.store_dir(args.store), config.domain_bundle)
        info["verified"], info["problem"] = bool(desc.get("verified")), desc.get("problem")
        if desc.get("verified"):  # the name that verified, not the config's claim of it
            info["domain_name"] = desc.get("name")
        # What a mount uses: the store's newest generation (after a rewrap, not the copy here).
        info["generation"] = desc.get("generation")
        info["epochs"] = desc.get("epochs")
        info["retired_below"] = desc.get("retired_below")  # file keys below it are refused
        info["key_binding"] = desc.get("key_binding")  # no: a mount is refused until a rewrap
        info["trust_id"] = desc.get("trust_id")
        info["hsms"] = list(desc.get("hsms") or [])  # the HSMs that can serve the Domain
        info["superseded_by"] = desc.get("superseded_by")  # rewrap due (kms.superseded_warning)
        if desc.get("verified"):
            # What a mount refuses besides the chain: a generation older than the one this
            # machine mounted (store and kmsfs.conf rolled back together), another Domain
            # than the one this machine holds the volume to. Scripts read `verified`.
            kms.check_not_rolled_back(desc)
            volumepin.check(Path(args.cipherdir), config.domain_name, _store_root(config),
                            report_only=True)  # a report: no directory's mode is changed
    except KmsfsError as exc:
        info["verified"], info["problem"] = False, str(exc)
    except OSError as exc:  # this machine's records unreadable (EACCES, EIO): reported too
        info["verified"], info["problem"] = False, f"{exc.filename}: {exc.strerror}"
    if args.json:
        emit_json(info)
    else:
        for key, value in info.items():
            if value is None:
                continue
            if key == "hsms":
                value = ", ".join(f"{h['label']} ({h['id']})" for h in value)  # type: ignore[attr-defined]
            elif isinstance(value, bool):
                value = "yes" if value else "no"
            elif isinstance(value, list):
                value = ", ".join(map(str, value))
            print(f"{key + ':':16} {shown(str(value))}")  # kmsfs.conf is anyone's text
    return exitcodes.OK


def cmd_encrypt(args: argparse.Namespace) -> int:
    _json_needs_a_file(args)
    singlefile.check_output(args.output, args.force)  # said first, before the store is read
    store = kms.store_dir(args.store)  # the Domain is looked up there, --agent or not
    size = singlefile.encrypt(
        store, args.domain, args.input, args.output, _agent(args), force=args.force
    )
    if args.json:
        emit_json({"input": _shown_path(args.input), "output": _shown_path(args.output),
                   "domain_name": args.domain, "plaintext_bytes": size})
    return exitcodes.OK


def cmd_decrypt(args: argparse.Namespace) -> int:
    _json_needs_a_file(args)
    singlefile.check_output(args.output, args.force)  # said first, before the store is read
    store = kms.store_dir(args.store)
    if args.cipherdir:
        _check_volume_before_reading(args, Path(args.cipherdir))
        size = singlefile.recover(store, Path(args.cipherdir), args.input, args.output,
                                  _agent(args), force=args.force)
    else:
        if args.domain is not None and not args.domain:
            raise UsageError("--domain is empty: name the Domain the file must be of")
        size = singlefile.decrypt(store, args.input, args.output, _agent(args),
                                  force=args.force, domain=args.domain)
    if args.json:
        emit_json({"input": _shown_path(args.input), "output": _shown_path(args.output),
                   "plaintext_bytes": size})
    return exitcodes.OK


def _shown_path(arg: str) -> str:
    """A file argument as --json reports it: absolute (as the mount's paths are), or "-"."""
    return arg if arg == singlefile.STDIO else str(Path(arg).resolve())


def _json_needs_a_file(args: argparse.Namespace) -> None:
    """--json prints on stdout: not when OUT is stdout too (checked before any work)."""
    if args.json and singlefile.is_stream_output(args.output):
        raise UsageError(f"--json: OUT {args.output} is not a regular file; the summary "
                         "would be mixed into it (leave out --json)")


def cmd_fsck(args: argparse.Namespace) -> int:
    _not_a_mount_point(Path(args.cipherdir), "fsck")
    _check_volume_before_reading(args, Path(args.cipherdir))
    report = fsck.fsck(kms.store_dir(args.store), Path(args.cipherdir), _agent(args))
    if args.json:
        emit_json(report.to_json())
    else:
        for problem in report.problems:
            print(f"damaged: {_describe(problem)}")
        for problem in report.warnings:
            print(f"warning: {_describe(problem)}")
        counts = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report.checked.items())
        found = len(report.problems)
        verdict = "clean" if report.clean else f"{found} problem{'s' if found > 1 else ''} found"
        print(f"{args.cipherdir}: {verdict} (checked {counts})")
        if report.epochs:
            print(f"files per key epoch: {_per_epoch(report.epochs, report.current_epoch)}")
        if report.name_epochs:
            print("directories per key epoch of their names: "
                  f"{_per_epoch(report.name_epochs, report.current_epoch)}")
        if report.symlink_epochs:
            print("symlinks per key epoch of their targets: "
                  f"{_per_epoch(report.symlink_epochs, report.current_epoch)}")
        if report.xattr_epochs:
            print("xattr values per key epoch: "
                  f"{_per_epoch(report.xattr_epochs, report.current_epoch)}")
    return exitcodes.OK if report.clean else exitcodes.DAMAGED


def _per_epoch(counts: dict[int, int], current: int | None = None) -> str:
    """``epoch 1: 120, epoch 2: 4`` (``none`` if empty), and with *current* how many are
    below it: ``; 120 below the current epoch 2``."""
    per = ", ".join(f"epoch {e}: {n}" for e, n in sorted(counts.items())) or "none"
    old = sum(n for e, n in counts.items() if current and e < current)
    return per + (f"; {old} below the current epoch {current}" if old else "")


def cmd_reencrypt(args: argparse.Namespace) -> int:
    _check_volume_before_reading(args, Path(args.cipherdir))
    try:
        summary = reencrypt.reencrypt(
            kms.store_dir(args.store), Path(args.cipherdir), _agent(args), upgrade=args.upgrade
        )
    except (KeyboardInterrupt, Terminated) as exc:
        if getattr(exc, "kmsfs_rewriting", False):  # not while it verified or logged in
            again = shlex.join(["kmsfs", "reencrypt", *(["--upgrade"] if args.upgrade else []),
                                str(args.cipherdir)])
            say_what_is_left(exc, f"{args.cipherdir} is partly re-encrypted: run '{again}' "
                                  "again to finish it (it resumes where it stopped); a mount "
                                  "may refuse the volume until then")
        raise
    if args.json:
        emit_json(summary.to_json())
    else:
        for failure in summary.failed:
            where = failure.path or f"(ciphertext) {failure.cipher_path}"
            print(f"not re-encrypted: {where}: {failure.detail}")
        for moved in summary.retired_values:  # the migration's: a planted one shows here
            where = moved.path or f"(ciphertext) {moved.cipher_path}"
            print(f"moved from retired key epoch {moved.epoch}: {where}: {moved.what}")
        for directory in summary.retired_dirs:
            print(f"names moved from a retired key epoch: {directory} (missed by a run before "
                  "the retirement, or rolled back: check its names)")
        if summary.upgraded:
            print(f"{args.cipherdir}: flag(s) added: {', '.join(summary.flags_added)}")
        for flag in summary.flags_pending:
            print(f"{args.cipherdir}: {flag} not added yet: some symlink targets or xattr "
                  "values were not moved (listed); run 'kmsfs reencrypt --upgrade' again once "
                  "they are repaired or removed")
        print(
            f"{args.cipherdir}: {summary.rewritten} file(s) re-encrypted at epoch "
            f"{summary.current_epoch}, {summary.skipped} already there, {summary.empty} empty, "
            f"{summary.temp_removed} leftover temporary file(s) removed"
        )
        print(f"files per key epoch: before {_per_epoch(summary.epochs_before)}; "
              f"after {_per_epoch(summary.epochs_after)}")
        print(f"directories per key epoch of their names: before "
              f"{_per_epoch(summary.name_epochs_before)}; after "
              f"{_per_epoch(summary.name_epochs_after)} ({summary.dirs_rekeyed} re-keyed)")
        if summary.symlink_epochs_before:
            print(f"symlinks per key epoch of their targets: before "
                  f"{_per_epoch(summary.symlink_epochs_before)}; after "
                  f"{_per_epoch(summary.symlink_epochs_after)} "
                  f"({summary.symlinks_rewritten} rewritten)")
        if summary.xattr_epochs_before:
            print(f"xattr values per key epoch: before "
                  f"{_per_epoch(summary.xattr_epochs_before)}; after "
                  f"{_per_epoch(summary.xattr_epochs_after)} "
                  f"({summary.xattrs_resealed} sealed again)")
    return exitcodes.DAMAGED if summary.failed else exitcodes.OK


def _describe(problem: fsck.Problem) -> str:
    where = problem.path if problem.path is not None else f"(ciphertext) {problem.cipher_path}"
    if problem.block is not None:
        where += f": block {problem.block} (plaintext offset {problem.offset})"
    if problem.kind == "block":
        return f"{where} {problem.detail}"
    return f"{where}: {problem.kind}: {problem.detail}"


def cmd_completion(args: argparse.Namespace) -> int:
    print(bash_script(build_parser(), PROG), end="")
    return exitcodes.OK


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=PROG,
        description="Encrypted volumes keyed by HSM-governed Domains.",
        epilog="example, bind a directory to a Domain, mount it, use it, unmount:\n"
        "  kmsfs init /srv/cipher --domain payroll --store /srv/kms\n"
        "  kmsfs mount /srv/cipher /mnt/payroll --store /srv/kms\n"
        "  cp report.pdf /mnt/payroll/ && kmsfs umount /mnt/payroll\n"
        "every command has --help with an example; the store defaults to $KMSFS_STORE",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--json", action="store_true", help="print results as JSON (also after the command)"
    )
    parser.add_argument(
        "--store", help=f"store directory (also after the command; default: {STORE_DEFAULT})"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=EPILOGS[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    store_help = f"store directory (default: {STORE_DEFAULT})"
    p = add("init", "create a new encrypted volume bound to a Domain")
    p.add_argument("cipherdir", help="ciphertext directory (missing or empty)")
    p.add_argument("--domain", required=True, help="name of the Domain in the store")
    p.add_argument("--store", dest="store_after", metavar="STORE", default=SUPPRESS,
                   help=store_help)
    p.add_argument("--json", action="store_true", default=SUPPRESS, help="JSON summary")
    p.set_defaults(func=cmd_init)

    p = add("mount", "verify a volume's Domain and mount its plaintext view")
    p.add_argument("cipherdir", help="ciphertext directory made by 'kmsfs init'")
    p.add_argument("mountpoint", help="empty directory to mount on")
    p.add_argument("--store", dest="store_after", metavar="STORE", default=SUPPRESS,
                   help=store_help)
    p.add_argument("-f", "--foreground", action="store_true", help="do not daemonize")
    _domain_option(p, also="; also -o domain=NAME, the /etc/fstab form")
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTS",
        help="mount options, e.g. allow_other,ro; kmsfs's own: writeback_cache, "
        "low_latency (root: idle CPUs poll while busy, faster small requests, more power); "
        "all in docs/operators.md",
    )
    p.add_argument("--debug", action="store_true", help="debug logging")
    p.add_argument("--json", action="store_true", default=SUPPRESS,
                   help="once mounted, print the volume, mount point and Domain as JSON")
    p.add_argument("--log-file", type=Path, metavar="FILE",
                   help="append the daemon's log here, made 0600 (default: stderr with "
                   "--foreground, else syslog/the journal, else, with no syslog, "
                   "/var/log/kmsfs.log as root and ~/.cache/kmsfs/kmsfs.log otherwise)")
    _agent_options(p)
    p.set_defaults(func=cmd_mount)

    p = add("umount", "unmount a kmsfs mount point (refused while a file on it is in use; a "
            "mount whose daemon died is detached at once)")
    p.add_argument("mountpoint")
    p.add_argument("--json", action="store_true", default=SUPPRESS,
                   help="print the mount point unmounted, and whether it was detached "
                   "lazily (its daemon gone), as JSON")
    p.set_defaults(func=cmd_umount)

    p = add("info", "describe a volume and whether its Domain verifies")
    p.add_argument("cipherdir")
    p.add_argument("--store", dest="store_after", metavar="STORE", default=SUPPRESS,
                   help=store_help)
    p.add_argument("--json", action="store_true", default=SUPPRESS, help="JSON output")
    p.set_defaults(func=cmd_info)

    p = add("encrypt", "encrypt one file for a Domain (a self-contained encrypted file)")
    p.add_argument("--domain", required=True, help="name of the Domain in the store")
    p.add_argument("--store", dest="store_after", metavar="STORE", default=SUPPRESS,
                   help=store_help)
    p.add_argument("input", metavar="IN", help="file to encrypt, or - for stdin")
    p.add_argument("output", metavar="OUT", help="encrypted file to write, or - for stdout "
                   "(an existing file is refused unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT (a new file: its mode and hard links go)")
    p.add_argument("--json", action="store_true", default=SUPPRESS,
                   help="print IN, OUT and the bytes encrypted as JSON (not with OUT -)")
    _agent_options(p, store_needed=True)
    p.set_defaults(func=cmd_encrypt)

    p = add("decrypt", "decrypt one file; its Domain is read from the file itself")
    p.add_argument("--store", dest="store_after", metavar="STORE", default=SUPPRESS,
                   help=store_help)
    p.add_argument(
        "--cipherdir",
        metavar="DIR",
        help="IN is a ciphertext file of the volume DIR (its Domain is in DIR/kmsfs.conf)",
    )
    p.add_argument(
        "--domain",
        metavar="NAME",
        help="refuse unless the file's Domain (with --cipherdir, the volume's) is NAME: the file "
        "(a volume's kmsfs.conf) names its Domain itself, and any verified Domain of the store "
        "would decrypt",
    )
    p.add_argument("input", metavar="IN", help="encrypted file, or - for stdin")
    p.add_argument("output", metavar="OUT", help="plaintext file to write (mode 0600), or - "
                   "(an existing file is refused unless --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing OUT (a new file: its mode and hard links go)")
    p.add_argument("--json", action="store_true", default=SUPPRESS,
                   help="print IN, OUT and the bytes decrypted as JSON (not with OUT -)")
    _agent_options(p)
    p.set_defaults(func=cmd_decrypt)

    p = add("fsck", "check every name, symlink and block of a volume without mounting it")
    p.add_argument("cipherdir", help="ciphertext directory made by 'kmsfs init'")
    _domain_option(p)
    p.add_argument("--store", dest="store_after", metavar="STORE", default=SUPPRESS,
                   help=store_help)
    p.add_argument("--json", action="store_true", default=SUPPRESS, help="JSON output")
    _agent_options(p)
    p.set_defaults(func=cmd_fsck)
    p = add("reencrypt", "re-key every file, name, symlink and xattr of an unmounted volume at "
            "the Domain's current mk epoch (resumable)")
    p.add_argument("cipherdir", help="ciphertext directory made by 'kmsfs init' (not mounted)")
    _domain_option(p)
    p.add_argument("--store", dest="store_after", metavar="STORE", default=SUPPRESS,
                   help=store_help)
    p.add_argument("--json", action="store_true", default=SUPPRESS, help="JSON summary")
    p.add_argument("--upgrade", action="store_true",
                   help="first add the flags a volume made before them lacks (KeyEpochs, "
                   "LongXattrNames, NameEpochs; SymlinkXattrEpochs once its symlink targets "
                   "and xattr values, retired epochs' too, have moved)")
    _agent_options(p)
    p.set_defaults(func=cmd_reencrypt)

    p = add("completion", "print a shell completion script")
    p.add_argument("shell", choices=["bash"], help="the shell (bash; zsh via bashcompinit)")
    p.set_defaults(func=cmd_completion)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    merge_store(parser, args)
    if args.func is not cmd_mount:  # the mount sets up its own log (kmsfs.fs.daemonlog)
        # A warning from inside (a planted store document left out) reads "kmsfs: warning:"
        setup_logging(getattr(args, "verbose", False), PROG)
    if args.json and args.func is cmd_completion:
        return run(PROG, lambda: _refuse("--json: completion prints a shell script"))
    return run(PROG, lambda: args.func(args))


def _refuse(why: str) -> int:
    raise UsageError(why)


if __name__ == "__main__":
    sys.exit(main())
