"""Routes only gateways may call (IAM-authenticated in AWS; SigV4-checked by the local adapter):
credential issuance, the revocation feed, and statement approvals."""

from __future__ import annotations

from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.openapi.params import Body, Query

from control_plane import approvals
from control_plane.credentials import is_gateway_caller, issue_credential
from control_plane.errors import Forbidden
from control_plane.models import ApprovalRequest, CredentialRequest
from control_plane.runtime import current_audit, services
from control_plane.web import JSON, lambda_entry, new_resolver

app = new_resolver()


def gateway_caller() -> str:
    """The calling gateway's IAM principal, or 403 for anyone else (a person's token included)."""
    user_arn = app.current_event.request_context.identity.user_arn
    if not is_gateway_caller(user_arn, services().settings.gateway_principals):
        current_audit().details["caller"] = user_arn or "anonymous"
        raise Forbidden("this route is for gateways only")
    current_audit().details["caller"] = user_arn
    return str(user_arn)


@app.post("/v1/credentials")
def credentials(request: Annotated[CredentialRequest, Body()]) -> dict[str, Any]:
    caller = gateway_caller()
    return issue_credential(services(), request.grant, session_id=request.session_id, caller=caller)


@app.post("/v1/credentials/pending")
def pending_credentials(request: Annotated[CredentialRequest, Body()]) -> dict[str, Any]:
    """During a rotation the new password may be live before it becomes AWSCURRENT."""
    caller = gateway_caller()
    return issue_credential(services(), request.grant, session_id=request.session_id, caller=caller,
                            version_stage="AWSPENDING")


@app.get("/v1/gateway/revocations")
def revocations(since: Annotated[float, Query(ge=0)] = 0) -> dict[str, Any]:
    gateway_caller()
    svc = services()
    return {"revocations": svc.state.revocations_since(since), "now": svc.clock()}


@app.post("/v1/gateway/approvals")
def request_approval(request: Annotated[ApprovalRequest, Body()]) -> Response[Any]:
    """A held statement: 201 `{approval_id, status: "pending", expires_at, review_hint}`."""
    gateway_caller()
    svc = services()
    approval = approvals.request_for_statement(svc, request.grant, session_id=request.session_id,
                                               statement=request.statement, rule=request.rule, reason=request.reason)
    body = {"approval_id": approval.id, "status": approval.status(svc.clock()),
            "expires_at": approval.doc["expires_at"], "review_hint": approvals.review_hint(approval)}
    return Response(status_code=201, content_type=JSON, body=body)


@app.get("/v1/gateway/approvals/<approval_id>")
def approval_status(approval_id: str) -> dict[str, Any]:
    """What the gateway polls (with backoff) until the status is no longer pending."""
    gateway_caller()
    svc = services()
    approval = approvals.load(svc, approval_id)
    approvals.link_evidence(approval)
    return approval.gateway_view(svc.clock())


lambda_handler = lambda_entry(app)
