"""The C data path (data_plane.postgres.fastpath) against the Python relay: the same clients, the
same evidence (guardrail verdicts that only log included), and the hand-overs between the two (a
statement Python must judge, one the C path does not reproduce, mid-pipeline)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.stack import Stack, stop_process_group

pytestmark = pytest.mark.integration

def fast_path_counts(stack: Stack, port: int | None = None) -> dict[str, float]:
    admin = port or stack.gateway["admin_port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r'proctor_fast_path_total\{event="(\w+)"\} (\S+)', text)}


def workload(conninfo: dict[str, Any]) -> None:
    """Simple and extended queries, text and binary, prepared, pipelined, with errors, COPY both ways,
    a multi-statement query, an empty query, a named cursor; writes inside a transaction rolled back."""
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        conn.execute("SELECT id, name FROM customers WHERE id < %s ORDER BY id", (3,), prepare=True).fetchall()
        conn.execute("SELECT id, name FROM customers WHERE id < %s ORDER BY id", (5,), prepare=True).fetchall()
        conn.execute("SELECT %s::int, %s::text, %s::float8, %s::bool", (7, "é ✓", 2.5, True), binary=True).fetchall()
        conn.execute("SELECT 1; SELECT 2 WHERE false; SELECT 'three'")
        conn.execute("")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        with conn.pipeline():
            conn.execute("SELECT %s", (1,))
            conn.execute("SELECT count(*) FROM generate_series(1, %s)", (100,))
            with pytest.raises(psycopg.errors.UndefinedTable):
                conn.execute("SELECT * FROM no_such_table_anywhere").fetchall()
        with conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO orders (customer_id, amount, status) "
                         "SELECT 1, g, 'fastpath' FROM generate_series(1, 5) g")
            conn.execute("UPDATE orders SET amount = amount + 1 WHERE status = %s AND amount < %s", ("fastpath", 3))
            with conn.cursor().copy("COPY orders (customer_id, amount, status) FROM STDIN") as copy:
                for i in range(20):
                    copy.write_row((1, i, "fastpath"))
            with conn.cursor().copy("COPY (SELECT amount, status FROM orders WHERE status = 'fastpath' "
                                    "ORDER BY amount) TO STDOUT") as copy:
                assert sum(len(bytes(chunk)) for chunk in copy) > 0
            with conn.cursor(name="walker") as cursor:
                cursor.execute("SELECT amount FROM orders WHERE status = 'fastpath' ORDER BY amount")
                assert len(cursor.fetchmany(7)) == 7
                assert len(cursor.fetchmany(7)) == 7


def statement_rows(stack: Stack, run_id: str, at_least: int) -> list[tuple[Any, ...]]:
    sql = (f"SELECT statement, command_tag, rows, bytes, status, sqlstate, status_detail, details FROM events "
           f"WHERE pipeline_run_id = '{run_id}' AND activity_name = 'query' ORDER BY session_id, seq")
    result = stack.wait_for(sql, lambda r: len(r.rows) >= at_least, timeout=30)
    return [tuple(row) for row in result.rows]


NO_GUARDRAILS_REPOSITORY = "acme/fastpath"


def no_guardrails_token(stack: Stack, run_id: str) -> str:
    """A pipeline under a policy without guardrails (created once), so writes stay in the C path too."""
    from proctor.api_client import ApiClient, ApiError

    admin = stack.issuer.mint("fastpath-admin@example.com", groups=("admins",))
    body = {"name": "fastpath-no-guardrails", "subjects": [{"claims": {"repository": NO_GUARDRAILS_REPOSITORY}}],
            "targets": ["demo-pg"], "backend_role": "app_rw", "max_session_seconds": 3600}
    try:
        ApiClient(stack.state["api_url"], admin).post("/v1/policies", body)
    except ApiError as exc:
        assert exc.status == 409, exc
    return stack.pipeline_token(run_id=run_id, repository=NO_GUARDRAILS_REPOSITORY)


def relayed_in_c_and_in_python(stack: Stack, name: str, token_for: Callable[[str], str],
                               workload: Callable[[dict[str, Any]], None],
                               rows_of: Callable[..., list[tuple[Any, ...]]], *, at_least: int,
                               ) -> tuple[list[tuple[Any, ...]], dict[str, int], dict[str, int]]:
    """The workload through the stack's gateway, where the C data path relays it from start to end
    (adopted, never handed back), then through gateway `name` with the C data path off; their
    statement rows (`rows_of` a run id, at least `at_least`) are equal, field for field. Returns the
    C run's rows and the fast-path counts before and after it."""
    before = fast_path_counts(stack)
    fast_run, slow_run = f"{name}-c-{uuid.uuid4().hex[:8]}", f"{name}-py-{uuid.uuid4().hex[:8]}"
    workload(stack.conninfo(stack.grant(token_for(fast_run))))
    after = fast_path_counts(stack)
    assert after.get("adopted", 0) > before.get("adopted", 0)
    assert after.get("ejected", 0) == before.get("ejected", 0)  # the whole workload stayed in C

    proc, info, port = stack.extra_gateway(name, PROCTOR_FAST_PATH="false")
    try:
        workload(stack.conninfo(stack.grant(token_for(slow_run)), port=port, sslrootcert=info["ca_file"]))
        assert fast_path_counts(stack, info["admin_port"]).get("adopted", 0) == 0
        slow = rows_of(stack, slow_run, at_least=at_least)  # shipped by that gateway
    finally:
        stop_process_group(proc)
    fast = rows_of(stack, fast_run, at_least=len(slow))
    assert len(fast) == len(slow)
    for fast_row, slow_row in zip(fast, slow, strict=True):
        assert fast_row == slow_row
    return fast, before, after


