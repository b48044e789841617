"""Guardrails on the PostgreSQL data path: each Query, Parse and FunctionCall is judged before it
is relayed. Verdicts are cached by statement shape (PostgreSQL's own fingerprint: literal values do
not change it) and by exact text, and shared by the sessions of one policy version.

A blocked statement never reaches the backend as written: its text is replaced by one the server
refuses at parse time, so the server itself keeps the protocol state right (the error-until-Sync
rule of the extended protocol, an open transaction turning aborted), and the gateway rewrites that
error into `42501` naming the rule."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from data_plane.core.guardrails import ALLOW, ALLOWED, BLOCK, REQUIRE_APPROVAL, Guardrails, StatementFacts, Verdict
from data_plane.postgres import messages as m
from data_plane.postgres.classify import Unparsable, classify, fingerprint
from data_plane.postgres.sqlshape import ACCELERATED as SHAPE_ACCELERATED
from data_plane.postgres.sqlshape import statement_shape

# What the backend is sent instead of a blocked statement: rejected by its parser, nothing runs.
REFUSED_TEXT = "PROCTOR_BLOCKED_STATEMENT"
CACHE_SIZE = 20_000


class _Lru(OrderedDict[str, Any]):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_fresh(self, key: str) -> Any:
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        self[key] = value
        if len(self) > self.size:
            self.popitem(last=False)


class StatementGuard:
    def __init__(self, rules: Sequence[Mapping[str, Any]]) -> None:
        self.guardrails = Guardrails(rules)
        self._by_text = _Lru(CACHE_SIZE)
        self._by_shape = _Lru(CACHE_SIZE)
        self.hits = self.misses = 0

    def check(self, text: str) -> Verdict:
        """The verdict on one statement text (which may hold several statements)."""
        by_text = not self.guardrails.needs_text  # regex rules look at the literal text itself
        # The shape: literals stripped by a fast lexer that follows PostgreSQL's (C, ~0.3 µs); where it
        # declines, PostgreSQL's own fingerprint (~10 µs). Either way, literal values do not change it.
        shape = statement_shape(text) if SHAPE_ACCELERATED else None
        if by_text and shape is None:  # only what the lexer declines is ever cached by text (below)
            verdict = self._by_text.get_fresh(text)
            if verdict is not None:
                self.hits += 1
                return verdict
        if shape is None:
            fingerprinted = fingerprint(text)
            shape = "fp:" + fingerprinted if fingerprinted else None
        cached = self._by_shape.get_fresh(shape) if shape else None
        if cached is not None:
            self.hits += 1
            verdict = cached if by_text else self.guardrails.evaluate(cached, text)
        else:
            self.misses += 1
            try:
                facts: Sequence[StatementFacts] | None = classify(text)
            except Unparsable:
                facts = None
            if facts is None:
                verdict = self.guardrails.evaluate(None, text)
            elif not facts:  # nothing but comments or semicolons: PostgreSQL answers EmptyQueryResponse
                verdict = ALLOWED
            else:
                verdict = self.guardrails.evaluate(facts, text)
            # Facts that depend on literal values (set_config's setting) are cached by exact text only.
            if shape and facts is not None and not any(f.literal_sensitive for f in facts):
                self._by_shape.put(shape, verdict if by_text else facts)
        if by_text and shape is not None and not shape.startswith("fp:"):
            return verdict  # the shape cache answers repeats as cheaply as the text cache would
        if by_text:
            self._by_text.put(text, verdict)
        return verdict


    def holds_for_shape(self, text: str, shape: str, verdict: Verdict | None) -> bool:
        """Whether `verdict`, which `text` got (None: no rule matched), is the verdict of every
        statement of `shape` (as the C lexer made it of `text`), so the C data path may give it to
        their repeats without asking: check gives each of them the verdict it cached by shape (whose
        facts do not depend on literal values), no rule looks at the text, and this is that verdict,
        not an approval's outcome."""
        if self.guardrails.needs_text or not SHAPE_ACCELERATED or statement_shape(text) != shape:
            return False
        cached = self._by_shape.get(shape)
        if not isinstance(cached, Verdict):
            return False
        if verdict is None:
            return cached.action == ALLOW and not cached.matched
        return cached == verdict and verdict.approval_id is None and not stops(verdict)


_guards: dict[str, StatementGuard] = {}


def guard_for(rules: Sequence[Mapping[str, Any]]) -> StatementGuard | None:
    """The shared guard of a rule set (one per policy version in practice); None without rules."""
    if not rules:
        return None
    key = json.dumps(list(rules), sort_keys=True)
    guard = _guards.get(key)
    if guard is None:
        guard = _guards[key] = StatementGuard(rules)
    return guard


def stops(verdict: Verdict) -> bool:
    # Holding a statement for approval is the approval workflow's; until a gateway can hold, it refuses.
    return verdict.action in (BLOCK, REQUIRE_APPROVAL)


def refusal(verdict: Verdict, *, policy: str) -> bytes:
    """The ErrorResponse the client gets for a stopped statement."""
    if verdict.approval_id is not None:  # a held statement whose approval was denied or expired
        return m.error_response("42501", verdict.reason, detail=f"approval {verdict.approval_id}, rule "
                                f'"{verdict.rule}", policy {policy}')
    if verdict.action == REQUIRE_APPROVAL:
        message = f'statement requires approval under Proctor rule "{verdict.rule}": {verdict.reason}'
    else:
        message = f'statement blocked by Proctor rule "{verdict.rule}": {verdict.reason}'
    return m.error_response("42501", message, detail=f"policy {policy}",
                            hint="ask an administrator of your Proctor policy")


def refused_query() -> bytes:
    return m.query(REFUSED_TEXT)


def refused_parse(statement: str) -> bytes:
    return m.frame(b"P", m.cstring(statement) + m.cstring(REFUSED_TEXT) + b"\x00\x00")
