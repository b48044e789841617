#!/usr/bin/env python3
"""Benchmark the PostgreSQL data path in one run, against the same hermetic PostgreSQL of the local
stack: direct (plaintext TCP, SCRAM) vs pgbouncer (session pooling, plaintext) vs pgbouncer with client
TLS required vs the Proctor gateway (TLS, full recording), with guardrails and (pgbench, masking) without,
and under a policy that masks two columns (masking), and vs a second gateway the script starts with a
plaintext listener (full recording too: plaintext pgbouncer's like for like). Prints a table and writes
BENCHMARKS.md at the repository root.

    .venv/bin/python scripts/bench_postgres.py [--duration 10] [--quick] [--skip-gateway] [--output FILE]
                                               [--suites pgbench,transfer,masking,connect,idle]

See scripts/README.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import pwd
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a plain script from anywhere

from proctor.dev import aws as dev_aws  # noqa: E402
from proctor.dev import seed  # noqa: E402
from proctor.dev.postgres import find_bindir, free_port  # noqa: E402
from proctor.dev.stack import down, read_state, state_dir, up, write_state  # noqa: E402
from proctor.dev.tls import make_ca_and_server_cert  # noqa: E402

# pgbouncer+tls: pgbouncer as above but requiring client TLS, as the gateway does (like-for-like on TLS).
# gateway: a grant under the seeded policy pipeline-acme-app, which has guardrails; gateway (plaintext): the
# same kind of grant on a second gateway process the script starts, with the stack gateway's settings but
# PROCTOR_PG_REQUIRE_TLS=false and clients on sslmode=disable (like-for-like with plaintext pgbouncer);
# gateway (no guardrails): the stack's gateway process again, a grant under a policy the script creates
# without any (pgbench and masking suites); gateway (masked): the same again, under a policy without
# guardrails that masks two columns.
GATEWAY_PLAINTEXT = "gateway (plaintext)"
GATEWAY_NO_GUARDRAILS = "gateway (no guardrails)"
GATEWAY_MASKED = "gateway (masked)"
PATHS = ("direct", "pgbouncer", "pgbouncer+tls", "gateway", GATEWAY_PLAINTEXT, GATEWAY_NO_GUARDRAILS, GATEWAY_MASKED)
SUITES = ("pgbench", "transfer", "masking", "connect", "idle")
# The paths each suite measures ("—" in the table for the others).
COMMON_PATHS = ("direct", "pgbouncer", "pgbouncer+tls", "gateway")
SUITE_PATHS = {"pgbench": (*COMMON_PATHS, GATEWAY_PLAINTEXT, GATEWAY_NO_GUARDRAILS),
               "transfer": (*COMMON_PATHS, GATEWAY_PLAINTEXT),
               "masking": ("direct", GATEWAY_NO_GUARDRAILS, GATEWAY_MASKED),
               "connect": (*COMMON_PATHS, GATEWAY_PLAINTEXT),
               "idle": COMMON_PATHS}
# The policies the script creates through the API, with the same target, backend role and session length as
# pipeline-acme-app and no guardrails: policy → (the repository claim it matches, its masking rules).
NO_GUARDRAILS_POLICY = "bench-no-guardrails"
NO_GUARDRAILS_REPOSITORY = "acme/bench"
MASKED_POLICY = "bench-masked"
MASKED_REPOSITORY = "acme/bench-masked"
MASK_RULES = [{"name": "bench-email", "columns": ["*.bench_people.email"], "method": "hash"},
              {"name": "bench-card", "columns": ["*.bench_people.card_number"], "method": "partial", "keep_last": 4}]
BENCH_POLICIES = {NO_GUARDRAILS_POLICY: (NO_GUARDRAILS_REPOSITORY, []),
                  MASKED_POLICY: (MASKED_REPOSITORY, MASK_RULES)}
# gateway path → (the repository claim of its grant's pipeline, run id, the policy the script creates or None)
GATEWAY_GRANTS = {"gateway": ("acme/app", "bench", None),
                  GATEWAY_NO_GUARDRAILS: (NO_GUARDRAILS_REPOSITORY, "bench-plain", NO_GUARDRAILS_POLICY),
                  GATEWAY_MASKED: (MASKED_REPOSITORY, "bench-masked", MASKED_POLICY)}
# gateway (plaintext): a grant like the gateway path's (pipeline-acme-app, guardrails), its own run id.
PLAINTEXT_GRANT = ("acme/app", "bench-plaintext")
# SIGTERM drains the gateway (PROCTOR_DRAIN_SECONDS) and its shipper flushes the spool (up to 60 s) first.
PLAINTEXT_GATEWAY_STOP_SECONDS = 90
NOISY_LOAD = 1.5  # 1-min load average at the start above which the run warns that figures will be noisy
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
SELECT_SQL = "SELECT * FROM pgbench_accounts"
COPY_SQL = "COPY pgbench_accounts TO STDOUT"
# The masking suite's table (demo database, created as the superuser): two of its four columns are masked.
PEOPLE_TABLE = "bench_people"
PEOPLE_ROWS = 1_000_000
TEST_CARD = "4111111111111111"  # Luhn-valid (a well-known test number)
PEOPLE_CREATE_SQL = (
    "DROP TABLE IF EXISTS bench_people; CREATE TABLE bench_people AS SELECT i AS id, "
    "'user' || i || '@example.com' AS email, '4111111111111111'::text AS card_number, 'note ' || i AS note "
    "FROM generate_series(1, 1000000) AS i; GRANT SELECT ON bench_people TO app_rw"
)
PEOPLE_SQL = "SELECT * FROM bench_people"
PEOPLE_CHECK_SQL = "SELECT email, card_number FROM bench_people LIMIT 1"
PGBOUNCER_POOL_SIZE = 20
PGBOUNCER_MAX_CLIENTS = 2000

# Every secret the run handles; scrub() removes them from anything printed or written.
SECRETS: list[str] = []


def scrub(text: str) -> str:
    for secret in SECRETS:
        if secret:
            text = text.replace(secret, "***")
    return text


def log(message: str) -> None:
    print(f"» {scrub(message)}", flush=True)


# ------------------------------------------------------------------------------------------------
# where the clients connect
# ------------------------------------------------------------------------------------------------


@dataclass
class Endpoint:
    name: str
    host: str
    port: int
    user: str
    password: str
    sslmode: str
    database: str = seed.DEMO_DATABASE
    pid: int | None = None  # the process whose RSS the idle-session measurement reads

    def env(self) -> dict[str, str]:
        """libpq's environment for psql and pgbench (the password never goes on a command line)."""
        return os.environ | {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.user,
                             "PGPASSWORD": self.password, "PGDATABASE": self.database,
                             "PGSSLMODE": self.sslmode, "PGCONNECT_TIMEOUT": "30"}

    def kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "password": self.password,
                "dbname": self.database, "sslmode": self.sslmode, "connect_timeout": 30}


@dataclass
class Figure:
    value: float | None = None
    error: str | None = None
    note: str = ""
    rounds: tuple[float, ...] = ()  # one run per interleaved round, in round order (attempt_rounds)


@dataclass
class Bench:
    args: argparse.Namespace
    state: dict[str, Any]
    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # path → why it is not measured
    results: dict[str, dict[str, Figure]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    payload_bytes: dict[str, int] = field(default_factory=dict)
    load_at_start: tuple[float, float, float] = field(default_factory=os.getloadavg)
    suite_loads: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)
    pgbouncer_tls_source: str = ""
    grant_policies: dict[str, str] = field(default_factory=dict)  # gateway path → "policy vN" of its grant

    def record(self, key: str, path: str, figure: Figure) -> None:
        self.results.setdefault(key, {})[path] = figure


def tool(name: str) -> str:
    found = shutil.which(name) or str(find_bindir() / name)
    if not Path(found).exists():
        raise RuntimeError(f"{name} not found: install postgresql-client / the postgresql package")
    return found


# ------------------------------------------------------------------------------------------------
# the local stack, the backend and its data
# ------------------------------------------------------------------------------------------------


def raise_open_files_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def start_stack(directory: Path, *, with_gateway: bool) -> dict[str, Any]:
    down(directory)  # a stale stack (perhaps without a gateway) must not be reused
    try:
        return up(directory, with_gateway=with_gateway)
    except RuntimeError as exc:
        if not with_gateway:
            raise
        print(f"!! the stack did not start with the gateway; retrying without it:\n{exc}", flush=True)
        return up(directory, with_gateway=False)


def backend_password(state: dict[str, Any]) -> str:
    sm = dev_aws.client(state["aws_endpoint"], "secretsmanager")
    secret = json.loads(sm.get_secret_value(SecretId=seed.demo_secret_name(seed.ROLE_RW))["SecretString"])
    return str(secret["password"])


