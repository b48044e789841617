"""pgtrack.h, the C statement tracker of the relay's engine, against tracker.StatementTracker: the
same session in (guardrail verdicts included), the same evidence rows out, byte for byte — what the
spool writes of SessionInfo.statement_event — and the same counts; and a Python tracker restored from
the C one's state at any point carries on identically. `_pgtrack` is a test-only binding of the header."""

from __future__ import annotations

import math
import re
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from control_plane.contract import EventTemplate, c_row_parts, session_event_id
from data_plane.core.guardrails import ALLOW, LOG, Verdict
from data_plane.core.recording import _recording
from data_plane.core.redact import might_hold_secret, redact_statement
from data_plane.core.session import SessionInfo, Statement
from data_plane.postgres import messages as m
from data_plane.postgres import tracker as tracker_module
from data_plane.postgres.framescan import scan_frames
from data_plane.postgres.tracker import (
    SERVER_DECODED,
    StatementTracker,
    _parameter,
    _verdict,
    full_row_parts,
    verdict_fields,
)
from data_plane.shipper import _full_row_runs_py

pgtrack = pytest.importorskip("data_plane.postgres._pgtrack")

OK, VIOLATION, PUNT = pgtrack.OK, pgtrack.VIOLATION, pgtrack.PUNT
WALL_OFFSET = 1_760_000_000.0  # time.time() - time.monotonic() of the sessions below
SERVER_SKIP = b"Dd"


# ------------------------------------------------------------------------------------------------
# a deterministic clock for Python's Statement (its default factories read time.time/monotonic)
# ------------------------------------------------------------------------------------------------


class _Clock:
    wall = 0.0
    mono = 0.0


CLOCK = _Clock()


def _statement(*args, **kwargs) -> Statement:
    statement = Statement(*args, **kwargs)
    if "started" not in kwargs:  # restore gives the C tracker's times
        statement.started, statement.started_mono = CLOCK.wall, CLOCK.mono
    return statement


@pytest.fixture(autouse=True, scope="module")
def _deterministic_statements():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracker_module, "Statement", _statement)
        yield


# ------------------------------------------------------------------------------------------------
# message bodies (without the 5-byte header: what client_message takes)
# ------------------------------------------------------------------------------------------------


def cstr(value: str | bytes) -> bytes:
    return (value.encode() if isinstance(value, str) else value) + b"\x00"


def query(text: str | bytes) -> bytes:
    return cstr(text)


def parse(text: str | bytes, types: Sequence[int] = (), name: str | bytes = "") -> bytes:
    return cstr(name) + cstr(text) + struct.pack("!h", len(types)) + b"".join(struct.pack("!I", t) for t in types)


def bind(params: Sequence[bytes | None] = (), formats: Sequence[int] = (), *, statement: str | bytes = "",
         portal: str | bytes = "", results: Sequence[int] = ()) -> bytes:
    body = [cstr(portal), cstr(statement), struct.pack("!h", len(formats))]
    body += [struct.pack("!h", f) for f in formats]
    body.append(struct.pack("!h", len(params)))
    for value in params:
        body.append(struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value)
    body.append(struct.pack("!h", len(results)))
    body += [struct.pack("!h", f) for f in results]
    return b"".join(body)


def execute(portal: str | bytes = "", max_rows: int = 0) -> bytes:
    return cstr(portal) + struct.pack("!i", max_rows)


def describe(kind: str = "S", name: str | bytes = "") -> bytes:
    return kind.encode() + cstr(name)


def close(kind: str, name: str | bytes = "") -> bytes:
    return kind.encode() + cstr(name)


# verdicts that let a statement through, as the guardrails give them
LOG_WRITES = Verdict(LOG, "log-writes", "INSERT is not allowed", ("log-writes",))
LOG_ODD_NAMES = Verdict(LOG, 'audit "all" \\ caf\u00e9\n\x01', "", ("reads", 'audit "all" \\ caf\u00e9\n\x01'))
ALLOWED_BY_RULE = Verdict(ALLOW, "reads", "reads are fine", ("reads",))
APPROVED = Verdict(ALLOW, "changes-need-approval", "approved by alice", ("changes-need-approval",), approval_id="a-17")
NO_RULE = Verdict(LOG, None)  # no rule named and none matched: "rule" and "approval_id" only
VERDICTS = (LOG_WRITES, LOG_ODD_NAMES, ALLOWED_BY_RULE, APPROVED, NO_RULE)


def doc(verdict: Verdict | None) -> bytes | None:
    return None if verdict is None else verdict_fields(verdict)[2]


# server frames (whole, header included)
PARSE_COMPLETE = m.frame(b"1")
BIND_COMPLETE = m.frame(b"2")
CLOSE_COMPLETE = m.frame(b"3")
NO_DATA = m.frame(b"n")
EMPTY_QUERY = m.frame(b"I")
PORTAL_SUSPENDED = m.frame(b"s")
READY = m.ready_for_query()
ROW_DESCRIPTION = m.frame(b"T", struct.pack("!h", 1) + cstr("x") + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0))
COPY_IN_RESPONSE = m.frame(b"G", b"\x00" + struct.pack("!hh", 1, 0))
COPY_OUT_RESPONSE = m.frame(b"H", b"\x00" + struct.pack("!hh", 1, 0))
COPY_DONE = m.frame(b"c")


def complete(tag: str | bytes) -> bytes:
    return m.frame(b"C", cstr(tag))


def row(*values: bytes | None) -> bytes:
    return m.data_row(list(values))


def copy_data(data: bytes) -> bytes:
    return m.frame(b"d", data)


def parameter_description(*types: int) -> bytes:
    return m.frame(b"t", struct.pack("!h", len(types)) + b"".join(struct.pack("!I", t) for t in types))


def error(code: str | None = "42601", message: str | bytes | None = "syntax error") -> bytes:
    fields = b"SERROR\x00"
    if code is not None:
        fields += b"C" + cstr(code)
    if message is not None:
        fields += b"M" + cstr(message)
    return m.frame(b"E", fields + b"\x00")


# ------------------------------------------------------------------------------------------------
# the two trackers, fed the same session
# ------------------------------------------------------------------------------------------------


def python_in_flight(tracker: StatementTracker) -> int:
    waiting = tracker.groups[tracker._first:]
    detached = tracker._open is not None and not any(group is tracker._open for group in waiting)
    return len(waiting) + detached


