"""A control plane on moto in-process, served over HTTP by the local adapter, with a dev OIDC
issuer — what the control-plane tests talk to."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
from botocore.credentials import Credentials

from control_plane import api, gateway_api, notifier
from control_plane.contract import decode_jsonl_gz
from control_plane.runtime import Services
from control_plane.settings import Settings
from data_plane.core.control_plane_client import ControlPlaneClient
from proctor.api_client import ApiClient, ApiError
from proctor.dev import aws, seed
from proctor.dev.adapter import ApiAdapter, IamKey, Route
from proctor.dev.adapter import serve as serve_adapter
from proctor.dev.mailbox import Email, parse_messages
from proctor.dev.notifier_worker import NotifierWorker
from proctor.dev.oidc_issuer import DevIssuer, generate_key
from proctor.dev.oidc_issuer import serve as serve_issuer
from proctor.dev.stack import GATEWAY_ROLE_ARN

GATEWAY_KEY = IamKey("AKIATESTGATEWAY00001", "test-gateway-secret-key", GATEWAY_ROLE_ARN)
OTHER_KEY = IamKey("AKIATESTOTHERROLE001", "test-other-secret-key", "arn:aws:iam::123456789012:role/not-a-gateway")
RW_PASSWORD = "rw-Secret-Pass-1234567890"
RO_PASSWORD = "ro-Secret-Pass-0987654321"
# moto runs Step Functions executions only when asked to.
MOTO_CONFIG = {"stepfunctions": {"execute_state_machine": True}}


def http_server() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True
    return server


@dataclass
class World:
    svc: Services
    issuer: DevIssuer
    api_url: str
    servers: list[ThreadingHTTPServer] = field(default_factory=list)
    notifier: NotifierWorker | None = None

    def token(self, sub: str = "alice@example.com", groups: tuple[str, ...] = (), **claims: Any) -> str:
        return self.issuer.mint(sub, groups=groups, claims=claims)

    def pipeline_token(self, repository: str = "acme/app", run_id: str = "42", actor: str = "bob") -> str:
        return self.token("repo:acme/app:ref:refs/heads/main", repository=repository, run_id=run_id, actor=actor,
                          workflow="deploy", ref="refs/heads/main")

    def admin_token(self) -> str:
        return self.token("root@example.com", groups=("admins",))

    def call(self, method: str, path: str, token: str | None = None, body: Any | None = None) -> tuple[int, Any]:
        try:
            return ApiClient(self.api_url, token).request(method, path, body)
        except ApiError as exc:
            return exc.status, exc.detail

    def gateway_client(self, key: IamKey = GATEWAY_KEY) -> ControlPlaneClient:
        return ControlPlaneClient(self.api_url, region=aws.REGION,
                                  credentials=Credentials(key.access_key, key.secret_key))

    def evidence_rows(self) -> list[dict[str, Any]]:
        s3 = self.svc.s3
        rows: list[dict[str, Any]] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=aws.EVIDENCE_BUCKET, Prefix="events/"):
            for obj in page.get("Contents", []):
                rows += decode_jsonl_gz(s3.get_object(Bucket=aws.EVIDENCE_BUCKET, Key=obj["Key"])["Body"].read())
        return rows

    def evidence_bytes(self) -> bytes:
        return json.dumps(self.evidence_rows()).encode()

    def mailbox(self) -> list[Email]:
        """What moto's SES accepted (in-process: straight from its backend)."""
        from moto.ses.models import ses_backends

        sent = ses_backends[aws.ACCOUNT][aws.REGION].sent_messages
        return parse_messages([{"id": m.id, "source": m.source, "destinations": m.destinations,
                                "subject": m.subject, "body": m.body} for m in sent])

    def wait_for_mail(self, to: str, approval_id: str, timeout: float = 10.0) -> Email:
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.mailbox() if to in m.to and approval_id in m.subject]
            if found:
                return found[-1]
            if time.monotonic() > deadline:
                raise AssertionError(f"no email to {to} about {approval_id}: {self.mailbox()}")
            time.sleep(0.05)

    def close(self) -> None:
        if self.notifier is not None:
            self.notifier.stop()
        for server in self.servers:
            server.shutdown()
            server.server_close()


def build_world(tmp_path: Path) -> World:
    """Call inside `mock_aws(config=MOTO_CONFIG)` (Step Functions executes state machines)."""
    resources = aws.create_resources(None)
    api_server = http_server()
    api_url = f"http://127.0.0.1:{api_server.server_address[1]}"
    settings = Settings(
        config_table=aws.CONFIG_TABLE, state_table=aws.STATE_TABLE, evidence_bucket=aws.EVIDENCE_BUCKET,
        grant_key_id=aws.GRANT_KEY_ALIAS, region=aws.REGION, admin_groups=("admins",),
        approver_groups=("approvers",), gateway_principals=(GATEWAY_ROLE_ARN,),
        approval_state_machine_arn=resources.approval_state_machine_arn,
        approval_link_key_secret=resources.link_key_secret, public_base_url=api_url,
        approval_email_sender=resources.email_sender,
    )
    session = boto3.Session(region_name=aws.REGION)
    svc = Services.from_settings(settings, session=session)

    key_path = tmp_path / "oidc-key.pem"
    generate_key(key_path)
    oidc_server = http_server()
    issuer = DevIssuer(key_path, f"http://127.0.0.1:{oidc_server.server_address[1]}")
    serve_issuer(issuer, oidc_server)

    routes = [
        Route("/v1", api.lambda_handler, "proctor-api", iam=False),
        Route("/v1/credentials", gateway_api.lambda_handler, "proctor-gateway-api", iam=True),
        Route("/v1/gateway", gateway_api.lambda_handler, "proctor-gateway-api", iam=True),
    ]
    keys = {GATEWAY_KEY.access_key: GATEWAY_KEY, OTHER_KEY.access_key: OTHER_KEY}
    serve_adapter(ApiAdapter(routes, keys), api_server)

    for role, password in ((seed.ROLE_RW, RW_PASSWORD), (seed.ROLE_RO, RO_PASSWORD)):
        aws.put_secret(None, seed.demo_secret_name(role), {"username": role, "password": password})
    seed.seed_config(svc.config, issuer_url=issuer.issuer, pg_host="127.0.0.1", pg_port=5432,
                     gateway_host="127.0.0.1", gateway_port=6432, region=aws.REGION)
    worker = NotifierWorker(session.client("sqs"), resources.notifier_queue_url, notifier.lambda_handler,
                            region=aws.REGION, wait_seconds=0).start()
    return World(svc=svc, issuer=issuer, api_url=api_url, servers=[oidc_server, api_server], notifier=worker)