def server_user_kwargs() -> dict[str, Any]:
    """PostgreSQL and pgbouncer refuse to run as root: run them as `postgres` when we are root."""
    if os.geteuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def superuser_sql(state: dict[str, Any], sql: str) -> str:
    pg = state["postgres"]
    out = subprocess.run([tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", pg["socket_dir"],
                          "-p", str(pg["port"]), "-U", "postgres", "-d", pg["database"], "-c", sql],
                         capture_output=True, text=True, check=False, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"psql (superuser) failed: {out.stderr.strip()}")
    return out.stdout.strip()


def ensure_max_connections(state: dict[str, Any], needed: int, directory: Path) -> str:
    """1,000 idle gateway sessions may each hold a backend connection: raise max_connections (restart)."""
    current = int(superuser_sql(state, "SHOW max_connections"))
    if current >= needed:
        return f"PostgreSQL max_connections = {current}"
    superuser_sql(state, f"ALTER SYSTEM SET max_connections = {needed}")
    pg_dir = Path(state["postgres"]["dir"])
    data = pg_dir / "data"
    out = subprocess.run([str(find_bindir() / "pg_ctl"), "-D", str(data), "-l", str(pg_dir / "postgres.log"),
                          "-w", "-t", "60", "-m", "fast", "restart"],
                         capture_output=True, text=True, check=False, cwd=str(pg_dir), timeout=120,
                         **server_user_kwargs())
    if out.returncode != 0:
        raise RuntimeError(f"pg_ctl restart failed: {out.stderr.strip() or out.stdout.strip()}")
    new_pid = int((data / "postmaster.pid").read_text().split()[0])
    state["pids"]["postgres"] = new_pid
    write_state(directory, state)  # so `proctor dev down` stops the restarted server too
    return f"PostgreSQL max_connections raised from {current} to {needed} (ALTER SYSTEM + restart)"


