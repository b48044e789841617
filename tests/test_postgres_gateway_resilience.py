"""The gateway under failure: killed mid-session, drained on SIGTERM, backend unreachable,
credentials rotated — evidence already accepted is never lost and other sessions carry on."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid

import psycopg
import pytest

from proctor.api_client import ApiClient
from proctor.dev.gateway import spawn_gateway
from tests.stack import Stack, stop_process_group

pytestmark = pytest.mark.integration


def run_rows(stack: Stack, run_id: str, at_least: int, timeout: float = 30.0) -> list[dict]:
    """The gateway's events (Datastore Activity) of a pipeline run, once at least `at_least` arrived."""
    result = stack.wait_for(f"SELECT * FROM events WHERE pipeline_run_id = '{run_id}' AND class_uid = 6005 "
                            "ORDER BY session_id, seq",
                            lambda r: len(r.rows) >= at_least, timeout=timeout)
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def test_sigkill_mid_session_loses_no_accepted_event(stack: Stack) -> None:
    run_id = f"sigkill-{uuid.uuid4().hex[:6]}"
    proc, info, port = stack.extra_gateway("killed-gateway", PROCTOR_RUN_SHIPPER="false")
    grant = stack.grant(stack.pipeline_token(run_id=run_id))
    conninfo = stack.conninfo(grant, port=port, sslrootcert=info["ca_file"])
    conn = psycopg.connect(**conninfo, autocommit=True)
    for i in range(5):
        assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    # Nothing of the session reached S3 yet: the gateway that accepted it ran no shipper.
    assert stack.query(f"SELECT count(*) FROM events WHERE pipeline_run_id = '{run_id}' AND class_uid = 6005"
                       ).rows == [(0,)]

    restarted, _ = spawn_gateway(stack.directory / "killed-gateway", stack.state, pg_port=port,
                                 log_name="gateway-restarted.log")
    try:
        rows = run_rows(stack, run_id, at_least=7)
        queries = [r for r in rows if r["activity_name"] == "query"]
        assert [r["statement"] for r in queries] == ["SELECT $1::int * 2"] * 5
        assert [json.loads(r["details"])["parameters"] for r in queries] == [[str(i)] for i in range(5)]
        crashed = stack.wait_for(
            "SELECT status, status_detail FROM events WHERE activity_name = 'disconnect' "
            f"AND session_id = '{queries[0]['session_id']}'", lambda r: len(r.rows) == 1)
        assert crashed.rows == [("Failure", "gateway terminated before the session ended")]
        session = stack.wait_for(f"SELECT chunks FROM sessions WHERE session_id = '{queries[0]['session_id']}'",
                                 lambda r: len(r.rows) == 1)
        assert session.rows[0][0] >= 1
    finally:
        stop_process_group(restarted)


def test_sigterm_drains_then_ends_sessions_and_flushes_evidence(stack: Stack) -> None:
    run_id = f"drain-{uuid.uuid4().hex[:6]}"
    proc, info, port = stack.extra_gateway("drained-gateway", PROCTOR_DRAIN_SECONDS="1",
                                           PROCTOR_SHIP_INTERVAL_SECONDS="30")
    grant = stack.grant(stack.pipeline_token(run_id=run_id))
    conn = psycopg.connect(**stack.conninfo(grant, port=port, sslrootcert=info["ca_file"]), autocommit=True)
    assert conn.execute("SELECT 'before drain'").fetchone() == ("before drain",)
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(psycopg.OperationalError, match="shutting down"):
        conn.execute("SELECT pg_sleep(10)")
    conn.close()
    assert proc.wait(timeout=60) == 0
    # The final flush shipped everything although the regular interval (30 s) never came round.
    rows = run_rows(stack, run_id, at_least=4, timeout=5)
    assert [(r["activity_name"], r["status"]) for r in rows] == [
        ("connect", "Success"), ("query", "Success"), ("query", "Failure"), ("disconnect", "Success")]
    assert rows[2]["statement"] == "SELECT pg_sleep(10)"
    assert rows[2]["status_detail"] == "the session ended before the statement completed"


def test_unreachable_backend_fails_only_that_session(stack: Stack) -> None:
    admin = ApiClient(stack.state["api_url"], stack.issuer.mint("root@example.com", groups=("admins",)))
    target = {"name": "unreachable-pg", "kind": "postgres", "region": stack.state["region"],
              "endpoint": {"host": "127.0.0.1", "port": 9},
              "gateway": {"host": "127.0.0.1", "port": stack.gateway["port"]},
              "secret_id": "proctor/demo-pg/app_rw", "database": "app", "backend_user": "app_rw",
              "backend_tls": "disable"}
    assert admin.post("/v1/targets", target)[0] == 201
    policy = {"name": "unreachable", "subjects": [{"claims": {"repository": "acme/app"}}],
              "targets": ["unreachable-pg"], "backend_role": "app_rw"}
    assert admin.post("/v1/policies", policy)[0] == 201
    token = stack.pipeline_token(run_id="unreachable-1")
    grant = stack.grant(token, target="unreachable-pg")
    healthy = stack.grant(token)
    with psycopg.connect(**stack.conninfo(healthy), autocommit=True) as bystander:
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError, match="cannot connect to target unreachable-pg"):
            psycopg.connect(**stack.conninfo(grant))
        assert time.monotonic() - started < 15
        assert bystander.execute("SELECT 'fine'").fetchone() == ("fine",)
    result = stack.wait_for("SELECT * FROM events WHERE pipeline_run_id = 'unreachable-1' "
                            "AND activity_name = 'connect' AND status = 'Failure'", lambda r: len(r.rows) == 1)
    failed = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
    assert failed and failed[0]["target_name"] == "unreachable-pg" and failed[0]["sqlstate"] == "08006"


def test_rotation_in_progress_does_not_break_new_sessions(stack: Stack) -> None:
    sm = stack.client("secretsmanager")
    secret_id = "proctor/demo-pg/app_ro"
    current = stack.backend_secret("app_ro")
    new_password = "rotated-" + uuid.uuid4().hex
    # The rotation's set-secret step: the database has the new password, Secrets Manager holds it
    # as AWSPENDING, AWSCURRENT still names the old one.
    version = sm.put_secret_value(SecretId=secret_id, SecretString=json.dumps(current | {"password": new_password}),
                                  VersionStages=["AWSPENDING"])["VersionId"]
    pg = stack.state["postgres"]
    subprocess.run(["psql", "-X", "-h", pg["socket_dir"], "-p", str(pg["port"]), "-U", "postgres", "-d", "app",
                    "-c", f"ALTER ROLE app_ro PASSWORD '{new_password}'"], check=True, capture_output=True)
    try:
        grant = stack.grant(stack.issuer.mint("eve@example.com", groups=("engineers",)))
        with psycopg.connect(**stack.conninfo(grant)) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app_ro",)
    finally:
        # Finish the rotation so later tests see a consistent secret.
        old_version = next(v["VersionId"] for v in sm.list_secret_version_ids(SecretId=secret_id)["Versions"]
                           if "AWSCURRENT" in v["VersionStages"])
        sm.update_secret_version_stage(SecretId=secret_id, VersionStage="AWSCURRENT", MoveToVersionId=version,
                                       RemoveFromVersionId=old_version)
    assert stack.backend_secret("app_ro")["password"] == new_password
