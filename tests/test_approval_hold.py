"""A statement a rule sends for approval is held at the gateway: what came before it is relayed,
nothing overtakes it, the client is told where to decide, and the decision either relays it or
answers 42501 — driven here with in-memory transports and a stand-in for the control plane's
approval routes (the real routes are exercised end to end elsewhere)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from control_plane.contract import GrantClaims, Identity
from data_plane.core.control_plane_client import ControlPlaneError
from data_plane.core.session import SessionInfo
from data_plane.core.spool import Spool
from data_plane.postgres import messages as m
from data_plane.postgres.guard import REFUSED_TEXT
from data_plane.postgres.session import Relay
from data_plane.postgres.tracker import StatementTracker

RULES = ({"name": "deletes-need-approval", "action": "require_approval", "match": {"commands": ["DELETE"]},
          "description": "deletes are reviewed"},)


class Transport:
    def __init__(self) -> None:
        self.data = b""
        self.paused = False

    def write(self, data: bytes) -> None:
        self.data += bytes(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def frames(self) -> list[tuple[bytes, bytes]]:
        return list(m.iter_frames(self.data))


class Approvals:
    """The two gateway routes, as the gateway sees them."""

    def __init__(self, outcome: dict[str, Any] | None = None, fail: bool = False) -> None:
        self.outcome = outcome or {"status": "approved", "decisions": [{"approver": "ann", "decision": "approve"}]}
        self.fail = fail
        self.opened: list[dict[str, Any]] = []
        self.polls = 0

    def open_approval(self, grant_token: str, session_id: str, statement: str, rule: str | None,
                      reason: str) -> dict[str, Any]:
        if self.fail:
            raise ControlPlaneError(503, "control plane unavailable")
        self.opened.append({"statement": statement, "rule": rule, "session_id": session_id})
        return {"approval_id": "ap1", "status": "pending", "expires_at": time.time() + 60}

    def approval(self, approval_id: str) -> dict[str, Any]:
        self.polls += 1
        return {"approval_id": approval_id, "status": "pending"} if self.polls < 2 else self.outcome


def relay_with(tmp_path: Path, approvals: Approvals) -> tuple[Relay, Transport, Transport, list]:
    spool = Spool(tmp_path, fsync_interval=60)
    grant = GrantClaims(grant_id="g1", identity=Identity("iss", "ci", (), {"repository": "acme/app"}), target="t",
                        target_kind="postgres", backend_role="app_rw", database="app", policy_name="p",
                        policy_version=1, issued_at=0, expires_at=2**31, guardrails=RULES)
    info = SessionInfo("s1", "postgres", "127.0.0.1", 1, "local", grant=grant)
    evidence = spool.open_session("s1", {"protocol": "postgres", "started_at": time.time(), "region": "local"})
    info.on_template = evidence.write_template
    completed: list = []
    session = SimpleNamespace(
        info=info, evidence=evidence, session_id="s1", grant_token="grant-jwt",
        ctx=SimpleNamespace(config=SimpleNamespace(max_message_bytes=1 << 20),
                            authority=SimpleNamespace(client=approvals)))
    relay = Relay(session, StatementTracker(completed.append), SimpleNamespace(startup_frames=[]))  # type: ignore[arg-type]
    relay.client, relay.server = Transport(), Transport()  # type: ignore[assignment]
    return relay, relay.client, relay.server, completed  # type: ignore[return-value]


async def settle(relay: Relay) -> None:
    for _ in range(200):
        if relay.hold is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the hold was never resolved")


async def test_held_statement_runs_after_approval_and_nothing_overtakes_it(tmp_path: Path) -> None:
    approvals = Approvals()
    relay, client, server, _ = relay_with(tmp_path, approvals)
    relay.from_client(m.query("SELECT 1") + m.query("DELETE FROM orders WHERE id = 7") + m.query("SELECT 2"))
    assert [m.parse_query(b) for _, b in server.frames()] == ["SELECT 1"]
    assert client.paused
    relay.from_client(m.query("SELECT 3"))  # arrives while held: must wait its turn
    await asyncio.sleep(0.1)
    [(kind, notice)] = client.frames()
    assert kind == b"N" and "held for approval ap1" in m.error_fields(notice)["M"]
    await settle(relay)
    assert [m.parse_query(b) for _, b in server.frames()] == [
        "SELECT 1", "DELETE FROM orders WHERE id = 7", "SELECT 2", "SELECT 3"]
    assert not client.paused
    assert approvals.opened == [{"statement": "DELETE FROM orders WHERE id = 7", "rule": "deletes-need-approval",
                                 "session_id": "s1"}]


async def test_denied_statement_is_answered_42501_with_the_approver_and_comment(tmp_path: Path) -> None:
    approvals = Approvals({"status": "denied", "decisions": [{"approver": "ann", "decision": "deny",
                                                              "comment": "not during the freeze"}]})
    relay, client, server, completed = relay_with(tmp_path, approvals)
    # The evidence row as it is written: when the statement completes, before its answer is relayed.
    rows: list[dict] = []
    relay.tracker.on_complete = lambda st: (completed.append(st), rows.append(relay.session.info.statement_event(st)))
    relay.from_client(m.query("DELETE FROM orders WHERE id = 7"))
    await settle(relay)
    assert [m.parse_query(b) for _, b in server.frames()] == [REFUSED_TEXT]
    # The backend refuses the placeholder; the client hears the decision instead (error and
    # ReadyForQuery in one read: the rewrite comes before the statement completes).
    relay.from_server(m.error_response("42601", "syntax error at or near \"PROCTOR_BLOCKED_STATEMENT\"")
                      + m.ready_for_query())
    error = next(b for k, b in client.frames() if k == b"E")
    fields = m.error_fields(error)
    assert (fields["C"], fields["M"]) == ("42501", "denied by ann: not during the freeze")
    [statement] = completed
    assert statement.verdict.approval_id == "ap1" and statement.sqlstate == "42501"
    [row] = rows
    assert (row["activity_name"], row["sqlstate"], row["status_detail"]) == (
        "block", "42501", "denied by ann: not during the freeze")


async def test_approved_statement_is_recorded_with_its_approval(tmp_path: Path) -> None:
    relay, _, _, completed = relay_with(tmp_path, Approvals())
    relay.from_client(m.query("DELETE FROM orders WHERE id = 7"))
    await settle(relay)
    relay.from_server(m.frame(b"C", b"DELETE 1\x00") + m.ready_for_query())
    [statement] = completed
    assert statement.command_tag == "DELETE 1" and statement.verdict.approval_id == "ap1"
    event = relay.session.info.statement_event(statement)
    assert (event["activity_name"], event["approval_id"], event["rule"]) == ("query", "ap1", "deletes-need-approval")


async def test_cancel_while_held_never_reaches_the_backend(tmp_path: Path) -> None:
    approvals = Approvals({"status": "pending"})
    relay, _, server, _ = relay_with(tmp_path, approvals)
    relay.from_client(m.query("DELETE FROM orders WHERE id = 7"))
    await asyncio.sleep(0.1)
    assert relay.cancel_hold()
    assert [m.parse_query(b) for _, b in server.frames()] == [REFUSED_TEXT]
    assert not relay.cancel_hold()


async def test_control_plane_unavailable_fails_closed(tmp_path: Path) -> None:
    relay, _, server, _ = relay_with(tmp_path, Approvals(fail=True))
    relay.from_client(m.query("DELETE FROM orders WHERE id = 7"))
    await settle(relay)
    assert [m.parse_query(b) for _, b in server.frames()] == [REFUSED_TEXT]


@pytest.mark.parametrize("pipeline", [True, False])
async def test_extended_protocol_parse_is_held_with_its_bind_and_execute(tmp_path: Path, pipeline: bool) -> None:
    relay, _, server, _ = relay_with(tmp_path, Approvals())
    parse = m.frame(b"P", m.cstring("") + m.cstring("DELETE FROM orders WHERE id = $1") + b"\x00\x00")
    rest = m.bind(m.Bind("", "", (0,), (b"7",))) + m.frame(b"E", m.cstring("") + b"\x00\x00\x00\x00") + m.frame(b"S")
    if pipeline:
        relay.from_client(parse + rest)
    else:
        relay.from_client(parse)
        relay.from_client(rest)
    assert server.data == b""
    await settle(relay)
    assert [k for k, _ in server.frames()] == [b"P", b"B", b"E", b"S"]
