"""Loading PKCS#11 modules and opening sessions, with failures turned into one-line errors.

SoftHSM2 reads ``SOFTHSM2_CONF`` once, at C_Initialize. kmsfs keeps the embedded tokens in the
store's own directory with its own softhsm2.conf, so this module sets the variable before a
module is initialized and re-initializes the module when a process moves to another store
(tests do; the tools use one store per process).
"""

import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import hmac
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pkcs11
from pkcs11 import exceptions as p11

from kmsfs.errors import HsmError, HsmUnavailableError, PinError

log = logging.getLogger(__name__)
T = TypeVar("T")
_lock = threading.Lock()
_conf_of_module: dict[str, str | None] = {}

#: Held around every PKCS#11 call this process makes. python-pkcs11 initializes a module with
#: C_Initialize(NULL): that tells the module the application will never call it from two
#: threads at once, and SoftHSM2 then runs without its own locks (concurrent calls corrupt its
#: state, crash the process, and have truncated token files). The agent serves clients from many
#: threads, so it keeps that promise here. A derive holds it for ~14 us. Reentrant, because an
#: ``hsm_errors`` block may call the helpers below.
CALLS = threading.RLock()
_open_sessions: dict[str, int] = {}


@dataclass(frozen=True)
class TokenLocation:
    """Where a token is: a module, a token label and, for SoftHSM, the config to use; and the
    token's serial number where its label alone does not tell it from another token's (every
    PIV card is labelled "PIV_II", say)."""

    module: str
    token_label: str
    softhsm_conf: str | None = None
    token_serial: str | None = None
    #: The module's file with symbolic links resolved, once, when the location is made: what
    #: this process loads and keys its state by. Two spellings of one library (a
    #: distribution's symlink beside the file) are one library, which must be initialized
    #: once: the second C_Initialize failed (CKR_CRYPTOKI_ALREADY_INITIALIZED) and the HSM
    #: enrolled through it never served. Resolved once, so that a link re-pointed while a
    #: session is open (a vendor's upgrade) cannot unbalance the counts kept under it.
    library: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "library", os.path.realpath(self.module))

    def describe(self) -> str:
        serial = f" (serial {self.token_serial})" if self.token_serial else ""
        return f"token {self.token_label!r}{serial} of {self.module}"


#: The token-files lock of each SoftHSM config this process holds: (file descriptor, depth).
_held_token_files: dict[str, tuple[int | None, int]] = {}


@contextlib.contextmanager
def token_files_lock(softhsm_conf: str | None) -> Iterator[None]:
    """Hold, across processes, the right to read or rewrite a SoftHSM2 store's token files.

    SoftHSM2's file backend rewrites a token's ``token.object`` on every C_Login (the PIN-count
    flags) and C_SetPIN. A process that runs C_Initialize meanwhile can misread the serial
    numbers of the tokens being rewritten (slot ids derive from them); two tokens then get one
    slot id and SoftHSM2 aborts the whole process (``SlotManager.cpp: Assertion `result.second'
    failed``: four operators signing a Trust at once did it in CI). Every kmsfs
    process therefore takes this ``flock`` around C_Initialize, C_Login, C_SetPIN and
    softhsm2-util; other reads fail with CKR_GENERAL_ERROR at worst, which :func:`_retrying`
    absorbs. Reentrant within the process (depth counted under :data:`CALLS`). A module that is
    not SoftHSM (no config) needs no lock; a store whose directory cannot hold the lock file is
    served without it.
    """
    if softhsm_conf is None:
        yield
        return
    softhsm_conf = os.path.realpath(softhsm_conf)  # a second fd of one file would deadlock
    with CALLS:
        fd, depth = _held_token_files.get(softhsm_conf, (None, 0))
        if depth == 0:
            fd = _open_lock_file(softhsm_conf)
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
        _held_token_files[softhsm_conf] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held_token_files.pop(softhsm_conf)
            if depth > 1:
                _held_token_files[softhsm_conf] = (fd, depth - 1)
            elif fd is not None:
                os.close(fd)  # releases the flock


