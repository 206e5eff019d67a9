"""The volume config file ``CIPHERDIR/kmsfs.conf`` (docs/format.md, "Volume config").

Layout: one UTF-8 JSON object, keys sorted, two-space indent, trailing newline::

    {
      "creator": "kmsfs 0.1.0",
      "domain_bundle": "<base64 of the canonical Domain bundle bytes>",
      "domain_id": "<Domain id>",
      "domain_name": "<Domain name>",
      "feature_flags": ["GCM-4096", "AES-SIV-names", "LongNames", "DirIV",
                        "EncryptedXattrs", "KeyEpochs", "LongXattrNames",
                        "NameEpochs", "SymlinkXattrEpochs"],
      "format_version": 1
    }

The bundle (the verified Domain and its Trust chain) makes the directory self-contained, like a
LUKS2 header: without an HSM of the Trust it is useless, so it holds nothing secret. Like
gocryptfs's ``configfile``, the config is validated on load *and* before every write, an unknown
feature flag refuses the mount, and writes go temp file, fsync, rename, fsync of the directory.

Nothing signs the file as a whole: only the bundle verifies (against the store, by whoever opens
the Domain). So ``domain_name`` and ``domain_id`` must be the name and id *inside* the bundle
(:meth:`VolumeConfig.validate`): every command that reads a volume goes through :func:`load`,
and a config that names one Domain and carries another is refused there, before any Domain is
opened. Which Domain a volume *should* use is not something the file can say about itself: see
:mod:`kmsfs.fs.volumepin` and ``kmsfs mount --domain`` (docs/threat-model.md §1).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kmsfs import __version__, atomicfile
from kmsfs.errors import BadVersionError, FormatError, IntegrityError, KmsfsError

CONFIG_NAME = "kmsfs.conf"
CONFIG_FORMAT_VERSION = 1
MAX_CONFIG_SIZE = 4 * 1024 * 1024

FLAG_GCM_4096 = "GCM-4096"
FLAG_SIV_NAMES = "AES-SIV-names"
FLAG_LONG_NAMES = "LongNames"
FLAG_DIRIV = "DirIV"
FLAG_XATTR = "EncryptedXattrs"
FLAG_KEY_EPOCHS = "KeyEpochs"
"""New file headers are version 2 and carry the Domain's current ``mk`` epoch (docs/format.md,
"Key epochs"). Without it a volume writes version 1 headers (epoch 1) only; kmsfs builds that
predate the flag refuse to mount a volume that has it, as they cannot read version 2 headers."""

FLAG_LONG_XATTR_NAMES = "LongXattrNames"
"""``user.*`` xattr names too long once encrypted are stored under a hashed disk name, their
sealed name in front of the value (docs/format.md, "Long xattr names"). Without it they are
ERANGE; kmsfs builds that predate the flag refuse the volume rather than hide such names."""

FLAG_NAME_EPOCHS = "NameEpochs"
"""A directory's names may be keyed with an ``mk`` epoch after 1, which its ``kmsfs.diriv``
names (docs/format.md, "Key epochs"): ``kmsfs reencrypt`` moves names only on a volume that has
it. kmsfs builds that predate the flag refuse the volume, as they cannot read such a
``kmsfs.diriv``. A mount makes a new directory at the Domain's current epoch flag or not, as it
does new file headers (a writer of the ciphertext who strips the flag from the unauthenticated
``kmsfs.conf`` must not put new names back on epoch 1); such a build reads those as EIO."""

FLAG_SYMLINK_XATTR_EPOCHS = "SymlinkXattrEpochs"
"""Symlink targets and ``user.*`` xattr values may be sealed under an ``mk`` epoch after 1,
which their AES-GCM nonce names (docs/format.md, "Key epochs"): ``kmsfs reencrypt`` moves them
only on a volume that has it. kmsfs builds that predate the flag refuse the volume, as they
read such a target or value as damage. As with ``NameEpochs``, a mount seals new ones at the
Domain's current epoch flag or not."""

