"""``mount.kmsfs``: what mount(8) runs for ``mount -t kmsfs`` and ``/etc/fstab`` lines.

mount(8) calls ``/usr/sbin/mount.kmsfs CIPHERDIR MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS]``.
kmsfs's own options name the key store (``store=DIR``) or the HSM agent to get keys from
(``agent=SOCKET|HOST:PORT``, with ``agent_cert=``, ``agent_key=``, ``agent_ca=`` for TLS: the
``--agent*`` flags of ``kmsfs mount``) and the daemon's log file (``log_file=PATH``, its
``--log-file``); options that only matter to mount(8) or
systemd (``noauto``, ``_netdev``, ``nofail``, ``x-systemd.*``, ...) are dropped; the rest go to
``kmsfs mount -o``, which refuses any it does not know. ``domain=NAME``, the Domain the volume
must use (a ``kmsfs.conf`` pointed at another Domain is refused), is among them: ``kmsfs
mount`` takes it as its own (:func:`kmsfs.fs.daemon.split_domain`), never the kernel's. The
mount daemonizes and this returns once the mount serves, as mount(8) expects.

    /srv/cipher/payroll /srv/payroll kmsfs store=/var/lib/kmsfs/store,domain=payroll,_netdev 0 0
    /srv/cipher/hr /srv/hr kmsfs agent=/run/kmsfs/hsmd.sock,domain=hr,_netdev 0 0
"""

import sys

from kmsfs import exitcodes
from kmsfs.cliutil import print_error
from kmsfs.fs import cli

PROG = "mount.kmsfs"

#: Options for mount(8), systemd or fstab bookkeeping: never passed to the filesystem.
USERSPACE_ONLY = frozenset(
    {
        "defaults",
        "auto",
        "noauto",
        "_netdev",
        "nofail",
        "user",
        "nouser",
        "users",
        "owner",
        "group",
        "loud",
        "silent",
    }
)
USERSPACE_PREFIXES = ("x-", "comment=", "helper=")


#: kmsfs's own options and the ``kmsfs mount`` flags they become.
FLAG_OPTIONS = {
    "store": "--store",
    "agent": "--agent",
    "agent_cert": "--agent-cert",
    "agent_key": "--agent-key",
    "agent_ca": "--agent-ca",
    "log_file": "--log-file",
}
#: What mount(8) may ask of a mount in place, which kmsfs does not do.
REMOUNT = "remount"


def split_options(options: str) -> tuple[list[str], list[str]]:
    """(flags for kmsfs mount, options for its -o) from a mount(8) option string."""
    flags, rest = [], []
    for opt in filter(None, (o.strip() for o in options.split(","))):
        name, sep, value = opt.partition("=")
        if sep and name in FLAG_OPTIONS:
            flags += [FLAG_OPTIONS[name], value]
        elif opt in USERSPACE_ONLY or opt.startswith(USERSPACE_PREFIXES):
            continue
        else:
            rest.append(opt)
    return flags, rest


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    positional: list[str] = []
    options = ""
    fake = False
    while args:
        arg = args.pop(0)
        if arg == "-o" and args:
            options = ",".join(filter(None, (options, args.pop(0))))
        elif arg.startswith("-o") and len(arg) > 2:
            options = ",".join(filter(None, (options, arg[2:])))
        elif arg in ("-N", "-t") and args:
            args.pop(0)  # namespace / type: not ours to handle
        elif arg.startswith("-") and len(arg) > 1:
            fake = fake or "f" in arg[1:]  # -f: fake mount; -s, -n, -v: nothing to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        print_error(PROG, "usage: mount.kmsfs CIPHERDIR MOUNTPOINT [-o store=DIR,domain=NAME,...]")
        return exitcodes.USAGE
    if fake:
        return exitcodes.OK
    if REMOUNT in (o.strip() for o in options.split(",")):
        print_error(PROG, f"{positional[1]}: a kmsfs mount cannot be changed in place "
                    "(-o remount): unmount it and mount it again; nothing was changed")
        return exitcodes.USAGE
    flags, rest = split_options(options)
    command = ["mount", *positional, *flags]
    if rest:
        command += ["-o", ",".join(rest)]
    return cli.main(command)


if __name__ == "__main__":
    sys.exit(main())
