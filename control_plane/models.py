"""Request and response shapes of the control-plane API (pydantic, validated by Powertools)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from control_plane.oidc import ASYMMETRIC_ALGORITHMS

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Endpoint(Strict):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)


class TargetSpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["postgres", "mysql", "ssh", "kubernetes"]
    region: str = Field(min_length=1, max_length=32)
    endpoint: Endpoint
    gateway: Endpoint
    secret_id: str = Field(min_length=1, max_length=512)
    role_secrets: dict[str, str] = Field(default_factory=dict)
    database: str | None = None
    backend_user: str | None = None
    backend_tls: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    description: str = ""


class SubjectMatcher(Strict):
    """Matches an identity. Every given field must match; globs (`*`) allowed in values."""

    issuer: str | None = None
    subjects: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    claims: dict[str, str | list[str]] = Field(default_factory=dict)


class ApprovalRule(Strict):
    approver_groups: list[str] = Field(min_length=1)
    approvals_required: int = Field(default=1, ge=1, le=10)
    timeout_seconds: int = Field(default=3600, ge=30, le=7 * 86400)
    allow_self_approval: bool = False


GUARDRAIL_MATCH_KEYS = frozenset({"classes", "commands", "tables", "functions", "no_where", "denied_functions",
                                  "copy_program", "copy_file", "multi_statement", "regex", "unparsable"})
STATEMENT_CLASSES = frozenset({"read", "write", "ddl", "dcl", "transaction", "copy", "utility", "procedural"})


class GuardrailRule(Strict):
    """Matches what a statement does; every condition given must hold (lists: any element)."""

    name: str = Field(pattern=NAME_PATTERN)
    action: Literal["allow", "block", "require_approval", "log"]
    match: dict[str, Any] = Field(default_factory=dict)
    description: str = ""

    @field_validator("match")
    @classmethod
    def _known_conditions(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - GUARDRAIL_MATCH_KEYS)
        if unknown:
            raise ValueError(f"unknown match conditions {unknown}; known: {sorted(GUARDRAIL_MATCH_KEYS)}")
        bad = sorted(set(value.get("classes") or ()) - STATEMENT_CLASSES)
        if bad:
            raise ValueError(f"unknown statement classes {bad}")
        if "regex" in value:
            re.compile(value["regex"])
        return value


class MaskRule(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    columns: list[str] = Field(default_factory=list)
    detectors: list[str] = Field(default_factory=list)
    method: Literal["redact", "partial", "hash", "null"] = "redact"
    keep_last: int | None = Field(default=None, ge=0, le=16)
    # Results reading a table with these columns get every column without lineage masked too.
    strict: bool = False


class PolicySpec(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    subjects: list[SubjectMatcher] = Field(min_length=1)
    targets: list[str] = Field(min_length=1)
    backend_role: str | None = None
    access: Literal["read", "read_write"] = "read"
    max_session_seconds: int = Field(default=3600, ge=60, le=12 * 3600)
    guardrails: list[GuardrailRule] = Field(default_factory=list)
    masking: list[MaskRule] = Field(default_factory=list)
    approval: ApprovalRule | None = None
    require_access_approval: bool = False


class PolicyDocument(PolicySpec):
    model_config = ConfigDict(extra="allow")
    version: int


class IssuerSpec(Strict):
    issuer: str = Field(min_length=1, max_length=512)
    audiences: list[str] = Field(min_length=1)
    jwks_uri: str = Field(min_length=1)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"], min_length=1)
    subject_claim: str = "sub"
    groups_claim: str = "groups"
    email_claim: str = "email"
    pipeline_claims: dict[str, str] | None = None

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, value: list[str]) -> list[str]:
        bad = sorted(set(value) - ASYMMETRIC_ALGORITHMS)
        if bad:
            raise ValueError(f"algorithms not allowed (asymmetric only): {bad}")
        return value

    @field_validator("jwks_uri", "issuer")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://", value):
            raise ValueError("must be an http(s) URL")
        return value


class GrantRequest(Strict):
    target: str = Field(min_length=1, max_length=64)
    reason: str = Field(default="", max_length=1000)
    duration_seconds: int | None = Field(default=None, ge=60, le=12 * 3600)


class RevokeRequest(Strict):
    reason: str = Field(default="", max_length=1000)


class CredentialRequest(Strict):
    grant: str = Field(min_length=10, max_length=16384)
    session_id: str | None = Field(default=None, max_length=64)


class ApprovalRequest(Strict):
    """A gateway holds a statement and asks for an approval (`POST /v1/gateway/approvals`)."""

    grant: str = Field(min_length=10, max_length=16384)
    session_id: str | None = Field(default=None, max_length=64)
    statement: str = Field(min_length=1, max_length=65536)
    rule: str = Field(min_length=1, max_length=128)
    reason: str = Field(default="", max_length=1000)


class DecisionRequest(Strict):
    decision: Literal["approve", "deny"]
    comment: str = Field(default="", max_length=2000)


EMAIL_PATTERN = r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]+$"


class ApproverMember(Strict):
    email: str = Field(pattern=EMAIL_PATTERN, max_length=254)
    subject: str | None = Field(default=None, min_length=1, max_length=512)


class ApproverGroupSpec(Strict):
    """Who receives an approver group's emails (IdP groups carry no addresses)."""

    members: list[ApproverMember] = Field(default_factory=list, max_length=200)
