"""Grant issuance: policy decides, KMS signs, the state table remembers (for revocation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from control_plane import approvals
from control_plane.contract import (
    CLASS_AUTHENTICATION,
    STATUS_SUCCESS,
    GrantClaims,
    Identity,
    evidence_event,
)
from control_plane.errors import Conflict, Forbidden, NotFound
from control_plane.ids import new_id
from control_plane.models import GrantRequest
from control_plane.policy import is_member, select_policy
from control_plane.runtime import Services, current_audit


def connection_details(target: Mapping[str, Any], grant_id: str) -> dict[str, Any]:
    return {
        "host": target["gateway"]["host"],
        "port": target["gateway"]["port"],
        "database": target.get("database"),
        "user": grant_id,
        "sslmode": "require",
    }


def request_grant(svc: Services, identity: Identity, request: GrantRequest) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body): 201 with a grant, or 202 with an access request awaiting approval."""
    target = svc.config.get_target(request.target)
    policy = select_policy(svc.config.list_policies(), identity, target["name"])
    if policy is None:
        raise Forbidden(f"no policy grants {identity.subject} access to {target['name']}")
    if policy.get("require_access_approval"):
        return 202, open_access_request(svc, identity, target, policy, request)
    return 201, issue_grant(svc, identity, target, policy, request)


def issue_grant(svc: Services, identity: Identity, target: Mapping[str, Any], policy: Mapping[str, Any],
                request: GrantRequest, *, approvals: tuple[str, ...] = ()) -> dict[str, Any]:
    now = int(svc.clock())
    lifetime = min(request.duration_seconds or policy["max_session_seconds"], policy["max_session_seconds"],
                   svc.settings.max_grant_seconds)
    claims = GrantClaims(
        grant_id=new_id("g"),
        identity=identity,
        target=target["name"],
        target_kind=target["kind"],
        backend_role=policy.get("backend_role") or target.get("backend_user") or "",
        database=target.get("database"),
        policy_name=policy["name"],
        policy_version=int(policy["version"]),
        issued_at=now,
        expires_at=now + lifetime,
        reason=request.reason,
        guardrails=tuple(policy.get("guardrails") or ()),
        masking=tuple(policy.get("masking") or ()),
        approvals=approvals,
    )
    if not claims.backend_role:
        raise Forbidden(f"policy {policy['name']} names no backend role for {target['name']}")
    token = svc.signer.sign(claims.to_jwt_claims())
    svc.state.record_grant(
        {"grant_id": claims.grant_id, "subject": identity.subject, "identity": identity.to_dict(),
         "target": claims.target, "policy": claims.policy_name, "policy_version": claims.policy_version,
         "issued_at": now, "expires_at": claims.expires_at, "reason": request.reason},
        expires_at=claims.expires_at,
    )
    audit = current_audit()
    audit.fields.update(grant_id=claims.grant_id, target_name=claims.target, target_kind=claims.target_kind,
                        policy_name=claims.policy_name, policy_version=claims.policy_version,
                        backend_user=claims.backend_role, database_name=claims.database)
    audit.details["reason"] = request.reason
    audit.details["expires_at"] = claims.expires_at
    return {
        "grant_id": claims.grant_id,
        "token": token,
        "expires_at": claims.expires_at,
        "target": claims.target,
        "kind": claims.target_kind,
        "backend_role": claims.backend_role,
        "policy": {"name": claims.policy_name, "version": claims.policy_version},
        "connection": connection_details(target, claims.grant_id),
    }


def open_access_request(svc: Services, identity: Identity, target: Mapping[str, Any],
                        policy: Mapping[str, Any], request: GrantRequest) -> dict[str, Any]:
    """Record the request and start its approval workflow (an approval of kind "access")."""
    request_id = new_id("ar")
    rules = approvals.ApprovalRules.of_policy(policy, svc.settings)
    approval = approvals.create(
        svc, kind=approvals.KIND_ACCESS, requester=identity, rules=rules, target=target, policy=policy,
        reason=request.reason,
        backend_role=policy.get("backend_role") or target.get("backend_user"), access_request_id=request_id)
    access_request = {
        "id": request_id,
        "approval_id": approval.id,
        "identity": identity.to_dict(),
        "target": target["name"],
        "policy": {"name": policy["name"], "version": policy["version"]},
        "reason": request.reason,
        "duration_seconds": request.duration_seconds,
        "approvals_required": approval.doc["approvals_required"],
        "approver_groups": approval.doc["approver_groups"],
        "created_at": approval.doc["created_at"],
        "expires_at": approval.doc["expires_at"],
    }
    svc.state.put_access_request(access_request, expires_at=approval.retain_until)
    audit = current_audit()
    audit.fields.update(target_name=target["name"], policy_name=policy["name"],
                        policy_version=policy["version"], approval_id=approval.id)
    audit.details["access_request_id"] = request_id
    return {"access_request": access_request_view(svc, access_request, approval)}


