"""The embedded default HSM: SoftHSM2 tokens kept inside the store's private directory.

Each store has its own ``softhsm2.conf`` and token directory (mode 0700), so nothing
system-wide changes and tests give every store its own tokens. ``softhsm2-util`` only takes
PINs on its command line, so a token is initialized with throwaway random PINs which are then
changed through PKCS#11 (C_SetPIN): the real PIN never appears in a process list. The SO PIN is
replaced by a random value that is not kept: nobody can reset the user PIN.
"""

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from kmsfs.errors import HsmError, HsmUnavailableError
from kmsfs.hsm import library
from kmsfs.hsm.library import TokenLocation

DEFAULT_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def default_module() -> str:
    """The SoftHSM2 module path on this machine (KMSFS_SOFTHSM_MODULE overrides)."""
    override = os.environ.get("KMSFS_SOFTHSM_MODULE")
    if override:
        return override
    for candidate in DEFAULT_MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise HsmUnavailableError("SoftHSM2 is not installed (apt-get install softhsm2)")


def write_config(conf_path: Path, token_dir: Path) -> None:
    """Write a softhsm2.conf that keeps tokens in ``token_dir`` (created 0700)."""
    token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A temporary name of its own (not just per process): two threads of the agent may both
    # find a moved store's config stale and rewrite it at once.
    fd, temp = tempfile.mkstemp(prefix=f".{conf_path.name}.", dir=conf_path.parent)
    with os.fdopen(fd, "w") as out:  # mkstemp creates it 0600
        out.write(
            f"directories.tokendir = {token_dir.resolve()}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = false\n"
        )
    os.replace(temp, conf_path)


def create_token(conf_path: Path, label: str, user_pin: str) -> TokenLocation:
    """Initialize a new token labelled ``label`` whose user PIN is ``user_pin``."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise HsmUnavailableError("softhsm2-util is not installed (apt-get install softhsm2)")
    location = TokenLocation(default_module(), label, str(conf_path))
    temp_pin, temp_so_pin = secrets.token_hex(16), secrets.token_hex(16)
    with library.token_files_lock(str(conf_path)):
        _init_token(util, conf_path, label, temp_pin, temp_so_pin)
        library.refresh(location)
        token = library.find_token(location)
        with token.open(rw=True, user_pin=temp_pin) as session:
            session.set_pin(temp_pin, user_pin)
        with token.open(rw=True, so_pin=temp_so_pin) as session:
            session.set_pin(temp_so_pin, secrets.token_hex(32))
    return location


def _init_token(util: str, conf_path: Path, label: str, pin: str, so_pin: str) -> None:
    """Run ``softhsm2-util --init-token``; its PINs are throwaway ones (see the module doc)."""
    env = dict(os.environ, SOFTHSM2_CONF=str(conf_path))
    result = subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin,
            "--so-pin",
            so_pin,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise HsmError(
            f"softhsm2-util could not create token {label!r}: {detail[-1] if detail else '?'}"
        )


def delete_token(conf_path: Path, label: str) -> None:
    """Remove a token this process created, when the step that needed it failed."""
    util = shutil.which("softhsm2-util")
    if util is None:
        return
    env = dict(os.environ, SOFTHSM2_CONF=str(conf_path))
    command = [util, "--delete-token", "--token", label]
    with library.token_files_lock(str(conf_path)):
        subprocess.run(command, env=env, capture_output=True, check=False)
