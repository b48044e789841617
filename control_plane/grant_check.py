"""What every gateway-only route does first: re-check the grant a gateway presents (signature,
expiry, revocation) and tie the request's evidence to the grant's identity."""

from __future__ import annotations

from typing import Any

from control_plane.contract import GrantClaims, GrantInvalid, GrantKeySet, verify_grant
from control_plane.errors import Forbidden
from control_plane.runtime import Services, current_audit


def recheck_grant(svc: Services, token: str, *, session_id: str | None, **audit_fields: Any) -> GrantClaims:
    try:
        claims = verify_grant(token, GrantKeySet(svc.signer.jwks()))
    except GrantInvalid as exc:
        raise Forbidden(str(exc)) from exc
    audit = current_audit()
    audit.identity = claims.identity
    audit.fields.update(grant_id=claims.grant_id, target_name=claims.target, target_kind=claims.target_kind,
                        backend_user=claims.backend_role, database_name=claims.database, session_id=session_id,
                        policy_name=claims.policy_name, policy_version=claims.policy_version, **audit_fields)
    if svc.state.is_revoked(claims.grant_id):
        raise Forbidden("grant revoked")
    return claims
