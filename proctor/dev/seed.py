"""What the local stack seeds: the demo database's schema and data, its backend roles (whose
passwords live only in Secrets Manager), the dev issuer, the demo target, the policies the demo
and the tests use, and the approver directory (who the `approvers` group's emails go to)."""

from __future__ import annotations

import secrets
from typing import Any

from control_plane.models import IssuerSpec, PolicySpec, TargetSpec
from control_plane.store import ConfigStore
from proctor.dev.oidc_issuer import AUDIENCE
from proctor.dev.postgres import HermeticPostgres

DEMO_TARGET = "demo-pg"
APPROVER_GROUP = "approvers"
# Subjects equal the emails: the dev issuer mints `--sub ann.approver@example.com` with that email.
APPROVERS = ("ann.approver@example.com", "bob.approver@example.com")
DEMO_DATABASE = "app"
ROLE_RW = "app_rw"
ROLE_RO = "app_ro"

# Fake people. Card numbers are the networks' published test numbers (they pass Luhn).
CUSTOMERS = [
    ("Ada Lovelace", "ada@example.com", "+1-202-555-0101", "4111111111111111", "078-05-1120"),
    ("Alan Turing", "alan@example.com", "+1-202-555-0102", "5555555555554444", "219-09-9999"),
    ("Grace Hopper", "grace@example.com", "+1-202-555-0103", "378282246310005", "457-55-5462"),
    ("Edsger Dijkstra", "edsger@example.com", "+31-20-555-0104", "6011111111111117", "123-45-6789"),
    ("Barbara Liskov", "barbara@example.com", "+1-617-555-0105", "4012888888881881", "321-54-9876"),
    ("Donald Knuth", "don@example.com", "+1-650-555-0106", "5105105105105100", "555-12-3456"),
]

