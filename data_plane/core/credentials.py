"""Backend credentials from the control plane, cached per target and role for a short TTL so a
burst of connections costs one call. Each session's use is recorded by the session itself."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from control_plane.contract import GrantClaims
from data_plane.core.control_plane_client import ControlPlaneClient


@dataclass(frozen=True)
class Credential:
    username: str
    password: str
    host: str
    port: int
    database: str | None
    backend_tls: str
    version_id: str | None

    def __repr__(self) -> str:  # never print the password, not even in a traceback
        return f"Credential(username={self.username!r}, host={self.host!r}, port={self.port}, password=***)"

    __str__ = __repr__


class CredentialBroker:
    def __init__(self, client: ControlPlaneClient, *, max_ttl: float = 60.0) -> None:
        self.client = client
        self.max_ttl = max_ttl
        self._cache: dict[tuple[str, str], tuple[Credential, float]] = {}

    def forget(self, claims: GrantClaims) -> None:
        self._cache.pop((claims.target, claims.backend_role), None)

    async def get(self, token: str, claims: GrantClaims, session_id: str, *, fresh: bool = False,
                  pending: bool = False) -> tuple[Credential, str]:
        """(credential, source) where source is `cache`, `control-plane` or `control-plane-pending`."""
        key = (claims.target, claims.backend_role)
        cached = self._cache.get(key)
        if cached and not fresh and not pending and cached[1] > time.monotonic():
            return cached[0], "cache"
        doc = await asyncio.to_thread(self.client.credential, token, session_id, pending=pending)
        credential = Credential(
            username=str(doc["username"]), password=str(doc["password"]), host=str(doc["host"]),
            port=int(doc["port"]), database=doc.get("database"), backend_tls=str(doc.get("backend_tls") or "prefer"),
            version_id=doc.get("version_id"),
        )
        ttl = min(float(doc.get("cache_seconds") or 0), self.max_ttl)
        if ttl > 0 and not pending:
            self._cache[key] = (credential, time.monotonic() + ttl)
        return credential, "control-plane-pending" if pending else "control-plane"