def test_the_c_data_path_writes_the_evidence_the_python_relay_writes(stack: Stack) -> None:
    """One workload through the stack's gateway (C data path) and through a gateway with the C data
    path off: every statement row matches, field for field (times aside)."""
    fast, _, _ = relayed_in_c_and_in_python(stack, "python-relay", lambda run: no_guardrails_token(stack, run),
                                            workload, statement_rows, at_least=21)
    assert any(row[5] == "22012" for row in fast)  # the division by zero
    assert any(row[5] == "42P01" for row in fast)  # the pipeline's error
    assert any(json.loads(row[7] or "{}").get("parameters") == ["7", "é ✓", "2.5", "true"] for row in fast)


def insert_workload(conninfo: dict[str, Any]) -> None:
    """INSERTs, which the seeded pipeline policy's `log-writes` rule logs, again and again: simple
    queries (one and several statements), unnamed and named prepared statements, a pipeline,
    RETURNING, COPY, reads in between; inside transactions rolled back."""
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        with conn.transaction(force_rollback=True):
            for i in range(4):
                conn.execute(f"INSERT INTO orders (customer_id, amount, status) VALUES (1, {i}, 'logged')")
                conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (%s, %s, %s)", (1, i, "logged"))
                conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (%s, %s, 'prepared')", (1, i),
                             prepare=True)
                assert conn.execute("SELECT count(*) FROM orders WHERE status = %s", ("logged",)).fetchone()
            for _ in range(6):  # past psycopg's prepare threshold: the unnamed statement becomes a named one
                conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (%s, 7, 'auto')", (2,))
            conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (1, 1, 'a'); "
                         "INSERT INTO orders (customer_id, amount, status) VALUES (1, 2, 'b'); SELECT 1")
            returned = conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (%s, %s, %s) "
                                    "RETURNING amount", (1, 42, "returning")).fetchone()
            assert returned == (42,)
            with conn.cursor() as cursor:
                cursor.executemany("INSERT INTO orders (customer_id, amount, status) VALUES (%s, %s, %s)",
                                   [(1, i, "many") for i in range(5)])
            with conn.pipeline():
                for i in range(3):
                    conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (%s, %s, %s)",
                                 (1, i, "pipelined"))
                conn.execute("SELECT %s::int", (1,))
            with conn.cursor().copy("COPY orders (customer_id, amount, status) FROM STDIN") as copy:
                for i in range(5):
                    copy.write_row((1, i, "copied"))
        with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction(force_rollback=True):
            conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (%s, 1, 'orphan')", (-1,))


def guarded_statement_rows(stack: Stack, run_id: str, at_least: int) -> list[tuple[Any, ...]]:
    sql = (f"SELECT statement, command_tag, rows, bytes, status, sqlstate, status_detail, rule, approval_id, "
           f"details FROM events WHERE pipeline_run_id = '{run_id}' AND activity_name = 'query' "
           f"ORDER BY session_id, seq")
    result = stack.wait_for(sql, lambda r: len(r.rows) >= at_least, timeout=30)
    return [tuple(row) for row in result.rows]


def test_writes_a_log_rule_matches_stay_in_the_c_data_path_with_the_python_relays_evidence(stack: Stack) -> None:
    """Under the seeded pipeline policy (its `log-writes` rule logs every write): an INSERT-heavy
    workload is relayed by the C data path from start to end, each shape judged by Python once, and
    every statement row (rule and guardrail details included) is the Python relay's, field for field."""
    fast, before, after = relayed_in_c_and_in_python(
        stack, "python-relay-log", lambda run: stack.pipeline_token(run_id=run), insert_workload,
        guarded_statement_rows, at_least=45)
    logged = [row for row in fast if row[7] == "log-writes"]
    assert len(logged) >= 25
    assert all(json.loads(row[9])["guardrail"] == {"action": "log", "rules": ["log-writes"]} for row in logged)
    assert all(row[8] is None for row in fast)
    assert any(row[5] == "23503" and row[7] == "log-writes" for row in fast)  # the orphan's foreign key
    # a shape is judged once at most, not each INSERT of it
    assert after.get("judged", 0) - before.get("judged", 0) <= len({row[0] for row in fast}) < len(logged)


