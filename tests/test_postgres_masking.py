"""Inline masking through the gateway with real clients (psql, psycopg text and binary, asyncpg
binary): the same rows read directly from PostgreSQL hold clear values; through the gateway under a
masking policy every path a value can leave by is masked, results stay valid for their types, and
each mask action is evidence."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from data_plane.core.recording import WIRE_SEALED
from proctor.api_client import ApiClient
from proctor.replay import load_recording
from tests.stack import Stack

pytestmark = pytest.mark.integration

ADA_EMAIL, ADA_CARD, ADA_SSN, ADA_PHONE = "ada@example.com", "4111111111111111", "078-05-1120", "+1-202-555-0101"
CLEAR = (ADA_EMAIL, ADA_CARD, ADA_SSN, ADA_PHONE)


def superuser_psql(stack: Stack, sql: str) -> str:
    pg = stack.state["postgres"]
    out = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-h", pg["socket_dir"], "-p", str(pg["port"]),
                          "-U", "postgres", "-d", "app", "-c", sql], capture_output=True, text=True, check=True)
    return out.stdout


@pytest.fixture(scope="module")
def engineer(stack: Stack) -> dict[str, Any]:
    """A grant under the seeded engineers-read policy: hash emails, last 4 of cards, redact SSNs."""
    superuser_psql(stack, "CREATE OR REPLACE VIEW customer_contacts AS SELECT c.id, c.email AS contact, "
                          "lower(c.email) AS lowered, c.name FROM customers c; "
                          "CREATE OR REPLACE VIEW contacts_again AS SELECT id, contact FROM customer_contacts; "
                          "GRANT SELECT ON customer_contacts, contacts_again TO app_ro")
    return stack.grant(stack.issuer.mint("eve@example.com", groups=["engineers"]))


def admin(stack: Stack) -> ApiClient:
    return ApiClient(stack.state["api_url"], stack.issuer.mint("root@example.com", groups=["admins"]))


@pytest.fixture(scope="module")
def writer(stack: Stack) -> dict[str, Any]:
    """A read/write grant whose policy masks emails and SSNs, strictly: expressions over a table
    with masked columns are masked whole."""
    policy = {"name": "masked-writers", "subjects": [{"groups": ["masked-writers"]}], "targets": ["demo-pg"],
              "backend_role": "app_rw", "access": "read_write", "max_session_seconds": 600,
              "masking": [{"name": "strict-email", "columns": ["public.customers.email"], "method": "redact",
                           "strict": True},
                          {"name": "ssn-null", "columns": ["*.*.ssn"], "method": "null"},
                          {"name": "emails-anywhere", "detectors": ["email"], "method": "redact"}]}
    status, body = admin(stack).post("/v1/policies", policy)
    assert status == 201, body
    return stack.grant(stack.issuer.mint("wes@example.com", groups=["masked-writers"]))


def psql_through(stack: Stack, grant: dict[str, Any], *commands: str) -> subprocess.CompletedProcess[str]:
    info = stack.conninfo(grant)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGPASSWORD": info["password"], "PGSSLMODE": "verify-full", "PGSSLROOTCERT": info["sslrootcert"]}
    args = ["psql", "-X", "-A", "-t", "-h", info["host"], "-p", str(info["port"]), "-U", info["user"], "-d", "app"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)


def no_clear_values(text: str) -> bool:
    return not any(value in text for value in CLEAR)


def test_psql_gets_clear_values_directly_and_masked_values_through_the_gateway(stack: Stack,
                                                                                 engineer: dict[str, Any]) -> None:
    query = "SELECT name, email, card_number, ssn, phone FROM customers WHERE id = 1"
    direct = superuser_psql(stack, query)
    assert all(value in direct for value in CLEAR)
    through = psql_through(stack, engineer, query)
    assert through.returncode == 0, through.stderr
    name, email, card, ssn, phone = through.stdout.strip().split("|")
    assert name == "Ada Lovelace"
    assert email.startswith("h:") and len(email) == 34
    assert card == "************1111" and ssn == "***" and phone.endswith("01") and phone.startswith("***")


CORPUS = [
    # (query, what must not appear, what must appear)
    ("SELECT c.email AS address FROM customers c WHERE c.id = 1", CLEAR, "h:"),
    ("SELECT email::varchar(40) FROM customers WHERE id = 1", CLEAR, "***"),
    ("SELECT upper(email), 'mail: ' || email FROM customers WHERE id = 1", (ADA_EMAIL.upper(), ADA_EMAIL), "***"),
    ("SELECT substring(ssn from 1 for 11) FROM customers WHERE id = 1", CLEAR, "***"),
    ("SELECT row_to_json(c) FROM customers c WHERE id = 1", CLEAR, '"email":"***"'),
    ("SELECT json_agg(email) FROM customers", CLEAR, '"***"'),
    ("SELECT to_jsonb(c) FROM customers c WHERE id = 1", CLEAR, '"***"'),
    ("SELECT array_agg(card_number) FROM customers", CLEAR, "{"),
    ("WITH x AS (SELECT email, ssn FROM customers) SELECT * FROM x LIMIT 1", CLEAR, "h:"),
    ("SELECT (SELECT email FROM customers WHERE id = 1) AS sub", CLEAR, "***"),
    ("SELECT email FROM customers WHERE id = 1 UNION ALL SELECT 'zed@example.org'", (*CLEAR, "zed@"), "***"),
    ("SELECT contact, lowered FROM customer_contacts WHERE id = 1", CLEAR, "h:"),
    ("SELECT contact FROM contacts_again WHERE id = 1", CLEAR, "h:"),
    ("COPY (SELECT id, email, upper(ssn) FROM customers WHERE id = 1) TO STDOUT", CLEAR, "h:"),
    ("COPY customers TO STDOUT WITH (FORMAT csv, HEADER)", CLEAR, "************1111"),
    ("COPY customers (ssn, email) TO STDOUT WITH (FORMAT csv, DELIMITER ';', QUOTE '''')", CLEAR, "***;h:"),
]


@pytest.mark.parametrize(("query", "hidden", "shown"), CORPUS, ids=[q[:48] for q, _, _ in CORPUS])
def test_masking_corpus_through_psql(stack: Stack, engineer: dict[str, Any], query: str,
                                     hidden: tuple[str, ...], shown: str) -> None:
    out = psql_through(stack, engineer, query)
    assert out.returncode == 0, out.stderr
    assert not any(value in out.stdout for value in hidden), out.stdout
    assert shown in out.stdout, out.stdout


def test_psycopg_text_and_binary_prepared_statements_cursors_and_copy(stack: Stack, engineer: dict[str, Any]) -> None:
    with psycopg.connect(**stack.conninfo(engineer)) as conn:
        for binary in (False, True):
            for _ in range(6):  # psycopg prepares a statement after its 5th execution
                row = conn.execute("SELECT id, email, card_number, ssn, created_at FROM customers WHERE id = %s",
                                   (1,), binary=binary).fetchone()
                assert row is not None
                assert row[0] == 1 and row[1].startswith("h:") and row[2] == "************1111" and row[3] == "***"
                assert row[4].year > 2000  # a timestamptz in the same row still decodes
        with conn.cursor(name="server_side") as cursor:
            cursor.execute("SELECT email, phone FROM customers ORDER BY id")
            rows = cursor.fetchmany(3)
        assert len(rows) == 3 and all(r[0].startswith("h:") and r[1].startswith("***") for r in rows)
        inner = "SELECT email, name FROM customers ORDER BY id"
        with conn.cursor() as cursor, cursor.copy(f"COPY ({inner}) TO STDOUT") as copy:
            copied = list(copy.rows())
        assert copied[0] == (rows[0][0], "Ada Lovelace")
        with (pytest.raises(psycopg.errors.InsufficientPrivilege, match="binary COPY"), conn.cursor() as cursor,
              cursor.copy("COPY customers TO STDOUT (FORMAT binary)") as copy):
            list(copy)
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (6,)  # the session stays healthy
        with conn.pipeline():
            first = conn.execute("SELECT email FROM customers WHERE id = %s", (1,))
            second = conn.execute("SELECT ssn, name FROM customers WHERE id = %s", (2,))
        assert first.fetchone()[0].startswith("h:") and second.fetchone() == ("***", "Alan Turing")


def test_asyncpg_binary_results_stay_valid_for_their_types(stack: Stack, engineer: dict[str, Any]) -> None:
    async def run() -> dict[str, Any]:
        conn = await asyncpg.connect(host="127.0.0.1", port=stack.gateway["port"], user=engineer["grant_id"],
                                     password=engineer["token"], database="app", ssl=stack.ssl_context())
        try:
            rows = await conn.fetch("SELECT id, email, card_number, upper(email) AS up, to_jsonb(c) AS doc, "
                                    "array_agg(email) OVER () AS emails, created_at FROM customers c WHERE id < $1", 3)
            statement = await conn.prepare("SELECT email, ssn FROM customers WHERE id = $1")
            prepared = [await statement.fetchrow(i) for i in (1, 2, 1)]
            async with conn.transaction():
                cursor = await conn.cursor("SELECT email, phone FROM customers ORDER BY id")
                fetched = await cursor.fetch(2)
            view = await conn.fetch("SELECT contact, lowered FROM customer_contacts ORDER BY id LIMIT 2")
            return {"rows": rows, "prepared": prepared, "fetched": fetched, "view": view}
        finally:
            await conn.close()

    got = asyncio.run(run())
    text = repr(got)
    assert no_clear_values(text), text
    first = got["rows"][0]
    assert first["id"] == 1 and first["email"].startswith("h:") and first["card_number"].endswith("1111")
    assert first["up"] == "***" and '"email": "***"' in first["doc"] and first["emails"] == ["***", "***"]
    assert first["created_at"].year > 2000
    assert got["prepared"][0]["email"] == got["prepared"][2]["email"]  # a keyed hash is stable
    assert got["prepared"][0]["ssn"] == "***"
    assert all(r["email"].startswith("h:") for r in got["fetched"])
    assert got["view"][0]["contact"] == first["email"] and got["view"][0]["lowered"] == "***"


def test_returning_unique_violation_and_strict_mode(stack: Stack, writer: dict[str, Any]) -> None:
    marker = uuid.uuid4().hex[:8]
    with psycopg.connect(**stack.conninfo(writer), autocommit=True) as conn:
        inserted = conn.execute("INSERT INTO customers (name, email, ssn) VALUES (%s, %s, %s) "
                                "RETURNING id, email, ssn, name",
                                (f"Test {marker}", f"t{marker}@example.com", "123-45-6789")).fetchone()
        assert inserted is not None
        assert inserted[1:] == ("***", None, f"Test {marker}")
        with pytest.raises(psycopg.errors.UniqueViolation) as violation:
            conn.execute("INSERT INTO customers (name, email) VALUES ('dup', %s)", (ADA_EMAIL,))
        detail = violation.value.diag.message_detail or ""
        assert detail == "Key (email)=(***) already exists." and ADA_EMAIL not in str(violation.value)
        # Strict: an expression over a table holding a strict rule's column is masked whole.
        row = conn.execute("SELECT substring(email from 1 for 3), length(name), name FROM customers "
                           "WHERE id = 1").fetchone()
        assert row == ("***", None, "Ada Lovelace")
        conn.execute("DELETE FROM customers WHERE id = %s", (inserted[0],))


def test_simple_query_cursor_fetch_is_masked(stack: Stack, engineer: dict[str, Any]) -> None:
    out = psql_through(stack, engineer, "BEGIN",
                       "DECLARE c CURSOR FOR SELECT id, email, ssn FROM customers ORDER BY id",
                       "FETCH 2 FROM c", "FETCH NEXT FROM c", "COMMIT")
    assert out.returncode == 0, out.stderr
    fetched = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == 2]
    assert [f[0] for f in fetched] == ["1", "2", "3"]
    assert all(f[1].startswith("h:") and f[2] == "***" for f in fetched) and no_clear_values(out.stdout)


def test_a_notice_that_echoes_a_value_is_masked(stack: Stack, writer: dict[str, Any]) -> None:
    notices: list[str] = []
    with psycopg.connect(**stack.conninfo(writer), autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("DO $$BEGIN RAISE NOTICE 'contact: %', (SELECT email FROM customers WHERE id = 1); END$$")
    assert notices == ["contact: ***"]


def test_a_notification_payload_is_scanned(stack: Stack, writer: dict[str, Any]) -> None:
    with psycopg.connect(**stack.conninfo(writer), autocommit=True) as conn:
        conn.execute("LISTEN signups")
        conn.execute("SELECT pg_notify('signups', 'new: ' || email) FROM customers WHERE id = 1")
        payloads = [n.payload for n in conn.notifies(timeout=10, stop_after=1)]
    assert payloads == ["new: ***"]


def test_each_mask_action_is_evidence(stack: Stack) -> None:
    grant = stack.grant(stack.issuer.mint("ev@example.com", groups=["engineers"]))
    out = psql_through(stack, grant, "SELECT email, ssn, upper(email) FROM customers")
    assert out.returncode == 0, out.stderr
    result = stack.wait_for(
        f"SELECT rule, rows, details, statement FROM events WHERE grant_id = '{grant['grant_id']}' "
        "AND activity_name = 'mask' ORDER BY rule",
        lambda r: len(r.rows) >= 3)
    actions = {row[0]: (row[1], row[2], row[3]) for row in result.rows}
    assert set(actions) >= {"pii-email", "pii-ssn", "pii-detected"}
    rows, details, statement = actions["pii-email"]
    assert rows == 6 and statement == "SELECT email, ssn, upper(email) FROM customers"
    assert json.loads(details)["column"] == "public.customers.email" and json.loads(details)["method"] == "hash"
    assert json.loads(actions["pii-detected"][1])["target"] == "detector:email"


def test_the_recording_holds_only_masked_values_and_reprocess_opens_the_sealed_originals(
        stack: Stack, tmp_path: Path) -> None:
    grant = stack.grant(stack.issuer.mint("rita@example.com", groups=["engineers"]))
    out = psql_through(stack, grant, "SELECT id, name, email, ssn, upper(email) FROM customers ORDER BY id LIMIT 2")
    assert out.returncode == 0 and "h:" in out.stdout, out.stderr
    sessions = stack.wait_for(f"SELECT session_id FROM sessions WHERE grant_id = '{grant['grant_id']}'",
                              lambda r: len(r.rows) == 1)
    [(session_id,)] = sessions.rows
    recording = load_recording(stack.client("s3"), stack.state["recordings_bucket"], session_id)
    wire = b"".join(r.payload for r in recording.records)
    assert b"ada@example.com" not in wire and b"078-05-1120" not in wire  # clear values only sealed
    assert any(r.kind == WIRE_SEALED for r in recording.records)

    policy = tmp_path / "newer.json"
    policy.write_text(json.dumps({"masking": [
        {"name": "names", "columns": ["*.customers.name"], "method": "redact"},
        {"name": "emails-detected", "detectors": ["email"], "method": "redact"}]}))
    env = os.environ | {"PROCTOR_STATE_DIR": str(stack.directory)}
    result = subprocess.run([sys.executable, "-m", "proctor.cli", "evidence", "reprocess", session_id,
                             "--policy", str(policy)], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "1 result(s) replayed with the new rules; 4 value(s) would be masked" in result.stdout
    assert "names           | public.customers.name | redact | rows | 2" in result.stdout
    assert "emails-detected | detector:email        | redact | rows | 2" in result.stdout
    assert "Ada" not in result.stdout and "ada@" not in result.stdout  # counts, never values


def test_catalog_queries_of_psql_work_under_masking(stack: Stack, engineer: dict[str, Any]) -> None:
    out = psql_through(stack, engineer, "\\dt", "\\d customers")
    assert out.returncode == 0, out.stderr
    assert "customers" in out.stdout and "card_number" in out.stdout
