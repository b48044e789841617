"""A development OIDC issuer: discovery document and JWKS over HTTP, and tokens minted with a
key kept in the local stack's state directory."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

AUDIENCE = "proctor"


def generate_key(path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class DevIssuer:
    def __init__(self, key_path: Path, issuer_url: str, kid: str = "dev-1") -> None:
        self.key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        self.issuer = issuer_url
        self.kid = kid

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid=self.kid, alg="RS256", use="sig")
        return {"keys": [jwk]}

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/.well-known/jwks.json",
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "claims_supported": ["sub", "email", "groups", "repository", "workflow", "run_id", "actor", "ref"],
        }

    def mint(self, subject: str, *, groups: tuple[str, ...] = (), claims: Mapping[str, Any] | None = None,
             ttl: int = 3600, audience: str = AUDIENCE, now: float | None = None) -> str:
        issued = int(now or time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer, "sub": subject, "aud": audience, "iat": issued, "nbf": issued,
            "exp": issued + ttl, "jti": uuid.uuid4().hex,
        }
        if groups:
            payload["groups"] = list(groups)
        if "@" in subject:
            payload["email"] = subject
        payload.update(claims or {})
        return jwt.encode(payload, self.key, algorithm="RS256", headers={"kid": self.kid})


def serve(issuer: DevIssuer, server: ThreadingHTTPServer) -> threading.Thread:
    documents = {
        "/.well-known/openid-configuration": issuer.discovery(),
        "/.well-known/jwks.json": issuer.jwks(),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            doc = documents.get(self.path.split("?")[0])
            body = json.dumps(doc or {"error": "not found"}).encode()
            self.send_response(200 if doc else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, name="dev-oidc", daemon=True)
    thread.start()
    return thread
