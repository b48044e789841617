"""Per-statement approval end to end: a pipeline's DELETE is held at the gateway, an approver
decides through the API or the emailed link, and the statement runs (or is refused) — with the
rest of the gateway serving other sessions meanwhile."""

from __future__ import annotations

import re
import threading
import time
import urllib.parse
import urllib.request

import psycopg
import pytest

from proctor.api_client import ApiClient
from proctor.dev.mailbox import read_mailbox
from tests.stack import Stack

pytestmark = pytest.mark.integration

APPROVER = "ann.approver@example.com"


def order_exists(stack: Stack, conninfo: dict, order_id: int) -> bool:
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM orders WHERE id = %s", (order_id,)).fetchone()[0] == 1


def new_order(conn: psycopg.Connection) -> int:
    return conn.execute("INSERT INTO orders (customer_id, amount, status) VALUES (4, 5, 'doomed') RETURNING id"
                        ).fetchone()[0]


class HeldStatement:
    """Runs a statement in a thread and captures the approval id from the gateway's notice."""

    def __init__(self, conninfo: dict, sql: str, params: tuple = ()) -> None:
        self.approval_id: str | None = None
        self.error: Exception | None = None
        self.result: str | None = None
        self.noticed = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(conninfo, sql, params), daemon=True)
        self.thread.start()

    def _run(self, conninfo: dict, sql: str, params: tuple) -> None:
        try:
            with psycopg.connect(**conninfo, autocommit=True) as conn:
                conn.add_notice_handler(self._notice)
                cursor = conn.execute(sql, params)
                self.result = cursor.statusmessage
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    def _notice(self, diagnostic: psycopg.errors.Diagnostic) -> None:
        found = re.search(r"held for approval (\S+)", diagnostic.message_primary or "")
        if found:
            self.approval_id = found.group(1)
            self.noticed.set()

    def wait_for_hold(self) -> str:
        assert self.noticed.wait(30), "no approval notice"
        assert not self.done.is_set()
        return self.approval_id  # type: ignore[return-value]

    def wait(self) -> None:
        assert self.done.wait(60), "the held statement never finished"


def decide(stack: Stack, approval_id: str, decision: str, comment: str = "") -> tuple[int, dict]:
    token = stack.issuer.mint(APPROVER, groups=("approvers",))
    return ApiClient(stack.state["api_url"], token).post(f"/v1/approvals/{approval_id}/decision",
                                                        {"decision": decision, "comment": comment})


def test_held_delete_runs_after_approval_through_the_api_and_others_are_served_meanwhile(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="approval-api"))
    conninfo = stack.conninfo(grant)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        order_id = new_order(conn)
    held = HeldStatement(conninfo, "DELETE FROM orders WHERE id = %s", (order_id,))
    approval_id = held.wait_for_hold()
    # The gateway keeps serving: another session of the same grant runs while this one waits.
    started = time.monotonic()
    with psycopg.connect(**conninfo, autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM customers").fetchone() == (6,)
    assert time.monotonic() - started < 5
    assert order_exists(stack, conninfo, order_id)
    status, body = decide(stack, approval_id, "approve", "looks right")
    assert status == 200, body
    held.wait()
    assert held.error is None and held.result == "DELETE 1"
    assert not order_exists(stack, conninfo, order_id)
    result = stack.wait_for(
        f"SELECT activity_name, status_detail, approval_id, rule, statement FROM events WHERE class_uid = 6005 "
        f"AND pipeline_run_id = 'approval-api' AND approval_id = '{approval_id}' ORDER BY time",
        lambda r: any(row[0] == "query" for row in r.rows))
    rows = [dict(zip(result.columns, row, strict=True)) for row in result.rows]
    executed = [r for r in rows if r["activity_name"] == "query"]
    assert executed[0]["rule"] == "changes-need-approval" and executed[0]["statement"].startswith("DELETE FROM orders")
    assert {r["status_detail"] for r in rows if r["activity_name"] == "approval"} >= {"pending", "approved"}


def test_denied_delete_gets_42501_with_the_approver_and_comment(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="approval-deny"))
    conninfo = stack.conninfo(grant)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        order_id = new_order(conn)
    held = HeldStatement(conninfo, "DELETE FROM orders WHERE id = %s", (order_id,))
    approval_id = held.wait_for_hold()
    assert decide(stack, approval_id, "deny", "not during the freeze")[0] == 200
    held.wait()
    assert isinstance(held.error, psycopg.errors.InsufficientPrivilege)
    assert f"denied by {APPROVER}: not during the freeze" in str(held.error)
    assert order_exists(stack, conninfo, order_id)


def test_held_delete_approved_through_the_emailed_link(stack: Stack) -> None:
    grant = stack.grant(stack.pipeline_token(run_id="approval-link"))
    conninfo = stack.conninfo(grant)
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        order_id = new_order(conn)
    held = HeldStatement(conninfo, "DELETE FROM orders WHERE id = %s", (order_id,))
    approval_id = held.wait_for_hold()
    link = None
    deadline = time.monotonic() + 20
    while link is None and time.monotonic() < deadline:
        for email in read_mailbox(stack.state["aws_endpoint"]):
            if APPROVER in email.to:
                link = next((u for u in email.links if approval_id in u), link)
        time.sleep(0.5)
    assert link, "no email with a link for the approval"
    page = urllib.request.urlopen(link).read().decode()
    assert "DELETE FROM orders" in page and "changes-need-approval" in page
    form = dict(re.findall(r'type="hidden" name="(\w+)" value="([^"]*)"', page))
    form.update(decision="approve", comment="ok from the link")
    urllib.request.urlopen(urllib.request.Request(link, data=urllib.parse.urlencode(form).encode(), method="POST"))
    held.wait()
    assert held.error is None and held.result == "DELETE 1"
    assert not order_exists(stack, conninfo, order_id)
