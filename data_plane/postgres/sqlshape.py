"""The shape of a SQL statement: its text with literal values stripped, the key guardrail verdicts are
cached by, so `... WHERE aid = 48213` and `... WHERE aid = 77` share one entry.

`statement_shape` is a lexer, not a parser, and it must never read as a literal what PostgreSQL reads
as code: two different statements would then share a key and one's verdict would serve the other. It
mirrors PostgreSQL's scan.l (standard_conforming_strings on) for the common forms and returns None
for anything else; the caller then takes the exact path through the parser.

The shape keeps every token but literals verbatim (keywords, identifiers, quoted identifiers,
operators, `$n` parameters), joins tokens that whitespace or comments separated with one space and
replaces literals by a placeholder that keeps their token kind, because the grammar tells the kinds
apart (`date '2024-01-01'` parses, `date 5` does not; `-5` is a constant, `-'5'` an expression):

- numbers of every form (`42`, `1.5`, `.5`, `1e-3`, `0x1F`, `0o17`, `0b101`, `1_000`) -> `?`
- character strings (`'...'`, `E'...'`, `$tag$...$tag$`, continued over newlines) -> `'?'`
- bit, hex and national strings keep their prefix as written: `B'01'` -> `B'?'`, `x'1f'` -> `x'?'`,
  `N'abc'` -> `N'?'`

None, by caution: an unterminated string, quoted identifier, dollar quote or block comment;
`U&'...'` and `U&"..."`; a backslash in a standard string (its extent depends on
standard_conforming_strings) or outside any literal; E-string escapes whose value can make the
statement fail to parse (`\\u`, `\\U`, `\\x`, octal, a backslash before a non-ASCII character); `''`
right after a bit or hex string; a number followed by an identifier character or a dot (`1abc`,
`0x1g`, `1e`, `1..2`) and a parameter followed by an identifier character (`$1a`, which PostgreSQL
rejects and libpg_query accepts); `.5` right after an identifier, `)`, `]`, a quote or a dot
(`t.1`); a `$` that starts neither a parameter nor a dollar quote; `?` outside literals (it is the
placeholder, and jsonb's operator); `{`, `}`, control characters, NUL and lone surrogates.

So two statements with the same shape are the same sequence of PostgreSQL tokens, literal values
aside (integers and floats are one kind: PostgreSQL itself turns an integer too large into a float).

A C accelerator does the scan when it was compiled (`ACCELERATED`); it works on the UTF-8 bytes and
behaves exactly like the pure-Python fallback below.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["ACCELERATED", "statement_shape"]

NUMBER = "?"
STRING = "'?'"

_HIGH = r"\x80-\U0010ffff"  # every non-ASCII character: PostgreSQL reads bytes >= 0x80 as letters
_IDENT_CONT = rf"A-Za-z0-9_${_HIGH}"
_DIGITS = r"[0-9](?:_?[0-9])*"
# A run of what the shape keeps as it stands, one regex match however long: words that are not a
# literal's prefix, punctuation that starts no comment and no number, whitespace. The alternatives
# start on disjoint characters, so the possessive repeats only save time.
_RUN = (
    rf"(?:(?![eEbBxXnN]'|[uU]&['\"])[A-Za-z_{_HIGH}][{_IDENT_CONT}]*+"
    r"|[,()\[\];:~!@\#^&|`+*%<>= \t\n\r\f\v]++|-(?!-)|/(?!\*)|\.(?![0-9]))++"
)
_TOKEN = re.compile(
    rf"""
      (?P<number>0[xX](?:_?[0-9A-Fa-f])+|0[oO](?:_?[0-7])+|0[bB](?:_?[01])+
                 |(?:{_DIGITS}(?:\.(?:{_DIGITS})?)?|\.{_DIGITS})(?:[eE][-+]?{_DIGITS})?)
    | (?P<run>{_RUN})
    | (?P<space>--[^\n\r]*)
    | (?P<word>[A-Za-z_{_HIGH}][{_IDENT_CONT}]*)
    | (?P<param>\$[0-9]+)
    | (?P<comment>/\*)
    | (?P<quote>')
    | (?P<ident>")
    | (?P<dollar>\$)
    """,
    re.VERBOSE,
)
_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
_DOLLAR_TAG = re.compile(rf"(?:[A-Za-z_{_HIGH}][A-Za-z0-9_{_HIGH}]*)?\$")
_COMMENT_MARK = re.compile(r"/\*|\*/")
_ESCAPE_STOP = re.compile(r"['\\]")
_NEWLINE = re.compile(r"[\n\r]")

_ASCII_IDENT_CONT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_$")
_SPACE = frozenset(" \t\n\r\f\v")
_NON_NEWLINE_SPACE = frozenset(" \t\f\v")
_BEFORE_DOT_DIGIT = frozenset(")]\"'.")  # `t.1`, `f(x).1`, `"c".1`: PostgreSQL's reading varies, keep out
# E-string escapes whose value PostgreSQL checks while scanning (a bad one fails the whole statement)
_VALUED_ESCAPES = frozenset("01234567uUx")

_STANDARD, _ESCAPE, _BITS = 0, 1, 2  # scan.l's xq, xe and xb/xh states


def _is_ident_cont(char: str) -> bool:
    return char in _ASCII_IDENT_CONT or char >= "\x80"


def _line_end(text: str, pos: int) -> int:
    found = _NEWLINE.search(text, pos)
    return found.start() if found else len(text)


def _block_comment_end(text: str, pos: int) -> int:
    """Index just past the comment whose opening slash-star ends at pos; comments nest. -1: unterminated."""
    depth = 1
    while depth:
        mark = _COMMENT_MARK.search(text, pos)
        if mark is None:
            return -1
        depth += 1 if mark.group() == "/*" else -1
        pos = mark.end()
    return pos


def _continuation(text: str, pos: int) -> int:
    """Index of the quote continuing the string that closed just before pos, or -1.

    scan.l's {quotecontinue}: whitespace holding a newline (-- comments count, block comments do not).
    """
    size = len(text)
    while pos < size:
        char = text[pos]
        if char in _NON_NEWLINE_SPACE:
            pos += 1
        elif char == "-" and text.startswith("-", pos + 1):
            pos = _line_end(text, pos)
        else:
            break
    if pos >= size or text[pos] not in "\n\r":
        return -1
    pos += 1
    while pos < size:
        char = text[pos]
        if char in _SPACE:
            pos += 1
        elif char == "-" and text.startswith("-", pos + 1):
            pos = _line_end(text, pos)
            if pos >= size:  # a -- comment continues a string only when a newline ends it
                return -1
        else:
            break
    return pos if pos < size and text[pos] == "'" else -1


def _quoted_end(text: str, quote: int, mode: int) -> int:
    """Index just past the string literal opening at `quote`, continuations included; -1 for None."""
    size = len(text)
    pos = quote + 1
    while True:
        if mode == _ESCAPE:
            stop = _ESCAPE_STOP.search(text, pos)
            if stop is None:
                return -1
            end = stop.start()
            if text[end] == "\\":
                if end + 1 >= size:
                    return -1
                escaped = text[end + 1]
                if escaped in _VALUED_ESCAPES or escaped >= "\x80":
                    return -1
                pos = end + 2
                continue
        else:
            end = text.find("'", pos)
            if end < 0:
                return -1
            if mode == _STANDARD and text.find("\\", pos, end) >= 0:
                return -1  # where this string ends depends on standard_conforming_strings
        if text.startswith("'", end + 1):
            if mode == _BITS:
                return -1  # B'01''10' is two literals in a row; nothing sends that
            pos = end + 2
            continue
        following = _continuation(text, end + 1)
        if following < 0:
            return end + 1
        pos = following + 1


def _quoted_ident_end(text: str, quote: int) -> int:
    pos = quote + 1
    while True:
        end = text.find('"', pos)
        if end < 0:
            return -1
        if text.startswith('"', end + 1):
            pos = end + 2
            continue
        return end + 1 if end > quote + 1 else -1  # "" is a zero-length identifier: an error


def _statement_shape_py(text: str) -> str | None:
    """The shape of `text` (see the module docstring), or None when it is outside the simple forms."""
    if not isinstance(text, str):
        raise TypeError(f"statement_shape() expects str, not {type(text).__name__}")
    if "\x00" in text:
        return None
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return None
    size = len(text)
    match = _TOKEN.match
    parts: list[str] = []
    space = False
    pos = 0
    while pos < size:
        token = match(text, pos)
        if token is None:
            return None
        kind = token.lastgroup
        end = token.end()
        if kind == "run":
            run = text[pos:end]
            if "  " in run or not run.isprintable():  # tabs, newlines, repeated spaces: one space
                run = _WHITESPACE.sub(" ", run)
            if run[0] == " ":
                space = True
                run = run[1:]
            if run:
                trailing = run[-1] == " "
                if space and parts:
                    parts.append(" ")
                parts.append(run[:-1] if trailing else run)
                space = trailing
            pos = end
            continue
        if kind == "space":
            space = True
            pos = end
            continue
        if kind == "comment":
            pos = _block_comment_end(text, end)
            if pos < 0:
                return None
            space = True
            continue
        if kind == "word":
            piece = text[pos:end]
            if end - pos == 1 and end < size:
                following = text[end]
                if following == "'":
                    if piece in "eE":
                        end, piece = _quoted_end(text, end, _ESCAPE), STRING
                    elif piece in "bBxX":
                        end, piece = _quoted_end(text, end, _BITS), piece + STRING
                    elif piece in "nN":  # NCHAR followed by a standard string
                        end, piece = _quoted_end(text, end, _STANDARD), piece + STRING
                    if end < 0:
                        return None
                elif following == "&" and piece in "uU" and text.startswith(("'", '"'), end + 1):
                    return None
        elif kind == "number":
            if text[pos] == "." and pos > 0 and (_is_ident_cont(text[pos - 1]) or text[pos - 1] in _BEFORE_DOT_DIGIT):
                return None
            if end < size and (_is_ident_cont(text[end]) or text[end] == "."):
                return None
            piece = NUMBER
        elif kind == "quote":
            end, piece = _quoted_end(text, pos, _STANDARD), STRING
            if end < 0:
                return None
        elif kind == "ident":
            end = _quoted_ident_end(text, pos)
            if end < 0:
                return None
            piece = text[pos:end]
        elif kind == "param":
            if end < size and _is_ident_cont(text[end]):
                return None
            piece = text[pos:end]
        else:  # dollar: $tag$ ... $tag$
            tag = _DOLLAR_TAG.match(text, pos + 1)
            if tag is None:
                return None
            delimiter = text[pos : tag.end()]
            close = text.find(delimiter, tag.end())
            if close < 0:
                return None
            end, piece = close + len(delimiter), STRING
        if space and parts:
            parts.append(" ")
        space = False
        parts.append(piece)
        pos = end
    return "".join(parts)


try:
    from data_plane.postgres import _sqlshape
except ImportError:  # no compiler where this was installed: the fallback is correct, only slower
    _sqlshape = None

statement_shape: Callable[[str], str | None]
if _sqlshape is not None:
    statement_shape = _sqlshape.statement_shape
    ACCELERATED = True
else:
    statement_shape = _statement_shape_py
    ACCELERATED = False
