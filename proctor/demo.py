"""`proctor demo` (`make demo`): the product's story on the local stack, step by step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proctor.api_client import ApiClient, ApiError
from proctor.cli import decode_jwt_unverified
from proctor.dev import stack
from proctor.dev.oidc_issuer import DevIssuer


def _step(title: str) -> None:
    print(f"\n\033[1m== {title}\033[0m", flush=True)


def _show(text: str) -> None:
    print(textwrap.indent(text.rstrip(), "   "), flush=True)


def _forged_token(issuer: DevIssuer, subject: str, claims: dict[str, Any]) -> str:
    """A token that claims the same issuer and kid but is signed by a stranger's key."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    real = decode_jwt_unverified(issuer.mint(subject, claims=claims))
    return jwt.encode(real, stranger, algorithm="RS256", headers={"kid": issuer.kid})


def run_demo(*, state_dir: str | None = None, keep: bool = False) -> int:
    directory = stack.state_dir(state_dir)
    _step("1. Start the local stack (moto, control plane, dev OIDC issuer, hermetic PostgreSQL)")
    state = stack.up(directory) | {"_state_dir": str(directory)}
    _show(f"control plane  {state['api_url']}\nOIDC issuer    {state['oidc_issuer']}\n"
          f"AWS (moto)     {state['aws_endpoint']}\n"
          f"PostgreSQL     {state['postgres']['host']}:{state['postgres']['port']} (SCRAM; password only in "
          f"Secrets Manager)")
    steps: list[Callable[[dict[str, Any]], None]] = [_pipeline_grant, _forged_token_refused]
    try:
        for step in steps:
            step(state)
    finally:
        if keep:
            _step("Local stack left running (`proctor dev down` stops it)")
        else:
            _step("Tear down")
            _show("stopped: " + ", ".join(stack.down(directory)))
    return 0


def _pipeline_grant(state: dict[str, Any]) -> None:
    issuer = DevIssuer(Path(state["oidc_key"]), state["oidc_issuer"])
    _step("2. A CI pipeline (acme/app, run 42, triggered by bob) mints its workload token")
    token = issuer.mint("repo:acme/app:ref:refs/heads/main",
                        claims={"repository": "acme/app", "run_id": "42", "actor": "bob",
                                "workflow": "deploy", "ref": "refs/heads/main"})
    _show("$ proctor dev token --sub repo:acme/app:ref:refs/heads/main --claim repository=acme/app "
          "--claim run_id=42 --claim actor=bob")
    _show(token[:60] + "…")
    _step("3. It asks the control plane for a grant to demo-pg")
    _show("$ proctor grant --target demo-pg --reason 'deploy 1.4.2' --format env")
    env = os.environ | {"PROCTOR_TOKEN": token, "PROCTOR_STATE_DIR": state["_state_dir"]}
    out = subprocess.run([sys.executable, "-m", "proctor.cli", "grant", "--target", "demo-pg",
                          "--reason", "deploy 1.4.2", "--format", "json"],
                         capture_output=True, text=True, env=env, check=True).stdout
    grant = json.loads(out)
    claims = grant["claims"]
    _show(f"grant {grant['grant_id']} (ES256, signed by the KMS key), expires in "
          f"{grant['expires_at'] - claims['iat']}s; decoded claims:")
    _show(json.dumps({k: claims[k] for k in ("sub", "idn", "tgt", "role", "pol", "rsn", "exp")}, indent=2))
    state["_grant"] = grant


def _forged_token_refused(state: dict[str, Any]) -> None:
    issuer = DevIssuer(Path(state["oidc_key"]), state["oidc_issuer"])
    _step("4. A forged token (same issuer and kid, a stranger's key) is refused and recorded")
    forged = _forged_token(issuer, "mallory@example.com", {"groups": ["admins"]})
    try:
        ApiClient(state["api_url"], forged).post("/v1/grants", {"target": "demo-pg"})
    except ApiError as exc:
        _show(f"HTTP {exc.status}: {exc.detail}")
    else:
        raise RuntimeError("a forged token was accepted")
