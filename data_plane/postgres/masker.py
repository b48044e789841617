"""Inline masking of PostgreSQL results, sans I/O: the relay hands it the client's requests and the
server's responses in order; it answers which DataRows, CopyData rows and error fields to rewrite.

Which result a DataRow belongs to follows from the protocol's ordering: a simple Query's rows
follow its RowDescription; an Execute's rows belong to its portal, whose columns come from a
Describe of the portal or of its prepared statement (asyncpg describes the statement once and
then only binds and executes) with the Bind's result formats. A plan per result says, column by
column, what leaves the gateway: as is (no rule), masked whole (a column rule on its source
column, through views too), scanned by content detectors (no lineage), or masked whole because
the rule is strict and the result reads its table.

Results whose plan masks nothing are not touched: their DataRows stay on the relay's fast path."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from data_plane.core.masking import HASH, NULL, PARTIAL, REDACT, Masking, MaskMethod, MaskRule
from data_plane.postgres import messages as m
from data_plane.postgres import rowmask
from data_plane.postgres.catalog import CatalogSnapshot
from data_plane.postgres.classify import Unparsable, classify
from data_plane.postgres.value_masking import JSON_TYPES, JSONB, TEXT_TYPES, ValueMasker, codec_for

KEEP, COLUMN, SCAN, STRICT = 0, 1, 2, 3
FIRST_NORMAL_OID = 16384  # PostgreSQL's FirstNormalObjectId: below it, objects of initdb
_INT16 = struct.Struct("!h")
_INT32 = struct.Struct("!i")
STRICT_METHOD = MaskMethod()  # strict mode masks whole values: redaction, or NULL where text is invalid


class LineageUnknown(Exception):
    """A result arrived whose columns the gateway cannot know: it fails closed."""


@dataclass(frozen=True)
class ColumnPlan:
    action: int
    type_oid: int
    binary: bool
    label: str = ""  # the source column, or the output column's name for detectors / strict
    rule: MaskRule | None = None


@dataclass
class ResultPlan:
    columns: tuple[ColumnPlan, ...]
    statement: str
    masks: bool  # whether any column is masked or scanned
    counts: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    actions: tuple[rowmask.Action, ...] | None = None  # compiled for `rowmask.mask_rows`
    actions_encoding: str = ""

    def count(self, rule: str, target: str, method: str, path: str, n: int = 1) -> None:
        key = (rule, target, method, path)
        self.counts[key] = self.counts.get(key, 0) + n


@dataclass
class _Portal:
    statement_gen: int
    formats: tuple[int, ...]
    description: list[m.FieldDescription] | None = None


@dataclass
class _CopyOut:
    plan: ResultPlan
    csv: bool
    delimiter: str
    quote: str
    escape: str
    null: str
    header: bool
    blocked: bool = False


MaskEvent = Callable[[ResultPlan], None]
_UNKNOWN_COLUMN = ColumnPlan(SCAN, 25, False, "unknown column")  # a COPY whose columns are unknown


class ResultMasker:
    def __init__(self, masking: Masking, on_result: MaskEvent,
                 on_lineage: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        self.masking = masking
        self.on_lineage = on_lineage
        self.values = ValueMasker(masking)
        self.on_result = on_result
        self.snapshot: CatalogSnapshot | None = None
        self._gen = 0
        self._statement_gen: dict[str, int] = {}
        self._statement_text: dict[int, str] = {}
        self._statement_desc: dict[int, list[m.FieldDescription] | None] = {}
        self._portals: dict[str, _Portal] = {}
        self._expect: deque[tuple[str, Any]] = deque()
        self.current: ResultPlan | None = None
        self.copy: _CopyOut | None = None
        self._plans: dict[tuple[bytes, str], ResultPlan] = {}
        self._strict_tables: dict[str, bool] = {}
        self.changed = 0  # rows rewritten, a count for the relay
        self.copy_descriptions: dict[str, list[m.FieldDescription]] = {}  # COPY (query) → its columns
        self._tried: set[int] = set()  # table OIDs a catalog refresh did not find (temporary tables…)
        self._has_strict = any(r.strict and r.columns for r in masking.rules)
        self._recorded: set[bytes] = set()  # descriptions whose lineage is in the recording already
        self._counting: ResultPlan | None = None  # the plan whose rows are being masked (detector counts)

    # client → server ---------------------------------------------------------------------------
    def client_message(self, msg_type: int, body: bytes) -> None:
        if msg_type == 0x51:  # Query
            self._expect.append(("Q", m.parse_query(body)))
        elif msg_type == 0x50:  # Parse
            parsed = m.parse_parse(body)
            self._gen += 1
            self._statement_gen[parsed.statement] = self._gen
            self._statement_text[self._gen] = parsed.query
            self._statement_desc[self._gen] = None
        elif msg_type == 0x42:  # Bind
            bind = m.parse_bind(body)
            gen = self._statement_gen.get(bind.statement, 0)
            self._portals[bind.portal] = _Portal(gen, tuple(bind.result_formats))
        elif msg_type == 0x44:  # Describe
            kind, name = m.parse_close_or_describe(body)
            if kind == "S":
                self._expect.append(("S", self._statement_gen.get(name, 0)))
            else:
                self._expect.append(("P", self._portals.get(name)))
        elif msg_type == 0x45:  # Execute
            portal, _ = m.parse_execute(body)
            self._expect.append(("E", self._portals.get(portal)))
        elif msg_type == 0x53:  # Sync
            self._expect.append(("Z", None))
        elif msg_type == 0x43:  # Close
            kind, name = m.parse_close_or_describe(body)
            if kind == "S":
                gen = self._statement_gen.pop(name, None)
                if gen is not None:
                    self._statement_text.pop(gen, None)
                    self._statement_desc.pop(gen, None)
            else:
                self._portals.pop(name, None)
        elif msg_type == 0x46:  # FunctionCall: answered by a value, never rows
            self._expect.append(("F", None))

    # server → client: the messages that start and end results ------------------------------------
    def wait_for(self, msg_type: int, body: bytes) -> tuple[str, Any] | None:
        """What must be looked up before this server message can be handled: ("catalog", oids) for a
        RowDescription naming relations the snapshot lacks, ("describe", query) for a COPY (query)
        whose columns are unknown; None when nothing is missing."""
        if msg_type == 0x54:
            oids = {f.table_oid for f in m.parse_row_description(body) if f.table_oid}
            snapshot = self.snapshot
            # System catalogs (OIDs below FirstNormalObjectId) are not in the snapshot: no refresh for them.
            missing = sorted(o for o in oids if o >= FIRST_NORMAL_OID and o not in self._tried
                             and (snapshot is None or not snapshot.knows(o)))
            if snapshot is None or missing:
                return "catalog", missing
        elif msg_type == 0x48:
            if self.snapshot is None:
                return "catalog", []
            head = self._expect[0] if self._expect else None
            found = _parse_copy(self._head_statement(head))
            if found is not None and found[2] is not None and found[2] not in self.copy_descriptions:
                return "describe", found[2]
        return None

    def looked_up(self, job: tuple[str, Any], result: Any) -> None:
        """The outcome of a `wait_for` lookup: a fresh snapshot, or a COPY query's columns."""
        kind, subject = job
        if kind == "catalog":
            self.snapshot = result
            self._plans.clear()
            self._tried.update(o for o in subject if not result.knows(o))
        else:
            self.copy_descriptions[subject] = result or []

    def _head_statement(self, head: tuple[str, Any] | None) -> str:
        if head is not None and head[0] == "Q":
            return str(head[1])
        if head is not None and head[0] == "E" and head[1] is not None:
            return self._statement_text.get(head[1].statement_gen, "")
        return ""

    def server_message(self, msg_type: int, body: bytes) -> bytes | None:
        """A replacement for this message's whole frame, or None to relay it as is."""
        head = self._expect[0] if self._expect else None
        kind = head[0] if head else None
        if msg_type == 0x54:  # RowDescription
            description = m.parse_row_description(body)
            if kind == "S":
                self._expect.popleft()
                if head[1] in self._statement_desc:  # type: ignore[index]
                    self._statement_desc[head[1]] = description  # type: ignore[index]
            elif kind == "P":
                self._expect.popleft()
                portal = head[1]  # type: ignore[index]
                if portal is not None:
                    portal.description = description
                    if portal.statement_gen in self._statement_desc:
                        self._statement_desc[portal.statement_gen] = description
            elif kind == "Q":
                self._end_result()
                self.current = self._plan(body, description, head[1])  # type: ignore[index]
        elif msg_type == 0x6E:  # NoData: a statement without a result (an INSERT, a COPY)
            if kind == "S":
                self._expect.popleft()
                if head[1] in self._statement_desc:  # type: ignore[index]
                    self._statement_desc[head[1]] = []  # type: ignore[index]
            elif kind == "P":
                self._expect.popleft()
                if head[1] is not None:  # type: ignore[index]
                    head[1].description = []  # type: ignore[index]
        elif msg_type in (0x43, 0x49, 0x73):  # CommandComplete, EmptyQuery, PortalSuspended
            self._end_result()
            if self.copy is not None:
                blocked = self.copy.blocked
                self.copy = None
                if blocked:
                    return b""  # the client already heard the refusal in the CopyOutResponse's place
            if kind == "E":
                self._expect.popleft()
        elif msg_type == 0x48:  # CopyOutResponse
            return self._start_copy(body, head)
        elif msg_type == 0x63 and self.copy is not None and self.copy.blocked:  # CopyDone of a refused copy
            return b""
        elif msg_type == 0x45:  # ErrorResponse: in the extended protocol, everything up to Sync is skipped
            self._end_result()
            self.copy = None
            if kind not in (None, "Q", "F"):
                while self._expect and self._expect[0][0] != "Z":
                    self._expect.popleft()
            return self.mask_error(body, b"E")
        elif msg_type == 0x4E:  # NoticeResponse
            return self.mask_error(body, b"N")
        elif msg_type == 0x41:  # NotificationResponse: a trigger may NOTIFY a row's values
            return self.mask_notification(body)
        elif msg_type == 0x56:  # FunctionCallResponse: a value of unknown lineage and type
            return m.error_response("42501", "Proctor: function calls by OID are not allowed under masking rules; "
                                             "call the function in a query")
        elif msg_type == 0x5A:  # ReadyForQuery
            self._end_result()
            self.copy = None
            while self._expect:
                entry = self._expect.popleft()
                if entry[0] in ("Z", "Q", "F"):
                    break
        elif msg_type == 0x53:  # ParameterStatus
            name, value = m.parse_parameter_status(body)
            if name == "client_encoding":
                self.values.encoding = codec_for(value)
        return None

    def execute_plan(self) -> ResultPlan | None:
        """The plan of the rows that follow, for an Execute (its portal's columns)."""
        if self.current is not None or self.copy is not None or not self._expect:
            return self.current
        kind, portal = self._expect[0]
        if kind != "E":
            return None
        if portal is None:
            raise LineageUnknown("a result for a portal the gateway did not see bound")
        description = portal.description
        if description is None:
            description = self._statement_desc.get(portal.statement_gen)
            if description is None:
                raise LineageUnknown("a result whose columns were never described")
            formats = portal.formats
            description = [_with_format(f, formats, i) for i, f in enumerate(description)]
        body = _row_description_key(description)
        self.current = self._plan(body, description, self._statement_text.get(portal.statement_gen, ""))
        return self.current

    def _end_result(self) -> None:
        plan = self.current
        self.current = None
        if plan is not None and plan.counts:
            self.on_result(plan)
            plan.counts = {}
        if self.copy is not None and self.copy.plan.counts:
            self.on_result(self.copy.plan)
            self.copy.plan.counts = {}

    # plans ---------------------------------------------------------------------------------------
    def _plan(self, key: bytes, description: list[m.FieldDescription], statement: str) -> ResultPlan:
        """The plan of a result, cached by its columns (and by its statement only when a strict rule
        makes the statement's tables matter): statements whose literals differ share one plan."""
        cache_key = (key, statement if self._has_strict else "")
        cached = self._plans.get(cache_key)
        if cached is None:
            strict = self._strict_rule(statement)
            columns = tuple(self._column_plan(f, strict) for f in description)
            cached = ResultPlan(columns, statement, any(c.action != KEEP for c in columns))
            if self.on_lineage is not None and key not in self._recorded:
                self._recorded.add(key)
                self.on_lineage(self.lineage(description))
            if len(self._plans) > 1000:
                self._plans.clear()
            self._plans[cache_key] = cached
        return ResultPlan(cached.columns, statement, cached.masks, actions=cached.actions,
                          actions_encoding=cached.actions_encoding)

    def lineage(self, description: list[m.FieldDescription]) -> list[dict[str, Any]]:
        """Each column's source as the snapshot resolved it (names, never values)."""
        snapshot = self.snapshot
        out: list[dict[str, Any]] = []
        for f in description:
            entry: dict[str, Any] = {"name": f.name, "table_oid": f.table_oid, "attnum": f.column_attnum,
                                     "type_oid": f.type_oid}
            column = snapshot.column(f.table_oid, f.column_attnum) if snapshot is not None and f.table_oid else None
            if column is not None and snapshot is not None:
                relation = snapshot.relations[f.table_oid]
                entry.update(column=column.qualified, kind=relation.kind,
                             sources=[s.qualified for s in snapshot.sources(f.table_oid, f.column_attnum)])
            out.append(entry)
        return out

    def _column_plan(self, f: m.FieldDescription, strict: MaskRule | None) -> ColumnPlan:
        binary = f.format_code == 1
        snapshot = self.snapshot
        if f.table_oid and f.column_attnum > 0 and snapshot is not None:
            sources = snapshot.sources(f.table_oid, f.column_attnum)
            for source in sources:
                rule = self.masking.column_rule(source.qualified)
                if rule is not None:
                    return ColumnPlan(COLUMN, f.type_oid, binary, source.qualified, rule)
            if sources:
                return ColumnPlan(KEEP, f.type_oid, binary)
        # No lineage: an expression, a function's result, a cast, or a view's computed column.
        if strict is not None:
            return ColumnPlan(STRICT, f.type_oid, binary, f.name, strict)
        if self.masking.content_rules():
            return ColumnPlan(SCAN, f.type_oid, binary, f.name)
        return ColumnPlan(KEEP, f.type_oid, binary)

    def _strict_rule(self, statement: str) -> MaskRule | None:
        """The strict rule whose columns this statement's tables hold, if any."""
        strict_rules = [r for r in self.masking.rules if r.strict and r.columns]
        if not strict_rules or self.snapshot is None or not statement:
            return None
        try:
            tables = {t for facts in classify(statement) for t in facts.tables}
        except Unparsable:
            return strict_rules[0]  # what cannot be read is assumed to read everything
        for table in tables:
            schema, _, name = table.rpartition(".")
            relation = self.snapshot.find(name, schema or None)
            if relation is None:
                continue
            for attnum in relation.columns:
                for source in self.snapshot.sources(relation.oid, attnum):
                    for rule in strict_rules:
                        if rule.covers_column(source.qualified):
                            return rule
        return None

    # rows ----------------------------------------------------------------------------------------
    def mask_row(self, plan: ResultPlan, body: bytes) -> bytes | None:
        """One DataRow's body with its masked columns rewritten, or None when nothing changed."""
        frame = m.frame(b"D", body)
        masked = self.mask_rows(plan, frame, 0, len(frame))
        return None if masked is None else masked[5:]

    def mask_rows(self, plan: ResultPlan, buf: bytes | memoryview, start: int, stop: int) -> bytes | None:
        """The DataRows in buf[start:stop] with masked columns rewritten (one call for the run of
        rows between two other messages), or None when no value changed."""
        if plan.actions is None or plan.actions_encoding != self.values.encoding:
            plan.actions = self._compile(plan)
            plan.actions_encoding = self.values.encoding
            for cached in self._plans.values():  # results with the same columns reuse the compiled actions
                if cached.columns is plan.columns:
                    cached.actions, cached.actions_encoding = plan.actions, plan.actions_encoding
        self._counting = plan
        try:
            masked, counts = rowmask.mask_rows(buf, start, stop, plan.actions)
        except ValueError as exc:
            raise m.ProtocolViolation(str(exc)) from exc
        for column, count in zip(plan.columns, counts, strict=True):
            if count and column.action in (COLUMN, STRICT):
                rule = column.rule
                assert rule is not None
                if column.action == COLUMN:
                    plan.count(rule.name, column.label, rule.method.method, "rows", count)
                else:
                    plan.count(rule.name, f"strict:{column.label}", STRICT_METHOD.method, "rows", count)
        if masked is not None:
            self.changed += 1
        return masked

    def _compile(self, plan: ResultPlan) -> tuple[rowmask.Action, ...]:
        """Each column's action: constants and NULLs where the masked value does not depend on the
        value, partial masking in C for UTF-8 text, a Python callable for the rest."""
        actions: list[rowmask.Action] = []
        utf8 = self.values.encoding == "utf-8"
        for column in plan.columns:
            if column.action == KEEP:
                actions.append((rowmask.KEEP, None))
            elif column.action == SCAN:
                actions.append((rowmask.CALL, self._scanner(column)))
            else:
                assert column.rule is not None
                method = column.rule.method if column.action == COLUMN else STRICT_METHOD
                textual = column.type_oid in TEXT_TYPES and column.type_oid not in JSON_TYPES
                if method.method == NULL or (column.type_oid not in TEXT_TYPES and column.type_oid != JSONB):
                    actions.append((rowmask.NULL, None))
                elif textual and method.method == REDACT:
                    actions.append((rowmask.CONST, b"***"))
                elif textual and method.method == PARTIAL and utf8:
                    actions.append((rowmask.PARTIAL, method.keep_last))
                elif textual and method.method == HASH and utf8:
                    actions.append((rowmask.HASH, method.hash_key))
                else:
                    actions.append((rowmask.CALL, _whole(self.values, method, column)))
        return tuple(actions)

    def _scanner(self, column: ColumnPlan) -> Callable[[bytes], bytes | None]:
        values = self.values

        def scan(value: bytes) -> bytes | None:
            masked, hits = values.scan(value, column.type_oid, column.binary)
            plan = self._counting
            if plan is not None:
                for rule, detector in hits:
                    plan.count(rule, f"detector:{detector}", "redact" if masked is not None else NULL, "rows")
            return masked if hits else value

        return scan

    def _mask_value(self, plan: ResultPlan, column: ColumnPlan, value: bytes, path: str) -> bytes | None:
        if column.action == COLUMN:
            rule = column.rule
            assert rule is not None
            plan.count(rule.name, column.label, rule.method.method, path)
            return self.values.whole(value, rule.method, column.type_oid, column.binary)
        if column.action == STRICT:
            rule = column.rule
            assert rule is not None
            plan.count(rule.name, f"strict:{column.label}", STRICT_METHOD.method, path)
            return self.values.whole(value, STRICT_METHOD, column.type_oid, column.binary)
        masked, hits = self.values.scan(value, column.type_oid, column.binary)
        for rule, detector in hits:
            plan.count(rule, f"detector:{detector}", "redact" if masked is not None else NULL, path)
        return masked if hits else value

    # COPY TO STDOUT --------------------------------------------------------------------------------
    def _start_copy(self, body: bytes, head: tuple[str, Any] | None) -> bytes | None:
        statement = self._head_statement(head)
        binary = body[:1] == b"\x01"
        plan, options = self.copy_plan(statement)
        if plan is None or not plan.masks:
            return None
        copy = _CopyOut(plan, **options)
        self.copy = copy
        if binary:
            copy.blocked = True
            return m.error_response("42501", "Proctor: binary COPY of a result with masked columns is not "
                                             "allowed; use COPY … TO STDOUT in text or CSV format")
        return None

    def copy_plan(self, statement: str) -> tuple[ResultPlan | None, dict[str, Any]]:
        """The columns of a `COPY table [(columns)] TO STDOUT` from the catalog, or of a
        `COPY (query)` from the description the relay asked for, with the COPY's options."""
        found = _parse_copy(statement)
        if found is None:
            return None, {}
        relation_name, attlist, query, options = found
        snapshot = self.snapshot
        description: list[m.FieldDescription] | None = None
        if relation_name is not None and snapshot is not None:
            schema, _, name = relation_name.rpartition(".")
            relation = snapshot.find(name, schema or None)
            if relation is not None:
                columns = [(n, c) for n, c in sorted(relation.columns.items())
                           if not attlist or c.name in attlist]
                if attlist:
                    columns.sort(key=lambda item: attlist.index(item[1].name))
                description = [m.FieldDescription(c.name, relation.oid, n, c.type_oid, -1, -1, 0)
                               for n, c in columns]
        elif query is not None:
            description = self.copy_descriptions.get(query)
        if description is None:
            # Unknown columns: every value is treated as having no lineage.
            return ResultPlan((), statement, bool(self.masking.content_rules()) or any(
                r.strict for r in self.masking.rules)), options
        strict = self._strict_rule(statement)
        cols = tuple(self._column_plan(f, strict) for f in description)
        return ResultPlan(cols, statement, any(c.action != KEEP for c in cols)), options

    def mask_copy_row(self, body: bytes) -> bytes | None:
        """A CopyData row of a masked COPY OUT rewritten; None when unchanged, b"" to drop it."""
        copy = self.copy
        if copy is None:
            return None
        if copy.blocked:
            return b""
        if copy.header:
            copy.header = False
            return None
        plan = copy.plan
        encoding = self.values.encoding
        text = body.decode(encoding, errors="replace")
        line = text[:-1] if text.endswith("\n") else text
        if copy.csv:
            fields = _split_csv(line, copy.delimiter, copy.quote, copy.escape, copy.null)
        else:
            fields = [(raw, raw == copy.null, raw) for raw in line.split(copy.delimiter)]
        changed = False
        out: list[str] = []
        for index, (value, is_null, raw) in enumerate(fields):
            column = plan.columns[index] if index < len(plan.columns) else _UNKNOWN_COLUMN
            if column.action == KEEP or is_null:
                out.append(raw)
                continue
            if not copy.csv:
                value = _unescape_text(value)
            masked = self._mask_value(plan, column, value.encode(encoding), "copy")
            if masked is None:
                out.append(copy.null)
                changed = True
                continue
            new = masked.decode(encoding)
            if new == value:
                out.append(raw)
                continue
            changed = True
            out.append(_csv_quote(new, copy) if copy.csv else _escape_text(new, copy.delimiter))
        if not changed:
            return None
        self.changed += 1
        return (copy.delimiter.join(out) + "\n").encode(encoding)

    # errors and notices ------------------------------------------------------------------------------
    def mask_error(self, body: bytes, msg_type: bytes) -> bytes | None:
        """An ErrorResponse or NoticeResponse with values it echoes masked (a unique violation's
        `Key (email)=(…)`, a check violation's `Failing row contains (…)`, detectors' matches)."""
        fields = _error_field_list(body)
        table = next((v for k, v in fields if k == "t"), None)
        schema = next((v for k, v in fields if k == "s"), None)
        masked_columns = self._masked_columns(schema, table) if table else set()
        changed = False
        plan = ResultPlan((), "", True)
        out: list[tuple[str, str]] = []
        for key, value in fields:
            new = value
            if key == "D" and table and masked_columns:
                new = _mask_key_detail(new, masked_columns)
            if key in "MDHWq" and self.masking.content_rules():
                new, hits = self.masking.scan(new)
                for rule, detector in hits:
                    plan.count(rule, f"detector:{detector}", "redact", "error")
            if new != value:
                changed = True
                if not plan.counts:
                    plan.count("error-values", f"{schema}.{table}" if table else "error", "redact", "error")
            out.append((key, new))
        if not changed:
            return None
        self.on_result(plan)
        return m.frame(msg_type, b"".join(k.encode() + v.encode() + b"\x00" for k, v in out) + b"\x00")

    def mask_notification(self, body: bytes) -> bytes | None:
        """A NOTIFY payload with what the content detectors find masked."""
        if not self.masking.content_rules():
            return None
        reader = m.Reader(body)
        pid = reader.int32()
        channel = reader.cstring()
        payload = reader.cstring()
        masked, hits = self.masking.scan(payload)
        if not hits:
            return None
        plan = ResultPlan((), f"NOTIFY {channel}", True)
        for rule, detector in hits:
            plan.count(rule, f"detector:{detector}", "redact", "notify")
        self.on_result(plan)
        return m.frame(b"A", struct.pack("!i", pid) + m.cstring(channel) + m.cstring(masked))

    def _masked_columns(self, schema: str | None, table: str) -> set[str]:
        snapshot = self.snapshot
        relation = snapshot.find(table, schema) if snapshot is not None else None
        if relation is None:
            return set()
        return {c.name for n, c in relation.columns.items()
                if any(self.masking.column_rule(s.qualified) for s in snapshot.sources(relation.oid, n))}  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _whole(values: ValueMasker, method: MaskMethod, column: ColumnPlan) -> Callable[[bytes], bytes | None]:
    return lambda value: values.whole(value, method, column.type_oid, column.binary)