class Session:
    """A StatementTracker wired as PostgresSession wires it (statement_done: the spool's row and the
    counts) and a C tracker, driven the way the Relay drives them, compared after every step."""

    def __init__(self, *, record_parameters: bool = True, first_seq: int = 0, start: float = 1000.0) -> None:
        templates: list[dict] = []
        self.info = SessionInfo("s1", "postgres", "127.0.0.1", 5432, "eu-west-1", events=first_seq,
                                record_parameters=record_parameters,
                                on_template=lambda version, doc: templates.append(orjson.loads(orjson.dumps(doc))))
        self.info._write_template()
        self.templates = templates  # by version - 1, as the shipper reads them back
        self.template = EventTemplate.from_doc(templates[-1])
        self.record_parameters = record_parameters
        self.py = StatementTracker(self.statement_done, record_parameters=record_parameters)
        self.full_rows = bytearray()
        self.c = _WithFullRows(
            pgtrack.Tracker(record_parameters=record_parameters, first_seq=first_seq,
                            template_version=self.info._template_version),
            pgtrack.Tracker(record_parameters=record_parameters, first_seq=first_seq,
                            template_version=self.info._template_version,
                            full_rows=full_row_parts(self.template, self.info.session_id)),
            self.full_rows)
        self.py_rows = bytearray()
        self.c_rows = bytearray()
        self.counts = [0, 0, 0]  # errors, skipped, ok as the metrics count them
        self.now = start
        self.wall_offset = 0.0  # the C tracker's: of the last client message it took
        self.punts = 0

    def statement_done(self, statement: Statement) -> None:
        self.info.statements += 1
        self.py_rows += orjson.dumps(self.info.statement_event(statement), default=str,
                                     option=orjson.OPT_APPEND_NEWLINE)
        if statement.sqlstate or statement.error:
            self.counts[0] += 1
        elif statement.skipped:
            self.counts[1] += 1
        else:
            self.counts[2] += 1

    # --------------------------------------------------------------------------------------------
    def client(self, msg_type: str | int, body: bytes = b"", *, dt: float = 0.001,
               verdict: Verdict | None = None) -> int:
        """One client message (with the guardrails' verdict of a Query or Parse, as the relay passes
        it); a PUNT reaches neither tracker (the C one must not have changed)."""
        self.now += dt
        code = ord(msg_type) if isinstance(msg_type, str) else msg_type
        wall = self.now + WALL_OFFSET
        rc = self.c.client_message(code, body, wall, self.now, None if verdict is None else verdict_fields(verdict))
        if rc == PUNT:
            assert self.punt_expected(code, body), f"unexpected PUNT of {chr(code)} {body!r}"
            self.punts += 1
            self.check()
            return rc
        CLOCK.wall, CLOCK.mono = wall, self.now
        try:
            self.py.client_message(code, body, verdict)
            py_rc = OK
        except m.ProtocolViolation:
            py_rc = VIOLATION
        assert rc == py_rc, f"C {rc}, Python {py_rc} for {chr(code)} {body!r}"
        if rc == OK:
            self.wall_offset = wall - self.now
        self.check()
        return rc

    def punt_expected(self, code: int, body: bytes) -> bool:
        """The documented reasons: FunctionCall, a secret hint in a Query/Parse/Bind, a binary
        integer parameter longer than 8 bytes at Execute."""
        if code == ord("F") or (code in b"QPB" and pgtrack.might_hold_secret(body)):
            return True
        if code != ord("E") or not self.record_parameters:
            return False
        statement, bound = self.py.portals[m.parse_execute(body)[0]]
        parsed = self.py.prepared.get(statement)
        types = parsed.param_types if parsed else ()
        return any(value is not None and len(value) > 8 and bound.param_format(i) != 0
                   and (types[i] if i < len(types) else 0) in (20, 21, 23) for i, value in enumerate(bound.params))

    def copy(self, count: int) -> None:
        self.py.client_copy_bytes(count)
        self.c.client_copy_bytes(count)
        self.check()

    def server(self, *frames: bytes, dt: float = 0.001, per_frame: bool = False) -> int:
        """One read from the server: as from_server_plain feeds server_frames, or (per_frame) as
        from_server_masked feeds rows/server_bytes/server_message."""
        self.now += dt
        chunk = b"".join(frames)
        end, events, trailing = scan_frames(chunk, 0, SERVER_SKIP, 1 << 30)
        # a "parse" statement is created on the server side: Python reads time.time() there, C
        # derives it from the last client message
        CLOCK.wall, CLOCK.mono = self.now + self.wall_offset, self.now
        try:
            if per_frame:
                self._python_per_frame(chunk, events, end, trailing)
            else:
                self.py.server_frames(chunk, events, end, trailing, self.now, lambda *_: None)
            py_rc = OK
        except m.ProtocolViolation:
            py_rc = VIOLATION
        if per_frame:
            rc, rows = self._c_per_frame(chunk, events, end, trailing)
        else:
            rc, rows = self.c.server_frames(chunk, events, end, trailing, self.now)
        self.c_rows += rows
        assert rc == py_rc, f"C {rc}, Python {py_rc} for {chunk!r}"
        self.check()
        return rc

    def _python_per_frame(self, chunk: bytes, events, end: int, trailing: int) -> None:
        tracker, pos, rows = self.py, 0, 0
        for msg_type, offset, size, skipped in events:
            rows += skipped
            if msg_type in SERVER_DECODED:
                if rows:
                    tracker.rows(rows)
                    rows = 0
                tracker.server_bytes(offset + size - pos)
                pos = offset + size
                tracker.server_message(msg_type, chunk[offset + 5:offset + size], self.now)
        rows += trailing
        if rows:
            tracker.rows(rows)
        if end > pos:
            tracker.server_bytes(end - pos)

    def _c_per_frame(self, chunk: bytes, events, end: int, trailing: int) -> tuple[int, bytes]:
        tracker, pos, rows, out = self.c, 0, 0, b""
        for msg_type, offset, size, skipped in events:
            rows += skipped
            if msg_type in SERVER_DECODED:
                if rows:
                    tracker.rows(rows)
                    rows = 0
                tracker.server_bytes(offset + size - pos)
                pos = offset + size
                rc, written = tracker.server_message(msg_type, chunk[offset + 5:offset + size], self.now)
                out += written
                if rc != OK:
                    return rc, out
        rows += trailing
        if rows:
            tracker.rows(rows)
        if end > pos:
            tracker.server_bytes(end - pos)
        return OK, out

    def abandon(self, *, dt: float = 0.001) -> None:
        self.now += dt
        self.py.abandon(self.now)
        self.c_rows += self.c.abandon(self.now)
        self.check()

    def handover(self) -> None:
        """At a quiescent point, Python takes over from the C tracker's export (as the engine hands a
        session back): the export describes what the Python tracker holds."""
        assert self.c.in_flight() == 0
        prepared, portals = self.c.export()
        assert self.c.counts() == (len(prepared), len(portals))
        assert {name: (parsed.query, parsed.param_types, doc(self.py.judged[name][1]))
                for name, parsed in self.py.prepared.items()} == prepared
        assert {name: recorded for name, (recorded, _) in self.py.judged.items()} == {
            name: text for name, (text, _, _) in prepared.items()}
        assert {name: (statement, bound) for name, (statement, bound) in self.py.portals.items()} == {
            name: (statement, m.parse_bind(body)) for name, (statement, body) in portals.items()}
        assert self.py._since_tag == self.c.since_tag()
        self.py = python_tracker_from(self.c, self.statement_done, record_parameters=self.record_parameters)

    def takeover(self) -> None:
        """At any point, statements in flight included, a Python tracker carries on from the C
        tracker's whole state, as the relay does when the engine hands it a session."""
        python = StatementTracker(self.statement_done, record_parameters=self.record_parameters)
        python.restore(self.c.export_state())
        self.py = python
        self.check()

    def check(self) -> None:
        if self.c_rows != self.py_rows:
            c_lines, py_lines = bytes(self.c_rows).splitlines(), bytes(self.py_rows).splitlines()
            for c_line, py_line in zip(c_lines, py_lines, strict=False):
                assert c_line == py_line
            assert c_lines == py_lines
        self.check_full_rows()
        statements, errors, skipped, ok, seq = self.c.counters()
        assert (statements, [errors, skipped, ok], seq) == (self.info.statements, self.counts, self.info.events)
        assert self.c.in_flight() == python_in_flight(self.py)
        assert self.c.since_tag() == self.py._since_tag

    def check_full_rows(self) -> None:
        """The C tracker's full-row mode (the C data path's rows), completed as the shipper completes them
        (C and Python), is what the shipper makes of its compact rows."""
        compact_lines, c_lines = bytes(self.c_rows).splitlines(), bytes(self.full_rows).splitlines()
        assert len(c_lines) == len(compact_lines)
        assert all(line.startswith(b'{"time":') and re.search(rb',"tv":\d+}$', line) for line in c_lines)
        templates = {version: EventTemplate.from_doc(doc) for version, doc in enumerate(self.templates, 1)}
        rests = {version: c_row_parts(template)[0] for version, template in templates.items()}
        completed = shipper_runs(bytes(self.full_rows), rests)
        assert completed == shipper_runs(bytes(self.full_rows), rests, python=True)
        assert len(completed) == len(compact_lines)
        for compact_line in compact_lines:
            compact = orjson.loads(compact_line)
            template = templates[compact.pop("tv")]
            _, line = template.expand_line(compact, session_event_id(self.info.session_id, compact["seq"]))
            assert completed[compact["seq"]] == orjson.loads(line)

    def rows(self) -> list[dict]:
        return [orjson.loads(line) for line in bytes(self.py_rows).splitlines()]


def shipper_runs(lines: bytes, rests: dict[int, bytes], *, python: bool = False) -> dict[int, dict]:
    """The rows `full_row_runs` (the shipper's, C or its Python twin) makes of `lines`, by seq: all of them."""
    runs, others = (_full_row_runs_py if python else _recording.full_row_runs)(lines, rests)
    assert others == []
    rows = [orjson.loads(line) for *_, found, _ in runs for line in found.splitlines()]
    return {row["seq"]: row for row in rows}


