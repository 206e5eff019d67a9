"""One shallow hierarchy of errors (like python-tuf's ``exceptions.py``).

Verifiers raise rather than return False. Every message is one line that says what went wrong
and where, because the command-line tools print it as is.
"""


class KmsfsError(Exception):
    """Base of every error kmsfs raises on purpose."""


class UsageError(KmsfsError):
    """A command was asked for something that cannot be done as asked (bad argument)."""


class FormatError(KmsfsError):
    """A document, file header or config is malformed: bad length, encoding or field."""


class BadVersionError(FormatError):
    """A format version or feature flag this build does not know."""


class IntegrityError(KmsfsError):
    """Authentication failed: a signature, a MAC or an AEAD tag does not verify."""


class QuorumNotMetError(IntegrityError):
    """Fewer than ``quorum`` valid, distinct operator signatures."""


class ChainError(IntegrityError):
    """A Trust chain does not lead back to the pinned root, or a link in it is invalid."""


class StoreError(KmsfsError):
    """The store cannot do what was asked (missing, already exists, not a store)."""


class NotFoundError(StoreError):
    """A named document does not exist in the store."""


class AlreadyExistsError(StoreError):
    """A document with this name already exists and documents are immutable."""


class HsmError(KmsfsError):
    """A PKCS#11 token failed or refused an operation."""


class HsmUnavailableError(HsmError):
    """No token of the Trust can be reached (module missing, token absent)."""


class PinError(HsmError):
    """A PIN or passphrase is wrong or cannot be read."""


class AgentRefusedError(KmsfsError):
    """The HSM agent's policy does not allow this client to do this."""


class AgentUnavailableError(HsmUnavailableError):
    """The HSM agent cannot be reached; to a mount this is like every HSM being absent."""