def stop_restarted_postgres(state: dict[str, Any]) -> None:
    """Stop the server before `down` removes its directory (the supervisor only knows the old pid)."""
    data = Path(state["postgres"]["dir"]) / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run([str(find_bindir() / "pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop"],
                       capture_output=True, check=False, cwd=str(data.parent), timeout=60, **server_user_kwargs())


def init_pgbench(direct: Endpoint, scale: int) -> None:
    # Server-side generation (G) is the fast path for 1M rows; v = vacuum analyze, p = primary keys.
    out = subprocess.run([tool("pgbench"), "-i", "-s", str(scale), "-I", "dtGvp"], env=direct.env(),
                         capture_output=True, text=True, check=False, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {scrub(out.stderr.strip())}")


def measure_payload_bytes(direct: Endpoint) -> dict[str, int]:
    """Bytes on the wire of the result: DataRows for the SELECT, CopyData for the COPY (text format)."""
    with psycopg.connect(**direct.kwargs()) as conn:
        rows, fields = conn.execute(
            "SELECT count(*), sum(octet_length(aid::text) + octet_length(bid::text)"
            " + octet_length(abalance::text) + coalesce(octet_length(filler), 2)) FROM pgbench_accounts"
        ).fetchone()
    # DataRow: type 1 + length 4 + column count 2 + 4 x column length 4; CopyData: 5 + 3 tabs + newline.
    return {"rows": int(rows), "select": int(fields) + 23 * int(rows), "copy": int(fields) + 9 * int(rows)}


def ensure_people_table(state: dict[str, Any]) -> str:
    """bench_people (1M rows, an e-mail and a card number in each) in the demo database, readable by app_rw."""
    exists = superuser_sql(state, "SELECT to_regclass('public.bench_people') IS NOT NULL") == "t"
    if exists and int(superuser_sql(state, "SELECT count(*) FROM bench_people")) == PEOPLE_ROWS:
        return f"{PEOPLE_TABLE} already holds {PEOPLE_ROWS:,} rows"
    superuser_sql(state, PEOPLE_CREATE_SQL)
    superuser_sql(state, "VACUUM ANALYZE bench_people")  # hint bits set now, not during the first timed run
    return f"{PEOPLE_TABLE} created ({PEOPLE_ROWS:,} rows)"


def measure_people_payload(direct: Endpoint) -> dict[str, int]:
    """Bytes on the wire of the clear result of PEOPLE_SQL: its DataRows, as measure_payload_bytes counts them."""
    with psycopg.connect(**direct.kwargs()) as conn:
        rows, fields = conn.execute(
            "SELECT count(*), sum(octet_length(id::text) + octet_length(email) + octet_length(card_number)"
            " + octet_length(note)) FROM bench_people"
        ).fetchone()
    return {"people-rows": int(rows), "people": int(fields) + 23 * int(rows)}  # 4 columns, as above


def count_backends(state: dict[str, Any]) -> int:
    return int(superuser_sql(state, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                                    " AND pid <> pg_backend_pid()"))


# ------------------------------------------------------------------------------------------------
# pgbouncer
# ------------------------------------------------------------------------------------------------


@dataclass
class PgBouncer:
    proc: subprocess.Popen[bytes]
    port: int
    workdir: Path
    tls_source: str = ""  # where its client TLS certificate came from (empty: plaintext)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # no client is left by then: any shutdown mode will do
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def pgbouncer_config(pg: dict[str, Any], port: int, workdir: Path, *, tls: bool = False) -> str:
    # Client TLS only (the server side stays plaintext, as for every path); protocols and ciphers are
    # pgbouncer's defaults. Clients use sslmode=require, which does not verify, as for the gateway.
    client_tls = (f"client_tls_sslmode = require\nclient_tls_cert_file = {workdir / 'server.pem'}\n"
                  f"client_tls_key_file = {workdir / 'server-key.pem'}\n") if tls else ""
    return f"""[databases]
{pg['database']} = host={pg['host']} port={pg['port']} dbname={pg['database']}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {workdir / 'userlist.txt'}
pool_mode = session
max_client_conn = {PGBOUNCER_MAX_CLIENTS}
default_pool_size = {PGBOUNCER_POOL_SIZE}
logfile = {workdir / 'pgbouncer.log'}
{client_tls}"""


def install_tls_files(workdir: Path, stack_tls: Path | None) -> str:
    """Put server.pem / server-key.pem in pgbouncer's workdir: the stack gateway's own certificate and key
    (proctor.dev.gateway keeps them in <state dir>/tls), or, without a gateway, a fresh one of the same kind."""
    if stack_tls and (stack_tls / "server.pem").exists() and (stack_tls / "server-key.pem").exists():
        shutil.copyfile(stack_tls / "server.pem", workdir / "server.pem")
        shutil.copyfile(stack_tls / "server-key.pem", workdir / "server-key.pem")
        return f"the gateway's certificate and key ({stack_tls})"
    generated = make_ca_and_server_cert(workdir / "tls")
    shutil.copyfile(generated["cert_file"], workdir / "server.pem")
    shutil.copyfile(generated["key_file"], workdir / "server-key.pem")
    shutil.rmtree(workdir / "tls")
    return "a certificate generated like the gateway's (proctor.dev.tls: ECDSA P-256), the stack has none"


def start_pgbouncer(state: dict[str, Any], password: str, *, tls: bool = False,
                    stack_tls: Path | None = None) -> PgBouncer:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(binary).exists():
        raise RuntimeError("pgbouncer not installed: `bash scripts/install-system-deps.sh pgbouncer`")
    workdir = Path(tempfile.mkdtemp(prefix="proctor-bench-pgbouncer-tls-" if tls else "proctor-bench-pgbouncer-"))
    port = free_port()
    # A plaintext password in the userlist lets pgbouncer do SCRAM with the client and with the backend.
    (workdir / "userlist.txt").write_text(f'"{seed.ROLE_RW}" "{password}"\n')
    (workdir / "pgbouncer.ini").write_text(pgbouncer_config(state["postgres"], port, workdir, tls=tls))
    files = [workdir / "userlist.txt", workdir / "pgbouncer.ini"]
    tls_source = ""
    if tls:
        try:
            tls_source = install_tls_files(workdir, stack_tls)
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        files += [workdir / "server.pem", workdir / "server-key.pem"]
    user = server_user_kwargs()  # pgbouncer runs as postgres when we are root: it must read all of these
    for path in (workdir, *files):
        path.chmod(0o700 if path.is_dir() else 0o600)
        if user:
            os.chown(path, user["user"], user["group"])
    proc = subprocess.Popen([binary, str(workdir / "pgbouncer.ini")], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **user)
    bouncer = PgBouncer(proc, port, workdir, tls_source)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (workdir / "pgbouncer.log").read_text(errors="replace")[-1500:]
            bouncer.stop()
            raise RuntimeError(f"pgbouncer exited: {tail}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return bouncer
        time.sleep(0.05)
    bouncer.stop()
    raise RuntimeError("pgbouncer did not listen within 15 s")


def pgbouncer_version() -> str:
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    except OSError:
        return "not installed"


# ------------------------------------------------------------------------------------------------
# the gateway
# ------------------------------------------------------------------------------------------------


def gateway_problem(state: dict[str, Any]) -> str | None:
    """Why the gateway cannot be benchmarked, or None when it answers TLS on its port."""
    gateway = state.get("gateway") or {}
    if not (state.get("pids") or {}).get("gateway"):
        return "the local stack started no gateway process (proctor.dev.gateway is not there yet?)"
    if not gateway.get("ca_file"):
        return "the stack state has no gateway.ca_file"
    try:
        with socket.create_connection((gateway["host"], gateway["port"]), timeout=5) as sock:
            sock.sendall(SSL_REQUEST)
            answer = sock.recv(1)
            if answer != b"S":
                return f"the gateway answered {answer!r} to SSLRequest instead of b'S'"
            context = ssl.create_default_context(cafile=gateway["ca_file"])
            context.check_hostname = False  # only that TLS works; libpq's sslmode=require does the same
            with context.wrap_socket(sock, server_hostname=gateway["host"]):
                pass
    except (OSError, ssl.SSLError) as exc:
        return f"no TLS on the gateway port {gateway['host']}:{gateway['port']}: {exc}"
    return None


def issuer(state: dict[str, Any]) -> Any:
    from proctor.dev.oidc_issuer import DevIssuer

    return DevIssuer(Path(state["oidc_key"]), state["oidc_issuer"])


def create_policy(state: dict[str, Any], name: str) -> str:
    """As an admin, create one of BENCH_POLICIES, without guardrails (201; 409 when it already exists is fine)."""
    from proctor.api_client import ApiClient, ApiError

    token = issuer(state).mint("bench-admin@example.com", groups=("admins",))
    SECRETS.append(token)
    repository, masking = BENCH_POLICIES[name]
    body = {"name": name, "subjects": [{"claims": {"repository": repository}}], "targets": [seed.DEMO_TARGET],
            "backend_role": seed.ROLE_RW, "max_session_seconds": 3600, "masking": masking}
    try:
        status, _ = ApiClient(state["api_url"], token).post("/v1/policies", body)
    except ApiError as exc:
        if exc.status == 409:
            return f"policy {name} already existed (409)"
        raise RuntimeError(f"could not create policy {name}: {exc}") from None
    if status != 201:
        raise RuntimeError(f"could not create policy {name}: the control plane answered {status}")
    return f"policy {name} created (201)"


def request_grant(state: dict[str, Any], repository: str, run_id: str) -> dict[str, Any]:
    from proctor.api_client import ApiClient

    token = issuer(state).mint("ci", claims={"repository": repository, "run_id": run_id, "actor": "bench"})
    status, grant = ApiClient(state["api_url"], token).post("/v1/grants", {"target": seed.DEMO_TARGET,
                                                                           "reason": "benchmark"})
    if status != 201:
        raise RuntimeError(f"no grant: the control plane answered {status}")
    return grant


def gateway_endpoint(state: dict[str, Any], name: str, repository: str, run_id: str) -> tuple[Endpoint, str]:
    """The endpoint of a grant for a pipeline of `repository`, and which policy (version) issued it."""
    grant = request_grant(state, repository, run_id)
    SECRETS.append(grant["token"])
    conn = grant["connection"]
    policy = grant.get("policy") or {}
    endpoint = Endpoint(name, conn["host"], int(conn["port"]), conn["user"], grant["token"], "require",
                        database=conn.get("database") or seed.DEMO_DATABASE, pid=state["pids"].get("gateway"))
    return endpoint, f"{policy.get('name', '?')} v{policy.get('version', '?')}"


@dataclass
class PlaintextGateway:
    """The second gateway process: the stack gateway's settings, but its own ports and spool, and no client TLS
    required. The script starts and stops it; the stack's state does not name it."""

    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int
    spool_dir: Path
    log: Path

    def stop(self, timeout: float = PLAINTEXT_GATEWAY_STOP_SECONDS) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains its sessions, its shipper flushes the spool
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout)
        # Its own process group (start_new_session): this also ends a shipper child it left behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_plaintext_gateway(state: dict[str, Any], directory: Path) -> PlaintextGateway:
    """`python -m data_plane` with proctor.dev.gateway's environment for the stack's gateway, except its ports,
    its spool and PROCTOR_PG_REQUIRE_TLS=false; back once its /readyz answers 200."""
    from proctor.dev.gateway import gateway_env, wait_ready

    port = free_port()
    admin_port = free_port()
    while admin_port == port:
        admin_port = free_port()
    spool_dir = directory / "spool-plaintext"
    shutil.rmtree(spool_dir, ignore_errors=True)  # a previous run's backlog would be shipped during this one
    env = gateway_env(directory, state, pg_port=port, admin_port=admin_port) | {
        "PROCTOR_SPOOL_DIR": str(spool_dir), "PROCTOR_PG_REQUIRE_TLS": "false"}
    env.pop("_CA_FILE")
    log_path = directory / "gateway-plaintext.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "data_plane"], env=env, stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    gateway = PlaintextGateway(proc, port, admin_port, spool_dir, log_path)
    try:
        wait_ready(admin_port, proc, timeout=60)
    except BaseException as exc:
        gateway.stop(timeout=10)  # not ready: there is nothing to drain
        if not isinstance(exc, Exception):
            raise
        tail = log_path.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"{exc} (log {log_path}):\n{tail}") from None
    return gateway


def plaintext_problem(ep: Endpoint) -> str | None:
    """Why the endpoint is not the plaintext gateway path it claims to be, or None: SELECT 1 without TLS."""
    with psycopg.connect(**ep.kwargs()) as conn:
        conn.execute("SELECT 1").fetchone()
        if conn.pgconn.ssl_in_use:
            return f"{ep.name}: the session uses TLS although sslmode={ep.sslmode}"
    return None


# ------------------------------------------------------------------------------------------------
# the measurements
# ------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def pgbench_tps(ep: Endpoint, protocol: str, clients: int, threads: int, duration: int) -> Figure:
    argv = [tool("pgbench"), "-n", "-S", f"--protocol={protocol}", "-c", str(clients), "-j", str(threads),
            "-T", str(duration)]
    proxy = ep.pid if ep.name != "direct" else None  # direct's work is in forked backends, not one process
    cpu_before, started = (cpu_seconds(proxy) if proxy else 0.0), time.monotonic()
    out = subprocess.run(argv, env=ep.env(), capture_output=True, text=True, check=False, timeout=duration + 120)
    cpu_share = (cpu_seconds(proxy) - cpu_before) / (time.monotonic() - started) if proxy else None
    match = re.search(r"^tps = ([\d.]+)", out.stdout, re.MULTILINE)
    if out.returncode != 0 or not match:
        raise RuntimeError(f"pgbench exit {out.returncode}: {(out.stderr or out.stdout).strip()[-400:]}")
    latency = re.search(r"^latency average = ([\d.]+ ms)", out.stdout, re.MULTILINE)
    failed = re.search(r"^number of failed transactions: (\d+)", out.stdout, re.MULTILINE)
    note = f"latency avg {latency.group(1)}" if latency else ""
    if failed and failed.group(1) != "0":
        note += f", {failed.group(1)} failed transactions"
    if cpu_share is not None:
        note += f", {ep.name} process CPU {cpu_share:.0%} of one core"
    return Figure(float(match.group(1)), note=note)


def psql_wall_time(ep: Endpoint, sql: str) -> float:
    """Wall time of a psql process that reads everything and discards it (includes its connect)."""
    argv = [tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-o", "/dev/null", "-c", sql]
    started = time.perf_counter()
    out = subprocess.run(argv, env=ep.env(), capture_output=True, text=True, check=False, timeout=600)
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"psql exit {out.returncode}: {out.stderr.strip()[-400:]}")
    return elapsed


def process_tree_cpu(pid: int) -> float:
    total = 0.0
    for each in (pid, *descendants(pid)):
        with contextlib.suppress(OSError, ValueError, IndexError):  # a child may exit meanwhile
            total += cpu_seconds(each)
    return total


def wait_until_quiet(pid: int, share: float = 0.1, limit: float = 60.0) -> float:
    """Wait until the process and its descendants use under `share` of one core over half a second (at most
    `limit` s); the seconds waited. The gateway still records and ships a 1M-row session after it ends: on
    shared cores that work would slow whichever run comes next."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = process_tree_cpu(pid)
        time.sleep(0.5)
        if process_tree_cpu(pid) - before < share * 0.5:
            break
    return time.monotonic() - started


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered)) - 1  # nearest rank
    return ordered[max(0, min(len(ordered) - 1, rank))]


def connect_latencies(ep: Endpoint, count: int) -> list[float]:
    """Sequential connect + SELECT 1 + close, in milliseconds."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        with psycopg.connect(**ep.kwargs()) as conn:
            conn.execute("SELECT 1").fetchone()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def vm_rss_kib(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def rss_kib(pid: int) -> tuple[int, int, int]:
    """VmRSS (KiB) of the process alone, of it with its descendants, and how many descendants."""
    own = vm_rss_kib(pid)
    others = 0
    kids = descendants(pid)
    for child in kids:
        with contextlib.suppress(OSError):
            others += vm_rss_kib(child)
    return own, own + others, len(kids)


async def open_connections(ep: Endpoint, count: int, concurrency: int) -> tuple[list[Any], list[str]]:
    gate = asyncio.Semaphore(concurrency)
    conns: list[Any] = []
    errors: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                conns.append(await psycopg.AsyncConnection.connect(**ep.kwargs()))
            except (psycopg.Error, OSError) as exc:
                errors.append(str(exc).strip())

    await asyncio.gather(*(one() for _ in range(count)))
    return conns, errors


async def close_connections(conns: list[Any]) -> None:
    await asyncio.gather(*(conn.close() for conn in conns), return_exceptions=True)


async def idle_session_cost(bench: Bench, ep: Endpoint, count: int) -> Figure:
    if not ep.pid:
        raise RuntimeError("no pid to measure")
    warm, _ = await open_connections(ep, 20, 20)  # first sessions pay one-off allocations
    await close_connections(warm)
    await asyncio.sleep(1.0)
    own_before, before, _ = rss_kib(ep.pid)
    backends_before = count_backends(bench.state)
    conns, errors = await open_connections(ep, count, bench.args.connect_concurrency)
    try:
        await asyncio.sleep(2.0)  # let the server settle (buffers, recorder spool)
        own_after, after, kids = rss_kib(ep.pid)
        backends_after = count_backends(bench.state)
    finally:
        await close_connections(conns)
    if not conns:
        raise RuntimeError(f"no session opened: {errors[0] if errors else '?'}")
    opened = len(conns)
    note = f"{opened}/{count} sessions open; RSS of pid {ep.pid} {own_before / 1024:.1f} → {own_after / 1024:.1f} MiB"
    if kids:
        note += (f" ({(own_after - own_before) / opened:.1f} KiB/session), with its {kids} child process(es) "
                 f"{before / 1024:.1f} → {after / 1024:.1f} MiB (the figure)")
    note += f"; PostgreSQL client backends {backends_before} → {backends_after}"
    if errors:
        note += f"; {len(errors)} failed, first: {errors[0][:200]}"
    return Figure((after - before) / opened, note=note)


# ------------------------------------------------------------------------------------------------
# running them
# ------------------------------------------------------------------------------------------------


def settle(bench: Bench) -> float:
    """Before each measurement, whatever path it measures: wait until the gateways (with their shippers)
    and the stack's supervisor (moto, which stores what they ship) are quiet, so work left over from the
    previous run (a gateway records and ships what it relayed for seconds after) slows no other path."""
    pids = [pid for name, pid in (bench.state.get("pids") or {}).items() if name != "postgres" and pid]
    plaintext = bench.endpoints.get(GATEWAY_PLAINTEXT)
    if plaintext is not None and plaintext.pid:
        pids.append(plaintext.pid)
    started = time.monotonic()
    for pid in pids:
        with contextlib.suppress(OSError):
            wait_until_quiet(pid)
    return time.monotonic() - started


def attempt(bench: Bench, keys: list[str], path: str, run: Callable[[], Figure | tuple[Figure, ...]]) -> None:
    """One measurement of one path: a failure becomes the table cell, never the end of the run."""
    if path in bench.unavailable:
        for key in keys:
            bench.record(key, path, Figure(error="unavailable"))
        return
    figures, error = run_settled(bench, f"{keys[0]} via {path}", run)
    if error is not None:
        for key in keys:
            bench.record(key, path, Figure(error=error))
        return
    for key, figure in zip(keys, figures if isinstance(figures, tuple) else (figures,), strict=True):
        bench.record(key, path, figure)
        show(key, figure)


def run_settled(bench: Bench, label: str, run: Callable[[], Any]) -> tuple[Any, str | None]:
    """Once the gateways are quiet: (what `run` returned, None), or (None, the failure as the table shows it)."""
    waited = settle(bench)
    log(label + (f" (after {waited:.1f} s for the gateways to go quiet)" if waited >= 1 else ""))
    try:
        return run(), None
    except Exception as exc:  # every failure is a result to report
        message = scrub(f"{type(exc).__name__}: {exc}".strip())
        print(f"   failed: {message}", flush=True)
        return None, message


def show(key: str, figure: Figure) -> None:
    print(f"   {key}: {figure.value:.2f}" + (f"  ({scrub(figure.note)})" if figure.note else ""), flush=True)


def suite_start(bench: Bench, suite: str) -> None:
    """Print (and keep, for the report) the load average as a suite begins: the machine is shared."""
    load = os.getloadavg()
    bench.suite_loads.append((suite, load))
    log(f"── {suite} suite — load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min) "
        f"on {os.cpu_count()} cores")


def suite_paths(suite: str) -> tuple[str, ...]:
    return SUITE_PATHS[suite]


def wanted_paths(bench: Bench) -> set[str]:
    """The paths some suite of this run measures."""
    return {path for suite in bench.args.suites for path in suite_paths(suite)}


def run_pgbench_suite(bench: Bench) -> None:
    suite_start(bench, "pgbench")
    duration = bench.args.duration
    warm = bench.endpoints["direct"]
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):  # warms index and buffers, not recorded
        pgbench_tps(warm, "simple", 2, 2, min(duration, 3))
    for protocol in ("simple", "prepared"):
        for clients, threads in ((1, 1), (8, 2)):
            key = f"pgbench-{protocol}-c{clients}"
            attempt_rounds(bench, key, suite_paths("pgbench"), lambda p, pr=protocol, c=clients, t=threads:
                           pgbench_tps(bench.endpoints[p], pr, c, t, duration))


def attempt_rounds(bench: Bench, key: str, paths: tuple[str, ...], run: Callable[[str], Figure], *,
                   rounds: int | None = None, spread: str = "{:,.0f}") -> None:
    """`--rounds` (or `rounds`) interleaved rounds over the paths, each round starting one path later (no path
    always runs right after the same one), and the median of each path's runs: on shared cores one run of each
    path, in a fixed order, measures the machine's mood as much as the path."""
    rounds = bench.args.rounds if rounds is None else rounds
    runs: dict[str, list[Figure]] = {path: [] for path in paths}
    errors: dict[str, str] = {}
    for number in range(rounds):
        shift = number % len(paths)
        for path in paths[shift:] + paths[:shift]:
            if path in bench.unavailable or path in errors:
                continue
            figure, error = run_settled(bench, f"{key} via {path}, round {number + 1}/{rounds}",
                                        lambda p=path: run(p))
            if error is not None:
                errors[path] = error
                continue
            runs[path].append(figure)
            show(key, figure)
    for path in paths:
        if path in bench.unavailable:
            bench.record(key, path, Figure(error="unavailable"))
        elif path in errors:
            bench.record(key, path, Figure(error=errors[path]))
        else:
            ordered = sorted(runs[path], key=lambda f: f.value or 0.0)
            middle = ordered[(len(ordered) - 1) // 2]
            values = ", ".join(spread.format(f.value) for f in runs[path])
            note = f"median of {len(ordered)} interleaved runs ({values})"
            if middle.note:
                note += f"; median run: {middle.note}"
            bench.record(key, path, Figure(middle.value, note=note, rounds=tuple(f.value or 0.0 for f in runs[path])))


def run_transfer_suite(bench: Bench) -> None:
    suite_start(bench, "transfer")
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):  # page cache warm-up, not recorded
        psql_wall_time(bench.endpoints["direct"], SELECT_SQL)
    for name, sql in (("select", SELECT_SQL), ("copy", COPY_SQL)):
        # Interleaved rounds, each run after the gateways went quiet: run after run of one path would measure
        # the next run beside the previous one's shipping (a 1M-row session's recording is ~100 MB to verify,
        # compress and upload), and the machine's mood of the moment as much as the path.
        transfer_rounds(bench, name, sql, name, suite_paths("transfer"))


def transfer_rounds(bench: Bench, name: str, sql: str, payload: str, paths: tuple[str, ...]) -> None:
    """`--repeat` interleaved rounds of psql running `sql` over `paths`: `{name}-wall`, and `{name}-mbps` for
    `payload`'s bytes."""
    attempt_rounds(bench, f"{name}-wall", paths, lambda p: Figure(psql_wall_time(bench.endpoints[p], sql)),
                   rounds=bench.args.repeat, spread="{:.2f} s")
    mb = bench.payload_bytes[payload] / 1e6
    for path in paths:
        wall = bench.results[f"{name}-wall"][path]
        bench.record(f"{name}-mbps", path, wall if wall.value is None else
                     Figure(mb / wall.value, rounds=tuple(mb / t for t in wall.rounds)))



def masking_problem(bench: Bench) -> str | None:
    """Why the masking figures would not be what they claim: the masked path must mask, direct must not."""
    if GATEWAY_MASKED in bench.unavailable:
        return None  # nothing to check: its cells say why
    rows = {}
    for path in ("direct", GATEWAY_MASKED):
        with psycopg.connect(**bench.endpoints[path].kwargs()) as conn:
            rows[path] = conn.execute(PEOPLE_CHECK_SQL).fetchone()
    email, card = rows[GATEWAY_MASKED]
    if not (email.startswith("h:") and card.startswith("*") and card.endswith(TEST_CARD[-4:])):
        return f"{GATEWAY_MASKED} returned a row that is not masked as its policy says: {PEOPLE_CHECK_SQL}"
    email, card = rows["direct"]
    if not (email.startswith("user") and email.endswith("@example.com") and card == TEST_CARD):
        return f"direct returned a row that is not clear: {PEOPLE_CHECK_SQL}"
    return None


def run_masking_suite(bench: Bench) -> None:
    """Two masked columns over 1M rows, and a result without masked columns under the same masking grant."""
    suite_start(bench, "masking")
    keys = ["masked-wall", "masked-mbps", "fastpath-wall", "fastpath-mbps"]
    direct = bench.endpoints["direct"]
    try:
        log(ensure_people_table(bench.state))
        bench.payload_bytes |= measure_people_payload(direct)
        problem = masking_problem(bench)
    except Exception as exc:  # every failure is a result to report
        problem = scrub(f"{type(exc).__name__}: {exc}".strip())
    if problem is not None:  # never measure a path that does not mask as if it did
        print(f"!! masking suite not measured: {problem}", flush=True)
        bench.notes.append(f"masking suite not measured, the sanity check failed: {problem}")
        for key in keys:
            bench.record(key, GATEWAY_MASKED, Figure(error=f"sanity check failed: {problem}"))
        return
    log(f"sanity check: {GATEWAY_MASKED} masks e-mail and card number, direct returns them clear")
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):  # page cache warm-up, not recorded
        psql_wall_time(direct, PEOPLE_SQL)
    runs = (("masked", PEOPLE_SQL, "people", suite_paths("masking")),
            ("fastpath", SELECT_SQL, "select", (GATEWAY_NO_GUARDRAILS, GATEWAY_MASKED)))
    for name, sql, payload, paths in runs:
        # Interleaved rounds, as in the transfer suite: run after run of one path would compare the paths at
        # different moments of the machine's speed.
        transfer_rounds(bench, name, sql, payload, paths)


