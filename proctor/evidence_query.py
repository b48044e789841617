"""Query the evidence with Athena SQL: in AWS through Athena, locally through DuckDB.

Auditors write one dialect, Athena's (Trino). `run_athena_query` sends it to Athena unchanged;
`run_local_query` reads the same evidence objects from S3 (moto locally), loads them into an
in-memory DuckDB laid out like the Glue database (schema `proctor_evidence`, tables `events` and
`sessions` with the contract's column types plus the `dt` and `region` partition columns taken
from the object key) and runs the query transpiled by sqlglot.

Choices, so local answers match Athena's:

- Tables are not de-duplicated. Delivery is at-least-once with a unique `event_id`, so a batch
  may be stored twice; when exactness matters write `count(DISTINCT event_id)` or group by
  `event_id`. The same SQL then gives the same answer in both engines.
- Like Athena, objects whose names start with `_` or `.` are ignored; `.gz` objects are gunzipped.
- Fields missing from a row are NULL, unknown fields are ignored, a value of the wrong type is NULL.
- Unnamed result columns are called `_col0`, `_col1`... as Athena names them; times render in UTC.
- Only one SELECT (or WITH ... SELECT) statement is accepted, on both paths: evidence is read-only.
  Locally DuckDB also runs without file system access, so a query cannot read or write files.
- Only the tables a query names are downloaded, and for `SELECT ... FROM <one table> WHERE ...`
  the partitions its `dt`/`region` comparisons with string literals exclude are skipped.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import operator
import re
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import sqlglot
from botocore.exceptions import BotoCoreError, ClientError
from sqlglot import exp
from sqlglot.errors import ErrorLevel, ParseError, SqlglotError, UnsupportedError

from control_plane.contract import (
    EVENT_COLUMNS,
    EVENTS_PREFIX,
    PARTITION_COLUMNS,
    SESSION_COLUMNS,
    SESSIONS_PREFIX,
)

if TYPE_CHECKING:
    import duckdb

DATABASE = "proctor_evidence"
OUTPUT_FORMATS = ("table", "csv", "json")
ATHENA_CATALOG = "awsdatacatalog"


class EvidenceQueryError(Exception):
    """A query that cannot run, with a message meant for the person who wrote it."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass(frozen=True)
class EvidenceTable:
    """One Glue table of the evidence bucket: its name, key prefix and (column, Hive type) pairs."""

    name: str
    prefix: str
    columns: tuple[tuple[str, str], ...]


EVIDENCE_TABLES = (
    EvidenceTable("events", EVENTS_PREFIX, EVENT_COLUMNS),
    EvidenceTable("sessions", SESSIONS_PREFIX, SESSION_COLUMNS),
)
_TABLES_BY_NAME = {table.name: table for table in EVIDENCE_TABLES}
PARTITION_COLUMN_NAMES = tuple(name for name, _ in PARTITION_COLUMNS)

_DUCKDB_TYPES = {
    "string": "VARCHAR",
    "varchar": "VARCHAR",
    "bigint": "BIGINT",
    "int": "INTEGER",
    "integer": "INTEGER",
    "smallint": "SMALLINT",
    "tinyint": "TINYINT",
    "double": "DOUBLE",
    "float": "REAL",
    "boolean": "BOOLEAN",
    "date": "DATE",
    "timestamp": "TIMESTAMP",
}


def duckdb_type(hive_type: str) -> str:
    """The DuckDB type that holds a Glue (Hive) column type, e.g. `array<string>` -> `VARCHAR[]`."""
    kind = hive_type.strip().lower()
    if kind.startswith("array<") and kind.endswith(">"):
        return duckdb_type(kind[len("array<") : -1]) + "[]"
    try:
        return _DUCKDB_TYPES[kind]
    except KeyError:
        raise ValueError(f"no DuckDB type for Hive type {hive_type!r}") from None


# ---------------------------------------------------------------------------------------------
# Parsing: one read-only statement, in Athena's dialect.
# ---------------------------------------------------------------------------------------------


