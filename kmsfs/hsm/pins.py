"""Where a PIN or passphrase comes from: a file, an environment variable, or a prompt.

Never argv: a command line is visible to every local user through /proc. A PIN is read when it
is needed and never logged or echoed.
"""

import getpass
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsfs.errors import FormatError, PinError

MAX_PIN_BYTES = 4096


@dataclass(frozen=True)
class PinSource:
    """Exactly one of ``file``, ``env`` or ``prompt``."""

    file: str | None = None
    env: str | None = None
    prompt: str | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.file, self.env, self.prompt)) != 1:
            raise FormatError("a PIN source names exactly one of file, env, prompt")

    def read(self) -> str:
        """Return the secret, without a trailing newline; PinError if it cannot be had."""
        if self.file is not None:
            path = Path(self.file)
            try:
                data = path.read_bytes()[: MAX_PIN_BYTES + 1]
            except OSError as exc:
                raise PinError(f"cannot read PIN file {path}: {exc.strerror}") from exc
            secret = data.decode("utf-8", "strict").rstrip("\r\n")
        elif self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise PinError(f"environment variable {self.env} (the PIN) is not set")
            secret = value
        else:
            if not sys.stdin.isatty():
                raise PinError(f"{self.prompt}: no terminal to ask on; give --pin-file")
            secret = getpass.getpass(f"{self.prompt}: ")
        if not secret:
            raise PinError("the PIN is empty")
        if len(secret.encode()) > MAX_PIN_BYTES:
            raise PinError("the PIN is too long")
        return secret

    def to_dict(self) -> dict[str, Any]:
        return {
            k: v for k, v in (("file", self.file), ("env", self.env), ("prompt", self.prompt)) if v
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PinSource":
        return cls(file=data.get("file"), env=data.get("env"), prompt=data.get("prompt"))


def pin_source_from_args(pin_file: str | None, pin_env: str | None, prompt: str) -> PinSource:
    """Build a PinSource from command-line options, falling back to a terminal prompt."""
    if pin_file and pin_env:
        raise FormatError("give either --pin-file or --pin-env, not both")
    if pin_file:
        return PinSource(file=pin_file)
    if pin_env:
        return PinSource(env=pin_env)
    return PinSource(prompt=prompt)