def latency_figures(ep: Endpoint, count: int) -> tuple[Figure, Figure]:
    samples = connect_latencies(ep, count)
    note = f"{count} sequential, mean {statistics.fmean(samples):.2f} ms, max {max(samples):.2f} ms"
    return Figure(percentile(samples, 50), note=note), Figure(percentile(samples, 99))


def run_connect_suite(bench: Bench) -> None:
    suite_start(bench, "connect")
    for path in suite_paths("connect"):
        attempt(bench, ["connect-p50", "connect-p99"], path,
                lambda p=path: latency_figures(bench.endpoints[p], bench.args.connections))


def run_idle_suite(bench: Bench) -> None:
    suite_start(bench, "idle")
    for path in suite_paths("idle"):
        if path == "direct":
            bench.record("idle-kib", path, Figure(error="n/a"))  # a backend per session is PostgreSQL's cost
            continue
        attempt(bench, ["idle-kib"], path,
                lambda p=path: asyncio.run(idle_session_cost(bench, bench.endpoints[p], bench.args.idle_sessions)))


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


Target = tuple[str, str, float]  # (a path, or "top/bottom" for a ratio of two paths; comparison; threshold)


@dataclass(frozen=True)
class Row:
    suite: str
    key: str
    label: str
    digits: int
    targets: tuple[Target, ...] = ()