def parse_read_only(sql: str) -> exp.Query:
    """Parse Athena SQL and refuse anything but a single query."""
    try:
        statements = [statement for statement in sqlglot.parse(sql, read="trino") if statement is not None]
    except ParseError as exc:
        raise EvidenceQueryError(f"cannot parse the query: {_parse_reason(exc)}") from exc
    except SqlglotError as exc:
        raise EvidenceQueryError(f"cannot parse the query: {_without_ansi(str(exc))}") from exc
    if not statements:
        raise EvidenceQueryError("the query is empty")
    if len(statements) > 1:
        raise EvidenceQueryError(f"one statement at a time, got {len(statements)}")
    statement = statements[0]
    if not isinstance(statement, exp.Query):
        kind = statement.this if isinstance(statement, exp.Command) else statement.key
        raise EvidenceQueryError(
            f"only SELECT queries are allowed (the evidence is read-only), got {str(kind).upper()}"
        )
    return statement


def _parse_reason(exc: ParseError) -> str:
    if not exc.errors:
        return _without_ansi(str(exc))
    error = exc.errors[0]
    # sqlglot names the offending token by its repr; the highlight says it better.
    description = re.sub(r" but got <Token .*>", "", str(error.get("description", "syntax error")))
    where = f"line {error.get('line')}, column {error.get('col')}"
    highlight = error.get("highlight")
    return f"{description} at {where}" + (f", near {highlight!r}" if highlight else "")


def _without_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _evidence_table_name(table: exp.Table, database: str) -> str | None:
    """The evidence table a FROM/JOIN reference names, if it names one."""
    if table.catalog.lower() not in ("", ATHENA_CATALOG) or table.db.lower() not in ("", database):
        return None
    name = table.name.lower()
    return name if name in _TABLES_BY_NAME else None


def _referenced_tables(statement: exp.Query, database: str) -> set[str]:
    return {name for table in statement.find_all(exp.Table) if (name := _evidence_table_name(table, database))}


def to_duckdb_sql(sql: str) -> str:
    """The DuckDB SQL that `run_local_query` runs for an Athena query."""
    return _transpile(parse_read_only(sql))


def _transpile(statement: exp.Query) -> str:
    query = statement.copy()
    for table in query.find_all(exp.Table):
        if table.catalog.lower() == ATHENA_CATALOG:
            table.set("catalog", None)
    _name_unnamed_columns(query)
    try:
        return query.sql(dialect="duckdb", unsupported_level=ErrorLevel.RAISE)
    except UnsupportedError as exc:
        raise EvidenceQueryError(f"the local query engine cannot run this query: {exc}") from exc


def _name_unnamed_columns(query: exp.Query) -> None:
    """Alias unnamed output expressions `_colN`, the names Athena gives them."""
    select: exp.Expression = query
    while not isinstance(select, exp.Select):
        if not isinstance(select, (exp.SetOperation, exp.Subquery)):
            return
        select = select.this
    select.set(
        "expressions",
        [
            column if isinstance(column, (exp.Alias, exp.Column, exp.Star)) else exp.alias_(column, f"_col{i}")
            for i, column in enumerate(select.expressions)
        ],
    )


# ---------------------------------------------------------------------------------------------
# Partition pruning: only conditions every returned row must satisfy, so skipping is exact.
# ---------------------------------------------------------------------------------------------

_COMPARISONS: dict[type[exp.Expression], str] = {
    exp.EQ: "=",
    exp.GT: ">",
    exp.GTE: ">=",
    exp.LT: "<",
    exp.LTE: "<=",
}
_FLIPPED = {"=": "=", ">": "<", ">=": "<=", "<": ">", "<=": ">="}

PartitionCondition = tuple[str, str, str | frozenset[str]]


