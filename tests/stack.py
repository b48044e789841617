"""The local stack (`proctor dev up`, gateway included) as the integration tests use it."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3

from control_plane.contract import GrantClaims, Identity
from control_plane.signing import GrantSigner
from proctor.api_client import ApiClient
from proctor.dev import aws
from proctor.dev.gateway import spawn_gateway
from proctor.dev.oidc_issuer import DevIssuer
from proctor.dev.postgres import free_port
from proctor.evidence_query import QueryResult, run_local_query


@dataclass
class Stack:
    directory: Path
    state: dict[str, Any]

    @property
    def issuer(self) -> DevIssuer:
        return DevIssuer(Path(self.state["oidc_key"]), self.state["oidc_issuer"])

    def client(self, service: str) -> Any:
        return boto3.client(service, endpoint_url=self.state["aws_endpoint"], region_name=aws.REGION,
                            aws_access_key_id="local", aws_secret_access_key="local")

    def pipeline_token(self, run_id: str = "42", actor: str = "bob", repository: str = "acme/app") -> str:
        return self.issuer.mint(f"repo:{repository}:ref:refs/heads/main",
                                claims={"repository": repository, "run_id": run_id, "actor": actor})

    def grant(self, token: str | None = None, *, target: str = "demo-pg", reason: str = "test") -> dict[str, Any]:
        status, grant = ApiClient(self.state["api_url"], token or self.pipeline_token()).post(
            "/v1/grants", {"target": target, "reason": reason})
        assert status == 201, grant
        return grant

    def signed_grant(self, **overrides: Any) -> str:
        """A grant signed by the control plane's KMS key with chosen claims (e.g. a short expiry)."""
        now = int(time.time())
        values: dict[str, Any] = dict(
            grant_id=f"gtest{now}", identity=Identity(self.state["oidc_issuer"], "ci", (),
                                                      {"repository": "acme/app", "run_id": "signed"}),
            target="demo-pg", target_kind="postgres", backend_role="app_rw", database="app",
            policy_name="pipeline-acme-app", policy_version=1, issued_at=now, expires_at=now + 600)
        values.update(overrides)
        signer = GrantSigner(self.client("kms"), aws.GRANT_KEY_ALIAS)
        return signer.sign(GrantClaims(**values).to_jwt_claims())

    @property
    def gateway(self) -> dict[str, Any]:
        return self.state["gateway"]

    def conninfo(self, grant: dict[str, Any] | str, *, port: int | None = None, **extra: str) -> dict[str, Any]:
        token = grant if isinstance(grant, str) else grant["token"]
        user = "signed" if isinstance(grant, str) else grant["grant_id"]
        return {"host": "127.0.0.1", "port": port or self.gateway["port"], "user": user, "password": token,
                "dbname": "app", "sslmode": "verify-full", "sslrootcert": self.gateway["ca_file"]} | extra

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.gateway["ca_file"])

    def backend_secret(self, role: str = "app_rw") -> dict[str, Any]:
        # The stage named explicitly: moto's default lookup ignores stage moves (real AWS doesn't).
        value = self.client("secretsmanager").get_secret_value(SecretId=f"proctor/demo-pg/{role}",
                                                               VersionStage="AWSCURRENT")
        return json.loads(value["SecretString"])

    def query(self, sql: str) -> QueryResult:
        return run_local_query(sql, self.client("s3"), bucket=self.state["evidence_bucket"])

    def wait_for(self, sql: str, predicate: Any, timeout: float = 20.0) -> QueryResult:
        """Evidence ships asynchronously: poll until the query's answer satisfies the predicate."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(sql)
            if predicate(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.5)

    def extra_gateway(self, name: str, **env: str) -> tuple[subprocess.Popen[bytes], dict[str, Any], int]:
        """A second gateway process on its own port and spool, same control plane and buckets."""
        directory = self.directory / name
        directory.mkdir(exist_ok=True)
        port = free_port()
        proc, info = spawn_gateway(directory, self.state, pg_port=port, extra_env=env)
        return proc, info, port


def stop_process_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    import os

    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
