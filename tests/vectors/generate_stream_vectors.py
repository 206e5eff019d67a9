"""Regenerate tests/vectors/stream_v1.json and stream_v2.json: known answers for single
encrypted files, versions 1 and 2 (version 2: the file id starts with the mk epoch).

Source of the vectors: this script, which re-implements docs/format.md section "Single encrypted
files" directly on pyca/cryptography's AESGCM and hashlib, and deliberately imports nothing from
kmsfs. tests/unit/test_crypto_stream.py checks kmsfs.crypto.stream against the JSON, so a change to
the magic, the header layout, the key label or the chunk AAD fails a test. Regenerating the file
is a format change: bump the version and document it in docs/format.md first.

The file key is fixed here (in kmsfs it is derived in the HSM from the file id); the nonce of
chunk n is NONCE_BASE with n added to its last byte.

Run: .venv/bin/python tests/vectors/generate_stream_vectors.py
"""

import hashlib
import json
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

OUT = Path(__file__).with_name("stream_v1.json")
OUT_V2 = Path(__file__).with_name("stream_v2.json")
EPOCH_V2 = 2
FILE_ID_V2 = EPOCH_V2.to_bytes(2, "big") + bytes(range(0x20, 0x2E))  # epoch || 14 random
CHUNK = 65536
FILE_KEY = bytes(range(0x40, 0x60))
FILE_ID = bytes(range(0x10, 0x20))
BUNDLE = b'{"_type":"domain-bundle","test":true}'
NONCE_BASE = bytes(range(0xA0, 0xAC))


def nonce(n: int) -> bytes:
    return NONCE_BASE[:-1] + bytes([(NONCE_BASE[-1] + n) % 256])


def header(version: int = 1) -> bytes:
    magic = b"\x89kmsfs\r\n"
    file_id = FILE_ID if version == 1 else FILE_ID_V2
    return magic + version.to_bytes(2, "big") + len(BUNDLE).to_bytes(4, "big") + BUNDLE + file_id


def encrypt(plaintext: bytes, version: int = 1) -> bytes:
    head = header(version)
    digest = hashlib.sha256(head).digest()
    pieces = [plaintext[i : i + CHUNK] for i in range(0, len(plaintext), CHUNK)] or [b""]
    out = [head]
    for n, piece in enumerate(pieces):
        aad = digest + n.to_bytes(8, "big") + (b"\x01" if n == len(pieces) - 1 else b"\x00")
        out.append(nonce(n) + AESGCM(FILE_KEY).encrypt(nonce(n), piece, aad))
    return b"".join(out)


def pattern(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def vectors() -> dict:
    cases = []
    for size in (0, 5):
        cases.append({"plain_size": size, "file": encrypt(pattern(size)).hex()})
    for size in (CHUNK, CHUNK + 5):
        data = encrypt(pattern(size))
        cases.append({
            "plain_size": size,
            "file_size": len(data),
            "file_sha256": hashlib.sha256(data).hexdigest(),
        })
    return {
        "source": "tests/vectors/generate_stream_vectors.py (pyca/cryptography only)",
        "plaintext": "byte i is i mod 251",
        "key_info": (b"kmsfs/v1/single-file\x00" + FILE_ID).hex(),
        "file_key": FILE_KEY.hex(),
        "file_id": FILE_ID.hex(),
        "bundle": BUNDLE.hex(),
        "nonce_base": NONCE_BASE.hex(),
        "header": header().hex(),
        "cases": cases,
    }


def vectors_v2() -> dict:
    """Version 2 (the epoch in the file id). The file key stands for derive(info, epoch=2)."""
    cases = [{"plain_size": size, "file": encrypt(pattern(size), 2).hex()} for size in (0, 5)]
    return {
        "source": "tests/vectors/generate_stream_vectors.py (pyca/cryptography only)",
        "plaintext": "byte i is i mod 251",
        "epoch": EPOCH_V2,
        "key_info": (b"kmsfs/v1/single-file\x00" + FILE_ID_V2).hex(),
        "file_key": FILE_KEY.hex(),
        "file_id": FILE_ID_V2.hex(),
        "bundle": BUNDLE.hex(),
        "nonce_base": NONCE_BASE.hex(),
        "header": header(2).hex(),
        "cases": cases,
    }


def main() -> None:
    OUT.write_text(json.dumps(vectors(), indent=2) + "\n")
    OUT_V2.write_text(json.dumps(vectors_v2(), indent=2) + "\n")


if __name__ == "__main__":
    main()