@dataclass(frozen=True)
class PartitionFilter:
    """Conditions on `dt`/`region` (column, operator, value) implied by a query's WHERE clause."""

    conditions: tuple[PartitionCondition, ...] = ()

    def admits(self, partition: Mapping[str, str]) -> bool:
        return all(_holds(partition[column], op, value) for column, op, value in self.conditions)

    def listing_prefixes(self, table_prefix: str) -> list[str]:
        """Key prefixes to list: one per allowed day when the days are pinned, else the table's."""
        days: frozenset[str] | None = None
        for column, op, value in self.conditions:
            if column == "dt" and op in ("=", "in"):
                allowed = value if isinstance(value, frozenset) else frozenset([value])
                days = allowed if days is None else days & allowed
        if days is None:
            return [f"{table_prefix}/"]
        return [f"{table_prefix}/dt={day}/" for day in sorted(days)]


_OPERATORS: dict[str, Callable[[str, str], bool]] = {
    "=": operator.eq,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def _holds(actual: str, op: str, value: str | frozenset[str]) -> bool:
    # Python compares str by code point, the same order as DuckDB's and Trino's varchar compare.
    if isinstance(value, frozenset):
        return actual in value
    return _OPERATORS[op](actual, value)


def _partition_filters(statement: exp.Query, database: str) -> dict[str, PartitionFilter]:
    """Filters per table, only for `SELECT ... FROM <one table> WHERE ...`: elsewhere `dt` may
    belong to another table or a derived column."""
    if not isinstance(statement, exp.Select) or statement.args.get("with_") or statement.args.get("joins"):
        return {}
    tables = list(statement.find_all(exp.Table))
    source = statement.args.get("from_")
    where = statement.args.get("where")
    if len(tables) != 1 or source is None or source.this is not tables[0] or where is None:
        return {}
    name = _evidence_table_name(tables[0], database)
    if name is None:
        return {}
    conditions = tuple(
        condition for conjunct in _conjuncts(where.this) for condition in _partition_conditions(conjunct)
    )
    return {name: PartitionFilter(conditions)}


def _conjuncts(condition: exp.Expression) -> Iterator[exp.Expression]:
    if isinstance(condition, exp.Paren):
        yield from _conjuncts(condition.this)
    elif isinstance(condition, exp.And):
        yield from _conjuncts(condition.left)
        yield from _conjuncts(condition.right)
    else:
        yield condition


def _partition_conditions(conjunct: exp.Expression) -> list[PartitionCondition]:
    op = _COMPARISONS.get(type(conjunct))
    if op is not None:
        left, right = conjunct.this, conjunct.expression
        if (column := _partition_column(left)) and _is_string_literal(right):
            return [(column, op, right.this)]
        if (column := _partition_column(right)) and _is_string_literal(left):
            return [(column, _FLIPPED[op], left.this)]
        return []
    column = _partition_column(conjunct.this)
    if column is None:
        return []
    if isinstance(conjunct, exp.In) and not conjunct.args.get("query") and not conjunct.args.get("unnest"):
        values = conjunct.expressions
        if values and all(_is_string_literal(value) for value in values):
            return [(column, "in", frozenset(value.this for value in values))]
    if isinstance(conjunct, exp.Between) and not conjunct.args.get("symmetric"):
        low, high = conjunct.args.get("low"), conjunct.args.get("high")
        if _is_string_literal(low) and _is_string_literal(high):
            return [(column, ">=", low.this), (column, "<=", high.this)]
    return []


def _partition_column(node: exp.Expression | None) -> str | None:
    if isinstance(node, exp.Column) and node.name.lower() in PARTITION_COLUMN_NAMES:
        return node.name.lower()
    return None


def _is_string_literal(node: exp.Expression | None) -> bool:
    return isinstance(node, exp.Literal) and node.is_string


# ---------------------------------------------------------------------------------------------
# Local engine: evidence objects from S3 into an in-memory DuckDB.
# ---------------------------------------------------------------------------------------------

# No file access (a query cannot read or write local files) and no extension downloads.
_DUCKDB_SANDBOX = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}
_DOWNLOAD_WORKERS = 8
_GLUE_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True)
class EvidenceObject:
    key: str
    partition: Mapping[str, str]


