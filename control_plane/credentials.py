"""Credential issuance to gateways: the grant is re-checked, the target's secret read from
Secrets Manager, and the issuance recorded. Secrets never go anywhere but the response."""

from __future__ import annotations

import json
from typing import Any

from botocore.exceptions import ClientError

from control_plane.errors import Forbidden, NotFound
from control_plane.grant_check import recheck_grant
from control_plane.runtime import Services, current_audit


def _role_of(arn: str) -> tuple[str, str] | None:
    """(account, role name) of a role ARN or of an assumed-role session ARN."""
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn":
        return None
    account, resource = parts[4], parts[5]
    if resource.startswith("assumed-role/"):
        return account, resource.split("/")[1]
    if resource.startswith("role/"):
        return account, resource.rsplit("/", 1)[-1]
    return None


def is_gateway_caller(user_arn: str | None, principals: tuple[str, ...]) -> bool:
    """True when the IAM caller that API Gateway authenticated is one of the gateway roles."""
    caller = _role_of(user_arn) if user_arn else None
    return caller is not None and any(caller == _role_of(p) for p in principals)


def issue_credential(svc: Services, token: str, *, session_id: str | None, caller: str,
                     version_stage: str = "AWSCURRENT") -> dict[str, Any]:
    claims = recheck_grant(svc, token, session_id=session_id)
    audit = current_audit()
    target = svc.config.get_target(claims.target)
    secret_id = (target.get("role_secrets") or {}).get(claims.backend_role) or target["secret_id"]
    try:
        value = svc.secrets.get_secret_value(SecretId=secret_id, VersionStage=version_stage)
    except ClientError as exc:
        if exc.response["Error"]["Code"] == "ResourceNotFoundException":
            raise NotFound(f"no credential stored for target {target['name']}") from exc
        raise
    secret = json.loads(value["SecretString"])
    username = secret.get("username") or claims.backend_role
    if username != claims.backend_role:
        raise Forbidden(f"target {target['name']} holds no credential for role {claims.backend_role}")
    audit.details.update(secret_id=secret_id, version_id=value.get("VersionId"), version_stage=version_stage,
                         caller=caller, credential="issued")
    return {
        "username": username,
        "password": secret["password"],
        "host": target["endpoint"]["host"],
        "port": target["endpoint"]["port"],
        "database": claims.database,
        "backend_tls": target.get("backend_tls", "prefer"),
        "version_id": value.get("VersionId"),
        "cache_seconds": svc.settings.credential_cache_seconds,
        "grant_id": claims.grant_id,
        "grant_expires_at": claims.expires_at,
    }
