"""Credential issuance: only gateways (IAM-authenticated) get a backend secret, only for a valid,
unrevoked grant, and every issuance is recorded — without the secret."""

from __future__ import annotations

import time

import pytest

from control_plane.contract import GrantClaims, Identity
from data_plane.core.control_plane_client import ControlPlaneError
from tests.control_plane_world import OTHER_KEY, RO_PASSWORD, RW_PASSWORD, World


def _grant(world: World) -> dict:
    status, grant = world.call("POST", "/v1/grants", world.pipeline_token(), {"target": "demo-pg"})
    assert status == 201
    return grant


def test_gateway_gets_the_credential_and_the_issuance_is_recorded(world: World) -> None:
    grant = _grant(world)
    credential = world.gateway_client().credential(grant["token"], "sess-1")
    assert credential["username"] == "app_rw" and credential["password"] == RW_PASSWORD
    assert credential["database"] == "app" and credential["grant_id"] == grant["grant_id"]
    issued = [r for r in world.evidence_rows() if r["api_operation"] == "POST /v1/credentials"]
    assert len(issued) == 1
    row = issued[0]
    assert row["status"] == "Success" and row["session_id"] == "sess-1" and row["grant_id"] == grant["grant_id"]
    assert row["pipeline_repository"] == "acme/app"
    assert "proctor/demo-pg/app_rw" in row["details"]
    assert RW_PASSWORD.encode() not in world.evidence_bytes()


def test_a_person_with_a_valid_token_gets_no_secret(world: World) -> None:
    grant = _grant(world)
    status, detail = world.call("POST", "/v1/credentials", world.admin_token(), {"grant": grant["token"]})
    assert status == 403 and RW_PASSWORD not in str(detail)


def test_unsigned_or_badly_signed_calls_never_reach_the_handler(world: World) -> None:
    grant = _grant(world)
    assert world.call("POST", "/v1/credentials", None, {"grant": grant["token"]})[0] == 403
    client = world.gateway_client()
    client._credentials = type(client._credentials)(client._credentials.access_key, "wrong-secret")
    with pytest.raises(ControlPlaneError) as refused:
        client.credential(grant["token"], "s")
    assert refused.value.status == 403


def test_another_iam_role_is_not_a_gateway(world: World) -> None:
    grant = _grant(world)
    with pytest.raises(ControlPlaneError) as refused:
        world.gateway_client(OTHER_KEY).credential(grant["token"], "s")
    assert refused.value.status == 403 and refused.value.detail == "this route is for gateways only"
    denied = [r for r in world.evidence_rows() if r["api_operation"] == "POST /v1/credentials"]
    assert denied[0]["http_status"] == 403 and "not-a-gateway" in denied[0]["details"]


def test_revoked_grant_gets_no_credential(world: World) -> None:
    grant = _grant(world)
    assert world.call("POST", f"/v1/grants/{grant['grant_id']}/revoke", world.admin_token(), {})[0] == 200
    with pytest.raises(ControlPlaneError) as refused:
        world.gateway_client().credential(grant["token"], "s")
    assert (refused.value.status, refused.value.detail) == (403, "grant revoked")
    revoked = world.gateway_client().revocations(0)["revocations"]
    assert [r["grant_id"] for r in revoked] == [grant["grant_id"]]


def test_expired_or_tampered_grant_gets_no_credential(world: World) -> None:
    now = int(time.time())
    expired = GrantClaims(grant_id="gexpired", identity=Identity("i", "s"), target="demo-pg", target_kind="postgres",
                          backend_role="app_rw", database="app", policy_name="p", policy_version=1,
                          issued_at=now - 7200, expires_at=now - 3600)
    token = world.svc.signer.sign(expired.to_jwt_claims())
    with pytest.raises(ControlPlaneError) as refused:
        world.gateway_client().credential(token, "s")
    assert (refused.value.status, refused.value.detail) == (403, "grant expired")

    grant = _grant(world)
    head, payload, sig = grant["token"].split(".")
    tampered = f"{head}.{payload[:-4]}AAAA.{sig}"
    with pytest.raises(ControlPlaneError) as refused:
        world.gateway_client().credential(tampered, "s")
    assert refused.value.status == 403


def test_role_secret_follows_the_policy_role(world: World) -> None:
    status, grant = world.call("POST", "/v1/grants", world.token(groups=("engineers",)), {"target": "demo-pg"})
    assert status == 201
    credential = world.gateway_client().credential(grant["token"], "s")
    assert (credential["username"], credential["password"]) == ("app_ro", RO_PASSWORD)
