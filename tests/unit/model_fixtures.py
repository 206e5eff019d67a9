"""Software stand-ins for HSMs and operators, and builders of signed kmsfs model documents.

The model is pure (no PKCS#11), so unit tests sign with keys from ``cryptography``:

- an HSM is an Ed25519 signing key plus an RSA-3072 wrapping key (SPKI DER, ``rsa-oaep-sha1``);
  the RSA key is generated once per process and shared, because 3072-bit generation is slow;
- an operator is an Ed25519 key.

Ed25519 keys are derived from their name, so documents are reproducible from run to run.
Wrapped ``k`` and ``mk`` are random-looking bytes: the model never unwraps them.
"""

import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from kmsfs.model import contexts
from kmsfs.model.bundle import DomainBundle
from kmsfs.model.domain import Domain, MasterKeyEpoch, SealedDomain, WrappedKey
from kmsfs.model.publickeys import PublicKey
from kmsfs.model.records import HsmRecord, OperatorRecord
from kmsfs.model.trust import Member, SealedTrust, Signature, Trust

CREATED = "2024-01-01T00:00:00Z"


def _seed(*parts: str) -> bytes:
    return hashlib.sha256("/".join(("kmsfs-test", *parts)).encode()).digest()


@functools.cache
def rsa_wrap_spki() -> bytes:
    """SPKI DER of the one RSA-3072 key that every software HSM uses as its wrapping key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ed25519_key(*seed: str) -> ed25519.Ed25519PrivateKey:
    """A deterministic Ed25519 private key named by ``seed``."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(_seed(*seed))


def public_key(private: ed25519.Ed25519PrivateKey) -> PublicKey:
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return PublicKey("ed25519", raw)


@dataclass(frozen=True)
class SoftHsm:
    """An HSM stand-in: its self-signed record and the private signing key behind it."""

    record: HsmRecord
    sign_private: ed25519.Ed25519PrivateKey

    @property
    def id(self) -> str:
        return self.record.id

    def sign(self, context: bytes, payload: bytes) -> bytes:
        return self.sign_private.sign(contexts.message(context, payload))

    def seal_trust(self, trust: Trust, subject: str | None = None) -> Signature:
        value = self.sign(contexts.HSM_SEALS_TRUST, trust.signed_bytes())
        return Signature(subject or trust.id, self.id, value)

    def seal_domain(self, domain: Domain, subject: str | None = None) -> Signature:
        value = self.sign(contexts.HSM_SEALS_DOMAIN, domain.signed_bytes())
        return Signature(subject or domain.id, self.id, value)


def make_hsm(label: str) -> SoftHsm:
    """A software HSM whose record is self-signed over ``HSM_RECORD || signed_bytes()``."""
    private = ed25519_key("hsm", label)
    unsigned = HsmRecord(
        label, PublicKey("rsa-oaep-sha1", rsa_wrap_spki()), public_key(private), CREATED
    )
    value = private.sign(contexts.message(contexts.HSM_RECORD, unsigned.signed_bytes()))
    return SoftHsm(dataclasses.replace(unsigned, signature=value), private)


@dataclass(frozen=True)
class SoftOperator:
    """An operator stand-in: a name and an Ed25519 key."""

    name: str
    private: ed25519.Ed25519PrivateKey

    @property
    def key(self) -> PublicKey:
        return public_key(self.private)

    @property
    def key_id(self) -> str:
        return self.key.key_id

    @property
    def member(self) -> Member:
        return Member(self.name, self.key)

    def record(self, protection: str = "passphrase") -> OperatorRecord:
        unsigned = OperatorRecord(self.name, self.key, protection, CREATED)
        value = self.private.sign(
            contexts.message(contexts.OPERATOR_RECORD, unsigned.signed_bytes())
        )
        return dataclasses.replace(unsigned, signature=value)

    def sign(self, context: bytes, payload: bytes) -> bytes:
        return self.private.sign(contexts.message(context, payload))

    def approve(self, trust: Trust) -> Signature:
        """A genuine approval: ``OPERATOR_APPROVES_TRUST || trust.signed_bytes()``."""
        value = self.sign(contexts.OPERATOR_APPROVES_TRUST, trust.signed_bytes())
        return Signature(trust.id, self.key_id, value)


