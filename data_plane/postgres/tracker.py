"""Statement bookkeeping for one PostgreSQL session: requests and responses in, Statement
records out. Responses come back in request order, so a FIFO of request groups (a simple Query,
or the extended-protocol messages up to a Sync) is enough to pair them, pipelines included."""

from __future__ import annotations

import dataclasses
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

from control_plane.contract import EventTemplate, c_row_parts
from data_plane.core.guardrails import Verdict
from data_plane.core.redact import might_hold_secret, redact_conninfo, redact_statement
from data_plane.core.session import Statement
from data_plane.postgres import messages as m
from data_plane.postgres.framescan import FrameEvent

MAX_PARAMETER_CHARS = 1024
_UNJUDGED: tuple[str, Verdict | None] = ("<unknown prepared statement>", None)
# Server messages the bookkeeping decodes: CommandComplete, ErrorResponse, ReadyForQuery,
# EmptyQueryResponse, PortalSuspended, ParameterDescription.
SERVER_DECODED = frozenset(b"CEZIst")


class _Group:
    __slots__ = ("cursor", "described", "failed", "parse_text", "parse_verdict", "simple", "statements")

    def __init__(self, simple: bool, statements: list[Statement] | None = None) -> None:
        self.simple = simple
        self.statements: list[Statement] = [] if statements is None else statements
        self.cursor = 0  # the statement the next response belongs to
        self.parse_text: str | None = None  # the last Parse of the group, for an error before any Execute
        self.failed = False
        self.parse_verdict: Verdict | None = None
        self.described: list[str] | None = None  # statements whose ParameterDescription is due

    def current(self) -> Statement | None:
        return self.statements[self.cursor] if self.cursor < len(self.statements) else None


_BINARY_DECODERS = {
    16: lambda v: "true" if v == b"\x01" else "false",
    20: lambda v: str(int.from_bytes(v, "big", signed=True)),
    21: lambda v: str(int.from_bytes(v, "big", signed=True)),
    23: lambda v: str(int.from_bytes(v, "big", signed=True)),
    700: lambda v: repr(struct.unpack("!f", v)[0]),
    701: lambda v: repr(struct.unpack("!d", v)[0]),
    2950: lambda v: str(uuid.UUID(bytes=v)),
    **dict.fromkeys((25, 1042, 1043, 19, 114), lambda v: v.decode("utf-8", errors="replace")),
}


def _parameter(value: bytes | None, fmt: int, type_oid: int) -> str | None:
    """A bound parameter as text for the evidence: text-format values as sent, common binary
    types decoded when the Parse named them, anything else as hex."""
    if value is None:
        return None
    if fmt == 0:
        text = value.decode("utf-8", errors="replace")
        # The raw bytes hint as the decoded text would: only non-ASCII bytes can differ.
        secret = might_hold_secret(value)
    else:
        try:
            text = _BINARY_DECODERS[type_oid](value)
        except (KeyError, ValueError, struct.error):
            text = "\\x" + value.hex()
        secret = might_hold_secret(text.encode())
    if secret:
        text = redact_conninfo(text)
    return text if len(text) <= MAX_PARAMETER_CHARS else text[:MAX_PARAMETER_CHARS] + "…"


