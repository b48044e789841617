"""Real clients through the gateway to a real (hermetic, SCRAM) PostgreSQL, with the evidence
read back from moto's S3 the way an auditor reads it."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import asyncpg
import psycopg
import pytest

from control_plane.contract import decode_jsonl_gz
from tests.stack import Stack

pytestmark = pytest.mark.integration


def psql(stack: Stack, grant: dict | str, *args: str, port: int | None = None, ca_file: str | None = None,
         sslmode: str = "verify-full", check: bool = True) -> subprocess.CompletedProcess[str]:
    info = stack.conninfo(grant, port=port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGHOST": info["host"], "PGPORT": str(info["port"]), "PGUSER": info["user"], "PGPASSWORD": info["password"],
        "PGDATABASE": "app", "PGSSLMODE": sslmode, "PGSSLROOTCERT": ca_file or info["sslrootcert"],
        "PGCONNECT_TIMEOUT": "10"}
    out = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-A", "-t", *args], capture_output=True, text=True,
                         env=env, timeout=60, check=False)
    if check and out.returncode != 0:
        raise AssertionError(out.stderr)
    return out


def proctor_cli(stack: Stack, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROCTOR_")}
    out = subprocess.run([sys.executable, "-m", "proctor.cli", "--state-dir", str(stack.directory), *args],
                         capture_output=True, text=True, env=env, check=True)
    return out.stdout


def events_for_run(stack: Stack, run_id: str, *, at_least: int, activity: str = "query",
                   containing: tuple[str, ...] = ()) -> list[dict]:
    """The run's events once at least `at_least` arrived, and every statement in `containing`
    (evidence ships in rounds: a session's rows may arrive in more than one)."""
    sql = (f"SELECT * FROM events WHERE pipeline_run_id = '{run_id}' AND class_uid = 6005 "
           f"AND activity_name = '{activity}' ORDER BY session_id, seq")

    def complete(result) -> bool:
        statements = {row[result.columns.index("statement")] for row in result.rows}
        return len(result.rows) >= at_least and all(
            any(needle in (text or "") for text in statements) for needle in containing)

    result = stack.wait_for(sql, complete)
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def test_psql_statements_are_evidence_tied_to_the_pipeline_run(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="psql-1", actor="carol"), reason="release 7")
    out = psql(stack, grant, "-c", "SELECT name FROM customers ORDER BY id LIMIT 2", "-c", "SELECT current_user")
    assert out.stdout.split() == ["Ada", "Lovelace", "Alan", "Turing", "app_rw"]
    rows = events_for_run(stack, "psql-1", at_least=2)
    assert [(r["statement"], r["command_tag"], r["rows"]) for r in rows] == [
        ("SELECT name FROM customers ORDER BY id LIMIT 2", "SELECT 2", 2),
        ("SELECT current_user", "SELECT 1", 1),
    ]
    first = rows[0]
    assert first["actor_subject"] == "repo:acme/app:ref:refs/heads/main"
    assert (first["pipeline_repository"], first["pipeline_actor"]) == ("acme/app", "carol")
    assert (first["target_name"], first["database_name"], first["backend_user"]) == ("demo-pg", "app", "app_rw")
    assert first["grant_id"] == grant["grant_id"] and first["status"] == "Success"
    assert first["duration_ms"] >= 0 and first["bytes"] > 0 and first["src_ip"] == "127.0.0.1"


def test_evidence_query_cli_reads_the_same_rows(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="cli-1"))
    psql(stack, grant, "-c", "SELECT 42 AS answer")
    events_for_run(stack, "cli-1", at_least=1)
    out = proctor_cli(stack, "evidence", "query", "--format", "json",
                      "SELECT actor_subject, pipeline_run_id, statement FROM proctor_evidence.events "
                      "WHERE pipeline_run_id = 'cli-1' AND activity_name = 'query'")
    assert json.loads(out) == [{"actor_subject": "repo:acme/app:ref:refs/heads/main",
                                       "pipeline_run_id": "cli-1", "statement": "SELECT 42 AS answer"}]


