"""Where a result column comes from: PostgreSQL's catalog, read on the gateway's own backend
connection and cached per target database.

A RowDescription names each output column's source as (table OID, attribute number) when the
column is a plain column reference, through aliases too; through a view it names the view's
column. The snapshot maps those pairs to `schema.table.column` and maps view columns to the base
columns they read (the view's definition parsed with pglast, views of views followed), so masking
rules written against tables also hold for views over them.

One snapshot per (target, database) is shared by the sessions of a gateway process; it is
refreshed when it is older than `ttl` or when a result names a relation it does not know (a table
created since), at most once per `min_refresh` seconds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pglast

from data_plane.core.stream import Stream
from data_plane.postgres import messages as m

log = logging.getLogger("proctor.gateway.catalog")

COLUMNS_SQL = """SELECT c.oid, a.attnum, n.nspname, c.relname, a.attname, c.relkind, a.atttypid
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'
ORDER BY c.oid, a.attnum"""
VIEWS_SQL = """SELECT c.oid, pg_catalog.pg_get_viewdef(c.oid)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')"""
MAX_VIEW_DEPTH = 16


@dataclass(frozen=True)
class Column:
    schema: str
    table: str
    name: str
    type_oid: int

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.table}.{self.name}"


@dataclass
class Relation:
    oid: int
    schema: str
    name: str
    kind: str  # r table, p partitioned, v view, m materialized view, f foreign
    columns: dict[int, Column] = field(default_factory=dict)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


class CatalogSnapshot:
    """Relations and their columns at one point in time, with view columns traced to base columns."""

    def __init__(self, relations: dict[int, Relation], view_defs: dict[int, str], taken_at: float) -> None:
        self.relations = relations
        self.taken_at = taken_at
        self._by_name: dict[str, list[Relation]] = {}
        for relation in relations.values():
            self._by_name.setdefault(relation.name, []).append(relation)
        self._view_defs = view_defs
        self._sources: dict[tuple[int, int], tuple[Column, ...]] = {}

    # lookups -------------------------------------------------------------------------------
    def column(self, table_oid: int, attnum: int) -> Column | None:
        relation = self.relations.get(table_oid)
        return relation.columns.get(attnum) if relation is not None else None

    def knows(self, table_oid: int) -> bool:
        return table_oid in self.relations

    def find(self, name: str, schema: str | None = None, prefer: Iterable[str] = ("public",)) -> Relation | None:
        """A relation by name: the schema named, else the preferred schemas, else the only one of that name."""
        candidates = self._by_name.get(name, [])
        if schema is not None:
            return next((r for r in candidates if r.schema == schema), None)
        for preferred in prefer:
            found = next((r for r in candidates if r.schema == preferred), None)
            if found is not None:
                return found
        return candidates[0] if len(candidates) == 1 else None

    def sources(self, table_oid: int, attnum: int) -> tuple[Column, ...]:
        """The base-table columns an output column reads: itself for a table's column, the columns a
        view's column references (several across UNION branches), () for a view's expression."""
        key = (table_oid, attnum)
        cached = self._sources.get(key)
        if cached is None:
            cached = self._trace(table_oid, attnum, 0)
            self._sources[key] = cached
        return cached

    def _trace(self, table_oid: int, attnum: int, depth: int) -> tuple[Column, ...]:
        relation = self.relations.get(table_oid)
        if relation is None:
            return ()
        column = relation.columns.get(attnum)
        if column is None:
            return ()
        if relation.kind not in ("v", "m"):
            return (column,)
        if depth >= MAX_VIEW_DEPTH:
            return ()
        found: list[Column] = []
        for base in _view_column_refs(self, relation, attnum, self._view_defs.get(table_oid, "")):
            found += self._trace(base[0], base[1], depth + 1)
        return tuple(dict.fromkeys(found))


# ------------------------------------------------------------------------------------------------
# views → base columns
# ------------------------------------------------------------------------------------------------


