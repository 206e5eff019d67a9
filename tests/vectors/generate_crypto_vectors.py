"""Regenerate tests/vectors/crypto_v1.json: known answers for the kmsfs v1 on-disk format.

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


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hkdf(secret: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def content_vectors() -> dict:
    file_key = bytes(range(32))
    file_id = bytes(range(0x10, 0x20))
    nonce = bytes(range(0xA0, 0xAC))
    header = (1).to_bytes(2, "big") + file_id
    cases = []
    for block_no, plaintext in [
        (0, b"kmsfs"),
        (1, bytes(4096)),
        (2**40 + 5, bytes(i % 251 for i in range(1000))),
    ]:
        aad = header + block_no.to_bytes(8, "big")
        block = nonce + AESGCM(file_key).encrypt(nonce, plaintext, aad)
        cases.append({"block_no": block_no, "plaintext": plaintext.hex(), "block": block.hex()})
    return {
        "file_key": file_key.hex(),
        "file_id": file_id.hex(),
        "nonce": nonce.hex(),
        "header": header.hex(),
        "file_key_info": (b"kmsfs/v1/file-key\x00" + file_id).hex(),
        "blocks": cases,
    }


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


if __name__ == "__main__":
    main()
