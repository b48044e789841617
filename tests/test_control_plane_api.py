"""Targets, policies, grants, access requests and revocation through the API (local adapter,
moto in-process)."""

from __future__ import annotations

from control_plane.contract import GrantKeySet, verify_grant
from tests.control_plane_world import World

TARGET = {
    "name": "orders-db", "kind": "postgres", "region": "us-east-1",
    "endpoint": {"host": "10.0.0.5", "port": 5432}, "gateway": {"host": "gw.example.com", "port": 5432},
    "secret_id": "proctor/orders-db/app", "database": "orders", "backend_user": "app",
}

POLICY = {
    "name": "orders-readers", "subjects": [{"groups": ["analysts"]}], "targets": ["orders-*"],
    "backend_role": "readonly", "max_session_seconds": 900,
}


def test_target_crud_by_admin(world: World) -> None:
    admin = world.admin_token()
    assert world.call("POST", "/v1/targets", admin, TARGET)[0] == 201
    assert world.call("POST", "/v1/targets", admin, TARGET)[0] == 409
    status, body = world.call("GET", "/v1/targets/orders-db", admin)
    assert status == 200 and body["endpoint"] == {"host": "10.0.0.5", "port": 5432}
    changed = TARGET | {"database": "orders2"}
    assert world.call("PUT", "/v1/targets/orders-db", admin, changed)[1]["database"] == "orders2"
    names = [t["name"] for t in world.call("GET", "/v1/targets", admin)[1]["targets"]]
    assert names == ["demo-pg", "orders-db"]
    assert world.call("DELETE", "/v1/targets/orders-db", admin)[0] == 204
    assert world.call("GET", "/v1/targets/orders-db", admin)[0] == 404
    assert world.call("DELETE", "/v1/targets/orders-db", admin)[0] == 404


def test_target_changes_need_the_admin_group(world: World) -> None:
    engineer = world.token(groups=("engineers",))
    assert world.call("POST", "/v1/targets", engineer, TARGET) == (403, "admin group membership required")
    assert world.call("DELETE", "/v1/targets/demo-pg", engineer)[0] == 403
    # Reading the catalogue of targets is open to any authenticated identity.
    assert world.call("GET", "/v1/targets", engineer)[0] == 200


def test_invalid_target_is_rejected(world: World) -> None:
    admin = world.admin_token()
    assert world.call("POST", "/v1/targets", admin, TARGET | {"kind": "oracle"})[0] == 422
    assert world.call("POST", "/v1/targets", admin, TARGET | {"name": "Bad Name!"})[0] == 422
    assert world.call("PUT", "/v1/targets/other", admin, TARGET)[0] == 400


def test_policies_are_versioned_and_grants_name_the_version(world: World) -> None:
    admin = world.admin_token()
    assert world.call("POST", "/v1/targets", admin, TARGET)[0] == 201
    status, created = world.call("POST", "/v1/policies", admin, POLICY)
    assert status == 201 and created["version"] == 1 and created["updated_by"] == "root@example.com"
    status, updated = world.call("PUT", "/v1/policies/orders-readers", admin, POLICY | {"max_session_seconds": 600})
    assert status == 200 and updated["version"] == 2
    versions = world.call("GET", "/v1/policies/orders-readers/versions", admin)[1]["versions"]
    assert [(v["version"], v["max_session_seconds"]) for v in versions] == [(1, 900), (2, 600)]
    assert world.call("GET", "/v1/policies/orders-readers/versions/1", admin)[1]["max_session_seconds"] == 900

    status, grant = world.call("POST", "/v1/grants", world.token("ann@example.com", groups=("analysts",)),
                               {"target": "orders-db", "reason": "report"})
    assert status == 201
    assert grant["policy"] == {"name": "orders-readers", "version": 2}
    assert grant["expires_at"] - verify_grant(grant["token"], GrantKeySet(world.svc.signer.jwks())).issued_at == 600

    assert world.call("DELETE", "/v1/policies/orders-readers", admin)[0] == 204
    assert world.call("POST", "/v1/grants", world.token("ann@example.com", groups=("analysts",)),
                      {"target": "orders-db"})[0] == 403
    # The versions a grant named stay readable for the evidence.
    assert world.call("GET", "/v1/policies/orders-readers/versions/2", admin)[0] == 200


def test_policies_are_admin_only(world: World) -> None:
    engineer = world.token(groups=("engineers",))
    assert world.call("GET", "/v1/policies", engineer)[0] == 403
    assert world.call("POST", "/v1/policies", engineer, POLICY)[0] == 403


def test_policy_without_any_subject_matcher_is_rejected(world: World) -> None:
    assert world.call("POST", "/v1/policies", world.admin_token(), POLICY | {"subjects": []})[0] == 422


