"""Statement bookkeeping: the client's requests and the server's answers, fed the way the relay
feeds them (decoded messages to client_message/server_message, DataRows and COPY data only
counted), become one Statement per statement, in order, when the ReadyForQuery arrives."""

from __future__ import annotations

import contextlib
import struct
import time
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_plane.core.session import Statement
from data_plane.postgres import messages as m
from data_plane.postgres.framescan import scan_frames
from data_plane.postgres.messages import ProtocolViolation
from data_plane.postgres.tracker import MAX_PARAMETER_CHARS, SERVER_DECODED, StatementTracker

# ------------------------------------------------------------------------------------------------
# message builders the codec has no use for (the gateway never sends them itself)
# ------------------------------------------------------------------------------------------------


def parse_msg(query: str, types: tuple[int, ...] = (), name: str = "") -> bytes:
    return m.frame(b"P", m.cstring(name) + m.cstring(query) + struct.pack("!h", len(types))
                   + b"".join(struct.pack("!I", t) for t in types))


def bind_msg(params: Sequence[bytes | None] = (), formats: tuple[int, ...] = (), *, statement: str = "",
             portal: str = "", results: tuple[int, ...] = ()) -> bytes:
    body = [m.cstring(portal), m.cstring(statement), struct.pack("!h", len(formats))]
    body += [struct.pack("!h", f) for f in formats]
    body.append(struct.pack("!h", len(params)))
    for value in params:
        body.append(struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value)
    body.append(struct.pack("!h", len(results)))
    body += [struct.pack("!h", f) for f in results]
    return m.frame(b"B", b"".join(body))


def execute_msg(portal: str = "", max_rows: int = 0) -> bytes:
    return m.frame(b"E", m.cstring(portal) + struct.pack("!i", max_rows))


def describe_msg(kind: str = "S", name: str = "") -> bytes:
    return m.frame(b"D", kind.encode() + m.cstring(name))


def close_msg(kind: str, name: str) -> bytes:
    return m.frame(b"C", kind.encode() + m.cstring(name))


SYNC = m.frame(b"S")
PARSE_COMPLETE = m.frame(b"1")
BIND_COMPLETE = m.frame(b"2")
NO_DATA = m.frame(b"n")
PORTAL_SUSPENDED = m.frame(b"s")
EMPTY_QUERY = m.frame(b"I")
COPY_IN_RESPONSE = m.frame(b"G", b"\x00" + struct.pack("!h", 1) + struct.pack("!h", 0))
ROW_DESCRIPTION = m.frame(b"T", struct.pack("!h", 1) + m.cstring("x") + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0))


def complete(tag: str) -> bytes:
    return m.frame(b"C", m.cstring(tag))


def row(*values: bytes | None) -> bytes:
    return m.data_row(list(values))


class Wire:
    """Drives a StatementTracker the way the relay does."""

    CLIENT_DECODED = frozenset(b"QPBESFCDHX")

    def __init__(self, **options: bool) -> None:
        self.completed: list[Statement] = []
        self.tracker = StatementTracker(self.completed.append, **options)
        self.t0 = time.monotonic()

    def client(self, *frames: bytes) -> None:
        for msg_type, body in m.iter_frames(b"".join(frames)):
            if msg_type[0] in self.CLIENT_DECODED:
                self.tracker.client_message(msg_type[0], body)

    def copy_data(self, data: bytes) -> int:
        chunk = m.frame(b"d", data)
        self.tracker.client_copy_bytes(len(chunk))
        return len(chunk)

    def server(self, *frames: bytes, at: float = 0.0) -> None:
        now = self.t0 + at
        for msg_type, body in m.iter_frames(b"".join(frames)):
            self.tracker.server_bytes(5 + len(body))
            if msg_type == b"D":  # the relay counts DataRows without decoding them
                self.tracker.rows(1)
            else:
                self.tracker.server_message(msg_type[0], body, now)


def ready(status: bytes = b"I") -> bytes:
    return m.ready_for_query(status)


# ------------------------------------------------------------------------------------------------
# simple query protocol
# ------------------------------------------------------------------------------------------------


