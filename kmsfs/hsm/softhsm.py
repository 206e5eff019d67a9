"""The embedded default HSM: SoftHSM2 tokens kept inside the store's private directory.

Each store has its own ``softhsm2.conf`` and token directory (mode 0700), so nothing
system-wide changes and tests give every store its own tokens. ``softhsm2-util`` only takes
PINs on its command line, so a token is initialized with throwaway random PINs which are then
changed through PKCS#11 (C_SetPIN): the real PIN never appears in a process list. The SO PIN is
replaced by a random value that is not kept: nobody can reset the user PIN.
"""

import contextlib
import hashlib
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from kmsfs.errors import HsmError, HsmUnavailableError, StoreError, UsageError
from kmsfs.hsm import library
from kmsfs.hsm.library import TokenLocation
from kmsfs.ownership import first_replaceable
from kmsfs.store.writable import writing

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


def config_text(token_dir: Path) -> str:
    """The softhsm2.conf that keeps tokens in ``token_dir``: a path, no secret."""
    return (
        f"directories.tokendir = {token_dir.resolve()}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )


def write_config(conf_path: Path, token_dir: Path) -> None:
    """Write a softhsm2.conf that keeps tokens in ``token_dir`` (created 0700).

    The config is in the store's private area: failing to write it (a read-only store) is a
    StoreError naming it, not a raw OSError."""
    with writing(conf_path, "the SoftHSM config"):
        token_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _publish(conf_path, config_text(token_dir))


def config_outside(token_dir: Path) -> Path:
    """A softhsm2.conf for ``token_dir`` kept outside the store, for a store that cannot be
    written and whose own config names another path (restored, moved or bind-mounted).

    One per token directory and user, in a directory of the user's own (0700, under
    $XDG_RUNTIME_DIR or the temporary directory), rewritten when used and shared by every
    process reading that store: the mount daemon reaches it after its fork and may need it
    again to re-initialize SoftHSM2 long after the command that forked it exited, so it is not
    removed at exit. It holds the token directory's path only, no secret."""
    token_dir = token_dir.resolve()
    name = hashlib.sha256(str(token_dir).encode()).hexdigest()[:32]
    conf = _own_runtime_dir() / f"softhsm2-{name}.conf"
    text = config_text(token_dir)
    with writing(conf, "a SoftHSM config outside the read-only store"):
        try:
            if conf.read_text() == text:
                return conf
        except FileNotFoundError:
            pass
        _publish(conf, text)
    return conf


def _own_runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/kmsfs, else TMPDIR/kmsfs-UID: made 0700, and refused unless it is a
    directory of this user that nobody else may write (a shared /tmp), below directories that
    no other user can replace (:func:`_check_above`).

    Its path is used by name long after this check (SoftHSM2 reads the config at every
    C_Initialize, the token-files lock is opened beside it), so a directory another user could
    rename away and replace, however private itself, would hand them the config: root run
    with a user's XDG_RUNTIME_DIR (``su`` without ``-``, ``sudo -E``) pointed SoftHSM at their
    token directory (found by review)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    uid = os.geteuid()
    parent = Path(runtime) if runtime else Path(tempfile.gettempdir())
    name = "kmsfs" if runtime else f"kmsfs-{uid}"
    with writing(parent / name, "a SoftHSM config outside the read-only store"):
        _check_above(parent, uid)
        parent = Path(os.path.realpath(parent))  # used as resolved, symlink-free
        base = parent / name
        with contextlib.suppress(FileExistsError):
            os.mkdir(base, 0o700)
        info = os.lstat(base)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise StoreError(
            f"{base}: not a private directory of this user (mode 0700), refusing to keep a "
            "SoftHSM config there"
        )
    return base


def _check_above(directory: Path, uid: int) -> None:
    """StoreError unless no other user can replace *directory* or a directory or symlink on
    the way to it (:func:`kmsfs.ownership.first_replaceable`): each is this user's or root's,
    and nobody else may write a directory unless it is sticky (/tmp, where others cannot rename
    what is not theirs)."""
    found = first_replaceable(directory, (uid, 0))
    if found is not None:
        above, why = found
        who = f"others may write it ({why})" if why.startswith("mode") else why
        raise StoreError(
            f"{above}: {who}, so another user could replace what is below it; refusing to "
            "keep a SoftHSM config there (set XDG_RUNTIME_DIR to a directory of your own)"
        )


def _publish(conf_path: Path, text: str) -> None:
    """Replace ``conf_path`` atomically with ``text`` (mode 0600)."""
    # A temporary name of its own (not just per process): two threads of the agent may both
    # find a moved store's config stale and rewrite it at once.
    fd, temp = tempfile.mkstemp(prefix=f".{conf_path.name}.", dir=conf_path.parent)
    try:
        with os.fdopen(fd, "w") as out:  # mkstemp creates it 0600
            out.write(text)
        os.replace(temp, conf_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


#: SoftHSM2's shortest user PIN (``softhsm2-util`` and C_SetPIN refuse shorter ones).
MIN_PIN_LENGTH = 4
#: SoftHSM2's longest user PIN, in bytes (C_SetPIN refuses longer ones).
MAX_PIN_LENGTH = 255


@contextlib.contextmanager
def new_token(conf_path: Path, label: str, user_pin: str) -> Iterator[TokenLocation]:
    """A new token labelled ``label`` (user PIN ``user_pin``) for the block to set up.

    If the creation or the block fails, however (an error, Ctrl-C, SIGTERM), that token and
    only it is deleted again, by its serial number: a retry would otherwise meet two tokens
    with the label, and every later use of it would fail as ambiguous.
    """
    location, serial = _create(conf_path, label, user_pin)
    try:
        yield location
    except BaseException:
        _delete_serials(conf_path, location, {serial})
        raise


def create_token(conf_path: Path, label: str, user_pin: str) -> TokenLocation:
    """Create a token labelled ``label`` that stays, whatever the caller does next."""
    return _create(conf_path, label, user_pin)[0]


def _create(conf_path: Path, label: str, user_pin: str) -> tuple[TokenLocation, str]:
    """Initialize a new token; return where it is and its serial number."""
    if not MIN_PIN_LENGTH <= len(user_pin) <= MAX_PIN_LENGTH:
        raise UsageError(f"a token PIN needs {MIN_PIN_LENGTH} to {MAX_PIN_LENGTH} characters")
    util = _util()
    location = TokenLocation(default_module(), label, str(conf_path))
    temp_pin, temp_so_pin = secrets.token_hex(16), secrets.token_hex(16)
    with library.token_files_lock(str(conf_path)):
        library.refresh(location)
        before = set(library.token_serials(location))
        try:
            _init_token(util, conf_path, label, temp_pin, temp_so_pin)
            library.refresh(location)
            made = {s: t for s, t in library.token_serials(location).items() if s not in before}
            if len(made) != 1:
                raise HsmError(f"softhsm2-util made token {label!r}, but it cannot be found")
            ((serial, token),) = made.items()
            with library.hsm_errors(f"new token {label!r}"):
                with token.open(rw=True, user_pin=temp_pin) as session:
                    session.set_pin(temp_pin, user_pin)
                with token.open(rw=True, so_pin=temp_so_pin) as session:
                    session.set_pin(temp_so_pin, secrets.token_hex(32))
        except BaseException:
            made_now = set(library.token_serials(location)) - before
            _delete_serials(conf_path, location, made_now, locked=True)
            raise
    return location, serial


def tokens_labelled(conf_path: Path, label: str) -> int:
    """How many tokens labelled ``label`` there are behind ``conf_path``."""
    location = TokenLocation(default_module(), label, str(conf_path))
    with library.token_files_lock(str(conf_path)):
        library.refresh(location)
        return len(library.token_serials(location))


def delete_tokens_labelled(conf_path: Path, label: str) -> int:
    """Delete every token labelled ``label`` behind ``conf_path``; how many there were.

    Only for tokens known to be leftovers: those of an ``operator create`` that was killed
    outright, as its pending mark shows (:func:`kmsfs.service.operators.create_operator`).
    """
    location = TokenLocation(default_module(), label, str(conf_path))
    with library.token_files_lock(str(conf_path)):
        library.refresh(location)
        serials = set(library.token_serials(location))
        _delete_serials(conf_path, location, serials, locked=True)
    return len(serials)


def _delete_serials(
    conf_path: Path, location: TokenLocation, serials: set[str], locked: bool = False
) -> None:
    """Delete the tokens with these serial numbers (best effort: this runs on failure paths)."""
    if not serials:
        return
    util = shutil.which("softhsm2-util")
    if util is None:
        return
    env = dict(os.environ, SOFTHSM2_CONF=str(conf_path))
    with contextlib.ExitStack() as stack:
        if not locked:
            stack.enter_context(library.token_files_lock(str(conf_path)))
        for serial in sorted(serials):
            command = [util, "--delete-token", "--serial", serial]
            subprocess.run(command, env=env, capture_output=True, check=False)
        library.refresh(location)


def _util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise HsmUnavailableError("softhsm2-util is not installed (apt-get install softhsm2)")
    return util


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
        tokens = _token_dir(conf_path)
        if _nearly_full(tokens):
            # softhsm2-util says only "Please check log files" (review: a full disk read as a
            # missing HSM, exit 4): a full disk is named as every other write to it is.
            raise StoreError(
                f"{tokens}: cannot make token {label!r}: No space left on device"
            )
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise HsmError(
            f"softhsm2-util could not create token {label!r}: {detail[-1] if detail else '?'}"
        )


#: Free space under which a failed token creation is put down to a full disk (a new SoftHSM2
#: token takes a few KiB).
_FULL_BELOW = 256 * 1024


def _token_dir(conf_path: Path) -> Path:
    """The token directory a softhsm2.conf names (:func:`config_text`), else its own dir."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in conf_path.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "directories.tokendir":
                return Path(value.strip())
    return conf_path.parent


def _nearly_full(directory: Path) -> bool:
    try:
        found = os.statvfs(directory)
    except OSError:
        return False
    return found.f_bavail * found.f_frsize < _FULL_BELOW