class StatementTracker:
    __slots__ = ("_copy_in", "_first", "_open", "_since_tag", "groups", "judged", "on_complete", "portals",
                 "prepared", "record_parameters")

    def __init__(self, on_complete: Callable[[Statement], None], *, record_parameters: bool = True) -> None:
        self.on_complete = on_complete
        self.record_parameters = record_parameters
        self.prepared: dict[str, m.Parse] = {}
        # Per prepared statement: its text as the evidence shows it (secrets redacted, once per Parse
        # rather than per Execute) and the guardrails' verdict.
        self.judged: dict[str, tuple[str, Verdict | None]] = {}
        self.portals: dict[str, tuple[str, m.Bind]] = {}
        # The FIFO of groups awaiting their answers: groups[_first:]. A list emptied whenever the
        # last answer arrives holds no storage at all while the session is idle (a deque keeps a block).
        self.groups: list[_Group] = []
        self._first = 0
        self._open: _Group | None = None  # extended-protocol group awaiting its Sync
        self._copy_in: Statement | None = None
        self._since_tag = 0

    # client → server -----------------------------------------------------------------------------
    def _extended_group(self) -> _Group:
        if self._open is None:
            self._open = _Group(simple=False)
            self.groups.append(self._open)
        return self._open

    def _pop_group(self) -> _Group:
        groups = self.groups
        group = groups[self._first]
        self._first += 1
        if self._first == len(groups):
            groups.clear()
            self._first = 0
        return group

    def client_message(self, msg_type: int, body: bytes, verdict: Verdict | None = None,
                       text: str | None = None) -> None:
        """`verdict`: the guardrails' judgement of a Query, Parse or FunctionCall, when one applied;
        `text`: a Query's text when the caller decoded it already."""
        if msg_type == 0x51:  # Q
            query = m.parse_query(body) if text is None else text
            group = _Group(simple=True, statements=[Statement(redact_statement(query), verdict=verdict)])
            self.groups.append(group)
            self._copy_in = group.statements[0]
        elif msg_type == 0x50:  # P
            parsed = m.parse_parse(body)
            self.prepared[parsed.statement] = parsed
            self.judged[parsed.statement] = (redact_statement(parsed.query), verdict)
            group = self._extended_group()
            group.parse_text = parsed.query
            group.parse_verdict = verdict
        elif msg_type == 0x42:  # B
            bind = m.parse_bind(body)
            self.portals[bind.portal] = (bind.statement, bind)
            self._extended_group()
        elif msg_type == 0x45:  # E
            portal, _ = m.parse_execute(body)
            statement_name, bind = self.portals.get(portal, ("", None))
            parsed = self.prepared.get(statement_name)
            recorded, prepared_verdict = self.judged.get(statement_name, _UNJUDGED)
            params = None
            if self.record_parameters and bind is not None:
                types = parsed.param_types if parsed else ()
                params = [_parameter(v, bind.param_format(i), types[i] if i < len(types) else 0)
                          for i, v in enumerate(bind.params)]
            statement = Statement(recorded if parsed else "<unknown prepared statement>", parameters=params,
                                  verdict=prepared_verdict)
            self._extended_group().statements.append(statement)
            self._copy_in = statement
        elif msg_type == 0x53:  # S
            self._extended_group()
            self._open = None
        elif msg_type == 0x46:  # F
            oid = m.parse_function_call(body)
            self.groups.append(_Group(simple=True, statements=[
                Statement(f"<function call {oid}>", kind="function", verdict=verdict)]))
        elif msg_type == 0x43:  # C (Close)
            kind, name = m.parse_close_or_describe(body)
            if kind == "S":
                self.prepared.pop(name, None)
                self.judged.pop(name, None)
            else:
                self.portals.pop(name, None)
            self._extended_group()
        elif msg_type == 0x44:  # D (Describe): its answer comes within the group
            kind, name = m.parse_close_or_describe(body)
            group = self._extended_group()
            if kind == "S":
                if group.described is None:
                    group.described = []
                group.described.append(name)

    def client_copy_bytes(self, count: int) -> None:
        if self._copy_in is not None:
            self._copy_in.bytes += count

    # server → client -----------------------------------------------------------------------------
    def _current(self) -> Statement | None:
        """The statement the next response belongs to."""
        if not self.groups:
            return None
        group = self.groups[self._first]
        return group.statements[group.cursor] if group.cursor < len(group.statements) else None

    def rows(self, count: int) -> None:
        """DataRows (or CopyData) relayed since the last response that closed a command."""
        self._since_tag += count

    def server_frames(self, chunk: bytes, events: Sequence[FrameEvent], end: int, trailing: int, now: float,
                      notable: Callable[[int, int, int, Statement | None], None]) -> None:
        """One read from the server, as the relay's fast path feeds it: `events` from scan_frames
        (DataRows and CopyData skipped, so counted as rows), `end` just past the last whole frame.
        The same bookkeeping as `rows`, `server_bytes` and `server_message` per frame, in one call.
        `notable(type, offset, size, statement)` hears of the frames the relay acts on, in order, before
        any later frame completes a statement: each ErrorResponse with the statement it answers (or
        None), each ParameterStatus."""
        pos = rows = 0
        for msg_type, offset, size, skipped in events:
            rows += skipped
            if msg_type in SERVER_DECODED:
                if rows:
                    self._since_tag += rows
                    rows = 0
                # Bytes up to and including this message belong to the statement it answers.
                frame_end = offset + size
                statement = self._current()
                if statement is not None:
                    statement.bytes += frame_end - pos
                pos = frame_end
                answered = self.server_message(msg_type, chunk[offset + 5:frame_end], now)
                if msg_type == 0x45:
                    notable(msg_type, offset, size, answered)
            elif msg_type == 0x53:  # ParameterStatus
                notable(msg_type, offset, size, None)
        rows += trailing
        if rows:
            self._since_tag += rows
        if end > pos:
            statement = self._current()
            if statement is not None:
                statement.bytes += end - pos

    def _take_rows(self, statement: Statement | None, tagged: int | None = None) -> None:
        # A command's rows: its tag's count when it has one (SELECT, COPY, INSERT … RETURNING
        # send both rows and a count), else the rows relayed.
        if statement is not None:
            statement.rows += max(self._since_tag, tagged or 0)
        self._since_tag = 0

    def server_bytes(self, count: int) -> None:
        statement = self._current()
        if statement is not None:
            statement.bytes += count

    def server_message(self, msg_type: int, body: bytes, now: float) -> Statement | None:
        """Returns the statement an ErrorResponse answers (the relay may rewrite that error)."""
        if not self.groups:
            return None
        group = self.groups[self._first]
        statement = group.statements[group.cursor] if group.cursor < len(group.statements) else None
        if msg_type == 0x43:  # C CommandComplete
            tag = m.parse_command_complete(body)
            if statement is None:
                self._since_tag = 0
                return
            self._take_rows(statement, m.rows_from_tag(tag))
            if group.simple:
                statement.command_tag = tag if statement.command_tag is None else f"{statement.command_tag}; {tag}"
            else:
                statement.command_tag = tag
                self._finish_current(group, now)
        elif msg_type in (0x49, 0x73):  # I EmptyQueryResponse, s PortalSuspended
            self._take_rows(statement)
            if statement is not None and not group.simple:
                statement.command_tag = "" if msg_type == 0x49 else "PORTAL SUSPENDED"
                self._finish_current(group, now)
            elif statement is not None and msg_type == 0x49:
                statement.command_tag = statement.command_tag or ""
        elif msg_type == 0x45:  # E ErrorResponse
            fields = m.error_fields(body)
            self._take_rows(statement)
            if statement is None and not group.simple and not group.failed:
                # The error answers a Parse/Bind before any Execute of this group.
                statement = Statement(redact_statement(group.parse_text or "<unknown>"), kind="parse",
                                      verdict=group.parse_verdict)
                group.statements.append(statement)
            if statement is not None:
                statement.sqlstate = fields.get("C")
                statement.error = fields.get("M")
                if not group.simple:
                    self._finish_current(group, now)
                    for later in group.statements[group.cursor:]:
                        later.skipped = True
                    group.failed = True
            return statement
        elif msg_type == 0x74:  # t ParameterDescription: the types a binary parameter decodes by
            if group.described:
                name = group.described.pop(0)
                parsed = self.prepared.get(name)
                if parsed is not None:
                    self.prepared[name] = m.Parse(parsed.statement, parsed.query, m.parse_parameter_description(body))
        elif msg_type == 0x5A:  # Z ReadyForQuery
            self._take_rows(statement)
            self._pop_group()
            if statement is not None:  # statements still open: a simple query's, or skipped after an error
                for pending in group.statements[group.cursor:]:
                    if not group.simple and pending.finished_mono is None and pending.sqlstate is None:
                        pending.skipped = pending.skipped or group.failed
                    pending.finished_mono = pending.finished_mono or now
            for statement in group.statements:
                self.on_complete(statement)
            self._copy_in = None

    def restore(self, state: Mapping[str, Any]) -> None:
        """Carry on where the C data path's tracker stopped (data_plane.postgres.fastpath hands a
        session back): its prepared statements, portals and groups in flight, verdicts included, as
        _fastrelay exports them (strings JSON-escaped, as pgtrack.h keeps them; verdicts as
        verdict_fields made them)."""
        for name, query, types, verdict in state["prepared"]:
            self.prepared[name] = m.Parse(name, query, tuple(types))
            self.judged[name] = (query, _verdict(verdict))  # the C path relays no statement a secret could be in
        for name, statement, bind in state["portals"]:
            self.portals[name] = (statement, m.parse_bind(bind))
        groups: list[_Group] = []
        for doc in state["groups"]:
            group = _Group(simple=doc["simple"], statements=[_statement(s) for s in doc["statements"]])
            group.cursor = doc["cursor"]
            group.failed = doc["failed"]
            group.parse_text = _unescape(doc["parse_text"])
            group.parse_verdict = _verdict(doc["parse_verdict"])
            group.described = list(doc["described"]) or None
            groups.append(group)
        self.groups = groups
        self._first = 0
        opened = state["open"]
        self._open = (groups[opened] if isinstance(opened, int) else
                      _Group(simple=False) if opened == "detached" else None)
        copy = state["copy"]
        self._copy_in = (groups[copy[0]].statements[copy[1]] if isinstance(copy, tuple) else
                         Statement("<detached>") if copy == "detached" else None)
        self._since_tag = state["since_tag"]

    def abandon(self, now: float) -> None:
        """The session ended with statements still in flight: they are evidence too."""
        if self.groups:
            self._take_rows(self.groups[self._first].current())
        while self.groups:
            group = self._pop_group()
            for statement in group.statements[group.cursor:]:
                if statement.sqlstate is None and not statement.skipped:
                    statement.error = "the session ended before the statement completed"
                statement.finished_mono = statement.finished_mono or now
            for statement in group.statements[group.cursor:]:
                self.on_complete(statement)

    def _finish_current(self, group: _Group, now: float) -> None:
        statement = group.current()
        if statement is not None:
            statement.finished_mono = now
            group.cursor += 1


