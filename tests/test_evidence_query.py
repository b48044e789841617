"""Evidence queries: Athena SQL run locally on DuckDB over moto S3, and through a stubbed Athena."""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from control_plane.contract import (
    CLASS_AUTHENTICATION,
    CLASS_DATASTORE_ACTIVITY,
    STATUS_FAILURE,
    Identity,
    encode_jsonl_gz,
    event_object_key,
    event_partition,
    evidence_event,
    session_index_key,
)
from proctor.evidence_query import (
    EvidenceQueryError,
    QueryResult,
    duckdb_type,
    format_result,
    run_athena_query,
    run_local_query,
    to_duckdb_sql,
)

BUCKET = "proctor-evidence-test"
# One session for the module: a fresh boto3 session per test reloads the service models (~0.3 s).
AWS = boto3.session.Session(region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test")
DAY_1 = datetime(2024, 5, 1, 9, 30, tzinfo=UTC).timestamp()
DAY_2 = datetime(2024, 5, 2, 14, 0, tzinfo=UTC).timestamp()
EU, US = "eu-west-1", "us-east-1"

ALICE = Identity(issuer="https://idp.example.com", subject="alice", groups=("engineers", "oncall"))
CAROL = Identity(issuer="https://idp.example.com", subject="carol", groups=("auditors",))
PIPELINE_RUN = Identity(
    issuer="https://token.actions.githubusercontent.com",
    subject="repo:acme/billing:ref:refs/heads/main",
    pipeline={"repository": "acme/billing", "run_id": "9001", "actor": "bob", "workflow": "migrate"},
)
OTHER_RUN = Identity(
    issuer="https://token.actions.githubusercontent.com",
    subject="repo:acme/billing:ref:refs/heads/main",
    pipeline={"repository": "acme/billing", "run_id": "9002", "actor": "dave", "workflow": "migrate"},
)


def _query(identity: Identity, statement: str, when: float, region: str, **fields: Any) -> dict[str, Any]:
    return evidence_event(
        CLASS_DATASTORE_ACTIVITY,
        "query",
        identity=identity,
        now=when,
        region=region,
        statement=statement,
        target_name="orders-db",
        **fields,
    )


def _evidence_events() -> list[dict[str, Any]]:
    return [
        _query(ALICE, "SELECT * FROM accounts", DAY_1, EU, rows=3, duration_ms=1.5, session_id="s-alice"),
        _query(ALICE, "UPDATE accounts SET tier = 'gold'", DAY_1 + 60, EU, rows=1, session_id="s-alice"),
        _query(PIPELINE_RUN, "CREATE TABLE invoices (id int)", DAY_1 + 120, US, session_id="s-ci-1"),
        _query(PIPELINE_RUN, "INSERT INTO invoices VALUES (1)", DAY_1 + 180, US, rows=1, session_id="s-ci-1"),
        _query(OTHER_RUN, "ALTER TABLE invoices ADD total int", DAY_2, US, session_id="s-ci-2"),
        evidence_event(
            CLASS_DATASTORE_ACTIVITY,
            "mask",
            identity=CAROL,
            now=DAY_2 + 60,
            region=EU,
            details={"column": "email", "detector": "email", "values": 4},
            rule="mask-email",
            session_id="s-carol",
        ),
        evidence_event(
            CLASS_AUTHENTICATION,
            "logon",
            status=STATUS_FAILURE,
            now=DAY_2 + 120,
            region=EU,
            status_detail="grant expired",
            actor_subject="mallory",
            src_ip="203.0.113.7",
        ),
    ]


def _session_rows() -> list[dict[str, Any]]:
    return [
        {
            "session_id": "s-alice",
            "protocol": "postgres",
            "started_at": "2024-05-01T09:29:58.000+00:00",
            "ended_at": "2024-05-01T09:40:00.000+00:00",
            "actor_subject": "alice",
            "actor_kind": "user",
            "target_name": "orders-db",
            "statements": 2,
            "bytes_in": 120,
            "bytes_out": 4096,
            "chunks": 1,
            "gateway_region": EU,
        },
        {
            "session_id": "s-ci-1",
            "protocol": "postgres",
            "started_at": "2024-05-01T09:31:59.000+00:00",
            "ended_at": "2024-05-01T09:33:10.000+00:00",
            "actor_subject": PIPELINE_RUN.subject,
            "actor_kind": "pipeline",
            "pipeline_repository": "acme/billing",
            "pipeline_run_id": "9001",
            "pipeline_actor": "bob",
            "target_name": "orders-db",
            "statements": 2,
            "chunks": 2,
            "gateway_region": US,
        },
    ]


@pytest.fixture
def s3() -> Iterator[Any]:
    with mock_aws():
        client = AWS.client("s3")
        client.create_bucket(Bucket=BUCKET)
        yield client


@pytest.fixture
def evidence_bucket(s3: Any) -> Any:
    """The bucket as the recorder leaves it: one batch object per (dt, region)."""
    batches: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for event in _evidence_events():
        batches.setdefault(event_partition(event), []).append(event)
    for number, ((dt, region), rows) in enumerate(sorted(batches.items())):
        key = event_object_key(dt, region, f"batch-{number}")
        s3.put_object(Bucket=BUCKET, Key=key, Body=encode_jsonl_gz(rows))
    for row in _session_rows():
        key = session_index_key("2024-05-01", row["gateway_region"], row["session_id"])
        s3.put_object(Bucket=BUCKET, Key=key, Body=encode_jsonl_gz([row]))
    return s3


def query(s3: Any, sql: str) -> QueryResult:
    return run_local_query(sql, s3, bucket=BUCKET)


def downloaded_keys(s3: Any) -> list[str]:
    """Record the keys of GetObject calls: a view of what the local engine reads."""
    keys: list[str] = []
    s3.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: keys.append(params["Key"]))
    return keys