#: Flags written into a new volume, in a fixed order.
DEFAULT_FLAGS = (
    FLAG_GCM_4096,
    FLAG_SIV_NAMES,
    FLAG_LONG_NAMES,
    FLAG_DIRIV,
    FLAG_XATTR,
    FLAG_KEY_EPOCHS,
    FLAG_LONG_XATTR_NAMES,
    FLAG_NAME_EPOCHS,
    FLAG_SYMLINK_XATTR_EPOCHS,
)
#: Flags this build understands: all it writes (a new flag is written as soon as it is known).
#: A config naming any other flag refuses to mount.
KNOWN_FLAGS = frozenset(DEFAULT_FLAGS)
#: Flags this build cannot work without (it has no code path for their absence).
REQUIRED_FLAGS = frozenset({FLAG_GCM_4096, FLAG_SIV_NAMES, FLAG_LONG_NAMES, FLAG_DIRIV})

_KEYS = frozenset(
    {"creator", "domain_bundle", "domain_id", "domain_name", "feature_flags", "format_version"}
)


@dataclass(frozen=True)
class VolumeConfig:
    """What a ciphertext directory says about itself: its Domain and how it is encrypted."""

    domain_name: str
    domain_id: str
    domain_bundle: bytes
    feature_flags: tuple[str, ...] = DEFAULT_FLAGS
    format_version: int = CONFIG_FORMAT_VERSION
    creator: str = field(default=f"kmsfs {__version__}")

    def validate(self) -> None:
        """Raise FormatError (BadVersionError for version or flags) unless this config is usable;
        IntegrityError if its ``domain_name`` or ``domain_id`` is not its bundle's (module
        docstring)."""
        if self.format_version != CONFIG_FORMAT_VERSION:
            raise BadVersionError(
                f"config format_version: want {CONFIG_FORMAT_VERSION}, have {self.format_version}"
            )
        unknown = sorted(set(self.feature_flags) - KNOWN_FLAGS)
        if unknown:
            raise BadVersionError(f"config: unknown feature flag {unknown[0]!r}")
        if len(set(self.feature_flags)) != len(self.feature_flags):
            raise FormatError("config: duplicate feature flag")
        missing = sorted(REQUIRED_FLAGS - set(self.feature_flags))
        if missing:
            raise BadVersionError(f"config: required feature flag {missing[0]!r} is missing")
        if not self.domain_name or not isinstance(self.domain_name, str):
            raise FormatError("config: domain_name must be a non-empty string")
        if not self.domain_id or not isinstance(self.domain_id, str):
            raise FormatError("config: domain_id must be a non-empty string")
        if not self.domain_bundle:
            raise FormatError("config: domain_bundle is empty")
        held = bundle_names(self.domain_bundle)
        if held is not None and (held.name, held.domain_id) != (self.domain_name, self.domain_id):
            # Someone who can write CIPHERDIR put another Domain's bundle in (or renamed it):
            # whatever shows the volume's name (kmsfs info, a --domain check) must not be fooled.
            ids = ("", "") if held.domain_id == self.domain_id else (
                f" ({shown(self.domain_id[:12])})", f" ({held.domain_id[:12]})")
            raise IntegrityError(
                f"config names Domain {shown(self.domain_name)}{ids[0]}, but its domain_bundle "
                f"holds Domain {held.name}{ids[1]}: the file was changed after kmsfs wrote it; "
                "nothing opened"
            )

    def has(self, flag: str) -> bool:
        return flag in self.feature_flags


def shown(text: str) -> str:
    """*text* (from the unauthenticated file) as an error line may show it: as it is if
    printable, else quoted with escapes, so it can neither break the one line nor reach the
    terminal as an escape sequence."""
    return text if text.isprintable() else repr(text)


@dataclass(frozen=True)
class BundleNames:
    """Who a Domain bundle says it is. Read from its form only: it means something once the
    bundle has verified (against the store, or by the agent), as it must before any use."""

    name: str
    domain_id: str
    root: str | None  # the id of the first Trust of its chain: the store it belongs to