def test_simple_query_records_tag_rows_bytes_and_duration() -> None:
    wire = Wire()
    wire.client(m.query("SELECT id FROM t"))
    rows = [row(b"1"), row(b"2"), row(None)]
    wire.server(ROW_DESCRIPTION, *rows, complete("SELECT 3"), at=0.25)
    assert wire.completed == []  # nothing is final before ReadyForQuery
    wire.server(ready(), at=0.25)
    [statement] = wire.completed
    assert statement.text == "SELECT id FROM t"
    assert statement.kind == "query"
    assert statement.command_tag == "SELECT 3"
    assert statement.rows == 3
    # A statement's bytes: everything the server sent in answer to it, as the relay attributes them.
    assert statement.bytes == len(ROW_DESCRIPTION) + sum(len(r) for r in rows) + len(complete("SELECT 3")) + len(
        ready())
    assert statement.sqlstate is None
    assert statement.error is None
    assert not statement.skipped
    assert statement.parameters is None
    assert 240 < statement.duration_ms <= 250


def test_multi_statement_simple_query_joins_tags_and_counts_rows() -> None:
    wire = Wire()
    wire.client(m.query("SELECT 1; SELECT 2"))
    wire.server(ROW_DESCRIPTION, row(b"1"), complete("SELECT 1"), ROW_DESCRIPTION, row(b"2"), complete("SELECT 1"),
                ready())
    [statement] = wire.completed
    assert statement.command_tag == "SELECT 1; SELECT 1"
    assert statement.rows == 2


def test_multi_statement_writes_add_up_their_counts() -> None:
    wire = Wire()
    wire.client(m.query("INSERT INTO t VALUES (1); UPDATE t SET x = 2; DELETE FROM t"))
    wire.server(complete("INSERT 0 1"), complete("UPDATE 4"), complete("DELETE 5"), ready())
    [statement] = wire.completed
    assert statement.command_tag == "INSERT 0 1; UPDATE 4; DELETE 5"
    assert statement.rows == 10


def test_select_rows_come_from_the_tag_when_rows_were_not_counted() -> None:
    wire = Wire()
    wire.client(m.query("SELECT * FROM big"))
    wire.server(complete("SELECT 7"), ready())
    assert wire.completed[0].rows == 7


def test_simple_query_delete_returning_counts_each_row_once() -> None:
    wire = Wire()
    wire.client(m.query("DELETE FROM t WHERE id < 3 RETURNING id"))
    wire.server(ROW_DESCRIPTION, row(b"1"), row(b"2"), complete("DELETE 2"), ready())
    assert wire.completed[0].rows == 2


def test_simple_query_error_records_sqlstate_and_message() -> None:
    wire = Wire()
    wire.client(m.query("SELEC 1"))
    wire.server(m.error_response("42601", 'syntax error at or near "SELEC"'), ready(), at=0.01)
    [statement] = wire.completed
    assert statement.sqlstate == "42601"
    assert statement.error == 'syntax error at or near "SELEC"'
    assert statement.command_tag is None
    assert statement.finished_mono == wire.t0 + 0.01
    assert not statement.skipped


def test_error_after_an_earlier_statement_of_the_same_query_keeps_both_facts() -> None:
    wire = Wire()
    wire.client(m.query("INSERT INTO t VALUES (1); INSERT INTO t VALUES (1)"))
    wire.server(complete("INSERT 0 1"), m.error_response("23505", "duplicate key"), ready(b"I"))
    [statement] = wire.completed
    assert statement.command_tag == "INSERT 0 1"
    assert statement.rows == 1
    assert statement.sqlstate == "23505"


def test_empty_simple_query_has_an_empty_tag() -> None:
    wire = Wire()
    wire.client(m.query(""))
    wire.server(EMPTY_QUERY, ready())
    [statement] = wire.completed
    assert statement.command_tag == ""
    assert statement.sqlstate is None


def test_back_to_back_simple_queries_complete_in_order() -> None:
    wire = Wire()
    wire.client(m.query("SELECT 1"), m.query("BEGIN"))
    wire.server(row(b"1"), complete("SELECT 1"), ready())
    assert [s.text for s in wire.completed] == ["SELECT 1"]
    wire.server(complete("BEGIN"), ready(b"T"))
    assert [(s.text, s.command_tag, s.rows) for s in wire.completed] == [("SELECT 1", "SELECT 1", 1),
                                                                        ("BEGIN", "BEGIN", 0)]


def test_server_messages_with_nothing_in_flight_are_ignored() -> None:
    wire = Wire()
    wire.server(m.notice_response("hello"), m.parameter_status("TimeZone", "UTC"), ready())
    wire.tracker.rows(3)
    wire.tracker.server_bytes(10)
    assert wire.completed == []


