"""Control-plane settings, read once from the environment the Lambda (or local adapter) sets."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (value or "").split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    config_table: str
    state_table: str
    evidence_bucket: str
    grant_key_id: str
    region: str
    admin_groups: tuple[str, ...]
    approver_groups: tuple[str, ...]
    gateway_principals: tuple[str, ...]
    max_grant_seconds: int = 12 * 3600
    credential_cache_seconds: int = 60

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        return cls(
            config_table=env.get("PROCTOR_CONFIG_TABLE", "proctor-config"),
            state_table=env.get("PROCTOR_STATE_TABLE", "proctor-state"),
            evidence_bucket=env.get("PROCTOR_EVIDENCE_BUCKET", "proctor-evidence"),
            grant_key_id=env.get("PROCTOR_GRANT_KEY_ID", "alias/proctor-grant-signing"),
            region=env.get("PROCTOR_REGION") or env.get("AWS_REGION") or "us-east-1",
            admin_groups=_csv(env.get("PROCTOR_ADMIN_GROUPS", "admins")),
            approver_groups=_csv(env.get("PROCTOR_APPROVER_GROUPS", "approvers")),
            gateway_principals=_csv(env.get("PROCTOR_GATEWAY_PRINCIPALS")),
            max_grant_seconds=int(env.get("PROCTOR_MAX_GRANT_SECONDS", str(12 * 3600))),
            credential_cache_seconds=int(env.get("PROCTOR_CREDENTIAL_CACHE_SECONDS", "60")),
        )