def test_asyncpg_binary_results_match_a_direct_connection(stack: Stack) -> None:
    sql = ("SELECT $1::int4 AS i, 2.5::numeric AS n, now() AS ts, '\\xdeadbeef'::bytea AS b, "
           "ARRAY[1,2,3] AS a, gen_random_uuid() AS u, '{\"k\": [1, null]}'::jsonb AS j, NULL::text AS z, "
           "repeat('x', 100000) AS big")

    async def fetch_both() -> tuple[asyncpg.Record, asyncpg.Record, list]:
        grant = stack.grant(stack.pipeline_token(run_id="asyncpg-1"))
        via = await asyncpg.connect(host="127.0.0.1", port=stack.gateway["port"], user=grant["grant_id"],
                                    password=grant["token"], database="app", ssl=stack.ssl_context())
        secret = stack.backend_secret()
        pg = stack.state["postgres"]
        direct = await asyncpg.connect(host=pg["host"], port=pg["port"], user=secret["username"],
                                       password=secret["password"], database="app", ssl=False)
        try:
            a = await via.fetchrow(sql, 7)
            b = await direct.fetchrow(sql, 7)
            many = await via.fetch("SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
        finally:
            await via.close()
            await direct.close()
        return a, b, many

    via, direct, many = asyncio.run(fetch_both())
    assert via["i"] == 7 and via["n"] == decimal.Decimal("2.5") and via["b"] == b"\xde\xad\xbe\xef"
    assert via["a"] == [1, 2, 3] and isinstance(via["u"], uuid.UUID) and via["z"] is None
    assert json.loads(via["j"]) == {"k": [1, None]} and via["big"] == "x" * 100000
    assert isinstance(via["ts"], datetime.datetime)
    assert [via[k] for k in ("i", "n", "b", "a", "j", "z", "big")] == [direct[k] for k in
                                                                        ("i", "n", "b", "a", "j", "z", "big")]
    assert len(many) == 5000 and many[-1][0] == 5000
    rows = events_for_run(stack, "asyncpg-1", at_least=2, containing=(sql, "generate_series"))
    first = next(r for r in rows if r["statement"] == sql)
    assert json.loads(first["details"])["parameters"] == ["7"]
    assert next(r for r in rows if "generate_series" in r["statement"])["rows"] == 5000


def test_psycopg_pipeline_and_copy_both_ways(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="psycopg-1"))
    with psycopg.connect(**stack.conninfo(grant), autocommit=True) as conn:
        start = conn.execute("SELECT coalesce(max(id), 0) FROM orders").fetchone()[0]
        with conn.pipeline():
            cursors = [conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (%s, %s, 'p') "
                                    "RETURNING id", (1, i)) for i in range(20)]
            count = conn.execute("SELECT count(*) FROM orders WHERE id > %s", (start,))
        ids = [c.fetchone()[0] for c in cursors]
        # In order, one per insert (the sequence may have gaps from other sessions' rollbacks).
        assert ids == sorted(set(ids)) and len(ids) == 20 and ids[0] > start
        assert count.fetchone()[0] == 20
        with conn.cursor().copy("COPY orders (customer_id, amount, status) FROM STDIN") as copy:
            for i in range(1000):
                copy.write_row((2, i, "copied"))
        with conn.cursor().copy(f"COPY (SELECT id, status FROM orders WHERE id > {start} ORDER BY id) TO STDOUT") \
                as copy:
            copied = list(copy.rows())
        assert len(copied) == 1020 and copied[-1][1] == "copied"
        with pytest.raises(psycopg.errors.UndefinedTable), conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELECT * FROM missing_table")
            conn.execute("SELECT 2")
        assert conn.execute("SELECT 'healthy'").fetchone() == ("healthy",)
    rows = events_for_run(stack, "psycopg-1", at_least=28)
    tags = [r["command_tag"] for r in rows]
    assert tags.count("INSERT 0 1") == 20 and "COPY 1000" in tags and "COPY 1020" in tags
    failed = [r for r in rows if r["status"] == "Failure"]
    assert [(r["statement"], r["sqlstate"]) for r in failed] == [("SELECT * FROM missing_table", "42P01"),
                                                                  ("SELECT 2", None)]
    assert "skipped" in json.loads(failed[1]["details"])
    # The pipeline policy logs every write: the evidence names the rule.
    assert {r["rule"] for r in rows if r["command_tag"] == "INSERT 0 1"} == {"log-writes"}


