"""`sidecar keys create|list|revoke|rotate` through the real `sidecar` group (CliRunner),
and one real `python -m sidecar keys create` for the stdout/stderr split."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from click.testing import CliRunner, Result

from sidecar.auth import KeyIndex, KeyStore
from sidecar.auth.keys import SECRET_PREFIX
from sidecar.cli import cli

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
def db(tmp_path: pathlib.Path) -> str:
    return str(tmp_path / "keys.db")


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, ["keys", *args], env=env)


def create(db: str, *args: str) -> tuple[str, Result]:
    result = run("create", "--db", db, *args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # the secret, alone
    return lines[0], result


def key_id_of(db: str, secret: str) -> str:
    found = KeyIndex.load(db).lookup(secret.encode())
    assert found is not None
    return found.id


def test_create_prints_the_secret_alone_on_stdout_and_the_rest_on_stderr(db: str) -> None:
    secret, result = create(db, "--name", "alice", "--tier", "pro", "--tpm", "10000",
                            "--rpm", "60", "--budget-usd", "25", "--budget-period", "month")
    assert secret.startswith(SECRET_PREFIX)
    assert "store it now; it cannot be shown again" in result.stderr
    assert secret not in result.stderr
    key = KeyIndex.load(db).lookup(secret.encode())
    assert key is not None
    assert (key.name, key.tier, key.tpm, key.rpm, key.budget_usd, key.budget_period) == (
        "alice", "pro", 10_000, 60, 25.0, "month")
    assert key.id in result.stderr and "alice" in result.stderr


def test_list_shows_every_key_and_never_a_secret(db: str) -> None:
    s1, _ = create(db, "--name", "alice", "--tier", "pro", "--tpm", "10000",
                   "--budget-usd", "12.5", "--budget-period", "day")
    s2, _ = create(db, "--name", "bob")
    bob = key_id_of(db, s2)
    assert run("revoke", bob, "--db", db).exit_code == 0

    table = run("list", "--db", db)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["id", "name", "tier", "tpm", "rpm", "budget", "created",
                                "revoked"]
    alice_line, bob_line = lines[2], lines[3]
    assert alice_line.split()[:6] == [key_id_of(db, s1), "alice", "pro", "10,000", "-",
                                      "$12.50/day"]
    assert alice_line.split()[-1] == "-"  # not revoked
    assert bob_line.split()[0] == bob and bob_line.split()[-1].endswith("Z")  # revoked time

    doc = json.loads(run("list", "--db", db, "--format", "json").stdout)
    assert [(k["name"], k["revoked_ms"] is not None) for k in doc] == [
        ("alice", False), ("bob", True)]
    assert set(doc[0]) >= {"id", "name", "tier", "tpm", "rpm", "budget_usd", "budget_period",
                           "created_ms", "revoked_ms"}
    for out in (table.output, json.dumps(doc)):
        for secret in (s1, s2):
            assert secret not in out and secret[len(SECRET_PREFIX):] not in out
        assert "secret" not in out and "sha256" not in out


def test_list_of_an_empty_database(db: str) -> None:
    KeyStore.open(db).close()
    assert run("list", "--db", db).stdout.strip() == f"no keys in {db}"
    assert json.loads(run("list", "--db", db, "--format", "json").stdout) == []


def test_revoke_then_the_secret_looks_up_as_revoked(db: str) -> None:
    secret, _ = create(db, "--name", "bob")
    kid = key_id_of(db, secret)
    result = run("revoke", kid, "--db", db)
    assert result.exit_code == 0 and f"revoked key {kid}" in result.stdout
    found = KeyIndex.load(db).lookup(secret.encode())
    assert found is not None and found.revoked
    again = run("revoke", kid, "--db", db)
    assert again.exit_code == 0 and "already revoked" in again.stdout


def test_rotate_prints_a_new_secret_and_the_old_one_stops_working(db: str) -> None:
    old, _ = create(db, "--name", "carol", "--tpm", "500")
    kid = key_id_of(db, old)
    result = run("rotate", kid, "--db", db)
    assert result.exit_code == 0, result.output
    [new] = result.stdout.splitlines()
    assert new.startswith(SECRET_PREFIX) and new != old
    assert "cannot be shown again" in result.stderr and new not in result.stderr
    index = KeyIndex.load(db)
    assert index.lookup(old.encode()) is None
    rotated = index.lookup(new.encode())
    assert rotated is not None and rotated.id == kid and rotated.tpm == 500


def test_rotating_a_revoked_key_fails(db: str) -> None:
    secret, _ = create(db, "--name", "dave")
    kid = key_id_of(db, secret)
    run("revoke", kid, "--db", db)
    result = run("rotate", kid, "--db", db)
    assert result.exit_code == 1 and "revoked" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("command", ["revoke", "rotate"])
def test_an_unknown_id_exits_1_with_a_message(db: str, command: str) -> None:
    create(db, "--name", "x")
    result = run(command, "key_000000000000", "--db", db)
    assert result.exit_code == 1
    assert "no key with id 'key_000000000000'" in result.stderr
    assert result.stdout == ""


def test_a_secret_given_as_the_id_is_not_echoed(db: str) -> None:
    secret, _ = create(db, "--name", "x")
    result = run("revoke", secret, "--db", db)
    assert result.exit_code == 1 and "secret, not its id" in result.stderr
    assert secret not in result.output


@pytest.mark.parametrize("args", [["list"], ["revoke", "key_000000000000"],
                                  ["rotate", "key_000000000000"]])
def test_a_missing_database_is_an_error_and_is_not_created(db: str, args: list[str]) -> None:
    result = run(*args, "--db", db)
    assert result.exit_code == 1 and "keys database not found" in result.stderr
    assert not os.path.exists(db)


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--budget-usd", "10"], "--budget-usd needs --budget-period"),
        (["--budget-period", "day"], "--budget-period needs --budget-usd"),
        (["--tpm", "-1"], "--tpm"),
        (["--tpm", "0"], "--tpm"),
        (["--rpm", "-3"], "--rpm"),
        (["--budget-usd", "-1", "--budget-period", "day"], "--budget-usd"),
        (["--budget-usd", "nan", "--budget-period", "day"], "budget_usd"),
        (["--budget-usd", "5", "--budget-period", "week"], "--budget-period"),
        (["--tpm", "lots"], "--tpm"),
    ],
)
def test_invalid_options_are_usage_errors(db: str, args: list[str], problem: str) -> None:
    result = run("create", "--db", db, "--name", "x", *args)
    assert result.exit_code == 2, result.output
    assert problem in result.stderr
    assert result.stdout == ""
    assert not os.path.exists(db)  # refused before the file is touched


def test_empty_name_is_a_usage_error(db: str) -> None:
    result = run("create", "--db", db, "--name", "")
    assert result.exit_code == 2 and "name must not be empty" in result.stderr


def test_db_defaults_to_keys_db_and_comes_from_the_environment(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SIDECAR_KEYS_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run("create", "--name", "here").exit_code == 0
    assert os.path.exists(tmp_path / "keys.db")
    env_db = str(tmp_path / "from-env.db")
    result = run("create", "--name", "env", env={"SIDECAR_KEYS_DB": env_db})
    assert result.exit_code == 0
    assert [k.name for k in KeyIndex.load(env_db).records] == ["env"]
    assert "SIDECAR_KEYS_DB" in run("create", "--help").output


def test_keys_is_a_sidecar_subcommand() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert "keys" in result.output
    sub = run("--help")
    for command in ("create", "list", "revoke", "rotate"):
        assert command in sub.output


def test_python_m_sidecar_keys_create_splits_stdout_and_stderr(db: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SIDECAR_KEYS_DB", None)
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "keys", "create", "--name", "ci", "--db", db],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and proc.stdout.count("\n") == 1
    secret = proc.stdout.strip()
    assert secret.startswith(SECRET_PREFIX)
    assert "store it now; it cannot be shown again" in proc.stderr
    assert secret not in proc.stderr
    found = KeyIndex.load(db).lookup(secret.encode())
    assert found is not None and found.name == "ci"
