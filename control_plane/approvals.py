"""Approvals: a statement a gateway holds, or a just-in-time access request, waits for people.

One approval lives in the state table under `pk=APPROVAL#<id>`: `META` (what is asked, by whom,
under which rules), one `DECISION#<approver>` per approver, `FINAL` (the first decisive outcome,
written once), `TOKEN` (the workflow's task token, kept by the notifier, never shown) and the
workflow's own `WORKFLOW#requested` / `WORKFLOW#outcome` records. Status, in this order: the
workflow's recorded outcome; else FINAL; else expired once the clock passes `expires_at`; else
pending. A final decision resumes the Step Functions execution (SendTaskSuccess, or
SendTaskFailure with `approval_workflow.DENIED_ERROR`); if the notifier has not stored the task
token yet, it resumes the execution itself when it does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aws_lambda_powertools import Logger
from botocore.exceptions import ClientError

from control_plane.approval_workflow import DENIED_ERROR, WORKFLOW_OUTCOME_SK, execution_input
from control_plane.contract import (
    CLASS_AUTHENTICATION,
    CLASS_DATASTORE_ACTIVITY,
    STATUS_FAILURE,
    STATUS_SUCCESS,
    Identity,
    evidence_event,
)
from control_plane.errors import Conflict, Forbidden, NotFound, ServiceUnavailable
from control_plane.grant_check import recheck_grant
from control_plane.ids import new_id
from control_plane.policy import is_member
from control_plane.runtime import Services, current_audit
from control_plane.settings import Settings

logger = Logger(child=True)

PENDING, APPROVED, DENIED, EXPIRED = "pending", "approved", "denied", "expired"
STATUSES = (PENDING, APPROVED, DENIED, EXPIRED)
KIND_STATEMENT, KIND_ACCESS = "statement", "access"
APPROVE, DENY = "approve", "deny"
VIA_API, VIA_EMAIL_LINK = "api", "email-link"
# Identities of email-link approvers are vouched for by the link, not by an OIDC issuer.
LINK_ISSUER = "proctor:email-link"
# State-table items outlive the approval this long; the evidence keeps everything for good.
RETENTION_SECONDS = 30 * 86400
# Errors SendTask* answers for a task that is no longer waiting (resumed already, or timed out).
_CLOSED_TASK_ERRORS = frozenset({"InvalidToken", "TaskTimedOut", "TaskDoesNotExist"})


@dataclass(frozen=True)
class ApprovalRules:
    approver_groups: tuple[str, ...]
    approvals_required: int
    timeout_seconds: int
    allow_self_approval: bool

    @classmethod
    def of_policy(cls, policy: Mapping[str, Any], settings: Settings) -> ApprovalRules:
        """The policy version's `approval` rule; a policy without one falls back to the deployment's
        approver groups, one approval, an hour, no self-approval."""
        rule = policy.get("approval") or {}
        return cls(
            approver_groups=tuple(rule.get("approver_groups") or settings.approver_groups),
            approvals_required=int(rule.get("approvals_required") or 1),
            timeout_seconds=int(rule.get("timeout_seconds") or 3600),
            allow_self_approval=bool(rule.get("allow_self_approval", False)),
        )


@dataclass(frozen=True)
class Approver:
    """Who decides: a person with an OIDC token, or the addressee of an email link (whose issuer
    is None: the approver directory names people by email and, optionally, IdP subject)."""

    subject: str
    email: str | None
    groups: tuple[str, ...]
    issuer: str | None
    via: str

    @property
    def key(self) -> str:
        """One person, one decision: by email where known (the API and the link then agree)."""
        return self.email.lower() if self.email else f"{self.issuer}|{self.subject}"

    @property
    def name(self) -> str:
        return self.email or self.subject

    def identity(self) -> Identity:
        return Identity(issuer=self.issuer or LINK_ISSUER, subject=self.subject, groups=self.groups,
                        email=self.email)


def is_self_approval(approver: Approver, requester: Identity) -> bool:
    """Same issuer and subject; or the same email; or, for a pipeline, the person who triggered it
    (its `actor` claim) equal to the approver's subject, email or email local part. The last is a
    heuristic across naming schemes (a CI login vs. an IdP email) that errs towards refusing."""
    if approver.subject == requester.subject and approver.issuer in (None, requester.issuer):
        return True
    emails = {e.lower() for e in (approver.email, approver.subject) if e and "@" in e}
    requester_emails = {e.lower() for e in (requester.email, requester.subject) if e and "@" in e}
    if emails & requester_emails:
        return True
    actor = (requester.pipeline.get("actor") or "").lower()
    if actor:
        names = {approver.subject.lower(), *emails, *(e.split("@", 1)[0] for e in emails)}
        if actor in names:
            return True
    return False


def _epoch(value: Any) -> int | None:
    """Epoch seconds of a number or of Step Functions' ISO 8601 timestamps."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return int(value)
    return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp())


