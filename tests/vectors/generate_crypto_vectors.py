"""Regenerate tests/vectors/crypto_v1.json and crypto_v2.json: known answers for the kmsfs
on-disk format. crypto_v1.json: the version 1 content header and blocks, names and symlinks;
crypto_v2.json (vectors_v2): the version 2 content header (key epoch in the file id) and blocks,
and the encrypted xattr layout (short and long names, values).

Source of the vectors: this script, which re-implements docs/format.md (format version 1) directly
on pyca/cryptography's AESGCM, AESSIV and HKDF, and deliberately imports nothing from kmsfs. The
unit tests check kmsfs.crypto against the JSON it writes, so a change to the format (a label, the
AAD layout, the encoding, a threshold) fails a test instead of slipping by. Regenerating the file
is a format change: bump FORMAT_VERSION and document it in docs/format.md first.

Run: .venv/bin/python tests/vectors/generate_crypto_vectors.py
"""

import base64
import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

OUT = Path(__file__).with_name("crypto_v1.json")
OUT_V2 = Path(__file__).with_name("crypto_v2.json")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def content_vectors() -> dict:
    """docs/format.md "Header" version 1: 0x0001 || file id (16 random bytes)."""
    return _content(1, bytes(range(0x10, 0x20)))


def _content(version: int, file_id: bytes) -> dict:
    """A file with this header version and file id: its header, the file-key info kmsfs
    derives its key from, and three of its blocks (under a fixed stand-in file key)."""
    file_key = bytes(range(32))
    nonce = bytes(range(0xA0, 0xAC))
    header = version.to_bytes(2, "big") + file_id
    return {
        "file_key": file_key.hex(),
        "file_id": file_id.hex(),
        "nonce": nonce.hex(),
        "header": header.hex(),
        "file_key_info": (b"kmsfs/v1/file-key\x00" + file_id).hex(),
        "blocks": _blocks(file_key, nonce, header),
    }


def _blocks(file_key: bytes, nonce: bytes, header: bytes) -> list[dict]:
    """Blocks 0, 1 and 2^40 + 5 of the file with this header: AAD = header || n (the version
    and the file id, as both header versions put them)."""
    cases = []
    for block_no, plaintext in [
        (0, b"kmsfs"),
        (1, bytes(4096)),
        (2**40 + 5, bytes(i % 251 for i in range(1000))),
    ]:
        aad = header + block_no.to_bytes(8, "big")
        block = nonce + AESGCM(file_key).encrypt(nonce, plaintext, aad)
        cases.append({"block_no": block_no, "plaintext": plaintext.hex(), "block": block.hex()})
    return cases


def name_vectors() -> dict:
    secret = bytes(range(0x40, 0x60))
    dir_iv = bytes(range(0x70, 0x80))
    siv = AESSIV(hkdf(secret, b"kmsfs/v1/names/aes-siv", 64))
    cases = []
    for name in [
        b"a",
        b"hello.txt",
        "Grüße, 世界".encode(),
        b"n" * 115,  # longest name kept short: 131 bytes -> 175 characters
        b"n" * 116,  # shortest long name
        b"x" * 255,
    ]:
        encoded = b64(siv.encrypt(name, [dir_iv]))
        if len(encoded) <= 175:
            disk, long_content = encoded, None
        else:
            disk = "kmsfs.longname." + b64(hashlib.sha256(encoded.encode()).digest())
            long_content = encoded
        cases.append(
            {"name": name.hex(), "encoded": encoded, "disk": disk, "long_content": long_content}
        )
    return {"names_secret": secret.hex(), "dir_iv": dir_iv.hex(), "names": cases}


def symlink_vectors() -> dict:
    secret = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0xB0, 0xBC))
    aead = AESGCM(hkdf(secret, b"kmsfs/v1/symlinks/aes-256-gcm", 32))
    cases = []
    for target in [b"../a/b", bytes(i % 255 + 1 for i in range(4095))]:
        encoded = b64(nonce + aead.encrypt(nonce, target, None))
        if len(encoded) <= 1023:
            disk, long_content = encoded, None
        else:
            disk = "kmsfs.longlink." + b64(hashlib.sha256(encoded.encode()).digest())
            long_content = encoded
        cases.append(
            {"target": target.hex(), "encoded": encoded, "disk": disk, "long_content": long_content}
        )
    return {"symlink_secret": secret.hex(), "nonce": nonce.hex(), "targets": cases}


