"""Live sessions: for revocation (by grant), cancel requests (by the keys the gateway handed
out), draining and the active-session gauge."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class LiveSession(Protocol):
    session_id: str

    def terminate(self, code: str, message: str) -> None: ...

    def cancel_hold(self) -> bool:
        """Cancel a statement the gateway holds for approval; False when none is held."""
        ...


@dataclass(frozen=True)
class CancelTarget:
    host: str
    port: int
    pid: int
    secret: int
    session: LiveSession | None = None


class SessionRegistry:
    def __init__(self) -> None:
        self.sessions: dict[str, LiveSession] = {}
        self._grants: dict[str, set[str]] = {}
        self._cancel: dict[tuple[int, int], CancelTarget] = {}
        self._listeners: list[Callable[[int], None]] = []

    def __len__(self) -> int:
        return len(self.sessions)

    def on_change(self, callback: Callable[[int], None]) -> None:
        self._listeners.append(callback)

    def add(self, session: LiveSession, grant_id: str | None) -> None:
        self.sessions[session.session_id] = session
        if grant_id:
            self._grants.setdefault(grant_id, set()).add(session.session_id)
        for callback in self._listeners:
            callback(len(self.sessions))

    def remove(self, session: LiveSession, grant_id: str | None) -> None:
        self.sessions.pop(session.session_id, None)
        if grant_id and grant_id in self._grants:
            self._grants[grant_id].discard(session.session_id)
            if not self._grants[grant_id]:
                del self._grants[grant_id]
        for callback in self._listeners:
            callback(len(self.sessions))

    def new_cancel_key(self, target: CancelTarget) -> tuple[int, int]:
        while True:
            key = (secrets.randbits(31), secrets.randbits(32) - (1 << 31))
            if key not in self._cancel:
                self._cancel[key] = target
                return key

    def drop_cancel_key(self, key: tuple[int, int]) -> None:
        self._cancel.pop(key, None)

    def cancel_target(self, pid: int, secret: int) -> CancelTarget | None:
        return self._cancel.get((pid, secret))

    def revoke(self, grant_id: str) -> int:
        ids = list(self._grants.get(grant_id, ()))
        for session_id in ids:
            session = self.sessions.get(session_id)
            if session is not None:
                session.terminate("57P01", "terminating connection: the grant was revoked")
        return len(ids)

    def terminate_all(self, code: str, message: str) -> None:
        for session in list(self.sessions.values()):
            session.terminate(code, message)