@dataclass
class Approval:
    doc: dict[str, Any]
    decisions: list[dict[str, Any]]
    final: dict[str, Any] | None
    outcome: dict[str, Any] | None

    @classmethod
    def from_items(cls, items: Mapping[str, dict[str, Any]]) -> Approval:
        decisions = sorted((doc for sk, doc in items.items() if sk.startswith("DECISION#")),
                           key=lambda d: (d["at"], d["approver"]))
        return cls(doc=items["META"], decisions=decisions, final=items.get("FINAL"),
                   outcome=items.get(WORKFLOW_OUTCOME_SK))

    @property
    def id(self) -> str:
        return str(self.doc["approval_id"])

    @property
    def kind(self) -> str:
        return str(self.doc["kind"])

    @property
    def requester(self) -> Identity:
        return Identity.from_dict(self.doc["requester"])

    @property
    def approver_groups(self) -> tuple[str, ...]:
        return tuple(self.doc["approver_groups"])

    @property
    def retain_until(self) -> int:
        return int(self.doc["expires_at"]) + RETENTION_SECONDS

    def status(self, now: float) -> str:
        if self.outcome:
            return str(self.outcome["status"])
        if self.final:
            return str(self.final["status"])
        return EXPIRED if now >= self.doc["expires_at"] else PENDING

    def decided_by(self, approver_key: str) -> bool:
        return any(d["approver_key"] == approver_key for d in self.decisions)

    def tally(self) -> str | None:
        """The outcome the decisions so far reach: one deny denies; N distinct approvals approve."""
        if any(d["decision"] == DENY for d in self.decisions):
            return DENIED
        if len({d["approver_key"] for d in self.decisions if d["decision"] == APPROVE}) >= int(
                self.doc["approvals_required"]):
            return APPROVED
        return None

    def closing(self, now: float) -> tuple[int | None, str | None, str]:
        """(decided_at, decided_by, comment) of an approval that is no longer pending."""
        status = self.status(now)
        if status == PENDING:
            return None, None, ""
        if self.final and self.final["status"] == status:
            return _epoch(self.final["at"]), self.final.get("decided_by"), self.final.get("comment") or ""
        if status == EXPIRED:
            at = _epoch(self.outcome["at"]) if self.outcome else int(self.doc["expires_at"])
            return at, None, "approval expired"
        error = (self.outcome or {}).get("error") or {}
        return _epoch((self.outcome or {}).get("at")), None, f"approval workflow failed: {error.get('Error')}"

    def public_decisions(self) -> list[dict[str, Any]]:
        return [{"approver": d["approver"], "decision": d["decision"], "comment": d.get("comment") or "",
                 "at": d["at"], "via": d["via"]} for d in self.decisions]

    def gateway_view(self, now: float) -> dict[str, Any]:
        decided_at, decided_by, comment = self.closing(now)
        return {
            "approval_id": self.id,
            "status": self.status(now),
            "decisions": self.public_decisions(),
            "decided_at": decided_at,
            "decided_by": decided_by,
            "comment": comment,
            "expires_at": self.doc["expires_at"],
        }

    def view(self, now: float) -> dict[str, Any]:
        keep = ("kind", "requester", "target", "target_kind", "database", "backend_role", "policy", "statement",
                "rule", "reason", "session_id", "grant_id", "access_request_id", "approver_groups",
                "approvals_required", "allow_self_approval", "timeout_seconds", "created_at", "execution_arn")
        return self.gateway_view(now) | {k: self.doc.get(k) for k in keep}


# -- the approval lifecycle ----------------------------------------------------------------------


def load(svc: Services, approval_id: str) -> Approval:
    return Approval.from_items(svc.state.approval_items(approval_id))