def _open_lock_file(softhsm_conf: str) -> int | None:
    path = f"{softhsm_conf}.lock"
    try:
        # Never through a symlink: one planted at the path would have root create a file
        # wherever it leads.
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        log.debug("no token-files lock at %s (%s)", path, exc.strerror)
        return None


def _reinitialize(lib: "pkcs11.lib", softhsm_conf: str | None) -> None:
    """C_Finalize, then C_Initialize: the module reads every token again (under the lock)."""
    with token_files_lock(softhsm_conf):
        lib.reinitialize()


def _load(location: TokenLocation) -> "pkcs11.lib":
    module = location.module
    if not Path(module).exists():
        raise HsmUnavailableError(f"PKCS#11 module {module} does not exist")
    library = location.library
    with CALLS, _lock:
        if location.softhsm_conf is not None:
            os.environ["SOFTHSM2_CONF"] = location.softhsm_conf
        try:
            first = library not in _conf_of_module  # then pkcs11.lib runs C_Initialize
            with token_files_lock(location.softhsm_conf if first else None):
                lib = pkcs11.lib(library)
            previous = _conf_of_module.get(library, location.softhsm_conf)
            if previous != location.softhsm_conf:
                if _open_sessions.get(library):
                    raise HsmError(
                        f"{module} is in use with another SoftHSM config; "
                        "one process serves one store"
                    )
                _reinitialize(lib, location.softhsm_conf)
            _conf_of_module[library] = location.softhsm_conf
        except p11.PKCS11Error as exc:
            if "already initialized" in str(exc):
                raise HsmUnavailableError(
                    f"cannot load PKCS#11 module {module}: the library behind it is already in "
                    "use in this process through another module (a proxy or spy in front of "
                    "one already loaded); enroll its tokens through one module path"
                ) from exc
            raise HsmUnavailableError(f"cannot load PKCS#11 module {module}: {exc!r}") from exc
        finally:
            _clear_openssl_errors()
    return lib


def _clear_openssl_errors() -> None:
    """Empty this thread's OpenSSL error queue. SoftHSM2's C_Initialize leaves an error on it
    (ENGINE: NO_SUCH_ENGINE), and the next TLS read on the thread (the agent's) took that for
    its own failure: the first TLS client of a fresh agent lost its connection."""
    libcrypto = _libcrypto()
    if libcrypto is not None:
        libcrypto.ERR_clear_error()


@functools.cache
def _libcrypto() -> ctypes.CDLL | None:
    """The libcrypto this process shares with the ssl module and the PKCS#11 module, if any."""
    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


# SoftHSM2's file backend rewrites a token's files on login; another process reading them at
# that moment gets CKR_GENERAL_ERROR. Such transient failures are retried a few times.
TRANSIENT = (p11.GeneralError, p11.DeviceError, p11.TokenNotRecognised)
#: Failures that mean the token is gone (reported as unavailable, never as lacking something).
TOKEN_GONE = (p11.DeviceRemoved, p11.TokenNotPresent, p11.DeviceError)
#: Failures that say nothing of what the token can do (it is gone, or failed this once):
#: never a reason to try another way and record a weaker choice for good.
NOT_THE_TOKENS_ANSWER = (*TOKEN_GONE, *TRANSIENT)
RETRY_DELAYS = (0.02, 0.05, 0.1, 0.2, 0.4)


def _retrying(action: Callable[[], T]) -> T:
    for delay in RETRY_DELAYS:
        try:
            return action()
        except TRANSIENT as exc:
            log.debug("transient PKCS#11 failure (%s), retrying", type(exc).__name__)
            time.sleep(delay)
    return action()


def _tokens_labelled(lib: "pkcs11.lib", label: str) -> tuple[list["pkcs11.Token"], list[str]]:
    """Tokens whose label is ``label``, and what failed on the other slots.

    python-pkcs11's ``lib.get_token`` gives up on the first slot whose C_GetTokenInfo fails;
    SoftHSM2 answers CKR_GENERAL_ERROR for a token whose files vanished, so one removed token
    would hide every other one (and failover would find no HSM). Each slot is asked on its own.
    """
    found: list[pkcs11.Token] = []
    failed: list[str] = []
    for slot in lib.get_slots(token_present=True):
        try:
            token = slot.get_token()
        except p11.PKCS11Error as exc:
            failed.append(f"slot {slot.slot_id}: {type(exc).__name__}")
            continue
        if token.label == label:
            found.append(token)
    return found, failed