# ------------------------------------------------------------------------------------------------
# COPY
# ------------------------------------------------------------------------------------------------


def test_copy_from_stdin_counts_client_bytes_and_tag_rows() -> None:
    wire = Wire()
    wire.client(m.query("COPY t FROM STDIN"))
    wire.server(COPY_IN_RESPONSE)
    sent = sum(wire.copy_data(line) for line in (b"1\ta\n", b"2\tb\n", b"3\tc\n"))
    wire.client(m.frame(b"c"))
    wire.server(complete("COPY 3"), ready())
    [statement] = wire.completed
    assert statement.command_tag == "COPY 3"
    assert statement.rows == 3
    assert statement.bytes == sent + len(COPY_IN_RESPONSE) + len(complete("COPY 3")) + len(ready())


def test_copy_bytes_after_the_statement_completed_are_not_attributed() -> None:
    wire = Wire()
    wire.client(m.query("SELECT 1"))
    wire.server(complete("SELECT 1"), ready())
    wire.copy_data(b"stray")
    assert wire.completed[0].bytes == len(complete("SELECT 1")) + len(ready())


# ------------------------------------------------------------------------------------------------
# extended query protocol
# ------------------------------------------------------------------------------------------------


def test_extended_query_records_text_tag_rows_and_decoded_parameters() -> None:
    wire = Wire()
    wire.client(parse_msg("SELECT $1::int, $2, $3, $4", types=(23, 25, 25, 0)),
                bind_msg([struct.pack("!i", 42), b"hello", None, b"\x01\x02"], formats=(1, 0, 0, 1)),
                describe_msg("P"), execute_msg(), SYNC)
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, ROW_DESCRIPTION, row(b"42", b"hello", None, b"\x01\x02"),
                complete("SELECT 1"), at=0.05)
    wire.server(ready(), at=0.1)
    [statement] = wire.completed
    assert statement.text == "SELECT $1::int, $2, $3, $4"
    assert statement.parameters == ["42", "hello", None, "\\x0102"]
    assert statement.command_tag == "SELECT 1"
    assert statement.rows == 1
    assert statement.finished_mono == wire.t0 + 0.05  # CommandComplete, not ReadyForQuery, ends it


@pytest.mark.parametrize(("type_oid", "value", "text"), [
    (23, struct.pack("!i", -7), "-7"),
    (21, struct.pack("!h", 300), "300"),
    (20, struct.pack("!q", 1 << 40), str(1 << 40)),
    (16, b"\x01", "true"),
    (16, b"\x00", "false"),
    (701, struct.pack("!d", 1.5), "1.5"),
    (700, struct.pack("!f", 0.25), "0.25"),
    (2950, bytes(range(16)), "00010203-0405-0607-0809-0a0b0c0d0e0f"),
    (25, "naïve".encode(), "naïve"),
    (1043, b"varchar", "varchar"),
    (2950, b"\x01\x02", "\\x0102"),  # not 16 bytes: hex instead of a crash
    (701, b"\x01", "\\x01"),
    (17, b"\xde\xad", "\\xdead"),  # bytea: not decoded
])
def test_binary_parameters_are_decoded_by_declared_type(type_oid: int, value: bytes, text: str) -> None:
    wire = Wire()
    wire.client(parse_msg("SELECT $1", types=(type_oid,), name="s1"),
                bind_msg([value], formats=(1,), statement="s1"), execute_msg(), SYNC)
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 0"), ready())
    assert wire.completed[0].parameters == [text]


def test_text_parameters_are_recorded_as_sent_whatever_their_type() -> None:
    wire = Wire()
    wire.client(parse_msg("SELECT $1, $2", types=(23, 0)), bind_msg([b"42", b"x"]), execute_msg(), SYNC)
    wire.server(complete("SELECT 0"), ready())
    assert wire.completed[0].parameters == ["42", "x"]


def test_long_parameters_are_truncated() -> None:
    wire = Wire()
    wire.client(parse_msg("SELECT $1"), bind_msg([b"a" * 5000]), execute_msg(), SYNC)
    wire.server(complete("SELECT 0"), ready())
    [value] = wire.completed[0].parameters
    assert value == "a" * MAX_PARAMETER_CHARS + "…"


def test_record_parameters_false_records_no_parameters() -> None:
    wire = Wire(record_parameters=False)
    wire.client(parse_msg("SELECT $1", types=(23,)), bind_msg([struct.pack("!i", 42)], formats=(1,)),
                execute_msg(), SYNC)
    wire.server(complete("SELECT 1"), ready())
    assert wire.completed[0].parameters is None