def create(svc: Services, *, kind: str, requester: Identity, rules: ApprovalRules, target: Mapping[str, Any],
           policy: Mapping[str, Any], reason: str, statement: str | None = None, rule: str | None = None,
           session_id: str | None = None, grant_id: str | None = None, backend_role: str | None = None,
           access_request_id: str | None = None) -> Approval:
    """Record a pending approval and start its workflow execution (named by the approval id)."""
    if not svc.settings.approval_state_machine_arn:
        raise ServiceUnavailable("the approval workflow is not configured (PROCTOR_APPROVAL_STATE_MACHINE_ARN)")
    now = int(svc.clock())
    doc: dict[str, Any] = {
        "approval_id": new_id("ap"),
        "kind": kind,
        "requester": requester.to_dict(),
        "target": target["name"],
        "target_kind": target.get("kind"),
        "database": target.get("database"),
        "backend_role": backend_role,
        "policy": {"name": policy["name"], "version": int(policy["version"])},
        "statement": statement,
        "rule": rule,
        "reason": reason,
        "session_id": session_id,
        "grant_id": grant_id,
        "access_request_id": access_request_id,
        "approver_groups": list(rules.approver_groups),
        "approvals_required": rules.approvals_required,
        "allow_self_approval": rules.allow_self_approval,
        "timeout_seconds": rules.timeout_seconds,
        "created_at": now,
        "expires_at": now + rules.timeout_seconds,
        "execution_arn": None,
    }
    approval = Approval(doc=doc, decisions=[], final=None, outcome=None)
    svc.state.put_approval(doc, expires_at=approval.retain_until)
    audit = current_audit()
    audit.fields.update(approval_id=approval.id)
    try:
        execution = svc.sfn.start_execution(
            stateMachineArn=svc.settings.approval_state_machine_arn, name=approval.id,
            input=json.dumps(execution_input(approval_id=approval.id, kind=kind,
                                             timeout_seconds=rules.timeout_seconds,
                                             retain_until=approval.retain_until)))
    except ClientError as exc:
        # Fail closed: an approval whose workflow never started is denied, and says why.
        logger.exception("approval workflow did not start", extra={"approval_id": approval.id})
        final = {"status": DENIED, "decided_by": None, "comment": "approval workflow could not start", "at": now}
        svc.state.put_final(approval.id, final, expires_at=approval.retain_until, overwrite=True)
        audit.add(approval_event(svc, approval, "requested", identity=requester, status=STATUS_FAILURE,
                                 details={"error": exc.response["Error"]["Code"]}))
        raise ServiceUnavailable("the approval workflow could not be started") from exc
    doc["execution_arn"] = execution["executionArn"]
    svc.state.put_approval(doc, expires_at=approval.retain_until, create=False)
    audit.add(approval_event(svc, approval, "requested", identity=requester, details={
        "approver_groups": doc["approver_groups"], "approvals_required": doc["approvals_required"],
        "allow_self_approval": doc["allow_self_approval"], "timeout_seconds": doc["timeout_seconds"],
        "expires_at": doc["expires_at"], "reason": reason, "execution_arn": doc["execution_arn"]}))
    return approval


def request_for_statement(svc: Services, grant_token: str, *, session_id: str | None, statement: str, rule: str,
                          reason: str) -> Approval:
    """A gateway holds a statement: the grant is re-checked and the approval rules come from the
    policy version the grant names. The approval never outlives the grant."""
    claims = recheck_grant(svc, grant_token, session_id=session_id, rule=rule)
    target = svc.config.get_target(claims.target)
    policy = svc.config.get_policy(claims.policy_name, claims.policy_version)
    rules = ApprovalRules.of_policy(policy, svc.settings)
    remaining = claims.expires_at - int(svc.clock())
    if remaining < rules.timeout_seconds:
        rules = ApprovalRules(rules.approver_groups, rules.approvals_required, max(remaining, 1),
                              rules.allow_self_approval)
    return create(svc, kind=KIND_STATEMENT, requester=claims.identity, rules=rules, target=target, policy=policy,
                  reason=reason, statement=statement, rule=rule, session_id=session_id, grant_id=claims.grant_id,
                  backend_role=claims.backend_role)


def review_hint(approval: Approval) -> str:
    """Where to decide, for the people waiting (a gateway shows it to its client)."""
    doc = approval.doc
    return (f"needs {doc['approvals_required']} approval(s) from {', '.join(doc['approver_groups'])}: "
            f"approvers were emailed a link, or run `proctor approvals approve {approval.id}`")


def ensure_may_decide(approval: Approval, approver: Approver) -> None:
    if not set(approver.groups) & set(approval.approver_groups):
        raise Forbidden(f"{approver.name} is not in an approver group of this approval "
                        f"({', '.join(approval.approver_groups)})")
    if not approval.doc.get("allow_self_approval") and is_self_approval(approver, approval.requester):
        raise Forbidden("self-approval is not allowed by the policy")


