"""Guardrails: policy rules matched against what a statement does, protocol-agnostic.

A protocol module turns a statement into `StatementFacts` (PostgreSQL with its own parser,
MySQL with sqlglot, SSH commands by rule); the rules of the grant decide: `block`,
`require_approval`, `log` or `allow`. Every rule that matches counts and the strictest action
wins, so an `allow` rule can never open what another rule blocks. A statement that cannot be
parsed is blocked unless a rule with `unparsable: true` says otherwise."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

ALLOW, LOG, REQUIRE_APPROVAL, BLOCK = "allow", "log", "require_approval", "block"
_SEVERITY = {ALLOW: 0, LOG: 1, REQUIRE_APPROVAL: 2, BLOCK: 3}

# Functions whose side effects hide inside a SELECT: server files, other sessions, settings,
# large objects, connections out of the database.
DENIED_FUNCTIONS = (
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile", "pg_read_file",
    "pg_read_binary_file", "pg_ls_*", "pg_stat_file", "pg_file_*", "pg_logdir_ls", "lo_*", "dblink*",
    "set_config", "pg_switch_wal", "pg_create_restore_point", "pg_start_backup", "pg_stop_backup",
    "pg_backup_start", "pg_backup_stop", "pg_promote", "pg_create_*_replication_slot",
    "pg_drop_replication_slot", "pg_replication_origin_*", "pg_import_system_collations", "pg_sleep_for",
    "pg_advisory_*", "txid_*", "query_to_xml*", "copy_*", "pg_execute_server_program",
)


@dataclass(frozen=True)
class StatementFacts:
    command: str
    classes: frozenset[str]
    tables: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    no_where: bool = False
    copy_program: bool = False
    copy_file: bool = False
    # Denylisted functions this statement calls harmlessly (set_config of a session nicety, as
    # drivers do); such facts depend on literal values, so they are never cached by shape.
    exempt: frozenset[str] = frozenset()

    @property
    def literal_sensitive(self) -> bool:
        """Whether the verdict depends on literal values (set_config's setting name): such
        statements are judged by exact text, never by shape."""
        return any(f.rsplit(".", 1)[-1] == "set_config" for f in self.functions)

    @property
    def denied_functions(self) -> frozenset[str]:
        bare = {f.rsplit(".", 1)[-1] for f in self.functions} - self.exempt
        return frozenset(f for f in bare if any(fnmatchcase(f, p) for p in DENIED_FUNCTIONS))


@dataclass(frozen=True)
class Verdict:
    action: str
    rule: str | None = None
    reason: str = ""
    matched: tuple[str, ...] = ()  # every rule that matched, for the evidence
    approval_id: str | None = None  # set once a held statement's approval was decided

    @property
    def blocked(self) -> bool:
        return self.action == BLOCK


ALLOWED = Verdict(ALLOW)


def _any_glob(values: Iterable[str], patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(v, p.lower()) for v in values for p in patterns)


@dataclass(frozen=True)
class Rule:
    name: str
    action: str
    match: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Rule:
        action = doc.get("action", BLOCK)
        if action not in _SEVERITY:
            raise ValueError(f"guardrail {doc.get('name')}: unknown action {action!r}")
        return cls(str(doc["name"]), action, dict(doc.get("match") or {}), str(doc.get("description") or ""))

    @property
    def needs_text(self) -> bool:
        return "regex" in self.match

    def matches(self, facts: StatementFacts | None, text: str, *, multi_statement: bool) -> bool:
        """Every condition given must hold; list conditions hold when any element matches."""
        m = self.match
        if facts is None:  # unparsable: only rules that ask for it (or match the raw text) apply
            if not m.get("unparsable") and "regex" not in m:
                return False
        elif m.get("unparsable"):
            return False
        if facts is not None:
            if "classes" in m and not facts.classes & set(m["classes"]):
                return False
            if "commands" in m and not any(fnmatchcase(facts.command, c.upper()) for c in m["commands"]):
                return False
            if "tables" in m and not _any_glob(facts.tables | {t.rsplit(".", 1)[-1] for t in facts.tables},
                                                m["tables"]):
                return False
            if "functions" in m and not _any_glob(
                    facts.functions | {f.rsplit(".", 1)[-1] for f in facts.functions}, m["functions"]):
                return False
            if m.get("no_where") and not facts.no_where:
                return False
            if m.get("denied_functions") and not facts.denied_functions:
                return False
            if m.get("copy_program") and not facts.copy_program:
                return False
            if m.get("copy_file") and not facts.copy_file:
                return False
        if m.get("multi_statement") and not multi_statement:
            return False
        return not ("regex" in m and not re.search(m["regex"], text, re.IGNORECASE | re.DOTALL))

    def describe(self, facts: StatementFacts | None) -> str:
        if self.description:
            return self.description
        if facts is None:
            return "the statement could not be parsed"
        return f"{facts.command} is not allowed"


UNPARSABLE_DEFAULT = Rule("unparsable-statement", BLOCK, {"unparsable": True},
                          "the statement could not be parsed; unparsable statements are blocked by default")


class Guardrails:
    def __init__(self, rules: Iterable[Mapping[str, Any]]) -> None:
        self.rules = tuple(Rule.from_doc(r) for r in rules)
        self.needs_text = any(r.needs_text for r in self.rules)
        self.handles_unparsable = any(r.match.get("unparsable") for r in self.rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def evaluate(self, statements: Sequence[StatementFacts] | None, text: str) -> Verdict:
        """`statements` is None when the text could not be parsed."""
        multi = statements is not None and len(statements) > 1
        strictest: tuple[int, Rule, StatementFacts | None] | None = None
        matched: list[str] = []
        candidates: Sequence[StatementFacts | None] = statements if statements is not None else (None,)
        for facts in candidates:
            for rule in self.rules:
                if rule.matches(facts, text, multi_statement=multi):
                    matched.append(rule.name)
                    severity = _SEVERITY[rule.action]
                    if strictest is None or severity > strictest[0]:
                        strictest = (severity, rule, facts)
        if statements is None and not self.handles_unparsable:
            rule = UNPARSABLE_DEFAULT
            return Verdict(BLOCK, rule.name, rule.description, (*matched, rule.name))
        if strictest is None:
            return ALLOWED
        _, rule, facts = strictest
        return Verdict(rule.action, rule.name, rule.describe(facts), tuple(dict.fromkeys(matched)))
