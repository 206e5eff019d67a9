"""Test-only mount daemon: kmsfs's real operations with a software stand-in KeyDeriver.

Never part of the product: ``kmsfs mount`` only accepts Domains opened through the HSM. Run as
``python fs_mount_stub.py CIPHERDIR MOUNTPOINT [-o opts] [--epoch N] [--log-file F]``; prints
``ready`` on stdout once the mount is served, logs to stderr (or F). ``--epoch`` sets the
stand-in deriver's ``current_epoch`` (a Domain rotated N - 1 times).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fs_helpers import SoftDeriver

from kmsfs.fs import daemon, daemonlog


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cipherdir", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("--epoch", type=int, default=1, help="the deriver's current_epoch")
    parser.add_argument("--retired-below", type=int, default=1,
                        help="the deriver's retired_below (a retirement it has taken in)")
    parser.add_argument("--log-file", type=Path, help="log there instead of stderr")
    args = parser.parse_args()
    daemonlog.setup_logging(foreground=True, debug=args.debug, log_file=args.log_file)

    def ready() -> None:
        print("ready", flush=True)

    deriver = SoftDeriver(current_epoch=args.epoch, retired_below=args.retired_below)
    daemon.serve(args.cipherdir, args.mountpoint, deriver, daemon.mount_options(args.options),
                 on_ready=ready)


if __name__ == "__main__":
    main()
