"""Saved Athena queries for auditors, over the evidence tables of `EvidenceStore`.

`?` marks an execution parameter: the Athena console prompts for it, the API takes it from
`ExecutionParameters`. Delivery is at-least-once, so event queries keep one row per `event_id`.
Column names come from `control_plane.contract`; `time` and `rows` are reserved words, hence quoted.
"""

from __future__ import annotations

from typing import NamedTuple

GLUE_DATABASE = "proctor_evidence"
EVENTS_TABLE = f"{GLUE_DATABASE}.events"
SESSIONS_TABLE = f"{GLUE_DATABASE}.sessions"


class NamedQuery(NamedTuple):
    description: str
    sql: str


def _unique_events(where: str, columns: str) -> str:
    # Only this module's constants are interpolated here and below: no input reaches the SQL.
    return f"""WITH matching AS (
  SELECT *, row_number() OVER (PARTITION BY event_id ORDER BY "time") AS copy_no
  FROM {EVENTS_TABLE}
  WHERE {where}
)
SELECT {columns}
FROM matching
WHERE copy_no = 1
ORDER BY time_iso"""  # noqa: S608


NAMED_QUERIES: dict[str, NamedQuery] = {
    "statements-by-identity": NamedQuery(
        "Statements one identity ran between two dates. Parameters: subject, from, to (yyyy-MM-dd).",
        _unique_events(
            "class_uid = 6005 AND activity_name = 'query' AND actor_subject = ? AND dt BETWEEN ? AND ?",
            "time_iso, actor_subject, actor_kind, pipeline_repository, pipeline_run_id, target_name,\n"
            '       database_name, backend_user, session_id, grant_id, statement, command_tag, status, "rows",\n'
            "       duration_ms, src_ip, gateway_region",
        ),
    ),
    "statements-by-pipeline-run": NamedQuery(
        "Statements one CI pipeline run issued, and who triggered it. Parameters: repository, run id.",
        _unique_events(
            "class_uid = 6005 AND activity_name = 'query' AND pipeline_repository = ? AND pipeline_run_id = ?",
            "time_iso, pipeline_repository, pipeline_run_id, pipeline_actor, actor_subject, actor_pipeline,\n"
            "       target_name, database_name, backend_user, session_id, statement, command_tag, status,\n"
            '       "rows", gateway_region',
        ),
    ),
    "sessions-per-target": NamedQuery(
        "Sessions, identities, pipeline runs and statements per target. Parameters: from, to (yyyy-MM-dd).",
        f"""SELECT target_name,
       count(DISTINCT session_id) AS sessions,
       count(DISTINCT actor_subject) AS identities,
       count(DISTINCT pipeline_run_id) AS pipeline_runs,
       sum(statements) AS statements,
       min(started_at) AS first_session,
       max(ended_at) AS last_session
FROM (
  SELECT DISTINCT session_id, target_name, actor_subject, pipeline_run_id, statements, started_at, ended_at
  FROM {SESSIONS_TABLE}
  WHERE dt BETWEEN ? AND ?
)
GROUP BY target_name
ORDER BY sessions DESC""",  # noqa: S608
    ),
    "failed-logins": NamedQuery(
        "Failed authentications at gateways and the control plane. Parameters: from, to (yyyy-MM-dd).",
        _unique_events(
            "class_uid = 3002 AND status = 'Failure' AND dt BETWEEN ? AND ?",
            "time_iso, actor_subject, actor_issuer, src_ip, src_port, target_name, target_kind,\n"
            "       status_detail, api_operation, gateway_region",
        ),
    ),
    "blocked-statements": NamedQuery(
        "Statements a guardrail blocked, and the rule that did. Parameters: from, to (yyyy-MM-dd).",
        _unique_events(
            "class_uid = 6005 AND activity_name = 'block' AND dt BETWEEN ? AND ?",
            "time_iso, actor_subject, pipeline_run_id, target_name, database_name, statement, rule,\n"
            "       policy_name, policy_version, session_id, gateway_region",
        ),
    ),
    "approval-decisions": NamedQuery(
        "Approval decisions: approver, decision, comment. Parameters: from, to (yyyy-MM-dd).",
        _unique_events(
            "class_uid = 6005 AND activity_name = 'approval' AND dt BETWEEN ? AND ?",
            "time_iso, approval_id, actor_subject, status, status_detail, target_name, statement, details",
        ),
    ),
}