def test_named_statement_executes_again_with_new_parameters() -> None:
    wire = Wire()
    wire.client(parse_msg("UPDATE t SET x = $1", name="upd"), SYNC)
    wire.server(PARSE_COMPLETE, ready())
    assert wire.completed == []  # a Parse that succeeds is not a statement
    for value in (b"1", b"2"):
        wire.client(bind_msg([value], statement="upd"), execute_msg(), SYNC)
        wire.server(BIND_COMPLETE, complete("UPDATE 3"), ready())
    assert [(s.text, s.parameters, s.rows) for s in wire.completed] == [
        ("UPDATE t SET x = $1", ["1"], 3), ("UPDATE t SET x = $1", ["2"], 3)]


def test_execute_of_an_unknown_portal_is_still_recorded() -> None:
    wire = Wire()
    wire.client(execute_msg("nope"), SYNC)
    wire.server(m.error_response("34000", 'portal "nope" does not exist'), ready())
    [statement] = wire.completed
    assert statement.text == "<unknown prepared statement>"
    assert statement.sqlstate == "34000"


def test_closed_statement_is_forgotten() -> None:
    wire = Wire()
    wire.client(parse_msg("SELECT 1", name="s1"), close_msg("S", "s1"), SYNC)
    wire.server(PARSE_COMPLETE, m.frame(b"3"), ready())
    assert "s1" not in wire.tracker.prepared
    assert wire.completed == []


def test_pipeline_error_fails_that_statement_and_skips_the_rest_of_the_sync_group() -> None:
    wire = Wire()
    wire.client(parse_msg("INSERT INTO t VALUES (1)"), bind_msg(), execute_msg(),
                parse_msg("INSERT INTO t VALUES (1)"), bind_msg(), execute_msg(),
                parse_msg("INSERT INTO t VALUES (2)"), bind_msg(), execute_msg(), SYNC)
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, complete("INSERT 0 1"), at=0.01)
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, m.error_response("23505", "duplicate key value"), at=0.02)
    wire.server(ready(), at=0.03)
    first, second, third = wire.completed
    assert (first.command_tag, first.rows, first.sqlstate, first.skipped) == ("INSERT 0 1", 1, None, False)
    assert (second.sqlstate, second.error, second.skipped) == ("23505", "duplicate key value", False)
    assert second.finished_mono == wire.t0 + 0.02
    assert third.skipped
    assert third.sqlstate is None
    assert third.command_tag is None
    assert third.finished_mono == wire.t0 + 0.03


def test_two_sync_groups_in_flight_pair_with_their_own_responses() -> None:
    wire = Wire()
    wire.client(parse_msg("SELECT a FROM t"), bind_msg(), execute_msg(), SYNC,
                parse_msg("SELECT b FROM u WHERE x = $1"), bind_msg([b"7"]), execute_msg(), SYNC)
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, row(b"1"), complete("SELECT 1"), ready())
    assert [s.text for s in wire.completed] == ["SELECT a FROM t"]
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, row(b"1"), row(b"2"), complete("SELECT 2"), ready())
    assert [(s.text, s.rows, s.parameters) for s in wire.completed] == [
        ("SELECT a FROM t", 1, []), ("SELECT b FROM u WHERE x = $1", 2, ["7"])]


def test_error_in_one_sync_group_does_not_skip_the_next() -> None:
    wire = Wire()
    wire.client(parse_msg("SELECT 1/0"), bind_msg(), execute_msg(), SYNC,
                parse_msg("SELECT 1"), bind_msg(), execute_msg(), SYNC)
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, m.error_response("22012", "division by zero"), ready(),
                PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), ready())
    failed, ok = wire.completed
    assert failed.sqlstate == "22012"
    assert ok.sqlstate is None
    assert not ok.skipped
    assert ok.command_tag == "SELECT 1"


def test_parse_error_before_any_execute_is_a_parse_statement() -> None:
    wire = Wire()
    wire.client(parse_msg("SELEC oops", name="bad"), describe_msg("S", "bad"), SYNC)
    wire.server(m.error_response("42601", 'syntax error at or near "SELEC"'), ready())
    [statement] = wire.completed
    assert statement.kind == "parse"
    assert statement.text == "SELEC oops"
    assert statement.sqlstate == "42601"
    assert statement.finished_mono is not None