def _with_format(f: m.FieldDescription, formats: tuple[int, ...], index: int) -> m.FieldDescription:
    fmt = formats[0] if len(formats) == 1 else (formats[index] if index < len(formats) else 0)
    return m.FieldDescription(f.name, f.table_oid, f.column_attnum, f.type_oid, f.type_size, f.type_modifier, fmt)


def _row_description_key(description: Iterable[m.FieldDescription]) -> bytes:
    return repr([(f.table_oid, f.column_attnum, f.type_oid, f.format_code, f.name) for f in description]).encode()


def _error_field_list(body: bytes) -> list[tuple[str, str]]:
    fields = []
    for part in body.split(b"\x00"):
        if part:
            fields.append((chr(part[0]), part[1:].decode("utf-8", errors="replace")))
    return fields


def _mask_key_detail(detail: str, masked: set[str]) -> str:
    """`Key (a, b)=(1, x@y.z) already exists.` with the values hidden when a key column is masked;
    `Failing row contains (…)` hidden whole when the table has masked columns."""
    if detail.startswith("Key (") and ")=(" in detail:
        columns = detail[5:detail.index(")=(")]
        if any(c.strip().strip('"') in masked for c in columns.split(",")):
            end = detail.rfind(")")
            return detail[:detail.index(")=(") + 3] + "***" + detail[end:]
    if detail.startswith("Failing row contains ("):
        return "Failing row contains (***)."
    return detail


