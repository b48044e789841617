"""The JWT attack list: every forged, confused or stale token is refused with 401 and recorded."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.control_plane_world import World


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(world: World, **overrides: object) -> dict:
    now = int(time.time())
    claims = {"iss": world.issuer.issuer, "sub": "mallory@example.com", "aud": "proctor", "iat": now,
              "nbf": now, "exp": now + 600, "groups": ["admins"]}
    claims.update(overrides)
    return claims


def _unsigned(header: dict, claims: dict, signature: bytes = b"") -> str:
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return head + "." + _b64(signature)


def forged_signature(world: World) -> str:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(_claims(world), other, algorithm="RS256", headers={"kid": world.issuer.kid})


def alg_none(world: World) -> str:
    return _unsigned({"alg": "none", "typ": "JWT", "kid": world.issuer.kid}, _claims(world))


def hs_rs_confusion(world: World) -> str:
    # The classic: HMAC-sign with the issuer's *public* key, hoping the verifier uses it as a secret.
    public_pem = world.issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = {"alg": "HS256", "typ": "JWT", "kid": world.issuer.kid}
    signing_input = (_b64(json.dumps(header).encode()) + "." + _b64(json.dumps(_claims(world)).encode())).encode()
    return signing_input.decode() + "." + _b64(hmac.new(public_pem, signing_input, hashlib.sha256).digest())


def unknown_kid(world: World) -> str:
    return jwt.encode(_claims(world), world.issuer.key, algorithm="RS256", headers={"kid": "rotated-away"})


def expired(world: World) -> str:
    now = int(time.time())
    return world.issuer.mint("mallory@example.com", groups=("admins",), now=now - 7200, ttl=600)


def not_yet_valid(world: World) -> str:
    now = int(time.time())
    return jwt.encode(_claims(world, nbf=now + 3600, iat=now + 3600, exp=now + 7200), world.issuer.key,
                      algorithm="RS256", headers={"kid": world.issuer.kid})


def wrong_audience(world: World) -> str:
    return world.issuer.mint("mallory@example.com", groups=("admins",), audience="someone-else")


def wrong_issuer(world: World) -> str:
    return jwt.encode(_claims(world, iss="https://evil.example.com"), world.issuer.key, algorithm="RS256",
                      headers={"kid": world.issuer.kid})


def unpinned_algorithm(world: World) -> str:
    return jwt.encode(_claims(world), world.issuer.key, algorithm="RS512", headers={"kid": world.issuer.kid})


def garbage(world: World) -> str:
    return "not.a.jwt"


ATTACKS = {
    "forged signature": (forged_signature, "signature invalid"),
    "alg none": (alg_none, "algorithm 'none' not allowed for issuer"),
    "HS/RS confusion": (hs_rs_confusion, "algorithm 'HS256' not allowed for issuer"),
    "unknown kid": (unknown_kid, "unknown signing key"),
    "expired": (expired, "token expired"),
    "not yet valid": (not_yet_valid, "token not yet valid"),
    "wrong audience": (wrong_audience, "wrong audience"),
    "wrong issuer": (wrong_issuer, "unknown issuer"),
    "algorithm not pinned": (unpinned_algorithm, "algorithm 'RS512' not allowed for issuer"),
    "malformed": (garbage, "malformed token"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_token_is_refused_with_401_and_recorded(world: World, attack: str) -> None:
    make, reason = ATTACKS[attack]
    status, detail = world.call("POST", "/v1/grants", make(world), {"target": "demo-pg"})
    assert status == 401
    assert detail == f"invalid token: {reason}"
    refusals = [r for r in world.evidence_rows() if r["class_uid"] == 3002 and r["status"] == "Failure"]
    assert [r["status_detail"] for r in refusals] == [reason]
    api_rows = [r for r in world.evidence_rows() if r["class_uid"] == 6003]
    assert api_rows and api_rows[0]["http_status"] == 401 and api_rows[0]["api_operation"] == "POST /v1/grants"


def test_a_genuine_token_of_the_same_issuer_is_accepted(world: World) -> None:
    status, body = world.call("GET", "/v1/whoami", world.token("alice@example.com", groups=("engineers",)))
    assert status == 200
    assert body["subject"] == "alice@example.com" and body["groups"] == ["engineers"]
    logons = [r for r in world.evidence_rows() if r["class_uid"] == 3002]
    assert [(r["status"], r["actor_subject"]) for r in logons] == [("Success", "alice@example.com")]


def test_missing_bearer_token_is_refused(world: World) -> None:
    status, detail = world.call("GET", "/v1/targets")
    assert (status, detail) == (401, "missing bearer token")


def test_symmetric_algorithms_cannot_be_configured_for_an_issuer(world: World) -> None:
    status, _ = world.call("POST", "/v1/issuers", world.admin_token(), {
        "issuer": "https://idp.example.com", "audiences": ["proctor"],
        "jwks_uri": "https://idp.example.com/jwks", "algorithms": ["HS256"]})
    assert status == 422