# --- local engine --------------------------------------------------------------------------------


def test_statements_of_a_pipeline_run_are_selected_by_run_id(evidence_bucket: Any) -> None:
    result = query(
        evidence_bucket,
        "SELECT statement, pipeline_actor, pipeline_repository, actor_kind FROM events "
        "WHERE pipeline_run_id = '9001' ORDER BY time",
    )
    assert result.columns == ["statement", "pipeline_actor", "pipeline_repository", "actor_kind"]
    assert result.rows == [
        ("CREATE TABLE invoices (id int)", "bob", "acme/billing", "pipeline"),
        ("INSERT INTO invoices VALUES (1)", "bob", "acme/billing", "pipeline"),
    ]


def test_statements_are_counted_by_actor(evidence_bucket: Any) -> None:
    result = query(
        evidence_bucket,
        "SELECT coalesce(pipeline_actor, actor_subject) AS actor, count(*) AS statements FROM events "
        "WHERE activity_name = 'query' GROUP BY 1 ORDER BY statements DESC, actor",
    )
    assert result.rows == [("alice", 2), ("bob", 2), ("dave", 1)]


def test_dt_filter_returns_one_day_and_reads_only_its_objects(evidence_bucket: Any) -> None:
    reads = downloaded_keys(evidence_bucket)
    result = query(
        evidence_bucket,
        "SELECT dt, region, activity_name, status FROM events WHERE dt = '2024-05-02' ORDER BY time",
    )
    assert result.rows == [
        ("2024-05-02", US, "query", "Success"),
        ("2024-05-02", EU, "mask", "Success"),
        ("2024-05-02", EU, "logon", "Failure"),
    ]
    assert reads and all(key.startswith("events/dt=2024-05-02/") for key in reads)


def test_range_and_region_filters_prune_and_still_answer_exactly(evidence_bucket: Any) -> None:
    reads = downloaded_keys(evidence_bucket)
    result = query(
        evidence_bucket,
        "SELECT count(*) FROM events WHERE '2024-05-01' < dt AND (region IN ('eu-west-1') AND status = 'Failure')",
    )
    assert result.rows == [(1,)]
    assert reads == ["events/dt=2024-05-02/region=eu-west-1/batch-2.jsonl.gz"]


def test_a_join_is_not_pruned_by_a_dt_filter(evidence_bucket: Any) -> None:
    result = query(
        evidence_bucket,
        "SELECT s.session_id, count(e.event_id) AS events FROM sessions s JOIN events e "
        "ON e.session_id = s.session_id WHERE s.dt = '2024-05-01' GROUP BY 1 ORDER BY 1",
    )
    assert result.rows == [("s-alice", 2), ("s-ci-1", 2)]


def test_contains_matches_actor_groups(evidence_bucket: Any) -> None:
    result = query(
        evidence_bucket,
        "SELECT DISTINCT actor_subject, cardinality(actor_groups) AS groups FROM events "
        "WHERE contains(actor_groups, 'engineers')",
    )
    assert result.rows == [("alice", 2)]