def run_local_query(sql: str, s3_client: Any, *, bucket: str, database: str = DATABASE) -> QueryResult:
    """Run Athena SQL over the evidence bucket with DuckDB (local mode)."""
    # duckdb is the `local` extra: the Athena path must import without it.
    import duckdb

    if not _GLUE_DATABASE_NAME.fullmatch(database):
        raise EvidenceQueryError(f"not a Glue database name: {database!r}")
    statement = parse_read_only(sql)
    duckdb_sql = _transpile(statement)
    referenced = _referenced_tables(statement, database)
    filters = _partition_filters(statement, database)
    with duckdb.connect(":memory:", config=_DUCKDB_SANDBOX) as connection:
        connection.execute("SET TimeZone = 'UTC'")
        connection.execute(f"CREATE SCHEMA {_quote(database)}")
        for table in EVIDENCE_TABLES:
            _create_table(connection, database, table)
            if table.name in referenced:
                partition_filter = filters.get(table.name, PartitionFilter())
                objects = list_evidence_objects(s3_client, bucket, table, partition_filter)
                _load_objects(connection, database, table, s3_client, bucket, objects)
        connection.execute(f"SET search_path = '{database},main'")
        connection.execute("SET lock_configuration = true")
        try:
            cursor = connection.execute(duckdb_sql)
            columns = [description[0] for description in cursor.description or ()]
            rows = cursor.fetchall()
        except duckdb.Error as exc:
            raise EvidenceQueryError(f"the query failed: {exc}") from exc
    return QueryResult(columns=columns, rows=rows)


def _create_table(connection: duckdb.DuckDBPyConnection, database: str, table: EvidenceTable) -> None:
    columns = ", ".join(
        f"{_quote(name)} {duckdb_type(hive_type)}" for name, hive_type in (*table.columns, *PARTITION_COLUMNS)
    )
    connection.execute(f"CREATE TABLE {_quote(database)}.{_quote(table.name)} ({columns})")


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def list_evidence_objects(
    s3_client: Any, bucket: str, table: EvidenceTable, partition_filter: PartitionFilter | None = None
) -> list[EvidenceObject]:
    """The objects of a table's partitions that the filter admits, as Athena would read them."""
    partition_filter = partition_filter or PartitionFilter()
    layout = re.compile(rf"{re.escape(table.prefix)}/dt=(?P<dt>[^/]+)/region=(?P<region>[^/]+)/(?P<name>[^/]+)")
    objects = []
    paginator = s3_client.get_paginator("list_objects_v2")
    for prefix in partition_filter.listing_prefixes(table.prefix):
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
                for listed in page.get("Contents", ()):
                    match = layout.fullmatch(listed["Key"])
                    if match is None or match["name"].startswith(("_", ".")):
                        continue
                    partition = {"dt": match["dt"], "region": match["region"]}
                    if partition_filter.admits(partition):
                        objects.append(EvidenceObject(listed["Key"], partition))
        except (ClientError, BotoCoreError) as exc:
            raise EvidenceQueryError(f"cannot list s3://{bucket}/{prefix}: {exc}") from exc
    return objects