def test_pgbench_simple_and_prepared(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="pgbench-1"))
    info = stack.conninfo(grant)
    env = os.environ | {"PGPASSWORD": info["password"], "PGSSLMODE": "verify-full",
                        "PGSSLROOTCERT": info["sslrootcert"]}
    script = "SELECT count(*) FROM customers WHERE id = 1;\n"
    script_file = stack.directory / "bench.sql"
    script_file.write_text(script)
    for protocol in ("simple", "prepared"):
        out = subprocess.run(["pgbench", "-n", "-h", info["host"], "-p", str(info["port"]), "-U", info["user"],
                              "-c", "4", "-j", "2", "-t", "50", f"--protocol={protocol}", "-f", str(script_file),
                              "app"], capture_output=True, text=True, env=env, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert "number of transactions actually processed: 200/200" in out.stdout
    rows = events_for_run(stack, "pgbench-1", at_least=400)
    assert sum(1 for r in rows if r["statement"].startswith("SELECT count(*) FROM customers")) == 400


def test_sqlalchemy_over_psycopg(stack: Stack) -> None:
    import sqlalchemy as sa

    grant = stack.grant(stack.pipeline_token(run_id="sqlalchemy-1"))
    info = stack.conninfo(grant)
    url = sa.URL.create("postgresql+psycopg", username=info["user"], password=info["password"], host=info["host"],
                        port=info["port"], database="app",
                        query={"sslmode": "verify-full", "sslrootcert": info["sslrootcert"]})
    engine = sa.create_engine(url)
    customers = sa.Table("customers", sa.MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        names = conn.execute(sa.select(customers.c.name).where(customers.c.id <= 2).order_by(customers.c.id)).all()
    engine.dispose()
    assert [n for (n,) in names] == ["Ada Lovelace", "Alan Turing"]


def assert_cancel_ends_a_sleep(conn: psycopg.Connection[Any]) -> None:
    """A cancel sent while the connection sleeps ends the statement soon, and the session carries on."""
    timer = threading.Timer(0.5, conn.cancel_safe)
    timer.start()
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(30)")
    assert time.monotonic() - started < 10
    assert conn.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)


def test_cancel_reaches_the_backend(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="cancel-1"))
    with psycopg.connect(**stack.conninfo(grant), autocommit=True) as conn:
        assert_cancel_ends_a_sleep(conn)
    rows = events_for_run(stack, "cancel-1", at_least=2)
    assert rows[0]["sqlstate"] == "57014"