def test_json_extract_scalar_reads_details(evidence_bucket: Any) -> None:
    result = query(
        evidence_bucket,
        "SELECT rule, json_extract_scalar(details, '$.column') AS masked_column, "
        "CAST(json_extract_scalar(details, '$.values') AS integer) AS masked_values "
        "FROM events WHERE activity_name = 'mask'",
    )
    assert result.rows == [("mask-email", "email", 4)]


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(DISTINCT event_id) FROM events",
        "SELECT count(DISTINCT event_id) FROM proctor_evidence.events",
        "SELECT count(DISTINCT event_id) FROM awsdatacatalog.proctor_evidence.events",
        'SELECT count(DISTINCT "event_id") FROM "proctor_evidence"."events"',
    ],
)
def test_qualified_and_unqualified_table_names_resolve(evidence_bucket: Any, sql: str) -> None:
    assert query(evidence_bucket, sql).rows == [(7,)]


def test_failed_authentication_is_found_with_athena_time_functions(evidence_bucket: Any) -> None:
    result = query(
        evidence_bucket,
        "SELECT actor_subject, status_detail, src_ip, "
        "date_format(from_unixtime(time / 1000), '%Y-%m-%d %H:%i') AS at "
        "FROM events WHERE class_uid = 3002 AND status = 'Failure'",
    )
    assert result.rows == [("mallory", "grant expired", "203.0.113.7", "2024-05-02 14:02")]


def test_columns_have_the_contract_types(evidence_bucket: Any) -> None:
    result = query(
        evidence_bucket,
        "SELECT time, class_uid, actor_groups, duration_ms, rows, approval_id FROM events "
        "WHERE statement = 'SELECT * FROM accounts'",
    )
    assert result.rows == [(int(DAY_1 * 1000), 6005, ["engineers", "oncall"], 1.5, 3, None)]
    assert duckdb_type("array<string>") == "VARCHAR[]"
    assert duckdb_type("int") == "INTEGER"


def test_sessions_table_reads_session_index_rows(evidence_bucket: Any) -> None:
    reads = downloaded_keys(evidence_bucket)
    result = query(
        evidence_bucket,
        "SELECT session_id, pipeline_run_id, statements, bytes_out, chunks, region FROM sessions ORDER BY 1",
    )
    assert result.rows == [("s-alice", None, 2, 4096, 1, EU), ("s-ci-1", "9001", 2, None, 2, US)]
    assert sorted(reads) == [
        "sessions/dt=2024-05-01/region=eu-west-1/s-alice.jsonl.gz",
        "sessions/dt=2024-05-01/region=us-east-1/s-ci-1.jsonl.gz",
    ]


def test_missing_fields_are_null_and_unknown_fields_ignored(s3: Any) -> None:
    body = encode_jsonl_gz([{"event_id": "e1", "time": 5, "future_field": {"x": 1}}])
    s3.put_object(Bucket=BUCKET, Key=event_object_key("2024-06-01", EU, "partial"), Body=body)
    s3.put_object(Bucket=BUCKET, Key="events/dt=2024-06-01/region=eu-west-1/_SUCCESS", Body=b"not json")
    result = query(s3, "SELECT event_id, time, actor_groups, statement, dt FROM events")
    assert result.rows == [("e1", 5, None, None, "2024-06-01")]


def test_redelivered_batch_is_counted_once_by_distinct_event_id(evidence_bucket: Any) -> None:
    first = event_object_key("2024-05-01", EU, "batch-0")
    body = evidence_bucket.get_object(Bucket=BUCKET, Key=first)["Body"].read()
    evidence_bucket.put_object(Bucket=BUCKET, Key=event_object_key("2024-05-01", EU, "retry"), Body=body)
    result = query(evidence_bucket, "SELECT count(*) AS stored, count(DISTINCT event_id) AS unique_events FROM events")
    assert result.rows == [(9, 7)]


def test_empty_bucket_gives_no_rows_with_columns(s3: Any) -> None:
    result = query(s3, "SELECT event_id, dt FROM events")
    assert result == QueryResult(columns=["event_id", "dt"], rows=[])


def test_unnamed_columns_are_named_like_athena(evidence_bucket: Any) -> None:
    result = query(evidence_bucket, "SELECT count(*), max(dt) AS last_day, approx_distinct(actor_subject) FROM events")
    assert result.columns == ["_col0", "last_day", "_col2"]
    # Both runs of the pipeline share one OIDC subject: four distinct actors.
    assert result.rows == [(7, "2024-05-02", 4)]


