"""Secrets never reach recorded statement text: every way SQL can spell the password of a role or
of a connection string is replaced, and statements without one are left exactly as they were."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_plane.core import redact as redact_mod
from data_plane.core.redact import REDACTED, might_hold_secret, redact_statement

SECRET = "Tr0ub4dor&3"


@pytest.mark.parametrize(("statement", "expected"), [
    ("ALTER ROLE app PASSWORD 'Tr0ub4dor&3'", f"ALTER ROLE app PASSWORD {REDACTED}"),
    ("ALTER ROLE app WITH PASSWORD 'Tr0ub4dor&3' VALID UNTIL '2030-01-01'",
     f"ALTER ROLE app WITH PASSWORD {REDACTED} VALID UNTIL '2030-01-01'"),
    ("ALTER ROLE app PASSWORD 'it''s Tr0ub4dor&3'", f"ALTER ROLE app PASSWORD {REDACTED}"),
    ("CREATE USER app WITH ENCRYPTED PASSWORD E'Tr0ub4dor&3'", f"CREATE USER app WITH ENCRYPTED PASSWORD {REDACTED}"),
    ("CREATE USER app WITH UNENCRYPTED PASSWORD e'Tr0ub4dor&3\\\\'",
     f"CREATE USER app WITH UNENCRYPTED PASSWORD {REDACTED}"),
    ("CREATE ROLE app LOGIN PASSWORD $$Tr0ub4dor&3$$", f"CREATE ROLE app LOGIN PASSWORD {REDACTED}"),
    ("CREATE ROLE app LOGIN PASSWORD $pw$Tr0ub4dor&3 with $$ and ' inside$pw$ CREATEDB",
     f"CREATE ROLE app LOGIN PASSWORD {REDACTED} CREATEDB"),
    ("alter role app password 'Tr0ub4dor&3'", f"alter role app password {REDACTED}"),
    ("ALTER ROLE app PaSsWoRd\n\t'Tr0ub4dor&3'", f"ALTER ROLE app PaSsWoRd\n\t{REDACTED}"),
    ("ALTER ROLE app PASSWORD 'multi\nline Tr0ub4dor&3'", f"ALTER ROLE app PASSWORD {REDACTED}"),
])
def test_role_password_clause_is_redacted(statement: str, expected: str) -> None:
    redacted = redact_statement(statement)
    assert redacted == expected
    assert SECRET not in redacted


@pytest.mark.parametrize("statement", [
    "SELECT dblink_connect('host=db1 user=app password=Tr0ub4dor&3 dbname=x')",
    "SELECT * FROM dblink('host=db1 PASSWORD = Tr0ub4dor&3', 'SELECT 1') AS t(x int)",
    "CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw OPTIONS (host 'db1');"
    " CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'app', password 'Tr0ub4dor&3')",
    "CREATE SUBSCRIPTION sub CONNECTION 'host=db1 password=Tr0ub4dor&3' PUBLICATION pub",
])
def test_connection_string_password_is_redacted(statement: str) -> None:
    redacted = redact_statement(statement)
    assert SECRET not in redacted
    assert "[REDACTED]" in redacted


def test_connection_string_redaction_keeps_the_other_options() -> None:
    assert redact_statement("SELECT dblink_connect('host=db1 password=Tr0ub4dor&3 dbname=x')") == (
        "SELECT dblink_connect('host=db1 password=[REDACTED] dbname=x')")


def test_every_password_in_a_statement_is_redacted() -> None:
    redacted = redact_statement("ALTER ROLE a PASSWORD 'one-Tr0ub4dor&3'; ALTER ROLE b PASSWORD 'two-Tr0ub4dor&3'")
    assert redacted == f"ALTER ROLE a PASSWORD {REDACTED}; ALTER ROLE b PASSWORD {REDACTED}"


@pytest.mark.parametrize("statement", [
    "SELECT * FROM users WHERE id = 1",
    "UPDATE accounts SET password_hash = 'abc' WHERE id = 1",
    "SELECT password FROM legacy",
    "ALTER ROLE app PASSWORD NULL",
    "SELECT 'it''s $$ fine' AS x",
    "",
])
def test_statement_without_a_password_value_is_untouched(statement: str) -> None:
    assert redact_statement(statement) == statement


@pytest.mark.parametrize(("statement", "leak"), [
    pytest.param("ALTER ROLE app PASSWORD E'Tr0ub\\'4dor&3'", "4dor&3", id="e-string-backslash-quote"),
    pytest.param("ALTER ROLE app PASSWORD $pw1$Tr0ub4dor&3$pw1$", SECRET, id="dollar-tag-with-digit"),
    pytest.param("ALTER ROLE app PASSWORD'Tr0ub4dor&3'", SECRET, id="no-space-before-literal"),
    pytest.param("ALTER ROLE app PASSWORD /* rotated */ 'Tr0ub4dor&3'", SECRET, id="comment-before-literal"),
    pytest.param("ALTER ROLE app PASSWORD U&'Tr0ub4dor&3'", SECRET, id="unicode-escape-string"),
    pytest.param("SELECT dblink_connect('host=db1 password=''Tr0ub 4dor&3'' dbname=x')", "4dor&3",
                 id="conninfo-quoted-value-in-doubled-quotes"),
    pytest.param("SELECT dblink_connect(E'password=\\'Tr0ub 4dor&3\\' host=db1')", "4dor&3",
                 id="conninfo-quoted-value-in-e-string"),
    pytest.param("SELECT dblink_connect('postgresql://app:Tr0ub4dor&3@db1/x')", SECRET,
                 id="connection-uri-userinfo"),
])
def test_password_spelled_any_valid_way_is_redacted(statement: str, leak: str) -> None:
    assert leak not in redact_statement(statement)


@pytest.mark.parametrize("raw", [b"ALTER ROLE x PASSWORD 'y'", b"alter role x password 'y'",
                                 bytearray(b"..PassWord=.."), memoryview(b"\x00\xffpassword\x00")])
def test_might_hold_secret_finds_the_word_in_raw_bytes(raw: bytes) -> None:
    assert might_hold_secret(raw)


@pytest.mark.parametrize("raw", [b"SELECT 1", b"", b"pass word", b"\xff\xfe\x00passwd"])
def test_might_hold_secret_is_false_without_the_word(raw: bytes) -> None:
    assert not might_hold_secret(raw)


# The cheap pre-check (two substring searches on ASCII text) must decline exactly what the
# case-insensitive pattern declines; non-ASCII text always goes to the regex (Unicode case folding).
_HINTY = st.text(alphabet=st.sampled_from([*"pPaAsSwWoOrRdD:/@ '\t\nxé", "\u017f"]), max_size=30)


@settings(max_examples=400, deadline=None)
@given(prefix=_HINTY, middle=st.sampled_from(["", "password", "PassWord", "://u:p@h", "x://a:b@", ":/", "passwor"]),
       suffix=_HINTY)
def test_the_cheap_hint_check_agrees_with_the_pattern(prefix: str, middle: str, suffix: str) -> None:
    text = prefix + middle + suffix
    hinted = redact_mod._HINT_TEXT.search(text) is not None
    if not hinted:
        assert redact_statement(text) == text
    raw = text.encode()
    assert might_hold_secret(raw) == (redact_mod._HINT.search(raw) is not None)
    if text.isascii() and redact_mod._no_hint(text):  # it may say "maybe" where the pattern says no, never the reverse
        assert not hinted

