"""Exit codes of ``kmsfs`` and ``kmsfs-admin``. A number is never reused for another meaning."""

from kmsfs.errors import (
    AgentRefusedError,
    FormatError,
    HsmError,
    IntegrityError,
    KmsfsError,
    PinError,
    StoreError,
    UsageError,
)

OK = 0
ERROR = 1  # any other kmsfs error
USAGE = 2  # bad command line (argparse uses 2 too)
VERIFICATION = 3  # a signature, quorum, chain or integrity check failed
HSM = 4  # no HSM could do it
PIN = 5  # wrong or missing PIN / passphrase
STORE = 6  # the store or a document is missing, malformed or already there
FORMAT = 7  # a document or file is malformed
DAMAGED = 8  # kmsfs fsck found damage (the command itself worked)
REFUSED = 9  # the HSM agent's policy refused the request
INTERRUPTED = 130  # Ctrl-C (SIGINT)
TERMINATED = 143  # SIGTERM


def for_error(exc: KmsfsError) -> int:
    """The exit code for an error; the most specific class wins."""
    if isinstance(exc, AgentRefusedError):
        return REFUSED
    if isinstance(exc, PinError):
        return PIN
    if isinstance(exc, HsmError):
        return HSM
    if isinstance(exc, IntegrityError):
        return VERIFICATION
    if isinstance(exc, UsageError):
        return USAGE
    if isinstance(exc, FormatError):
        return FORMAT
    if isinstance(exc, StoreError):
        return STORE
    return ERROR
