"""The gateway's Prometheus metrics (served on the admin port at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry(auto_describe=True)

SESSIONS = Counter("proctor_sessions_total", "Sessions by protocol and outcome", ["protocol", "outcome"],
                   registry=REGISTRY)
ACTIVE_SESSIONS = Gauge("proctor_active_sessions", "Sessions currently open", registry=REGISTRY)
STATEMENTS = Counter("proctor_statements_total", "Statements relayed by protocol and status",
                     ["protocol", "status"], registry=REGISTRY)
BYTES = Counter("proctor_bytes_total", "Bytes relayed by direction", ["protocol", "direction"], registry=REGISTRY)
ERRORS = Counter("proctor_errors_total", "Errors by kind", ["kind"], registry=REGISTRY)
SPOOL_BACKLOG = Gauge("proctor_spool_backlog_bytes", "Evidence bytes spooled but not yet shipped", registry=REGISTRY)
SHIPPING_LAG = Gauge("proctor_shipping_lag_seconds", "Age of the oldest unshipped evidence", registry=REGISTRY)

# Children bound once: looking labels up per statement costs more than counting.
STATEMENTS_OK = STATEMENTS.labels("postgres", "ok")
STATEMENTS_ERROR = STATEMENTS.labels("postgres", "error")
STATEMENTS_SKIPPED = STATEMENTS.labels("postgres", "skipped")
