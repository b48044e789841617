"""What every protocol's session shares: who is connected to what, and the evidence rows that
say so. Protocol modules speak this small vocabulary; none of them builds evidence by hand."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from control_plane.contract import (
    CLASS_DATASTORE_ACTIVITY,
    CLASS_SSH_ACTIVITY,
    STATUS_FAILURE,
    STATUS_SUCCESS,
    EventTemplate,
    GrantClaims,
)
from data_plane.core.guardrails import BLOCK, REQUIRE_APPROVAL, Verdict

_CLASSES = {"postgres": CLASS_DATASTORE_ACTIVITY, "mysql": CLASS_DATASTORE_ACTIVITY, "ssh": CLASS_SSH_ACTIVITY}


def new_session_id() -> str:
    return "s" + time.strftime("%Y%m%d%H%M%S", time.gmtime()) + secrets.token_hex(6)


@dataclass(slots=True)
class Statement:
    """One statement (or command) as evidence: what was asked, what came back."""

    text: str
    started: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    parameters: list[str | None] | None = None
    command_tag: str | None = None
    rows: int = 0
    bytes: int = 0
    sqlstate: str | None = None
    error: str | None = None
    finished_mono: float | None = None
    skipped: bool = False  # not run: an earlier error in the same pipeline aborted it
    kind: str = "query"
    verdict: Verdict | None = None  # what the guardrails said, when a rule matched

    @property
    def duration_ms(self) -> float | None:
        if self.finished_mono is None:
            return None
        return round((self.finished_mono - self.started_mono) * 1000, 3)


@dataclass(slots=True)
class SessionInfo:
    session_id: str
    protocol: str
    client_ip: str
    client_port: int
    region: str
    started_at: float = field(default_factory=time.time)
    grant: GrantClaims | None = None
    database: str | None = None
    backend_user: str | None = None
    statements: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    record_parameters: bool = True
    events: int = 0
    on_template: Callable[[int, dict[str, Any]], None] | None = field(default=None, repr=False)
    # The template itself is written beside the events and not kept: rows only name its version.
    _template_for: GrantClaims | None = field(default=None, repr=False)
    _template_version: int = field(default=0, repr=False)

    def event(self, activity: str, *, status: str = STATUS_SUCCESS, details: dict[str, Any] | None = None,
              now: float | None = None, **fields: Any) -> dict[str, Any]:
        """A compact evidence row (what varies); the spool keeps the session's template beside it."""
        if self._template_version == 0 or self._template_for is not self.grant:
            self._write_template()
        self.events += 1
        row = EventTemplate.compact(activity, status=status, details=details, now=now, seq=self.events, **fields)
        row["tv"] = self._template_version
        return row

    def _write_template(self) -> None:
        """The fields every event of this session repeats (written once the grant is known)."""
        grant = self.grant
        base: dict[str, Any] = {
            "session_id": self.session_id,
            "src_ip": self.client_ip,
            "src_port": self.client_port,
            "database_name": self.database,
            "backend_user": self.backend_user,
        }
        if grant is not None:
            base.update(grant_id=grant.grant_id, target_name=grant.target, target_kind=grant.target_kind,
                        policy_name=grant.policy_name, policy_version=grant.policy_version)
        template = EventTemplate(_CLASSES.get(self.protocol, CLASS_DATASTORE_ACTIVITY),
                                 identity=grant.identity if grant else None, region=self.region, **base)
        self._template_for = grant
        self._template_version += 1
        if self.on_template is not None:
            self.on_template(self._template_version, template.to_doc())

    @property
    def template_version(self) -> int:
        """The template rows name now (written first if the grant changed since)."""
        if self._template_version == 0 or self._template_for is not self.grant:
            self._write_template()
        return self._template_version

    def statement_event(self, statement: Statement) -> dict[str, Any]:
        """The compact row of a statement, built directly (the busiest event by far): the same row
        `event` would build, with the fields that are None left to the template's None."""
        if self._template_version == 0 or self._template_for is not self.grant:
            self._write_template()
        self.events += 1
        verdict = statement.verdict
        error = statement.error
        stopped = verdict is not None and verdict.action in (BLOCK, REQUIRE_APPROVAL)
        failed = statement.sqlstate is not None or statement.skipped or error is not None
        row: dict[str, Any] = {
            "activity_name": "block" if stopped else "query", "status": STATUS_FAILURE if failed else STATUS_SUCCESS,
            "time": int(statement.started * 1000), "statement": statement.text, "command_tag": statement.command_tag,
            "rows": statement.rows, "bytes": statement.bytes, "duration_ms": statement.duration_ms,
            "seq": self.events, "tv": self._template_version,
        }
        if failed:
            if statement.sqlstate is not None:
                row["sqlstate"] = statement.sqlstate
            if error is not None:
                row["status_detail"] = error
        details: dict[str, Any] | None = None if statement.kind == "query" else {"kind": statement.kind}
        if statement.parameters is not None:
            details = details or {}
            details["parameters"] = statement.parameters
        if failed:
            if statement.skipped:
                details = details or {}
                details["skipped"] = "not executed: an earlier statement in the pipeline failed"
            if error:
                details = details or {}
                details["error"] = error
        if verdict is not None:  # postgres.tracker.verdict_fields writes these for the C data path: keep in step
            row["rule"] = verdict.rule
            row["approval_id"] = verdict.approval_id
            if verdict.matched:
                details = details or {}
                details["guardrail"] = {"action": verdict.action, "rules": list(verdict.matched)}
        if details:
            row["details"] = details
        return row

    def summary(self, ended_at: float) -> dict[str, Any]:
        grant = self.grant
        identity = grant.identity if grant else None
        return {
            "session_id": self.session_id,
            "protocol": self.protocol,
            "started_at": self.started_at,
            "ended_at": ended_at,
            "actor_subject": identity.subject if identity else None,
            "actor_kind": identity.kind if identity else None,
            "pipeline_repository": identity.pipeline.get("repository") if identity else None,
            "pipeline_run_id": identity.pipeline.get("run_id") if identity else None,
            "pipeline_actor": identity.pipeline.get("actor") if identity else None,
            "target_name": grant.target if grant else None,
            "database_name": self.database,
            "backend_user": self.backend_user,
            "grant_id": grant.grant_id if grant else None,
            "src_ip": self.client_ip,
            "statements": self.statements,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "gateway_region": self.region,
        }
