"""Shell completion is generated from the parsers: every subcommand and option completes."""

import subprocess
import sys

import pytest

COMMANDS = {"kmsfs-admin": "kmsfs.admin.cli", "kmsfs": "kmsfs.fs.cli"}


def _complete(command: str, *words: str) -> list[str]:
    script = subprocess.run(
        [sys.executable, "-m", COMMANDS[command], "completion", "bash"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fn = "_" + command.replace("-", "_")
    quoted = " ".join(f"'{w}'" for w in (command, *words))
    probe = (
        f'{script}\nCOMP_WORDS=({quoted}); COMP_CWORD={len(words)}; {fn}; echo "${{COMPREPLY[*]}}"'
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.mark.parametrize(
    ("words", "want"),
    [
        (("",), {"init", "hsm", "operator", "trust", "domain", "completion"}),
        (("trust", ""), {"propose", "list", "show", "sign", "seal", "verify", "pin"}),
        (("--json", "domain", ""), {"create", "list", "verify", "rewrap", "export"}),
        (("trust", "sign", "--pin-"), {"--pin-file", "--pin-env"}),
        (("hsm", "enroll", "--"), {"--module", "--token", "--label", "--pin-credential"}),
    ],
)
def test_admin_completion(words: tuple[str, ...], want: set[str]) -> None:
    assert want <= set(_complete("kmsfs-admin", *words))


@pytest.mark.parametrize(
    ("words", "want"),
    [
        (("",), {"init", "mount", "umount", "info", "encrypt", "decrypt", "fsck", "completion"}),
        (("mount", "--"), {"--store", "--foreground"}),
        (("decrypt", "--"), {"--store", "--cipherdir"}),
    ],
)
def test_kmsfs_completion(words: tuple[str, ...], want: set[str]) -> None:
    assert want <= set(_complete("kmsfs", *words))
