"""Statement shapes, the guardrail cache key: the C accelerator and the Python fallback must agree, and a
shape must be exactly what PostgreSQL's own scanner reads, or None; statements with equal shapes must
have equal fingerprints, so a cached verdict never serves a statement of another structure."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pglast import parser as pg

from data_plane.postgres import sqlshape

Shape = Callable[[str], str | None]

_c_shape = pytest.param(
    sqlshape._sqlshape.statement_shape if sqlshape.ACCELERATED else None,
    id="c",
    marks=pytest.mark.skipif(not sqlshape.ACCELERATED, reason="C accelerator not compiled"),
)
IMPLEMENTATIONS = [_c_shape, pytest.param(sqlshape._statement_shape_py, id="python")]
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_PLACEHOLDERS = {"SCONST": "'?'", "ICONST": "?", "FCONST": "?"}


def postgres_shape(text: str) -> str:
    """The shape read off libpg_query's own scanner (PostgreSQL's scan.l); raises pg.ParseError where it fails."""
    parts: list[str] = []
    previous_end = None
    for token in pg.scan(text):
        if token.name in ("SQL_COMMENT", "C_COMMENT"):
            continue
        if previous_end is not None and token.start > previous_end + 1:
            parts.append(" ")
        raw = text[token.start : token.end + 1]
        if token.name in ("BCONST", "XCONST"):
            parts.append(raw[0] + "'?'")
        else:
            parts.append(_PLACEHOLDERS.get(token.name, raw))
        previous_end = token.end
    return "".join(parts)


def fingerprint(text: str) -> str | None:
    try:
        return pg.fingerprint(text)
    except pg.ParseError:
        return None


def test_exports_the_documented_api() -> None:
    assert set(sqlshape.__all__) == {"ACCELERATED", "statement_shape"}
    expected = sqlshape._sqlshape.statement_shape if sqlshape.ACCELERATED else sqlshape._statement_shape_py
    assert sqlshape.statement_shape is expected


SHAPES = [
    ("SELECT 1", "SELECT ?"),
    (
        "SELECT abalance FROM pgbench_accounts WHERE aid = 48213;",
        "SELECT abalance FROM pgbench_accounts WHERE aid = ?;",
    ),
    ("  select\t*\n\r\f\vfrom   t  \n", "select * from t"),
    ("", ""),
    ("-- nothing but a comment", ""),
    # standard strings, doubled quotes, continuation over a newline (one literal, as PostgreSQL reads it)
    ("SELECT 'it''s', ''", "SELECT '?', '?'"),
    ("SELECT 'a'\n'b'", "SELECT '?'"),
    ("SELECT 'a' -- note\n  'b'", "SELECT '?'"),
    ("SELECT 'a' 'b'", "SELECT '?' '?'"),
    ("SELECT 'a' /* a block comment does not continue */\n'b'", "SELECT '?' '?'"),
    # escape strings: \' and \\ do not end them, a continuation keeps their escapes
    ("SELECT E'it\\'s', e'\\\\', E'a''b', E'tab\\there\\n'", "SELECT '?', '?', '?', '?'"),
    ("SELECT E'a'\n'\\' ; DROP TABLE t; --'", "SELECT '?'"),
    # bit, hex and national strings keep their prefix: their token differs from a plain string's
    ("SELECT B'0101', x'1F', N'abc', n'x'", "SELECT B'?', x'?', N'?', n'?'"),
    # a prefix letter counts only as a whole word: `abe'x'` is the identifier abe and a string
    ("SELECT abe'x', U'x', date '2024-01-01'", "SELECT abe'?', U'?', date '?'"),
    # dollar quotes: the body ends at the first copy of the opening delimiter
    ("SELECT $$it's$$, $fn$ body $$ not the end $fn$", "SELECT '?', '?'"),
    ("SELECT $a$ $$ $b$ -- /* $a$", "SELECT '?'"),
    ("SELECT $é$x$é$, $_1$y$_1$", "SELECT '?', '?'"),
    ("SELECT $$a$$$$b$$", "SELECT '?''?'"),
    # parameters and identifiers (with $, digits, non-ASCII letters) are structure
    ("SELECT $1, $23 FROM t WHERE a = $1", "SELECT $1, $23 FROM t WHERE a = $1"),
    ("SELECT a$b, t1, x$1, _x, é, ñandú FROM t1", "SELECT a$b, t1, x$1, _x, é, ñandú FROM t1"),
    ('SELECT "we""ird -- /* name", "Col" FROM "t"', 'SELECT "we""ird -- /* name", "Col" FROM "t"'),
    # numbers of every form
    (
        "SELECT 42, 1.5, .5, 5., 1e10, 1.5E-3, 1e+3, .5e3, 5.e3, 0x1F, 0X_1f, 0o17, 0b101, 1_000, 1_000.000_1",
        "SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?",
    ),
    ("SELECT 99999999999999999999, 007", "SELECT ?, ?"),
    ("SELECT 1'a', 'a'1", "SELECT ?'?', '?'?"),
    # comments act as whitespace, nest, and end operators where they start
    ("SELECT 1 -- trailing comment", "SELECT ?"),
    ("/* lead */ SELECT /* mid /* nested */ still */ 1", "SELECT ?"),
    ("SELECT a+/*c*/-b, a--comment\n-b, a/**/b, 2*/*c*/3", "SELECT a+ -b, a -b, a b, ?* ?"),
    ("SELECT 1 /*/ still a comment */", "SELECT ?"),
    # unary minus folds into a number but not into a string: the placeholders keep them apart
    ("SELECT -5, - 5, -'5', -.5", "SELECT -?, - ?, -'?', -?"),
    (
        "SELECT a::int, b[1:2], c <> d, e != f, g => h, x.y, t.*",
        "SELECT a::int, b[?:?], c <> d, e != f, g => h, x.y, t.*",
    ),
    ("SELECT 1;SELECT 2;", "SELECT ?;SELECT ?;"),
    ("SELECT u & 1, u&1, ~@#^&|`%", "SELECT u & ?, u&?, ~@#^&|`%"),
]

NONE = [
    # unterminated
    "SELECT 'open",
    "SELECT E'open\\'",
    "SELECT 'a'\n'open",
    'SELECT "open',
    "SELECT $a$ open",
    "SELECT $a$ x $b$",
    "SELECT /* open",
    "SELECT /* /* */",
    "SELECT B'01",
    # unicode escapes are not handled
    "SELECT U&'d\\0061t'",
    'SELECT U&"d\\0061t"',
    "SELECT u&'x'",
    # a backslash in a standard string: its extent depends on standard_conforming_strings
    "SELECT 'a\\b'",
    "SELECT '\\'' ; DROP TABLE t; --'",
    "SELECT N'a\\'",
    "SELECT 'a'\n'b\\'",
    # escapes whose value can fail the statement
    "SELECT E'\\u0041'",
    "SELECT E'\\U00000041'",
    "SELECT E'\\x41'",
    "SELECT E'\\101'",
    "SELECT E'\\0'",
    "SELECT E'\\é'",
    "SELECT B'01''10'",
    # trailing junk after numbers and parameters
    "SELECT 1abc",
    "SELECT 0x1g",
    "SELECT 0x",
    "SELECT 0b102",
    "SELECT 1e",
    "SELECT 1e+",
    "SELECT 1.5e",
    "SELECT 1_",
    "SELECT 1__0",
    "SELECT 1..2",
    "SELECT 1.2.3",
    "SELECT 1$",
    "SELECT $1a",
    "SELECT $1_0",
    "SELECT $1$",
    "SELECT $1.5",
    # a number right after a dot that follows a token
    "SELECT t.1",
    "SELECT f(x).1",
    'SELECT "c".1',
    "SELECT a[1].2",
    "SELECT 'a'.5",
    "SELECT a..5",
    # anything else outside the simple forms
    "SELECT $",
    "SELECT $a",
    "SELECT $1 + $ 2",
    "SELECT doc ? 'key' FROM t",
    "SELECT 1 \\g",
    "SELECT {1}",
    'SELECT ""',
    "SELECT 1\x00",
    "SELECT '\ud800'",
    "SELECT \x01 1",
    "SELECT 1\x7f",
]


@pytest.mark.parametrize("shape", IMPLEMENTATIONS)
class TestHandExamples:
    @pytest.mark.parametrize(("text", "expected"), SHAPES)
    def test_shape(self, shape: Shape, text: str, expected: str) -> None:
        assert shape(text) == expected

    @pytest.mark.parametrize("text", NONE)
    def test_outside_the_simple_forms_is_none(self, shape: Shape, text: str) -> None:
        assert shape(text) is None

    def test_non_str_is_a_type_error(self, shape: Shape) -> None:
        with pytest.raises(TypeError, match="expects str"):
            shape(b"SELECT 1")  # type: ignore[arg-type]

    def test_long_statement_beyond_the_stack_buffer(self, shape: Shape) -> None:
        text = "SELECT " + ", ".join(f"c{i} + ''" for i in range(2000))
        assert shape(text) == "SELECT " + ", ".join(f"c{i} + '?'" for i in range(2000))


@pytest.mark.parametrize(("text", "expected"), SHAPES)
def test_hand_shapes_are_postgres_own_tokenization(text: str, expected: str) -> None:
    assert postgres_shape(text) == expected


# Each statement hides or exposes a DROP in a way a lexer that is naive about escapes, doubled quotes,
# dollar-quote tags, nesting or comment/string interplay would read the other way round.
ADVERSARIAL = [
    ("SELECT E'\\\\'' ; DROP TABLE t; --'", False),
    ("SELECT E'\\'' ; DROP TABLE t; --'", True),
    ("SELECT '\\'' ; DROP TABLE t; --'", False),
    ("SELECT 'a''; DROP TABLE t; --'", False),
    ("SELECT 'a'''; DROP TABLE t; --'", True),
    ("SELECT $a$ $b$ DROP $a$", False),
    ("SELECT $a$ x $b$ $a$; DROP TABLE t; SELECT $b$ y $b$", True),
    ("SELECT $a$ $a $a$; DROP TABLE t; --$a$", True),
    ("SELECT $$ $a$ $$; DROP TABLE t; --$a$", True),
    ("SELECT a$b$ FROM t; DROP TABLE t; SELECT $b$$b$", True),
    ("SELECT 1; /* /* */ DROP TABLE x; */", False),
    ("SELECT 1; /* */ DROP TABLE x; /* */", True),
    ("SELECT 1; /* /* */ */ DROP TABLE x;", True),
    ("SELECT '*/ DROP TABLE t; /*'", False),
    ("SELECT 1 /* ' */ ; DROP TABLE t; -- ' */", True),
    ("SELECT 1 -- '\n; DROP TABLE t; -- '", True),
    ("SELECT 'x' /*\n'; DROP TABLE t; --*/", False),
    ("SELECT E'a'\n'\\' ; DROP TABLE t; --'", False),
    ("SELECT 'a'\n'\\' ; DROP TABLE t; --'", True),
    ("SELECT 'a' '; DROP TABLE t; --'", False),
    ("SELECT $$a$$\n'; DROP TABLE t; --'", False),
    ("SELECT 1-- '\n; DROP TABLE t", True),
    ("SELECT 1+/*'*/-1; DROP TABLE t", True),
    ("SELECT U&'\\0027; DROP TABLE t; --'", False),
    ("SELECT E'x'\n'a\\'' ; DROP TABLE t; --'", True),
]

# An attack next to the harmless statement a naive lexer would give the same key.
IMITATIONS = [
    # no backslash escapes in E'': `E'\'` then the string `' ; DROP ... --'`
    ("SELECT E'\\'' ; DROP TABLE t; --'", "SELECT E'x'' ; DROP TABLE t; --'"),
    # a continued E'' string read as a standard one: `'a\''` would hold a doubled quote
    ("SELECT E'x'\n'a\\'' ; DROP TABLE t; --'", "SELECT E'x'\n'a'"),
    # any $tag$ closing a dollar quote: `$a$ $b$` then the string `$a$; DROP ... --$b$`
    ("SELECT $a$ $b$ $a$; DROP TABLE t; --$b$", "SELECT $a$ x $a$ $b$ y $b$"),
    # quotes honoured inside a comment: `/* ' */ ; DROP ... -- ' */` all one comment
    ("SELECT 1 /* ' */ ; DROP TABLE t; -- ' */", "SELECT 1"),
]


@pytest.mark.parametrize("shape", IMPLEMENTATIONS)
@pytest.mark.parametrize(("text", "drop_is_code"), ADVERSARIAL)
def test_adversarial_statement_is_read_as_postgres_reads_it(shape: Shape, text: str, drop_is_code: bool) -> None:
    assert any(token.name == "DROP" for token in pg.scan(text)) is drop_is_code  # the data says what PostgreSQL sees
    result = shape(text)
    if result is not None:
        assert result == postgres_shape(text)
        assert ("DROP" in result) is drop_is_code


@pytest.mark.parametrize("shape", IMPLEMENTATIONS)
@pytest.mark.parametrize(("attack", "lookalike"), IMITATIONS)
def test_attack_does_not_share_the_key_of_the_statement_it_imitates(shape: Shape, attack: str, lookalike: str) -> None:
    assert any(token.name == "DROP" for token in pg.scan(attack))
    assert not any(token.name == "DROP" for token in pg.scan(lookalike))
    result = shape(attack)
    assert result is None or (result == postgres_shape(attack) and result != shape(lookalike))


# --- strategies: literals of every form with adversarial bodies, token soup, statements from templates ---

BODY = st.text(alphabet="ab '\"$-/*;\n_1é\\", max_size=12)
CONTINUATION = st.sampled_from(["\n", " \n  ", " -- c'\n", "\n -- c\n\t", "\r\n"])
NUMBERS = st.one_of(
    st.integers(0, 10**12).map(str),
    st.integers(0, 10**7).map(lambda n: f"{n:_}"),
    st.tuples(st.integers(0, 10**4), st.integers(0, 10**4)).map(lambda p: f"{p[0]}.{p[1]}"),
    st.integers(0, 999).map(lambda n: f".{n}"),
    st.integers(0, 999).map(lambda n: f"{n}."),
    st.tuples(
        st.sampled_from(["1", "1.5", ".5", "2.", "1_0"]),
        st.sampled_from("eE"),
        st.sampled_from(["", "+", "-"]),
        st.integers(0, 400).map(str),
    ).map("".join),
    st.integers(0, 2**70).map(hex),
    st.integers(0, 2**70).map(lambda n: f"0X{n:_X}"),
    st.integers(0, 4095).map(lambda n: f"0o{n:o}"),
    st.integers(0, 255).map(lambda n: f"0b{n:b}"),
)
# literal kind -> its placeholder: literals of kinds with the same placeholder share shapes
KINDS = {
    "number": "?",
    "standard": "'?'",
    "escape": "'?'",
    "dollar": "'?'",
    "B": "B'?'",
    "b": "b'?'",
    "X": "X'?'",
    "x": "x'?'",
    "N": "N'?'",
    "n": "n'?'",
}


@st.composite
def literals(draw: st.DrawFn, kind: str) -> str:
    if kind == "number":
        return draw(NUMBERS)
    if kind in "BbXx":
        digits = "01" if kind in "Bb" else "0123456789abcdefABCDEF"
        return kind + "'" + draw(st.text(alphabet=digits, max_size=8)) + "'"
    body = draw(BODY)
    if kind == "dollar":
        delimiter = "$" + draw(st.sampled_from(["", "a", "tag", "_x1", "é"])) + "$"
        assume((body + delimiter).find(delimiter) == len(body))
        return delimiter + body + delimiter
    if kind == "escape":
        prefix, quote = draw(st.sampled_from("eE")), draw(st.sampled_from(["\\'", "''"]))

        def escape(part: str) -> str:
            return "'" + part.replace("\\", "\\\\").replace("'", quote) + "'"
    else:  # standard strings and N'': a backslash would make the shape None (standard_conforming_strings)
        prefix = kind if kind in "Nn" else ""

        def escape(part: str) -> str:
            return "'" + part.replace("\\", "").replace("'", "''") + "'"

    if draw(st.booleans()):
        return prefix + escape(body)
    cut = draw(st.integers(0, len(body)))  # continued over a newline: still one literal
    return prefix + escape(body[:cut]) + draw(CONTINUATION) + escape(body[cut:])


ALPHABET = "'\"$-/*\\eE0123456789 .xX_abBnNuU&\n\t\r\v;(),=+:?{é中"
FRAGMENTS = [
    "'",
    "''",
    "E'",
    "e'",
    "B'",
    "X'",
    "N'",
    "U&'",
    'U&"',
    '"',
    '""',
    "$$",
    "$a$",
    "$b$",
    "$é$",
    "$1",
    "$",
    "--",
    "/*",
    "*/",
    "\n",
    " ",
    "\\",
    "\\'",
    "\\\\",
    "0x",
    "0b1",
    "1e",
    "1",
    "12",
    ".5",
    "5.",
    "_",
    "a",
    "t.",
    "SELECT ",
    "DROP TABLE t",
    ";",
    "-",
    "/",
    "*",
    "é",
    "\r",
    "\v",
    "&",
    "?",
    ")",
    "::",
    "e",
    "x",
    "ab",
]
# Token soup: words, operators, parameters and literals, glued or apart, so that adjacency (`abe'x'`,
# `1'x'`, `$1.`, a string continued over a newline, an operator running into a comment) is exercised.
SOUP_TOKENS = st.one_of(
    st.sampled_from(
        [
            "SELECT",
            "a",
            "t1",
            "e",
            "E",
            "b",
            "x",
            "N",
            "u",
            "U",
            "abe",
            "a$b",
            "é",
            "_",
            "$1",
            "$23",
            '"q""x"',
            '"é"',
            "(",
            ")",
            ",",
            ";",
            ".",
            "::",
            "+",
            "-",
            "*",
            "/",
            "<",
            "=",
            "&",
            "|",
            "~",
            "!",
            "@",
            "#",
            "%",
            "^",
            "`",
            "[",
            "]",
            ":",
        ]
    ),
    st.sampled_from(sorted(KINDS)).flatmap(lambda kind: literals(kind)),
)
SOUP_GAPS = st.sampled_from(["", "", " ", "\n", "\t", "/**/", "/* c */", "--c\n", " -- c\n", "\r\n"])
random_text = st.one_of(
    st.text(alphabet=ALPHABET, max_size=30),
    st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join),
    st.lists(st.tuples(SOUP_GAPS, SOUP_TOKENS), max_size=10).map(lambda pairs: "".join(g + t for g, t in pairs)),
)

# Statements with literals where any literal of the right kind parses; tokens are joined by separators
# that all read as one space (whitespace, nested comments, -- comments holding quotes and $$).
TEMPLATES = [
    ("SELECT", "abalance", "FROM", "pgbench_accounts", "WHERE", "aid", "=", "{};"),
    ("UPDATE", "pgbench_accounts", "SET", "abalance", "=", "abalance", "+", "{}", "WHERE", "aid", "=", "{}"),
    (
        "INSERT",
        "INTO",
        "pgbench_history",
        "(tid,",
        "bid,",
        "aid,",
        "delta,",
        "mtime)",
        "VALUES",
        "({},",
        "{},",
        "{},",
        "{},",
        "CURRENT_TIMESTAMP)",
    ),
    ("DELETE", "FROM", "t", "WHERE", "a", "=", "-{}", "OR", "b", "<", "{}"),
    ("SELECT", "{},", "f({})", "FROM", "t", "LIMIT", "{}"),
    ("SELECT", "date", "{}", "AS", "d"),
    ("SELECT", "*", "FROM", "t", "WHERE", "a", "IN", "({},", "{})"),
    ("SET", "search_path", "=", "{}"),
    ("SELECT", "a", "FROM", "t", "WHERE", "b", "=", "{};", "DROP", "TABLE", "t"),
    ("DROP", "TABLE", "t;", "SELECT", "{}"),
    (
        "SELECT",
        "x1,",
        "a$b,",
        "é,",
        '"Odd ""name"" -- /* */"',
        "FROM",
        "t",
        "WHERE",
        "c",
        "=",
        "$1",
        "AND",
        "d",
        "=",
        "{}",
    ),
]
SEPARATORS = st.sampled_from(
    [" ", "\n", "\t", "  ", " /* c */ ", "/* /* nested ' */ $$ */", " -- note ' $$\n", "\r\n", "\f", "\v", "/**/"]
)


@st.composite
def statements(draw: st.DrawFn, template: tuple[str, ...], kinds: list[str]) -> str:
    values = iter([draw(literals(kind)) for kind in kinds])
    tokens = [token.replace("{}", next(values)) if "{}" in token else token for token in template]
    text = tokens[0] + "".join(draw(SEPARATORS) + token for token in tokens[1:])
    return draw(st.sampled_from(["", " ", "/* lead */ "])) + text + draw(st.sampled_from(["", "\n", " -- end"]))


Pair = tuple[str, str, list[str], list[str]]


@st.composite
def statement_pairs(draw: st.DrawFn, same_kinds: bool) -> Pair:
    """One template filled twice: with literals of the same kinds, or of independently drawn kinds."""
    template = draw(st.sampled_from(TEMPLATES))
    slots = sum(token.count("{}") for token in template)
    kind_lists = st.lists(st.sampled_from(sorted(KINDS)), min_size=slots, max_size=slots)
    kinds = draw(kind_lists)
    other_kinds = kinds if same_kinds else draw(kind_lists)
    return draw(statements(template, kinds)), draw(statements(template, other_kinds)), kinds, other_kinds


# --- properties ---


@pytest.mark.skipif(not sqlshape.ACCELERATED, reason="C accelerator not compiled")
@FAST
@given(random_text)
def test_c_and_python_agree(text: str) -> None:
    assert sqlshape._sqlshape.statement_shape(text) == sqlshape._statement_shape_py(text)


@FAST
@given(random_text)
def test_shape_of_random_text_is_none_or_postgres_tokenization(text: str) -> None:
    result = sqlshape._statement_shape_py(text)
    if result is not None:
        assert result == postgres_shape(text)


@FAST
@given(statement_pairs(same_kinds=True))
def test_same_statement_with_other_literal_values_has_the_same_shape(pair: Pair) -> None:
    first, second, _, _ = pair
    first_shape = sqlshape.statement_shape(first)
    assert first_shape is not None, first
    assert first_shape == postgres_shape(first) == sqlshape._statement_shape_py(first)
    assert sqlshape.statement_shape(second) == first_shape


@FAST
@given(st.one_of(statement_pairs(same_kinds=True), statement_pairs(same_kinds=False)))
def test_equal_shapes_mean_equal_fingerprints(pair: Pair) -> None:
    first, second, kinds, other_kinds = pair
    first_shape, second_shape = sqlshape.statement_shape(first), sqlshape.statement_shape(second)
    assert first_shape is not None and second_shape is not None
    assert (first_shape == second_shape) is ([KINDS[k] for k in kinds] == [KINDS[k] for k in other_kinds])
    if first_shape == second_shape:
        # fingerprints ignore literal values; a statement PostgreSQL rejects shares no key with one it accepts
        assert fingerprint(first) == fingerprint(second), (first, second)