def _parse_copy(text: str) -> tuple[str | None, list[str], str | None, dict[str, Any]] | None:
    """(relation, column list, inner query, options) of a `COPY … TO STDOUT`, or None."""
    import pglast

    try:
        statements = pglast.parse_sql(text)
    except pglast.parser.ParseError:
        return None
    if len(statements) != 1 or not isinstance(statements[0].stmt, pglast.ast.CopyStmt):
        return None
    copy = statements[0].stmt
    if copy.is_from:
        return None
    options: dict[str, Any] = {"csv": False, "delimiter": "\t", "quote": '"', "escape": "", "null": "\\N",
                               "header": False}
    for option in copy.options or ():
        name = option.defname.lower()
        value = getattr(option.arg, "sval", None) if option.arg is not None else None
        if name == "format":
            options["csv"] = (value or "").lower() == "csv"
        elif name in ("delimiter", "quote", "escape", "null") and value is not None:
            options[name] = value
        elif name == "header":
            options["header"] = value is None or str(value).lower() not in ("false", "off", "0")
    if options["csv"]:
        if options["delimiter"] == "\t" and not any(o.defname.lower() == "delimiter" for o in copy.options or ()):
            options["delimiter"] = ","
        if options["null"] == "\\N" and not any(o.defname.lower() == "null" for o in copy.options or ()):
            options["null"] = ""
        options["escape"] = options["escape"] or options["quote"]
    else:
        options["header"] = False
    if copy.relation is not None:
        relation = copy.relation
        name = f"{relation.schemaname}.{relation.relname}" if relation.schemaname else relation.relname
        attlist = [a.sval for a in copy.attlist or ()]
        return name, attlist, None, options
    from pglast.stream import RawStream

    return None, [], RawStream()(copy.query), options


