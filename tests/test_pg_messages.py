"""The PostgreSQL codec, sans I/O: every builder reads back through its decoder, hand-built
messages decode to what the protocol documentation says, and malformed bytes only ever raise
ProtocolViolation (the one error the relay answers with 08P01)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_plane.postgres import messages as m
from data_plane.postgres.messages import ProtocolViolation


def int16(value: int) -> bytes:
    return struct.pack("!h", value)


def int32(value: int) -> bytes:
    return struct.pack("!i", value)


def uint32(value: int) -> bytes:
    return struct.pack("!I", value)


def split_frame(data: bytes) -> tuple[bytes, bytes]:
    """(type, body) of exactly one frame, checking its length word on the way."""
    frames = list(m.iter_frames(data))
    assert len(frames) == 1
    assert sum(5 + len(body) for _, body in frames) == len(data)
    return frames[0]


def bind_body(portal: str, statement: str, formats: list[int], params: list[bytes | None],
              result_formats: list[int]) -> bytes:
    parts = [m.cstring(portal), m.cstring(statement), int16(len(formats))]
    parts += [int16(f) for f in formats]
    parts.append(int16(len(params)))
    for value in params:
        parts.append(int32(-1) if value is None else int32(len(value)) + value)
    parts.append(int16(len(result_formats)))
    parts += [int16(f) for f in result_formats]
    return b"".join(parts)


def row_description_body(columns: list[tuple[str, int, int, int, int, int, int]]) -> bytes:
    parts = [int16(len(columns))]
    for name, table_oid, attnum, type_oid, size, modifier, fmt in columns:
        parts.append(m.cstring(name) + uint32(table_oid) + int16(attnum) + uint32(type_oid) + int16(size)
                     + int32(modifier) + int16(fmt))
    return b"".join(parts)


# ------------------------------------------------------------------------------------------------
# startup phase
# ------------------------------------------------------------------------------------------------


def test_startup_message_round_trips_with_its_parameters() -> None:
    params = {"user": "alice", "database": "app", "application_name": "psql", "options": "-c search_path=x"}
    packet = m.startup_message(params)
    assert struct.unpack("!i", packet[:4])[0] == len(packet)
    parsed = m.parse_startup_packet(packet)
    assert parsed == m.StartupMessage(m.PROTOCOL_3_0, params)
    assert list(parsed.params) == list(params)  # order as sent


def test_startup_message_keeps_a_newer_minor_protocol_version() -> None:
    packet = m.startup_message({"user": "u"}, protocol=(3 << 16) | 2)
    assert m.parse_startup_packet(packet) == m.StartupMessage((3 << 16) | 2, {"user": "u"})


def test_startup_message_with_non_utf8_value_decodes_with_replacement() -> None:
    body = int32(m.PROTOCOL_3_0) + b"user\x00al\xffce\x00\x00"
    parsed = m.parse_startup_packet(int32(len(body) + 4) + body)
    assert isinstance(parsed, m.StartupMessage)
    assert parsed.params["user"] == "al\ufffdce"


def test_ssl_request_parses_as_ssl_request() -> None:
    assert m.ssl_request() == int32(8) + int32(80877103)
    assert m.parse_startup_packet(m.ssl_request()) == m.SSLRequest()


def test_gssenc_request_parses_as_gssenc_request() -> None:
    assert m.parse_startup_packet(int32(8) + int32(m.GSSENC_REQUEST_CODE)) == m.GSSENCRequest()


def test_cancel_request_round_trips_pid_and_secret() -> None:
    packet = m.cancel_request(4242, -123456789)
    assert len(packet) == 16
    assert m.parse_startup_packet(packet) == m.CancelRequest(4242, -123456789)


def test_short_cancel_request_is_a_protocol_violation() -> None:
    packet = int32(12) + int32(m.CANCEL_REQUEST_CODE) + int32(4242)
    with pytest.raises(ProtocolViolation, match="cancel"):
        m.parse_startup_packet(packet)


def test_cancel_request_with_extra_bytes_is_a_protocol_violation() -> None:
    packet = int32(20) + int32(m.CANCEL_REQUEST_CODE) + int32(1) + int32(2) + int32(3)
    with pytest.raises(ProtocolViolation):
        m.parse_startup_packet(packet)


@pytest.mark.parametrize("delta", [-1, 1, 100])
def test_startup_length_word_not_matching_the_packet_is_a_protocol_violation(delta: int) -> None:
    packet = m.startup_message({"user": "u"})
    forged = int32(len(packet) + delta) + packet[4:]
    with pytest.raises(ProtocolViolation, match="length mismatch"):
        m.parse_startup_packet(forged)


@pytest.mark.parametrize("packet", [b"", b"\x00\x00\x00\x04", int32(7) + b"\x00\x03\x00"])
def test_startup_packet_shorter_than_eight_bytes_is_a_protocol_violation(packet: bytes) -> None:
    with pytest.raises(ProtocolViolation, match="too short"):
        m.parse_startup_packet(packet)


@pytest.mark.parametrize("protocol", [2 << 16, 4 << 16, 1234 << 16 | 5690, 0])
def test_unsupported_protocol_version_is_a_protocol_violation(protocol: int) -> None:
    with pytest.raises(ProtocolViolation, match="unsupported frontend protocol"):
        m.parse_startup_packet(m.startup_message({"user": "u"}, protocol=protocol))


def test_startup_parameters_without_terminator_are_a_protocol_violation() -> None:
    body = int32(m.PROTOCOL_3_0) + b"user\x00alice"  # value's NUL and the list's NUL missing
    with pytest.raises(ProtocolViolation, match="unterminated"):
        m.parse_startup_packet(int32(len(body) + 4) + body)


# ------------------------------------------------------------------------------------------------
# server → client
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "data"), [(m.AUTH_OK, b""), (m.AUTH_MD5, b"\x01\x02\x03\x04"),
                                            (m.AUTH_SASL, b"SCRAM-SHA-256\x00\x00"),
                                            (m.AUTH_SASL_FINAL, b"v=abc")])
def test_authentication_round_trips(code: int, data: bytes) -> None:
    msg_type, body = split_frame(m.authentication(code, data))
    assert msg_type == b"R"
    assert m.parse_authentication(body) == (code, data)


def test_parameter_status_round_trips() -> None:
    msg_type, body = split_frame(m.parameter_status("server_version", "17.2"))
    assert msg_type == b"S"
    assert m.parse_parameter_status(body) == ("server_version", "17.2")


def test_backend_key_data_round_trips() -> None:
    msg_type, body = split_frame(m.backend_key_data(31337, -2))
    assert msg_type == b"K"
    assert m.parse_backend_key_data(body) == (31337, -2)


@pytest.mark.parametrize("status", [b"I", b"T", b"E"])
def test_ready_for_query_carries_the_transaction_status(status: bytes) -> None:
    assert split_frame(m.ready_for_query(status)) == (b"Z", status)


def test_error_response_round_trips_through_error_fields() -> None:
    msg_type, body = split_frame(m.error_response("42501", "permission denied for table t",
                                                  severity="FATAL", detail="rule no-drop", hint="ask"))
    assert msg_type == b"E"
    assert m.error_fields(body) == {"S": "FATAL", "V": "FATAL", "C": "42501", "M": "permission denied for table t",
                                    "D": "rule no-drop", "H": "ask"}


def test_error_response_without_detail_or_hint_has_only_the_required_fields() -> None:
    _, body = split_frame(m.error_response("08P01", "bad"))
    assert m.error_fields(body) == {"S": "ERROR", "V": "ERROR", "C": "08P01", "M": "bad"}


def test_notice_response_round_trips_through_error_fields() -> None:
    msg_type, body = split_frame(m.notice_response("relation exists, skipping", code="42P07"))
    assert msg_type == b"N"
    fields = m.error_fields(body)
    assert fields["S"] == "NOTICE"
    assert fields["C"] == "42P07"
    assert fields["M"] == "relation exists, skipping"


def test_error_fields_without_final_terminator_is_a_protocol_violation() -> None:
    _, body = split_frame(m.error_response("XX000", "boom"))
    with pytest.raises(ProtocolViolation):
        m.error_fields(body[:-1])


def test_error_field_value_without_nul_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="unterminated"):
        m.error_fields(b"Mno terminator")


def test_command_complete_tag_decodes() -> None:
    assert m.parse_command_complete(b"INSERT 0 3\x00") == "INSERT 0 3"


@pytest.mark.parametrize(("tag", "rows"), [
    ("SELECT 5", 5), ("SELECT 0", 0), ("INSERT 0 5", 5), ("UPDATE 7", 7), ("DELETE 2", 2),
    ("MERGE 4", 4), ("COPY 100", 100), ("FETCH 3", 3), ("MOVE 9", 9), ("BEGIN", None), ("COMMIT", None),
    ("CREATE TABLE", None), ("", None), ("SET", None),
])
def test_rows_from_tag(tag: str, rows: int | None) -> None:
    assert m.rows_from_tag(tag) == rows


def test_data_row_round_trips_values_empty_strings_and_nulls() -> None:
    values: list[bytes | None] = [b"1", None, b"", b"\x00\xffbinary", None]
    msg_type, body = split_frame(m.data_row(values))
    assert msg_type == b"D"
    assert m.parse_data_row(body) == values


def test_data_row_with_no_columns_round_trips() -> None:
    assert m.parse_data_row(split_frame(m.data_row([]))[1]) == []


def test_data_row_value_longer_than_the_message_is_a_protocol_violation() -> None:
    body = int16(1) + int32(10) + b"short"
    with pytest.raises(ProtocolViolation, match="truncated"):
        m.parse_data_row(body)


def test_row_description_decodes_every_field() -> None:
    body = row_description_body([
        ("id", 16384, 1, 23, 4, -1, 0),
        ("email", 16384, 2, 25, -1, -1, 0),
        ("total", 0, 0, 1700, -1, (12 << 16 | 2) + 4, 1),
        ("big_oid", 0xFFFFFFF0, 3, 0xFFFFFFFE, 8, -1, 1),
    ])
    assert m.parse_row_description(body) == [
        m.FieldDescription("id", 16384, 1, 23, 4, -1, 0),
        m.FieldDescription("email", 16384, 2, 25, -1, -1, 0),
        m.FieldDescription("total", 0, 0, 1700, -1, (12 << 16 | 2) + 4, 1),
        m.FieldDescription("big_oid", 0xFFFFFFF0, 3, 0xFFFFFFFE, 8, -1, 1),  # OIDs are unsigned
    ]


def test_row_description_missing_its_last_format_code_is_a_protocol_violation() -> None:
    body = row_description_body([("id", 16384, 1, 23, 4, -1, 0)])
    with pytest.raises(ProtocolViolation, match="truncated"):
        m.parse_row_description(body[:-1])


# ------------------------------------------------------------------------------------------------
# client → server
# ------------------------------------------------------------------------------------------------


def test_query_round_trips() -> None:
    msg_type, body = split_frame(m.query("SELECT 'é'; SELECT 2"))
    assert msg_type == b"Q"
    assert m.parse_query(body) == "SELECT 'é'; SELECT 2"


def test_terminate_is_an_empty_x_frame() -> None:
    assert m.terminate() == b"X\x00\x00\x00\x04"


@pytest.mark.parametrize("password", ["s3cret", b"jwt.header.sig"])
def test_password_message_round_trips(password: str | bytes) -> None:
    msg_type, body = split_frame(m.password_message(password))
    assert msg_type == b"p"
    assert m.parse_password(body) == (password if isinstance(password, str) else password.decode())


def test_sasl_initial_response_names_the_mechanism_and_sizes_the_data() -> None:
    msg_type, body = split_frame(m.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"))
    assert msg_type == b"p"
    reader = m.Reader(body)
    assert reader.cstring() == "SCRAM-SHA-256"
    assert reader.int32() == len(b"n,,n=,r=abc")
    assert reader.rest() == b"n,,n=,r=abc"
    assert split_frame(m.sasl_response(b"c=biws"))[1] == b"c=biws"


def test_parse_decodes_statement_query_and_parameter_types() -> None:
    body = m.cstring("stmt1") + m.cstring("SELECT $1::int, $2") + int16(3) + uint32(23) + uint32(25) + uint32(0)
    assert m.parse_parse(body) == m.Parse("stmt1", "SELECT $1::int, $2", (23, 25, 0))


def test_parse_without_parameter_types_is_an_unnamed_statement() -> None:
    assert m.parse_parse(b"\x00SELECT 1\x00" + int16(0)) == m.Parse("", "SELECT 1", ())


def test_bind_decodes_mixed_formats_and_null_parameters() -> None:
    params = [b"abc", int32(42), None, b""]
    body = bind_body("p1", "stmt1", [0, 1, 0, 1], params, [1, 0])
    bind = m.parse_bind(body)
    assert bind == m.Bind("p1", "stmt1", (0, 1, 0, 1), (b"abc", int32(42), None, b""), (1, 0))
    assert [bind.param_format(i) for i in range(4)] == [0, 1, 0, 1]


def test_bind_with_one_format_applies_it_to_every_parameter() -> None:
    bind = m.parse_bind(bind_body("", "", [1], [int32(1), int32(2)], []))
    assert bind.param_formats == (1,)
    assert [bind.param_format(i) for i in range(2)] == [1, 1]
    assert bind.result_formats == ()


def test_bind_with_no_formats_means_text() -> None:
    bind = m.parse_bind(bind_body("", "", [], [b"x"], []))
    assert bind.param_format(0) == 0


def test_bind_missing_its_result_format_count_is_a_protocol_violation() -> None:
    body = bind_body("", "s", [0], [b"x"], [])
    with pytest.raises(ProtocolViolation, match="truncated"):
        m.parse_bind(body[:-2])


def test_bind_parameter_longer_than_the_message_is_a_protocol_violation() -> None:
    body = m.cstring("") + m.cstring("") + int16(0) + int16(1) + int32(1000) + b"x" + int16(0)
    with pytest.raises(ProtocolViolation, match="truncated"):
        m.parse_bind(body)


def test_execute_decodes_portal_and_row_limit() -> None:
    assert m.parse_execute(m.cstring("p1") + int32(50)) == ("p1", 50)


@pytest.mark.parametrize(("kind", "name"), [("S", "stmt1"), ("P", "")])
def test_close_or_describe_decodes_kind_and_name(kind: str, name: str) -> None:
    assert m.parse_close_or_describe(kind.encode() + m.cstring(name)) == (kind, name)


def test_function_call_decodes_the_unsigned_function_oid() -> None:
    assert m.parse_function_call(uint32(0xFFFFFFFF) + int16(0)) == 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# Reader primitives
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 2, 3])
def test_truncated_int32_is_a_protocol_violation(size: int) -> None:
    with pytest.raises(ProtocolViolation, match="truncated"):
        m.Reader(b"\x00" * size).int32()


def test_truncated_int16_and_byte_are_protocol_violations() -> None:
    with pytest.raises(ProtocolViolation):
        m.Reader(b"\x00").int16()
    with pytest.raises(ProtocolViolation):
        m.Reader(b"").byte()


def test_unterminated_cstring_is_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation, match="unterminated"):
        m.Reader(b"no nul here").cstring()


@pytest.mark.parametrize("n", [-1, 4])
def test_take_beyond_the_body_or_negative_is_a_protocol_violation(n: int) -> None:
    with pytest.raises(ProtocolViolation):
        m.Reader(b"abc").take(n)


def test_protocol_violation_answers_with_08p01() -> None:
    assert ProtocolViolation.sqlstate == "08P01"


# ------------------------------------------------------------------------------------------------
# framing
# ------------------------------------------------------------------------------------------------


def test_iter_frames_walks_concatenated_frames_and_stops_before_a_partial_one() -> None:
    stream = m.query("SELECT 1") + m.frame(b"S") + m.terminate() + m.data_row([b"x"])
    partial = m.error_response("XX000", "cut")
    frames = list(m.iter_frames(stream + partial[:-3]))
    assert frames == [(b"Q", b"SELECT 1\x00"), (b"S", b""), (b"X", b""), (b"D", m.data_row([b"x"])[5:])]


@pytest.mark.parametrize("cut", [1, 4])
def test_iter_frames_ignores_a_trailing_partial_header(cut: int) -> None:
    assert list(m.iter_frames(m.frame(b"Z", b"I") + b"C\x00\x00\x00\x10"[:cut])) == [(b"Z", b"I")]


def test_iter_frames_accepts_memoryview_and_bytearray() -> None:
    stream = m.frame(b"Z", b"I") * 2
    assert list(m.iter_frames(memoryview(stream))) == list(m.iter_frames(bytearray(stream))) == [(b"Z", b"I")] * 2


@pytest.mark.parametrize("length", [3, 0, -1])
def test_iter_frames_with_length_below_four_is_a_protocol_violation(length: int) -> None:
    with pytest.raises(ProtocolViolation, match="invalid message length"):
        list(m.iter_frames(b"Q" + int32(length) + b"xxxx"))


# ------------------------------------------------------------------------------------------------
# fuzz: decoders never raise anything but ProtocolViolation
# ------------------------------------------------------------------------------------------------

_startup_like = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda b: int32(len(b) + 4) + b),
    st.binary(max_size=64).map(lambda b: int32(len(b) + 8) + int32(m.PROTOCOL_3_0) + b),
    st.binary(max_size=12).map(lambda b: int32(len(b) + 8) + int32(m.CANCEL_REQUEST_CODE) + b),
)
_DECODERS = {
    "parse_startup_packet": m.parse_startup_packet,
    "parse_bind": m.parse_bind,
    "error_fields": m.error_fields,
    "parse_row_description": m.parse_row_description,
    "parse_data_row": m.parse_data_row,
    "parse_parse": m.parse_parse,
    "parse_execute": m.parse_execute,
    "parse_close_or_describe": m.parse_close_or_describe,
    "parse_authentication": m.parse_authentication,
}


@pytest.mark.parametrize("decoder", sorted(_DECODERS))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=80), _startup_like,
                      st.lists(st.sampled_from([b"\x00", b"\xff", b"\x00\x01", b"\xff\xff", b"a", b"\x80"]),
                               max_size=30).map(b"".join)))
def test_decoders_raise_only_protocol_violation_on_arbitrary_bytes(decoder: str, data: bytes) -> None:
    with contextlib.suppress(ProtocolViolation):
        _DECODERS[decoder](data)


# The decoders every Execute of a prepared statement runs take a path without a Reader; whatever
# the bytes, they answer exactly as the Reader-based decoding does (the same value or the same error).
def _outcome(decode: Callable[[bytes], object], body: bytes) -> tuple[str, object]:
    try:
        return "value", decode(body)
    except ProtocolViolation as exc:
        return "error", str(exc)


def _bind_like(data: st.DataObject) -> bytes:
    params = data.draw(st.lists(st.one_of(st.none(), st.binary(max_size=6)), max_size=4))
    formats = data.draw(st.lists(st.sampled_from([0, 1, -1]), max_size=5))
    body = bind_body(data.draw(st.sampled_from(["", "p1", "é"])), data.draw(st.sampled_from(["", "s1"])), formats,
                     params, data.draw(st.lists(st.sampled_from([0, 1]), max_size=3)))
    if data.draw(st.booleans()):  # then damage it: a cut, or a byte changed
        cut = data.draw(st.integers(0, len(body)))
        changed = bytes([data.draw(st.integers(0, 255))])
        body = body[:cut] if data.draw(st.booleans()) else body[:cut] + changed + body[cut + 1:]
    return body


@settings(max_examples=500, deadline=None)
@given(data=st.data())
def test_bind_execute_and_describe_fast_paths_decode_as_the_reader_does(data: st.DataObject) -> None:
    body = _bind_like(data) if data.draw(st.booleans()) else data.draw(st.binary(max_size=40))
    assert _outcome(m.parse_bind, body) == _outcome(m._parse_bind, body)
    assert _outcome(m.parse_execute, body) == _outcome(_reader_execute, body)
    assert _outcome(m.parse_close_or_describe, body) == _outcome(_reader_close_or_describe, body)


def _reader_execute(body: bytes) -> tuple[str, int]:
    reader = m.Reader(body)
    return reader.cstring(), reader.int32()


def _reader_close_or_describe(body: bytes) -> tuple[str, str]:
    reader = m.Reader(body)
    return chr(reader.byte()), reader.cstring()
