"""Grant issuance: policy decides, KMS signs, the state table remembers (for revocation)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from control_plane.contract import (
    CLASS_AUTHENTICATION,
    STATUS_SUCCESS,
    GrantClaims,
    Identity,
    evidence_event,
)
from control_plane.errors import Forbidden
from control_plane.models import GrantRequest
from control_plane.policy import is_member, select_policy
from control_plane.runtime import Services, current_audit

_ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"


def new_id(prefix: str, length: int = 16) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


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
    """Record a pending request. The approval workflow that decides it is started elsewhere."""
    now = int(svc.clock())
    approval = policy.get("approval") or {}
    access_request = {
        "id": new_id("ar"),
        "status": "pending",
        "identity": identity.to_dict(),
        "target": target["name"],
        "policy": {"name": policy["name"], "version": policy["version"]},
        "reason": request.reason,
        "duration_seconds": request.duration_seconds,
        "approvals_required": approval.get("approvals_required", 1),
        "approver_groups": approval.get("approver_groups", []),
        "created_at": now,
        "expires_at": now + int(approval.get("timeout_seconds", 3600)),
    }
    svc.state.put_access_request(access_request, expires_at=access_request["expires_at"] + 7 * 86400)
    audit = current_audit()
    audit.fields.update(target_name=target["name"], policy_name=policy["name"],
                        policy_version=policy["version"], approval_id=access_request["id"])
    return {"access_request": access_request}


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
