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
                                                     _held_delete_approved_by_link, _masked_read, _evidence]
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


def _pg_env(state: dict[str, Any]) -> dict[str, str]:
    grant = state["_grant"]
    conn = grant["connection"]
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")} | {
        "PGHOST": conn["host"], "PGPORT": str(conn["port"]), "PGUSER": conn["user"], "PGPASSWORD": grant["token"],
        "PGDATABASE": conn["database"], "PGSSLMODE": "verify-full", "PGSSLROOTCERT": state["gateway"]["ca_file"]}


def _psql_through_gateway(state: dict[str, Any]) -> None:
    _step("5. The pipeline runs its statements with psql through the gateway (TLS verified; the grant is the "
          "password; the gateway injects app_rw's real password; the policy's guardrails stop the DROP)")
    script = ("SELECT current_user AS backend_role, count(*) AS customers FROM customers;\n"
              "INSERT INTO orders (customer_id, amount, status) VALUES (1, 99.50, 'deployed');\n"
              "DROP TABLE customers;\n"
              "SELECT 1/0;\n")
    _show("$ eval \"$(proctor grant --target demo-pg --format env)\"   # PGHOST, PGPORT, PGUSER, PGPASSWORD, ...")
    _show("$ psql <<'SQL'\n" + script + "SQL")
    out = subprocess.run(["psql", "-X", "-e"], input=script, capture_output=True, text=True, env=_pg_env(state),
                         check=False)
    _show(out.stdout + out.stderr)


def _held_delete_approved_by_link(state: dict[str, Any]) -> None:
    import re
    import time
    import urllib.parse
    import urllib.request

    from proctor.dev.mailbox import read_mailbox

    _step("6. The pipeline deletes an order: policy holds DELETE for an approver (the statement waits at the gateway)")
    sql = "DELETE FROM orders WHERE status = 'deployed';"
    _show(f"$ psql -c \"{sql}\"")
    psql = subprocess.Popen(["psql", "-X", "-c", sql], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_pg_env(state))
    assert psql.stderr is not None
    notice = psql.stderr.readline()
    _show(notice)
    found = re.search(r"held for approval (\S+)", notice)
    if not found:
        psql.kill()
        raise RuntimeError(f"the DELETE was not held for approval: {notice!r}")
    approval_id = found.group(1)

    _step("7. The approver's mailbox (SES): a one-time, expiring link — never the workflow's task token")
    _show("$ proctor dev mailbox")
    link, deadline = None, time.monotonic() + 30
    while link is None and time.monotonic() < deadline:
        for email in read_mailbox(state["aws_endpoint"]):
            if approval_id in " ".join(email.links) and "ann.approver@example.com" in email.to:
                _show(f"to {', '.join(email.to)}: {email.subject}\n  {email.links[0]}")
                link = next(u for u in email.links if approval_id in u)
        time.sleep(0.3)
    if link is None:
        raise RuntimeError("no approval email arrived")

    _step("8. The approver opens the link: a confirmation page (who asks, which run, the statement, the rule); "
          "Approve is a POST with a one-time CSRF token")
    page = urllib.request.urlopen(link).read().decode()  # noqa: S310 - the local stack's own URL
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"(?s)<(style|script)[^>]*>.*?</\1>", "", page)))
    _show(text.strip()[:600])
    form = dict(re.findall(r'type="hidden" name="(\w+)" value="([^"]*)"', page))
    form.update(decision="approve", comment="orders marked deployed may go")
    urllib.request.urlopen(urllib.request.Request(link, data=urllib.parse.urlencode(form).encode(),  # noqa: S310
                                                  method="POST"))
    _show("approved by ann.approver@example.com")
    out, err = psql.communicate(timeout=60)
    _step("9. The held statement runs; psql, which waited, prints its result")
    _show(out + err.replace(notice, ""))


