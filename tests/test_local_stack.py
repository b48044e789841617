"""`proctor dev up | status | token | down` and `proctor grant` as a user runs them: real
processes, moto's server, the adapter over HTTP, a hermetic PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from proctor.dev.stack import pid_alive

pytestmark = pytest.mark.integration


def proctor(state_dir: Path, *args: str, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCTOR_", "AWS_"))}
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-m", "proctor.cli", "--state-dir", str(state_dir), *args],
                         capture_output=True, text=True, env=full_env, timeout=180, check=False)
    if check and out.returncode != 0:
        raise AssertionError(f"proctor {' '.join(args)} exited {out.returncode}: {out.stderr}")
    return out


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory):
    state_dir = tmp_path_factory.mktemp("dev")
    proctor(state_dir, "dev", "up", "--no-gateway")
    state = json.loads((state_dir / "state.json").read_text())
    try:
        yield state_dir, state
    finally:
        proctor(state_dir, "dev", "down", check=False)


def test_status_reports_every_process_alive(dev_stack) -> None:
    state_dir, _ = dev_stack
    info = json.loads(proctor(state_dir, "dev", "status").stdout)
    assert info["status"] == "ready" and info["alive"] == {"supervisor": True, "postgres": True}
    assert "gateway_iam" not in info  # the local gateway's secret key is not printed
    assert oct((state_dir / "state.json").stat().st_mode & 0o777) == "0o600"


def test_pipeline_token_gets_a_grant_as_env_exports(dev_stack) -> None:
    state_dir, state = dev_stack
    token = proctor(state_dir, "dev", "token", "--sub", "ci", "--claim", "repository=acme/app",
                    "--claim", "run_id=42", "--claim", "actor=bob").stdout.strip()
    out = proctor(state_dir, "grant", "--target", "demo-pg", "--reason", "test", env={"PROCTOR_TOKEN": token}).stdout
    exports = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    assert set(exports) >= {"PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE"}
    assert exports["PGPORT"] == str(state["gateway"]["port"]) and exports["PGDATABASE"] == "app"
    as_json = json.loads(proctor(state_dir, "grant", "--target", "demo-pg", "--format", "json",
                                 env={"PROCTOR_TOKEN": token}).stdout)
    assert as_json["claims"]["idn"]["pipeline"] == {"repository": "acme/app", "run_id": "42", "actor": "bob"}


def test_grant_errors_are_clear_and_exit_non_zero(dev_stack) -> None:
    state_dir, _ = dev_stack
    missing = proctor(state_dir, "grant", "--target", "demo-pg", check=False)
    assert missing.returncode == 1 and "PROCTOR_TOKEN" in missing.stderr and "Traceback" not in missing.stderr
    forged = proctor(state_dir, "grant", "--target", "demo-pg", env={"PROCTOR_TOKEN": "a.b.c"}, check=False)
    assert forged.returncode == 1 and "grant refused (401): invalid token: malformed token" in forged.stderr
    token = proctor(state_dir, "dev", "token", "--sub", "sam@example.com", "--groups", "sales").stdout.strip()
    denied = proctor(state_dir, "grant", "--target", "demo-pg", env={"PROCTOR_TOKEN": token}, check=False)
    assert denied.returncode == 1 and "(403)" in denied.stderr
    nowhere = proctor(Path("/nonexistent-proctor-state"), "grant", "--target", "x",
                      env={"PROCTOR_TOKEN": token}, check=False)
    assert nowhere.returncode == 1 and "proctor dev up" in nowhere.stderr


def test_backend_password_lives_in_secrets_manager_and_works(dev_stack) -> None:
    import boto3
    import psycopg

    _, state = dev_stack
    sm = boto3.client("secretsmanager", endpoint_url=state["aws_endpoint"], region_name="us-east-1",
                      aws_access_key_id="x", aws_secret_access_key="x")
    secret = json.loads(sm.get_secret_value(SecretId="proctor/demo-pg/app_ro")["SecretString"])
    pg = state["postgres"]
    with psycopg.connect(host=pg["host"], port=pg["port"], user=secret["username"], password=secret["password"],
                         dbname="app", sslmode="disable") as conn:
        assert conn.execute("SELECT count(*) FROM customers").fetchone()[0] == 6
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(host=pg["host"], port=pg["port"], user="app_ro", password="wrong", dbname="app",
                        sslmode="disable")
    assert secret["password"] not in json.dumps(state)


def test_down_leaves_no_process_behind(tmp_path: Path) -> None:
    proctor(tmp_path, "dev", "up", "--no-gateway")
    state = json.loads((tmp_path / "state.json").read_text())
    pids = [state["supervisor_pid"], *state["pids"].values()]
    assert all(pid_alive(p) for p in pids)
    out = proctor(tmp_path, "dev", "down").stdout
    assert "stopped" in out
    assert not any(pid_alive(p) for p in pids)
    assert not Path(state["postgres"]["dir"]).exists()
    assert proctor(tmp_path, "dev", "status", check=False).returncode == 3
    # A second `down` is harmless.
    assert "was not running" in proctor(tmp_path, "dev", "down").stdout


def test_down_cleans_up_after_a_killed_supervisor(tmp_path: Path) -> None:
    import signal

    proctor(tmp_path, "dev", "up", "--no-gateway")
    state = json.loads((tmp_path / "state.json").read_text())
    os.kill(state["supervisor_pid"], signal.SIGKILL)
    proctor(tmp_path, "dev", "down")
    assert not pid_alive(state["pids"]["postgres"])
