"""The approval notifier: a Lambda fed by the workflow's SQS queue (locally, a worker that calls
this same handler with the same SQS event shape).

`approval.requested` carries the execution's task token: it is stored server-side under the
approval id, then each approver in the directory gets an email (SES) with a personal, signed,
expiring link to the confirmation page — the link never carries the token. If the approval was
already decided through the API before the token arrived, the execution is resumed here instead.
`approval.closed` records the workflow's outcome (approved, denied, expired) in the evidence.
Each message is one batch item: a failure retries that message only.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from control_plane import approvals
from control_plane.approval_links import ReviewLink
from control_plane.approval_workflow import MESSAGE_CLOSED, MESSAGE_REQUESTED
from control_plane.contract import STATUS_FAILURE, STATUS_SUCCESS
from control_plane.runtime import Services, audited_request, current_audit, services

logger = Logger(service="proctor-approval-notifier")
processor = BatchProcessor(event_type=EventType.SQS)
STATEMENT_PREVIEW = 2000


def handle_message(svc: Services, message: dict[str, Any]) -> None:
    """One queue message, with its evidence written before it counts as done."""
    with audited_request({}, svc) as audit:
        if message.get("type") == MESSAGE_REQUESTED:
            on_requested(svc, message)
        elif message.get("type") == MESSAGE_CLOSED:
            on_closed(svc, message)
        else:
            logger.warning("unknown message type", extra={"type": message.get("type")})
        audit.evidence.flush()


def on_requested(svc: Services, message: dict[str, Any]) -> None:
    approval_id = message["approval_id"]
    approval = approvals.load(svc, approval_id)
    svc.state.put_task_token(approval_id, {"task_token": message["task_token"], "stored_at": int(svc.clock())},
                             expires_at=approval.retain_until)
    approval = approvals.load(svc, approval_id)
    if approval.final:
        # Decided through the API before the token was here: resume now.
        resumed = approvals.resume(svc, approval_id, approval.final,
                                   approvers=[d["approver"] for d in approval.decisions
                                              if d["decision"] == approvals.APPROVE])
        logger.info("approval decided before its token arrived", extra={"approval_id": approval_id,
                                                                         "resumed": resumed})
        return
    if approval.status(svc.clock()) != approvals.PENDING:
        return
    recipients = approvals.directory_recipients(svc, approval)
    sent, failed = [], []
    for approver in recipients:
        link = ReviewLink.issue(svc.link_key(), approval_id, approver.email or approver.subject,
                                approval.doc["expires_at"])
        try:
            send_email(svc, approval, approver, link.url(svc.settings.public_base_url))
            sent.append(approver.email)
        except Exception:
            logger.exception("approval email not sent", extra={"approval_id": approval_id})
            failed.append(approver.email)
    current_audit().add(approvals.approval_event(
        svc, approval, "notified", identity=None, status=STATUS_SUCCESS if sent or not failed else STATUS_FAILURE,
        details={"recipients": sent, "failed": failed, "execution_arn": message.get("execution_arn"),
                 "directory_groups": list(approval.approver_groups)}))
    if failed and not sent:
        raise RuntimeError(f"no approval email could be sent for {approval_id}")


def on_closed(svc: Services, message: dict[str, Any]) -> None:
    approval = approvals.load(svc, message["approval_id"])
    now = svc.clock()
    decided_at, decided_by, comment = approval.closing(now)
    status = message.get("status") or approval.status(now)
    current_audit().add(approvals.approval_event(
        svc, approval, status, identity=None,
        status=STATUS_SUCCESS if status == approvals.APPROVED else STATUS_FAILURE,
        details={"execution_arn": message.get("execution_arn"), "decided_at": decided_at, "decided_by": decided_by,
                 "comment": comment, "decisions": approval.public_decisions()}))


def send_email(svc: Services, approval: approvals.Approval, approver: approvals.Approver, url: str) -> None:
    doc = approval.doc
    requester = approval.requester
    who = (f"pipeline {requester.pipeline.get('repository')} run {requester.pipeline.get('run_id')} "
           f"(triggered by {requester.pipeline.get('actor') or 'unknown'})" if requester.pipeline
           else requester.email or requester.subject)
    what = "run a statement on" if approval.kind == approvals.KIND_STATEMENT else "get access to"
    statement = (doc.get("statement") or "")[:STATEMENT_PREVIEW]
    facts = [
        f"{who} asks to {what} {doc['target']}.",
        f"Policy: {doc['policy']['name']} v{doc['policy']['version']}"
        + (f", rule {doc['rule']}" if doc.get("rule") else ""),
        f"Reason: {doc.get('reason') or '-'}",
        *([f"Statement: {statement}"] if statement else []),
    ]
    invite = f"Review and decide (a link for {approver.email}, valid until the approval expires):"
    cli = f"Or, with your identity token: proctor approvals approve {approval.id}"
    text = "\n\n".join([*facts, f"{invite}\n{url}", cli])
    html_body = ("".join(f"<p>{escape(line)}</p>" for line in facts)
                 + f'<p>{escape(invite)}<br><a href="{escape(url)}">{escape(url)}</a></p><p>{escape(cli)}</p>')
    svc.ses.send_email(
        Source=svc.settings.approval_email_sender,
        Destination={"ToAddresses": [approver.email]},
        Message={"Subject": {"Data": f"Approval needed: {doc['target']} ({approval.id})", "Charset": "UTF-8"},
                 "Body": {"Text": {"Data": text, "Charset": "UTF-8"},
                          "Html": {"Data": html_body, "Charset": "UTF-8"}}},
    )


def record_handler(record: SQSRecord) -> None:
    handle_message(services(), json.loads(record.body))


@logger.inject_lambda_context(clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process_partial_response(event=event, record_handler=record_handler, processor=processor,
                                    context=context)
