"""`proctor`: the user-facing command line."""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from proctor.api_client import ApiClient, ApiError


class CliError(Exception):
    """A user-facing failure: printed without a traceback, exit status 1 (or the given code)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _dev_state(args: argparse.Namespace) -> dict[str, Any] | None:
    from proctor.dev.stack import read_state, state_dir

    return read_state(state_dir(getattr(args, "state_dir", None)))


def api_url(args: argparse.Namespace) -> str:
    url = getattr(args, "api", None) or os.environ.get("PROCTOR_API")
    if url:
        return url
    state = _dev_state(args)
    if state and state.get("api_url"):
        return str(state["api_url"])
    raise CliError("no control plane: set PROCTOR_API (or --api), or start the local stack with `proctor dev up`")


def oidc_token(args: argparse.Namespace) -> str:
    token = getattr(args, "token", None) or os.environ.get("PROCTOR_TOKEN")
    if not token:
        raise CliError("no identity token: set PROCTOR_TOKEN or pass --token")
    return token.strip()


# ------------------------------------------------------------------------------------------------
# dev
# ------------------------------------------------------------------------------------------------


def cmd_dev_up(args: argparse.Namespace) -> int:
    from proctor.dev.stack import state_dir, up

    try:
        state = up(state_dir(args.state_dir), with_gateway=not args.no_gateway)
    except RuntimeError as exc:
        raise CliError(str(exc)) from None
    print(f"local stack up: api {state['api_url']}  oidc {state['oidc_issuer']}  aws {state['aws_endpoint']}")
    pg = state.get("postgres") or {}
    print(f"demo target demo-pg: postgres {pg.get('host')}:{pg.get('port')} via gateway "
          f"{state['gateway']['host']}:{state['gateway']['port']}")
    return 0


def cmd_dev_down(args: argparse.Namespace) -> int:
    from proctor.dev.stack import down, state_dir

    stopped = down(state_dir(args.state_dir))
    print("local stack down" + (f" (stopped {', '.join(stopped)})" if stopped else " (was not running)"))
    return 0


def cmd_dev_status(args: argparse.Namespace) -> int:
    from proctor.dev.stack import state_dir, status

    info = status(state_dir(args.state_dir))
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0 if info.get("status") == "ready" and all(info.get("alive", {}).values()) else 3


def cmd_dev_token(args: argparse.Namespace) -> int:
    from proctor.dev.oidc_issuer import DevIssuer

    state = _dev_state(args)
    if not state or "oidc_key" not in state:
        raise CliError("the local stack is not running: `proctor dev up`")
    claims: dict[str, Any] = {}
    for item in args.claim or []:
        if "=" not in item:
            raise CliError(f"--claim takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        claims[key] = value
    groups = tuple(g for spec in args.groups or [] for g in spec.split(",") if g)
    issuer = DevIssuer(Path(state["oidc_key"]), state["oidc_issuer"])
    print(issuer.mint(args.sub, groups=groups, claims=claims, ttl=args.ttl))
    return 0


# ------------------------------------------------------------------------------------------------
# grants
# ------------------------------------------------------------------------------------------------


def decode_jwt_unverified(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def grant_env(grant: dict[str, Any], ca_file: str | None) -> list[tuple[str, str]]:
    conn = grant["connection"]
    pairs = [("PGHOST", conn["host"]), ("PGPORT", str(conn["port"])), ("PGUSER", conn["user"]),
             ("PGPASSWORD", grant["token"]), ("PGDATABASE", conn.get("database") or "")]
    if ca_file:
        pairs += [("PGSSLMODE", "verify-full"), ("PGSSLROOTCERT", ca_file)]
    else:
        pairs.append(("PGSSLMODE", conn.get("sslmode") or "require"))
    return pairs


def cmd_grant(args: argparse.Namespace) -> int:
    client = ApiClient(api_url(args), oidc_token(args))
    body: dict[str, Any] = {"target": args.target, "reason": args.reason or ""}
    if args.duration:
        body["duration_seconds"] = args.duration
    try:
        status, grant = client.post("/v1/grants", body)
    except ApiError as exc:
        raise CliError(f"grant refused ({exc.status}): {exc.detail}") from None
    if status == 202:
        request = grant["access_request"]
        print(f"access to {args.target} needs approval: access request {request['id']} is pending "
              f"(approval {request.get('approval_id')}, approvers: {', '.join(request.get('approver_groups') or [])})",
              file=sys.stderr)
        if not args.wait:
            if args.format == "json":
                print(json.dumps(grant, indent=2))
            return 2
        grant = wait_for_access_grant(client, request, timeout=args.timeout)
    print_grant(args, grant)
    return 0


def wait_for_access_grant(client: ApiClient, request: dict[str, Any], *, timeout: float,
                          poll: float = 1.0, max_poll: float = 10.0) -> dict[str, Any]:
    """Poll the access request (backing off) until it is decided, then fetch its grant."""
    path = f"/v1/access-requests/{request['id']}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            current = client.get(path)
        except ApiError as exc:
            raise CliError(f"access request {request['id']}: {exc.status}: {exc.detail}") from None
        if current["status"] == "approved":
            break
        if current["status"] != "pending":
            by = f" by {current['decided_by']}" if current.get("decided_by") else ""
            comment = f": {current['comment']}" if current.get("comment") else ""
            raise CliError(f"access request {request['id']} was {current['status']}{by}{comment}")
        if time.monotonic() + poll > deadline:
            raise CliError(f"access request {request['id']} is still pending after {timeout:.0f} s", code=2)
        time.sleep(poll)
        poll = min(poll * 1.5, max_poll)
    print(f"access request {request['id']} approved by {current.get('decided_by')}", file=sys.stderr)
    try:
        return client.post(f"{path}/grant", {})[1]
    except ApiError as exc:
        raise CliError(f"grant refused ({exc.status}): {exc.detail}") from None


def print_grant(args: argparse.Namespace, grant: dict[str, Any]) -> None:
    if args.format == "token":
        print(grant["token"])
    elif args.format == "json":
        print(json.dumps(grant | {"claims": decode_jwt_unverified(grant["token"])}, indent=2))
    else:
        state = _dev_state(args)
        ca_file = args.ca_file or (state or {}).get("gateway", {}).get("ca_file")
        for key, value in grant_env(grant, ca_file):
            print(f"export {key}={shlex.quote(value)}")


def cmd_whoami(args: argparse.Namespace) -> int:
    try:
        print(json.dumps(ApiClient(api_url(args), oidc_token(args)).get("/v1/whoami"), indent=2))
    except ApiError as exc:
        raise CliError(f"refused ({exc.status}): {exc.detail}") from None
    return 0


# ------------------------------------------------------------------------------------------------
# approvals
# ------------------------------------------------------------------------------------------------


def _when(epoch: Any) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(int(epoch), UTC).strftime("%Y-%m-%d %H:%M:%SZ") if epoch else ""


def _requester(approval: dict[str, Any]) -> str:
    who = approval.get("requester") or {}
    pipeline = who.get("pipeline") or {}
    if pipeline:
        return f"{pipeline.get('repository')}#{pipeline.get('run_id')} ({pipeline.get('actor') or '?'})"
    return str(who.get("email") or who.get("subject") or "")


def format_approvals(approvals: list[dict[str, Any]]) -> str:
    from proctor.evidence_query import QueryResult, format_result

    columns = ["approval_id", "kind", "status", "target", "requester", "rule", "what", "approvals", "expires_at"]
    rows = []
    for a in approvals:
        what = a.get("statement") or (a.get("reason") and f"access: {a['reason']}") or "access"
        what = " ".join(str(what).split())
        approved = len([d for d in a.get("decisions") or [] if d["decision"] == "approve"])
        rows.append((a["approval_id"], a["kind"], a["status"], a.get("target"), _requester(a), a.get("rule") or "",
                     what[:60] + ("…" if len(what) > 60 else ""), f"{approved}/{a.get('approvals_required')}",
                     _when(a.get("expires_at"))))
    return format_result(QueryResult(columns, rows), "table")


def cmd_approvals_list(args: argparse.Namespace) -> int:
    client = ApiClient(api_url(args), oidc_token(args))
    try:
        approvals = client.get(f"/v1/approvals?status={args.status}")["approvals"]
    except ApiError as exc:
        raise CliError(f"refused ({exc.status}): {exc.detail}") from None
    if args.format == "json":
        print(json.dumps(approvals, indent=2))
    elif approvals:
        print(format_approvals(approvals), end="")
    else:
        print(f"no {args.status} approvals" + (" await you" if args.status == "pending" else ""), file=sys.stderr)
    return 0


def cmd_approvals_show(args: argparse.Namespace) -> int:
    try:
        print(json.dumps(ApiClient(api_url(args), oidc_token(args)).get(f"/v1/approvals/{args.approval_id}"),
                         indent=2))
    except ApiError as exc:
        raise CliError(f"refused ({exc.status}): {exc.detail}") from None
    return 0


def cmd_approvals_decide(args: argparse.Namespace) -> int:
    client = ApiClient(api_url(args), oidc_token(args))
    try:
        _, approval = client.post(f"/v1/approvals/{args.approval_id}/decision",
                                  {"decision": args.decision, "comment": args.comment or ""})
    except ApiError as exc:
        raise CliError(f"decision refused ({exc.status}): {exc.detail}") from None
    verb = "approved" if args.decision == "approve" else "denied"
    approved = len([d for d in approval["decisions"] if d["decision"] == "approve"])
    print(f"you {verb} {approval['approval_id']}; it is now {approval['status']} "
          f"({approved} of {approval['approvals_required']} approvals)")
    return 0


def cmd_dev_mailbox(args: argparse.Namespace) -> int:
    from proctor.dev.mailbox import read_mailbox

    state = _dev_state(args)
    if not state or "aws_endpoint" not in state:
        raise CliError("the local stack is not running: `proctor dev up`")
    emails = [m for m in read_mailbox(state["aws_endpoint"]) if not args.to or args.to.lower() in
              (t.lower() for t in m.to)]
    if args.format == "json":
        print(json.dumps([m.to_dict() for m in emails], indent=2))
        return 0
    if not emails:
        print("the mailbox is empty", file=sys.stderr)
    for m in emails:
        print(f"to {', '.join(m.to)}  from {m.sender}\n  subject: {m.subject}")
        for link in m.links:
            print(f"  link: {link}")
    return 0


# ------------------------------------------------------------------------------------------------
# evidence
# ------------------------------------------------------------------------------------------------


def evidence_source(args: argparse.Namespace) -> dict[str, Any]:
    """Where the evidence lives: Athena in AWS (PROCTOR_ATHENA_WORKGROUP set), else the local stack."""
    workgroup = os.environ.get("PROCTOR_ATHENA_WORKGROUP")
    if workgroup:
        return {"mode": "athena", "workgroup": workgroup}
    state = _dev_state(args)
    if not state:
        raise CliError("no evidence source: set PROCTOR_ATHENA_WORKGROUP (AWS) or start `proctor dev up`")
    return {"mode": "local", "endpoint": state["aws_endpoint"], "bucket": state["evidence_bucket"],
            "recordings_bucket": state["recordings_bucket"], "region": state["region"]}


def _s3_for(source: dict[str, Any]) -> Any:
    import boto3

    if source["mode"] == "athena":
        return boto3.client("s3")
    from proctor.dev.aws import client

    return client(source["endpoint"], "s3")


def run_evidence_sql(args: argparse.Namespace, sql: str) -> Any:
    import boto3

    from proctor.evidence_query import EvidenceQueryError, run_athena_query, run_local_query

    source = evidence_source(args)
    try:
        if source["mode"] == "athena":
            return run_athena_query(sql, boto3.client("athena"), workgroup=source["workgroup"])
        return run_local_query(sql, _s3_for(source), bucket=source["bucket"])
    except EvidenceQueryError as exc:
        raise CliError(f"query failed: {exc}") from None


def cmd_evidence_query(args: argparse.Namespace) -> int:
    from proctor.evidence_query import format_result

    print(format_result(run_evidence_sql(args, args.sql), args.format), end="")
    return 0


def cmd_evidence_sessions(args: argparse.Namespace) -> int:
    from proctor.evidence_query import format_result

    where = []
    if args.target:
        where.append(f"target_name = '{_sql_literal(args.target)}'")
    if args.actor:
        where.append(f"actor_subject = '{_sql_literal(args.actor)}'")
    columns = ("session_id, started_at, ended_at, actor_subject, pipeline_repository, pipeline_run_id, "
               "pipeline_actor, target_name, backend_user, statements, bytes_in, bytes_out")
    condition = (" WHERE " + " AND ".join(where)) if where else ""
    # Read-only evidence SQL; the only user values are escaped literals.
    sql = f"SELECT {columns} FROM sessions{condition} ORDER BY started_at DESC LIMIT {int(args.limit)}"  # noqa: S608
    print(format_result(run_evidence_sql(args, sql), args.format), end="")
    return 0


def _sql_literal(value: str) -> str:
    return value.replace("'", "''")


def cmd_evidence_replay(args: argparse.Namespace) -> int:
    from proctor.replay import ReplayError, load_recording, postgres_timeline

    source = evidence_source(args)
    bucket = source.get("recordings_bucket") or os.environ.get("PROCTOR_RECORDINGS_BUCKET")
    if not bucket:
        raise CliError("no recordings bucket: set PROCTOR_RECORDINGS_BUCKET")
    try:
        recording = load_recording(_s3_for(source), bucket, args.session_id)
    except ReplayError as exc:
        raise CliError(str(exc)) from None
    for line in postgres_timeline(recording):
        print(line)
    print(f"-- {len(recording.records)} records in {recording.chunks} chunk(s); hash chain verified; "
          f"last hash {recording.last_hash}")
    return 0


def cmd_evidence_reprocess(args: argparse.Namespace) -> int:
    from data_plane.core.sealed import UnsealError
    from proctor.replay import ReplayError, load_recording
    from proctor.reprocess import ReprocessError, format_report, load_rules, reprocess

    source = evidence_source(args)
    bucket = source.get("recordings_bucket") or os.environ.get("PROCTOR_RECORDINGS_BUCKET")
    if not bucket:
        raise CliError("no recordings bucket: set PROCTOR_RECORDINGS_BUCKET")
    try:
        rules = load_rules(Path(args.policy))
        recording = load_recording(_s3_for(source), bucket, args.session_id)
        report = reprocess(args.session_id, recording.records, rules, _kms_for(source))
    except (ReplayError, ReprocessError, UnsealError) as exc:
        raise CliError(str(exc)) from None
    print(format_report(report))
    return 0


def _kms_for(source: dict[str, Any]) -> Any:
    """KMS for opening sealed originals: in AWS the caller's credentials (the break-glass role)."""
    import boto3

    if source["mode"] == "athena":
        return boto3.client("kms")
    from proctor.dev.aws import client

    return client(source["endpoint"], "kms")


