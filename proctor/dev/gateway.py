"""The gateway in the local stack: a real `python -m data_plane` process with its own TLS
certificate, spool and admin port, pointed at the local control plane and moto's S3."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proctor.dev.postgres import free_port
from proctor.dev.tls import make_ca_and_server_cert


def gateway_env(directory: Path, state: Mapping[str, Any], *, pg_port: int, admin_port: int) -> dict[str, str]:
    tls = make_ca_and_server_cert(directory / "tls") if not (directory / "tls" / "ca.pem").exists() else {
        "ca_file": str(directory / "tls" / "ca.pem"), "cert_file": str(directory / "tls" / "server.pem"),
        "key_file": str(directory / "tls" / "server-key.pem")}
    iam = state["gateway_iam"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PROCTOR_", "AWS_", "POWERTOOLS_"))}
    env.update({
        "PROCTOR_API_URL": state["api_url"],
        "PROCTOR_REGION": state["region"],
        "PROCTOR_RECORDINGS_BUCKET": state["recordings_bucket"],
        "PROCTOR_EVIDENCE_BUCKET": state["evidence_bucket"],
        # Seals the unmasked originals of masked results (moto's KMS, like the grant key).
        "PROCTOR_BREAKGLASS_KEY_ID": state["breakglass_key_id"],
        "PROCTOR_SPOOL_DIR": str(directory / "spool"),
        "PROCTOR_PG_LISTEN": f"127.0.0.1:{pg_port}",
        "PROCTOR_ADMIN_LISTEN": f"127.0.0.1:{admin_port}",
        "PROCTOR_TLS_CERT": tls["cert_file"],
        "PROCTOR_TLS_KEY": tls["key_file"],
        "PROCTOR_REVOCATION_POLL_SECONDS": "1",
        "PROCTOR_SHIP_INTERVAL_SECONDS": "1",
        "PROCTOR_DRAIN_SECONDS": "5",
        "PROCTOR_MASKING_HASH_KEY": _masking_hash_key(directory),
        "AWS_ENDPOINT_URL": state["aws_endpoint"],
        "AWS_ACCESS_KEY_ID": iam["access_key"],
        "AWS_SECRET_ACCESS_KEY": iam["secret_key"],
        "AWS_DEFAULT_REGION": state["region"],
        "AWS_REGION": state["region"],
    })
    return env | {"_CA_FILE": tls["ca_file"]}


def _masking_hash_key(directory: Path) -> str:
    """The local tenant's keyed-hash masking key: made once, kept with the stack's state."""
    path = directory / "masking-hash.key"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def wait_ready(admin_port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{admin_port}/readyz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited with {proc.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            if response.status == 200:
                return
        time.sleep(0.1)
    raise RuntimeError("the gateway did not become ready")


def spawn_gateway(directory: Path, state: Mapping[str, Any], *, pg_port: int, admin_port: int | None = None,
                  log_name: str = "gateway.log",
                  extra_env: Mapping[str, str] | None = None) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    admin_port = admin_port or free_port()
    env = gateway_env(directory, state, pg_port=pg_port, admin_port=admin_port) | dict(extra_env or {})
    ca_file = env.pop("_CA_FILE")
    log = open(directory / log_name, "ab")  # noqa: SIM115 - handed to the child process
    try:
        proc = subprocess.Popen([sys.executable, "-m", "data_plane"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()
    wait_ready(admin_port, proc)
    return proc, {"admin_port": admin_port, "ca_file": ca_file, "spool_dir": env["PROCTOR_SPOOL_DIR"],
                  "log": str(directory / log_name)}


def start_gateway(directory: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Called by the local stack's supervisor once the control plane is up."""
    proc, info = spawn_gateway(directory, state, pg_port=int(state["gateway"]["port"]))

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    return {"pid": proc.pid, "stop": stop, "state": info}