def test_parse_error_with_an_execute_in_the_group_fails_that_execute() -> None:
    wire = Wire()
    wire.client(parse_msg("SELEC oops"), bind_msg(), execute_msg(), SYNC)
    wire.server(m.error_response("42601", "syntax error"), ready())
    [statement] = wire.completed
    assert statement.kind == "query"
    assert statement.sqlstate == "42601"


def test_parse_error_after_a_completed_execute_adds_a_parse_statement() -> None:
    wire = Wire()
    wire.client(parse_msg("SELECT 1"), bind_msg(), execute_msg(), parse_msg("SELEC 2", name="s2"), SYNC)
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, complete("SELECT 1"), m.error_response("42601", "syntax"), ready())
    ok, bad = wire.completed
    assert (ok.kind, ok.sqlstate) == ("query", None)
    assert (bad.kind, bad.text, bad.sqlstate) == ("parse", "SELEC 2", "42601")


def test_portal_suspended_ends_the_execute_and_the_portal_runs_on() -> None:
    wire = Wire()
    wire.client(parse_msg("SELECT * FROM big"), bind_msg(portal="c1"), execute_msg("c1", 2), SYNC)
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, row(b"1"), row(b"2"), PORTAL_SUSPENDED, ready(b"T"))
    [first] = wire.completed
    assert first.command_tag == "PORTAL SUSPENDED"
    assert first.rows == 2
    assert first.finished_mono is not None
    wire.client(execute_msg("c1", 2), SYNC)
    wire.server(row(b"3"), complete("SELECT 1"), ready(b"T"))
    second = wire.completed[1]
    assert (second.text, second.command_tag, second.rows) == ("SELECT * FROM big", "SELECT 1", 1)


def test_empty_query_in_extended_protocol_has_an_empty_tag() -> None:
    wire = Wire()
    wire.client(parse_msg(""), bind_msg(), execute_msg(), SYNC)
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, EMPTY_QUERY, ready())
    [statement] = wire.completed
    assert statement.command_tag == ""
    assert statement.sqlstate is None


def test_extended_copy_from_stdin_counts_bytes() -> None:
    wire = Wire()
    wire.client(parse_msg("COPY t FROM STDIN"), bind_msg(), execute_msg())
    wire.server(PARSE_COMPLETE, BIND_COMPLETE, COPY_IN_RESPONSE)
    sent = wire.copy_data(b"1\n2\n")
    wire.client(m.frame(b"c"), SYNC)
    wire.server(complete("COPY 2"), ready())
    [statement] = wire.completed
    # ReadyForQuery answers the Sync, not the Execute already completed.
    answers = PARSE_COMPLETE + BIND_COMPLETE + COPY_IN_RESPONSE + complete("COPY 2")
    assert (statement.command_tag, statement.rows, statement.bytes) == ("COPY 2", 2, sent + len(answers))


def test_function_call_is_recorded_as_a_function_statement() -> None:
    wire = Wire()
    wire.client(m.frame(b"F", struct.pack("!I", 1598) + struct.pack("!hhh", 0, 0, 0)))
    wire.server(m.frame(b"V", struct.pack("!i", -1)), ready())
    [statement] = wire.completed
    assert statement.kind == "function"
    assert "1598" in statement.text


def test_bind_with_mismatched_format_count_raises_only_protocol_violation() -> None:
    wire = Wire()
    with contextlib.suppress(ProtocolViolation):
        wire.client(parse_msg("SELECT $1, $2, $3"), bind_msg([b"1", b"2", b"3"], formats=(0, 1)), execute_msg(),
                    SYNC)


# ------------------------------------------------------------------------------------------------
# secrets
# ------------------------------------------------------------------------------------------------


def test_password_in_a_simple_query_is_redacted_in_the_statement_text() -> None:
    wire = Wire()
    wire.client(m.query("ALTER ROLE app PASSWORD 'hunter2-secret'"))
    wire.server(complete("ALTER ROLE"), ready())
    [statement] = wire.completed
    assert "hunter2-secret" not in statement.text
    assert statement.text == "ALTER ROLE app PASSWORD '[REDACTED]'"


def test_password_in_a_prepared_statement_is_redacted_in_the_statement_text() -> None:
    wire = Wire()
    wire.client(parse_msg("CREATE ROLE app LOGIN PASSWORD 'hunter2-secret'"), bind_msg(), execute_msg(), SYNC)
    wire.server(complete("CREATE ROLE"), ready())
    assert "hunter2-secret" not in wire.completed[0].text


