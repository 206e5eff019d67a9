"""Malformed input: fuzzed store documents, volume configs and file headers; bad admin arguments.

Every case must end in a clear error naming the bad file (one ``prog: error:`` line, non-zero
exit), never a traceback or a hang, and must change no other file. Mutations run many times
through the in-process parsers and a few dozen times through the real command lines (each of
those costs a process and an HSM login).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsfs.crypto import stream
from kmsfs.errors import KmsfsError
from kmsfs.fs import config as volconfig
from kmsfs.fs.fsck import check_tree
from kmsfs.store.documents import Store
from tests.integration.fault_helpers import kmsfs
from tests.integration.fs_helpers import Mount, SoftDeriver, make_volume
from tests.kms_helpers import Admin, tree_snapshot

CLI = settings(max_examples=25, deadline=None, derandomize=True,
               suppress_health_check=list(HealthCheck))
FAST = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


# --- mutations ------------------------------------------------------------------------------
def _json_mutations(doc: object) -> st.SearchStrategy[bytes]:
    """Field-level edits of a JSON document: drop, retype or replace one value somewhere."""
    paths: list[tuple] = []

    def walk(node: object, path: tuple) -> None:
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(doc, ())
    values = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**70), st.text(max_size=8),
                       st.just([]), st.just({}), st.just("A" * 100_000))

    def edit(path: tuple, value: object, drop: bool) -> bytes:
        new = json.loads(json.dumps(doc))
        if not path:
            return json.dumps(value).encode()
        parent = new
        for k in path[:-1]:
            parent = parent[k]
        if drop:
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
        return json.dumps(new, separators=(",", ":")).encode()

    return st.builds(edit, st.sampled_from(paths), values, st.booleans())


def mutations(original: bytes) -> st.SearchStrategy[bytes]:
    n = len(original)
    flip = st.builds(lambda i, b: original[:i] + bytes([original[i] ^ b]) + original[i + 1 :],
                     st.integers(0, n - 1), st.integers(1, 255))
    cut = st.builds(lambda i: original[:i], st.integers(0, n - 1))
    splice = st.builds(lambda i, junk: original[:i] + junk + original[i:],
                       st.integers(0, n), st.binary(min_size=1, max_size=16))
    garbage = st.binary(max_size=64)
    strategies = [flip, cut, splice, garbage]
    with contextlib.suppress(ValueError):
        strategies.append(_json_mutations(json.loads(original)))
    return st.one_of(*strategies).filter(lambda b: b != original)


def _one_line(stderr: str, prog: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"want one stderr line, have {lines}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    assert "Traceback" not in stderr
    return lines[0]


# --- a real store, volume and encrypted file (built once) ----------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("malformed")
    admin = Admin.under(root)
    admin("init", "--hsms", "2")
    admin.real_domain()
    cipher = root / "cipher"
    proc = kmsfs("init", str(cipher), "--domain", "payroll", "--store", str(admin.store))
    assert proc.returncode == 0, proc.stderr
    plain = root / "plain.txt"
    plain.write_bytes(os.urandom(70_000))
    enc = root / "plain.kmsfs"
    proc = kmsfs("encrypt", "--domain", "payroll", "--store", str(admin.store), str(plain),
                 str(enc))
    assert proc.returncode == 0, proc.stderr
    yield {"root": root, "store": admin.store, "cipher": cipher, "encrypted": enc,
           "pins": root / "pins"}


def _documents(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*.json") if "private" not in p.parts)


def _command_for(doc: Path, store: Path) -> list[str]:
    top = doc.relative_to(store).parts[0]
    return {"hsms": ["hsm", "list"], "operators": ["operator", "list"]}.get(
        top, ["domain", "verify", "payroll"])


@pytest.mark.slow
@CLI
@given(data=st.data())
def test_fuzzed_store_documents_through_kmsfs_admin(world: dict[str, Path], data) -> None:  # type: ignore[no-untyped-def]
    store = world["store"]
    admin = Admin(store, world["pins"])
    doc = data.draw(st.sampled_from(_documents(store)))
    original = doc.read_bytes()
    command = _command_for(doc, store)
    baseline = admin(*command).stdout
    bad = data.draw(mutations(original))
    try:
        doc.write_bytes(bad)
        before = tree_snapshot(store)
        result = admin(*command, check=None)
        assert tree_snapshot(store) == before, "a failed command changed the store"
        # An approval or seal that does not parse is left out with a warning naming it (it
        # cannot be a signature), and a damaged store.json is ignored with one: the command
        # then goes on, and may fail for want of it.
        lines = result.stderr.strip().splitlines()
        warned = [x for x in lines if x.startswith("kmsfs-admin: warning: ")]
        assert all(doc.name in x for x in warned), lines  # a warning names what it is about
        if result.returncode == 0:
            assert result.stdout == baseline, f"{doc.name}: accepted with another meaning"
        else:
            line = _one_line("\n".join(x for x in lines if x not in warned), "kmsfs-admin")
            named = doc.name in line or bool(warned)
            assert named, f"the error does not name {doc.relative_to(store)}: {line}"
    finally:
        doc.write_bytes(original)


@FAST
@given(data=st.data())
def test_fuzzed_store_documents_in_process(world: dict[str, Path], data) -> None:  # type: ignore[no-untyped-def]
    store_dir = world["store"]
    doc = data.draw(st.sampled_from(_documents(store_dir)))
    original = doc.read_bytes()
    bad = data.draw(mutations(original))
    store = Store(store_dir)
    rel = doc.relative_to(store_dir)
    readers = {
        "hsms": lambda: store.hsm(doc.stem),
        "operators": lambda: store.operator(doc.stem),
        "trusts": lambda: store.trust(doc.stem),
        "domains": lambda: store.domain(doc.stem),
        "store.json": store.anchor,
        "seals": lambda: store.signatures("seal", rel.parts[1]),
        "approvals": lambda: store.signatures("approval", rel.parts[1]),
    }
    read = readers.get(rel.parts[0])
    if read is None:
        return
    try:
        doc.write_bytes(bad)
        try:
            read()
        except KmsfsError as exc:
            assert "\n" not in str(exc)
            assert str(rel) in str(exc) or doc.name in str(exc), str(exc)
    finally:
        doc.write_bytes(original)


# --- the volume config ---------------------------------------------------------------------
@FAST
@given(data=st.data())
def test_fuzzed_volume_config_in_process(world: dict[str, Path], data) -> None:  # type: ignore[no-untyped-def]
    conf = world["cipher"] / volconfig.CONFIG_NAME
    original = conf.read_bytes()
    bad = data.draw(mutations(original))
    scratch = world["root"] / "conf-scratch"
    scratch.mkdir(exist_ok=True)
    (scratch / volconfig.CONFIG_NAME).write_bytes(bad)
    try:
        volconfig.load(scratch)
    except KmsfsError as exc:
        assert str(scratch / volconfig.CONFIG_NAME) in str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("planted", ["fifo", "/dev/zero", "huge", "nested"])
def test_a_hostile_volume_config_is_one_error_not_a_hang_or_a_memory_blowup(
    tmp_path: Path, planted: str
) -> None:
    """Whoever writes the ciphertext directory chooses what kmsfs.conf is, and root reads it:
    a FIFO blocked every command for good, a symlink to /dev/zero or a sparse 3 GiB file was
    read into memory whole, and a deeply nested document ended in a RecursionError traceback."""
    conf = tmp_path / volconfig.CONFIG_NAME
    if planted == "fifo":
        os.mkfifo(conf)
    elif planted == "/dev/zero":
        conf.symlink_to("/dev/zero")
    elif planted == "huge":
        with open(conf, "wb") as f:
            f.truncate(3 << 30)
    else:
        conf.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    outcome: list[BaseException] = []

    def load() -> None:
        try:
            volconfig.load(tmp_path)
        except BaseException as exc:  # looked at below
            outcome.append(exc)

    reader = threading.Thread(target=load, daemon=True)  # a FIFO's open blocked for good
    reader.start()
    reader.join(60)
    assert not reader.is_alive(), "volconfig.load is blocked"
    (exc,) = outcome
    assert isinstance(exc, KmsfsError), repr(exc)
    assert str(conf) in str(exc) and "\n" not in str(exc)


@pytest.mark.slow
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzzed_volume_config_through_kmsfs(world: dict[str, Path], data) -> None:  # type: ignore[no-untyped-def]
    cipher, store = world["cipher"], world["store"]
    conf = cipher / volconfig.CONFIG_NAME
    original = conf.read_bytes()
    doc = json.loads(original)
    bundle = base64.b64decode(doc["domain_bundle"])
    bad_bundle = data.draw(st.one_of(
        st.builds(lambda i: bundle[:i], st.integers(0, len(bundle) - 1)),
        st.builds(lambda i: bundle[:i] + b"\x00" + bundle[i + 1 :], st.integers(0, 300)),
    ))
    bad = data.draw(st.one_of(
        mutations(original),
        st.just(json.dumps({**doc, "domain_bundle": base64.b64encode(bad_bundle).decode()})
                .encode()),
    ))
    mp = world["root"] / "mp"
    mp.mkdir(exist_ok=True)
    others = {p: p.read_bytes() for p in cipher.rglob("*") if p.is_file() and p != conf}
    try:
        os.chmod(conf, 0o644)
        conf.write_bytes(bad)
        for command in (["info", str(cipher)], ["mount", str(cipher), str(mp)]):
            proc = kmsfs(*command, "--store", str(store))
            mounted = os.path.ismount(mp)
            if mounted:
                kmsfs("umount", str(mp))
            if proc.returncode == 0:
                continue  # a change without meaning (e.g. the creator string)
            line = _one_line(proc.stderr, "kmsfs")
            assert str(conf) in line or str(cipher) in line, line
            assert not mounted, f"{command[0]} failed yet mounted: {line}"
        assert {p: p.read_bytes() for p in others} == others
    finally:
        conf.write_bytes(original)
        if os.path.ismount(mp):
            kmsfs("umount", str(mp))


# --- file headers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub_volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("headers")
    cipher = make_volume(root / "cipher")
    mount = Mount(cipher, root / "mnt", root / "mnt.log").start()
    try:
        (mount.mountpoint / "victim").write_bytes(os.urandom(9000))
        (mount.mountpoint / "bystander").write_bytes(os.urandom(5000))
    finally:
        mount.stop()
    return cipher


@FAST
@given(data=st.data())
def test_fuzzed_ciphertext_headers_are_reported_by_fsck(stub_volume: Path, data) -> None:  # type: ignore[no-untyped-def]
    deriver = SoftDeriver()
    clean = check_tree(stub_volume, deriver)
    assert clean.clean
    files = [p for p in stub_volume.iterdir() if p.is_file() and not p.name.startswith("kmsfs.")]
    victim = data.draw(st.sampled_from(files))
    original = victim.read_bytes()
    header = original[:18]
    bad = data.draw(st.one_of(
        st.builds(lambda i, b: header[:i] + bytes([header[i] ^ b]) + header[i + 1 :],
                  st.integers(0, 17), st.integers(1, 255)),
        st.builds(lambda i: header[:i], st.integers(1, 17)),
        st.just(bytes(18)),
        st.binary(min_size=18, max_size=18),
    ).filter(lambda h: h != header))
    try:
        victim.write_bytes(bad + original[18:] if len(bad) == 18 else bad)
        report = check_tree(stub_volume, deriver)
        assert not report.clean
        assert {p.cipher_path for p in report.problems} == {victim.name}, report.problems
        assert all(p.path is not None for p in report.problems)
    finally:
        victim.write_bytes(original)


@FAST
@given(data=st.data())
def test_fuzzed_single_file_headers_in_process(world: dict[str, Path], data) -> None:  # type: ignore[no-untyped-def]
    original = world["encrypted"].read_bytes()
    size = stream.header_size(original[: stream.PREFIX_SIZE])
    bad = data.draw(mutations(original[:size]))
    try:
        head = bad[: stream.header_size(bad[: stream.PREFIX_SIZE])]
        parsed = stream.StreamHeader.parse(head)
    except KmsfsError as exc:
        assert "\n" not in str(exc)
    else:
        assert parsed.pack() == head  # accepted only as what it says, byte for byte


@pytest.mark.slow
@CLI
@given(data=st.data())
def test_fuzzed_single_file_headers_through_kmsfs_decrypt(world: dict[str, Path], data) -> None:  # type: ignore[no-untyped-def]
    original = world["encrypted"].read_bytes()
    size = stream.header_size(original[: stream.PREFIX_SIZE])
    bad = data.draw(st.one_of(
        st.builds(lambda i, b: original[:i] + bytes([original[i] ^ b]) + original[i + 1 :],
                  st.integers(0, size - 1), st.integers(1, 255)),
        st.builds(lambda i, b: original[:i] + bytes([original[i] ^ b]) + original[i + 1 :],
                  st.integers(0, 40), st.integers(1, 255)),
        st.builds(lambda i: original[:i], st.integers(0, size + 40)),
    ))
    bad_file = world["root"] / "bad.kmsfs"
    out = world["root"] / "out.txt"
    bad_file.write_bytes(bad)
    out.unlink(missing_ok=True)
    proc = kmsfs("decrypt", "--store", str(world["store"]), str(bad_file), str(out))
    assert proc.returncode != 0, "a damaged header was accepted"
    line = _one_line(proc.stderr, "kmsfs")
    assert str(bad_file) in line, line
    assert not out.exists()
    assert not [p for p in world["root"].iterdir() if p.name.startswith(".out.txt")]


# --- bad admin arguments --------------------------------------------------------------------
BAD_ARGS = [
    ["trust", "propose", "--hsm", "hsm1", "--operator", "alice", "--quorum", "2"],
    ["trust", "propose", "--hsm", "hsm1", "--operator", "alice", "--quorum", "0"],
    ["trust", "propose", "--hsm", "nosuch", "--operator", "alice", "--quorum", "1"],
    ["trust", "propose", "--hsm", "deadbeefdeadbeef", "--operator", "alice", "--quorum", "1"],
    ["trust", "propose", "--hsm", "", "--operator", "alice", "--quorum", "1"],
    ["trust", "propose", "--hsm", "hsm1", "--operator", "", "--quorum", "1"],
    ["trust", "propose", "--hsm", "hsm1", "--operator", "alice", "--quorum", "x"],
    ["operator", "create", "", "--pin-file", "PIN"],
    ["domain", "create", "", "--trust", "TRUST"],
    ["domain", "create", "new", "--trust", "nosuchtrust"],
    ["hsm", "create", "--label", ""],
    ["trust", "seal", "TRUST", "--hsm", "nosuch"],
    ["domain", "verify", ""],
    ["trust", "show", ""],
]


@pytest.mark.slow
@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(repr(x) for x in a))
def test_admin_rejects_bad_arguments_with_one_line(world: dict[str, Path], args: list[str]) -> None:
    store = world["store"]
    admin = Admin(store, world["pins"])
    trust = json.loads(admin("--json", "trust", "list").stdout)[-1]["id"]
    args = [{"PIN": admin.pin_file("alice"), "TRUST": trust}.get(a, a) for a in args]
    before = tree_snapshot(store)
    result = admin(*args, check=None)
    assert result.returncode != 0, f"accepted: {args}"
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert line.startswith("kmsfs-admin") and ": error: " in line, line
    assert tree_snapshot(store) == before