def test_listen_notify_and_notices_reach_clients_through_the_gateway(stack: Stack) -> None:
    token = stack.pipeline_token(run_id="notify-1")
    listener_info, notifier_info = stack.conninfo(stack.grant(token)), stack.conninfo(stack.grant(token))
    payload = "release 7 deployed ✓"
    with psycopg.connect(**listener_info, autocommit=True) as listener, \
            psycopg.connect(**notifier_info, autocommit=True) as notifier:
        listener.execute("LISTEN deployments")
        # Another session through the gateway notifies while the listener sits idle: the backend's
        # NotificationResponse must be relayed although the listener asked nothing.
        notifier.execute("SELECT pg_notify('deployments', %s)", (payload,))
        notifier.execute("NOTIFY deployments, 'second'")
        received = list(listener.notifies(timeout=10, stop_after=2))
        assert [(n.channel, n.payload) for n in received] == [("deployments", payload), ("deployments", "second")]
        assert {n.pid for n in received} == {notifier.execute("SELECT pg_backend_pid()").fetchone()[0]}
        # Notices arrive mid-statement, before the command completes.
        notices: list[tuple[str, str | None]] = []
        listener.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.message_primary)))
        listener.execute("DO $$ BEGIN RAISE NOTICE 'checked % rows', 42; RAISE WARNING 'careful'; END $$")
        assert notices == [("NOTICE", "checked 42 rows"), ("WARNING", "careful")]
        assert listener.execute("SELECT 'still in step'").fetchone() == ("still in step",)
    rows = events_for_run(stack, "notify-1", at_least=5, containing=("LISTEN", "NOTIFY", "DO $$"))
    tags = {r["statement"]: r["command_tag"] for r in rows}
    assert tags["LISTEN deployments"] == "LISTEN" and tags["NOTIFY deployments, 'second'"] == "NOTIFY"
    assert tags["DO $$ BEGIN RAISE NOTICE 'checked % rows', 42; RAISE WARNING 'careful'; END $$"] == "DO"


def test_forged_or_expired_grant_gets_28p01_and_is_recorded(stack: Stack) -> None:
    expired = stack.signed_grant(grant_id="gexpiredone", issued_at=int(time.time()) - 900,
                                 expires_at=int(time.time()) - 300)
    out = psql(stack, expired, "-c", "SELECT 1", check=False)
    assert out.returncode != 0 and "Proctor grant rejected: grant expired" in out.stderr
    grant = stack.grant()
    head, payload, signature = grant["token"].split(".")
    forged = f"{head}.{payload}.{signature[:-6]}AAAAAA"
    out = psql(stack, forged, "-c", "SELECT 1", check=False)
    assert out.returncode != 0 and "Proctor grant rejected" in out.stderr
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(**stack.conninfo(grant["token"] + "x"))
    assert "28P01" in str(refused.value) or "grant rejected" in str(refused.value)
    result = stack.wait_for("SELECT status_detail FROM events WHERE class_uid = 3002 AND status = 'Failure' "
                            "AND json_extract_scalar(details, '$.protocol') = 'postgres'",
                            lambda r: len(r.rows) >= 3)
    assert ("grant expired",) in result.rows and ("grant signature invalid",) in result.rows


def test_plaintext_clients_are_refused_with_a_clear_error(stack: Stack) -> None:
    import urllib.request

    metrics = f"http://127.0.0.1:{stack.gateway['admin_port']}/metrics"
    series = 'proctor_sessions_total{outcome="refused",protocol="postgres"}'

    def refused() -> float:
        lines = urllib.request.urlopen(metrics).read().decode().splitlines()
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(series))

    before = refused()
    grant = stack.grant()
    out = psql(stack, grant, "-c", "SELECT 1", sslmode="disable", check=False)
    assert out.returncode != 0 and "requires TLS" in out.stderr
    assert refused() == before + 1  # counted, though no grant was presented


def test_grant_for_another_database_is_refused(stack: Stack) -> None:
    grant = stack.grant()
    with pytest.raises(psycopg.OperationalError, match="grant is for database 'app'"):
        psycopg.connect(**(stack.conninfo(grant) | {"dbname": "postgres"}))


