"""`proctor evidence reprocess <session-id> --policy <file>`: what newer masking rules would have
masked in an old session. The recording holds the masked stream; the originals of what was masked
then are sealed under the break-glass key. They are opened in memory only (the caller needs
`kms:Decrypt` on that key: the break-glass role), replayed through the gateway's own masker with
the lineage the gateway recorded, and only counts come out: rule, column or detector, method, how
many values, per statement — never a value, clear or masked, and nothing is written to disk."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_plane.core.masking import Masking
from data_plane.core.recording import EVENT, FROM_CLIENT, FROM_SERVER, META, WIRE, WIRE_REDACTED, Record
from data_plane.core.sealed import unmasked_records
from data_plane.postgres import messages as m
from data_plane.postgres.catalog import snapshot_from_lineage
from data_plane.postgres.masker import LineageUnknown, ResultMasker, ResultPlan


class ReprocessError(Exception):
    pass


@dataclass
class Finding:
    statement: str
    rule: str
    target: str
    method: str
    path: str
    values: int


@dataclass
class Report:
    session_id: str
    results: int = 0
    findings: list[Finding] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # results whose columns the recording cannot tell

    @property
    def values(self) -> int:
        return sum(f.values for f in self.findings)


def load_rules(path: Path) -> list[dict[str, Any]]:
    """Masking rules from a policy document (`{"masking": [...]}`, as POSTed to /v1/policies) or
    a bare list of rules; validated as the control plane validates them."""
    from pydantic import ValidationError

    from control_plane.models import MaskRule

    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReprocessError(f"cannot read {path}: {exc}") from None
    rules = doc.get("masking") if isinstance(doc, Mapping) else doc
    if not isinstance(rules, list) or not rules:
        raise ReprocessError(f"{path} holds no masking rules (a policy with `masking`, or a list of rules)")
    try:
        return [MaskRule.model_validate(rule).model_dump() for rule in rules]
    except ValidationError as exc:
        raise ReprocessError(f"invalid masking rules in {path}: {exc}") from None


def reprocess(session_id: str, records: Iterable[Record], rules: list[dict[str, Any]], kms: Any) -> Report:
    originals = unmasked_records(records, kms, session_id)
    lineage = [entry for r in originals if r.direction == META and r.kind == EVENT
               and b'"lineage"' in r.payload for entry in json.loads(r.payload)["lineage"]]
    report = Report(session_id)

    def collect(plan: ResultPlan) -> None:
        for (rule, target, method, path), count in plan.counts.items():
            report.findings.append(Finding(plan.statement, rule, target, method, path, count))

    # The hash key only changes hashed values, which are never shown: counts do not depend on it.
    masking = Masking.from_docs(rules, hash_key=secrets.token_bytes(32))
    masker = ResultMasker(masking, collect)
    masker.snapshot = snapshot_from_lineage(lineage)
    if not lineage:
        report.unknown.append("no lineage in this recording (the session had no masking rules): column rules "
                              "cannot apply, only detectors and strict rules")
    started = False
    for record in originals:
        if record.kind not in (WIRE, WIRE_REDACTED):
            continue
        if record.direction == FROM_CLIENT:
            started = True
            for msg_type, body in m.iter_frames(record.payload):
                if msg_type != b"p":
                    masker.client_message(msg_type[0], body)
        elif record.direction == FROM_SERVER and started:
            _server_record(masker, record.payload, report)
    return report


def _server_record(masker: ResultMasker, payload: bytes, report: Report) -> None:
    for msg_type, body in m.iter_frames(payload):
        kind = msg_type[0]
        if kind == 0x44:  # DataRow
            try:
                plan = masker.current or masker.execute_plan()
            except LineageUnknown as exc:
                report.unknown.append(str(exc))
                continue
            if plan is not None and plan.masks:
                masker.mask_row(plan, body)
        elif kind == 0x64:  # CopyData
            masker.mask_copy_row(body)
        else:
            if kind == 0x54:
                report.results += 1
            masker.server_message(kind, body)


def format_report(report: Report) -> str:
    lines = [f"session {report.session_id}: {report.results} result(s) replayed with the new rules; "
             f"{report.values} value(s) would be masked"]
    grouped: dict[tuple[str, str, str, str, str], int] = {}
    for f in report.findings:
        key = (f.statement, f.rule, f.target, f.method, f.path)
        grouped[key] = grouped.get(key, 0) + f.values
    if grouped:
        header = ("rule", "column / detector", "method", "path", "values", "statement")
        rows = [(rule, target, method, path, str(count), " ".join(statement.split())[:100])
                for (statement, rule, target, method, path), count in grouped.items()]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for reason in dict.fromkeys(report.unknown):
        lines.append(f"note: {reason}")
    return "\n".join(lines)