class _WithFullRows:
    """The C tracker, with a twin in full-row mode fed the same calls: its rows go to `full_rows`."""

    def __init__(self, compact: Any, full: Any, full_rows: bytearray) -> None:
        self._compact, self._full, self._full_rows = compact, full, full_rows

    def __getattr__(self, name: str) -> Callable[..., Any]:
        compact, full = getattr(self._compact, name), getattr(self._full, name)

        def both(*args: Any, **kwargs: Any) -> Any:
            result, twin = compact(*args, **kwargs), full(*args, **kwargs)
            if name in ("server_frames", "server_message"):
                assert twin[0] == result[0]
                self._full_rows += twin[1]
            elif name == "abandon":
                self._full_rows += twin
            return result
        return both


def python_tracker_from(tracker, on_complete: Callable[[Statement], None], *,
                        record_parameters: bool = True) -> StatementTracker:
    """A StatementTracker holding what a quiescent C tracker exports."""
    prepared, portals = tracker.export()
    python = StatementTracker(on_complete, record_parameters=record_parameters)
    for name, (text, types, verdict) in prepared.items():
        python.prepared[name] = m.Parse(name, text, types)
        python.judged[name] = (text, _verdict(verdict))
    for name, (statement, body) in portals.items():
        python.portals[name] = (statement, m.parse_bind(body))
    python._since_tag = tracker.since_tag()
    return python


# ------------------------------------------------------------------------------------------------
# simple query protocol
# ------------------------------------------------------------------------------------------------


def test_simple_query_row_is_byte_identical() -> None:
    session = Session()
    session.client("Q", query("SELECT id FROM t"))
    session.server(ROW_DESCRIPTION, row(b"1"), row(b"2"), row(None), complete("SELECT 3"), dt=0.25)
    session.server(READY)
    [event] = session.rows()
    assert event["command_tag"] == "SELECT 3"
    assert event["rows"] == 3
    assert event["seq"] == 1 and event["tv"] == 1


def test_several_statements_in_one_query_join_their_tags() -> None:
    session = Session()
    session.client("Q", query("INSERT INTO t VALUES (1); UPDATE t SET x = 2; SELECT 1; DELETE FROM t"))
    session.server(complete("INSERT 0 1"), complete("UPDATE 4"), ROW_DESCRIPTION, row(b"1"), complete("SELECT 1"),
                   error("23503", "violates foreign key"), READY)
    [event] = session.rows()
    assert event["command_tag"] == "INSERT 0 1; UPDATE 4; SELECT 1"
    assert event["sqlstate"] == "23503"


def test_tags_interleaved_with_an_error_keep_joining() -> None:
    session = Session()
    session.client("Q", query("a; b; c"))
    session.server(complete("SELECT 1"), error("01000", "first"), complete("SELECT 2"), complete("SELECT 3"), READY)


def test_rows_come_from_the_tag_or_the_relayed_rows_whichever_is_larger() -> None:
    session = Session()
    session.client("Q", query("SELECT * FROM big"))
    session.server(complete("SELECT 7"), READY)
    session.client("Q", query("DELETE FROM t RETURNING id"))
    session.server(ROW_DESCRIPTION, row(b"1"), row(b"2"), complete("DELETE 2"), READY)
    session.client("Q", query("FETCH 3"))
    session.server(ROW_DESCRIPTION, row(b"1"), row(b"2"), row(b"3"), complete("BEGIN"), READY)
    session.client("Q", query("select"))
    session.server(complete("SELECT 18446744073709551615"), READY)
    assert [event["rows"] for event in session.rows()] == [7, 2, 3, 18446744073709551615]


def test_unicode_tags_split_and_count_as_python_does() -> None:
    session = Session()
    for tag in ["SELECT\u00a05", "SELECT \u0663\u0664", "SELECT 5\u2003", "X\x1c9", "SELECT \U0001d7d7",
                "SELECT \xff 5", b"INSERT 0 \xff", "SELECT 5x", "5", ""]:
        session.client("Q", query("q"))
        session.server(complete(tag), READY)
    assert [event["rows"] for event in session.rows()] == [5, 34, 5, 9, 9, 5, 0, 0, 0, 0]


def test_empty_query_gets_an_empty_tag_in_both_protocols() -> None:
    session = Session()
    session.client("Q", query(""))
    session.server(EMPTY_QUERY, READY)
    session.client("Q", query("SELECT 1; ;"))
    session.server(complete("SELECT 1"), EMPTY_QUERY, READY)
    session.client("P", parse(""))
    session.client("B", bind())
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, EMPTY_QUERY, READY)
    assert [event["command_tag"] for event in session.rows()] == ["", "SELECT 1", ""]


def test_texts_escape_as_orjson_does() -> None:
    session = Session()
    nasty = 'SELECT \'"quoted"\' AS "x\\y", E\'\\n\', \'\t\x01\x1f\x7f\' -- caf\u00e9 \u2028 😀 \u017f'
    session.client("Q", query(nasty))
    session.server(error("XX000", 'bad "thing" \\ \n here \u00e9'), READY)
    session.client("Q", query(b"invalid \xff\xfe \xe2\x82 utf-8 \xed\xa0\x80 \xf4\x90\x80\x80"))
    session.server(complete(b"SELECT \xc3"), READY)
    [first, second] = session.rows()
    assert first["statement"] == nasty
    assert second["statement"] == b"invalid \xff\xfe \xe2\x82 utf-8 \xed\xa0\x80 \xf4\x90\x80\x80".decode(
        errors="replace")


def test_back_to_back_queries_pipeline_in_order() -> None:
    session = Session()
    session.client("Q", query("SELECT 1"))
    session.client("Q", query("SELECT 2"))
    session.client("Q", query("SELECT 3"))
    session.server(ROW_DESCRIPTION, row(b"1"), complete("SELECT 1"), READY, ROW_DESCRIPTION)
    session.server(row(b"2"), complete("SELECT 1"), READY, complete("SELECT 0"))
    session.server(READY)
    assert [event["statement"] for event in session.rows()] == ["SELECT 1", "SELECT 2", "SELECT 3"]


def test_seq_continues_from_the_sessions_events_and_tv_is_the_template_version() -> None:
    session = Session(first_seq=41)
    session.client("Q", query("SELECT 1"))
    session.server(complete("SELECT 1"), READY)
    assert session.rows()[0]["seq"] == 42
    session.info._write_template()  # a new grant: a new template
    session.c.set_template_version(session.info._template_version)
    session.client("Q", query("SELECT 2"))
    session.server(complete("SELECT 1"), READY)
    assert session.rows()[1]["tv"] == 2


@pytest.mark.parametrize("per_frame", [False, True])
def test_bytes_are_attributed_as_the_relay_attributes_them(per_frame: bool) -> None:
    session = Session()
    session.client("Q", query("SELECT 1"))
    session.client("Q", query("SELECT 2"))
    session.server(ROW_DESCRIPTION, row(b"x" * 100), per_frame=per_frame)
    session.server(row(b"y"), complete("SELECT 2"), m.notice_response("hi"), per_frame=per_frame)
    session.server(READY, ROW_DESCRIPTION, m.parameter_status("TimeZone", "UTC"), per_frame=per_frame)
    session.server(complete("SELECT 0"), READY, row(b"stray"), per_frame=per_frame)
    session.server(row(b"stray"), per_frame=per_frame)  # rows with nothing in flight wait for the next tag


# ------------------------------------------------------------------------------------------------
# COPY
# ------------------------------------------------------------------------------------------------


def test_copy_in_counts_client_bytes_and_the_tag_rows() -> None:
    session = Session()
    session.client("Q", query("COPY t FROM STDIN"))
    session.server(COPY_IN_RESPONSE)
    session.copy(1234)
    session.copy(10)
    session.server(complete("COPY 5"), READY)
    session.copy(99)  # after ReadyForQuery: nobody's
    assert session.rows()[0]["bytes"] > 1244


def test_copy_out_counts_copy_data_as_rows() -> None:
    session = Session()
    session.client("Q", query("COPY t TO STDOUT"))
    session.server(COPY_OUT_RESPONSE, copy_data(b"1\n"), copy_data(b"2\n"))
    session.server(copy_data(b"3\n"), COPY_DONE, complete("COPY 3"), READY)
    session.client("P", parse("COPY t FROM STDIN"))
    session.client("B", bind())
    session.client("E", execute())
    session.copy(77)
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, COPY_IN_RESPONSE, complete("COPY 2"), READY)
    assert [event["rows"] for event in session.rows()] == [3, 2]


