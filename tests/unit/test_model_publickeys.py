"""Ed25519 public keys of small order, or encoded twice, are refused (DESIGN.md §2.3).

With a small-order "public key" no private key is needed: OpenSSL accepts the signature
R = identity, S = 0 for every message under the identity key. A Trust listing such an
operator would let anyone approve as them.
"""


import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from kmsfs.errors import FormatError
from kmsfs.model.publickeys import _ED25519_SMALL_ORDER_Y, PublicKey

P = 2**255 - 19
D = -121665 * pow(121666, -1, P) % P
IDENTITY = (0, 1)


def _x_of(y: int, sign: int) -> int:
    """x of the curve point with this y (RFC 8032 §5.1.3), for checking the list above."""
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if v * x * x % P == (-u) % P:
        x = x * pow(2, (P - 1) // 4, P) % P
    assert v * x * x % P == u % P, "not on the curve"
    return P - x if (x & 1) != sign and x else x


def _double(pt: tuple[int, int]) -> tuple[int, int]:
    x, y = pt
    d = D * x * x * y * y % P
    return (2 * x * y * pow(1 + d, -1, P) % P, (y * y + x * x) * pow(1 - d, -1, P) % P)


def _encode(y: int, sign: int = 0) -> bytes:
    return (y | sign << 255).to_bytes(32, "little")


@pytest.mark.parametrize("y", sorted(_ED25519_SMALL_ORDER_Y))
def test_every_listed_point_has_small_order_and_is_refused(y: int) -> None:
    for sign in (0, 1):
        point = (_x_of(y, sign), y)
        for _ in range(3):  # order divides 8
            point = _double(point)
        assert point == IDENTITY
        with pytest.raises(FormatError, match="small order"):
            PublicKey("ed25519", _encode(y, sign))


def test_the_identity_key_is_the_attack_and_is_refused() -> None:
    key = ed25519.Ed25519PublicKey.from_public_bytes(_encode(1))
    forged = _encode(1) + bytes(32)  # R = identity, S = 0
    key.verify(forged, b"any trust body")  # the library alone accepts it
    with pytest.raises(FormatError):
        PublicKey("ed25519", _encode(1))


def test_non_canonical_encodings_are_refused() -> None:
    """y + p encodes the same point under another key id."""
    for y in (P, P + 1, 2**255 - 1):
        with pytest.raises(FormatError, match="canonical"):
            PublicKey("ed25519", _encode(y))


def test_real_keys_are_accepted() -> None:
    for _ in range(200):
        raw = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert PublicKey("ed25519", raw).data == raw
