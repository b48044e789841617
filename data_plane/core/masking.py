"""Masking, protocol-agnostic: which values are regulated (column rules, content detectors) and
how they are masked (full redaction, keep the last N, keyed hash, NULL).

Detectors are regular expressions with validators (Luhn for card numbers, mod-97 for IBANs), not
a model: they run inline on every value a rule looks at, so they must cost microseconds.
A masked value keeps its type's wire validity: protocol modules decide what a masked non-text
value becomes (usually NULL); these functions work on text."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

REDACT, PARTIAL, HASH, NULL = "redact", "partial", "hash", "null"
METHODS = (REDACT, PARTIAL, HASH, NULL)


# ------------------------------------------------------------------------------------------------
# validators
# ------------------------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "").upper()
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return int(number) % 97 == 1


def _card(match: re.Match[str]) -> bool:
    digits = re.sub(r"[ -]", "", match.group(0))
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _ssn(match: re.Match[str]) -> bool:
    area, group, serial = match.group("area"), match.group("group"), match.group("serial")
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _iban(match: re.Match[str]) -> bool:
    return iban_valid(match.group(0))


def _jwt(match: re.Match[str]) -> bool:
    head = match.group(0).split(".", 1)[0]
    try:
        return base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)).startswith(b"{")
    except ValueError:
        return False


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: re.Pattern[str]
    validate: Callable[[re.Match[str]], bool] | None = None
    hint: str | None = None  # a substring (lower case) every match contains: a cheap pre-check

    def find(self, text: str) -> list[tuple[int, int]]:
        if self.hint is not None and self.hint not in text.lower():
            return []
        return [(m.start(), m.end()) for m in self.pattern.finditer(text)
                if self.validate is None or self.validate(m)]


BUILTIN_DETECTORS: dict[str, Detector] = {d.name: d for d in (
    Detector("email", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), hint="@"),
    Detector("card_number", re.compile(r"(?<![0-9])(?:[0-9][ -]?){12,18}[0-9](?![0-9])"), _card),
    Detector("us_ssn", re.compile(r"(?<![0-9])(?P<area>[0-9]{3})-(?P<group>[0-9]{2})-(?P<serial>[0-9]{4})(?![0-9])"),
             _ssn, hint="-"),
    Detector("phone", re.compile(
        r"(?<![\w+])\+?[0-9]{1,3}[ .-]?\(?[0-9]{2,4}\)?[ .-][0-9]{3,4}[ .-]?[0-9]{3,4}(?![0-9])")),
    Detector("iban", re.compile(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"), _iban),
    Detector("aws_access_key", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b")),
    Detector("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{10,}"), _jwt, hint="eyj"),
    # Never across a double quote: a key inside a JSON string is masked without breaking the JSON.
    Detector("private_key", re.compile(
        r'-----BEGIN [A-Z ]*PRIVATE KEY-----[^"]*?(?:-----END [A-Z ]*PRIVATE KEY-----|(?="|$))'), hint="private key"),
)}


def custom_detector(name: str, pattern: str, validator: Callable[[str], bool] | None = None) -> Detector:
    """A policy's own detector: a regular expression and, optionally, a validator of each match."""
    compiled = re.compile(pattern)
    return Detector(name, compiled, (lambda m: validator(m.group(0))) if validator else None)


# ------------------------------------------------------------------------------------------------
# methods
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskMethod:
    method: str = REDACT
    keep_last: int = 4
    hash_key: bytes = b""

    def apply(self, value: str) -> str | None:
        """The masked text, or None for NULL."""
        if self.method == NULL:
            return None
        if self.method == PARTIAL:
            keep = min(self.keep_last, len(value) // 2)  # a short value never shows more than half
            return "*" * (len(value) - keep) + (value[-keep:] if keep else "")
        if self.method == HASH:
            # Keyed (per tenant): equal inputs give equal outputs, so joins and GROUP BY still work.
            return "h:" + hmac.new(self.hash_key, value.encode(), hashlib.sha256).hexdigest()[:32]
        return "***"

    def apply_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> str:
        """Mask only the detected parts of a longer text (NULL masks become redactions here)."""
        out, pos = [], 0
        for start, end in sorted(spans):
            if start < pos:
                continue
            out.append(text[pos:start])
            masked = self.apply(text[start:end])
            out.append("***" if masked is None else masked)
            pos = end
        out.append(text[pos:])
        return "".join(out)


# ------------------------------------------------------------------------------------------------
# rules
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskRule:
    name: str
    columns: tuple[str, ...] = ()  # schema.table.column globs: "*.customers.email", "*.*.ssn"
    detectors: tuple[str, ...] = ()
    method: MaskMethod = field(default_factory=MaskMethod)
    # Strict: a result that reads a table holding this rule's columns gets every column without
    # lineage (expressions, functions, casts) masked whole, detectors or not.
    strict: bool = False

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any], *, hash_key: bytes = b"") -> MaskRule:
        method = doc.get("method", REDACT)
        if method not in METHODS:
            raise ValueError(f"mask rule {doc.get('name')}: unknown method {method!r}")
        keep = doc.get("keep_last")
        return cls(str(doc["name"]), tuple(c.lower() for c in doc.get("columns") or ()),
                   tuple(doc.get("detectors") or ()),
                   MaskMethod(method, 4 if keep is None else int(keep), hash_key), bool(doc.get("strict")))

    def covers_column(self, qualified: str) -> bool:
        return any(fnmatchcase(qualified.lower(), pattern) for pattern in self.columns)


@dataclass
class Masking:
    """A grant's masking rules: column rules first (lineage), then content detectors."""

    rules: tuple[MaskRule, ...]
    detectors: Mapping[str, Detector] = field(default_factory=lambda: dict(BUILTIN_DETECTORS))

    @classmethod
    def from_docs(cls, docs: Iterable[Mapping[str, Any]], *, hash_key: bytes = b"",
                  custom: Mapping[str, Detector] | None = None) -> Masking:
        detectors = dict(BUILTIN_DETECTORS) | dict(custom or {})
        rules = tuple(MaskRule.from_doc(d, hash_key=hash_key) for d in docs)
        unknown = {d for r in rules for d in r.detectors} - set(detectors)
        if unknown:
            raise ValueError(f"unknown detectors: {sorted(unknown)}")
        return cls(rules, detectors)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def column_rule(self, qualified: str) -> MaskRule | None:
        """The rule that masks this source column (schema.table.column), if any."""
        for rule in self.rules:
            if rule.columns and rule.covers_column(qualified):
                return rule
        return None

    def content_rules(self) -> tuple[MaskRule, ...]:
        return tuple(r for r in self.rules if r.detectors)

    def scan(self, text: str) -> tuple[str, list[tuple[str, str]]]:
        """(masked text, [(rule, detector)…]) for a value no column rule covered."""
        hits: list[tuple[str, str]] = []
        for rule in self.content_rules():
            spans: list[tuple[int, int]] = []
            for name in rule.detectors:
                found = self.detectors[name].find(text)
                if found:
                    spans += found
                    hits.append((rule.name, name))
            if spans:
                text = rule.method.apply_spans(text, spans)
        return text, hits
