"""Grant verification at the gateway: offline against the control plane's published keys
(refreshed when a grant names an unknown key id), plus the revocation feed."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from control_plane.contract import GrantClaims, GrantInvalid, GrantKeySet, UnknownGrantKey, verify_grant
from data_plane.core.control_plane_client import ControlPlaneClient, ControlPlaneError

log = logging.getLogger("proctor.gateway.grants")


@dataclass(frozen=True, slots=True, weakref_slot=True)
class VerifiedGrant:
    """A grant token and its verified claims. Every session verifies the token it is given, but
    the sessions presenting the same token share one copy of it and of its claims (a pool of
    connections on one grant would otherwise keep a copy of its rules per connection)."""

    token: str
    claims: GrantClaims


class GrantAuthority:
    def __init__(self, client: ControlPlaneClient, *, key_refresh_interval: float = 30.0,
                 revocation_poll_interval: float = 5.0) -> None:
        self.client = client
        self.keys = GrantKeySet({})
        self.revoked: set[str] = set()
        self._keys_fetched_at = 0.0
        self._key_refresh_interval = key_refresh_interval
        self._poll_interval = revocation_poll_interval
        self._revocations_since = 0.0
        self._on_revoked: list[Callable[[str], None]] = []
        self._lock = asyncio.Lock()
        self.revocations_synced_at = 0.0
        self._verified: weakref.WeakValueDictionary[str, VerifiedGrant] = weakref.WeakValueDictionary()

    async def refresh_keys(self, *, force: bool = False) -> bool:
        async with self._lock:
            if not force and time.monotonic() - self._keys_fetched_at < self._key_refresh_interval:
                return False
            jwks = await asyncio.to_thread(self.client.grant_keys)
            self.keys = GrantKeySet(jwks)
            self._keys_fetched_at = time.monotonic()
            return True

    async def verify(self, token: str) -> VerifiedGrant:
        try:
            claims = verify_grant(token, self.keys)
        except UnknownGrantKey:
            # A key rotation (or a cold start): fetch the keys once, rate-limited, and retry.
            try:
                refreshed = await self.refresh_keys()
            except ControlPlaneError as exc:
                raise GrantInvalid("grant keys unavailable") from exc
            if not refreshed:
                raise
            claims = verify_grant(token, self.keys)
        if claims.grant_id in self.revoked:
            raise GrantInvalid("grant revoked")
        shared = self._verified.get(token)
        if shared is None or shared.claims != claims:
            shared = self._verified[token] = VerifiedGrant(token, claims)
        return shared

    def on_revoked(self, callback: Callable[[str], None]) -> None:
        self._on_revoked.append(callback)

    async def poll_revocations_once(self) -> list[str]:
        feed = await asyncio.to_thread(self.client.revocations, self._revocations_since)
        fresh = []
        for item in feed.get("revocations", []):
            grant_id = str(item["grant_id"])
            self._revocations_since = max(self._revocations_since, float(item["revoked_at"]))
            if grant_id not in self.revoked:
                self.revoked.add(grant_id)
                fresh.append(grant_id)
        self.revocations_synced_at = time.time()
        for grant_id in fresh:
            for callback in self._on_revoked:
                callback(grant_id)
        return fresh

    async def watch_revocations(self) -> None:
        while True:
            try:
                await self.poll_revocations_once()
            except ControlPlaneError as exc:
                log.warning("revocation feed unavailable: %s", exc)
            except Exception:
                log.exception("revocation poll failed")
            await asyncio.sleep(self._poll_interval)