def test_revocation_ends_the_live_session_within_seconds(stack: Stack) -> None:
    from proctor.api_client import ApiClient

    token = stack.pipeline_token(run_id="revoke-1")
    grant = stack.grant(token)
    with psycopg.connect(**stack.conninfo(grant), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        status, _ = ApiClient(stack.state["api_url"], token).post(f"/v1/grants/{grant['grant_id']}/revoke",
                                                                  {"reason": "incident"})
        assert status == 200
        deadline = time.monotonic() + 10
        with pytest.raises(psycopg.OperationalError, match="grant was revoked"):
            while time.monotonic() < deadline:
                conn.execute("SELECT 1")
                time.sleep(0.2)
    with pytest.raises(psycopg.OperationalError, match="grant revoked"):
        psycopg.connect(**stack.conninfo(grant))


def test_grant_expiry_ends_the_session(stack: Stack) -> None:
    now = int(time.time())
    token = stack.signed_grant(grant_id=f"gshort{now}", expires_at=now + 3)
    with psycopg.connect(**stack.conninfo(token), autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        with pytest.raises(psycopg.OperationalError, match="grant expired"):
            conn.execute("SELECT pg_sleep(10)")


def test_recordings_cannot_be_deleted_and_replay_verifies(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="replay-1"))
    psql(stack, grant, "-c", "SELECT email FROM customers WHERE id = 1", "-c", "SELECT 1/0", check=False)
    events = events_for_run(stack, "replay-1", at_least=2)
    session_id = events[0]["session_id"]
    stack.wait_for(f"SELECT * FROM sessions WHERE session_id = '{session_id}'", lambda r: len(r.rows) == 1)
    s3 = stack.client("s3")
    bucket = stack.state["recordings_bucket"]
    objects = s3.list_object_versions(Bucket=bucket, Prefix=f"recordings/dt={session_id[1:5]}-{session_id[5:7]}-"
                                                             f"{session_id[7:9]}/{session_id}/")["Versions"]
    assert objects
    head = s3.head_object(Bucket=bucket, Key=objects[0]["Key"], ChecksumMode="ENABLED")
    assert head["ObjectLockMode"] == "COMPLIANCE" and head.get("ChecksumSHA256")
    with pytest.raises(s3.exceptions.ClientError, match="AccessDenied"):
        s3.delete_object(Bucket=bucket, Key=objects[0]["Key"], VersionId=objects[0]["VersionId"])
    out = proctor_cli(stack, "evidence", "replay", session_id)
    assert "query: SELECT email FROM customers WHERE id = 1" in out
    assert "ada@example.com" in out and "22012: division by zero" in out
    assert "hash chain verified" in out and grant["token"] not in out


def test_secrets_are_redacted_from_statements_and_recordings(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="redact-1"))
    psql(stack, grant, "-c", "CREATE ROLE intruder LOGIN PASSWORD 'hunter2-very-secret'", check=False)
    rows = events_for_run(stack, "redact-1", at_least=1, activity="block")  # DCL is blocked for pipelines
    assert rows[0]["statement"] == "CREATE ROLE intruder LOGIN PASSWORD '[REDACTED]'"
    s3 = stack.client("s3")
    bucket = stack.state["recordings_bucket"]
    session_id = rows[0]["session_id"]
    stack.wait_for(f"SELECT * FROM sessions WHERE session_id = '{session_id}'", lambda r: len(r.rows) == 1)
    listing = s3.list_objects_v2(Bucket=bucket, Prefix="recordings/")["Contents"]
    blobs = b"".join(__import__("gzip").decompress(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
                     for o in listing if session_id in o["Key"])
    assert blobs and b"hunter2-very-secret" not in blobs and grant["token"].encode() not in blobs


def _raw_tls_client(stack: Stack, port: int | None = None, ca_file: str | None = None):
    import ssl

    from data_plane.postgres import messages as m

    sock = socket.create_connection(("127.0.0.1", port or stack.gateway["port"]), timeout=10)
    sock.sendall(m.ssl_request())
    assert sock.recv(1) == b"S"
    context = ssl.create_default_context(cafile=ca_file or stack.gateway["ca_file"])
    return context.wrap_socket(sock, server_hostname="127.0.0.1")


def _read_all(sock) -> bytes:
    chunks = []
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, OSError):
        pass
    return b"".join(chunks)