# ------------------------------------------------------------------------------------------------
# extended query protocol
# ------------------------------------------------------------------------------------------------


def test_unnamed_statement_with_text_parameters() -> None:
    session = Session()
    session.client("P", parse("SELECT $1, $2, $3"))
    session.client("B", bind([b"42", None, "caf\u00e9 \"q\" \\".encode()]))
    session.client("D", describe("P"))
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, ROW_DESCRIPTION, row(b"1"), complete("SELECT 1"), READY)
    [event] = session.rows()
    assert event["details"] == {"parameters": ["42", None, 'caf\u00e9 "q" \\']}


def test_named_statements_and_portals_across_syncs() -> None:
    session = Session()
    session.client("P", parse("SELECT $1::int", (23,), name="s1"))
    session.client("P", parse("UPDATE t SET x = $1", (25,), name="s2"))
    session.client("S")
    session.server(PARSE_COMPLETE, PARSE_COMPLETE, READY)
    for value in (b"1", b"2"):
        session.client("B", bind([struct.pack("!i", int(value))], (1,), statement="s1", portal="p1"))
        session.client("B", bind([value], statement="s2", portal="p2"))
        session.client("E", execute("p1"))
        session.client("E", execute("p2"))
        session.client("S")
        session.server(BIND_COMPLETE, BIND_COMPLETE, row(value), complete("SELECT 1"), complete("UPDATE 3"), READY)
    session.client("C", close("S", "s1"))
    session.client("C", close("P", "p2"))
    session.client("H")
    session.client("S")
    session.server(CLOSE_COMPLETE, CLOSE_COMPLETE, READY)
    session.client("B", bind([b"3"], statement="s1", portal="p1"))
    session.client("E", execute("p1"))
    session.client("E", execute("p2"))
    session.client("E", execute("nowhere"))
    session.client("S")
    session.server(BIND_COMPLETE, complete("SELECT 1"), complete("SELECT 1"), complete("SELECT 1"), READY)
    texts = [event["statement"] for event in session.rows()]
    assert texts[-3:] == ["<unknown prepared statement>"] * 3


def test_execute_of_an_unknown_portal_falls_back_to_the_unnamed_statement() -> None:
    session = Session()
    session.client("P", parse("SELECT 'unnamed'"))
    session.client("E", execute("never bound"))
    session.client("S")
    session.server(PARSE_COMPLETE, complete("SELECT 1"), READY)
    [event] = session.rows()
    assert event["statement"] == "SELECT 'unnamed'"
    assert "details" not in event


def test_binary_parameters_decode_as_python_decodes_them() -> None:
    session = Session()
    types = (16, 16, 20, 21, 23, 23, 700, 701, 701, 2950, 25, 1043, 19, 114, 1042, 17, 0, 2950, 700)
    session.client("P", parse("SELECT " + ", ".join(f"${i + 1}" for i in range(len(types))), types, name="b"))
    params = [b"\x01", b"\x02", struct.pack("!q", -(2**63)), struct.pack("!h", -2), struct.pack("!i", 2**31 - 1),
              b"", struct.pack("!f", 0.1), struct.pack("!d", 1e-7), struct.pack("!d", float("nan")),
              bytes(range(16)), "text \u00e9".encode(), b"\xffvarchar", b"name", b'{"a": 1}', b"bpchar  ",
              b"\x00\x01\xfe", b"\xde\xad", b"short uuid", b"\x01\x02"]
    session.client("B", bind(params, (1,), statement="b"))
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), READY)
    [event] = session.rows()
    assert event["details"]["parameters"][:9] == ["true", "false", "-9223372036854775808", "-2", "2147483647", "0",
                                                  "0.10000000149011612", "1e-07", "nan"]


def test_mixed_formats_and_long_parameters_are_truncated_by_characters() -> None:
    session = Session()
    session.client("P", parse("SELECT $1, $2, $3, $4", (25, 17, 25, 0)))
    params = [("\u00e9" * 1500).encode(), bytes(600), ("x" * 1024).encode(), b"\xff" * 1025]
    session.client("B", bind(params, (0, 1, 1, 0)))
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), READY)
    values = session.rows()[0]["details"]["parameters"]
    assert [len(v) for v in values] == [1025, 1025, 1024, 1025]


def test_parameters_are_not_recorded_when_the_grant_says_so() -> None:
    session = Session(record_parameters=False)
    session.client("P", parse("SELECT $1"))
    session.client("B", bind([b"1"]))
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), READY)
    assert "details" not in session.rows()[0]


def test_describe_statement_parameter_types_decode_later_binds() -> None:
    session = Session()
    session.client("P", parse("SELECT $1, $2", name="s"))
    session.client("D", describe("S", "s"))
    session.client("D", describe("S", "missing"))
    session.client("S")
    session.server(PARSE_COMPLETE, parameter_description(23, 16), NO_DATA, parameter_description(25), NO_DATA,
                   READY)
    session.client("B", bind([struct.pack("!i", 7), b"\x01"], (1,), statement="s"))
    session.client("E", execute())
    session.client("S")
    session.server(BIND_COMPLETE, complete("SELECT 1"), READY)
    assert session.rows()[-1]["details"]["parameters"] == ["7", "true"]


def test_portal_suspended_completes_each_execute() -> None:
    session = Session()
    session.client("P", parse("SELECT * FROM big"))
    session.client("B", bind())
    session.client("E", execute(max_rows=2))
    session.client("E", execute(max_rows=2))
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, row(b"1"), row(b"2"), PORTAL_SUSPENDED, row(b"3"),
                   complete("SELECT 1"), READY)
    assert [event["command_tag"] for event in session.rows()] == ["PORTAL SUSPENDED", "SELECT 1"]


def test_pipeline_with_several_syncs_in_flight() -> None:
    session = Session()
    for i in range(5):
        session.client("P", parse(f"SELECT {i}"))
        session.client("B", bind())
        session.client("E", execute())
        session.client("S")
    for i in range(5):
        session.server(PARSE_COMPLETE, BIND_COMPLETE, row(str(i).encode()), complete("SELECT 1"), READY, dt=0.003)
    assert [event["statement"] for event in session.rows()] == [f"SELECT {i}" for i in range(5)]


def test_error_mid_pipeline_skips_the_later_statements_of_its_group_only() -> None:
    session = Session()
    session.client("P", parse("INSERT INTO t VALUES ($1)", name="ins"))
    for value in (b"1", b"1", b"2"):
        session.client("B", bind([value], statement="ins"))
        session.client("E", execute())
    session.client("S")
    session.client("B", bind([b"3"], statement="ins"))
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"), BIND_COMPLETE,
                   error("23505", "duplicate key"), READY)
    session.server(BIND_COMPLETE, complete("INSERT 0 1"), READY)
    events = session.rows()
    assert [event["status"] for event in events] == ["Success", "Failure", "Failure", "Success"]
    assert events[2]["details"]["skipped"].startswith("not executed")
    assert session.c.counters()[:4] == (4, 1, 1, 2)


def test_error_before_any_execute_is_a_parse_statement() -> None:
    session = Session()
    session.client("P", parse("SELEC 1"))
    session.client("B", bind())
    session.client("S")
    session.server(error("42601", 'syntax error at or near "SELEC"'), READY)
    session.client("P", parse(""))  # an empty text is "<unknown>"
    session.client("S")
    session.server(error("42601", ""), READY)
    session.client("P", parse("SELECT 1", name="dup"))
    session.client("P", parse("SELECT 2", name="other"))  # the group's last Parse names the statement
    session.client("S")
    session.server(error(None, None), error("XX000", "again"), READY)
    events = session.rows()
    assert [(event["statement"], event["details"]["kind"]) for event in events] == [
        ("SELEC 1", "parse"), ("<unknown>", "parse"), ("SELECT 2", "parse")]
    # an ErrorResponse without code or message leaves nothing that says "failed"
    assert [event["status"] for event in events] == ["Failure", "Failure", "Success"]


