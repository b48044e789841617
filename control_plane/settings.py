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
    # Approvals: the workflow, the secret that signs email links, where links point, who sends them.
    approval_state_machine_arn: str = ""
    approval_link_key_secret: str = "proctor/approval-link-key"  # noqa: S105 - a secret's name
    public_base_url: str = ""
    approval_email_sender: str = "proctor@example.com"
    # How long after its approval an access request's grant can still be fetched.
    access_grant_window_seconds: int = 3600

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
            approval_state_machine_arn=env.get("PROCTOR_APPROVAL_STATE_MACHINE_ARN", ""),
            approval_link_key_secret=env.get("PROCTOR_APPROVAL_LINK_KEY_SECRET", cls.approval_link_key_secret),
            public_base_url=env.get("PROCTOR_PUBLIC_BASE_URL", "").rstrip("/"),
            approval_email_sender=env.get("PROCTOR_APPROVAL_EMAIL_SENDER", "proctor@example.com"),
            access_grant_window_seconds=int(env.get("PROCTOR_ACCESS_GRANT_WINDOW_SECONDS", "3600")),
        )