# The ratio columns: (top, bottom) → header. The issue's target, "gateway with full recording ≥ 1.0x
# pgbouncer", is evaluated on the two like-for-like pairs: gateway/pgbouncer+tls (both require client TLS)
# and gw-plain/pgbouncer (both plaintext); gateway/pgbouncer (TLS gateway, plaintext pgbouncer) is shown for
# information. gw/gw-no-guardrails is what guardrails cost; masked/gw-no-masking is what masking costs
# (gateway (no guardrails) has no masking rules either).
RATIOS: dict[tuple[str, str], str] = {
    ("pgbouncer", "direct"): "pgbouncer/direct",
    ("gateway", "direct"): "gateway/direct",
    ("gateway", "pgbouncer"): "gateway/pgbouncer",
    ("gateway", "pgbouncer+tls"): "gateway/pgbouncer+tls",
    (GATEWAY_PLAINTEXT, "pgbouncer"): "gw-plain/pgbouncer",
    ("gateway", GATEWAY_NO_GUARDRAILS): "gw/gw-no-guardrails",
    (GATEWAY_MASKED, "direct"): "masked/direct",
    (GATEWAY_MASKED, GATEWAY_NO_GUARDRAILS): "masked/gw-no-masking",
}


def rows(bench: Bench) -> list[Row]:
    """The table's rows, of the suites this run measures."""
    d = bench.args.duration
    # "gateway with full recording ≥ 1.0x pgbouncer", like for like: on TLS and in plaintext.
    to_pgbouncer: tuple[Target, ...] = (("gateway/pgbouncer+tls", ">=", 1.0),
                                        (f"{GATEWAY_PLAINTEXT}/pgbouncer", ">=", 1.0))
    to_no_guardrails: Target = (f"gateway/{GATEWAY_NO_GUARDRAILS}", ">=", 0.9)
    return [row for row in [
        Row("pgbench", "pgbench-simple-c1", f"pgbench -S simple, 1 client, {d} s (TPS)", 0),
        Row("pgbench", "pgbench-simple-c8", f"pgbench -S simple, 8 clients, {d} s (TPS)", 0,
            (*to_pgbouncer, to_no_guardrails)),
        Row("pgbench", "pgbench-prepared-c1", f"pgbench -S prepared, 1 client, {d} s (TPS)", 0),
        Row("pgbench", "pgbench-prepared-c8", f"pgbench -S prepared, 8 clients, {d} s (TPS)", 0, to_pgbouncer),
        Row("transfer", "select-wall", "1M-row SELECT, wall time (s)", 2),
        Row("transfer", "select-mbps", "1M-row SELECT (MB/s)", 1, (("gateway/direct", ">=", 0.8),)),
        Row("transfer", "copy-wall", "COPY OUT 1M rows, wall time (s)", 2),
        Row("transfer", "copy-mbps", "COPY OUT 1M rows (MB/s)", 1, (("gateway/direct", ">=", 0.8),)),
        Row("masking", "masked-wall", "1M-row SELECT, 2 of 4 columns masked, wall time (s)", 2),
        Row("masking", "masked-mbps", "1M-row SELECT, 2 of 4 columns masked (MB/s)", 1,
            ((f"{GATEWAY_MASKED}/direct", ">=", 0.5),)),
        Row("masking", "fastpath-wall", "1M-row SELECT, no masked column, wall time (s)", 2),
        Row("masking", "fastpath-mbps", "1M-row SELECT, no masked column (MB/s)", 1,
            ((f"{GATEWAY_MASKED}/{GATEWAY_NO_GUARDRAILS}", ">=", 0.9),)),
        Row("connect", "connect-p50", "connect + SELECT 1 + close, p50 (ms)", 2),
        Row("connect", "connect-p99", "connect + SELECT 1 + close, p99 (ms)", 2),
        Row("idle", "idle-kib", f"RSS per idle session, {bench.args.idle_sessions} sessions (KiB)", 1,
            (("gateway", "<=", 50.0),)),
    ] if row.suite in bench.args.suites]


def cell(figure: Figure | None, digits: int) -> str:
    if figure is None:
        return "—"
    if figure.error:
        return "n/a" if figure.error in ("n/a", "unavailable") else "error¹"
    return f"{figure.value:,.{digits}f}"


def ratio(figures: dict[str, Figure], top: str, bottom: str) -> float | None:
    """Of two paths measured in the same interleaved rounds, the median of their per-round ratios: each round
    runs every path once within a minute or two, so a pair shares the machine's speed of the moment, which
    drifts by a third over a run here. Otherwise the ratio of the two figures."""
    a, b = figures.get(top), figures.get(bottom)
    if not a or not b or a.value is None or b.value is None or not b.value:
        return None
    if a.rounds and len(a.rounds) == len(b.rounds) and all(b.rounds):
        return statistics.median(x / y for x, y in zip(a.rounds, b.rounds, strict=True))
    return a.value / b.value


def target_status(row: Row, figures: dict[str, Figure]) -> str:
    statuses = []
    for subject, op, threshold in row.targets:
        if "/" in subject:
            top, bottom = subject.split("/")
            value = ratio(figures, top, bottom)
            wanted = f"{RATIOS.get((top, bottom), subject)} {'≥' if op == '>=' else '≤'} {threshold:.1f}x"
        else:
            value = figures.get(subject).value if figures.get(subject) else None
            wanted = f"{subject} {'≥' if op == '>=' else '≤'} {threshold:g}"
        if value is None:
            statuses.append(f"{wanted}: not measured")
            continue
        met = value >= threshold if op == ">=" else value <= threshold
        statuses.append(f"{wanted}: {'met' if met else 'MISSED'}")
    return "; ".join(statuses)