def _view_column_refs(snapshot: CatalogSnapshot, view: Relation, attnum: int,
                      definition: str) -> list[tuple[int, int]]:
    """(relation oid, attnum) of the plain column references that the view's output column
    `attnum` is, in each branch of its query; expressions yield nothing (no lineage)."""
    if not definition:
        return []
    try:
        statements = pglast.parse_sql(definition)
    except pglast.parser.ParseError:
        return []
    if not statements:
        return []
    refs: list[tuple[int, int]] = []
    for select in _branches(statements[0].stmt):
        targets = select.targetList or ()
        if attnum - 1 >= len(targets):
            continue
        value = targets[attnum - 1].val
        if not isinstance(value, pglast.ast.ColumnRef):
            continue
        names = [getattr(f, "sval", None) for f in value.fields]
        if None in names:
            continue
        scope = _from_scope(snapshot, select.fromClause or (), view.schema)
        resolved = _resolve(scope, names)  # type: ignore[arg-type]
        if resolved is not None:
            refs.append(resolved)
    return refs


def _branches(node: object) -> list[pglast.ast.SelectStmt]:
    if not isinstance(node, pglast.ast.SelectStmt):
        return []
    if node.op is not None and getattr(node.op, "name", str(node.op)) != "SETOP_NONE":
        return _branches(node.larg) + _branches(node.rarg)
    return [node]


def _from_scope(snapshot: CatalogSnapshot, items: Iterable[object], schema: str) -> dict[str, Relation]:
    """Alias (or name) → relation for the plain relations of a FROM clause, joins included."""
    scope: dict[str, Relation] = {}
    for item in items:
        if isinstance(item, pglast.ast.RangeVar):
            relation = snapshot.find(item.relname, item.schemaname, prefer=(schema, "public"))
            if relation is not None:
                alias = item.alias.aliasname if item.alias is not None else item.relname
                scope[alias] = relation
        elif isinstance(item, pglast.ast.JoinExpr):
            scope.update(_from_scope(snapshot, (item.larg, item.rarg), schema))
    return scope


def _resolve(scope: dict[str, Relation], names: list[str]) -> tuple[int, int] | None:
    if len(names) == 1:
        owners = [r for r in scope.values() if any(c.name == names[0] for c in r.columns.values())]
        if len(owners) != 1:
            return None
        relation, column_name = owners[0], names[0]
    else:
        relation = scope.get(names[-2])
        column_name = names[-1]
        if relation is None:
            return None
    for attnum, column in relation.columns.items():
        if column.name == column_name:
            return relation.oid, attnum
    return None


# ------------------------------------------------------------------------------------------------
# reading the catalog
# ------------------------------------------------------------------------------------------------

QueryRunner = Callable[[list[str]], Awaitable[list[list[list[str | None]]]]]


def build_snapshot(column_rows: list[list[str | None]], view_rows: list[list[str | None]]) -> CatalogSnapshot:
    relations: dict[int, Relation] = {}
    for oid, attnum, schema, table, name, kind, type_oid in column_rows:
        key = int(oid)  # type: ignore[arg-type]
        relation = relations.get(key)
        if relation is None:
            relation = relations[key] = Relation(key, str(schema), str(table), str(kind))
        relation.columns[int(attnum)] = Column(str(schema), str(table), str(name), int(type_oid))  # type: ignore[arg-type]
    views = {int(oid): str(definition or "") for oid, definition in view_rows}  # type: ignore[arg-type]
    return CatalogSnapshot(relations, views, time.monotonic())


async def simple_query_rows(stream: Stream, queries: list[str], *,
                            max_message: int = 1 << 26) -> list[list[list[str | None]]]:
    """Run simple queries on a connection that is ready for a query; each query's rows as text."""
    from data_plane.postgres.backend import read_message

    results: list[list[list[str | None]]] = []
    for sql in queries:
        stream.write(m.query(sql))
        await stream.drain()
        rows: list[list[str | None]] = []
        error: dict[str, str] | None = None
        while True:
            msg_type, body = await read_message(stream, max_message)
            if msg_type == b"D":
                rows.append([None if v is None else v.decode() for v in m.parse_data_row(body)])
            elif msg_type == b"E":
                error = m.error_fields(body)
            elif msg_type == b"Z":
                break
        if error is not None:
            raise CatalogUnavailable(f"catalog query failed: {error.get('C')} {error.get('M')}")
        results.append(rows)
    return results


class CatalogUnavailable(Exception):
    pass