def decide(svc: Services, approval_id: str, approver: Approver, decision: str, comment: str) -> Approval:
    """Record one approver's decision; the decision that settles the approval resumes the workflow."""
    if decision not in (APPROVE, DENY):
        raise ValueError(f"unknown decision {decision!r}")
    approval = load(svc, approval_id)
    audit = current_audit()
    link_evidence(approval)
    now = svc.clock()
    ensure_may_decide(approval, approver)
    status = approval.status(now)
    if status != PENDING:
        raise Conflict(f"approval {approval_id} is {status}; decisions are closed")
    if approval.decided_by(approver.key):
        raise Conflict(f"{approver.name} has already decided on approval {approval_id}")
    record = {"approver": approver.name, "approver_key": approver.key, "subject": approver.subject,
              "issuer": approver.issuer, "email": approver.email, "decision": decision, "comment": comment,
              "at": int(now), "via": approver.via}
    try:
        svc.state.put_decision(approval_id, approver.key, record, expires_at=approval.retain_until)
    except Conflict:
        raise Conflict(f"{approver.name} has already decided on approval {approval_id}") from None
    audit.add(approval_event(svc, approval, "decision", identity=approver.identity(),
                             status=STATUS_SUCCESS, details={"decision": decision, "comment": comment,
                                                             "via": approver.via, "decided_at": int(now)}))
    approval = load(svc, approval_id)
    outcome = approval.tally()
    if outcome is not None:
        finalize(svc, approval, outcome, decided_by=approver.name, comment=comment)
        approval = load(svc, approval_id)
    audit.details.update(decision=decision, status=approval.status(svc.clock()))
    return approval


def finalize(svc: Services, approval: Approval, status: str, *, decided_by: str | None, comment: str) -> bool:
    """Write the approval's one outcome (the first writer wins) and resume the workflow."""
    final = {"status": status, "decided_by": decided_by, "comment": comment, "at": int(svc.clock())}
    try:
        svc.state.put_final(approval.id, final, expires_at=approval.retain_until)
    except Conflict:
        return False  # decided concurrently: that writer resumes the workflow
    resumed = resume(svc, approval.id, final, approvers=[d["approver"] for d in approval.decisions
                                                          if d["decision"] == APPROVE])
    current_audit().details["workflow_resumed"] = resumed
    return True


def resume(svc: Services, approval_id: str, final: Mapping[str, Any], *, approvers: Iterable[str] = ()) -> bool:
    """Hand the outcome to the waiting execution. False when there is nothing to resume yet (no
    token: the notifier resumes on arrival) or any more (resumed already, or timed out)."""
    token = svc.state.task_token(approval_id)
    if token is None:
        return False
    try:
        if final["status"] == APPROVED:
            svc.sfn.send_task_success(taskToken=token, output=json.dumps(
                {"decision": APPROVED, "approval_id": approval_id, "approvers": list(approvers)}))
        else:
            svc.sfn.send_task_failure(taskToken=token, error=DENIED_ERROR, cause=json.dumps(
                {"decided_by": final.get("decided_by"), "comment": (final.get("comment") or "")[:2000]}))
    except ClientError as exc:
        if exc.response["Error"]["Code"] in _CLOSED_TASK_ERRORS:
            logger.info("workflow task already closed", extra={"approval_id": approval_id,
                                                                "error": exc.response["Error"]["Code"]})
            return False
        raise
    return True


# -- who sees and decides what -------------------------------------------------------------------


def approver_for(svc: Services, identity: Identity, *, groups: Iterable[str] = ()) -> Approver:
    """An OIDC caller as an approver; a token without an email borrows the directory's address for
    its subject, so a decision through the API and one through the email link are one person's."""
    email = identity.email
    if not email:
        for group in groups:
            member = _directory_member(svc, group, subject=identity.subject)
            if member:
                email = member["email"]
                break
    return Approver(subject=identity.subject, email=email, groups=identity.groups, issuer=identity.issuer,
                    via=VIA_API)


def link_approver(svc: Services, approval: Approval, email: str) -> Approver:
    """The addressee of an email link, who must still be in the directory of an approver group."""
    groups = tuple(g for g in approval.approver_groups if _directory_member(svc, g, email=email))
    if not groups:
        raise Forbidden(f"{email} is no longer listed in an approver group of this approval")
    member = _directory_member(svc, groups[0], email=email) or {}
    return Approver(subject=member.get("subject") or email, email=email, groups=groups, issuer=None,
                    via=VIA_EMAIL_LINK)