def test_pipeline_grant_carries_the_run_identity_and_verifies_with_published_keys(world: World) -> None:
    status, grant = world.call("POST", "/v1/grants", world.pipeline_token(run_id="4711", actor="bob"),
                               {"target": "demo-pg", "reason": "deploy 1.2.3"})
    assert status == 201
    status, jwks = world.call("GET", "/v1/grant-keys")
    assert status == 200 and jwks["keys"][0]["alg"] == "ES256"
    claims = verify_grant(grant["token"], GrantKeySet(jwks))
    assert claims.grant_id == grant["grant_id"]
    assert claims.target == "demo-pg" and claims.backend_role == "app_rw" and claims.database == "app"
    assert claims.identity.kind == "pipeline"
    assert claims.identity.pipeline["repository"] == "acme/app"
    assert claims.identity.pipeline["run_id"] == "4711" and claims.identity.pipeline["actor"] == "bob"
    assert claims.policy_name == "pipeline-acme-app" and claims.reason == "deploy 1.2.3"
    assert grant["connection"] == {"host": "127.0.0.1", "port": 6432, "database": "app",
                                   "user": grant["grant_id"], "sslmode": "require"}
    issued = [r for r in world.evidence_rows() if r["api_operation"] == "POST /v1/grants"]
    assert len(issued) == 1
    assert issued[0]["grant_id"] == grant["grant_id"] and issued[0]["pipeline_run_id"] == "4711"


def test_engineers_get_the_read_only_role(world: World) -> None:
    status, grant = world.call("POST", "/v1/grants", world.token(groups=("engineers",)), {"target": "demo-pg"})
    assert status == 201 and grant["backend_role"] == "app_ro"


def test_no_policy_no_grant(world: World) -> None:
    assert world.call("POST", "/v1/grants", world.token(groups=("sales",)), {"target": "demo-pg"})[0] == 403
    assert world.call("POST", "/v1/grants", world.pipeline_token(repository="evil/fork"),
                      {"target": "demo-pg"})[0] == 403
    assert world.call("POST", "/v1/grants", world.token(groups=("engineers",)), {"target": "nope"})[0] == 404


def test_access_approval_policy_answers_202_with_an_access_request(world: World) -> None:
    admin = world.admin_token()
    policy = POLICY | {"name": "jit", "targets": ["demo-pg"], "subjects": [{"groups": ["contractors"]}],
                       "require_access_approval": True,
                       "approval": {"approver_groups": ["approvers"], "approvals_required": 2}}
    assert world.call("POST", "/v1/policies", admin, policy)[0] == 201
    requester = world.token("carl@example.com", groups=("contractors",))
    status, body = world.call("POST", "/v1/grants", requester, {"target": "demo-pg", "reason": "incident 7"})
    assert status == 202
    request = body["access_request"]
    assert request["status"] == "pending" and request["approvals_required"] == 2
    assert world.call("GET", f"/v1/access-requests/{request['id']}", requester)[1]["reason"] == "incident 7"
    assert world.call("GET", f"/v1/access-requests/{request['id']}", world.token(groups=("approvers",)))[0] == 200
    assert world.call("GET", f"/v1/access-requests/{request['id']}", world.token("eve@example.com"))[0] == 403
    assert world.call("GET", "/v1/access-requests/ar-missing", requester)[0] == 404


def test_revocation_by_holder_or_admin_only(world: World) -> None:
    holder = world.token("alice@example.com", groups=("engineers",))
    grant = world.call("POST", "/v1/grants", holder, {"target": "demo-pg"})[1]
    other = world.token("eve@example.com", groups=("engineers",))
    path = f"/v1/grants/{grant['grant_id']}/revoke"
    assert world.call("POST", path, other, {"reason": "mine now"})[0] == 403
    status, body = world.call("POST", path, holder, {"reason": "done"})
    assert status == 200 and body["revoked_by"] == "alice@example.com"
    assert world.svc.state.is_revoked(grant["grant_id"])
    assert world.call("POST", "/v1/grants/gnope/revoke", world.admin_token(), {"reason": "x"})[0] == 404


def test_every_api_call_is_an_audit_event(world: World) -> None:
    admin = world.admin_token()
    world.call("GET", "/v1/targets", admin)
    world.call("GET", "/v1/grant-keys")
    world.call("GET", "/v1/policies", world.token(groups=("engineers",)))
    rows = sorted((r for r in world.evidence_rows() if r["class_uid"] == 6003), key=lambda r: r["time"])
    assert [(r["api_operation"], r["http_status"], r["actor_subject"]) for r in rows] == [
        ("GET /v1/targets", 200, "root@example.com"),
        ("GET /v1/grant-keys", 200, None),
        ("GET /v1/policies", 403, "alice@example.com"),
    ]
    assert len({r["event_id"] for r in world.evidence_rows()}) == len(world.evidence_rows())
