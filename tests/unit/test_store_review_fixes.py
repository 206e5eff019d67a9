"""The store's side of review findings M2, L1 and M4: errors name the full path of a document,
a write that fails is a StoreError (exit 6) naming what and where, a stale SoftHSM config of a
read-only store is never rewritten, and ``init`` makes no directory but the store's own."""

import errno
import os
import stat
from pathlib import Path

import pytest

from kmsfs import atomicfile, exitcodes
from kmsfs.errors import FormatError, NotFoundError, StoreError, UsageError
from kmsfs.hsm import softhsm
from kmsfs.service import store_init
from kmsfs.store import private, writable
from kmsfs.store.documents import Store
from kmsfs.store.private import PrivateArea

DOMAIN_ID = "32b5" + "0" * 60


def test_damaged_document_error_names_the_store(tmp_path: Path) -> None:
    """M4: "domains/32b5….json: not JSON" did not say which store."""
    store = Store(tmp_path / "store")
    path = store.root / "domains" / f"{DOMAIN_ID}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"_type": "domain", "name": "pay')  # truncated
    with pytest.raises(FormatError) as caught:
        store.domain(DOMAIN_ID)
    assert str(caught.value).startswith(f"{path}: not JSON (Unterminated string"), caught.value
    with pytest.raises(NotFoundError, match=f"^{tmp_path}/store/hsms/abcd.json: no such"):
        store.hsm("abcd")


def test_failed_document_write_is_a_store_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """M2: an OSError writing the store (a read-only mount) was a raw [Errno 30], exit 1."""

    def read_only(path: Path, *args: object, **kwargs: object) -> bool:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path.parent / ".tmp-x"))

    monkeypatch.setattr(atomicfile, "write_new", read_only)
    store = Store(tmp_path / "store")
    with pytest.raises(StoreError) as caught:
        store._write(store.root / "domains" / "d.json", {"a": 1})
    assert str(caught.value) == (
        f"{store.root}/domains/d.json: cannot write the document: Read-only file system"
    )
    assert exitcodes.for_error(caught.value) == exitcodes.STORE


def test_require_writable_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """M2: what must write is refused before it starts (a PIN, a token's signature)."""
    store = Store(tmp_path)
    store.require_writable("an approval")  # writable: nothing said
    monkeypatch.setattr(writable, "is_writable", lambda root: False)
    with pytest.raises(StoreError, match=f"^{tmp_path}: cannot write an approval: the store is "):
        store.require_writable("an approval")


def _stale_area(tmp_path: Path) -> PrivateArea:
    """A private area whose softhsm2.conf names the token directory of another path (the
    store restored, moved or reached through a bind mount)."""
    area = PrivateArea(tmp_path / "store" / "private")
    area.ensure()
    softhsm.write_config(area.softhsm_conf, tmp_path / "elsewhere" / "tokens")
    return area


def test_stale_conf_of_a_writable_store_is_corrected_in_place(tmp_path: Path) -> None:
    area = _stale_area(tmp_path)
    assert area.ensure_softhsm_conf() == area.softhsm_conf
    assert f"directories.tokendir = {area.token_dir}\n" in area.softhsm_conf.read_text()


def test_stale_conf_of_a_read_only_store_is_never_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """M2: a read-only store's stale config was rewritten (EROFS: exit 1); a config outside
    it, in a private directory of the user, serves instead."""
    area = _stale_area(tmp_path)
    before = area.softhsm_conf.read_bytes()
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    monkeypatch.setattr(private, "is_writable", lambda root: False)
    conf = area.ensure_softhsm_conf()
    assert conf.parent == run / "kmsfs" and area.softhsm_conf.read_bytes() == before
    assert conf.read_text() == softhsm.config_text(area.token_dir)
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    assert stat.S_IMODE(conf.parent.stat().st_mode) == 0o700
    assert area.ensure_softhsm_conf() == conf  # the same one again: one per token directory


def test_config_outside_refuses_a_directory_others_may_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    (run / "kmsfs").mkdir(parents=True)
    os.chmod(run / "kmsfs", 0o777)  # planted in a shared directory
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    with pytest.raises(StoreError, match="not a private directory of this user"):
        softhsm.config_outside(tmp_path / "tokens")
    assert list((run / "kmsfs").iterdir()) == []


