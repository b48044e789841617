"""The result masker, sans I/O: which rows belong to which result (simple, extended, described
statements, pipelines, errors), what each column becomes, COPY rows, error fields, and masked
DataRows that stay valid protocol for any values (a property test)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_plane.core.masking import Masking
from data_plane.postgres import messages as m
from data_plane.postgres import rowmask
from data_plane.postgres.catalog import build_snapshot
from data_plane.postgres.masker import ResultMasker, ResultPlan, _split_csv
from data_plane.postgres.value_masking import ValueMasker

CUSTOMERS, VIEW, TEXT, INT4, JSONB, TEXT_ARRAY = 16400, 16500, 25, 23, 3802, 1009
COLUMN_ROWS = [
    [str(CUSTOMERS), "1", "public", "customers", "id", "r", str(INT4)],
    [str(CUSTOMERS), "2", "public", "customers", "name", "r", str(TEXT)],
    [str(CUSTOMERS), "3", "public", "customers", "email", "r", str(TEXT)],
    [str(CUSTOMERS), "4", "public", "customers", "ssn", "r", str(TEXT)],
    [str(VIEW), "1", "public", "contacts", "contact", "v", str(TEXT)],
    [str(VIEW), "2", "public", "contacts", "shout", "v", str(TEXT)],
]
VIEW_ROWS = [[str(VIEW), " SELECT c.email AS contact,\n    upper(c.name) AS shout\n   FROM customers c;"]]
RULES = [{"name": "email", "columns": ["*.customers.email"], "method": "redact"},
         {"name": "ssn", "columns": ["*.*.ssn"], "method": "partial", "keep_last": 4},
         {"name": "detect", "detectors": ["email", "us_ssn"], "method": "redact"}]


def field(name: str, table: int, attnum: int, type_oid: int = TEXT, fmt: int = 0) -> bytes:
    return m.cstring(name) + struct.pack("!IhIhih", table, attnum, type_oid, -1, -1, fmt)


def row_description(*fields: bytes) -> bytes:
    return struct.pack("!h", len(fields)) + b"".join(fields)


def data_row(*values: bytes | None) -> bytes:
    return m.data_row(list(values))[5:]


def masker(rules: list[dict] = RULES) -> tuple[ResultMasker, list[ResultPlan]]:
    results: list[ResultPlan] = []
    masker = ResultMasker(Masking.from_docs(rules), lambda plan: results.append(
        ResultPlan(plan.columns, plan.statement, plan.masks, dict(plan.counts))))
    masker.snapshot = build_snapshot(COLUMN_ROWS, VIEW_ROWS)
    return masker, results


def values(body: bytes) -> list[bytes | None]:
    return m.parse_data_row(body)


def test_a_view_column_is_traced_to_its_base_column_and_expressions_have_no_lineage() -> None:
    snapshot = build_snapshot(COLUMN_ROWS, VIEW_ROWS)
    assert [c.qualified for c in snapshot.sources(VIEW, 1)] == ["public.customers.email"]
    assert snapshot.sources(VIEW, 2) == ()
    assert [c.qualified for c in snapshot.sources(CUSTOMERS, 3)] == ["public.customers.email"]


def test_simple_query_rows_follow_their_row_description() -> None:
    mk, results = masker()
    mk.client_message(0x51, m.query("SELECT id, email, upper(email) FROM customers")[5:])
    description = row_description(field("id", CUSTOMERS, 1, INT4), field("email", CUSTOMERS, 3),
                                  field("upper", 0, 0))
    assert mk.wait_for(0x54, description) is None
    assert mk.server_message(0x54, description) is None
    plan = mk.current
    assert plan is not None and plan.masks
    masked = mk.mask_row(plan, data_row(b"1", b"ada@example.com", b"ADA@EXAMPLE.COM"))
    assert masked is not None and values(masked) == [b"1", b"***", b"***"]
    assert mk.mask_row(plan, data_row(b"2", None, b"no email here")) is None  # nothing to change
    mk.server_message(0x43, b"SELECT 2\x00")
    mk.server_message(0x5A, b"I")
    [result] = results
    assert result.counts == {("email", "public.customers.email", "redact", "rows"): 1,
                             ("detect", "detector:email", "redact", "rows"): 1}


def test_unknown_relations_ask_for_a_catalog_refresh_once() -> None:
    mk, _ = masker()
    description = row_description(field("x", 99999, 1))
    assert mk.wait_for(0x54, description) == ("catalog", [99999])
    mk.looked_up(("catalog", [99999]), mk.snapshot)
    assert mk.wait_for(0x54, description) is None  # still unknown (a temporary table): no lineage


def test_extended_protocol_uses_the_described_statement_with_the_binds_formats() -> None:
    mk, _ = masker()
    # asyncpg: Parse + Describe statement + Sync, then Bind (binary results) + Execute + Sync.
    mk.client_message(0x50, m.cstring("s1") + m.cstring("SELECT id, email FROM customers") + b"\x00\x00")
    mk.client_message(0x44, b"Ss1\x00")
    mk.client_message(0x53, b"")
    mk.server_message(0x31, b"")
    mk.server_message(0x74, b"\x00\x00")
    mk.server_message(0x54, row_description(field("id", CUSTOMERS, 1, INT4), field("email", CUSTOMERS, 3)))
    mk.server_message(0x5A, b"I")
    mk.client_message(0x42, m.bind(m.Bind("", "s1", (), (), (1,)))[5:])
    mk.client_message(0x45, b"\x00\x00\x00\x00\x00")
    mk.client_message(0x53, b"")
    mk.server_message(0x32, b"")
    plan = mk.execute_plan()
    assert plan is not None and [c.binary for c in plan.columns] == [True, True]
    masked = mk.mask_row(plan, data_row(struct.pack("!i", 1), b"ada@example.com"))
    assert masked is not None and values(masked) == [struct.pack("!i", 1), b"***"]
    mk.server_message(0x43, b"SELECT 1\x00")
    mk.server_message(0x5A, b"I")
    assert mk.current is None and not mk._expect


def test_an_error_mid_pipeline_skips_to_sync() -> None:
    mk, _ = masker()
    for text in ("SELECT 1/0", "SELECT email FROM customers"):
        mk.client_message(0x50, m.cstring("") + m.cstring(text) + b"\x00\x00")
        mk.client_message(0x42, m.bind(m.Bind("", "", (), (), ()))[5:])
        mk.client_message(0x44, b"P\x00")
        mk.client_message(0x45, b"\x00\x00\x00\x00\x00")
    mk.client_message(0x53, b"")
    mk.server_message(0x31, b"")
    mk.server_message(0x32, b"")
    mk.server_message(0x54, row_description(field("?column?", 0, 0, INT4)))
    mk.server_message(0x45, m.error_response("22012", "division by zero")[5:])
    assert [kind for kind, _ in mk._expect] == ["Z"]
    mk.server_message(0x5A, b"I")
    assert not mk._expect


def test_values_keep_their_types_valid() -> None:
    vm = ValueMasker(Masking.from_docs(RULES))
    method = Masking.from_docs(RULES).rules[0].method
    assert vm.whole(b"ada@example.com", method, TEXT, False) == b"***"
    assert vm.whole(b"42", method, INT4, False) is None  # no masked form of an integer: NULL
    assert vm.whole(b'{"a": 1}', method, JSONB, False) == b'"***"'  # still JSON
    assert vm.whole(b'\x01{"a": 1}', method, JSONB, True) == b'\x01"***"'
    assert vm.scan(b'{"to": "ada@example.com"}', JSONB, False)[0] == b'{"to": "***"}'
    assert vm.scan(b"078-05-1120", INT4, False) == (None, [("detect", "us_ssn")])  # a number can't stay
    array = (struct.pack("!iiI", 1, 0, TEXT) + struct.pack("!ii", 2, 1)
             + struct.pack("!i", 15) + b"ada@example.com" + struct.pack("!i", -1))
    masked, hits = vm.scan(array, TEXT_ARRAY, True)
    assert hits == [("detect", "email")]
    assert masked == struct.pack("!iiI", 1, 0, TEXT) + struct.pack("!ii", 2, 1) + struct.pack("!i", 3) + b"***" \
        + struct.pack("!i", -1)


def test_copy_rows_in_text_and_csv() -> None:
    mk, results = masker()
    mk.client_message(0x51, m.query("COPY customers (email, name) TO STDOUT WITH (FORMAT csv, HEADER)")[5:])
    assert mk.server_message(0x48, b"\x00\x00\x02\x00\x00\x00\x00") is None
    assert mk.mask_copy_row(b"email,name\n") is None  # the header
    assert mk.mask_copy_row(b'ada@example.com,"Lovelace, Ada"\n') == b'***,"Lovelace, Ada"\n'
    assert mk.mask_copy_row(b',"x"\n') is None  # NULL stays NULL
    mk.server_message(0x43, b"COPY 2\x00")
    mk.server_message(0x5A, b"I")
    assert results[0].counts == {("email", "public.customers.email", "redact", "copy"): 1}
    mk.client_message(0x51, m.query("COPY customers TO STDOUT")[5:])
    mk.server_message(0x48, b"\x00\x00\x04" + b"\x00\x00" * 4)
    assert mk.mask_copy_row(b"1\tAda\\tL\tada@example.com\t078-05-1120\n") == b"1\tAda\\tL\t***\t*******1120\n"


def test_binary_copy_of_a_masked_table_is_refused_and_its_rows_dropped() -> None:
    mk, _ = masker()
    mk.client_message(0x51, m.query("COPY customers TO STDOUT (FORMAT binary)")[5:])
    refused = mk.server_message(0x48, b"\x01\x00\x01\x00\x01")
    assert refused is not None and m.error_fields(refused[5:])["C"] == "42501"
    assert mk.mask_copy_row(b"PGCOPY\n\xff\r\n\x00") == b""
    assert mk.server_message(0x63, b"") == b""
    assert mk.server_message(0x43, b"COPY 6\x00") == b""
    assert mk.server_message(0x5A, b"I") is None


def test_error_fields_that_echo_values_are_masked() -> None:
    mk, results = masker()
    body = b"".join(k + v + b"\x00" for k, v in [
        (b"S", b"ERROR"), (b"C", b"23505"), (b"M", b'duplicate key value violates unique constraint "c_email_key"'),
        (b"D", b"Key (email)=(ada@example.com) already exists."), (b"s", b"public"), (b"t", b"customers")]) + b"\x00"
    masked = mk.mask_error(body, b"E")
    assert masked is not None
    assert m.error_fields(masked[5:])["D"] == "Key (email)=(***) already exists."
    assert results and mk.mask_error(m.error_response("42P01", "relation does not exist")[5:], b"E") is None


def test_csv_split_tells_null_from_empty() -> None:
    assert _split_csv('a,,"",x""y,"q""z"', ",", '"', '"') == [
        ("a", False, "a"), ("", True, ""), ("", False, '""'), ('x""y', False, 'x""y'), ('q"z', False, '"q""z"')]


_VALUES = st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=30).map(str.encode),
                    st.sampled_from([b"ada@example.com", b"078-05-1120", b"x ada@example.com y", b"\x01{}"]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([(CUSTOMERS, 3), (CUSTOMERS, 1), (0, 0), (VIEW, 1), (VIEW, 2)]),
                          st.sampled_from([TEXT, INT4, JSONB, TEXT_ARRAY, 1043, 2249]), st.sampled_from([0, 1]),
                          _VALUES), min_size=1, max_size=8))
def test_masked_rows_stay_protocol_valid(columns: list) -> None:
    mk, _ = masker()
    mk.client_message(0x51, m.query("SELECT …")[5:])
    description = row_description(*(field(f"c{i}", t, a, type_oid, fmt)
                                    for i, ((t, a), type_oid, fmt, _) in enumerate(columns)))
    mk.server_message(0x54, description)
    plan = mk.current
    assert plan is not None
    row = data_row(*(v for *_, v in columns))
    masked = mk.mask_row(plan, row)
    out = row if masked is None else masked
    frame = m.frame(b"D", out)
    assert struct.unpack("!i", frame[1:5])[0] == len(frame) - 1  # the frame's length is right
    parsed = m.parse_data_row(out)  # every value's length field is right
    assert len(parsed) == len(columns)
    for (_, type_oid, _fmt, original), value in zip(columns, parsed, strict=True):
        if original is None:
            assert value is None
        if value is not None and value != original and type_oid == INT4:
            raise AssertionError("an integer column was rewritten to a non-integer")


_ACTIONS = st.sampled_from([(rowmask.KEEP, None), (rowmask.CONST, b"***"), (rowmask.NULL, None),
                            (rowmask.PARTIAL, 4), (rowmask.PARTIAL, 0), (rowmask.CALL, lambda v: v[::-1]),
                            (rowmask.HASH, b"tenant key"), (rowmask.HASH, b"k" * 100), (rowmask.HASH, b""),
                            (rowmask.CALL, lambda v: None)])
_TEXT_VALUES = st.one_of(st.none(), st.text(max_size=20).map(str.encode))


@pytest.mark.skipif(not rowmask.ACCELERATED, reason="the C accelerator was not compiled")
@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.tuples(*[_ACTIONS] * n), st.lists(st.tuples(*[_TEXT_VALUES] * n), max_size=5), st.booleans())))
def test_the_c_row_rewriter_matches_the_python_one(case: tuple) -> None:
    actions, rows, with_other_frames = case
    frames = [m.data_row(list(row)) for row in rows]
    if with_other_frames:
        frames.insert(0, m.frame(b"C", b"SELECT 1\x00"))
    buf = b"xx" + b"".join(frames) + b"yy"
    accelerated = rowmask.mask_rows(buf, 2, len(buf) - 2, actions)
    assert accelerated == rowmask._mask_rows_py(buf, 2, len(buf) - 2, actions)


def test_the_row_rewriter_refuses_malformed_rows() -> None:
    row = m.data_row([b"abc"])
    with pytest.raises(ValueError):
        rowmask.mask_rows(row[:-1] + b"\x00\x00", 0, len(row) + 1, ((rowmask.CONST, b"*"),))
    with pytest.raises(ValueError):
        rowmask.mask_rows(row, 0, len(row), ((rowmask.CONST, b"*"), (rowmask.KEEP, None)))


def test_a_described_statement_without_rows_is_known_not_unknown() -> None:
    mk, _ = masker()
    mk.client_message(0x50, m.cstring("") + m.cstring("COPY (SELECT name FROM customers) TO STDOUT") + b"\x00\x00")
    mk.client_message(0x42, m.bind(m.Bind("", "", (), (), ()))[5:])
    mk.client_message(0x44, b"P\x00")
    mk.client_message(0x45, b"\x00\x00\x00\x00\x00")
    mk.client_message(0x53, b"")
    for msg_type in (0x31, 0x32, 0x6E):
        mk.server_message(msg_type, b"")
    plan = mk.execute_plan()
    assert plan is not None and not plan.masks


@given(st.binary(max_size=150), st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_the_keyed_hash_is_hmac_sha256_whatever_the_key_and_value(key: bytes, value: bytes) -> None:
    import hashlib
    import hmac

    row = m.data_row([value])
    expected = b"h:" + hmac.new(key, value, hashlib.sha256).hexdigest()[:32].encode()
    for sha_extensions in (False, True):  # the portable compression and, where the CPU has them, SHA-NI
        if rowmask.ACCELERATED:
            rowmask._rowmask._set_sha_path(sha_extensions)
        try:
            masked, counts = rowmask.mask_rows(row, 0, len(row), ((rowmask.HASH, key),))
        finally:
            if rowmask.ACCELERATED:
                rowmask._rowmask._set_sha_path(True)
        assert masked is not None and counts == [1]
        assert m.parse_data_row(masked[5:]) == [expected]


def test_the_keyed_hash_agrees_with_the_masking_method() -> None:
    from data_plane.core.masking import MaskMethod

    method = MaskMethod("hash", hash_key=b"tenant")
    row = m.data_row([b"ada@example.com"])
    masked, _ = rowmask.mask_rows(row, 0, len(row), ((rowmask.HASH, b"tenant"),))
    assert masked is not None and m.parse_data_row(masked[5:]) == [method.apply("ada@example.com").encode()]


def test_notify_payloads_are_scanned_and_function_calls_refused() -> None:
    mk, results = masker()
    body = struct.pack("!i", 42) + m.cstring("signups") + m.cstring("new customer ada@example.com")
    masked = mk.server_message(0x41, body)
    assert masked is not None and masked[5:] == struct.pack("!i", 42) + m.cstring("signups") + m.cstring(
        "new customer ***")
    assert results[0].counts == {("detect", "detector:email", "redact", "notify"): 1}
    assert mk.server_message(0x41, struct.pack("!i", 42) + m.cstring("c") + m.cstring("nothing here")) is None
    mk.client_message(0x46, struct.pack("!I", 1234) + b"\x00\x00\x00\x00\x00\x00")
    refused = mk.server_message(0x56, b"\x00\x00\x00\x03abc")
    assert refused is not None and m.error_fields(refused[5:])["C"] == "42501"