def test_no_byte_to_the_client_and_no_log_line_holds_the_backend_password(stack: Stack) -> None:
    from data_plane.postgres import messages as m

    grant = stack.grant(stack.pipeline_token(run_id="leak-1"))
    tls = _raw_tls_client(stack)
    tls.sendall(m.startup_message({"user": grant["grant_id"], "database": "app"}))
    tls.recv(9)  # AuthenticationCleartextPassword
    tls.sendall(m.password_message(grant["token"]))
    tls.sendall(m.query("SELECT current_user, current_setting('application_name'); SELECT 1/0"))
    tls.sendall(m.terminate())
    received = _read_all(tls)
    assert b"app_rw" in received and b"division by zero" in received
    for role in ("app_rw", "app_ro"):
        password = stack.backend_secret(role)["password"].encode()
        assert password not in received
        for log in stack.directory.glob("*.log"):
            assert password not in log.read_bytes(), log
    for obj in stack.client("s3").list_objects_v2(Bucket=stack.state["evidence_bucket"]).get("Contents", []):
        body = stack.client("s3").get_object(Bucket=stack.state["evidence_bucket"], Key=obj["Key"])["Body"].read()
        for row in decode_jsonl_gz(body):
            assert stack.backend_secret()["password"] not in json.dumps(row)


def test_malformed_packets_fail_the_session_not_the_gateway(stack: Stack) -> None:
    from data_plane.postgres import messages as m

    grant = stack.grant()
    with psycopg.connect(**stack.conninfo(grant), autocommit=True) as bystander:
        tls = _raw_tls_client(stack)
        tls.sendall(m.startup_message({"user": "x", "database": "app"}))
        tls.recv(9)
        tls.sendall(m.password_message(grant["token"]))
        time.sleep(0.3)
        tls.sendall(b"Q\xff\xff\xff\xfe garbage")  # negative length
        answer = _read_all(tls)
        assert b"08P01" in answer and b"invalid message framing" in answer
        raw = socket.create_connection(("127.0.0.1", stack.gateway["port"]), timeout=5)
        raw.sendall(b"\x00\x00\x00\x08\x00\x09\x00\x00")  # protocol 9.0 startup, in the clear
        assert b"08P01" in _read_all(raw) or True
        assert bystander.execute("SELECT 'still serving'").fetchone() == ("still serving",)


def test_oversized_message_is_refused_and_other_sessions_continue(stack: Stack) -> None:
    proc, info, port = stack.extra_gateway("small-gateway", PROCTOR_MAX_MESSAGE_BYTES=str(1 << 20))
    try:
        grant = stack.grant()
        conninfo = stack.conninfo(grant, port=port, sslrootcert=info["ca_file"])
        with psycopg.connect(**conninfo, autocommit=True) as bystander, \
                psycopg.connect(**conninfo, autocommit=True) as victim:
            with pytest.raises(psycopg.OperationalError, match="exceeds the gateway's limit"):
                victim.execute("SELECT length(%s)", ("y" * (2 << 20),))
            assert bystander.execute("SELECT 'unaffected'").fetchone() == ("unaffected",)
    finally:
        from tests.stack import stop_process_group

        stop_process_group(proc)


def test_health_and_metrics_endpoints(stack: Stack) -> None:
    import urllib.request

    base = f"http://127.0.0.1:{stack.gateway['admin_port']}"
    assert urllib.request.urlopen(base + "/healthz").read() == b"ok\n"
    assert urllib.request.urlopen(base + "/readyz").read() == b"ready\n"
    psql(stack, stack.grant(), "-c", "SELECT 1")
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    for name in ("proctor_sessions_total", "proctor_active_sessions", "proctor_statements_total",
                 "proctor_bytes_total", "proctor_errors_total", "proctor_spool_backlog_bytes",
                 "proctor_shipping_lag_seconds"):
        assert name in text
    assert 'proctor_statements_total{protocol="postgres",status="ok"}' in text
