"""Guardrails through the gateway with real clients: what a policy forbids never reaches the
database, the client gets 42501 naming the rule, the session and its transaction stay consistent,
and every decision is evidence."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import asyncpg
import psycopg
import pytest

from tests.stack import Stack

pytestmark = pytest.mark.integration


def events(stack: Stack, run_id: str, predicate) -> list[dict]:
    result = stack.wait_for(f"SELECT * FROM events WHERE pipeline_run_id = '{run_id}' AND class_uid = 6005 "
                            "ORDER BY session_id, seq",
                            lambda r: predicate([dict(zip(r.columns, row, strict=True)) for row in r.rows]))
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def customers_exist(stack: Stack) -> bool:
    pg = stack.state["postgres"]
    out = subprocess.run(["psql", "-X", "-A", "-t", "-h", pg["socket_dir"], "-p", str(pg["port"]), "-U", "postgres",
                          "-d", "app", "-c", "SELECT to_regclass('public.customers') IS NOT NULL"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip() == "t"


def test_drop_table_through_psql_is_blocked_with_42501_naming_the_rule(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="guard-psql"))
    info = stack.conninfo(grant)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGPASSWORD": info["password"], "PGSSLMODE": "verify-full", "PGSSLROOTCERT": info["sslrootcert"]}
    out = subprocess.run(["psql", "-X", "-h", info["host"], "-p", str(info["port"]), "-U", info["user"], "-d", "app",
                          "-v", "VERBOSITY=verbose", "-c", "DROP TABLE customers",
                          "-c", "SELECT count(*) FROM customers"],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert 'ERROR:  42501: statement blocked by Proctor rule "no-ddl"' in out.stderr
    assert "pipelines do not change the schema" in out.stderr
    assert " 6\n" in out.stdout  # the next statement of the same session ran
    assert customers_exist(stack)
    rows = events(stack, "guard-psql", lambda rows: any(r["activity_name"] == "block" for r in rows)
                  and any(r["statement"] == "SELECT count(*) FROM customers" for r in rows))
    [blocked] = [r for r in rows if r["activity_name"] == "block"]
    assert (blocked["statement"], blocked["rule"], blocked["sqlstate"], blocked["status"]) == (
        "DROP TABLE customers", "no-ddl", "42501", "Failure")


def test_drop_table_through_asyncpg_is_blocked(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="guard-asyncpg"))

    async def attempt() -> tuple[str, int]:
        conn = await asyncpg.connect(host="127.0.0.1", port=stack.gateway["port"], user=grant["grant_id"],
                                     password=grant["token"], database="app", ssl=stack.ssl_context())
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
                await conn.execute("DROP TABLE customers")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("SELECT pg_terminate_backend($1)", 1)  # extended protocol, with a parameter
            return str(refused.value), await conn.fetchval("SELECT count(*) FROM customers WHERE id > $1", 0)
        finally:
            await conn.close()

    message, count = asyncio.run(attempt())
    assert 'blocked by Proctor rule "no-ddl"' in message and count == 6
    assert customers_exist(stack)
    rows = events(stack, "guard-asyncpg", lambda rows: sum(r["activity_name"] == "block" for r in rows) == 2)
    assert sorted(r["rule"] for r in rows if r["activity_name"] == "block") == ["no-ddl", "no-side-effect-functions"]


def test_blocked_statement_in_a_transaction_aborts_it_like_any_error(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="guard-tx"))
    with psycopg.connect(**stack.conninfo(grant)) as conn:
        conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (3, 1, 'in-tx')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("ALTER TABLE orders ADD COLUMN sneaky int")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM orders WHERE status = 'in-tx'").fetchone() == (0,)


def test_blocked_statement_mid_pipeline_follows_the_error_until_sync_rule(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="guard-pipeline"))
    with psycopg.connect(**stack.conninfo(grant), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("DELETE FROM orders")  # no WHERE
            conn.execute("SELECT 2")
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)
    rows = events(stack, "guard-pipeline", lambda rows: any(r["statement"] == "SELECT 'after'" for r in rows))
    by_text = {r["statement"]: r for r in rows if r["statement"]}
    assert by_text["DELETE FROM orders"]["activity_name"] == "block"
    assert by_text["DELETE FROM orders"]["rule"] == "no-unscoped-writes"
    assert "skipped" in json.loads(by_text["SELECT 2"]["details"])


def test_unparsable_statements_are_blocked_by_default(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="guard-unparsable"))
    with psycopg.connect(**stack.conninfo(grant), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unparsable-statement"):
            conn.execute("SELEC * FROM customers")
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_backslash_strings_make_every_statement_unparsable(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="guard-scs"))
    with psycopg.connect(**stack.conninfo(grant), autocommit=True) as conn:
        conn.execute("SET standard_conforming_strings = off")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="unparsable-statement"):
            conn.execute("SELECT 'a\\' ; DROP TABLE customers; --'")
    assert customers_exist(stack)


def test_reader_policy_blocks_writes_even_where_the_role_could_not_anyway(stack: Stack) -> None:
    grant = stack.grant(stack.issuer.mint("erin@example.com", groups=("engineers",)))
    with psycopg.connect(**stack.conninfo(grant), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='rule "read-only"'):
            conn.execute("UPDATE customers SET name = 'x' WHERE id = 1")
        assert conn.execute("SELECT count(*) FROM customers").fetchone() == (6,)
