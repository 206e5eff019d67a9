"""The console scripts: each tool is imported only once a Ctrl-C is sure to end it quietly.

A tool's imports (cryptography, python-pkcs11, pyfuse3, trio) take a few hundred
milliseconds, most of a short command's time. A Ctrl-C then used to print a Python traceback
from deep inside some import. Now it ends the program as it does later on: "PROG:
interrupted" and exit 130, until :func:`kmsfs.cliutil.run` takes the signal over. This module
and :mod:`kmsfs.cliutil` import only the standard library and kmsfs's error classes.
"""

from __future__ import annotations

import importlib

from kmsfs.cliutil import quiet_interrupts


def _launch(prog: str, module: str) -> int:
    quiet_interrupts(prog)
    main = importlib.import_module(module).main
    return int(main())


def kmsfs() -> int:
    return _launch("kmsfs", "kmsfs.fs.cli")


def kmsfs_admin() -> int:
    return _launch("kmsfs-admin", "kmsfs.admin.cli")


def kmsfs_hsmd() -> int:
    return _launch("kmsfs-hsmd", "kmsfs.agent.cli")


def mount_kmsfs() -> int:
    return _launch("mount.kmsfs", "kmsfs.fs.mounthelper")
