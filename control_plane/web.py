"""What both API functions share: the resolver with problem responses, bearer authentication,
and the handler wrapper that writes every call's evidence."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from control_plane.contract import STATUS_FAILURE, Identity
from control_plane.errors import AuthenticationFailed, Forbidden, ProblemError
from control_plane.grants import authentication_event
from control_plane.oidc import TokenRejected
from control_plane.policy import is_member
from control_plane.runtime import api_event, audited_request, current_audit, services

logger = Logger(service="proctor-control-plane")
tracer = Tracer(service="proctor-control-plane")
metrics = Metrics(namespace="Proctor", service="proctor-control-plane")


def problem(status: int, title: str, detail: str) -> Response:
    return Response(status_code=status, content_type="application/problem+json",
                    body=json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}))


def new_resolver() -> APIGatewayRestResolver:
    app = APIGatewayRestResolver(enable_validation=True)

    @app.exception_handler(ProblemError)
    def _problem(exc: ProblemError) -> Response:
        return problem(exc.status, exc.title, exc.detail)

    return app


def authenticate(app: APIGatewayRestResolver) -> Identity:
    """The caller's identity from `Authorization: Bearer <OIDC token>`; refusals are evidence."""
    svc = services()
    audit = current_audit()
    header = app.current_event.headers.get("Authorization") or app.current_event.headers.get("authorization")
    if not header or not header.startswith("Bearer "):
        audit.add(authentication_event(svc, None, status=STATUS_FAILURE, reason="missing bearer token"))
        raise AuthenticationFailed("missing bearer token")
    try:
        identity = svc.oidc.verify(header[len("Bearer "):].strip())
    except TokenRejected as exc:
        audit.add(authentication_event(svc, None, status=STATUS_FAILURE, reason=exc.reason,
                                       issuer=exc.issuer, subject=exc.subject))
        logger.info("token rejected", extra={"reason": exc.reason, "issuer": exc.issuer})
        raise
    audit.identity = identity
    audit.add(authentication_event(svc, identity))
    return identity


def require_admin(identity: Identity) -> None:
    if not is_member(identity, services().settings.admin_groups):
        raise Forbidden("admin group membership required")


def lambda_entry(app: APIGatewayRestResolver) -> Callable[[dict[str, Any], LambdaContext], dict[str, Any]]:
    @logger.inject_lambda_context(clear_state=True)
    @tracer.capture_lambda_handler(capture_response=False)  # responses may carry grants or secrets
    @metrics.log_metrics
    def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
        svc = services()
        with audited_request(event, svc) as audit:
            response = app.resolve(event, context)
            status = int(response.get("statusCode", 500))
            audit.add(api_event(event, audit, status, svc))
            try:
                audit.evidence.flush()
            except Exception:
                # Fail closed: nothing (a grant, a credential) leaves unrecorded.
                return _error_response(500, "Internal Server Error", "evidence could not be recorded")
        metrics.add_metric(name="ApiRequests", unit=MetricUnit.Count, value=1)
        if status >= 400:
            metrics.add_metric(name="ApiErrors", unit=MetricUnit.Count, value=1)
        return response

    return handler


def _error_response(status: int, title: str, detail: str) -> dict[str, Any]:
    return {"statusCode": status, "headers": {"Content-Type": "application/problem+json"},
            "body": json.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail}),
            "isBase64Encoded": False}


JSON = content_types.APPLICATION_JSON