def bundle_names(bundle: bytes) -> BundleNames | None:
    """The Domain name, id and root Trust id a bundle holds; None if the bytes are not a Domain
    bundle at all (every verifier refuses those, naming the file, so there is nothing to
    compare: the tests' volumes, which no HSM opens, carry such placeholders).

    The model is pure (no store, no HSM): parsing is all this does, about 1 ms."""
    from kmsfs.model.bundle import DomainBundle

    try:
        parsed = DomainBundle.from_bytes(bundle)
    except KmsfsError:
        return None
    root = parsed.chain[0].id if parsed.chain else None
    return BundleNames(parsed.domain.domain.name, parsed.domain.id, root)


def pack(config: VolumeConfig) -> bytes:
    """Serialize after validating, so a bad config is never written."""
    config.validate()
    doc = {
        "creator": config.creator,
        "domain_bundle": base64.b64encode(config.domain_bundle).decode("ascii"),
        "domain_id": config.domain_id,
        "domain_name": config.domain_name,
        "feature_flags": list(config.feature_flags),
        "format_version": config.format_version,
    }
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def parse(data: bytes) -> VolumeConfig:
    """Parse and validate; every problem is a one-line FormatError or BadVersionError, or an
    IntegrityError for names that are not the bundle's."""
    if len(data) > MAX_CONFIG_SIZE:
        raise FormatError(f"config: too large: max {MAX_CONFIG_SIZE} bytes, have {len(data)}")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"config: not valid JSON ({exc})") from None
    except RecursionError:  # [[[[... nested deeper than the parser goes
        raise FormatError("config: not valid JSON (nested too deep)") from None
    if not isinstance(doc, dict):
        raise FormatError("config: top level must be a JSON object")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise FormatError("config: format_version missing or not an integer")
    if version != CONFIG_FORMAT_VERSION:
        raise BadVersionError(
            f"config format_version: want {CONFIG_FORMAT_VERSION}, have {version}"
        )
    extra = sorted(set(doc) - _KEYS)
    if extra:
        raise FormatError(f"config: unknown field {extra[0]!r}")
    missing = sorted(_KEYS - set(doc))
    if missing:
        raise FormatError(f"config: missing field {missing[0]!r}")
    flags = doc["feature_flags"]
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise FormatError("config: feature_flags must be a list of strings")
    for key in ("creator", "domain_bundle", "domain_id", "domain_name"):
        if not isinstance(doc[key], str):
            raise FormatError(f"config: {key} must be a string")
    try:
        bundle = base64.b64decode(doc["domain_bundle"], validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("config: domain_bundle is not valid base64") from None
    config = VolumeConfig(
        domain_name=doc["domain_name"],
        domain_id=doc["domain_id"],
        domain_bundle=bundle,
        feature_flags=tuple(flags),
        format_version=version,
        creator=doc["creator"],
    )
    config.validate()
    return config


def load(cipherdir: Path) -> VolumeConfig:
    """Read and validate ``cipherdir/kmsfs.conf``; messages name the file.

    Whoever can write the ciphertext directory can put anything at that name, and root reads
    it (mount, fsck, reencrypt): a symlink to ``/dev/zero`` or to a huge file read until memory
    ran out, and a FIFO blocked the command for good. So it is opened as kmsfs's own files are
    (:func:`kmsfs.fs.posix.read_internal_file`: no symlink followed, no blocking, a regular
    file only) and read to one byte past the largest config."""
    from kmsfs.fs.posix import read_internal_file  # pyfuse3 only when a volume is read

    path = Path(cipherdir) / CONFIG_NAME
    try:
        data = read_internal_file(os.fsencode(path), MAX_CONFIG_SIZE + 1)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file (not a kmsfs volume?)") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return parse(data)
    except (FormatError, IntegrityError) as exc:
        raise type(exc)(f"{path}: {exc}") from None


def save(cipherdir: Path, config: VolumeConfig) -> None:
    """Write atomically: validate, temp file, fsync, rename, fsync the directory. The temporary
    name is a reserved ``kmsfs.`` name, so a mount never shows it and fsck does not flag it."""
    atomicfile.replace(Path(cipherdir) / CONFIG_NAME, pack(config), mode=0o444,
                       temp_prefix="kmsfs.tmp.conf-")