def cmd_gateway_run(args: argparse.Namespace) -> int:
    from data_plane.__main__ import main as gateway_main

    gateway_main(["--config", args.config] if args.config else [])
    return 0


# ------------------------------------------------------------------------------------------------
# demo
# ------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from proctor.demo import run_demo

    return run_demo(state_dir=args.state_dir, keep=args.keep)


# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proctor", description="Proctor access gateway")
    parser.add_argument("--api", help="control-plane URL (default: PROCTOR_API or the local stack)")
    parser.add_argument("--state-dir", help="local stack state directory (default: .proctor/dev)")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="the local stack").add_subparsers(dest="dev_command", required=True)
    p = dev.add_parser("up", help="start the local stack")
    p.add_argument("--no-gateway", action="store_true", help="control plane and database only")
    p.set_defaults(func=cmd_dev_up)
    dev.add_parser("down", help="stop every process the local stack started").set_defaults(func=cmd_dev_down)
    dev.add_parser("status", help="show the local stack").set_defaults(func=cmd_dev_status)
    p = dev.add_parser("token", help="mint a dev OIDC token")
    p.add_argument("--sub", required=True)
    p.add_argument("--groups", action="append", help="comma-separated groups (repeatable)")
    p.add_argument("--claim", action="append", help="KEY=VALUE claim, e.g. repository=acme/app (repeatable)")
    p.add_argument("--ttl", type=int, default=3600)
    p.set_defaults(func=cmd_dev_token)
    p = dev.add_parser("mailbox", help="the emails the local SES accepted, with their approval links")
    p.add_argument("--to", help="only emails to this address")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_dev_mailbox)

    p = sub.add_parser("grant", help="obtain a grant for a target")
    p.add_argument("--target", required=True)
    p.add_argument("--reason", default="")
    p.add_argument("--duration", type=int, help="seconds (bounded by policy)")
    p.add_argument("--format", choices=["token", "env", "json"], default="env")
    p.add_argument("--token", help="OIDC token (default: PROCTOR_TOKEN)")
    p.add_argument("--ca-file", help="CA bundle for verify-full TLS to the gateway")
    p.add_argument("--wait", action="store_true", help="if access needs approval, wait for it, then fetch the grant")
    p.add_argument("--timeout", type=float, default=900, help="seconds --wait waits (default 900)")
    p.set_defaults(func=cmd_grant)

    approvals = sub.add_parser("approvals", help="decide approvals").add_subparsers(dest="approvals_command",
                                                                                  required=True)
    p = approvals.add_parser("list", help="approvals that await you (or in another status)")
    p.add_argument("--status", choices=["pending", "approved", "denied", "expired"], default="pending")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--token", help="OIDC token (default: PROCTOR_TOKEN)")
    p.set_defaults(func=cmd_approvals_list)
    p = approvals.add_parser("show", help="one approval in full")
    p.add_argument("approval_id")
    p.add_argument("--token", help="OIDC token (default: PROCTOR_TOKEN)")
    p.set_defaults(func=cmd_approvals_show)
    for decision, verb in (("approve", "approve"), ("deny", "deny")):
        p = approvals.add_parser(verb, help=f"{verb} an approval")
        p.add_argument("approval_id")
        p.add_argument("--comment", default="", help="recorded with your decision")
        p.add_argument("--token", help="OIDC token (default: PROCTOR_TOKEN)")
        p.set_defaults(func=cmd_approvals_decide, decision=decision)

    p = sub.add_parser("whoami", help="the identity the control plane sees")
    p.add_argument("--token")
    p.set_defaults(func=cmd_whoami)

    evidence = sub.add_parser("evidence", help="query the evidence").add_subparsers(dest="evidence_command",
                                                                                  required=True)
    p = evidence.add_parser("query", help="run Athena SQL (locally on DuckDB)")
    p.add_argument("sql")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_evidence_query)

    p = evidence.add_parser("sessions", help="recent sessions")
    p.add_argument("--target")
    p.add_argument("--actor")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.set_defaults(func=cmd_evidence_sessions)
    p = evidence.add_parser("replay", help="a session's timeline from its recording (chain verified)")
    p.add_argument("session_id")
    p.set_defaults(func=cmd_evidence_replay)
    p = evidence.add_parser("reprocess", help="what newer masking rules would have masked in an old session "
                                              "(opens its sealed originals in memory: needs the break-glass role)")
    p.add_argument("session_id")
    p.add_argument("--policy", required=True, help="a policy JSON file with `masking` rules, or a list of rules")
    p.set_defaults(func=cmd_evidence_reprocess)

    gateway = sub.add_parser("gateway", help="the data plane").add_subparsers(dest="gateway_command", required=True)
    p = gateway.add_parser("run", help="run the gateway (settings from PROCTOR_* variables or --config)")
    p.add_argument("--config", help="JSON settings file")
    p.set_defaults(func=cmd_gateway_run)

    p = sub.add_parser("demo", help="run the demo on the local stack")
    p.add_argument("--keep", action="store_true", help="leave the local stack running")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
        print(f"proctor: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