async def describe_query(stream: Stream, query: str, *,
                         max_message: int = 1 << 26) -> list[m.FieldDescription] | None:
    """The columns a query would return (Parse and Describe, never executed); None when the
    server refuses to parse it."""
    from data_plane.postgres.backend import read_message

    stream.write(m.frame(b"P", m.cstring("") + m.cstring(query) + b"\x00\x00")
                 + m.frame(b"D", b"S\x00") + m.frame(b"S"))
    await stream.drain()
    description: list[m.FieldDescription] | None = None
    while True:
        msg_type, body = await read_message(stream, max_message)
        if msg_type == b"T":
            description = m.parse_row_description(body)
        elif msg_type == b"n":
            description = []
        elif msg_type == b"Z":
            return description


class Catalog:
    """The cached snapshot of one target database, refreshed through `runner` (which opens the
    gateway's own backend connection and runs the catalog queries)."""

    def __init__(self, *, ttl: float = 300.0, min_refresh: float = 2.0) -> None:
        self.ttl = ttl
        self.min_refresh = min_refresh
        self.snapshot: CatalogSnapshot | None = None
        self._refreshing: asyncio.Future[CatalogSnapshot] | None = None
        self._last_attempt = 0.0

    def fresh(self) -> CatalogSnapshot | None:
        snapshot = self.snapshot
        if snapshot is None or time.monotonic() - snapshot.taken_at > self.ttl:
            return None
        return snapshot

    async def get(self, runner: QueryRunner, *, missing: Iterable[int] = (),
                  waited: bool = False) -> CatalogSnapshot:
        """The snapshot: the cached one while fresh, unless a result named relations it lacks
        (`missing`): then a fresh one, read no sooner than `min_refresh` seconds after the last
        read (a relation created just after it must still be found; the catalog is not read more
        often than that however many sessions ask)."""
        snapshot = self.fresh()
        if snapshot is not None:
            if all(snapshot.knows(oid) for oid in missing):
                return snapshot
            wait = self.min_refresh - (time.monotonic() - self._last_attempt)
            if wait > 0 and self._refreshing is None and not waited:
                await asyncio.sleep(wait)
                return await self.get(runner, missing=missing, waited=True)
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._load(runner))
        refreshing = self._refreshing
        try:
            return await asyncio.shield(refreshing)
        finally:
            if self._refreshing is refreshing and refreshing.done():
                self._refreshing = None

    async def _load(self, runner: QueryRunner) -> CatalogSnapshot:
        self._last_attempt = time.monotonic()
        column_rows, view_rows = await runner([COLUMNS_SQL, VIEWS_SQL])
        snapshot = build_snapshot(column_rows, view_rows)
        self.snapshot = snapshot
        log.info("catalog snapshot: %d relations", len(snapshot.relations))
        return snapshot


class Catalogs:
    """One Catalog per (target, database) in this gateway process (`CATALOGS`)."""

    def __init__(self) -> None:
        self._catalogs: dict[tuple[str, str], Catalog] = {}

    def for_database(self, target: str, database: str) -> Catalog:
        key = (target, database)
        catalog = self._catalogs.get(key)
        if catalog is None:
            catalog = self._catalogs[key] = Catalog()
        return catalog


CATALOGS = Catalogs()


def snapshot_from_lineage(entries: Iterable[dict[str, Any]]) -> CatalogSnapshot:
    """A snapshot rebuilt from the lineage a gateway recorded (the columns its results named and
    the base columns they trace to), for applying newer rules to an old session offline."""
    relations: dict[int, Relation] = {}
    traced: dict[tuple[int, int], tuple[Column, ...]] = {}

    def column_of(qualified: str, type_oid: int) -> Column:
        schema, table, name = qualified.split(".", 2)
        return Column(schema, table, name, type_oid)

    for entry in entries:
        qualified = entry.get("column")
        oid, attnum = int(entry.get("table_oid") or 0), int(entry.get("attnum") or 0)
        if not qualified or not oid:
            continue
        column = column_of(qualified, int(entry.get("type_oid") or 0))
        relation = relations.setdefault(oid, Relation(oid, column.schema, column.table, str(entry.get("kind") or "r")))
        relation.columns[attnum] = column
        traced[(oid, attnum)] = tuple(column_of(s, 0) for s in entry.get("sources") or ())
    snapshot = CatalogSnapshot(relations, {}, time.monotonic())
    snapshot._sources.update(traced)
    return snapshot