def test_corrupt_object_is_named_in_the_error(s3: Any) -> None:
    s3.put_object(Bucket=BUCKET, Key=event_object_key("2024-06-01", EU, "bad"), Body=gzip.compress(b'{"a":1}\n{oops\n'))
    with pytest.raises(EvidenceQueryError, match=r"region=eu-west-1/bad\.jsonl\.gz line 2 is not JSON"):
        query(s3, "SELECT * FROM events")


# --- refusals and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM events",
        "DROP TABLE events",
        "INSERT INTO events (event_id) VALUES ('forged')",
        "WITH forged AS (SELECT 'x' AS event_id) INSERT INTO events (event_id) SELECT * FROM forged",
        "CREATE TABLE copy AS SELECT * FROM events",
        "SELECT 1; DROP TABLE events",
    ],
)
def test_anything_but_one_select_is_refused(s3: Any, sql: str) -> None:
    with pytest.raises(EvidenceQueryError, match=r"only SELECT|one statement at a time"):
        query(s3, sql)


def test_bad_sql_reports_the_parser_reason(s3: Any) -> None:
    with pytest.raises(EvidenceQueryError) as raised:
        query(s3, "SELECT count( FROM events")
    message = str(raised.value)
    assert message.startswith("cannot parse the query: ")
    assert "Expecting )" in message and "line 1" in message and "\x1b" not in message


def test_unknown_column_is_a_query_error(evidence_bucket: Any) -> None:
    with pytest.raises(EvidenceQueryError, match="no_such_column"):
        query(evidence_bucket, "SELECT no_such_column FROM events")


def test_local_query_cannot_read_local_files(s3: Any) -> None:
    with pytest.raises(EvidenceQueryError, match="disabled by configuration"):
        query(s3, "SELECT * FROM read_text('/etc/hostname')")


def test_transpiled_sql_is_duckdb() -> None:
    assert to_duckdb_sql("SELECT cardinality(actor_groups) AS n FROM events") == (
        "SELECT ARRAY_LENGTH(actor_groups) AS n FROM events"
    )


# --- output formats ------------------------------------------------------------------------------

SAMPLE = QueryResult(
    columns=["actor", "statements", "groups", "last_error"],
    rows=[("alice", 12, ["engineers", "oncall"], None), ("bob", 3, [], 'line "1"\nline 2')],
)


def test_table_format_aligns_columns_and_shows_null_as_empty() -> None:
    assert format_result(SAMPLE, "table") == (
        "actor | statements | groups                  | last_error\n"
        "------+------------+-------------------------+-----------------\n"
        'alice |         12 | ["engineers", "oncall"] |\n'
        'bob   |          3 | []                      | line "1"\\nline 2\n'
        "(2 rows)\n"
    )


def test_csv_format_round_trips() -> None:
    rows = list(csv.reader(io.StringIO(format_result(SAMPLE, "csv"))))
    assert rows == [
        ["actor", "statements", "groups", "last_error"],
        ["alice", "12", '["engineers", "oncall"]', ""],
        ["bob", "3", "[]", 'line "1"\nline 2'],
    ]


def test_json_format_is_an_array_of_objects() -> None:
    when = datetime(2024, 5, 1, tzinfo=UTC)
    result = QueryResult(columns=["actor", "n", "at", "n"], rows=[("alice", 2, when, None)])
    assert json.loads(format_result(result, "json")) == [
        {"actor": "alice", "n": 2, "at": "2024-05-01 00:00:00+00:00", "n_2": None}
    ]
    assert json.loads(format_result(SAMPLE, "json"))[0]["groups"] == ["engineers", "oncall"]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(EvidenceQueryError, match="table, csv, json"):
        format_result(SAMPLE, "xml")


# --- Athena ---------------------------------------------------------------------------------------


def _athena() -> Any:
    return AWS.client("athena", region_name="eu-west-1")


def _status(state: str, **extra: Any) -> dict[str, Any]:
    return {"QueryExecution": {"QueryExecutionId": "q-1", "Status": {"State": state, **extra}}}


def _cells(*values: str | None) -> dict[str, Any]:
    return {"Data": [{} if value is None else {"VarCharValue": value} for value in values]}


COLUMN_INFO = [
    {"Name": name, "Label": name, "Type": kind}
    for name, kind in [("actor_subject", "varchar"), ("n", "bigint"), ("avg_ms", "double"), ("failed", "boolean")]
]