def test_second_error_of_a_failed_group_is_nobodys() -> None:
    session = Session()
    session.client("P", parse("SELECT 1"))
    session.client("B", bind())
    session.client("E", execute())
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, error("57014", "canceled"), error("XX000", "more"), READY)


def test_flush_lets_answers_come_before_the_sync() -> None:
    session = Session()
    session.client("P", parse("SELECT 1"))
    session.client("B", bind())
    session.client("E", execute())
    session.client("H")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"))
    session.client("P", parse("SELECT 2"))
    session.client("B", bind())
    session.client("E", execute())
    session.client("S")
    session.client("X")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), READY)
    assert len(session.rows()) == 2


def test_ready_for_query_before_the_sync_detaches_the_open_group() -> None:
    session = Session()
    session.client("P", parse("SELECT 1"))
    session.client("B", bind())
    session.client("E", execute())
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), READY)
    assert session.c.in_flight() == 1  # the open group, no longer awaiting answers
    session.client("E", execute())  # Python appends it to a group nobody will read again
    session.copy(5)
    session.client("Q", query("SELECT 2"))
    session.server(complete("SELECT 1"), READY)
    session.client("S")
    session.server(READY)
    assert session.c.in_flight() == 0


def test_query_between_extended_messages_keeps_the_open_group() -> None:
    session = Session()
    session.client("P", parse("SELECT 1"))
    session.client("B", bind())
    session.client("Q", query("SELECT 2"))
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), READY)
    session.server(complete("SELECT 1"), READY)
    session.server(READY)


# ------------------------------------------------------------------------------------------------
# guardrail verdicts that let a statement through (a `log` rule): on the row, where Python puts them
# ------------------------------------------------------------------------------------------------


def test_log_verdict_on_a_simple_query_names_the_rule_in_its_row() -> None:
    session = Session()
    session.client("Q", query("INSERT INTO t VALUES (1)"), verdict=LOG_WRITES)
    session.server(complete("INSERT 0 1"), READY)
    session.client("Q", query("SELECT 1"))
    session.server(complete("SELECT 1"), READY)
    logged, plain = session.rows()
    assert (logged["rule"], logged["approval_id"], logged["activity_name"]) == ("log-writes", None, "query")
    assert logged["details"] == {"guardrail": {"action": "log", "rules": ["log-writes"]}}
    assert "rule" not in plain and "details" not in plain


@pytest.mark.parametrize("verdict", VERDICTS)
def test_every_kind_of_passing_verdict_writes_pythons_members(verdict: Verdict) -> None:
    session = Session()
    session.client("Q", query("SELECT 1"), verdict=verdict)
    session.server(error("42P01", "missing"), READY)
    session.client("P", parse("SELECT $1", name="s"), verdict=verdict)
    session.client("B", bind([b"1"], statement="s"))
    session.client("E", execute())
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, error("22012", "division by zero"), READY)
    first, failed, skipped = session.rows()
    assert (first["rule"], first["approval_id"]) == (verdict.rule, verdict.approval_id)
    # the guardrail comes last in the details, after the parameters, the skip and the error
    assert list(skipped["details"]) == ["parameters", "skipped", *(["guardrail"] if verdict.matched else [])]
    assert list(failed["details"]) == ["parameters", "error", *(["guardrail"] if verdict.matched else [])]


def test_a_multi_statement_query_has_one_row_with_its_verdict() -> None:
    session = Session()
    session.client("Q", query("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2); SELECT 1 / 0"),
                   verdict=LOG_ODD_NAMES)
    session.server(complete("INSERT 0 1"), complete("INSERT 0 1"), error("22012", "division by zero"), READY)
    session.client("Q", query("INSERT INTO t VALUES (3); ;"), verdict=LOG_WRITES)
    session.server(complete("INSERT 0 1"), EMPTY_QUERY, READY)
    first, second = session.rows()
    assert first["command_tag"] == "INSERT 0 1; INSERT 0 1" and first["rule"] == LOG_ODD_NAMES.rule
    assert second["details"]["guardrail"]["rules"] == ["log-writes"]


def test_a_prepared_statements_verdict_follows_each_execute_of_it() -> None:
    session = Session()
    session.client("P", parse("INSERT INTO t VALUES ($1)", (23,), name="ins"), verdict=LOG_WRITES)
    session.client("P", parse("SELECT 1"))
    session.client("S")
    session.server(PARSE_COMPLETE, PARSE_COMPLETE, READY)
    for value in (1, 2):
        session.client("B", bind([struct.pack("!i", value)], (1,), statement="ins", portal="p"))
        session.client("E", execute("p"))
        session.client("B", bind())
        session.client("E", execute())
        session.client("S")
        session.server(BIND_COMPLETE, complete("INSERT 0 1"), BIND_COMPLETE, complete("SELECT 1"), READY)
    assert [event.get("rule") for event in session.rows()] == ["log-writes", None] * 2
    # a new Parse of the name brings its own verdict; the unnamed statement's reaches an unknown portal
    session.client("P", parse("INSERT INTO t VALUES ($1)", (23,), name="ins"))
    session.client("P", parse("SELECT 2"), verdict=ALLOWED_BY_RULE)
    session.client("B", bind([b"3"], statement="ins", portal="p"))
    session.client("E", execute("p"))
    session.client("E", execute("never bound"))
    session.client("C", close("S", ""))
    session.client("E", execute("never bound"))
    session.client("S")
    session.server(PARSE_COMPLETE, PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"), complete("SELECT 1"),
                   CLOSE_COMPLETE, complete("SELECT 1"), READY)
    assert [(event["statement"], event.get("rule")) for event in session.rows()[4:]] == [
        ("INSERT INTO t VALUES ($1)", None), ("SELECT 2", "reads"), ("<unknown prepared statement>", None)]


def test_an_error_answering_a_parse_carries_the_verdict_of_the_groups_last_parse() -> None:
    session = Session()
    session.client("P", parse("INSERT INTO missing VALUES ($1)"), verdict=LOG_WRITES)
    session.client("B", bind([b"1"]))
    session.client("S")
    session.server(error("42P01", 'relation "missing" does not exist'), READY)
    session.client("P", parse("INSERT INTO missing VALUES (1)", name="a"), verdict=LOG_WRITES)
    session.client("P", parse("SELEC 1", name="b"))
    session.client("S")
    session.server(error("42601", "syntax error"), READY)
    first, second = session.rows()
    assert (first["details"]["kind"], first["rule"]) == ("parse", "log-writes")
    assert "rule" not in second


def test_pipelined_groups_keep_their_own_verdicts() -> None:
    session = Session()
    for i in range(6):
        session.client("P", parse(f"INSERT INTO t VALUES ({i})"), verdict=LOG_WRITES if i % 2 else None)
        session.client("B", bind())
        session.client("E", execute())
        session.client("S")
        session.client("Q", query(f"INSERT INTO t VALUES ({i}); SELECT {i}"), verdict=APPROVED if i % 3 else None)
    for i in range(6):
        answer = error("23505", "duplicate key") if i == 3 else complete("INSERT 0 1")
        session.server(PARSE_COMPLETE, BIND_COMPLETE, answer, READY, complete("INSERT 0 1"), complete("SELECT 1"),
                       READY, dt=0.002)
    assert [event.get("rule") for event in session.rows()] == [
        None, None, "log-writes", "changes-need-approval", None, "changes-need-approval",
        "log-writes", None, None, "changes-need-approval", "log-writes", "changes-need-approval"]


def test_verdicts_of_a_detached_group_are_nobodys() -> None:
    session = Session()
    session.client("P", parse("INSERT INTO t VALUES (1)"), verdict=LOG_WRITES)
    session.client("B", bind())
    session.client("E", execute())
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"), READY)
    session.client("P", parse("INSERT INTO t VALUES (2)", name="late"), verdict=LOG_ODD_NAMES)
    session.client("S")
    session.server(READY)
    session.client("B", bind(statement="late"))
    session.client("E", execute())
    session.client("S")
    session.server(BIND_COMPLETE, complete("INSERT 0 1"), READY)
    assert [event["rule"] for event in session.rows()] == ["log-writes", LOG_ODD_NAMES.rule]


