"""kmsfs-admin as its users meet it: JSON that is data, --store in either place, one exit code
per kind of refusal, and a sign of life from a long init. Real CLI, real SoftHSM2 tokens."""

import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from kmsfs import exitcodes
from tests.integration.agent_helpers import AgentProcess, clean_env, root_policy
from tests.kms_helpers import ADMIN, Admin, one_error_line, tree_snapshot


def test_trust_list_json_is_data_with_the_types_of_trust_show(initialized: Admin) -> None:
    """``"quorum": "1/2 of 3"``, ``"hsms": "hsm1,hsm2"`` and ``"operators": "-"`` were table
    strings a script had to parse back."""
    initialized.create_operators("alice", "bob", "carol")
    trust = initialized.propose(["hsm1", "hsm2"], ["alice", "bob", "carol"], 2)
    initialized.sign(trust, "alice")
    rows = {r["id"]: r for r in initialized("--json", "trust", "list").json}
    shown = initialized("--json", "trust", "show", trust).json
    row = rows[trust]
    assert (row["approval_count"], row["quorum"], row["operator_count"]) == (1, 2, 3)
    for field in ("serial", "quorum", "hsms", "operators", "sealed_by"):
        assert row[field] == shown[field], field
    assert row["operators"] == ["alice", "bob", "carol"] and row["state"] == "proposed"
    assert [h["label"] for h in row["hsms"]] == ["hsm1", "hsm2"]
    genesis = next(r for r in rows.values() if r["id"] != trust)
    assert genesis["operators"] == [] and genesis["quorum"] == 0
    assert genesis["state"] == "sealed" and isinstance(genesis["approval_count"], int)

    table = initialized("trust", "list").stdout.splitlines()
    assert table[0].split() == ["ID", "SERIAL", "STATE", "APPROVALS", "HSMS", "OPERATORS"]
    line = next(x for x in table if x.startswith(trust[:12]))
    assert "1 signed, 2 of 3 needed" in line and "hsm1,hsm2" in line and "alice,bob,carol" in line


def test_store_goes_before_or_after_the_command(initialized: Admin) -> None:
    """``hsm list --store S`` was "unrecognized arguments", though --json went either side."""
    store = str(initialized.store)
    after = subprocess.run(
        [*ADMIN, "hsm", "list", "--store", store, "--json"],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )
    assert after.returncode == 0, after.stderr
    assert sorted(h["label"] for h in initialized("--json", "hsm", "list").json) == ["hsm1", "hsm2"]
    assert after.stdout == initialized("--json", "hsm", "list").stdout
    initialized("hsm", "list", "--store", f"{store}/")  # the same store twice: fine
    other = initialized.store.parent / "other"
    conflict = initialized("hsm", "list", "--store", str(other), check=exitcodes.USAGE)
    line = one_error_line(conflict)
    assert "--store" in line and store in line and str(other) in line
    # After the command is where `kmsfs` takes it, `init` included.
    made = subprocess.run(
        [*ADMIN, "init", "--hsms", "1", "--store", str(other)],
        capture_output=True, text=True, env=clean_env(), timeout=120, check=False,
    )
    assert made.returncode == 0, made.stderr
    assert (other / "store.json").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["domain", "create", "pay roll", "--trust", "abcd"], "argument NAME"),
        (["operator", "create", "o'brien x", "--pin-file", "/dev/null"], "argument NAME"),
        (["operator", "create", "../evil", "--pin-file", "/dev/null"], "argument NAME"),
        (["hsm", "create", "--label", "hsm x"], "argument --label"),
        (["hsm", "create", "--label", ""], "argument --label"),
        (
            ["hsm", "enroll", "--module", "/x.so", "--token", "t", "--label", "a/b"],
            "argument --label",
        ),
    ],
)
def test_a_bad_name_on_the_command_line_is_a_usage_error(
    initialized: Admin, args: list[str], option: str
) -> None:
    """A name typed on the command line exited 7, "document malformed", naming an "HSM name"
    the user never typed."""
    before = tree_snapshot(initialized.store)
    lines = initialized(*args, check=exitcodes.USAGE).stderr.splitlines()
    # argparse's form, as for any bad argument: "kmsfs-admin hsm create: error: argument ..."
    assert len(lines) == 1 and lines[0].startswith(f"kmsfs-admin {args[0]} {args[1]}: error: ")
    assert f"error: {option}: " in lines[0] and "want 1-64 of" in lines[0], lines[0]
    assert tree_snapshot(initialized.store) == before