def test_athena_query_polls_pages_and_types_the_rows() -> None:
    athena = _athena()
    sql = "SELECT actor_subject, count(*) AS n, avg(duration_ms) AS avg_ms, bool_or(status = 'Failure') AS failed "
    sql += "FROM events GROUP BY 1"
    with Stubber(athena) as stub:
        stub.add_response(
            "start_query_execution",
            {"QueryExecutionId": "q-1"},
            {
                "QueryString": sql,
                "WorkGroup": "proctor-auditors",
                "QueryExecutionContext": {"Database": "proctor_evidence"},
            },
        )
        stub.add_response("get_query_execution", _status("QUEUED"), {"QueryExecutionId": "q-1"})
        stub.add_response("get_query_execution", _status("RUNNING"), {"QueryExecutionId": "q-1"})
        stub.add_response("get_query_execution", _status("SUCCEEDED"), {"QueryExecutionId": "q-1"})
        stub.add_response(
            "get_query_results",
            {
                "ResultSet": {
                    "Rows": [
                        _cells("actor_subject", "n", "avg_ms", "failed"),
                        _cells("alice", "2", "1.5", "false"),
                    ],
                    "ResultSetMetadata": {"ColumnInfo": COLUMN_INFO},
                },
                "NextToken": "page-2",
            },
            {"QueryExecutionId": "q-1", "MaxResults": 1000},
        )
        stub.add_response(
            "get_query_results",
            {
                "ResultSet": {
                    "Rows": [_cells("mallory", "1", None, "true"), _cells("", "0", "NaN", None)],
                    "ResultSetMetadata": {"ColumnInfo": COLUMN_INFO},
                }
            },
            {"QueryExecutionId": "q-1", "MaxResults": 1000, "NextToken": "page-2"},
        )
        result = run_athena_query(sql, athena, workgroup="proctor-auditors", poll_interval=0)
        stub.assert_no_pending_responses()
    assert result.columns == ["actor_subject", "n", "avg_ms", "failed"]
    assert result.rows[:2] == [("alice", 2, 1.5, False), ("mallory", 1, None, True)]
    assert result.rows[2][:2] == ("", 0) and result.rows[2][3] is None
    assert result.rows[2][2] != result.rows[2][2]  # NaN


def test_athena_failure_reason_reaches_the_user() -> None:
    athena = _athena()
    reason = "COLUMN_NOT_FOUND: line 1:8: Column 'nope' cannot be resolved"
    with Stubber(athena) as stub:
        stub.add_response("start_query_execution", {"QueryExecutionId": "q-1"})
        stub.add_response("get_query_execution", _status("RUNNING"))
        stub.add_response(
            "get_query_execution",
            _status("FAILED", StateChangeReason=reason, AthenaError={"ErrorCategory": 2, "ErrorMessage": reason}),
        )
        with pytest.raises(EvidenceQueryError, match="q-1 failed: COLUMN_NOT_FOUND: line 1:8"):
            run_athena_query("SELECT nope FROM events", athena, workgroup="wg", poll_interval=0)
        stub.assert_no_pending_responses()


def test_athena_query_past_its_timeout_is_cancelled() -> None:
    athena = _athena()
    with Stubber(athena) as stub:
        stub.add_response("start_query_execution", {"QueryExecutionId": "q-1"})
        stub.add_response("get_query_execution", _status("RUNNING"))
        stub.add_response("stop_query_execution", {}, {"QueryExecutionId": "q-1"})
        with pytest.raises(EvidenceQueryError, match="cancelled"):
            run_athena_query("SELECT 1", athena, workgroup="wg", poll_interval=0, timeout=0)
        stub.assert_no_pending_responses()


def test_athena_refusal_of_the_request_is_a_query_error() -> None:
    athena = _athena()
    with Stubber(athena) as stub:
        stub.add_client_error("start_query_execution", "InvalidRequestException", "WorkGroup wg is disabled")
        with pytest.raises(EvidenceQueryError, match="WorkGroup wg is disabled"):
            run_athena_query("SELECT 1", athena, workgroup="wg", poll_interval=0)


def test_athena_path_refuses_writes_before_calling_athena() -> None:
    athena = _athena()
    with Stubber(athena), pytest.raises(EvidenceQueryError, match="only SELECT"):
        run_athena_query("DROP TABLE events", athena, workgroup="wg")
