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
    steps: list[Callable[[dict[str, Any]], None]] = [_pipeline_grant, _forged_token_refused, _psql_through_gateway,
                                                     _evidence]
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


def _psql_through_gateway(state: dict[str, Any]) -> None:
    grant = state["_grant"]
    conn = grant["connection"]
    gateway = state["gateway"]
    _step("5. The pipeline runs its statements with psql through the gateway (TLS verified; the grant is the "
          "password; the gateway injects app_rw's real password; the policy's guardrails stop the DROP)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGHOST": conn["host"], "PGPORT": str(conn["port"]), "PGUSER": conn["user"], "PGPASSWORD": grant["token"],
        "PGDATABASE": conn["database"], "PGSSLMODE": "verify-full", "PGSSLROOTCERT": gateway["ca_file"]}
    script = ("SELECT current_user AS backend_role, count(*) AS customers FROM customers;\n"
              "INSERT INTO orders (customer_id, amount, status) VALUES (1, 99.50, 'deployed');\n"
              "UPDATE orders SET status = 'shipped' WHERE id = 1;\n"
              "DROP TABLE customers;\n"
              "SELECT 1/0;\n")
    _show("$ eval \"$(proctor grant --target demo-pg --format env)\"   # PGHOST, PGPORT, PGUSER, PGPASSWORD, ...")
    _show("$ psql <<'SQL'\n" + script + "SQL")
    out = subprocess.run(["psql", "-X", "-e"], input=script, capture_output=True, text=True, env=env, check=False)
    _show(out.stdout + out.stderr)


def _evidence(state: dict[str, Any]) -> None:
    _step("6. The auditor's view: every statement, tied to the pipeline run and who triggered it "
          "(OCSF events in S3 under Object Lock, queried with Athena SQL — here on DuckDB)")
    sql = ("SELECT time_iso, actor_subject, pipeline_repository AS repo, pipeline_run_id AS run, "
           "pipeline_actor AS triggered_by, backend_user, activity_name AS activity, statement, command_tag, rows, "
           "sqlstate, rule FROM proctor_evidence.events WHERE class_uid = 6005 "
           "AND activity_name IN ('query', 'block') AND pipeline_run_id = '42' ORDER BY session_id, seq")
    _show(f'$ proctor evidence query "{sql}"')
    result = _wait_for_rows(state, sql, at_least=5)
    from proctor.evidence_query import format_result

    _show(format_result(result, "table"))
    _step("7. The session's recording, replayed from its hash-chained chunks")
    session = _wait_for_rows(state, "SELECT session_id FROM sessions WHERE pipeline_run_id = '42'", at_least=1)
    session_id = session.rows[0][0]
    out = subprocess.run([sys.executable, "-m", "proctor.cli", "evidence", "replay", session_id], capture_output=True,
                         text=True, env=os.environ | {"PROCTOR_STATE_DIR": state["_state_dir"]}, check=True)
    _show(f"$ proctor evidence replay {session_id}\n" + out.stdout)


def _wait_for_rows(state: dict[str, Any], sql: str, *, at_least: int, timeout: float = 30.0) -> Any:
    """Evidence ships asynchronously (the spool first, then S3 within seconds)."""
    import time

    from proctor.dev.aws import client
    from proctor.evidence_query import run_local_query

    deadline = time.monotonic() + timeout
    while True:
        result = run_local_query(sql, client(state["aws_endpoint"], "s3"), bucket=state["evidence_bucket"])
        if len(result.rows) >= at_least or time.monotonic() > deadline:
            return result
        time.sleep(0.5)