def test_abandon_writes_the_verdicts_of_what_was_in_flight() -> None:
    session = Session()
    session.client("Q", query("INSERT INTO t SELECT pg_sleep(10)"), verdict=LOG_WRITES)
    session.client("P", parse("INSERT INTO t VALUES ($1)", name="ins"), verdict=LOG_WRITES)
    session.client("B", bind([b"1"], statement="ins"))
    session.client("E", execute())
    session.abandon()
    assert [event["rule"] for event in session.rows()] == ["log-writes"] * 2


# ------------------------------------------------------------------------------------------------
# the end of a session
# ------------------------------------------------------------------------------------------------


def test_abandon_records_what_was_in_flight() -> None:
    session = Session()
    session.client("Q", query("SELECT pg_sleep(10)"))
    session.client("P", parse("SELECT 1"))
    session.client("B", bind())
    session.client("E", execute())
    session.client("E", execute())
    session.client("S")
    session.client("P", parse("SELECT 3"))
    session.client("E", execute())
    session.server(ROW_DESCRIPTION, row(b"1"))
    session.abandon()
    events = session.rows()
    assert [event.get("status_detail") for event in events] == ["the session ended before the statement completed"] * 4


def test_abandon_forgets_statements_finished_before_their_ready_for_query() -> None:
    session = Session()
    session.client("P", parse("SELECT 1"))
    session.client("B", bind())
    session.client("E", execute())
    session.client("E", execute())
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), error("22012", "division by zero"))
    session.client("Q", query("x"))
    session.server(error("XX000", "boom"))  # answers the third Execute (no ReadyForQuery in between)
    session.abandon()
    # The Executes finished before the session ended, but only ReadyForQuery reports a group:
    # Python's abandon forgets them (only statements[cursor:] are written), and so does the C tracker.
    assert [event["statement"] for event in session.rows()] == ["x"]


def test_abandon_with_nothing_in_flight_writes_nothing() -> None:
    session = Session()
    session.abandon()
    session.client("Q", query("SELECT 1"))
    session.server(complete("SELECT 1"), READY)
    session.abandon()
    assert len(session.rows()) == 1


# ------------------------------------------------------------------------------------------------
# PUNT: what the C path leaves to Python, untouched
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("msg_type", "body"), [
    ("Q", query("ALTER ROLE app PASSWORD 'secret'")),
    ("Q", query("SELECT dblink('postgres://u:pw@host/db')")),
    ("Q", query("ALTER USER x PA\u017f\u017fWORD 'y'")),
    ("P", parse("CREATE USER mapping OPTIONS (password $1)", name="p")),
    ("B", bind([b"host=db password=hunter2"], statement="s1", portal="p1")),
    ("B", bind([b"x"], statement="password")),
    ("F", struct.pack("!i", 1234) + struct.pack("!hh", 0, 0) + struct.pack("!h", 0)),
])
def test_punted_message_leaves_the_tracker_unchanged(msg_type: str, body: bytes) -> None:
    session = Session()
    session.client("P", parse("SELECT $1", (23,), name="s1"))
    session.client("B", bind([b"1"], statement="s1", portal="p1"))
    session.client("Q", query("SELECT 0"))
    assert session.client(msg_type, body) == PUNT
    # the C tracker goes on exactly as the Python one that never saw the message
    session.client("E", execute("p1"))
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), READY, complete("SELECT 1"), READY)
    session.server(complete("SELECT 1"), READY)
    session.abandon()
    assert len(session.rows()) == 2


def test_long_binary_integer_punts_at_execute_and_changes_nothing() -> None:
    session = Session()
    session.client("P", parse("SELECT $1", (20,)))
    session.client("B", bind([bytes(9)], (1,)))
    assert session.client("E", execute()) == PUNT
    session.client("B", bind([bytes(8)], (1,)))
    session.client("E", execute())
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), READY)
    assert session.rows()[0]["details"]["parameters"] == ["0"]


def test_secret_hint_is_a_superset_of_pythons() -> None:
    for text in ["password", "PassWord=x", "pa\u017f\u017fword", "PA\u017fSWORD", "x://y", "postgres://u:p@h",
                 "ALTER ROLE r PASSWORD 'p'"]:
        assert pgtrack.might_hold_secret(text.encode())
    for text in ["passwor", "pass word", "SELECT 1", ":/ /", "pa\u017ft", "p\u00e1ssword"]:
        assert not pgtrack.might_hold_secret(text.encode())


def test_only_the_long_s_folds_into_password_letters() -> None:
    """redact_statement's hint is a str regex with Unicode case folding: the C hint counts on
    no character but ASCII letters and U+017F matching the letters of "password"."""
    letters = re.compile("(?i)[pasword]")
    folded = {chr(c) for c in range(sys.maxunicode + 1) if letters.fullmatch(chr(c))}
    assert folded == set("passwordPASSWORD\u017f")


hint_texts = st.text(st.sampled_from("pasword PASWORD:/@\u017f\u00e9x="), max_size=24)


@given(hint_texts | st.text(max_size=24))
def test_no_secret_hint_means_python_redacts_nothing(text: str) -> None:
    raw = text.encode()
    if not pgtrack.might_hold_secret(raw):
        assert redact_statement(text) == text
        assert not might_hold_secret(raw)


# ------------------------------------------------------------------------------------------------
# malformed messages
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("msg_type", "body"), [
    ("Q", b""), ("Q", b"no terminator"), ("P", b"s\x00"), ("P", b"\x00q\x00\x00"), ("P", b"\x00q\x00\x00\x02abcd"),
    ("B", b""), ("B", b"\x00\x00\x00\x01\x00\x01"), ("B", bind([b"a", b"b"], (0, 0, 0))),
    ("B", bind([b"abc"])[:-4]), ("E", b""), ("E", b"p\x00\x00\x00"), ("C", b""), ("C", b"S"), ("D", b"Sname"),
])
def test_malformed_client_messages_are_violations_and_change_nothing(msg_type: str, body: bytes) -> None:
    session = Session()
    session.client("P", parse("SELECT 1", name="s"))
    assert session.client(msg_type, body) == VIOLATION
    session.client("S")
    session.server(PARSE_COMPLETE, READY)


@pytest.mark.parametrize("frame", [
    m.frame(b"C", b"no terminator"), m.frame(b"C", b""), m.frame(b"E", b""), m.frame(b"E", b"Mno terminator"),
    m.frame(b"E", b"Cabc\x00"), m.frame(b"t", b""), m.frame(b"t", b"\x00\x02\x00\x00\x00\x17"),
])
def test_malformed_server_messages_are_violations_with_pythons_side_effects(frame: bytes) -> None:
    session = Session()
    session.client("P", parse("SELECT 1"))
    session.client("D", describe("S"))
    session.client("B", bind())
    session.client("E", execute())
    session.client("S")
    assert session.server(ROW_DESCRIPTION, row(b"1"), frame) == VIOLATION
    session.abandon()


client_types = st.sampled_from("QPBECDSHXd")
server_types = st.sampled_from("CEZIst")


@settings(max_examples=400, deadline=None)
@given(client_types, st.binary(max_size=40))
@example("B", b"\x00\x00\xff\xff\x00\x00\x00\x00")
@example("B", b"\x00\x00\x00\x00\xff\xff\x00\x00")
def test_random_client_bodies_fail_exactly_where_python_fails(msg_type: str, body: bytes) -> None:
    session = Session()
    session.client("P", parse("SELECT $1", (23,), name="a"))
    session.client("B", bind([b"\x00\x00\x00\x01"], (1,), statement="a", portal="a"))
    session.client(msg_type, body)
    session.client("E", execute("a"))
    session.client("S")
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), READY, READY)
    session.abandon()


@settings(max_examples=400, deadline=None)
@given(server_types, st.binary(max_size=40), st.booleans())
def test_random_server_bodies_fail_exactly_where_python_fails(msg_type: str, body: bytes, per_frame: bool) -> None:
    try:  # Python's int() of a tag ending in a non-decimal digit raises ValueError: not compared
        m.rows_from_tag(m.parse_command_complete(body)) if msg_type == "C" else None
    except (m.ProtocolViolation, ValueError) as exc:
        assume(isinstance(exc, m.ProtocolViolation))
    session = Session()
    session.client("P", parse("SELECT $1", name="a"))
    session.client("D", describe("S", "a"))
    session.client("B", bind([b"1"], statement="a"))
    session.client("E", execute())
    session.client("S")
    session.client("Q", query("SELECT 2"))
    session.server(PARSE_COMPLETE, row(b"1"), m.frame(msg_type.encode(), body), complete("SELECT 1"),
                   per_frame=per_frame)
    session.abandon()