def content_v2_vectors() -> dict:
    """docs/format.md "Header" version 2: 0x0002 || epoch (2) || random (14); the file id is the
    16 bytes at offset 2, and the AAD of block n is version || file id || n, as in version 1.
    The fixed file key stands for derive(file-key info, epoch=2)."""
    epoch = 2
    file_id = epoch.to_bytes(2, "big") + bytes(range(0x30, 0x3E))  # epoch || 14 random bytes
    return {"epoch": epoch, **_content(2, file_id)}


def xattr_vectors() -> dict:
    """docs/format.md "Volume config", EncryptedXattrs and LongXattrNames: s is the 32-byte
    xattr secret (derive("kmsfs/v1/xattrs"), fixed here); names and values as specified there."""
    secret = bytes(range(0x60, 0x80))
    nonce = bytes(range(0xC0, 0xCC))
    name_key = hkdf(secret, b"kmsfs/v1/xattrs/aes-siv", 64)
    value_key = hkdf(secret, b"kmsfs/v1/xattrs/aes-256-gcm", 32)
    siv, gcm = AESSIV(name_key), AESGCM(value_key)

    def disk(name: bytes) -> tuple[bytes, bytes, bool]:
        sealed = siv.encrypt(name[len(b"user.") :], [b"kmsfs/v1/xattr"])
        short = b"user." + b64(sealed).encode()
        if len(short) <= 255:
            return sealed, short, False
        hashed = b64(hashlib.sha256(b64(sealed).encode()).digest())
        return sealed, b"user.l." + hashed.encode(), True

    names = []
    for name in [
        b"user.color",
        "user.Grüße".encode(),
        b"user." + b"n" * 171,  # longest short name: 16 + 171 bytes -> 250 characters
        b"user." + b"n" * 172,  # shortest long name
        b"user." + b"L" * 200,
        b"user." + b"x" * 250,  # longest name Linux takes (255 bytes)
    ]:
        sealed, disk_name, long = disk(name)
        names.append(
            {"name": name.hex(), "sealed": sealed.hex(), "disk": disk_name.decode(), "long": long}
        )

    values = []
    for name, value in [
        (b"user.color", b"blue"),
        (b"user.color", b""),
        (b"user." + b"L" * 200, b"blue"),
        (b"user." + b"L" * 200, b""),
    ]:
        sealed, disk_name, long = disk(name)
        stored = nonce + gcm.encrypt(nonce, value, disk_name)
        if long:
            stored = len(sealed).to_bytes(2, "big") + sealed + stored
        values.append({
            "name": name.hex(),
            "disk": disk_name.decode(),
            "value": value.hex(),
            "stored": stored.hex(),
        })
    return {
        "key_info": b"kmsfs/v1/xattrs".hex(),
        "xattr_secret": secret.hex(),
        "name_key_hkdf_info": b"kmsfs/v1/xattrs/aes-siv".hex(),
        "name_key": name_key.hex(),
        "value_key_hkdf_info": b"kmsfs/v1/xattrs/aes-256-gcm".hex(),
        "value_key": value_key.hex(),
        "name_ad": b"kmsfs/v1/xattr".hex(),
        "nonce": nonce.hex(),
        "names": names,
        "values": values,
    }


def vectors_v2() -> dict:
    return {
        "source": (
            "tests/vectors/generate_crypto_vectors.py (vectors_v2): docs/format.md re-implemented "
            "on pyca/cryptography primitives, independent of kmsfs code"
        ),
        "header_version": 2,
        "content": content_v2_vectors(),
        "xattrs": xattr_vectors(),
    }


def main() -> None:
    vectors = {
        "source": (
            "tests/vectors/generate_crypto_vectors.py: docs/format.md v1 re-implemented on "
            "pyca/cryptography primitives, independent of kmsfs code"
        ),
        "format_version": 1,
        "content": content_vectors(),
        "names": name_vectors(),
        "symlinks": symlink_vectors(),
    }
    OUT.write_text(json.dumps(vectors, indent=1) + "\n")
    OUT_V2.write_text(json.dumps(vectors_v2(), indent=1) + "\n")


if __name__ == "__main__":
    main()
