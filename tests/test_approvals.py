"""Approvals through the control plane: a gateway holds a statement, approvers decide through the
API or the emailed link, the Step Functions execution (moto's interpreter, in-process) resumes or
times out, and everything lands in the evidence."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest

from control_plane import approval_workflow
from control_plane.approval_links import ReviewLink
from control_plane.approvals import Approver, is_self_approval
from control_plane.contract import GrantClaims, GrantKeySet, Identity, verify_grant
from data_plane.core.control_plane_client import ControlPlaneError
from tests.control_plane_world import OTHER_KEY, World

ANN = "ann.approver@example.com"
BOB = "bob.approver@example.com"
DELETE = "DELETE FROM orders WHERE id = 7"


def approver(world: World, sub: str = ANN) -> str:
    return world.token(sub, groups=("approvers",))


def use_policy(world: World, name: str = "pipeline-acme-app", **approval: Any) -> dict[str, Any]:
    """Change a seeded policy's approval rule (a new policy version)."""
    admin = world.admin_token()
    policy = world.call("GET", f"/v1/policies/{name}", admin)[1]
    spec = {k: v for k, v in policy.items() if k not in ("version", "updated_by", "updated_at")}
    spec["approval"] = (spec.get("approval") or {}) | approval
    status, body = world.call("PUT", f"/v1/policies/{name}", admin, spec)
    assert status == 200, body
    return body


def hold(world: World, *, token: str | None = None, grant: str | None = None, statement: str = DELETE,
         session_id: str = "sess-1", rule: str = "hold-deletes") -> dict[str, Any]:
    if grant is None:
        status, issued = world.call("POST", "/v1/grants", token or world.pipeline_token(), {"target": "demo-pg"})
        assert status == 201, issued
        grant = issued["token"]
    return world.gateway_client().request("POST", "/v1/gateway/approvals", {
        "grant": grant, "session_id": session_id, "statement": statement, "rule": rule, "reason": "cleanup"})


def gateway_view(world: World, approval_id: str) -> dict[str, Any]:
    return world.gateway_client().request("GET", f"/v1/gateway/approvals/{approval_id}")


def workflow_outcome(world: World, approval_id: str, timeout: float = 15.0) -> dict[str, Any]:
    """The outcome the state machine itself recorded (and its execution's final status)."""
    deadline = time.monotonic() + timeout
    while True:
        items = world.svc.state.approval_items(approval_id)
        outcome = items.get(approval_workflow.WORKFLOW_OUTCOME_SK)
        if outcome:
            execution = world.svc.sfn.describe_execution(executionArn=items["META"]["execution_arn"])
            if execution["status"] != "RUNNING":
                return outcome | {"execution_status": execution["status"]}
        if time.monotonic() > deadline:
            raise AssertionError(f"the workflow of {approval_id} recorded no outcome: {sorted(items)}")
        time.sleep(0.05)


def decide(world: World, approval_id: str, token: str, decision: str = "approve", comment: str = "") -> tuple[int, Any]:
    return world.call("POST", f"/v1/approvals/{approval_id}/decision", token,
                      {"decision": decision, "comment": comment})


def rows_of(world: World, approval_id: str) -> list[dict[str, Any]]:
    return sorted((r for r in world.evidence_rows() if r["approval_id"] == approval_id), key=lambda r: r["time"])


