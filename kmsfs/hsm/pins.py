"""Where a PIN or passphrase comes from: a file, an environment variable, a systemd
credential, or a prompt.

Never argv: a command line is visible to every local user through /proc. A PIN is read when it
is needed and never logged or echoed. A systemd credential (``LoadCredential=NAME:PATH`` in the
unit) is read from ``$CREDENTIALS_DIRECTORY/NAME``, which only the service can see.
"""

import getpass
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsfs.errors import FormatError, PinError, UsageError

MAX_PIN_BYTES = 4096


@dataclass(frozen=True)
class PinSource:
    """Exactly one of ``file``, ``env``, ``credential`` or ``prompt``."""

    file: str | None = None
    env: str | None = None
    prompt: str | None = None
    credential: str | None = None

    def __post_init__(self) -> None:
        chosen = (self.file, self.env, self.prompt, self.credential)
        if sum(x is not None for x in chosen) != 1:
            raise FormatError("a PIN source names exactly one of file, env, credential, prompt")
        if self.credential is not None and (
            not self.credential or "/" in self.credential or self.credential.startswith(".")
        ):
            raise FormatError(f"bad systemd credential name {self.credential!r:.40}")

    def read(self) -> str:
        """Return the secret, without a trailing newline; PinError if it cannot be had."""
        if self.credential is not None:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise PinError(
                    f"the PIN is the systemd credential {self.credential!r}, but "
                    "$CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit)"
                )
            return PinSource(file=str(Path(directory) / self.credential)).read()
        if self.file is not None:
            path = Path(self.file)
            try:
                data = path.read_bytes()[: MAX_PIN_BYTES + 1]
            except OSError as exc:
                raise PinError(f"cannot read PIN file {path}: {exc.strerror}") from exc
            try:
                secret = data.decode("utf-8", "strict").rstrip("\r\n")
            except UnicodeDecodeError:  # never echo the bytes: they are the PIN
                raise PinError(f"PIN file {path}: not UTF-8 text") from None
        elif self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise PinError(f"environment variable {self.env} (the PIN) is not set")
            secret = value.rstrip("\r\n")  # as from a file: echo "$PIN" adds one
        else:
            if not sys.stdin.isatty():
                raise PinError(f"{self.prompt}: no terminal to ask on; give --pin-file")
            try:
                secret = getpass.getpass(f"{self.prompt}: ")
            except EOFError:  # Ctrl-D at the prompt: no PIN, not a crash
                print(file=sys.stderr)  # getpass ends the prompt's line only after a PIN
                raise PinError("no PIN given (end of input at the prompt)") from None
            except KeyboardInterrupt:  # Ctrl-C at the prompt: "PROG: interrupted" (cliutil)
                print(file=sys.stderr)  # goes on a line of its own, not after the prompt
                raise
        if not secret:
            raise PinError("the PIN is empty")
        try:
            encoded = secret.encode("utf-8", "strict")
        except UnicodeEncodeError:  # an environment value that was not UTF-8
            raise PinError(f"the PIN ({self._where()}) is not UTF-8 text") from None
        if len(encoded) > MAX_PIN_BYTES:
            raise PinError("the PIN is too long")
        return secret

    def _where(self) -> str:
        if self.env is not None:
            return f"environment variable {self.env}"
        return "typed at the prompt" if self.prompt is not None else "its file"

    def to_dict(self) -> dict[str, Any]:
        pairs = (
            ("file", self.file),
            ("env", self.env),
            ("prompt", self.prompt),
            ("credential", self.credential),
        )
        return {k: v for k, v in pairs if v}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PinSource":
        return cls(
            file=data.get("file"),
            env=data.get("env"),
            prompt=data.get("prompt"),
            credential=data.get("credential"),
        )


def loose_pin_file(source: PinSource) -> str | None:
    """A one-line warning if ``source`` is a file that group or others may read (as ssh says
    of a key file), else None. A warning, not a refusal: the PIN works all the same, and a
    file that cannot be stat'ed is reported when it is read. Only a regular file that holds
    something: a pipe (``<(pass show ...)``), a device or an empty file is no copy of a PIN
    left on disk. Never shows the PIN."""
    if source.file is None:
        return None
    try:
        st = os.stat(source.file)
    except OSError:
        return None
    mode = st.st_mode
    if not stat.S_ISREG(mode) or not st.st_size or not mode & 0o044:
        return None
    who = "group and others" if mode & 0o044 == 0o044 else "group" if mode & 0o040 else "others"
    return (
        f"PIN file {source.file} can be read by {who} (mode {mode & 0o7777:04o}): "
        f"chmod 600 {source.file}"
    )


def pin_source_from_args(
    pin_file: str | None, pin_env: str | None, prompt: str, credential: str | None = None
) -> PinSource:
    """Build a PinSource from command-line options, falling back to a terminal prompt."""
    given = [x for x in (pin_file, pin_env, credential) if x]
    if len(given) > 1:
        # Named as the caller's options are: --pin-credential only where it was given.
        offered = ["--pin-file", "--pin-env"] + (["--pin-credential"] if credential else [])
        raise UsageError(f"give only one of {', '.join(offered)}")
    if pin_file:
        return PinSource(file=str(Path(pin_file).resolve()))
    if pin_env:
        return PinSource(env=pin_env)
    if credential:
        return PinSource(credential=credential)
    return PinSource(prompt=prompt)