def token_serials(location: TokenLocation) -> dict[str, "pkcs11.Token"]:
    """The tokens labelled like ``location``, by serial number: more than one after a token
    creation was interrupted, which is how :mod:`kmsfs.hsm.softhsm` tells its own apart."""
    lib = _load(location)
    with CALLS:
        found, _ = _tokens_labelled(lib, location.token_label)
    return {_serial(token): token for token in found}


def _serial(token: "pkcs11.Token") -> str:
    return bytes(token.serial).decode(errors="replace").strip()


def find_token(location: TokenLocation) -> "pkcs11.Token":
    """Return the token, or HsmUnavailableError naming it."""
    lib = _load(location)

    def lookup() -> "pkcs11.Token":
        found, failed = _tokens_labelled(lib, location.token_label)
        if location.token_serial is not None:
            labelled = found
            want = location.token_serial.strip().casefold()
            found = [t for t in labelled if _serial(t).casefold() == want]
            if labelled and not found:
                serials = ", ".join(sorted(_serial(t) for t in labelled))
                failed = [*failed, f"tokens with this label have serials {serials}"]
        if len(found) > 1:
            serials = ", ".join(sorted(_serial(t) for t in found))
            raise HsmError(
                f"{location.describe()}: several tokens have this label (serials {serials}); "
                "name one with --token-serial"
            )
        if not found:
            why = f" ({'; '.join(failed)})" if failed else ""
            raise HsmUnavailableError(f"{location.describe()} is not present{why}")
        return found[0]

    try:
        try:
            with CALLS:
                return _retrying(lookup)
        except HsmUnavailableError:
            # A token that came back (files restored, device plugged in again) is seen only
            # after C_Initialize: rescan, unless sessions of this module are still in use.
            if not _rescan(lib, location.library):
                raise
            with CALLS:
                return _retrying(lookup)
    except p11.PKCS11Error as exc:
        raise HsmUnavailableError(f"{location.describe()}: {type(exc).__name__}") from exc


def _rescan(lib: "pkcs11.lib", module: str) -> bool:
    """Re-initialize ``module`` so it sees tokens again; False if sessions are open on it."""
    with CALLS, _lock:
        if _open_sessions.get(module):
            return False
        _reinitialize(lib, _conf_of_module.get(module))
    return True


def check_present(session: "pkcs11.Session", label: str) -> None:
    """Raise HsmUnavailableError unless the session's token still answers as ``label``.

    Session objects (the unwrapped ``mk``) live in the module's memory, so with SoftHSM2 they
    keep working after the token's files vanish; C_GetTokenInfo on the slot does not (it
    answers CKR_GENERAL_ERROR). A real HSM that is unplugged fails both ways.
    """
    try:
        with CALLS:
            token = session.token.slot.get_token()
    except p11.PKCS11Error as exc:
        raise HsmUnavailableError(
            f"token {label!r} is no longer present ({type(exc).__name__})"
        ) from exc
    if token.label != label:
        raise HsmUnavailableError(f"token {label!r} was replaced by {token.label!r}")


@dataclass
class _Login:
    """The session that holds a token's login for this process, and how many use it."""

    holder: "pkcs11.Session"
    users: int = 0


# PKCS#11 login state belongs to the application, not to a session: a second C_Login on a
# token fails (CKR_USER_ALREADY_LOGGED_IN) and closing any logged-in session logs every session
# of the token out (python-pkcs11's Session.close calls C_Logout). A long-lived process (the
# agent: an open Domain's session next to a checkpoint signer) needs several sessions on one
# token at once, so one holder session per token carries the login, every session handed out
# is opened without a PIN and shares it, and the holder logs out when the last user is done.
_logins: dict[tuple[str, int], _Login] = {}


