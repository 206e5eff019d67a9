"""The store's private area: what this machine needs to reach its HSMs and operator keys.

Never synced, never inside a document, mode 0700 (files 0600)::

    private/softhsm2.conf            the embedded SoftHSM2 config (tokens below)
    private/tokens/                  SoftHSM2 token files
    private/pins/<label>.pin         PINs of the embedded HSM tokens (not operators')
    private/hsm-access/<hsm-id>.json module path, token label, PIN source of each HSM
    private/operator-access/<name>.json where each token-protected operator key is
    private/operator-keys/<name>.key passphrase-protected operator keys
"""

import json
import os
from pathlib import Path

from kmsfs.errors import FormatError, NotFoundError
from kmsfs.hsm.library import TokenLocation
from kmsfs.hsm.pins import PinSource
from kmsfs.store import atomic


class PrivateArea:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    @property
    def softhsm_conf(self) -> Path:
        return self.root / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        return self.root / "tokens"

    def pin_file(self, label: str) -> Path:
        return self.root / "pins" / f"{label}.pin"

    def write_pin(self, label: str, pin: str) -> Path:
        path = self.pin_file(label)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic.write_new(path, pin.encode() + b"\n", mode=0o600)
        return path

    def operator_key_file(self, name: str) -> Path:
        return self.root / "operator-keys" / f"{name}.key"

    def save_access(
        self, kind: str, name: str, location: TokenLocation, pin: PinSource | None
    ) -> None:
        """Record where the token of an HSM (kind "hsm") or operator (kind "operator") is."""
        doc = {
            "module": location.module,
            "token_label": location.token_label,
            "softhsm_conf": location.softhsm_conf,
            "pin": pin.to_dict() if pin else None,
        }
        path = self.root / f"{kind}-access" / f"{name}.json"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic.replace(path, json.dumps(doc, indent=2).encode() + b"\n", mode=0o600)

    def access(self, kind: str, name: str) -> tuple[TokenLocation, PinSource | None]:
        path = self.root / f"{kind}-access" / f"{name}.json"
        try:
            doc = json.loads(path.read_text())
            location = TokenLocation(doc["module"], doc["token_label"], doc.get("softhsm_conf"))
            pin = PinSource.from_dict(doc["pin"]) if doc["pin"] else None
            return location, pin
        except FileNotFoundError:
            raise NotFoundError(
                f"{kind} {name[:12]}: its token is not known on this machine (no {path})"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{path}: damaged access file ({type(exc).__name__})") from exc