def _directory_member(svc: Services, group: str, *, email: str | None = None,
                      subject: str | None = None) -> dict[str, Any] | None:
    doc = svc.config.get_approver_group(group) or {}
    for member in doc.get("members") or ():
        if email and member["email"].lower() == email.lower():
            return member
        if subject and member.get("subject") == subject:
            return member
    return None


def directory_recipients(svc: Services, approval: Approval) -> list[Approver]:
    """Everyone the approval should be emailed to: directory members of its approver groups, less
    those who may not decide it (the requester, unless self-approval is allowed)."""
    recipients: dict[str, Approver] = {}
    for group in approval.approver_groups:
        for member in (svc.config.get_approver_group(group) or {}).get("members") or ():
            email = member["email"]
            known = recipients.get(email.lower())
            groups = (*known.groups, group) if known else (group,)
            recipients[email.lower()] = Approver(subject=member.get("subject") or email, email=email,
                                                 groups=groups, issuer=None, via=VIA_EMAIL_LINK)
    allow_self = approval.doc.get("allow_self_approval")
    return [a for a in recipients.values() if allow_self or not is_self_approval(a, approval.requester)]


def is_requester(identity: Identity, approval: Approval) -> bool:
    requester = approval.requester
    return identity.issuer == requester.issuer and identity.subject == requester.subject


def can_view(svc: Services, identity: Identity, approval: Approval) -> bool:
    return (is_requester(identity, approval) or is_member(identity, approval.approver_groups)
            or is_member(identity, svc.settings.admin_groups))


def awaits(approval: Approval, approver: Approver) -> bool:
    """May this approver still decide this (pending) approval?"""
    try:
        ensure_may_decide(approval, approver)
    except Forbidden:
        return False
    return not approval.decided_by(approver.key)


def list_for(svc: Services, identity: Identity, status: str | None) -> list[dict[str, Any]]:
    """Recent approvals (created in the last `APPROVAL_INDEX_DAYS`) in `status`: for pending ones,
    those the caller may still decide; otherwise those the caller asked for or could decide.
    Admins see all of them."""
    now = svc.clock()
    admin = is_member(identity, svc.settings.admin_groups)
    approver = approver_for(svc, identity, groups=identity.groups)
    found = []
    for approval_id in svc.state.recent_approval_ids(now):
        try:
            approval = load(svc, approval_id)
        except NotFound:
            continue  # expired from the table
        current = approval.status(now)
        if status and current != status:
            continue
        may_decide = current == PENDING and awaits(approval, approver)
        if current == PENDING and status == PENDING:
            visible = admin or may_decide
        else:
            visible = admin or is_requester(identity, approval) or is_member(identity, approval.approver_groups)
        if visible:
            found.append(approval.view(now) | {"awaiting_you": may_decide})
    return found


# -- evidence ------------------------------------------------------------------------------------


def link_evidence(approval: Approval) -> None:
    """Tie the current request's API Activity row to the approval (and its session and grant)."""
    audit = current_audit()
    audit.fields.update(approval_id=approval.id)
    for field_name, key in (("session_id", "session_id"), ("grant_id", "grant_id"), ("target_name", "target"),
                            ("rule", "rule")):
        if approval.doc.get(key):
            audit.fields[field_name] = approval.doc[key]


def approval_event(svc: Services, approval: Approval, step: str, *, identity: Identity | None,
                   status: str = STATUS_SUCCESS, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One `approval` evidence row: a statement approval as Datastore Activity (6005), an access
    request as Authentication (3002). `status_detail` names the step (requested, notified,
    decision, approved, denied, expired); the requester always rides along in `details`."""
    doc = approval.doc
    event_class = CLASS_DATASTORE_ACTIVITY if approval.kind == KIND_STATEMENT else CLASS_AUTHENTICATION
    requester = approval.requester
    return evidence_event(
        event_class, "approval", status=status, identity=identity, now=svc.clock(), region=svc.settings.region,
        approval_id=approval.id, session_id=doc.get("session_id"), grant_id=doc.get("grant_id"),
        target_name=doc.get("target"), target_kind=doc.get("target_kind"), database_name=doc.get("database"),
        backend_user=doc.get("backend_role"), policy_name=doc["policy"]["name"],
        policy_version=doc["policy"]["version"], statement=doc.get("statement"), rule=doc.get("rule"),
        status_detail=step,
        details={"kind": approval.kind, "access_request_id": doc.get("access_request_id"),
                 "execution_arn": doc.get("execution_arn"),
                 "requester": {"issuer": requester.issuer, "subject": requester.subject,
                               "email": requester.email, "pipeline": dict(requester.pipeline)},
                 **(details or {})},
    )