def make_operator(name: str) -> SoftOperator:
    return SoftOperator(name, ed25519_key("operator", name))


def make_trust(
    hsms: Sequence[SoftHsm],
    operators: Sequence[SoftOperator] = (),
    quorum: int = 0,
    predecessor: SealedTrust | Trust | None = None,
    serial: int | None = None,
    created: str = CREATED,
) -> Trust:
    """A Trust payload; ``serial`` defaults to the predecessor's + 1 (1 for a root)."""
    if serial is None:
        serial = 1 if predecessor is None else _trust_of(predecessor).serial + 1
    return Trust(
        serial=serial,
        predecessor=None if predecessor is None else predecessor.id,
        hsms=tuple(h.record for h in hsms),
        operators=tuple(o.member for o in operators),
        quorum=quorum,
        created=created,
    )


def _trust_of(value: SealedTrust | Trust) -> Trust:
    return value.trust if isinstance(value, SealedTrust) else value


def seal_trust(trust: Trust, approvers: Iterable[SoftOperator], hsm: SoftHsm) -> SealedTrust:
    """Collect genuine approvals from ``approvers`` and seal with ``hsm``."""
    return SealedTrust(trust, tuple(o.approve(trust) for o in approvers), hsm.seal_trust(trust))


def make_domain(
    trust: Trust | SealedTrust,
    hsms: Sequence[SoftHsm] | None = None,
    name: str = "data",
    epochs: int = 1,
) -> Domain:
    """A generation-1 Domain of ``trust`` with ``k`` wrapped to ``hsms`` (default: the trust's)."""
    governing = _trust_of(trust)
    hsm_ids = [h.id for h in hsms] if hsms is not None else [h.id for h in governing.hsms]
    return Domain(
        name=name,
        generation=1,
        previous=None,
        trust=governing.id,
        wrapped_k=tuple(WrappedKey(i, "rsa-oaep-sha1", _seed("k", name, i) * 12) for i in hsm_ids),
        master_keys=tuple(
            MasterKeyEpoch(e, _seed("mk", name, str(e)) + b"\x01" * 8, _seed("bind", name, str(e)))
            for e in range(1, epochs + 1)
        ),
        created=CREATED,
    )


def seal_domain(domain: Domain, hsm: SoftHsm) -> SealedDomain:
    return SealedDomain(domain, hsm.seal_domain(domain))


@dataclass(frozen=True)
class World:
    """One honest store: genesis G (h1, h2), then T2 (alice..erin, quorum 3), and Domain D of T2.

    ``outsider`` is an HSM that belongs to no Trust; ``mallory`` is an operator of no Trust.
    """

    h1: SoftHsm
    h2: SoftHsm
    outsider: SoftHsm
    ops: tuple[SoftOperator, ...]
    mallory: SoftOperator
    genesis: SealedTrust
    t2: SealedTrust
    domain: SealedDomain

    @property
    def hsms(self) -> tuple[SoftHsm, SoftHsm]:
        return (self.h1, self.h2)

    @property
    def chain(self) -> tuple[SealedTrust, ...]:
        return (self.genesis, self.t2)

    @property
    def root(self) -> str:
        return self.genesis.id

    @property
    def bundle(self) -> DomainBundle:
        return DomainBundle(self.domain, self.chain)

    def op(self, name: str) -> SoftOperator:
        return next(o for o in self.ops if o.name == name)


OPERATOR_NAMES = ("alice", "bob", "carol", "dave", "erin")


@functools.cache
def world() -> World:
    """The shared honest store (built once; every object in it is frozen)."""
    h1, h2, outsider = make_hsm("hsm1"), make_hsm("hsm2"), make_hsm("outsider")
    ops = tuple(make_operator(n) for n in OPERATOR_NAMES)
    genesis = seal_trust(make_trust([h1, h2]), [], h1)
    t2 = seal_trust(make_trust([h1, h2], ops, 3, genesis), ops[:3], h2)
    domain = seal_domain(make_domain(t2), h1)
    return World(h1, h2, outsider, ops, make_operator("mallory"), genesis, t2, domain)