def _load_objects(
    connection: duckdb.DuckDBPyConnection,
    database: str,
    table: EvidenceTable,
    s3_client: Any,
    bucket: str,
    objects: list[EvidenceObject],
) -> None:
    import duckdb

    def download(evidence_object: EvidenceObject) -> list[str]:
        try:
            body = s3_client.get_object(Bucket=bucket, Key=evidence_object.key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise EvidenceQueryError(f"cannot read s3://{bucket}/{evidence_object.key}: {exc}") from exc
        return _json_lines(bucket, evidence_object.key, body)

    with ThreadPoolExecutor(max_workers=_DOWNLOAD_WORKERS) as pool:
        downloaded = list(pool.map(download, objects))
    by_partition: dict[tuple[str, str], list[tuple[str, list[str]]]] = {}
    for evidence_object, lines in zip(objects, downloaded, strict=True):
        partition = (evidence_object.partition["dt"], evidence_object.partition["region"])
        by_partition.setdefault(partition, []).append((evidence_object.key, lines))

    structure = json.dumps({name: duckdb_type(hive_type) for name, hive_type in table.columns})
    target_columns = ", ".join(_quote(name) for name, _ in (*table.columns, *PARTITION_COLUMNS))
    # Identifiers come from the contract and a checked database name; values are bound parameters.
    insert = (
        f"INSERT INTO {_quote(database)}.{_quote(table.name)} ({target_columns}) "  # noqa: S608
        "SELECT unnest(json_transform(line, $structure)), $dt, $region FROM (SELECT unnest($lines) AS line)"
    )
    for (dt, region), keyed_lines in sorted(by_partition.items()):
        lines = [line for _, object_lines in keyed_lines for line in object_lines]
        if not lines:
            continue
        try:
            connection.execute(insert, {"structure": structure, "dt": dt, "region": region, "lines": lines})
        except duckdb.Error as exc:
            raise EvidenceQueryError(_bad_line(bucket, keyed_lines) or f"cannot load {table.name}: {exc}") from exc


def _json_lines(bucket: str, key: str, body: bytes) -> list[str]:
    if key.endswith(".gz"):
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise EvidenceQueryError(f"s3://{bucket}/{key} is not valid gzip: {exc}") from exc
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvidenceQueryError(f"s3://{bucket}/{key} is not UTF-8: {exc}") from exc
    # JSON lines end at "\n" only; str.splitlines would also split inside values at U+2028 etc.
    return [line for line in text.split("\n") if line.strip()]


def _bad_line(bucket: str, keyed_lines: list[tuple[str, list[str]]]) -> str | None:
    """Name the object and line DuckDB refused, found again the slow way."""
    for key, lines in keyed_lines:
        for number, line in enumerate(lines, start=1):
            try:
                json.loads(line)
            except ValueError as exc:
                return f"s3://{bucket}/{key} line {number} is not JSON: {exc}"
    return None


# ---------------------------------------------------------------------------------------------
# Athena.
# ---------------------------------------------------------------------------------------------

_ATHENA_INTEGERS = frozenset({"tinyint", "smallint", "integer", "int", "bigint"})
_ATHENA_FLOATS = frozenset({"double", "float", "real"})
_ATHENA_DONE = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
_ATHENA_PAGE_SIZE = 1000


def run_athena_query(
    sql: str,
    athena_client: Any,
    *,
    workgroup: str,
    database: str = DATABASE,
    output_location: str | None = None,
    poll_interval: float = 1.0,
    timeout: float = 600.0,
) -> QueryResult:
    """Run Athena SQL in Athena and return its typed rows; a query past `timeout` is cancelled."""
    parse_read_only(sql)
    request: dict[str, Any] = {
        "QueryString": sql,
        "WorkGroup": workgroup,
        "QueryExecutionContext": {"Database": database},
    }
    if output_location:
        request["ResultConfiguration"] = {"OutputLocation": output_location}
    try:
        query_id = athena_client.start_query_execution(**request)["QueryExecutionId"]
        _wait_for_athena(athena_client, query_id, poll_interval=poll_interval, timeout=timeout)
        return _athena_results(athena_client, query_id)
    except (ClientError, BotoCoreError) as exc:
        raise EvidenceQueryError(f"Athena: {exc}") from exc


def _wait_for_athena(athena_client: Any, query_id: str, *, poll_interval: float, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = athena_client.get_query_execution(QueryExecutionId=query_id)["QueryExecution"]["Status"]
        state = status["State"]
        if state == "SUCCEEDED":
            return
        if state in _ATHENA_DONE:
            reason = (status.get("AthenaError") or {}).get("ErrorMessage") or status.get("StateChangeReason")
            raise EvidenceQueryError(f"Athena query {query_id} {state.lower()}: {reason or 'no reason given'}")
        if time.monotonic() >= deadline:
            athena_client.stop_query_execution(QueryExecutionId=query_id)
            raise EvidenceQueryError(f"Athena query {query_id} took longer than {timeout:g}s and was cancelled")
        time.sleep(poll_interval)


def _athena_results(athena_client: Any, query_id: str) -> QueryResult:
    columns: list[str] = []
    types: list[str] = []
    rows: list[tuple[Any, ...]] = []
    request: dict[str, Any] = {"QueryExecutionId": query_id, "MaxResults": _ATHENA_PAGE_SIZE}
    first_page = True
    while True:
        page = athena_client.get_query_results(**request)
        result_set = page["ResultSet"]
        page_rows = result_set.get("Rows", [])
        if first_page:
            column_info = result_set.get("ResultSetMetadata", {}).get("ColumnInfo", [])
            columns = [info["Name"] for info in column_info]
            types = [info.get("Type", "varchar") for info in column_info]
            # The first row of the first page repeats the column names.
            page_rows = page_rows[1:]
            first_page = False
        for row in page_rows:
            data = row.get("Data", [])
            rows.append(tuple(_athena_value(datum, kind) for datum, kind in zip(data, types, strict=False)))
        if not page.get("NextToken"):
            return QueryResult(columns=columns, rows=rows)
        request["NextToken"] = page["NextToken"]


def _athena_value(datum: Mapping[str, str], athena_type: str) -> Any:
    if "VarCharValue" not in datum:
        return None
    text = datum["VarCharValue"]
    kind = athena_type.lower().split("(", 1)[0]
    if kind in _ATHENA_INTEGERS:
        return int(text)
    if kind in _ATHENA_FLOATS:
        return float(text)
    if kind == "boolean":
        return text == "true"
    if kind == "decimal":
        return Decimal(text)
    return text


# ---------------------------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------------------------


def format_result(result: QueryResult, fmt: str) -> str:
    """Render a result as `table`, `csv` or `json` text ending with a newline."""
    if fmt == "table":
        return _as_table(result)
    if fmt == "csv":
        return _as_csv(result)
    if fmt == "json":
        return _as_json(result)
    raise EvidenceQueryError(f"unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}")


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)


def _as_table(result: QueryResult) -> str:
    # Escaped so a multi-line statement stays on its row.
    cells = [[_cell_text(value).replace("\r", "\\r").replace("\n", "\\n") for value in row] for row in result.rows]
    widths = [max([len(name), *(len(row[i]) for row in cells)]) for i, name in enumerate(result.columns)]
    numeric = [
        any(row[i] is not None for row in result.rows)
        and all(_is_number(row[i]) for row in result.rows if row[i] is not None)
        for i in range(len(result.columns))
    ]
    lines = [
        " | ".join(name.ljust(width) for name, width in zip(result.columns, widths, strict=True)).rstrip(),
        "-+-".join("-" * width for width in widths),
    ]
    for row in cells:
        lines.append(
            " | ".join(
                text.rjust(width) if is_number else text.ljust(width)
                for text, width, is_number in zip(row, widths, numeric, strict=True)
            ).rstrip()
        )
    count = len(result.rows)
    lines.append(f"({count} row{'' if count == 1 else 's'})")
    return "\n".join(lines) + "\n"


def _as_csv(result: QueryResult) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(result.columns)
    writer.writerows([_cell_text(value) for value in row] for row in result.rows)
    return out.getvalue()


def _as_json(result: QueryResult) -> str:
    keys = _unique_names(result.columns)
    objects = [{key: _json_value(value) for key, value in zip(keys, row, strict=True)} for row in result.rows]
    return json.dumps(objects, default=str, ensure_ascii=False, indent=2) + "\n"


def _json_value(value: Any) -> Any:
    # NaN and infinities are not JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _unique_names(columns: list[str]) -> list[str]:
    """Column names as JSON keys: a repeated name gets `_2`, `_3`... so no value is lost."""
    names: list[str] = []
    for column in columns:
        name, suffix = column, 1
        while name in names:
            suffix += 1
            name = f"{column}_{suffix}"
        names.append(name)
    return names
