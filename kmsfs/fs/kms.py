"""The only module where the ``kmsfs`` command touches the key management API (``kmsfs.api``).

Kept apart so the file system never imports the HSM or store layers, and so finishing the
wiring is one small file. Every failure surfaces as a one-line :class:`KmsfsError`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kmsfs.errors import IntegrityError, KmsfsError, StoreError
from kmsfs.fs import seen
from kmsfs.keys import KeyDeriver

STORE_ENV = "KMSFS_STORE"


def _api() -> Any:
    try:
        from kmsfs import api
    except ImportError as exc:
        raise KmsfsError(f"key management API unavailable: {exc}") from None
    return api


def store_dir(arg: str | None) -> Path:
    """``--store``, else ``$KMSFS_STORE``, else ``kmsfs.api.default_store_path()``."""
    if arg:
        return Path(arg)
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    return Path(_api().default_store_path())


def require_store(store: Path) -> Path:
    """*store*, if it is a kmsfs store; StoreError (exit 6), one line, if not: a mistyped
    ``--store`` read as "no domain named payroll in DIR", as if the Domain were missing.
    Checked where the store is first read (export, describe, open), so that what a command
    can refuse without it (an existing OUT, a mounted volume) is said first."""
    if not _api().is_store(store):
        raise StoreError(
            f"{store} is not a kmsfs store (no store.json): check --store or KMSFS_STORE"
        )
    return store


def export_bundle(store: Path, domain_name: str) -> bytes:
    """The verified Domain *domain_name* and its Trust chain, as canonical bytes."""
    return bytes(_api().export_domain_bundle(require_store(store), domain_name))


def describe(store: Path, bundle: bytes) -> dict[str, Any]:
    """name, domain id, trust id, HSM ids, ``verified`` and ``problem`` of a bundle."""
    return dict(_api().describe_bundle(require_store(store), bundle))


def problem_error(desc: dict[str, Any]) -> type[KmsfsError]:
    """The error class a describe() result's problem came as (IntegrityError if unknown), so
    a missing store still exits 6 and a malformed one 7, not 3 ("verification failed")."""
    from kmsfs import errors

    found = getattr(errors, str(desc.get("problem_class")), None)
    if isinstance(found, type) and issubclass(found, KmsfsError):
        return found
    return IntegrityError


def superseded_warning(desc: dict[str, Any]) -> str:
    """What to tell a client whose Domain is still governed by a Trust that a successor has
    replaced (describe()'s ``superseded_by``): until an operator rewraps it, the HSMs the
    successor left out can still unwrap its keys, and seal new generations of it."""
    name, trust, newer = desc.get("name"), str(desc.get("trust_id")), str(desc["superseded_by"])
    return (
        f"Domain {name} is governed by trust {trust[:12]}, which trust {newer[:12]} supersedes: "
        f"ask an operator to rewrap it (kmsfs-admin domain rewrap {name} --trust {newer[:12]})"
    )


def domain_id_of(desc: dict[str, Any]) -> str:
    """The Domain id in a describe() result, whatever spelling the API settles on."""
    for key in ("domain_id", "domain id", "id"):
        if desc.get(key):
            return str(desc[key])
    raise KmsfsError("Domain bundle description has no domain id")


@dataclass(frozen=True)
class AgentOptions:
    """``--agent`` and its TLS files, as given on the command line."""

    address: str
    cert: str | None = None
    key: str | None = None
    ca: str | None = None


@contextmanager
def open_deriver(
    store: Path, bundle: bytes, agent: AgentOptions | None = None
) -> Iterator[KeyDeriver]:
    """Verify the bundle's chain and open a deriver: in-process PKCS#11 against the store's
    pinned root, or, with ``agent``, through kmsfs-hsmd (which verifies against its own)."""
    if agent is None:
        with _api().open_domain(require_store(store), bundle) as deriver:
            yield deriver
        return
    from kmsfs.agent import client

    address = client.AgentAddress.parse(agent.address, agent.cert, agent.key, agent.ca)
    with client.open_domain(address, bundle) as agent_deriver:
        yield agent_deriver


def keep_newest_copy(cipherdir: Path, deriver: KeyDeriver) -> int | None:
    """Keep the volume's copy of its Domain (``kmsfs.conf``) at the generation *deriver*
    serves, if that is newer; returns the generation written, or None if nothing changed.

    A store writer can hide a Domain's newer generations (after a rewrap that removed an HSM,
    after a rotation) so that a mount falls back to an older one, whose keys a removed HSM
    still has. Once a mount has used the newer generation, the volume carries it: a later
    mount keeps using it while the store hides only it (a copy the store lacks is accepted as
    the next step of the store's newest), and refuses to mount if more is hidden. Called with
    the volume locked for the mount (nothing else writes the config then); an agent's deriver
    (verified against the agent's own store) changes nothing.
    """
    from kmsfs.fs import config as volconfig

    newest = _api().serving_bundle(deriver)
    if newest is None:
        return None
    config = volconfig.load(cipherdir)
    facts = _api().bundle_facts(newest)
    if facts["generation"] <= _api().bundle_facts(config.domain_bundle)["generation"]:
        return None
    volconfig.save(cipherdir, replace(config, domain_bundle=newest, domain_id=facts["domain_id"]))
    return int(facts["generation"])


def check_not_rolled_back(desc: dict[str, Any]) -> None:
    """IntegrityError if a verified describe() result offers a generation of its Domain that
    is older than, a rival of, or not under the Trust of the newest this machine has mounted
    (:mod:`kmsfs.fs.seen`)."""
    if desc.get("serving"):
        seen.check(_offered(desc["serving"]))


def check_in_use(deriver: KeyDeriver) -> None:
    """:func:`check_not_rolled_back` for the generation *deriver* serves: the store may have
    changed since the mount described it (an agent's deriver: nothing to check here)."""
    offered = _serving(deriver)
    if offered is not None:
        seen.check(offered)


def check_move(verified: Any) -> None:
    """:func:`check_not_rolled_back` for a generation a running mount is about to move to
    (``DomainKeys.check_move``): IntegrityError if this machine's record refuses it, as it
    would refuse a mount started now (a rival of a generation another volume of the Domain
    has mounted here, say)."""
    seen.check(_offered(_api().bundle_facts(_api().bundle_of(verified))))


def remember_in_use(deriver: KeyDeriver) -> int | None:
    """Record the generation *deriver* serves as the newest this machine has mounted, if it
    is; returns it if written. None for an agent's deriver (verified by the agent)."""
    offered = _serving(deriver)
    if offered is None or not seen.remember(offered):
        return None
    return offered.generation


def _serving(deriver: KeyDeriver) -> seen.Offered | None:
    bundle = _api().serving_bundle(deriver)
    return None if bundle is None else _offered(_api().bundle_facts(bundle))


def _offered(facts: dict[str, Any]) -> seen.Offered:
    """kmsfs.api's facts of a verified generation, as :mod:`kmsfs.fs.seen` checks them."""
    return seen.Offered(
        str(facts["root_id"]),
        str(facts["name"]),
        int(facts["generation"]),
        str(facts["domain_id"]),
        tuple(facts["chain_ids"]),
    )


def describe_via_agent(bundle: bytes, agent: AgentOptions) -> dict[str, Any]:
    """Have the agent verify the bundle and check its policy, as a mount will; its answer."""
    with open_deriver(Path("."), bundle, agent) as deriver:
        desc = dict(deriver.description)  # type: ignore[attr-defined]
    # Printed in errors and in the superseded warning: a name and ids, never whatever else
    # an agent may send (escape sequences for the client's terminal).
    from kmsfs.model import fields
    from kmsfs.model.records import check_name

    check_name(desc.get("name"), "agent's open-domain.name: Domain")
    for key in ("trust_id", "superseded_by"):
        if desc.get(key) is not None:
            fields.hex_id(desc[key], f"agent's open-domain.{key}")
    return desc


def bundle_domain_name(bundle: bytes) -> str:
    """The name of a bundle's Domain (its form checked: pass a bundle already verified)."""
    return str(_api().bundle_facts(bundle)["name"])


def check_bundle(
    store: Path,
    bundle: bytes,
    where: str,
    want_id: str | None = None,
    agent: AgentOptions | None = None,
) -> str:
    """Verify a bundle against the store as ``mount`` does; return its Domain id.

    One-line errors that start with ``where`` (the file or directory the bundle came from): a
    malformed bundle, a Domain that does not verify (e.g. another store's), or one whose id is
    not ``want_id`` (the id a volume config names). Used by ``decrypt`` and ``fsck``.

    With ``agent``, the chain is the agent's to verify (when the deriver is opened, against its
    own pinned root, before any HSM operation); here only the bundle's form and id are checked.
    """
    if agent is not None:
        try:
            domain_id = str(_api().bundle_facts(bundle)["domain_id"])
        except KmsfsError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        if want_id is not None and domain_id != want_id:
            raise IntegrityError(
                f"{where}: config names Domain {want_id}, its bundle holds {domain_id}"
            )
        return domain_id
    try:
        desc = describe(store, bundle)
    except KmsfsError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    name = desc.get("name") or "?"
    if not desc.get("verified"):
        raise problem_error(desc)(
            f"{where}: Domain {name} does not verify against store {store}: {desc.get('problem')}"
        )
    domain_id = domain_id_of(desc)
    if want_id is not None and domain_id != want_id:
        raise IntegrityError(
            f"{where}: config names Domain {want_id}, its bundle holds {domain_id}"
        )
    return domain_id