def test_a_statement_python_must_record_mid_pipeline_hands_the_session_back(stack: Stack) -> None:
    """A literal that may hold a secret is redacted by Python: the C path hands the session over
    in the middle of a pipeline (statements in flight), and the evidence stays whole and in order."""
    run = f"handover-{uuid.uuid4().hex[:8]}"
    before = fast_path_counts(stack)
    with psycopg.connect(**stack.conninfo(stack.grant(stack.pipeline_token(run_id=run))), autocommit=True) as conn:
        with conn.pipeline():
            first = conn.execute("SELECT %s::int", (1,))
            secret = conn.execute("SELECT 'host=db password=hunter2' AS dsn")
            last = conn.execute("SELECT %s::int + 1", (2,))
        assert first.fetchone() == (1,)
        assert secret.fetchone() == ("host=db password=hunter2",)
        assert last.fetchone() == (3,)
        assert conn.execute("SELECT 'still relayed'").fetchone() == ("still relayed",)
    after = fast_path_counts(stack)
    assert after.get("ejected", 0) == before.get("ejected", 0) + 1
    rows = statement_rows(stack, run, at_least=4)
    texts = [row[0] for row in rows]
    assert texts[0] == "SELECT $1::int"
    assert texts[1] == "SELECT 'host=db password=[REDACTED]' AS dsn"
    assert texts[2] == "SELECT $1::int + 1"
    assert texts[3] == "SELECT 'still relayed'"
    assert all(row[4] == "Success" and row[2] == 1 for row in rows)
    assert "hunter2" not in json.dumps(rows)


def test_new_statement_shapes_are_judged_once_and_blocked_ones_go_back_to_python(stack: Stack) -> None:
    """Under a policy with guardrails: the first statement of a shape is judged by Python (then its
    repeats, in any session, pass in C); a blocked statement is refused with 42501 by the Python
    relay, which carries the session on."""
    column = f"fp_{uuid.uuid4().hex[:10]}"
    before = fast_path_counts(stack)
    with psycopg.connect(**stack.conninfo(stack.grant()), autocommit=True) as conn:
        assert conn.execute(f"SELECT 1 AS {column}").fetchone() == (1,)
        assert conn.execute(f"SELECT 2 AS {column}").fetchone() == (2,)
    with psycopg.connect(**stack.conninfo(stack.grant()), autocommit=True) as conn:
        assert conn.execute(f"SELECT 3 AS {column}").fetchone() == (3,)
        judged = fast_path_counts(stack).get("judged", 0) - before.get("judged", 0)
        assert judged == 1
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-ddl"):
            conn.execute(f"CREATE TABLE {column} (id int)")
        assert conn.execute("SELECT 'carried on'").fetchone() == ("carried on",)
    assert fast_path_counts(stack).get("ejected", 0) == before.get("ejected", 0) + 1


def test_a_client_that_vanishes_mid_statement_leaves_its_statement_in_the_evidence(stack: Stack) -> None:
    run = f"vanish-{uuid.uuid4().hex[:8]}"
    info = stack.conninfo(stack.grant(stack.pipeline_token(run_id=run)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGHOST": info["host"], "PGPORT": str(info["port"]), "PGUSER": info["user"], "PGPASSWORD": info["password"],
        "PGDATABASE": "app", "PGSSLMODE": "verify-full", "PGSSLROOTCERT": info["sslrootcert"]}
    client = subprocess.Popen(["psql", "-X", "-c", "SELECT 'before'", "-c", "SELECT pg_sleep(30)"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)
    client.kill()  # no Terminate, no TLS close: the connection just breaks
    client.wait()
    result = stack.wait_for(
        f"SELECT statement, status, status_detail, activity_name FROM events WHERE pipeline_run_id = '{run}' "
        f"AND activity_name IN ('query', 'disconnect') ORDER BY seq",
        lambda r: any(row[3] == "disconnect" for row in r.rows), timeout=30)
    statements = {row[0]: row for row in result.rows if row[3] == "query"}
    assert statements["SELECT 'before'"][1] == "Success"
    assert statements["SELECT pg_sleep(30)"][1] == "Failure"
    assert "ended before the statement completed" in statements["SELECT pg_sleep(30)"][2]