@pytest.mark.parametrize("above", ["another user's", "others may write"])
def test_config_outside_refuses_a_runtime_directory_another_user_could_replace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, above: str
) -> None:
    """Root run with a user's XDG_RUNTIME_DIR (su without -, sudo -E): that user could rename
    kmsfs/ away after the check and put their own config there, which SoftHSM2 reads at every
    C_Initialize (found by review). Refused before anything is made there."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    if above == "another user's":
        os.chown(run, 1234, 1234)
    else:
        os.chmod(run, 0o777)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    with pytest.raises(StoreError, match="another user could replace"):
        softhsm.config_outside(tmp_path / "tokens")
    assert list(run.iterdir()) == []


def test_config_outside_refuses_a_runtime_directory_reached_through_a_shared_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """XDG_RUNTIME_DIR a symlink to a private directory, the link in a directory others may
    write: they repoint it after the check, and the config path leads to theirs. Its target
    alone was checked (the path was resolved first)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    (shared / "run").symlink_to(private)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared / "run"))
    with pytest.raises(StoreError, match=fr"^{shared}: others may write it \(mode 0777\), so"):
        softhsm.config_outside(tmp_path / "tokens")
    assert list(private.iterdir()) == []


def test_the_token_files_lock_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    """A symlink at the lock's path would have root create a file wherever it leads."""
    from kmsfs.hsm import library

    (tmp_path / "softhsm2.conf.lock").symlink_to(tmp_path / "created-by-root")
    assert library._open_lock_file(str(tmp_path / "softhsm2.conf")) is None
    assert not (tmp_path / "created-by-root").exists()


def test_make_root_refuses_a_missing_parent(tmp_path: Path) -> None:
    """L1: ``init --store /nonexistent/deeper/x`` made every missing directory and exited 0."""
    store = Store(tmp_path / "nonexistent" / "deeper" / "x")
    with pytest.raises(NotFoundError) as caught:
        store.make_root()
    assert str(caught.value).startswith(f"{tmp_path}/nonexistent/deeper: no such directory")
    assert exitcodes.for_error(caught.value) == exitcodes.STORE
    assert not (tmp_path / "nonexistent").exists()


def test_make_root_new_or_existing_empty(tmp_path: Path) -> None:
    Store(tmp_path / "new").make_root()
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o755
    (tmp_path / "empty").mkdir()
    Store(tmp_path / "empty").make_root()



def test_init_refuses_a_store_whose_parent_is_missing(tmp_path: Path) -> None:
    """L1, through ``init``: refused before any HSM is made, nothing created."""
    with pytest.raises(NotFoundError, match="deeper: no such directory"):
        store_init.init_store(tmp_path / "nonexistent" / "deeper" / "x", hsm_count=1)
    assert list(tmp_path.iterdir()) == []


def test_an_absolute_runtime_directory_needs_no_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walk asked for the working directory even for an absolute path: from a removed one
    it failed, naming a directory that exists (review)."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))
    conf = softhsm.config_outside(tmp_path / "tokens")
    assert conf.parent == run / "kmsfs"


def test_an_id_prefix_too_short_is_a_usage_error_and_an_unknown_one_is_missing(
    tmp_path: Path,
) -> None:
    """`trust show abc` exited 6 ("the store or a document is missing"): a prefix under 4 hex
    digits is a bad argument (exit 2, as argparse's own); a well-formed one that matches no
    document is still a missing one (exit 6)."""
    store = Store(tmp_path / "store")
    ids = [DOMAIN_ID]
    with pytest.raises(UsageError, match=r"^trust id 'abc': give at least 4 hex digits$") as short:
        store.resolve("trust", "abc", ids)
    assert exitcodes.for_error(short.value) == exitcodes.USAGE
    with pytest.raises(NotFoundError, match=r"^no trust 'abcd' in ") as unknown:
        store.resolve("trust", "abcd", ids)
    assert exitcodes.for_error(unknown.value) == exitcodes.STORE
    assert store.resolve("trust", "32B5", ids) == DOMAIN_ID  # any case, as git
    # An HSM is named by label first: a ref that is no hex id is a label not there, however
    # long ("hs1" was a usage error and "hsm9" a missing one).
    for label in ("hs1", "hsm9"):
        with pytest.raises(NotFoundError, match=rf"^no HSM '{label}' in ") as missing:
            store.resolve("HSM", label, ids)
        assert exitcodes.for_error(missing.value) == exitcodes.STORE
