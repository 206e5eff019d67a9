"""The store's private area: what this machine needs to reach its HSMs and operator keys.

Never synced, never inside a document, mode 0700 (files 0600)::

    private/softhsm2.conf            the embedded SoftHSM2 config (tokens below)
    private/tokens/                  SoftHSM2 token files
    private/pins/<label>.pin         PINs of the embedded HSM tokens (not operators')
    private/hsm-access/<hsm-id>.json module path, token label, PIN source of each HSM
    private/operator-access/<name>.json where each token-protected operator key is
    private/operator-keys/<name>.key passphrase-protected operator keys
    private/anchor.json              the store's own pins (kmsfs.store.documents.Store.anchor)
    private/head.json                the head of its line of Trusts (Store.head)
"""

import json
import logging
import os
from pathlib import Path

from kmsfs import atomicfile as atomic
from kmsfs.errors import FormatError, NotFoundError, StoreError
from kmsfs.hsm import softhsm
from kmsfs.hsm.library import TokenLocation
from kmsfs.hsm.pins import PinSource
from kmsfs.store.writable import is_writable, writing

log = logging.getLogger(__name__)


class PrivateArea:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def ensure(self) -> None:
        with writing(self.root, "the private area"):
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
        with writing(path, "a token PIN"):
            path.parent.mkdir(mode=0o700, exist_ok=True)
            atomic.write_new(path, pin.encode() + b"\n", mode=0o600)
        return path

    def operator_key_file(self, name: str) -> Path:
        return self.root / "operator-keys" / f"{name}.key"

    def _portable(self, path: str | None) -> str | None:
        """Paths inside the private area are kept relative, so a store can be moved or copied."""
        if path is None:
            return None
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return path

    def _local(self, path: str | None) -> str | None:
        return None if path is None or os.path.isabs(path) else str(self.root / path)

    def save_access(
        self, kind: str, name: str, location: TokenLocation, pin: PinSource | None
    ) -> None:
        """Record where the token of an HSM (kind "hsm") or operator (kind "operator") is."""
        embedded = location.softhsm_conf is not None and (
            Path(location.softhsm_conf).resolve() == self.softhsm_conf.resolve()
        )
        pin_doc = pin.to_dict() if pin else None
        if pin_doc and "file" in pin_doc:
            pin_doc["file"] = self._portable(pin_doc["file"])
        doc = {
            "module": "embedded-softhsm2" if embedded else location.module,
            "token_label": location.token_label,
            "token_serial": location.token_serial,
            "softhsm_conf": self._portable(location.softhsm_conf),
            "pin": pin_doc,
        }
        path = self.root / f"{kind}-access" / f"{name}.json"
        with writing(path, f"the {kind}'s token access"):
            path.parent.mkdir(mode=0o700, exist_ok=True)
            atomic.replace(path, json.dumps(doc, indent=2).encode() + b"\n", mode=0o600)

    def forget_access(self, kind: str, name: str) -> None:
        """Remove what :meth:`save_access` wrote (undoing a creation that failed)."""
        (self.root / f"{kind}-access" / f"{name}.json").unlink(missing_ok=True)

    def has_access(self, kind: str, name: str) -> bool:
        """Whether this host knows how to reach the token (HSM or operator) ``name``."""
        return (self.root / f"{kind}-access" / f"{name}.json").exists()

    def access(self, kind: str, name: str) -> tuple[TokenLocation, PinSource | None]:
        path = self.root / f"{kind}-access" / f"{name}.json"
        try:
            doc = json.loads(path.read_text())
            module = doc["module"]
            conf = doc.get("softhsm_conf")
            if conf is not None and not os.path.isabs(conf):
                conf = self._local(conf)
                if conf == str(self.softhsm_conf):
                    conf = str(self.ensure_softhsm_conf())
            if module == "embedded-softhsm2":
                module = softhsm.default_module()
            pin_doc = doc["pin"]
            if pin_doc and pin_doc.get("file") and not os.path.isabs(pin_doc["file"]):
                pin_doc = dict(pin_doc, file=self._local(pin_doc["file"]))
            pin = PinSource.from_dict(pin_doc) if pin_doc else None
            serial = doc.get("token_serial")
            if serial is not None and not isinstance(serial, str):
                raise TypeError("token_serial")
            return TokenLocation(module, doc["token_label"], conf, serial), pin
        except FileNotFoundError:
            raise NotFoundError(
                f"{kind} {name[:12]}: its token is not known on this machine (no {path})"
            ) from None
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{path}: damaged access file ({type(exc).__name__})") from exc

    def softhsm_conf_to_make_tokens(self) -> Path:
        """This area's softhsm2.conf, written if missing and corrected if stale, for commands
        that make or remove tokens: a copied or restored store carries a config that names the
        original's token directory, and a token made through it landed there (review)."""
        if not self.softhsm_conf.exists():
            softhsm.write_config(self.softhsm_conf, self.token_dir)
        return self.ensure_softhsm_conf()

    def ensure_softhsm_conf(self) -> Path:
        """The softhsm2.conf that reaches this area's tokens where the store is now.

        The config records the token directory's absolute path, so a store restored, moved or
        reached by another path (a bind mount) finds it stale. It is corrected in place if the
        store can be written; a store that cannot (a read-only mount, as a mount may read it)
        is never written to: a config outside it serves instead
        (:func:`kmsfs.hsm.softhsm.config_outside`), so everything that only reads still works.
        """
        conf = self.softhsm_conf
        want = f"directories.tokendir = {self.token_dir.resolve()}\n"
        try:
            text = conf.read_text()
        except FileNotFoundError:
            return conf
        except OSError as exc:
            raise StoreError(f"{conf}: cannot read the SoftHSM config: {exc.strerror}") from exc
        if want in text:
            return conf
        if is_writable(self.root):
            try:
                softhsm.write_config(conf, self.token_dir)
                return conf
            except StoreError as exc:  # a full disk: reading must not depend on it
                log.debug("%s", exc)
        log.debug("%s names another token directory: using a config outside the store", conf)
        return softhsm.config_outside(self.token_dir)