MASKED_QUERY = ("SELECT id, name, email, phone, card_number, ssn, upper(email) AS shouted "
                "FROM customers ORDER BY id LIMIT 3;")


def _masked_read(state: dict[str, Any]) -> None:
    _step("10. The same query, twice: directly on the database host (its superuser) the values are clear; "
          "an engineer through the gateway (policy engineers-read) gets them masked inline")
    pg = state["postgres"]
    _show(f'$ psql -h {pg["socket_dir"]} -U postgres -d app -c "{MASKED_QUERY}"   # on the database host')
    direct = subprocess.run(["psql", "-X", "-h", pg["socket_dir"], "-p", str(pg["port"]), "-U", "postgres", "-d", "app",
                             "-c", MASKED_QUERY], capture_output=True, text=True, check=False)
    _show(direct.stdout + direct.stderr)
    issuer = DevIssuer(Path(state["oidc_key"]), state["oidc_issuer"])
    engineer = issuer.mint("eve@example.com", groups=("engineers",))
    grant = ApiClient(state["api_url"], engineer).post("/v1/grants", {"target": "demo-pg",
                                                                      "reason": "support ticket 7"})[1]
    rules = ", ".join(f"{r['name']} ({r['method']})" for r in decode_jwt_unverified(grant["token"])["rules"]["masking"])
    _show(f"$ PROCTOR_TOKEN=<eve, group engineers> proctor grant --target demo-pg   # masking rules: {rules}")
    _show(f'$ psql -c "{MASKED_QUERY}"')
    masked = subprocess.run(["psql", "-X", "-c", MASKED_QUERY], capture_output=True, text=True,
                            env=_pg_env(state | {"_grant": grant}), check=False)
    _show(masked.stdout + masked.stderr)


def _evidence(state: dict[str, Any]) -> None:
    _step("11. The auditor's view: every statement, tied to the pipeline run and who triggered it, blocks and "
          "approvals included (OCSF events in S3 under Object Lock, queried with Athena SQL — here on DuckDB)")
    sql = ("SELECT time_iso, actor_subject, pipeline_repository AS repo, pipeline_run_id AS run, "
           "pipeline_actor AS triggered_by, backend_user, activity_name AS activity, statement, command_tag, rows, "
           "sqlstate, rule, approval_id FROM proctor_evidence.events WHERE class_uid = 6005 "
           "AND activity_name IN ('query', 'block') AND pipeline_run_id = '42' ORDER BY time")
    _show(f'$ proctor evidence query "{sql}"')
    result = _wait_for_rows(state, sql, at_least=6)
    from proctor.evidence_query import format_result

    _show(format_result(result, "table"))
    approvals = ("SELECT time_iso, approval_id, status_detail AS step, actor_subject AS who, statement, "
                 "json_extract_scalar(details, '$.comment') AS comment FROM proctor_evidence.events "
                 "WHERE activity_name = 'approval' AND approval_id IN (SELECT approval_id FROM "
                 "proctor_evidence.events WHERE pipeline_run_id = '42' AND activity_name = 'approval') ORDER BY time")
    _show(f'$ proctor evidence query "{approvals}"')
    _show(format_result(_wait_for_rows(state, approvals, at_least=4), "table"))
    masks = ("SELECT actor_subject, rule, json_extract_scalar(details, '$.target') AS masked, "
             "json_extract_scalar(details, '$.method') AS method, rows AS \"values\", statement "
             "FROM proctor_evidence.events WHERE activity_name = 'mask' AND actor_subject = 'eve@example.com' "
             "ORDER BY rule, masked")
    _show(f'$ proctor evidence query "{masks}"')
    _show(format_result(_wait_for_rows(state, masks, at_least=5), "table"))
    _step("12. The session's recording, replayed from its hash-chained chunks")
    session = _wait_for_rows(state, "SELECT session_id FROM sessions WHERE pipeline_run_id = '42' ORDER BY started_at",
                             at_least=2)
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
