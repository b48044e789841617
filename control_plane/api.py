"""The public control-plane API (one Lambda behind API Gateway): targets, policies, issuers,
grants, access requests, approvals (and their email-link confirmation page), the approver
directory and the grant-verification keys. Routes only route; the domain lives in plain functions."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import parse_qs

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.openapi.params import Body, Query

from control_plane import approvals, grants, review_page
from control_plane.errors import BadRequest, Conflict, Forbidden, ProblemError
from control_plane.models import (
    ApproverGroupSpec,
    DecisionRequest,
    GrantRequest,
    IssuerSpec,
    PolicySpec,
    RevokeRequest,
    TargetSpec,
)
from control_plane.policy import is_member
from control_plane.runtime import current_audit, services
from control_plane.web import JSON, authenticate, lambda_entry, new_resolver, require_admin

app = new_resolver()


# identity ----------------------------------------------------------------------------------------
@app.get("/v1/whoami")
def whoami() -> dict[str, Any]:
    return authenticate(app).to_dict()


# grant keys (public: gateways verify grants offline with them) -----------------------------------
@app.get("/v1/grant-keys")
def grant_keys() -> Response[Any]:
    return Response(status_code=200, content_type=JSON, body=services().signer.jwks(),
                    headers={"Cache-Control": "max-age=300"})


# targets -----------------------------------------------------------------------------------------
@app.get("/v1/targets")
def list_targets() -> dict[str, Any]:
    authenticate(app)
    return {"targets": services().config.list_targets()}


@app.get("/v1/targets/<name>")
def get_target(name: str) -> dict[str, Any]:
    authenticate(app)
    return services().config.get_target(name)


@app.post("/v1/targets")
def create_target(target: Annotated[TargetSpec, Body()]) -> Response[Any]:
    require_admin(authenticate(app))
    svc = services()
    if any(t["name"] == target.name for t in svc.config.list_targets()):
        raise Conflict(f"target {target.name!r} exists")
    svc.config.put_target(target.model_dump())
    current_audit().fields.update(target_name=target.name, target_kind=target.kind)
    return Response(status_code=201, content_type=JSON, body=target.model_dump())


@app.put("/v1/targets/<name>")
def put_target(name: str, target: Annotated[TargetSpec, Body()]) -> dict[str, Any]:
    require_admin(authenticate(app))
    if target.name != name:
        raise BadRequest("target name in body and path differ")
    services().config.put_target(target.model_dump())
    current_audit().fields.update(target_name=target.name, target_kind=target.kind)
    return target.model_dump()


@app.delete("/v1/targets/<name>")
def delete_target(name: str) -> Response[Any]:
    require_admin(authenticate(app))
    services().config.delete_target(name)
    current_audit().fields.update(target_name=name)
    return Response(status_code=204, content_type=JSON, body="")


# policies (versioned) ----------------------------------------------------------------------------
@app.get("/v1/policies")
def list_policies() -> dict[str, Any]:
    require_admin(authenticate(app))
    return {"policies": services().config.list_policies()}


@app.get("/v1/policies/<name>")
def get_policy(name: str) -> dict[str, Any]:
    require_admin(authenticate(app))
    return services().config.get_policy(name)


@app.get("/v1/policies/<name>/versions")
def policy_versions(name: str) -> dict[str, Any]:
    require_admin(authenticate(app))
    return {"versions": services().config.policy_versions(name)}


@app.get("/v1/policies/<name>/versions/<version>")
def policy_version(name: str, version: str) -> dict[str, Any]:
    require_admin(authenticate(app))
    if not version.isdigit():
        raise BadRequest("version must be a number")
    return services().config.get_policy(name, int(version))


@app.post("/v1/policies")
def create_policy(policy: Annotated[PolicySpec, Body()]) -> Response[Any]:
    identity = authenticate(app)
    require_admin(identity)
    svc = services()
    if any(p["name"] == policy.name for p in svc.config.list_policies()):
        raise Conflict(f"policy {policy.name!r} exists")
    version = svc.config.put_policy(policy.model_dump(), author=identity.subject, now=svc.clock())
    current_audit().fields.update(policy_name=policy.name, policy_version=version)
    return Response(status_code=201, content_type=JSON, body=svc.config.get_policy(policy.name))


@app.put("/v1/policies/<name>")
def put_policy(name: str, policy: Annotated[PolicySpec, Body()]) -> dict[str, Any]:
    identity = authenticate(app)
    require_admin(identity)
    if policy.name != name:
        raise BadRequest("policy name in body and path differ")
    svc = services()
    version = svc.config.put_policy(policy.model_dump(), author=identity.subject, now=svc.clock())
    current_audit().fields.update(policy_name=name, policy_version=version)
    return svc.config.get_policy(name)


@app.delete("/v1/policies/<name>")
def delete_policy(name: str) -> Response[Any]:
    require_admin(authenticate(app))
    services().config.delete_policy(name)
    current_audit().fields.update(policy_name=name)
    return Response(status_code=204, content_type=JSON, body="")


# OIDC issuers ------------------------------------------------------------------------------------
@app.get("/v1/issuers")
def list_issuers() -> dict[str, Any]:
    require_admin(authenticate(app))
    return {"issuers": services().config.list_issuers()}


@app.post("/v1/issuers")
def put_issuer(issuer: Annotated[IssuerSpec, Body()]) -> dict[str, Any]:
    require_admin(authenticate(app))
    doc = issuer.model_dump(exclude_none=True)
    services().config.put_issuer(doc)
    current_audit().details["issuer"] = issuer.issuer
    return doc


# grants ------------------------------------------------------------------------------------------
@app.post("/v1/grants")
def create_grant(request: Annotated[GrantRequest, Body()]) -> Response[Any]:
    identity = authenticate(app)
    status, body = grants.request_grant(services(), identity, request)
    return Response(status_code=status, content_type=JSON, body=body)


@app.get("/v1/grants/<grant_id>")
def get_grant(grant_id: str) -> dict[str, Any]:
    identity = authenticate(app)
    svc = services()
    grant = svc.state.get_grant(grant_id)
    if grant["subject"] != identity.subject and not is_member(identity, svc.settings.admin_groups):
        raise Forbidden("not your grant")
    return grant


@app.post("/v1/grants/<grant_id>/revoke")
def revoke_grant(grant_id: str, request: Annotated[RevokeRequest, Body()]) -> dict[str, Any]:
    identity = authenticate(app)
    return grants.revoke(services(), identity, grant_id, request.reason)


@app.get("/v1/access-requests/<request_id>")
def get_access_request(request_id: str) -> dict[str, Any]:
    identity = authenticate(app)
    svc = services()
    request = svc.state.get_access_request(request_id)
    if not grants.can_view_access_request(identity, request, svc):
        raise Forbidden("not your access request")
    current_audit().fields.update(approval_id=request["approval_id"], target_name=request["target"])
    return grants.access_request_view(svc, request)


@app.post("/v1/access-requests/<request_id>/grant")
def fetch_access_grant(request_id: str) -> Response[Any]:
    identity = authenticate(app)
    grant = grants.fetch_access_grant(services(), identity, request_id)
    return Response(status_code=201, content_type=JSON, body=grant)


# approvals ---------------------------------------------------------------------------------------
@app.get("/v1/approvals")
def list_approvals(
    status: Annotated[Literal["pending", "approved", "denied", "expired"] | None, Query()] = "pending",
) -> dict[str, Any]:
    identity = authenticate(app)
    return {"approvals": approvals.list_for(services(), identity, status)}


@app.get("/v1/approvals/<approval_id>")
def get_approval(approval_id: str) -> dict[str, Any]:
    identity = authenticate(app)
    svc = services()
    approval = approvals.load(svc, approval_id)
    approvals.link_evidence(approval)
    if not approvals.can_view(svc, identity, approval):
        raise Forbidden("not an approval you asked for or may decide")
    return approval.view(svc.clock())


@app.post("/v1/approvals/<approval_id>/decision")
def decide_approval(approval_id: str, request: Annotated[DecisionRequest, Body()]) -> dict[str, Any]:
    identity = authenticate(app)
    svc = services()
    approval = approvals.load(svc, approval_id)
    approver = approvals.approver_for(svc, identity, groups=approval.approver_groups)
    decided = approvals.decide(svc, approval_id, approver, request.decision, request.comment)
    return decided.view(svc.clock())


# the email link's confirmation page (authenticated by the link's signature, not a bearer token) ---
def _html(render: Any) -> Response[str]:
    try:
        status, page = render()
    except ProblemError as exc:
        status, page = exc.status, review_page.render_refusal(exc.title, exc.detail)
    return Response(status_code=status, content_type=review_page.HTML, body=page,
                    headers=dict(review_page.SECURITY_HEADERS))


def _link_query() -> dict[str, str | None]:
    event = app.current_event
    return {name: event.get_query_string_value(name) for name in ("approver", "exp", "sig")}


@app.get("/v1/approvals/<approval_id>/review")
def review(approval_id: str) -> Response[str]:
    return _html(lambda: review_page.show(services(), approval_id, _link_query()))


def _form() -> dict[str, str]:
    try:
        fields = parse_qs(app.current_event.decoded_body or "", max_num_fields=10, strict_parsing=False)
    except ValueError:
        raise BadRequest("the form has too many fields") from None
    return {name: values[-1] for name, values in fields.items()}


@app.post("/v1/approvals/<approval_id>/review")
def review_decision(approval_id: str) -> Response[str]:
    return _html(lambda: review_page.submit(services(), approval_id, _link_query(), _form()))


# approver directory ------------------------------------------------------------------------------
@app.get("/v1/approver-groups")
def list_approver_groups() -> dict[str, Any]:
    require_admin(authenticate(app))
    return {"approver_groups": services().config.list_approver_groups()}


@app.get("/v1/approver-groups/<group>")
def get_approver_group(group: str) -> dict[str, Any]:
    require_admin(authenticate(app))
    return services().config.get_approver_group(group) or {"group": group, "members": []}


@app.put("/v1/approver-groups/<group>")
def put_approver_group(group: str, spec: Annotated[ApproverGroupSpec, Body()]) -> dict[str, Any]:
    identity = authenticate(app)
    require_admin(identity)
    svc = services()
    emails = [m.email.lower() for m in spec.members]
    if len(set(emails)) != len(emails):
        raise BadRequest("a member is listed twice")
    doc = {"group": group, "members": [m.model_dump(exclude_none=True) for m in spec.members],
           "updated_by": identity.subject, "updated_at": int(svc.clock())}
    svc.config.put_approver_group(doc)
    current_audit().details.update(approver_group=group, members=emails)
    return doc


lambda_handler = lambda_entry(app)