def render_table(bench: Bench) -> str:
    def fmt_ratio(value: float | None) -> str:
        return "—" if value is None else f"{value:.2f}x"

    header = [*PATHS, *RATIOS.values()]
    lines = [f"| measurement | {' | '.join(header)} | target |", "|---|" + "--:|" * len(header) + "---|"]
    for row in rows(bench):
        figures = bench.results.get(row.key, {})
        values = [cell(figures.get(p), row.digits) for p in PATHS]  # a path a suite skips shows "—"
        ratios = [fmt_ratio(ratio(figures, a, b)) for a, b in RATIOS]
        lines.append(f"| {row.label} | {' | '.join(values)} | {' | '.join(ratios)} | {target_status(row, figures)} |")
    return "\n".join(lines)


def render_details(bench: Bench) -> str:
    lines = []
    for row in rows(bench):
        for path in PATHS:
            figure = bench.results.get(row.key, {}).get(path)
            if figure and figure.note:
                lines.append(f"- {row.label}, {path}: {figure.note}")
    errors = [f"- {row.label}, {path}: {figure.error}" for row in rows(bench) for path in PATHS
              if (figure := bench.results.get(row.key, {}).get(path)) and figure.error
              and figure.error not in ("n/a", "unavailable")]
    if errors:
        lines += ["", "¹ Errors:", *errors]
    return scrub("\n".join(lines))