#: PINs a token refused in this process, as keyed digests (never the PIN itself), per token.
#: A mount whose HSMs are all unavailable asks them again every second: it tried a wrong PIN
#: each time, and a real HSM locks its PIN after a few wrong tries (then only its security
#: officer can unlock it). A PIN once refused is not sent to that token again; a corrected PIN
#: (another value from the same file or credential) is tried.
_refused_pins: dict[tuple[str, str, str], set[bytes]] = {}
_PIN_DIGEST_KEY = secrets.token_bytes(32)


def _refusal_key(location: TokenLocation, token: "pkcs11.Token") -> tuple[str, str, str]:
    return location.library, token.label, str(token.serial)


def _login(location: TokenLocation, token: "pkcs11.Token", pin: str) -> tuple[str, int]:
    key = (location.library, int(token.slot.slot_id))
    with CALLS:
        login = _logins.get(key)
        if login is None:
            refused = _refused_pins.setdefault(_refusal_key(location, token), set())
            digest = hmac.digest(_PIN_DIGEST_KEY, pin.encode(), "sha256")
            if digest in refused:
                raise PinError(
                    f"wrong PIN for {location.describe()} (refused before: not sent again, "
                    "so that the token does not lock it; correct the PIN, or restart this "
                    "process if the token's PIN was changed to it)"
                )
            try:
                with token_files_lock(location.softhsm_conf):  # C_Login rewrites them
                    holder = _retrying(lambda: token.open(user_pin=pin))
            except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange) as exc:
                refused.add(digest)
                raise PinError(f"wrong PIN for {location.describe()}") from exc
            except p11.PinLocked as exc:
                raise PinError(f"the PIN of {location.describe()} is locked") from exc
            except p11.PKCS11Error as exc:
                raise HsmUnavailableError(
                    f"cannot open {location.describe()}: {type(exc).__name__}"
                ) from exc
            login = _logins[key] = _Login(holder)
        login.users += 1
    return key


def _logout(key: tuple[str, int]) -> None:
    with CALLS:
        login = _logins[key]
        login.users -= 1
        if login.users == 0:
            del _logins[key]
            with contextlib.suppress(p11.PKCS11Error):
                login.holder.close()


@contextlib.contextmanager
def session(location: TokenLocation, pin: str, rw: bool = False) -> Iterator["pkcs11.Session"]:
    """Open a user session on the token; PinError for a wrong or locked PIN."""
    token = find_token(location)
    key = _login(location, token, pin)
    try:
        with CALLS:
            opened = _retrying(lambda: token.open(rw=rw))
    except p11.PKCS11Error as exc:
        _logout(key)
        raise HsmUnavailableError(
            f"cannot open {location.describe()}: {type(exc).__name__}"
        ) from exc
    with _lock:
        _open_sessions[location.library] = _open_sessions.get(location.library, 0) + 1
    try:
        yield opened
    finally:
        with _lock:
            _open_sessions[location.library] -= 1
        with CALLS, contextlib.suppress(p11.PKCS11Error):
            opened.close()
        _logout(key)


def hsm_errors(what: str) -> contextlib.AbstractContextManager[None]:
    """Turn a PKCS#11 failure inside the block into an HsmError naming ``what``."""
    return _HsmErrors(what)


class _HsmErrors(contextlib.AbstractContextManager[None]):
    """Also holds :data:`CALLS` for the block: every PKCS#11 call goes through one."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        CALLS.acquire()

    def __exit__(self, exc_type, exc, tb) -> bool:  # type: ignore[no-untyped-def]
        CALLS.release()
        if exc is not None and isinstance(exc, p11.PKCS11Error):
            if isinstance(exc, TOKEN_GONE):
                raise HsmUnavailableError(
                    f"{self.what}: the token is gone ({type(exc).__name__})"
                ) from exc
            raise HsmError(f"{self.what}: the token refused ({type(exc).__name__})") from exc
        return False


def refresh(location: TokenLocation) -> None:
    """Make a module see tokens created by another process (e.g. softhsm2-util)."""
    lib = _load(location)
    with CALLS, _lock:
        if not _open_sessions.get(location.library):
            _reinitialize(lib, location.softhsm_conf)
