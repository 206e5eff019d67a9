"""Signature contexts: every signed message is ``context || canonical payload bytes``.

A distinct context per purpose means a signature made for one purpose can never be replayed as
another (an operator's approval of a Trust is not an HSM seal, a Domain seal is not a Trust
seal), even though the same HSM key signs Trusts, Domains and its own record.
"""

OPERATOR_RECORD = b"kmsfs/v1/operator-record\x00"
OPERATOR_APPROVES_TRUST = b"kmsfs/v1/operator-approves-trust\x00"
HSM_RECORD = b"kmsfs/v1/hsm-record\x00"
HSM_SEALS_TRUST = b"kmsfs/v1/hsm-seals-trust\x00"
HSM_SEALS_DOMAIN = b"kmsfs/v1/hsm-seals-domain\x00"
AGENT_AUDIT_CHECKPOINT = b"kmsfs/v1/agent-audit-checkpoint\x00"


def message(context: bytes, payload: bytes) -> bytes:
    """The exact bytes a signer signs for ``payload`` under ``context``."""
    return context + payload
