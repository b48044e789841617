"""The gateway's own connection to the backend over TLS: a hermetic PostgreSQL that accepts TLS
only, its certificate signed by a CA made here; the gateway verifies it (verify-full) or, trusting
another CA, refuses the session with 08006 and keeps serving the others."""

from __future__ import annotations

import asyncio
import json
import secrets
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg
import psycopg
import pytest

from proctor.api_client import ApiClient
from proctor.dev.postgres import HermeticPostgres
from proctor.dev.tls import make_ca_and_server_cert
from tests.stack import Stack, stop_process_group

pytestmark = pytest.mark.integration

TARGET = "tls-pg"
ROLE = "tls_rw"
DATABASE = "tlsapp"


@dataclass
class TlsBackend:
    pg: HermeticPostgres
    ca_file: str  # signed the backend's certificate
    other_ca_file: str  # a CA that did not


@pytest.fixture(scope="module")
def tls_backend(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBackend]:
    directory = tmp_path_factory.mktemp("backend-tls")
    backend_pki = make_ca_and_server_cert(directory / "backend-ca")
    other_pki = make_ca_and_server_cert(directory / "other-ca")
    pg = HermeticPostgres(superuser_password=secrets.token_urlsafe(24), ssl_cert=backend_pki["cert_file"],
                          ssl_key=backend_pki["key_file"], ssl_only=True).start()
    try:
        password = secrets.token_urlsafe(24)
        pg.psql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{password}'")
        pg.psql(f"CREATE DATABASE {DATABASE} OWNER {ROLE}")
        secret_id = f"proctor/{TARGET}/{ROLE}"
        stack.client("secretsmanager").create_secret(Name=secret_id, SecretString=json.dumps(
            {"engine": "postgres", "username": ROLE, "password": password, "host": pg.host, "port": pg.port,
             "dbname": DATABASE}))
        admin = ApiClient(stack.state["api_url"], stack.issuer.mint("root@example.com", groups=("admins",)))
        target = {"name": TARGET, "kind": "postgres", "region": stack.state["region"],
                  "endpoint": {"host": pg.host, "port": pg.port},
                  "gateway": {"host": "127.0.0.1", "port": stack.gateway["port"]},
                  "secret_id": secret_id, "database": DATABASE, "backend_user": ROLE, "backend_tls": "verify-full"}
        assert admin.post("/v1/targets", target)[0] == 201
        policy = {"name": "tls-backend", "subjects": [{"claims": {"repository": "acme/app"}}],
                  "targets": [TARGET], "backend_role": ROLE}
        assert admin.post("/v1/policies", policy)[0] == 201
        yield TlsBackend(pg, backend_pki["ca_file"], other_pki["ca_file"])
    finally:
        pg.stop()


def _connect_events(stack: Stack, run_id: str, count: int) -> list[dict]:
    result = stack.wait_for(f"SELECT * FROM events WHERE pipeline_run_id = '{run_id}' "
                            "AND activity_name = 'connect' ORDER BY time", lambda r: len(r.rows) >= count)
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def test_gateway_verifies_the_backend_certificate_and_records_backend_tls(stack: Stack,
                                                                          tls_backend: TlsBackend) -> None:
    proc, info, port = stack.extra_gateway("backend-tls-gateway", PROCTOR_BACKEND_CA_FILE=tls_backend.ca_file)
    try:
        token = stack.pipeline_token(run_id="backend-tls-1")
        grant = stack.grant(token, target=TARGET)
        conninfo = stack.conninfo(grant, port=port, sslrootcert=info["ca_file"], dbname=DATABASE)
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            # The backend accepts TLS only (hostssl); it reports the gateway's connection as TLS.
            assert conn.execute("SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                                ).fetchone() == (ROLE, True)
        # Read back before stopping: the evidence ships while the gateway runs.
        (event,) = _connect_events(stack, "backend-tls-1", 1)
    finally:
        stop_process_group(proc)
    assert event["status"] == "Success" and event["target_name"] == TARGET
    assert json.loads(event["details"])["credential"]["backend_tls"] is True


def test_backend_certificate_from_an_untrusted_ca_fails_the_session_with_08006(stack: Stack,
                                                                             tls_backend: TlsBackend) -> None:
    proc, info, port = stack.extra_gateway("wrong-ca-gateway", PROCTOR_BACKEND_CA_FILE=tls_backend.other_ca_file)
    try:
        token = stack.pipeline_token(run_id="backend-tls-2")
        grant = stack.grant(token, target=TARGET)
        demo = stack.conninfo(stack.grant(token), port=port, sslrootcert=info["ca_file"])
        with psycopg.connect(**demo, autocommit=True) as bystander:
            with pytest.raises(psycopg.OperationalError, match=f"cannot connect to target {TARGET}: "
                                                               "backend TLS certificate verify failed"):
                psycopg.connect(**stack.conninfo(grant, port=port, sslrootcert=info["ca_file"], dbname=DATABASE))
            # libpq hides a startup error's SQLSTATE; asyncpg shows it.
            with pytest.raises(asyncpg.PostgresError) as refused:
                asyncio.run(asyncpg.connect(host="127.0.0.1", port=port, user=grant["grant_id"],
                                            password=grant["token"], database=DATABASE,
                                            ssl=ssl.create_default_context(cafile=info["ca_file"])))
            assert refused.value.sqlstate == "08006"
            assert bystander.execute("SELECT 'unaffected'").fetchone() == ("unaffected",)
        with psycopg.connect(**demo, autocommit=True) as later:
            assert later.execute("SELECT 'still serving'").fetchone() == ("still serving",)
        failed = [e for e in _connect_events(stack, "backend-tls-2", 4) if e["status"] == "Failure"]
    finally:
        stop_process_group(proc)
    assert [(e["target_name"], e["sqlstate"]) for e in failed] == [(TARGET, "08006")] * 2
    assert "certificate verify failed" in failed[0]["status_detail"]


def test_the_tls_backend_refuses_plaintext_logins(tls_backend: TlsBackend) -> None:
    # What makes the first test's pg_stat_ssl answer meaningful: without TLS nobody gets in.
    pg = tls_backend.pg
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        psycopg.connect(host=pg.host, port=pg.port, user=ROLE, password="x", dbname=DATABASE, sslmode="disable")