# ------------------------------------------------------------------------------------------------
# export and handover
# ------------------------------------------------------------------------------------------------


def test_export_rebuilds_a_python_tracker_that_continues_identically() -> None:
    session = Session()
    session.client("P", parse("SELECT $1, $2", (23, 25), name="stmt \u00e9"))
    session.client("P", parse("SELECT 'unnamed'"))
    session.client("P", parse(b"SELECT '\xff'", name=b"\xff"))
    session.client("D", describe("S", "stmt \u00e9"))
    session.client("B", bind([struct.pack("!i", 5), b"x"], (1, 0), statement="stmt \u00e9", portal="p1"))
    session.client("B", bind(portal="", statement=""))
    session.client("S")
    session.server(PARSE_COMPLETE, PARSE_COMPLETE, PARSE_COMPLETE, parameter_description(20, 25), NO_DATA,
                   BIND_COMPLETE, BIND_COMPLETE, READY, row(b"stray"))
    prepared, portals = session.c.export()
    assert prepared == {"stmt \u00e9": ("SELECT $1, $2", (20, 25), None), "": ("SELECT 'unnamed'", (), None),
                        "\ufffd": ("SELECT '\ufffd'", (), None)}
    assert set(portals) == {"p1", ""}
    session.handover()
    session.client("E", execute("p1"))
    session.client("E", execute(""))
    session.client("B", bind([b"1"], statement="\ufffd".encode()))
    session.client("E", execute())
    session.client("S")
    session.server(complete("SELECT 1"), complete("SELECT 1"), BIND_COMPLETE, complete("SELECT 1"), READY)
    assert len(session.rows()) == 3


def test_export_after_close_forgets_what_was_closed() -> None:
    session = Session()
    for i in range(40):  # enough named entries to grow and shrink the maps
        session.client("P", parse(f"SELECT {i}", name=f"s{i}"))
        session.client("B", bind(statement=f"s{i}", portal=f"p{i}"))
    for i in range(0, 40, 3):
        session.client("C", close("S", f"s{i}"))
        session.client("C", close("P", f"p{i}"))
    session.client("C", close("S", "never"))
    session.client("S")
    session.server(READY)
    session.handover()
    for i in range(40):
        session.client("E", execute(f"p{i}"))
    session.client("S")
    session.server(*[complete("SELECT 1")] * 40, READY)


def test_handover_carries_the_prepared_statements_verdicts() -> None:
    session = Session()
    session.client("P", parse("INSERT INTO t VALUES ($1)", name="ins"), verdict=LOG_WRITES)
    session.client("P", parse("SELECT $1"), verdict=APPROVED)
    session.client("P", parse("SELECT 1", name="plain"))
    session.client("S")
    session.server(PARSE_COMPLETE, PARSE_COMPLETE, PARSE_COMPLETE, READY)
    prepared, _ = session.c.export()
    assert {name: _verdict(verdict) for name, (_, _, verdict) in prepared.items()} == {
        "ins": LOG_WRITES, "": APPROVED, "plain": None}
    session.handover()
    for name in ("ins", "", "plain"):
        session.client("B", bind([b"1"], statement=name))
        session.client("E", execute())
    session.client("S")
    session.server(*[BIND_COMPLETE, complete("SELECT 1")] * 3, READY)
    assert [event.get("rule") for event in session.rows()] == ["log-writes", "changes-need-approval", None]