def access_request_view(svc: Services, request: Mapping[str, Any],
                        approval: approvals.Approval | None = None) -> dict[str, Any]:
    """The request with its approval's status and decisions (and the grant id once fetched)."""
    approval = approval or approvals.load(svc, request["approval_id"])
    view = approval.gateway_view(svc.clock())
    granted = svc.state.access_grant(request["id"])
    return dict(request) | {k: view[k] for k in ("status", "decisions", "decided_at", "decided_by", "comment")} | {
        "grant_id": (granted or {}).get("grant_id"), "granted_at": (granted or {}).get("granted_at"),
        "review_hint": approvals.review_hint(approval)}


def same_requester(identity: Identity, requester: Mapping[str, Any]) -> bool:
    """Issuer and subject; for a pipeline also its repository and run (a branch's subject is shared
    by all of its runs)."""
    if identity.issuer != requester["issuer"] or identity.subject != requester["subject"]:
        return False
    asked = requester.get("pipeline") or {}
    return all(identity.pipeline.get(k) == asked.get(k) for k in ("repository", "run_id") if asked.get(k))


def fetch_access_grant(svc: Services, identity: Identity, request_id: str) -> dict[str, Any]:
    """The grant of an approved access request: for its requester, once, within the window after
    the approval, under the policy version that was approved (if that policy still exists)."""
    request = svc.state.get_access_request(request_id)
    if not same_requester(identity, request["identity"]):
        raise Forbidden("only the requester may fetch the grant of an access request")
    approval = approvals.load(svc, request["approval_id"])
    approvals.link_evidence(approval)
    current_audit().details["access_request_id"] = request_id
    now = svc.clock()
    status = approval.status(now)
    if status != approvals.APPROVED:
        raise Conflict(f"access request {request_id} is {status}")
    decided_at = approval.closing(now)[0] or int(now)
    if now > decided_at + svc.settings.access_grant_window_seconds:
        raise Conflict(f"the grant of access request {request_id} was not fetched within "
                       f"{svc.settings.access_grant_window_seconds} s of its approval")
    name, version = request["policy"]["name"], int(request["policy"]["version"])
    try:
        svc.config.get_policy(name)
    except NotFound:
        raise Forbidden(f"policy {name} was withdrawn after the request") from None
    policy = svc.config.get_policy(name, version)
    target = svc.config.get_target(request["target"])
    marker = {"claimed_at": int(now), "subject": identity.subject}
    try:
        svc.state.claim_access_grant(request_id, marker, expires_at=approval.retain_until)
    except Conflict:
        raise Conflict(f"the grant of access request {request_id} was already issued") from None
    try:
        grant = issue_grant(svc, identity, target, policy,
                            GrantRequest(target=target["name"], reason=request.get("reason") or "",
                                         duration_seconds=request.get("duration_seconds")),
                            approvals=(approval.id,))
    except Exception:
        svc.state.release_access_grant(request_id)
        raise
    svc.state.record_access_grant(request_id, marker | {"grant_id": grant["grant_id"], "granted_at": int(now)},
                                  expires_at=approval.retain_until)
    current_audit().fields.update(approval_id=approval.id)
    return grant


def can_view_access_request(identity: Identity, request: Mapping[str, Any], svc: Services) -> bool:
    return (
        request["identity"]["subject"] == identity.subject
        and request["identity"]["issuer"] == identity.issuer
    ) or is_member(identity, tuple(request.get("approver_groups") or ()) + svc.settings.admin_groups)


def revoke(svc: Services, identity: Identity, grant_id: str, reason: str) -> dict[str, Any]:
    grant = svc.state.get_grant(grant_id)
    own = grant["subject"] == identity.subject and grant["identity"]["issuer"] == identity.issuer
    if not own and not is_member(identity, svc.settings.admin_groups):
        raise Forbidden("only an admin or the grant's holder may revoke it")
    updated = svc.state.revoke_grant(grant_id, by=identity.subject, reason=reason, now=svc.clock())
    current_audit().fields.update(grant_id=grant_id, target_name=grant["target"])
    return {"grant_id": grant_id, "revoked_at": updated["revoked_at"], "revoked_by": updated["revoked_by"]}


def authentication_event(svc: Services, identity: Identity | None, *, status: str = STATUS_SUCCESS,
                         reason: str | None = None, issuer: str | None = None,
                         subject: str | None = None) -> dict[str, Any]:
    unverified = {} if identity else {"actor_issuer": issuer, "actor_subject": subject}
    return evidence_event(
        CLASS_AUTHENTICATION, "logon", status=status, identity=identity, now=svc.clock(),
        region=svc.settings.region, status_detail=reason, details={"mechanism": "oidc"}, **unverified,
    )
