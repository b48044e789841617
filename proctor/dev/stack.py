"""`proctor dev up | down | status`: one supervisor process holds moto's server (Step Functions
executing state machines), the API adapter, the approval notifier worker and the dev OIDC issuer,
and starts the hermetic PostgreSQL (and the gateway) as children. The state file names every
process, so `down` can stop each one even if the supervisor died."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = Path(".proctor") / "dev"
GATEWAY_ROLE_ARN = "arn:aws:iam::123456789012:role/proctor-gateway-local"


def state_dir(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get("PROCTOR_STATE_DIR") or DEFAULT_STATE_DIR).resolve()


def state_file(directory: Path) -> Path:
    return directory / "state.json"


def read_state(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads(state_file(directory).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_state(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.chmod(0o600)  # holds the local gateway's access key
    tmp.replace(state_file(directory))


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    # A zombie whose parent is gone is not running.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
            return False
    return True


# ------------------------------------------------------------------------------------------------
# the supervisor (runs detached; `python -m proctor.dev.stack serve --state-dir DIR`)
# ------------------------------------------------------------------------------------------------


def _http_server() -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.daemon_threads = True
    return server


def serve(directory: Path, *, with_gateway: bool = True) -> None:
    from control_plane import api, gateway_api, notifier
    from control_plane.runtime import Services, use_services
    from control_plane.settings import Settings
    from proctor.dev import adapter as adapter_mod
    from proctor.dev import aws, oidc_issuer, seed
    from proctor.dev.notifier_worker import NotifierWorker
    from proctor.dev.postgres import HermeticPostgres

    directory.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    state: dict[str, Any] = {"status": "starting", "supervisor_pid": os.getpid(), "pids": {}}
    write_state(directory, state)
    cleanups: list[Any] = []
    try:
        # AWS APIs: moto's server, with the resources the CDK app would create.
        moto_server, endpoint = aws.start_moto()
        cleanups.append(moto_server.stop)
        gateway_key = adapter_mod.IamKey("AKIAPROCTORGATEWAY01", secrets.token_urlsafe(30), GATEWAY_ROLE_ARN)
        os.environ.update({
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local",
            "AWS_DEFAULT_REGION": aws.REGION, "AWS_REGION": aws.REGION,
            "PROCTOR_CONFIG_TABLE": aws.CONFIG_TABLE, "PROCTOR_STATE_TABLE": aws.STATE_TABLE,
            "PROCTOR_EVIDENCE_BUCKET": aws.EVIDENCE_BUCKET, "PROCTOR_GRANT_KEY_ID": aws.GRANT_KEY_ALIAS,
            "PROCTOR_REGION": aws.REGION, "PROCTOR_ADMIN_GROUPS": "admins",
            "PROCTOR_APPROVER_GROUPS": "approvers", "PROCTOR_GATEWAY_PRINCIPALS": GATEWAY_ROLE_ARN,
            "POWERTOOLS_TRACE_DISABLED": "true", "POWERTOOLS_METRICS_NAMESPACE": "Proctor",
            "POWERTOOLS_SERVICE_NAME": "proctor-control-plane", "POWERTOOLS_LOG_LEVEL": "WARNING",
        })
        resources = aws.create_resources(endpoint)
        # The API's address is known before it serves: approval emails link to it.
        api_server = _http_server()
        api_url = f"http://127.0.0.1:{api_server.server_address[1]}"
        os.environ.update({
            "PROCTOR_APPROVAL_STATE_MACHINE_ARN": resources.approval_state_machine_arn,
            "PROCTOR_APPROVAL_LINK_KEY_SECRET": resources.link_key_secret,
            "PROCTOR_APPROVAL_EMAIL_SENDER": resources.email_sender,
            "PROCTOR_PUBLIC_BASE_URL": api_url,
        })

        # Dev OIDC issuer.
        key_path = directory / "oidc-key.pem"
        oidc_issuer.generate_key(key_path)
        oidc_server = _http_server()
        issuer_url = f"http://127.0.0.1:{oidc_server.server_address[1]}"
        issuer = oidc_issuer.DevIssuer(key_path, issuer_url)
        oidc_issuer.serve(issuer, oidc_server)
        cleanups.append(oidc_server.shutdown)

        # Hermetic demo PostgreSQL; backend passwords go to Secrets Manager only.
        pg = HermeticPostgres(superuser_password=secrets.token_urlsafe(24))
        pg.start()
        cleanups.append(pg.stop)
        state["pids"]["postgres"] = pg.pid
        state["postgres"] = {"host": pg.host, "port": pg.port, "dir": str(pg.dir), "socket_dir": str(pg.socket_dir),
                             "database": seed.DEMO_DATABASE}
        write_state(directory, state)
        for role, password in seed.seed_database(pg).items():
            aws.put_secret(endpoint, seed.demo_secret_name(role),
                           {"engine": "postgres", "username": role, "password": password,
                            "host": pg.host, "port": pg.port, "dbname": seed.DEMO_DATABASE})

        # Control plane: the Lambda handlers behind the API Gateway stand-in.
        svc = Services.from_settings(Settings.from_env())
        use_services(svc)
        routes = [
            adapter_mod.Route("/v1", api.lambda_handler, "proctor-api", iam=False),
            adapter_mod.Route("/v1/credentials", gateway_api.lambda_handler, "proctor-gateway-api", iam=True),
            adapter_mod.Route("/v1/gateway", gateway_api.lambda_handler, "proctor-gateway-api", iam=True),
        ]
        adapter_mod.serve(adapter_mod.ApiAdapter(routes, {gateway_key.access_key: gateway_key}), api_server)
        cleanups.append(api_server.shutdown)
        # The notifier Lambda's SQS event source, as a thread calling the same handler.
        worker = NotifierWorker(aws.client(endpoint, "sqs"), resources.notifier_queue_url, notifier.lambda_handler,
                                region=aws.REGION).start()
        cleanups.append(worker.stop)

        gateway_port = int(os.environ.get("PROCTOR_DEV_GATEWAY_PORT") or 0) or _free_port()
        seed.seed_config(svc.config, issuer_url=issuer_url, pg_host=pg.host, pg_port=pg.port,
                         gateway_host="127.0.0.1", gateway_port=gateway_port, region=aws.REGION)

        state.update({
            "api_url": api_url,
            "public_base_url": api_url,
            "approval_state_machine_arn": resources.approval_state_machine_arn,
            "notifier_queue_url": resources.notifier_queue_url,
            "email_sender": resources.email_sender,
            "oidc_issuer": issuer_url,
            "oidc_key": str(key_path),
            "aws_endpoint": endpoint,
            "region": aws.REGION,
            "recordings_bucket": resources.recordings_bucket,
            "evidence_bucket": resources.evidence_bucket,
            "breakglass_key_id": resources.breakglass_key_id,
            "gateway_iam": {"access_key": gateway_key.access_key, "secret_key": gateway_key.secret_key,
                            "role_arn": gateway_key.role_arn},
            "gateway": {"host": "127.0.0.1", "port": gateway_port},
        })
        if with_gateway:
            start_gateway = _gateway_starter()
            if start_gateway is not None:
                proc_info = start_gateway(directory, state)
                cleanups.append(proc_info["stop"])
                state["pids"]["gateway"] = proc_info["pid"]
                state["gateway"].update(proc_info["state"])
        state["status"] = "ready"
        write_state(directory, state)
        print(f"proctor dev stack ready: api {api_url}", flush=True)
        stop.wait()
    except Exception as exc:
        state.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        write_state(directory, state)
        raise
    finally:
        for cleanup in reversed(cleanups):
            with contextlib.suppress(Exception):
                cleanup()
        if read_state(directory) and read_state(directory).get("status") != "failed":  # type: ignore[union-attr]
            state_file(directory).unlink(missing_ok=True)


def _gateway_starter() -> Any:
    """The data plane joins the stack once it exists (see proctor.dev.gateway)."""
    try:
        from proctor.dev.gateway import start_gateway
    except ImportError:
        return None
    return start_gateway


def _free_port() -> int:
    from proctor.dev.postgres import free_port

    return free_port()


# ------------------------------------------------------------------------------------------------
# the commands
# ------------------------------------------------------------------------------------------------


def up(directory: Path, *, timeout: float = 90.0, with_gateway: bool = True) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    current = read_state(directory)
    if current and current.get("status") == "ready" and pid_alive(current.get("supervisor_pid")):
        return current
    if current:
        down(directory)
    log = open(directory / "supervisor.log", "ab")  # noqa: SIM115 - handed to the child process
    args = [sys.executable, "-m", "proctor.dev.stack", "serve", "--state-dir", str(directory)]
    if not with_gateway:
        args.append("--no-gateway")
    try:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    finally:
        log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = read_state(directory)
        if state and state.get("status") == "ready":
            return state
        if proc.poll() is not None or (state and state.get("status") == "failed"):
            break
        time.sleep(0.1)
    tail = (directory / "supervisor.log").read_text(errors="replace")[-3000:]
    down(directory)
    raise RuntimeError(f"the local stack did not start:\n{tail}")


def down(directory: Path, *, timeout: float = 30.0) -> list[str]:
    """Stop the supervisor, then make sure every process the state names is gone."""
    state = read_state(directory)
    if not state:
        return []
    stopped = []
    supervisor = state.get("supervisor_pid")
    if pid_alive(supervisor):
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(supervisor):
            time.sleep(0.05)
        stopped.append(f"supervisor {supervisor}")
    for name, pid in (state.get("pids") or {}).items():
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and pid_alive(pid):
                time.sleep(0.05)
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            stopped.append(f"{name} {pid}")
    for name in ("supervisor_pid",):
        pid = state.get(name)
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    pg_dir = (state.get("postgres") or {}).get("dir")
    if pg_dir and Path(pg_dir).exists():
        import shutil

        shutil.rmtree(pg_dir, ignore_errors=True)
    state_file(directory).unlink(missing_ok=True)
    return stopped


def status(directory: Path) -> dict[str, Any]:
    state = read_state(directory)
    if not state:
        return {"status": "down"}
    alive = {"supervisor": pid_alive(state.get("supervisor_pid"))}
    alive.update({name: pid_alive(pid) for name, pid in (state.get("pids") or {}).items()})
    public = {k: v for k, v in state.items() if k != "gateway_iam"}
    return public | {"alive": alive}


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="proctor.dev.stack")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--no-gateway", action="store_true")
    args = parser.parse_args(argv)
    serve(Path(args.state_dir), with_gateway=not args.no_gateway)


if __name__ == "__main__":
    main()