SCHEMA_SQL = """
CREATE TABLE customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL UNIQUE,
    phone text,
    card_number text,
    ssn text,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers(id),
    amount numeric(10, 2) NOT NULL,
    status text NOT NULL DEFAULT 'new',
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def seed_database(pg: HermeticPostgres) -> dict[str, str]:
    """Create the demo database and its two roles; returns role → password (for Secrets Manager)."""
    passwords = {ROLE_RW: secrets.token_urlsafe(24), ROLE_RO: secrets.token_urlsafe(24)}
    for role, password in passwords.items():
        pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD {_literal(password)}")
    pg.psql(f"CREATE DATABASE {DEMO_DATABASE} OWNER {ROLE_RW}")
    rows = ",\n".join("(" + ", ".join(_literal(v) for v in c) + ")" for c in CUSTOMERS)
    orders = ",\n".join(f"({i % len(CUSTOMERS) + 1}, {10 + i * 7.5:.2f}, 'new')" for i in range(12))
    pg.psql(
        f"SET ROLE {ROLE_RW};\n{SCHEMA_SQL}\n"
        f"INSERT INTO customers (name, email, phone, card_number, ssn) VALUES\n{rows};\n"
        f"INSERT INTO orders (customer_id, amount, status) VALUES\n{orders};\n"
        f"GRANT USAGE ON SCHEMA public TO {ROLE_RO};\n"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {ROLE_RO};",
        database=DEMO_DATABASE,
    )
    return passwords


def demo_secret_name(role: str) -> str:
    return f"proctor/{DEMO_TARGET}/{role}"


def seed_config(config: ConfigStore, *, issuer_url: str, pg_host: str, pg_port: int, gateway_host: str,
                gateway_port: int, region: str) -> None:
    config.put_issuer(IssuerSpec(
        issuer=issuer_url, audiences=[AUDIENCE], jwks_uri=f"{issuer_url}/.well-known/jwks.json",
        algorithms=["RS256"],
    ).model_dump(exclude_none=True))
    config.put_target(TargetSpec(
        name=DEMO_TARGET, kind="postgres", region=region,
        endpoint={"host": pg_host, "port": pg_port},
        gateway={"host": gateway_host, "port": gateway_port},
        secret_id=demo_secret_name(ROLE_RO),
        role_secrets={ROLE_RW: demo_secret_name(ROLE_RW), ROLE_RO: demo_secret_name(ROLE_RO)},
        database=DEMO_DATABASE, backend_user=ROLE_RO, backend_tls="disable",
        description="Local demo PostgreSQL (hermetic, SCRAM)",
    ).model_dump())
    for policy in demo_policies(issuer_url):
        config.put_policy(policy.model_dump(), author="seed")
    config.put_approver_group({"group": APPROVER_GROUP, "members": [{"email": e, "subject": e} for e in APPROVERS],
                               "updated_by": "seed", "updated_at": 0})


PIPELINE_GUARDRAILS: list[dict[str, Any]] = [
    {"name": "no-ddl", "action": "block", "match": {"classes": ["ddl"]},
     "description": "pipelines do not change the schema outside migrations"},
    {"name": "no-dcl", "action": "block", "match": {"classes": ["dcl"]},
     "description": "roles and privileges are managed by the platform team"},
    {"name": "no-side-effect-functions", "action": "block", "match": {"denied_functions": True},
     "description": "functions that reach outside the query (files, other sessions, settings) are not allowed"},
    {"name": "no-copy-program", "action": "block", "match": {"copy_program": True},
     "description": "COPY to or from a server program is not allowed"},
    {"name": "no-unscoped-writes", "action": "block", "match": {"commands": ["UPDATE", "DELETE"], "no_where": True},
     "description": "UPDATE and DELETE need a WHERE clause"},
    {"name": "changes-need-approval", "action": "require_approval", "match": {"commands": ["UPDATE", "DELETE"]},
     "description": "updates and deletes by pipelines are reviewed by an approver"},
    {"name": "log-writes", "action": "log", "match": {"classes": ["write"]}},
]
# Engineers read customers with regulated columns masked: emails keyed-hashed (joins and GROUP BY
# still work), card numbers with their last 4 digits, SSNs redacted; values without lineage
# (expressions, JSON built from rows) go through the content detectors.
READER_MASKING: list[dict[str, Any]] = [
    {"name": "pii-email", "columns": ["*.customers.email"], "method": "hash"},
    {"name": "pci-card", "columns": ["*.*.card_number"], "method": "partial", "keep_last": 4},
    {"name": "pii-ssn", "columns": ["*.*.ssn"], "method": "redact"},
    {"name": "pii-phone", "columns": ["*.customers.phone"], "method": "partial", "keep_last": 2},
    {"name": "pii-detected", "detectors": ["email", "card_number", "us_ssn", "phone"], "method": "redact"},
]
READER_GUARDRAILS: list[dict[str, Any]] = [
    {"name": "read-only", "action": "block", "match": {"classes": ["write", "ddl", "dcl", "procedural"]},
     "description": "this policy grants read access only"},
    {"name": "no-side-effect-functions", "action": "block", "match": {"denied_functions": True},
     "description": "functions that reach outside the query (files, other sessions, settings) are not allowed"},
]


def demo_policies(issuer_url: str) -> list[PolicySpec]:
    approvers: dict[str, Any] = {"approver_groups": [APPROVER_GROUP], "approvals_required": 1,
                                 "timeout_seconds": 900}
    return [
        PolicySpec(
            name="pipeline-acme-app",
            description="CI pipelines of acme/app deploy to demo-pg",
            subjects=[{"issuer": issuer_url, "claims": {"repository": "acme/app"}}],
            targets=[DEMO_TARGET], backend_role=ROLE_RW, access="read_write",
            max_session_seconds=3600, approval=approvers, guardrails=PIPELINE_GUARDRAILS,
        ),
        PolicySpec(
            name="engineers-read",
            description="Engineers read demo-pg",
            subjects=[{"issuer": issuer_url, "groups": ["engineers"]}],
            targets=[DEMO_TARGET], backend_role=ROLE_RO, access="read",
            max_session_seconds=3600, approval=approvers, guardrails=READER_GUARDRAILS,
            masking=READER_MASKING,
        ),
    ]