def test_takeover_mid_pipeline_carries_the_verdicts_in_flight() -> None:
    session = Session()
    session.client("P", parse("INSERT INTO t VALUES ($1)", name="ins"), verdict=LOG_WRITES)
    session.client("S")
    session.server(PARSE_COMPLETE, READY)
    session.client("Q", query("INSERT INTO t VALUES (0)"), verdict=LOG_ODD_NAMES)
    session.client("B", bind([b"1"], statement="ins"))
    session.client("E", execute())
    session.client("P", parse("INSERT INTO u VALUES (1)"), verdict=ALLOWED_BY_RULE)  # its error comes later
    session.client("S")
    session.client("P", parse("INSERT INTO v VALUES (1)"), verdict=APPROVED)  # still open
    session.server(complete("INSERT 0 1"))
    state = session.c.export_state()
    assert [s["verdict"] for g in state["groups"] for s in g["statements"]] == [doc(LOG_ODD_NAMES), doc(LOG_WRITES)]
    assert [g["parse_verdict"] for g in state["groups"]] == [None, doc(ALLOWED_BY_RULE), doc(APPROVED)]
    session.takeover()
    session.client("B", bind())
    session.client("E", execute())
    session.client("S")
    session.server(READY, BIND_COMPLETE, complete("INSERT 0 1"), error("42P01", "no u"), READY)
    session.server(PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"), READY)
    session.client("B", bind([b"2"], statement="ins"))
    session.client("E", execute())
    session.client("S")
    session.server(BIND_COMPLETE, complete("INSERT 0 1"), READY)
    assert [event["rule"] for event in session.rows()] == [
        LOG_ODD_NAMES.rule, "log-writes", "reads", "changes-need-approval", "log-writes"]
    assert session.rows()[2]["details"]["kind"] == "parse"
    assert session.rows()[3]["approval_id"] == "a-17"


# ------------------------------------------------------------------------------------------------
# the pieces, against Python
# ------------------------------------------------------------------------------------------------


@given(st.binary(max_size=64) | st.lists(st.sampled_from([b"\xe0", b"\xa0", b"\x80", b"\xed", b"\xf0", b"\x90",
                                                          b"\xf4", b"\xbf", b"\xc2", b"\xc1", b"\xf5", b"a",
                                                          b"\xef\xbf\xbd", b"\xc5\xbf"]), max_size=12).map(b"".join))
def test_utf8_replacement_is_cpythons(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    assert pgtrack.utf8_replace(data) == text.encode()
    assert b'"' + pgtrack.json_text(data) + b'"' == orjson.dumps(text)


@given(st.text(max_size=64) | st.text(st.characters(max_codepoint=0x7F), max_size=64))
def test_json_strings_are_orjsons(text: str) -> None:
    assert b'"' + pgtrack.json_text(text.encode()) + b'"' == orjson.dumps(text)


def _floats_to_check() -> st.SearchStrategy[float]:
    powers = st.integers(-1074, 1023).map(lambda e: math.ldexp(1.0, e))
    singles = st.integers(0, 2**32 - 1).map(lambda bits: struct.unpack("!f", struct.pack("!I", bits))[0])
    return st.floats(allow_nan=True, allow_infinity=True) | powers | singles | st.floats(-1e6, 1e6)


@settings(max_examples=3000)
@given(_floats_to_check())
def test_float_formatting_is_reprs_and_orjsons(x: float) -> None:
    assert pgtrack.format_double(x, False) == repr(x).encode()
    assert pgtrack.format_double(x, True) == orjson.dumps(x)


def test_every_power_of_two_formats_as_repr() -> None:
    for e in range(-1074, 1024):
        x = math.ldexp(1.0, e)
        assert pgtrack.format_double(x, False) == repr(x).encode()


durations = st.floats(0, 10) | st.floats(-1e3, 1e13) | st.integers(0, 10**7).map(lambda n: n / 2000)


@settings(max_examples=3000)
@given(st.floats(1e3, 1e7), durations)
@example(1000.0, 0.0005)
@example(1000.0, 1.0625)
@example(0.0, 1e300)
def test_duration_is_round_to_three_places_as_orjson_writes_it(started: float, elapsed: float) -> None:
    finished = started + elapsed
    assert pgtrack.format_duration(finished, started) == orjson.dumps(round((finished - started) * 1000, 3))


def _near_ties() -> st.SearchStrategy[float]:
    """Values whose product by 1000 is a tie between two integers (odd sixteenths), or rounds to one
    while the exact product is not (half the neighbours of (m + 0.5) / 1000 are such)."""
    sixteenths = st.integers(-(2**40), 2**40).map(lambda j: (2 * j + 1) / 16)
    halves = st.integers(-(10**14), 10**14).map(lambda m: (m + 0.5) / 1000)
    return sixteenths | st.builds(lambda x, up: math.nextafter(x, math.inf if up else -math.inf), halves,
                                  st.booleans())


@settings(max_examples=5000)
@given(_near_ties() | st.floats(-1e13, 1e13) | st.floats(-1, 1) | st.floats(allow_nan=True, allow_infinity=True))
@example(-0.0)
@example(-0.0004)
@example(999999999999.9995)
def test_milliseconds_round_to_three_places_exactly(x: float) -> None:
    assert pgtrack.format_ms(x) == orjson.dumps(round(x, 3))


@given(st.text(max_size=20) | st.text(st.sampled_from("SELECT 0123456789 \t\u00a0\u0663\u00b2x"), max_size=20))
def test_rows_from_tag_is_pythons(tag: str) -> None:
    try:
        expected = m.rows_from_tag(tag)
    except ValueError:  # int() of a digit that is not decimal: Python's tracker raises, C counts nothing
        expected = None
    assert pgtrack.rows_from_tag(tag.encode()) == expected


parameter_values = (st.none() | st.binary(max_size=20) | st.binary(min_size=500, max_size=530)
                    | st.text(min_size=1020, max_size=1030).map(str.encode)
                    | st.sampled_from([bytes(n) for n in (1, 2, 4, 8, 16)] + [b"\x01", b"\xff" * 8]))
type_oids = st.sampled_from([0, 16, 17, 19, 20, 21, 23, 25, 114, 700, 701, 1042, 1043, 2950, 4294967295])


@settings(max_examples=1000)
@given(parameter_values, st.sampled_from([0, 1, 2, -1]), type_oids)
def test_parameter_rendering_is_pythons(value: bytes | None, fmt: int, oid: int) -> None:
    rendered = pgtrack.parameter(value, fmt, oid)
    if rendered is None:  # punted: an integer of more than 8 bytes
        assert value is not None and len(value) > 8 and fmt != 0 and oid in (20, 21, 23)
        return
    assert rendered == orjson.dumps(_parameter(value, fmt, oid))


# ------------------------------------------------------------------------------------------------
# random sessions
# ------------------------------------------------------------------------------------------------

# few names, so that statements, portals and Describes meet; ill-formed UTF-8 decodes to U+FFFD
names = st.sampled_from([b"", b"", b"", b"s1", b"s1", b"p\xc3\xa9", b"\xff", b"\xef\xbf\xbd", b"\xe2\x82"])
texts = (st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=24).map(str.encode)
         | st.binary(max_size=16).map(lambda b: b.replace(b"\x00", b""))
         | st.sampled_from([b"SELECT 1", "select 'caf\u00e9' -- \"q\" \\ \t\n\x01".encode(),
                            "😀 \u017f \u2028".encode(), b""]))
type_lists = st.lists(type_oids, max_size=4)


@st.composite
def bind_bodies(draw) -> bytes:
    params = draw(st.lists(parameter_values, max_size=4))
    formats = draw(st.sampled_from(["none", "one", "each"]))
    if formats == "none":
        codes: list[int] = []
    elif formats == "one":
        codes = [draw(st.sampled_from([0, 1]))]
    else:
        codes = draw(st.lists(st.sampled_from([0, 1, 2]), min_size=len(params), max_size=len(params)))
    return bind(params, codes, portal=draw(names), statement=draw(names), results=draw(st.lists(st.just(0),
                                                                                             max_size=2)))


verdicts = st.sampled_from([None, None, *VERDICTS])  # a client message: (type, body[, verdict])
parses = st.builds(lambda text, types, name, verdict: ("P", parse(text, types, name), verdict), texts, type_lists,
                   names, verdicts)
binds = bind_bodies().map(lambda body: ("B", body))
executes = st.builds(lambda name, rows: ("E", execute(name, rows)), names, st.integers(0, 3))
extended_messages = st.one_of(
    parses, parses, binds, binds, executes, executes, executes,
    st.builds(lambda kind, name: ("D", describe(kind, name)), st.sampled_from("SSP"), names),
    st.builds(lambda kind, name: ("C", close(kind, name)), st.sampled_from("SPX"), names),
    st.sampled_from([("H", b""), ("S", b""), ("X", b"")]),
)
other_messages = st.one_of(
    st.builds(lambda text, verdict: ("Q", query(text), verdict), texts, verdicts),
    st.binary(max_size=8).map(lambda body: ("F", body)),
)


def _safe_tag(tag: bytes) -> bool:
    try:
        m.rows_from_tag(tag.decode(errors="replace"))
    except ValueError:
        return False
    return True


tags = st.sampled_from([b"SELECT 3", b"INSERT 0 2", b"UPDATE 7", b"BEGIN", b"COPY 4", b"FETCH 2", b"SELECT 0",
                        b"DELETE 12345678901"]) | texts.filter(_safe_tag)
error_bodies = st.lists(st.tuples(st.sampled_from(b"CMSVDHCM"), texts), max_size=4).map(
    lambda fields: b"".join(bytes([code]) + value + b"\x00" for code, value in fields) + b"\x00")
ready_frames = st.sampled_from([b"I", b"T", b"E"]).map(m.ready_for_query)
answer_frames = st.one_of(
    tags.map(complete), tags.map(complete), tags.map(complete), ready_frames, ready_frames,
    error_bodies.map(lambda body: m.frame(b"E", body)),
    st.binary(max_size=8).map(lambda body: m.frame(b"D", body)),
    st.sampled_from([PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE, NO_DATA, ROW_DESCRIPTION, EMPTY_QUERY,
                     PORTAL_SUSPENDED, COPY_IN_RESPONSE, COPY_OUT_RESPONSE, COPY_DONE, m.parameter_status("a", "b"),
                     m.notice_response("hi")]),
    st.binary(max_size=8).map(lambda body: m.frame(b"d", body)),
    type_lists.map(lambda types: parameter_description(*types)),
)
steps = st.sampled_from([0.0, 0.0005, 0.001, 0.0015, 0.25, 1.0625]) | st.floats(0, 5)
session_ops = st.one_of(
    st.tuples(st.just("client"), st.lists(extended_messages, min_size=1, max_size=6), st.booleans(), steps),
    st.tuples(st.just("client"), st.lists(extended_messages, min_size=1, max_size=6), st.booleans(), steps),
    st.tuples(st.just("client"), st.lists(other_messages, min_size=1, max_size=2), st.just(False), steps),
    st.tuples(st.just("server"), st.lists(answer_frames, min_size=1, max_size=8), steps, st.booleans()),
    st.tuples(st.just("server"), st.lists(answer_frames, min_size=1, max_size=8), steps, st.booleans()),
    st.tuples(st.just("cycle"), st.lists(extended_messages | other_messages, min_size=1, max_size=6),
              st.lists(answer_frames, max_size=8), ready_frames, steps, st.booleans()),
    st.tuples(st.just("cycle"), st.lists(extended_messages, min_size=1, max_size=6),
              st.lists(answer_frames, max_size=8), ready_frames, steps, st.booleans()),
    st.tuples(st.just("copy"), st.integers(0, 10_000)),
    st.tuples(st.just("handover")),
    st.tuples(st.just("takeover")),
)


def run_session(record_parameters: bool, ops: list[tuple]) -> Session:
    session = Session(record_parameters=record_parameters)
    for op in ops:
        if op[0] == "client":
            for msg_type, body, *verdict in op[1]:
                session.client(msg_type, body, dt=op[3], verdict=verdict[0] if verdict else None)
            if op[2]:
                session.client("S", dt=op[3])
        elif op[0] == "server":
            session.server(*op[1], dt=op[2], per_frame=op[3])
        elif op[0] == "cycle":  # a batch, its Sync, then answers up to a ReadyForQuery
            _, messages, answers, ready, dt, per_frame = op
            for msg_type, body, *verdict in messages:
                session.client(msg_type, body, dt=dt, verdict=verdict[0] if verdict else None)
            session.client("S", dt=dt)
            session.server(*answers, ready, dt=dt, per_frame=per_frame)
        elif op[0] == "copy":
            session.copy(op[1])
        elif op[0] == "takeover":
            session.takeover()
        elif session.c.in_flight() == 0:
            session.handover()
    session.abandon()
    return session


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(session_ops, max_size=30))
def test_random_sessions_write_identical_evidence(record_parameters: bool, ops: list[tuple]) -> None:
    run_session(record_parameters, ops)