def _unescape_text(field: str) -> str:
    if "\\" not in field:
        return field
    out, i = [], 0
    escapes = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
    while i < len(field):
        char = field[i]
        if char == "\\" and i + 1 < len(field):
            out.append(escapes.get(field[i + 1], field[i + 1]))
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def _escape_text(value: str, delimiter: str) -> str:
    return (value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            .replace(delimiter, "\\" + delimiter if delimiter != "\t" else "\\t"))


def _split_csv(line: str, delimiter: str, quote: str, escape: str, null: str = "") -> list[tuple[str, bool, str]]:
    """CSV fields as (value, is NULL, the field as sent): PostgreSQL tells NULL (the unquoted
    null string) from '' (quoted)."""
    fields: list[tuple[str, bool, str]] = []
    i, n = 0, len(line)
    while True:
        begin = i
        if i < n and line[i] == quote:
            i += 1
            value: list[str] = []
            while i < n:
                char = line[i]
                if char == escape and i + 1 < n and line[i + 1] == quote and escape != quote:
                    value.append(quote)
                    i += 2
                elif char == quote:
                    if escape == quote and i + 1 < n and line[i + 1] == quote:
                        value.append(quote)
                        i += 2
                    else:
                        i += 1
                        break
                else:
                    value.append(char)
                    i += 1
            end = line.find(delimiter, i)
            fields.append(("".join(value), False, line[begin:] if end < 0 else line[begin:end]))
        else:
            end = line.find(delimiter, i)
            raw = line[i:] if end < 0 else line[i:end]
            fields.append((raw, raw == null, raw))
        if end < 0:
            return fields
        i = end + len(delimiter)


def _csv_quote(value: str, copy: _CopyOut) -> str:
    quote, escape = copy.quote, copy.escape
    if value == "" or any(c in value for c in (copy.delimiter, quote, "\n", "\r")) or value == copy.null:
        return quote + value.replace(quote, escape + quote) + quote
    return value