def wait_rows(world: World, approval_id: str, step: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rows = rows_of(world, approval_id)
        if any(r["status_detail"] == step for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)


def http(method: str, url: str, form: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode()


def csrf_of(page: str) -> str:
    marker = 'name="csrf" value="'
    start = page.index(marker) + len(marker)
    return page[start:page.index('"', start)]


# -- the held statement, decided through the API --------------------------------------------------


def test_two_distinct_approvers_approve_and_the_execution_resumes(world: World) -> None:
    use_policy(world, approvals_required=2)
    held = hold(world)
    assert held["status"] == "pending" and held["approval_id"].startswith("ap") and len(held["approval_id"]) == 18
    assert "proctor approvals approve" in held["review_hint"] and held["expires_at"] > time.time()
    approval_id = held["approval_id"]

    status, body = decide(world, approval_id, approver(world, ANN), comment="looks right")
    assert status == 200 and body["status"] == "pending" and len(body["decisions"]) == 1
    # The same person again does not count twice.
    assert decide(world, approval_id, approver(world, ANN))[0] == 409
    assert gateway_view(world, approval_id)["status"] == "pending"

    status, body = decide(world, approval_id, approver(world, BOB), comment="ok by me")
    assert status == 200 and body["status"] == "approved"
    view = gateway_view(world, approval_id)
    assert view["status"] == "approved" and view["decided_by"] == BOB and view["comment"] == "ok by me"
    assert [(d["approver"], d["decision"], d["comment"]) for d in view["decisions"]] == [
        (ANN, "approve", "looks right"), (BOB, "approve", "ok by me")]
    assert set(view) >= {"approval_id", "status", "decisions", "decided_at", "comment"}

    outcome = workflow_outcome(world, approval_id)
    assert outcome["status"] == "approved" and outcome["execution_status"] == "SUCCEEDED"
    assert outcome["decision"]["approvers"] == [ANN, BOB]


def test_one_denial_ends_it_and_the_gateway_learns_who_and_why(world: World) -> None:
    approval_id = hold(world)["approval_id"]
    status, body = decide(world, approval_id, approver(world, BOB), "deny", "not during the freeze")
    assert status == 200 and body["status"] == "denied"
    view = gateway_view(world, approval_id)
    assert (view["status"], view["decided_by"], view["comment"]) == ("denied", BOB, "not during the freeze")
    outcome = workflow_outcome(world, approval_id)
    assert outcome["status"] == "denied" and outcome["error"]["Error"] == approval_workflow.DENIED_ERROR
    # Decisions after the end are refused.
    status, detail = decide(world, approval_id, approver(world, ANN))
    assert status == 409 and "denied" in detail


def test_the_workflow_times_out_and_records_the_expiry(world: World) -> None:
    # An approval never outlives the grant whose session holds the statement: a grant with four
    # seconds left gives a four-second approval, which the state machine's TimeoutSecondsPath ends.
    now = int(time.time())
    claims = GrantClaims(grant_id=f"gshort{now}", identity=Identity(world.issuer.issuer, "ci", (), {
        "repository": "acme/app", "run_id": "7", "actor": "bob"}), target="demo-pg", target_kind="postgres",
        backend_role="app_rw", database="app", policy_name="pipeline-acme-app", policy_version=1,
        issued_at=now, expires_at=now + 4)
    held = hold(world, grant=world.svc.signer.sign(claims.to_jwt_claims()))
    assert held["expires_at"] - now <= 4
    outcome = workflow_outcome(world, held["approval_id"])
    assert outcome["status"] == "expired" and outcome["execution_status"] == "SUCCEEDED"
    view = gateway_view(world, held["approval_id"])
    assert view["status"] == "expired" and view["comment"] == "approval expired"
    assert decide(world, held["approval_id"], approver(world))[0] == 409
    rows = wait_rows(world, held["approval_id"], "expired")
    closed = [r for r in rows if r["status_detail"] == "expired"]
    assert closed and closed[0]["status"] == "Failure"
    assert json.loads(closed[0]["details"])["execution_arn"].endswith(f":{held['approval_id']}")


def test_expiry_is_judged_by_the_clock_even_before_the_workflow_says_so(world: World) -> None:
    approval_id = hold(world)["approval_id"]
    expires_at = gateway_view(world, approval_id)["expires_at"]
    world.svc.clock = lambda: expires_at + 1.0
    view = gateway_view(world, approval_id)
    assert (view["status"], view["decided_at"], view["comment"]) == ("expired", expires_at, "approval expired")
    status, detail = decide(world, approval_id, approver(world))
    assert status == 409 and "expired" in detail


def test_self_approval_is_refused_for_the_pipeline_actor_unless_policy_allows_it(world: World) -> None:
    # The pipeline run was triggered by `bob`; bob@example.com is an approver, but not of his own run.
    bob = world.token("bob@example.com", groups=("approvers",))
    approval_id = hold(world, token=world.pipeline_token(actor="bob"))["approval_id"]
    status, detail = decide(world, approval_id, bob)
    assert status == 403 and "self-approval" in detail
    assert world.call("GET", "/v1/approvals?status=pending", bob)[1]["approvals"] == []

    use_policy(world, allow_self_approval=True)
    approval_id = hold(world, token=world.pipeline_token(actor="bob"))["approval_id"]
    assert decide(world, approval_id, bob)[1]["status"] == "approved"


def test_self_approval_rules() -> None:
    person = Identity("https://idp", "carl@example.com", ("approvers",), email="carl@example.com")
    pipeline = Identity("https://ci", "repo:acme/app", (), {"repository": "acme/app", "actor": "dana"})

    def who(subject: str, email: str | None = None, issuer: str | None = "https://idp") -> Approver:
        return Approver(subject=subject, email=email, groups=("approvers",), issuer=issuer, via="api")

    assert is_self_approval(who("carl@example.com"), person)
    assert is_self_approval(who("u-123", "Carl@Example.com"), person)  # same email, other subject
    assert is_self_approval(who("carl@example.com", issuer=None), person)  # an email link to the requester
    assert not is_self_approval(who("carl@example.com", issuer="https://other"), Identity("https://idp", "u-9"))
    assert is_self_approval(who("dana"), pipeline)
    assert is_self_approval(who("u-1", "dana@example.com"), pipeline)
    assert not is_self_approval(who("u-2", "dana.approver@example.com"), pipeline)
    assert not is_self_approval(who("ann@example.com", "ann@example.com"), pipeline)


def test_only_members_of_the_approver_groups_decide(world: World) -> None:
    approval_id = hold(world)["approval_id"]
    engineer = world.token("eve@example.com", groups=("engineers",))
    status, detail = decide(world, approval_id, engineer)
    assert status == 403 and "approver group" in detail
    assert world.call("GET", f"/v1/approvals/{approval_id}", engineer)[0] == 403
    # Admins see it, but decide only if they are approvers too.
    admin = world.admin_token()
    assert world.call("GET", f"/v1/approvals/{approval_id}", admin)[0] == 200
    assert decide(world, approval_id, admin)[0] == 403
    assert gateway_view(world, approval_id)["status"] == "pending"


def test_pending_list_shows_what_awaits_the_caller(world: World) -> None:
    first = hold(world, session_id="s-a")["approval_id"]
    second = hold(world, session_id="s-b")["approval_id"]
    ann = approver(world, ANN)
    listed = world.call("GET", "/v1/approvals?status=pending", ann)[1]["approvals"]
    assert {a["approval_id"] for a in listed} >= {first, second}
    assert all(a["awaiting_you"] for a in listed)
    decide(world, first, ann)
    pending = {a["approval_id"] for a in world.call("GET", "/v1/approvals", ann)[1]["approvals"]}
    assert first not in pending and second in pending
    approved = world.call("GET", "/v1/approvals?status=approved", ann)[1]["approvals"]
    assert [a["approval_id"] for a in approved] == [first]
    assert world.call("GET", "/v1/approvals?status=bogus", ann)[0] == 422
    assert world.call("GET", "/v1/approvals", world.token(groups=("engineers",)))[1]["approvals"] == []
    everything = world.call("GET", "/v1/approvals?status=pending", world.admin_token())[1]["approvals"]
    assert {second} <= {a["approval_id"] for a in everything}


def test_gateway_routes_are_for_gateways_only(world: World) -> None:
    approval_id = hold(world)["approval_id"]
    with pytest.raises(ControlPlaneError) as refused:
        world.gateway_client(OTHER_KEY).request("GET", f"/v1/gateway/approvals/{approval_id}")
    assert refused.value.status == 403
    # A person's bearer token does not reach the IAM-authenticated routes at all.
    assert world.call("GET", f"/v1/gateway/approvals/{approval_id}", approver(world))[0] == 403
    with pytest.raises(ControlPlaneError) as bad_grant:
        hold(world, grant="not.a.grant")
    assert bad_grant.value.status == 403
    with pytest.raises(ControlPlaneError) as missing:
        gateway_view(world, "apnothere")
    assert missing.value.status == 404


def test_a_decision_before_the_task_token_arrives_resumes_the_execution_when_it_does(world: World) -> None:
    assert world.notifier is not None
    world.notifier.stop()
    approval_id = hold(world)["approval_id"]
    assert decide(world, approval_id, approver(world))[1]["status"] == "approved"
    assert world.svc.sfn.describe_execution(executionArn=world.svc.state.approval_items(approval_id)["META"][
        "execution_arn"])["status"] == "RUNNING"
    deadline = time.monotonic() + 10
    while not world.notifier.poll_once() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workflow_outcome(world, approval_id)["status"] == "approved"
    # Nobody is emailed about an approval that was decided already.
    assert not [m for m in world.mailbox() if approval_id in m.subject]


def test_every_step_is_evidence_linked_by_approval_id(world: World) -> None:
    held = hold(world, session_id="sess-ev")
    approval_id = held["approval_id"]
    world.wait_for_mail(ANN, approval_id)
    decide(world, approval_id, approver(world, ANN), comment="fine")
    workflow_outcome(world, approval_id)
    rows = wait_rows(world, approval_id, "approved")
    steps = [(r["class_uid"], r["activity_name"], r["status_detail"]) for r in rows if r["activity_name"] == "approval"]
    assert steps == [(6005, "approval", "requested"), (6005, "approval", "notified"),
                     (6005, "approval", "decision"), (6005, "approval", "approved")]
    requested, notified, decision, closed = (r for r in rows if r["activity_name"] == "approval")
    assert requested["pipeline_run_id"] == "42" and requested["pipeline_actor"] == "bob"
    assert requested["session_id"] == "sess-ev" and requested["statement"] == DELETE
    assert requested["rule"] == "hold-deletes" and requested["grant_id"]
    assert json.loads(requested["details"])["execution_arn"].endswith(f":{approval_id}")
    assert sorted(json.loads(notified["details"])["recipients"]) == [ANN, BOB]
    assert decision["actor_subject"] == ANN
    assert json.loads(decision["details"])["decision"] == "approve" and json.loads(decision["details"])["comment"] \
        == "fine"
    assert closed["status"] == "Success" and closed["session_id"] == "sess-ev"
    api_calls = {r["api_operation"] for r in rows if r["class_uid"] == 6003}
    assert {"POST /v1/gateway/approvals", f"POST /v1/approvals/{approval_id}/decision"} <= api_calls
    # The task token is never evidence.
    token = world.svc.state.task_token(approval_id)
    assert token and token not in world.evidence_bytes().decode()


# -- the email link --------------------------------------------------------------------------------


def test_email_link_page_approves_once_with_csrf_and_never_carries_the_task_token(world: World) -> None:
    approval_id = hold(world, statement="DELETE FROM orders WHERE note = '<script>alert(1)</script>'")["approval_id"]
    mail = world.wait_for_mail(ANN, approval_id)
    (link,) = mail.links
    token = world.svc.state.task_token(approval_id)
    assert token and token not in link and token not in mail.body
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
    assert set(query) == {"approver", "exp", "sig"} and query["approver"] == [ANN]

    status, headers, page = http("GET", link)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "form-action 'self'" in csp and "frame-ancestors 'none'" in csp
    assert headers["Cache-Control"] == "no-store" and headers["Referrer-Policy"] == "no-referrer"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert "acme/app" in page and "hold-deletes" in page and ANN in page and token not in page

    assert http("POST", link, {"decision": "approve"})[0] == 403  # no CSRF token
    assert http("POST", link, {"decision": "approve", "csrf": "forged.token"})[0] == 403
    (bobs_link,) = world.wait_for_mail(BOB, approval_id).links
    bobs_form = csrf_of(http("GET", bobs_link)[2])
    assert http("POST", link, {"decision": "approve", "csrf": bobs_form})[0] == 403  # bound to bob's link

    form = {"decision": "approve", "comment": "checked <b>twice</b>", "csrf": csrf_of(page)}
    status, _, done = http("POST", link, form)
    assert status == 200 and "approved" in done and "&lt;b&gt;twice&lt;/b&gt;" in done
    view = gateway_view(world, approval_id)
    assert view["status"] == "approved" and view["decisions"][0]["via"] == "email-link"
    assert (view["decided_by"], view["comment"]) == (ANN, "checked <b>twice</b>")
    assert http("POST", link, form)[0] == 403  # replay of the same form
    assert http("GET", link)[0] == 409  # no longer pending
    assert workflow_outcome(world, approval_id)["status"] == "approved"
    decision = [r for r in rows_of(world, approval_id) if r["status_detail"] == "decision"]
    assert decision[0]["actor_issuer"] == "proctor:email-link" and decision[0]["actor_subject"] == ANN


def test_tampered_and_expired_links_are_refused(world: World) -> None:
    approval_id = hold(world)["approval_id"]
    (link,) = world.wait_for_mail(BOB, approval_id).links
    assert http("GET", link.replace("sig=", "sig=x"))[0] == 403
    assert http("GET", link.replace("exp=", "exp=1"))[0] == 403
    stripped = link.split("?")[0]
    assert http("GET", stripped)[0] == 403
    past = ReviewLink.issue(world.svc.link_key(), approval_id, BOB, int(time.time()) - 5)
    status, _, page = http("GET", past.url(world.api_url))
    assert status == 403 and "expired" in page
    # A denial through the link.
    status, _, page = http("GET", link)
    assert status == 200
    assert http("POST", link, {"decision": "deny", "comment": "no", "csrf": csrf_of(page)})[0] == 200
    assert gateway_view(world, approval_id)["status"] == "denied"


def test_a_link_stops_working_when_its_approver_leaves_the_directory(world: World) -> None:
    approval_id = hold(world)["approval_id"]
    (link,) = world.wait_for_mail(BOB, approval_id).links
    admin = world.admin_token()
    assert world.call("PUT", "/v1/approver-groups/approvers", admin, {"members": [{"email": ANN}]})[0] == 200
    status, _, page = http("GET", link)
    assert status == 403 and "no longer listed" in page


# -- approver directory ---------------------------------------------------------------------------


def test_approver_directory_is_admin_only_and_validated(world: World) -> None:
    admin = world.admin_token()
    seeded = world.call("GET", "/v1/approver-groups/approvers", admin)[1]
    assert [m["email"] for m in seeded["members"]] == [ANN, BOB]
    assert world.call("GET", "/v1/approver-groups/approvers", approver(world))[0] == 403
    assert world.call("PUT", "/v1/approver-groups/dba", approver(world), {"members": []})[0] == 403
    assert world.call("PUT", "/v1/approver-groups/dba", admin, {"members": [{"email": "not-an-email"}]})[0] == 422
    assert world.call("PUT", "/v1/approver-groups/dba", admin,
                      {"members": [{"email": "x@example.com"}, {"email": "X@example.com"}]})[0] == 400
    status, group = world.call("PUT", "/v1/approver-groups/dba", admin,
                               {"members": [{"email": "dba@example.com", "subject": "u-7"}]})
    assert status == 200 and group["updated_by"] == "root@example.com"
    assert {g["group"] for g in world.call("GET", "/v1/approver-groups", admin)[1]["approver_groups"]} == {
        "approvers", "dba"}


# -- just-in-time access --------------------------------------------------------------------------


def jit_policy(world: World, **approval: Any) -> None:
    policy = {"name": "contractors-jit", "subjects": [{"groups": ["contractors"]}], "targets": ["demo-pg"],
              "backend_role": "app_ro", "max_session_seconds": 900, "require_access_approval": True,
              "approval": {"approver_groups": ["approvers"], "approvals_required": 1} | approval}
    assert world.call("POST", "/v1/policies", world.admin_token(), policy)[0] == 201


def test_jit_access_request_end_to_end(world: World) -> None:
    jit_policy(world)
    carl = world.token("carl@example.com", groups=("contractors",))
    status, body = world.call("POST", "/v1/grants", carl, {"target": "demo-pg", "reason": "incident 7"})
    assert status == 202
    request = body["access_request"]
    assert request["status"] == "pending" and request["approval_id"].startswith("ap")
    path = f"/v1/access-requests/{request['id']}"
    assert world.call("POST", f"{path}/grant", carl)[0] == 409  # not approved yet
    mail = world.wait_for_mail(ANN, request["approval_id"])
    assert "carl@example.com" in mail.body and "access" in mail.body

    status, body = decide(world, request["approval_id"], approver(world, ANN), comment="go")
    assert status == 200 and body["kind"] == "access"
    shown = world.call("GET", path, carl)[1]
    assert shown["status"] == "approved" and shown["decided_by"] == ANN and shown["grant_id"] is None

    assert world.call("POST", f"{path}/grant", world.token("eve@example.com", groups=("contractors",)))[0] == 403
    status, grant = world.call("POST", f"{path}/grant", carl)
    assert status == 201
    claims = verify_grant(grant["token"], GrantKeySet(world.svc.signer.jwks()))
    assert claims.approvals == (request["approval_id"],)
    assert claims.policy_name == "contractors-jit" and claims.expires_at - claims.issued_at == 900
    assert world.call("POST", f"{path}/grant", carl)[0] == 409  # once
    assert world.call("GET", path, carl)[1]["grant_id"] == grant["grant_id"]
    assert workflow_outcome(world, request["approval_id"])["status"] == "approved"
    rows = rows_of(world, request["approval_id"])
    assert {r["class_uid"] for r in rows if r["activity_name"] == "approval"} == {3002}
    issued = [r for r in rows if r["api_operation"] == f"POST {path}/grant" and r["http_status"] == 201]
    assert issued and issued[0]["grant_id"] == grant["grant_id"]


def test_jit_requester_cannot_approve_their_own_request_unless_allowed(world: World) -> None:
    jit_policy(world)
    ann_asks = world.token(ANN, groups=("contractors", "approvers"))
    request = world.call("POST", "/v1/grants", ann_asks, {"target": "demo-pg"})[1]["access_request"]
    assert decide(world, request["approval_id"], ann_asks)[0] == 403
    world.wait_for_mail(BOB, request["approval_id"])
    recipients = {to for m in world.mailbox() if request["approval_id"] in m.subject for to in m.to}
    assert recipients == {BOB}  # nobody emails ann her own request
    assert decide(world, request["approval_id"], approver(world, BOB), "deny")[1]["status"] == "denied"
    assert world.call("POST", f"/v1/access-requests/{request['id']}/grant", ann_asks)[0] == 409


# -- the definition ---------------------------------------------------------------------------------


def test_the_definition_uses_jsonpath_states_and_keeps_the_token_to_the_queue() -> None:
    definition = approval_workflow.definition(state_table="t", notifier_queue_url="https://sqs/q")
    text = json.dumps(definition)
    assert "JSONata" not in text and "QueryLanguage" not in text
    wait = definition["States"]["WaitForDecision"]
    assert wait["Resource"] == "arn:aws:states:::sqs:sendMessage.waitForTaskToken"
    assert wait["TimeoutSecondsPath"] == "$.timeout_seconds"
    assert [c["ErrorEquals"] for c in wait["Catch"]] == [[approval_workflow.DENIED_ERROR], ["States.Timeout"],
                                                         ["States.ALL"]]
    assert text.count("$$.Task.Token") == 1
    assert {s["Resource"] for s in definition["States"].values() if s["Type"] == "Task"} == {
        "arn:aws:states:::dynamodb:putItem", "arn:aws:states:::sqs:sendMessage.waitForTaskToken",
        "arn:aws:states:::sqs:sendMessage"}
