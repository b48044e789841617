"""What a handler needs, built once per Lambda container from the environment (or handed in by
tests and the local stack), and the per-request audit trail."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import boto3

from control_plane.contract import (
    CLASS_API_ACTIVITY,
    STATUS_FAILURE,
    STATUS_SUCCESS,
    Identity,
    evidence_event,
)
from control_plane.evidence import EvidenceLog
from control_plane.oidc import OidcVerifier
from control_plane.settings import Settings
from control_plane.signing import GrantSigner
from control_plane.store import ConfigStore, StateStore, Table


class LinkKey:
    """The HMAC key of approval email links, read from Secrets Manager and kept for a few minutes
    (a rotated key reaches every container within that time)."""

    def __init__(self, secrets: Any, secret_id: str, *, ttl: float = 300.0) -> None:
        self._secrets = secrets
        self._secret_id = secret_id
        self._ttl = ttl
        self._value: bytes | None = None
        self._read_at = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            if self._value is None or time.monotonic() - self._read_at > self._ttl:
                secret = self._secrets.get_secret_value(SecretId=self._secret_id)["SecretString"]
                if len(secret) < 32:
                    raise ValueError("the approval link key must be at least 32 characters")
                self._value, self._read_at = secret.encode(), time.monotonic()
            return self._value


@dataclass
class Services:
    settings: Settings
    config: ConfigStore
    state: StateStore
    signer: GrantSigner
    oidc: OidcVerifier
    secrets: Any
    s3: Any
    sfn: Any = None
    ses: Any = None
    link_key: Callable[[], bytes] | None = None
    clock: Callable[[], float] = field(default=time.time)

    @classmethod
    def from_settings(cls, settings: Settings, *, session: boto3.Session | None = None) -> Services:
        session = session or boto3.Session(region_name=settings.region)
        dynamodb = session.client("dynamodb")
        config = ConfigStore(Table(dynamodb, settings.config_table))
        secrets = session.client("secretsmanager")
        return cls(
            settings=settings,
            config=config,
            state=StateStore(Table(dynamodb, settings.state_table)),
            signer=GrantSigner(session.client("kms"), settings.grant_key_id),
            oidc=OidcVerifier(config.get_issuer),
            secrets=secrets,
            s3=session.client("s3"),
            sfn=session.client("stepfunctions"),
            ses=session.client("ses"),
            link_key=LinkKey(secrets, settings.approval_link_key_secret),
        )


_services: Services | None = None


def services() -> Services:
    global _services
    if _services is None:
        _services = Services.from_settings(Settings.from_env())
    return _services


def use_services(svc: Services | None) -> None:
    """Hand in the services (tests, local stack); None resets to building from the environment."""
    global _services
    _services = svc


@dataclass
class RequestAudit:
    """Evidence gathered while one API request is served; written when the answer is known."""

    evidence: EvidenceLog
    identity: Identity | None = None
    details: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    def add(self, row: dict[str, Any]) -> None:
        self.evidence.add(row)


_current: ContextVar[RequestAudit | None] = ContextVar("proctor_request_audit", default=None)


def current_audit() -> RequestAudit:
    audit = _current.get()
    if audit is None:
        raise RuntimeError("no request is being served")
    return audit


_ACTIVITY_BY_METHOD = {"GET": "read", "HEAD": "read", "POST": "create", "PUT": "update",
                       "PATCH": "update", "DELETE": "delete"}


@contextmanager
def audited_request(event: dict[str, Any], svc: Services) -> Iterator[RequestAudit]:
    """Every API call becomes an API Activity event (who, what, result), written with whatever
    domain events the route added. A request whose evidence cannot be written fails."""
    audit = RequestAudit(EvidenceLog(svc.s3, svc.settings.evidence_bucket, svc.settings.region))
    token = _current.set(audit)
    try:
        yield audit
    finally:
        _current.reset(token)


def api_event(event: dict[str, Any], audit: RequestAudit, status_code: int, svc: Services) -> dict[str, Any]:
    method = event.get("httpMethod", "GET")
    identity_ctx = (event.get("requestContext") or {}).get("identity") or {}
    return evidence_event(
        CLASS_API_ACTIVITY,
        _ACTIVITY_BY_METHOD.get(method, "other"),
        status=STATUS_SUCCESS if status_code < 400 else STATUS_FAILURE,
        identity=audit.identity,
        now=svc.clock(),
        region=svc.settings.region,
        api_operation=f"{method} {event.get('path', '')}",
        http_status=status_code,
        src_ip=identity_ctx.get("sourceIp"),
        details=audit.details or None,
        **audit.fields,
    )