def test_password_in_a_failed_parse_is_redacted_in_the_statement_text() -> None:
    wire = Wire()
    wire.client(parse_msg("ALTER ROLE app PASSWORD 'hunter2-secret' VALID TIL"), SYNC)
    wire.server(m.error_response("42601", "syntax error"), ready())
    [statement] = wire.completed
    assert statement.kind == "parse"
    assert "hunter2-secret" not in statement.text


# ------------------------------------------------------------------------------------------------
# the relay's fast path: one call per read does what the per-message calls do
# ------------------------------------------------------------------------------------------------

_SERVER_FRAMES = [ROW_DESCRIPTION, row(b"1"), row(None), complete("SELECT 2"), complete("INSERT 0 3"),
                  m.error_response("42P01", "no such table"), ready(), ready(b"T"), EMPTY_QUERY, PORTAL_SUSPENDED,
                  PARSE_COMPLETE, BIND_COMPLETE, NO_DATA, m.frame(b"t", struct.pack("!hI", 1, 23)),
                  m.parameter_status("TimeZone", "UTC"), m.frame(b"d", b"copied\n")]
_CLIENT_GROUPS = [(m.query("SELECT 1; SELECT 2"),),
                  (parse_msg("SELECT $1", name="s1"), describe_msg("S", "s1"), bind_msg([b"7"], statement="s1"),
                   execute_msg(), bind_msg([b"8"], statement="s1"), execute_msg(), SYNC),
                  (m.query("COPY t TO STDOUT"),)]


def _as_dict(statement: Statement) -> tuple[object, ...]:
    return (statement.text, statement.parameters, statement.command_tag, statement.rows, statement.bytes,
            statement.sqlstate, statement.error, statement.skipped, statement.finished_mono is not None)


def _per_message(tracker: StatementTracker, chunk: bytes, events: Sequence[tuple[int, int, int, int]], end: int,
                 trailing: int, now: float) -> None:
    """How the relay fed one read before server_frames existed: rows, server_bytes and server_message."""
    pos = rows = 0
    for msg_type, offset, size, skipped in events:
        rows += skipped
        if msg_type in SERVER_DECODED:
            if rows:
                tracker.rows(rows)
                rows = 0
            tracker.server_bytes(offset + size - pos)
            pos = offset + size
            tracker.server_message(msg_type, chunk[offset + 5:offset + size], now)
    rows += trailing
    if rows:
        tracker.rows(rows)
    if end > pos:
        tracker.server_bytes(end - pos)


@settings(max_examples=300, deadline=None)
@given(groups=st.lists(st.sampled_from(range(len(_CLIENT_GROUPS))), min_size=1, max_size=3),
       frames=st.lists(st.sampled_from(range(len(_SERVER_FRAMES))), max_size=14),
       cuts=st.lists(st.integers(0, 200), max_size=3))
def test_server_frames_keeps_the_books_as_the_per_message_calls_do(groups: list[int], frames: list[int],
                                                                    cuts: list[int]) -> None:
    per_message, fused = Wire(), Wire()
    for wire in (per_message, fused):
        for index in groups:
            wire.client(*_CLIENT_GROUPS[index])
    stream = b"".join(_SERVER_FRAMES[i] for i in frames)
    noted: list[int] = []
    # Whatever each read brings: whole frames are handled, the rest carried to the next read.
    tail, previous = b"", 0
    for cut in sorted({min(c, len(stream)) for c in cuts} | {len(stream)}):
        buf = tail + stream[previous:cut]
        previous = cut
        end, events, trailing = scan_frames(buf, 0, b"Dd", 1 << 20)
        _per_message(per_message.tracker, buf[:end], events, end, trailing, per_message.t0)
        fused.tracker.server_frames(buf[:end], events, end, trailing, fused.t0,
                                    lambda msg_type, *_: noted.append(msg_type))
        tail = buf[end:]
    assert [_as_dict(s) for s in fused.completed] == [_as_dict(s) for s in per_message.completed]
    assert [_as_dict(s) for g in fused.tracker.groups for s in g.statements] == [
        _as_dict(s) for g in per_message.tracker.groups for s in g.statements]
    assert noted == [f[0] for f in (_SERVER_FRAMES[i] for i in frames) if f[:1] in (b"E", b"S")]
