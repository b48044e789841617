"""Secrets out of recorded statement text: `PASSWORD '…'` clauses (ALTER/CREATE ROLE/USER) and
`password=…` in connection strings (dblink, postgres_fdw options, subscriptions)."""

from __future__ import annotations

import re

REDACTED = "'[REDACTED]'"

_QUOTED = r"(?:[eE]?'(?:[^']|'')*'|\$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$)"
_PASSWORD_CLAUSE = re.compile(rf"(?i)(\b(?:encrypted\s+|unencrypted\s+)?password\s+){_QUOTED}", re.DOTALL)
_CONNINFO_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)")
_QUICK = re.compile(rb"(?i)password")


def might_hold_secret(raw: bytes | bytearray | memoryview) -> bool:
    """Cheap byte-level check before any decoding: most statements never mention a password."""
    return _QUICK.search(raw) is not None


def redact_statement(text: str) -> str:
    text = _PASSWORD_CLAUSE.sub(lambda m: m.group(1) + REDACTED, text)
    return _CONNINFO_PASSWORD.sub(lambda m: m.group(1) + "[REDACTED]", text)
