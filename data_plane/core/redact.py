"""Secrets out of recorded statement text and parameters: the literal after a PASSWORD keyword
(ALTER/CREATE ROLE/USER, user mappings) and passwords inside connection strings (dblink,
postgres_fdw, subscriptions: `password=…` or `scheme://user:secret@host`).

Statements are tokenized with PostgreSQL's own lexer (through pglast), so every way SQL can
spell a string literal — E'', U&'', dollar quotes with any tag, comments in between — is seen as
the lexer sees it. If the lexer fails, everything from the first hint of a secret on is dropped."""

from __future__ import annotations

import re

from pglast.parser import scan

REDACTED = "'[REDACTED]'"

_HINT = re.compile(rb"(?i)password|://[^\s/@']*:[^\s@']*@")
_STRING_TOKENS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST"})
_COMMENT_TOKENS = frozenset({"C_COMMENT", "SQL_COMMENT"})
_CONNINFO_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:\\.|[^'\\])*'|[^\s']+)")
_URI_USERINFO = re.compile(r"(://[^\s/@:']*:)([^\s@']*)(@)")


def _no_hint(text: str) -> bool:
    """Whether ASCII text certainly has no hint of a secret: what the case-insensitive pattern
    needs, found by two substring searches (several times cheaper than the regex on every statement)."""
    return "://" not in text and "password" not in text.lower()


def might_hold_secret(raw: bytes | bytearray | memoryview) -> bool:
    """Cheap byte-level check before any decoding: most statements never mention a password."""
    if type(raw) is bytes and raw.isascii() and _no_hint(raw.decode("ascii")):
        return False
    return _HINT.search(raw) is not None


def redact_conninfo(value: str) -> str:
    """A connection string (key=value or URI) with its password replaced."""
    value = _CONNINFO_PASSWORD.sub(lambda m: m.group(1) + "[REDACTED]", value)
    return _URI_USERINFO.sub(lambda m: m.group(1) + "[REDACTED]" + m.group(3), value)


def _literal_value(token: str) -> str | None:
    """The value of a plain, E'' or dollar-quoted literal; None for forms not decoded here."""
    if token.startswith("$"):
        tag_end = token.index("$", 1) + 1
        return token[tag_end:-tag_end]
    if token[:2] in ("E'", "e'"):
        body = token[2:-1]
        return re.sub(r"\\(.)", r"\1", body.replace("''", "'"))
    if token.startswith("'"):
        return token[1:-1].replace("''", "'")
    return None


def _redacted_literal(token: str) -> str:
    value = _literal_value(token)
    if value is None:
        return REDACTED
    return "'" + redact_conninfo(value).replace("'", "''") + "'"


_HINT_TEXT = re.compile(_HINT.pattern.decode())


def redact_statement(text: str) -> str:
    # Non-ASCII text goes to the regex: its case folding is Unicode's (the long s matches `s`).
    if (text.isascii() and _no_hint(text)) or _HINT_TEXT.search(text) is None:
        return text
    try:
        tokens = [t for t in scan(text) if t.name not in _COMMENT_TOKENS]
    except Exception:
        match = _HINT.search(text.encode())
        cut = len(text.encode()[: match.start()].decode(errors="ignore")) if match else 0
        return text[:cut] + "[REDACTED]"
    spans: list[tuple[int, int, str]] = []
    for index, token in enumerate(tokens):
        if token.name == "PASSWORD" and index + 1 < len(tokens) and tokens[index + 1].name in _STRING_TOKENS:
            secret = tokens[index + 1]
            spans.append((secret.start, secret.end + 1, REDACTED))
        elif token.name in _STRING_TOKENS and (index == 0 or tokens[index - 1].name != "PASSWORD"):
            literal = text[token.start:token.end + 1]
            if might_hold_secret(literal.encode()):
                spans.append((token.start, token.end + 1, _redacted_literal(literal)))
    for start, end, replacement in sorted(spans, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text