def test_an_existing_domain_name_exits_6_like_every_already_there(initialized: Admin) -> None:
    """`operator create alice` (exists) exited 6, `domain create payroll` (exists) 2."""
    trust = initialized.real_domain("payroll")
    before = tree_snapshot(initialized.store)
    dup = initialized("domain", "create", "payroll", "--trust", trust, check=exitcodes.STORE)
    assert "exists already" in one_error_line(dup)
    assert tree_snapshot(initialized.store) == before


def test_an_existing_domain_name_exits_6_through_the_agent(tmp_path: Path) -> None:
    """Refused here (this store has the name) or by the agent (only its store has it): 6."""
    agent_admin = Admin.under(tmp_path, "agent-store")
    agent_admin("init", "--hsms", "1")
    agent_admin.create_operators("alice")
    trust = agent_admin.sealed_trust(["hsm1"], ["alice"], 1)
    ops = agent_admin.copy(tmp_path / "ops-store")
    shutil.rmtree(ops.store / "private" / "hsm-access")  # every HSM action through the agent
    agent_admin("domain", "create", "payroll", "--trust", trust)  # the agent's store only
    sock_dir = Path(tempfile.mkdtemp(prefix="kmsfs-agent-"))
    agent = AgentProcess(
        agent_admin.store, tmp_path / "agent", root_policy(), socket_path=sock_dir / "hsmd.sock"
    ).start()
    try:
        via = ["--agent", agent.address, "domain", "create"]
        by_agent = ops(*via, "payroll", "--trust", trust, check=exitcodes.STORE)
        assert "agent: " in one_error_line(by_agent) and "exists already" in by_agent.stderr
        ops(*via, "ledger", "--trust", trust)
        here = ops(*via, "ledger", "--trust", trust, check=exitcodes.STORE)
        assert "exists already" in one_error_line(here)
    finally:
        agent.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert "Traceback" not in agent.log(), agent.log()


def _on_a_terminal(admin: Admin, *args: str) -> tuple[int, str, str]:
    """Run kmsfs-admin with stderr on a pseudo-terminal (stdout a pipe): code, stdout, tty."""
    master, slave = os.openpty()
    try:
        proc = subprocess.run(
            [*ADMIN, "--store", str(admin.store), *args],
            stdout=subprocess.PIPE, stderr=slave, text=True, env=clean_env(), timeout=120,
            check=False,
        )
        os.close(slave)
        slave = -1
        seen = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError as exc:  # EIO: the terminal's other side is closed, all read
                assert exc.errno == errno.EIO
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    return proc.returncode, proc.stdout, seen.decode()


def test_init_shows_progress_on_a_terminal_only(admin: Admin, tmp_path: Path) -> None:
    """`init --hsms 16` ran ~19 s without a word."""
    code, out, tty = _on_a_terminal(admin, "init", "--hsms", "2")
    assert code == 0 and "created with HSMs hsm1, hsm2" in out
    assert "HSM 1 of 2" in tty and "HSM 2 of 2" in tty and "genesis trust" in tty
    assert tty.endswith("\r\x1b[K")  # erased: the result starts on a clean line
    for pin in (admin.store / "private" / "pins").iterdir():
        assert pin.read_text().strip() not in tty
    quiet = Admin.under(tmp_path / "json")
    code, out, tty = _on_a_terminal(quiet, "init", "--hsms", "1", "--json")
    assert code == 0 and tty == "" and out.lstrip().startswith("{")
    piped = Admin.under(tmp_path / "piped")("init", "--hsms", "1")
    assert piped.stderr == ""
