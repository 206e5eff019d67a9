"""PIN sources: file, environment, systemd credential; never an empty or unbounded secret."""

from pathlib import Path

import pytest

from kmsfs.errors import FormatError, PinError, UsageError
from kmsfs.hsm import pins
from kmsfs.hsm.pins import PinSource, loose_pin_file, pin_source_from_args


def test_file_pin_drops_only_the_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_text(" spaced pin \n")
    assert PinSource(file=str(path)).read() == " spaced pin "


def test_env_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMSFS_TEST_PIN", "from-env")
    assert PinSource(env="KMSFS_TEST_PIN").read() == "from-env"
    monkeypatch.delenv("KMSFS_TEST_PIN")
    with pytest.raises(PinError, match="KMSFS_TEST_PIN"):
        PinSource(env="KMSFS_TEST_PIN").read()


def test_systemd_credential_is_read_from_the_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hsm-a.pin").write_text("from-credential\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert PinSource(credential="hsm-a.pin").read() == "from-credential"
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(PinError, match="LoadCredential"):
        PinSource(credential="hsm-a.pin").read()


@pytest.mark.parametrize("name", ["", "../etc/shadow", "a/b", ".hidden"])
def test_credential_names_cannot_escape_the_directory(name: str) -> None:
    with pytest.raises(FormatError):
        PinSource(credential=name)


def test_empty_and_missing_pins_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(PinError, match="empty"):
        PinSource(file=str(empty)).read()
    with pytest.raises(PinError, match="cannot read"):
        PinSource(file=str(tmp_path / "missing")).read()


def test_exactly_one_source() -> None:
    with pytest.raises(FormatError):
        PinSource(file="a", env="B")
    with pytest.raises(FormatError):
        PinSource()
    with pytest.raises(UsageError) as two:
        pin_source_from_args("a", "B", "prompt")
    # kmsfs-admin's PIN options: --pin-credential is not one, so it is not offered
    assert str(two.value) == "give only one of --pin-file, --pin-env"
    with pytest.raises(UsageError, match=r"--pin-file, --pin-env, --pin-credential$"):
        pin_source_from_args("a", None, "prompt", credential="c")
    assert pin_source_from_args(None, None, "ask").prompt == "ask"


def test_round_trip_through_dict() -> None:
    for source in (PinSource(file="/x"), PinSource(env="E"), PinSource(credential="c")):
        assert PinSource.from_dict(source.to_dict()) == source


def test_a_pin_that_is_not_utf8_is_one_error_that_shows_none_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was a traceback ending in "can't decode byte 0xe9 in position 8": the PIN's length
    and one of its bytes."""
    path = tmp_path / "pin"
    path.write_bytes(b"alicepin\xe9\n")
    with pytest.raises(PinError) as info:
        PinSource(file=str(path)).read()
    assert str(info.value) == f"PIN file {path}: not UTF-8 text"
    monkeypatch.setenv("XPIN", "ab\udcff")  # how Python shows an environment value's bad byte
    with pytest.raises(PinError) as info:
        PinSource(env="XPIN").read()
    assert str(info.value) == "the PIN (environment variable XPIN) is not UTF-8 text"


def test_end_of_input_at_the_prompt_is_a_pin_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-D at the prompt was an EOFError traceback from getpass (exit 1)."""

    def eof(prompt: str) -> str:
        raise EOFError

    monkeypatch.setattr(pins.sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(pins.getpass, "getpass", eof)
    with pytest.raises(PinError) as info:
        PinSource(prompt="PIN of operator carol").read()
    assert str(info.value) == "no PIN given (end of input at the prompt)"


@pytest.mark.parametrize(
    ("mode", "who"),
    [(0o600, None), (0o400, None), (0o640, "group"), (0o604, "others"),
     (0o644, "group and others")],
)
def test_a_pin_file_others_can_read_is_named_without_its_pin(
    tmp_path: Path, mode: int, who: str | None
) -> None:
    path = tmp_path / "carol.pin"
    path.write_text("secret-pin-of-carol\n")
    path.chmod(mode)
    warning = loose_pin_file(PinSource(file=str(path)))
    if who is None:
        assert warning is None
        return
    assert warning == (
        f"PIN file {path} can be read by {who} (mode {mode:04o}): chmod 600 {path}"
    )
    assert PinSource(file=str(path)).read() == "secret-pin-of-carol"  # used all the same


def test_only_a_regular_pin_file_is_checked(tmp_path: Path) -> None:
    """/dev/null (0666), a pipe or an empty file leave no copy of a PIN on disk; a missing
    file is reported when it is read."""
    empty = tmp_path / "empty.pin"
    empty.write_text("")
    empty.chmod(0o644)
    for source in (PinSource(file="/dev/null"), PinSource(file=str(tmp_path / "missing")),
                   PinSource(file=str(empty)), PinSource(env="X"), PinSource(prompt="p")):
        assert loose_pin_file(source) is None


def test_no_pin_error_shows_the_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every refusal of a PIN that was read (too long, from a file, the environment or a
    credential) names where it came from, never what it is: a wrong --pin-file or an
    oversized variable must not put the secret on stderr or in the journal."""
    marker = "S3cr3t-PIN-marker-"
    long_secret = marker + "x" * (pins.MAX_PIN_BYTES + 1 - len(marker))
    (tmp_path / "long").write_text(long_secret + "\n")
    (tmp_path / "cred").mkdir()
    (tmp_path / "cred" / "hsm.pin").write_text(long_secret)
    monkeypatch.setenv("KMSFS_TEST_PIN", long_secret)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "cred"))
    sources = [
        PinSource(file=str(tmp_path / "long")),
        PinSource(env="KMSFS_TEST_PIN"),
        PinSource(credential="hsm.pin"),
    ]
    for source in sources:
        with pytest.raises(PinError) as refused:
            source.read()
        assert str(refused.value) == "the PIN is too long"
        assert marker not in repr(refused.value) and refused.value.__cause__ is None