def first_line(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.split("\n")[0].strip()
    except OSError as exc:
        return f"unknown ({exc})"


def machine_info(bench: Bench) -> list[tuple[str, str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    os_release = re.search(r'^PRETTY_NAME="?([^"\n]+)', Path("/etc/os-release").read_text(), re.MULTILINE)
    try:
        pg_version = superuser_sql(bench.state, "SELECT version()")
    except RuntimeError as exc:
        pg_version = f"unknown ({exc})"
    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", model.group(1).strip() if model else platform.processor() or "unknown"),
        ("cores", str(os.cpu_count())),
        ("RAM", f"{int(mem.group(1)) / 1024 / 1024:.1f} GiB" if mem else "unknown"),
        ("OS / kernel", f"{os_release.group(1) if os_release else platform.system()} / {platform.release()}"),
        ("PostgreSQL", pg_version),
        ("pgbench", first_line([tool("pgbench"), "--version"])),
        ("psql", first_line([tool("psql"), "--version"])),
        ("pgbouncer", pgbouncer_version()),
        ("load average (1, 5, 15 min)", "at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}".format(
            *bench.load_at_start, *os.getloadavg())),
        ("load average before each suite", "; ".join(
            f"{suite} {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" for suite, load in bench.suite_loads) or "—"),
        ("Python", f"{platform.python_version()} (psycopg {psycopg.__version__}, libpq {psycopg.pq.version()})"),
    ]


def parameters(bench: Bench) -> list[str]:
    a = bench.args
    payload = bench.payload_bytes
    rules = ", ".join(f"`{rule['name']}` ({rule['action']})" for rule in seed.PIPELINE_GUARDRAILS)
    by_suite = [
        ("pgbench", f"pgbench: `pgbench -n -S --protocol={{simple,prepared}} -c 1 -j 1` and `-c 8 -j 2`, "
         f"`-T {a.duration}`, scale {a.scale} (`pgbench -i -s {a.scale} -I dtGvp` as `app_rw`); one unrecorded "
         f"warm-up run first (direct); for each protocol and client count, {a.rounds} interleaved rounds over the "
         "paths, each round starting one path later, and the median run of each path"),
        ("pgbench", "pgbench -S sends `SELECT abalance FROM pgbench_accounts WHERE aid = <random>`: with "
         "`--protocol=simple` every Query carries a new literal, so no two query texts are alike and the gateway "
         "with guardrails exercises its verdict cache by statement shape (literals stripped: one lookup, not a "
         "parse, per statement); with `--protocol=prepared` each session sends one Parse and then only "
         "Bind/Execute"),
        ("transfer", f"1M-row SELECT: `psql -X -q -A -t -o /dev/null -c \"{SELECT_SQL}\"`, median of {a.repeat} "
         "interleaved rounds over the paths (each round starting one path later, each run once the gateways and moto "
         "are quiet, as for pgbench), wall time of the psql process (its connect included); "
         f"MB/s = {payload.get('select', 0):,} bytes "
         f"of DataRow messages ({payload.get('rows', 0):,} rows) / wall time, 1 MB = 10⁶ bytes"),
        ("transfer", f"COPY OUT: `psql -X -q -A -t -o /dev/null -c \"{COPY_SQL}\"`, the same way; "
         f"MB/s = {payload.get('copy', 0):,} bytes of CopyData messages / wall time"),
        ("masking", f"masked SELECT: `{PEOPLE_SQL}` over `{PEOPLE_TABLE}` ({PEOPLE_ROWS:,} rows: `id int`, `email` "
         f"'user<i>@example.com', `card_number` '{TEST_CARD}', `note` 'note <i>'; created with CREATE TABLE AS "
         f"and VACUUM ANALYZE as the superuser in the demo database, SELECT granted to `{seed.ROLE_RW}`), two of "
         f"its four columns masked by the policy of {GATEWAY_MASKED}: " + "; ".join(
             f"`{rule['name']}` {', '.join(rule['columns'])} → {rule['method']}"
             + (f" (keep_last {rule['keep_last']})" if "keep_last" in rule else "") for rule in MASK_RULES)
         + f"; psql as in the transfer suite, median of {a.repeat} interleaved rounds over the paths, after one "
         "unrecorded warm-up run (direct); before each run (every path) the script waits until the gateways, their "
         "shippers and moto are quiet, as for the transfer suite: the gateway records, seals and ships a 1M-row "
         "session for seconds after it ends, which would otherwise slow whichever run comes next; "
         f"MB/s = {payload.get('people', 0):,} bytes of the clear result's DataRow messages "
         f"({payload.get('people-rows', 0):,} rows) / wall time on every path (the masked result is larger on the "
         "wire: a 34-character hash for each e-mail), so the MB/s ratios are the inverse of the wall-time ratios; "
         f"measured on direct, {GATEWAY_NO_GUARDRAILS} (the same gateway, no masking rules: the fair comparison) and "
         f"{GATEWAY_MASKED}; target masked/direct ≥ 0.5x"),
        ("masking", f"no masked column: `{SELECT_SQL}` ({payload.get('select', 0):,} bytes of DataRows) on "
         f"{GATEWAY_MASKED} (a masking grant, a result with no masked column: the fast path) and "
         f"{GATEWAY_NO_GUARDRAILS}, as above; target masked/gw-no-masking ≥ 0.9x"),
        ("masking", "sanity check before measuring: one row of "
         f"`{PEOPLE_CHECK_SQL}` must come back masked through {GATEWAY_MASKED} (e-mail `h:…`, card number "
         f"`*…{TEST_CARD[-4:]}`) and clear directly, otherwise the suite records an error instead of figures"),
        ("connect", f"connection setup: {a.connections} sequential psycopg `connect()` + `SELECT 1` + `close()` "
         "per path"),
        ("idle", f"idle sessions: {a.idle_sessions} psycopg AsyncConnections opened {a.connect_concurrency} at a "
         "time and left idle; RSS = VmRSS from /proc/<pid>/status of the server process plus its descendants (the "
         "gateway's shipper child; pgbouncer has none), read after a 20-connection warm-up and again 2 s after "
         "all sessions are open; KiB per session = growth / sessions opened"),
    ]
    return [text for suite, text in by_suite if suite in a.suites] + [
        "direct: TCP to 127.0.0.1, `sslmode=disable`, SCRAM-SHA-256 as `app_rw`",
        f"pgbouncer: session pooling, `default_pool_size = {PGBOUNCER_POOL_SIZE}`, `max_client_conn = "
        f"{PGBOUNCER_MAX_CLIENTS}`, `auth_type = scram-sha-256` (plaintext userlist), `sslmode=disable`, "
        "otherwise defaults",
        "pgbouncer+tls: a second pgbouncer process, the same settings plus `client_tls_sslmode = require`, "
        f"`client_tls_cert_file`/`client_tls_key_file` = {bench.pgbouncer_tls_source or 'the gateway certificate'}, "
        "TLS protocols and ciphers at pgbouncer's defaults; clients use `sslmode=require` (no certificate "
        "verification, as for the gateway); pgbouncer to PostgreSQL stays plaintext",
        "gateway: the local stack's gateway (`proctor dev up`) with its default full recording and its default "
        "`PROCTOR_PG_REQUIRE_TLS=true`, `sslmode=require` (the gateway terminates client TLS, as pgbouncer+tls "
        "does), user = grant id, password = grant JWT; the grant of a pipeline token (`repository: "
        f"acme/app`), issued under the seeded policy {bench.grant_policies.get('gateway', 'pipeline-acme-app')} "
        f"with its {len(seed.PIPELINE_GUARDRAILS)} guardrails: {rules}",
        f"{GATEWAY_PLAINTEXT}: a second gateway process the script starts once the stack is up (`python -m "
        "data_plane`, the environment proctor.dev.gateway gives the stack's gateway: the same control plane, "
        "buckets, certificate and settings, full recording) except its own listen and admin ports, its own spool "
        "(`<state dir>/spool-plaintext`) and `PROCTOR_PG_REQUIRE_TLS=false`; clients use `sslmode=disable` "
        "(checked: the session does not use TLS), as for direct and pgbouncer; a grant like the gateway's "
        f"(`repository: acme/app`, run id `{PLAINTEXT_GRANT[1]}`, under "
        f"{bench.grant_policies.get(GATEWAY_PLAINTEXT, 'pipeline-acme-app')}, the same guardrails) with the "
        "connection pointed at this process; its CPU figures are its own process's; stopped (SIGTERM, SIGKILL "
        f"after {PLAINTEXT_GATEWAY_STOP_SECONDS} s) before the stack; measured in the pgbench, transfer and "
        "connect suites (— elsewhere); gw-plain/pgbouncer = gateway (plaintext) ÷ pgbouncer",
        f"{GATEWAY_NO_GUARDRAILS}: the stack's gateway process and settings again (TLS), the grant of a pipeline "
        f"token (`repository: {NO_GUARDRAILS_REPOSITORY}`), issued under "
        f"{bench.grant_policies.get(GATEWAY_NO_GUARDRAILS, NO_GUARDRAILS_POLICY)}, a policy the script creates "
        f"through the API as an admin with the same target (`{seed.DEMO_TARGET}`), backend role "
        f"(`{seed.ROLE_RW}`) and `max_session_seconds` (3600) and no guardrails (nor masking rules), so no "
        "statement is parsed; measured in the pgbench and masking suites only (— elsewhere); gw/gw-no-guardrails "
        "= gateway ÷ gateway (no guardrails), what the guardrails cost",
        f"{GATEWAY_MASKED}: the stack's gateway process and settings again (TLS), the grant of a pipeline token "
        f"(`repository: {MASKED_REPOSITORY}`), issued under "
        f"{bench.grant_policies.get(GATEWAY_MASKED, MASKED_POLICY)}, a policy the script creates like "
        f"{NO_GUARDRAILS_POLICY} (no guardrails) with the masking rules above; measured in the masking suite only "
        f"(— elsewhere); masked/gw-no-masking = {GATEWAY_MASKED} ÷ {GATEWAY_NO_GUARDRAILS}, what masking costs",
        "everything (clients, pgbouncer, gateway, PostgreSQL, moto) shares the same cores",
    ]


LIKE_FOR_LIKE = """The gateway requires client TLS by default and terminates it; pgbouncer is measured in plaintext, so
gateway/pgbouncer (shown for information) includes the cost of client TLS on one side only. The target,
the gateway with full recording ≥ 1.0x pgbouncer, is evaluated on the two like-for-like pairs:
gateway/pgbouncer+tls (both require client TLS) and gw-plain/pgbouncer (both plaintext). The plaintext
listener (`PROCTOR_PG_REQUIRE_TLS=false`) is a supported configuration — e.g. behind a load balancer (NLB)
that terminates TLS, or inside a trusted network — not the default, and gateway (plaintext) is measured only
to compare like with like. Both gateways record everything: the same recording, guardrails and shipping;
only client TLS differs."""


def render_report(bench: Bench) -> str:
    machine = "\n".join(f"| {k} | {v} |" for k, v in machine_info(bench))
    params = "\n".join(f"- {p}" for p in parameters(bench))
    notes = "\n".join(f"- {n}" for n in bench.notes) or "- none"
    command = "scripts/bench_postgres.py " + " ".join(sys.argv[1:])
    return scrub(f"""# PostgreSQL data path benchmarks

Direct vs pgbouncer (session pooling) vs pgbouncer with client TLS vs the Proctor gateway (TLS, full
recording) with guardrails, without (pgbench, masking) and with masking rules (masking), and vs a second
gateway with a plaintext listener (full recording, guardrails; pgbench, transfer, connect), one run against
the same hermetic PostgreSQL.
Generated by `{command.strip()}`; ratios are path ÷ path (for TPS and MB/s above 1x is faster, for times
and latencies above 1x is slower): of paths measured in interleaved rounds (pgbench, transfer, masking), the
median of the per-round ratios, which pairs runs made a minute or two apart; otherwise of the figures as shown.

{LIKE_FOR_LIKE}

{render_table(bench)}

## Details

{render_details(bench) or "- none"}

## Notes

{notes}

## Machine

| | |
|---|---|
{machine}

## Parameters

{params}
""")


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------


def suite_list(value: str) -> tuple[str, ...]:
    wanted = {name.strip() for name in value.split(",") if name.strip()}
    unknown = sorted(wanted - set(SUITES))
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"unknown suite(s) {', '.join(unknown) or '(none given)'}: "
                                         f"choose among {','.join(SUITES)}")
    return tuple(name for name in SUITES if name in wanted)  # always in the usual order


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per pgbench run (default 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of pgbench runs over the paths, median reported (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 s pgbench runs, 200 idle sessions, one run per transfer and masking SELECT")
    parser.add_argument("--skip-gateway", action="store_true",
                        help="measure direct and the two pgbouncers only")
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale (10 = 1M accounts)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per SELECT / COPY (median reported)")
    parser.add_argument("--connections", type=int, default=200, help="sequential connects for the latency")
    parser.add_argument("--idle-sessions", type=int, default=1000)
    parser.add_argument("--connect-concurrency", type=int, default=50, help="idle sessions opened at a time")
    parser.add_argument("--state-dir", default=str(REPO / ".proctor" / "bench"))
    parser.add_argument("--output", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--suites", type=suite_list, default=SUITES, metavar="LIST",
                        help=f"comma-separated suites to run, among {','.join(SUITES)} (default: all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.idle_sessions, args.repeat, args.rounds = 3, 200, 1, 1
    return args


def prepare(bench: Bench, directory: Path) -> None:
    state = bench.state
    password = backend_password(state)
    SECRETS.append(password)
    pg = state["postgres"]
    bench.endpoints["direct"] = Endpoint("direct", pg["host"], int(pg["port"]), seed.ROLE_RW, password, "disable",
                                         pid=state["pids"]["postgres"])
    if "idle" in bench.args.suites:  # only the idle sessions need more than the default
        bench.notes.append(ensure_max_connections(state, bench.args.idle_sessions + 100, directory))
    log(f"pgbench -i -s {bench.args.scale}")
    init_pgbench(bench.endpoints["direct"], bench.args.scale)
    if {"transfer", "masking"} & set(bench.args.suites):  # both measure the SELECT of pgbench_accounts
        bench.payload_bytes = measure_payload_bytes(bench.endpoints["direct"])


def mark_unmeasured_paths(bench: Bench) -> None:
    """The paths no suite of this run measures: they get no pgbouncer, no grant, and "—" in the table."""
    wanted = wanted_paths(bench)
    for path in PATHS:
        if path not in wanted:
            measured_by = [suite for suite in SUITES if path in suite_paths(suite)]
            bench.unavailable[path] = f"measured in the {', '.join(measured_by)} suite(s) only, which this run skips"


def prepare_pgbouncer(bench: Bench, name: str, directory: Path, bouncers: list[PgBouncer]) -> None:
    """pgbouncer (plaintext) or pgbouncer+tls (client TLS required): each its own process and port."""
    if name in bench.unavailable:  # not measured by this run's suites
        return
    tls = name == "pgbouncer+tls"
    direct = bench.endpoints["direct"]
    try:
        bouncer = start_pgbouncer(bench.state, direct.password, tls=tls, stack_tls=directory / "tls")
    except Exception as exc:  # the other paths are still worth measuring
        bench.unavailable[name] = scrub(str(exc))
        print(f"!! {name} not benchmarked: {bench.unavailable[name]}", flush=True)
        return
    bouncers.append(bouncer)
    if tls:
        bench.pgbouncer_tls_source = bouncer.tls_source
    bench.endpoints[name] = Endpoint(name, "127.0.0.1", bouncer.port, seed.ROLE_RW, direct.password,
                                     "require" if tls else "disable", pid=bouncer.proc.pid)


def negotiated_tls(ep: Endpoint) -> str:
    """The TLS protocol and cipher libpq negotiated with the endpoint (psql's \\conninfo)."""
    out = subprocess.run([tool("psql"), "-X", "-q", "-c", "\\conninfo"], env=ep.env(), capture_output=True,
                         text=True, check=False, timeout=60)
    match = re.search(r"SSL connection \(protocol: ([^,]+), cipher: ([^,)]+)", out.stdout)
    if match:
        return f"{match.group(1)} {match.group(2)}"
    return "no TLS?" if out.returncode == 0 else f"unknown (psql exit {out.returncode})"


def prepare_gateway(bench: Bench) -> None:
    """Grants on the same gateway, for the gateway paths this run's suites measure: under pipeline-acme-app
    (guardrails), under a policy without any and under one without guardrails but with masking rules."""
    if bench.args.skip_gateway:
        for name in GATEWAY_GRANTS:
            bench.unavailable[name] = "skipped (--skip-gateway)"
        return
    problem = gateway_problem(bench.state)
    if problem is not None:
        print(f"!! gateway not benchmarked: {problem}", flush=True)
    for name, (repository, run_id, created_policy) in GATEWAY_GRANTS.items():
        if name in bench.unavailable:  # not measured by this run's suites
            continue
        if problem is not None:
            bench.unavailable[name] = problem
            continue
        try:
            if created_policy is not None:
                log(create_policy(bench.state, created_policy))
            endpoint, policy = gateway_endpoint(bench.state, name, repository, run_id)
        except Exception as exc:  # a missing policy or grant is a reason to report, not to abort
            bench.unavailable[name] = scrub(f"could not get a grant: {type(exc).__name__}: {exc}")
            print(f"!! {name} not benchmarked: {bench.unavailable[name]}", flush=True)
            continue
        bench.endpoints[name] = endpoint
        bench.grant_policies[name] = policy
        log(f"{name}: grant under policy {policy}")


def prepare_plaintext_gateway(bench: Bench, directory: Path, started: list[PlaintextGateway]) -> None:
    """Start the second gateway (plaintext listener) and get it a grant like the gateway path's, pointed at it."""
    if GATEWAY_PLAINTEXT in bench.unavailable:  # not measured by this run's suites
        return
    if bench.args.skip_gateway:
        bench.unavailable[GATEWAY_PLAINTEXT] = "skipped (--skip-gateway)"
        return
    log(f"starting {GATEWAY_PLAINTEXT}: a second gateway process, PROCTOR_PG_REQUIRE_TLS=false")
    try:
        gateway = start_plaintext_gateway(bench.state, directory)
    except Exception as exc:  # the other paths are still worth measuring
        bench.unavailable[GATEWAY_PLAINTEXT] = scrub(f"did not start: {type(exc).__name__}: {exc}")
        print(f"!! {GATEWAY_PLAINTEXT} not benchmarked: {bench.unavailable[GATEWAY_PLAINTEXT]}", flush=True)
        return
    started.append(gateway)
    log(f"{GATEWAY_PLAINTEXT}: pid {gateway.proc.pid}, 127.0.0.1:{gateway.port}, admin port {gateway.admin_port}")
    try:
        endpoint, policy = gateway_endpoint(bench.state, GATEWAY_PLAINTEXT, *PLAINTEXT_GRANT)
        endpoint = dataclasses.replace(endpoint, host="127.0.0.1", port=gateway.port, sslmode="disable",
                                       pid=gateway.proc.pid)
        problem = plaintext_problem(endpoint)
    except Exception as exc:  # a missing grant or a refused session is a reason to report, not to abort
        problem = f"{type(exc).__name__}: {exc}"
    if problem is not None:
        bench.unavailable[GATEWAY_PLAINTEXT] = scrub(problem)
        print(f"!! {GATEWAY_PLAINTEXT} not benchmarked: {bench.unavailable[GATEWAY_PLAINTEXT]}", flush=True)
        return
    bench.endpoints[GATEWAY_PLAINTEXT] = endpoint
    bench.grant_policies[GATEWAY_PLAINTEXT] = policy
    log(f"{GATEWAY_PLAINTEXT}: grant under policy {policy}, SELECT 1 without TLS answered")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_open_files_limit(args.idle_sessions * 2 + 256)
    load = os.getloadavg()  # before the stack adds its own
    busy_warning = ""
    if load[0] > NOISY_LOAD:
        busy_warning = (f"!! WARNING: the machine is busy — 1-min load average {load[0]:.2f} on {os.cpu_count()} "
                        f"cores (above {NOISY_LOAD}) before the run starts: every figure will be noisy and the "
                        "comparison unreliable; rerun on an idle machine for figures worth publishing")
        print(busy_warning, flush=True)
    log(f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min) on {os.cpu_count()} cores")
    directory = state_dir(args.state_dir)
    log(f"starting the local stack in {directory}")
    state = start_stack(directory, with_gateway=not args.skip_gateway)
    bench = Bench(args, state, load_at_start=load)
    if bench.load_at_start[0] > 1.0:  # other work on the machine skews every figure
        bench.notes.append(f"the machine was busy at the start (1-min load {bench.load_at_start[0]:.2f} on "
                           f"{os.cpu_count()} cores): expect noise")
    bench.notes.append("the gateway requires client TLS by default (it terminates it) while direct and pgbouncer are "
                       "measured in plaintext, so gateway/direct and gateway/pgbouncer include the cost of client "
                       "TLS; two pairs compare like for like: gateway/pgbouncer+tls (pgbouncer with client TLS "
                       f"required) and gw-plain/pgbouncer ({GATEWAY_PLAINTEXT}: a second gateway process with "
                       "PROCTOR_PG_REQUIRE_TLS=false, a supported configuration behind a TLS-terminating NLB or "
                       "inside a trusted network, measured only for this comparison; it records everything, as the "
                       "gateway does). The target gateway ≥ 1.0x pgbouncer is evaluated on both pairs; "
                       "gateway/pgbouncer is information")
    if "pgbench" in args.suites:
        bench.notes.append(f"gateway and {GATEWAY_NO_GUARDRAILS} are the same gateway process, two grants: under the "
                           f"seeded policy pipeline-acme-app ({len(seed.PIPELINE_GUARDRAILS)} guardrails) and under "
                           f"{NO_GUARDRAILS_POLICY} (none); gw/gw-no-guardrails is what the guardrails cost. "
                           "pgbench -S simple sends a new literal every time, so it measures the verdict cache by "
                           f"statement shape; {GATEWAY_NO_GUARDRAILS} is measured in the pgbench and masking suites "
                           f"only (— in the other rows); {GATEWAY_PLAINTEXT} has the gateway's guardrails")
    if "masking" in args.suites:
        bench.notes.append(f"{GATEWAY_MASKED} is the same gateway process again, a grant under {MASKED_POLICY} (no "
                           f"guardrails, {len(MASK_RULES)} masking rules); {GATEWAY_NO_GUARDRAILS} (no guardrails, no "
                           "masking rules) is the gateway without masking, so masked/gw-no-masking is what masking "
                           "costs: on two masked columns, and on a result with none (the fast path); masked/direct "
                           "includes the gateway's own cost (client TLS, recording) as well")
    skipped = [suite for suite in SUITES if suite not in args.suites]
    if skipped:
        bench.notes.append(f"suites run: {', '.join(args.suites)}; not run (--suites): {', '.join(skipped)}")
    mark_unmeasured_paths(bench)
    bouncers: list[PgBouncer] = []
    plaintext_gateways: list[PlaintextGateway] = []
    try:
        prepare(bench, directory)
        prepare_pgbouncer(bench, "pgbouncer", directory, bouncers)
        prepare_pgbouncer(bench, "pgbouncer+tls", directory, bouncers)
        prepare_gateway(bench)
        prepare_plaintext_gateway(bench, directory, plaintext_gateways)
        gateways = [p for p in GATEWAY_GRANTS if p in bench.endpoints][:1]  # one process: one is enough
        tls_paths = [p for p in ("pgbouncer+tls", *gateways) if p in bench.endpoints]
        if tls_paths:
            bench.notes.append("client TLS negotiated (psql `\\conninfo`, sslmode=require): " + "; ".join(
                f"{p} {negotiated_tls(bench.endpoints[p])}" for p in tls_paths))
        if GATEWAY_PLAINTEXT in bench.endpoints:
            bench.notes.append(f"{GATEWAY_PLAINTEXT}: no client TLS (sslmode=disable; checked before measuring: a "
                               "session that answered SELECT 1 without TLS)")
        bench.notes += [f"{path} not measured: {why}" for path, why in bench.unavailable.items()]
        if bench.grant_policies:
            bench.notes.append("grants: " + "; ".join(f"{path} under policy {policy}"
                                                      for path, policy in bench.grant_policies.items()))
        suites = {"pgbench": run_pgbench_suite, "transfer": run_transfer_suite, "masking": run_masking_suite,
                  "connect": run_connect_suite, "idle": run_idle_suite}
        for suite in args.suites:
            suites[suite](bench)
        report = render_report(bench)
        Path(args.output).write_text(report)
        print("\n" + render_table(bench) + "\n\n" + render_details(bench) + f"\n\nwritten to {args.output}")
        if busy_warning:
            print(busy_warning, flush=True)  # again, so that it is next to the figures
    finally:
        for gateway in plaintext_gateways:  # before `down`: its shipper flushes to the stack's moto
            log(f"stopping {GATEWAY_PLAINTEXT} (pid {gateway.proc.pid})")
            gateway.stop()
        for bouncer in bouncers:
            bouncer.stop()
        with contextlib.suppress(Exception):
            stop_restarted_postgres(read_state(directory) or state)
        down(directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
