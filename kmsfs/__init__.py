"""kmsfs: an encrypted filesystem whose keys are governed by HSM-backed, quorum-signed Trusts."""

__version__ = "0.1.0"