def verdict_fields(verdict: Verdict) -> tuple[bytes, bytes, bytes]:
    """A verdict as pgtrack.h keeps it: what SessionInfo.statement_event writes of it, as orjson writes
    it (the row's `"rule":…,"approval_id":…`; the details' `"guardrail":{…}`, empty without matched
    rules), spliced into the C tracker's rows; and the whole verdict, which restore reads back."""
    row = b'"rule":' + orjson.dumps(verdict.rule) + b',"approval_id":' + orjson.dumps(verdict.approval_id)
    details = (b'"guardrail":' + orjson.dumps({"action": verdict.action, "rules": list(verdict.matched)})
               if verdict.matched else b"")
    return row, details, orjson.dumps(dataclasses.asdict(verdict))


def full_row_parts(template: EventTemplate, session_id: str) -> tuple[bytes, tuple[bytes, ...]]:
    """What the C tracker needs to write a session's statement rows as the shipper ships them but for
    the template's members (pgtrack.h's pgt_full): the session id (event ids), and the members of each
    column a row may set, for rows without it (contract.c_row_parts)."""
    return session_id.encode(), c_row_parts(template)[1]


def _verdict(doc: bytes | None) -> Verdict | None:
    if doc is None:
        return None
    fields = orjson.loads(doc)
    return Verdict(**fields | {"matched": tuple(fields["matched"])})


def _unescape(escaped: bytes | None) -> str | None:
    return None if escaped is None else orjson.loads(b'"' + escaped + b'"')


def _statement(doc: Mapping[str, Any]) -> Statement:
    params = doc["parameters"]
    return Statement(_unescape(doc["text"]) or "", started=doc["started"], started_mono=doc["started_mono"],
                     parameters=None if params is None else orjson.loads(params),
                     command_tag=_unescape(doc["command_tag"]),
                     rows=doc["rows"], bytes=doc["bytes"], sqlstate=_unescape(doc["sqlstate"]),
                     error=_unescape(doc["error"]), finished_mono=doc["finished_mono"], skipped=doc["skipped"],
                     kind=doc["kind"], verdict=_verdict(doc["verdict"]))
