"""The gateway's Prometheus metrics (served on the admin port at /metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)


class Tally:
    """One labelled counter kept as a plain integer, read at scrape time: counting a statement
    costs an addition (`tally.value += 1`) rather than a lock. The event loop's thread only.
    `sources` add what others count (the C data path's counters) at scrape time."""

    __slots__ = ("sources", "value")

    def __init__(self) -> None:
        self.value = 0
        self.sources: list[Callable[[], int]] = []

    def total(self) -> int:
        return self.value + sum(source() for source in self.sources)


class TallyCounter:
    """A Prometheus counter family of Tallies: exposed like a Counter (`<name>_total`)."""

    def __init__(self, name: str, documentation: str, labelnames: list[str], *, registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.tallies: dict[tuple[str, ...], Tally] = {}
        registry.register(self)

    def labels(self, *values: str) -> Tally:
        return self.tallies.setdefault(values, Tally())

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, tally in sorted(self.tallies.items()):
            family.add_metric(list(values), tally.total())
        yield family


SESSIONS = Counter("proctor_sessions_total", "Sessions by protocol and outcome", ["protocol", "outcome"],
                   registry=REGISTRY)
ACTIVE_SESSIONS = Gauge("proctor_active_sessions", "Sessions currently open", registry=REGISTRY)
STATEMENTS = TallyCounter("proctor_statements", "Statements relayed by protocol and status",
                          ["protocol", "status"], registry=REGISTRY)
BYTES = Counter("proctor_bytes_total", "Bytes relayed by direction", ["protocol", "direction"], registry=REGISTRY)
ERRORS = Counter("proctor_errors_total", "Errors by kind", ["kind"], registry=REGISTRY)
FAST_PATH = Counter("proctor_fast_path_total", "PostgreSQL sessions the C data path took over (adopted), ended "
                    "(ended) or handed back to the Python relay (ejected); statements it had judged (judged)",
                    ["event"], registry=REGISTRY)
SPOOL_BACKLOG = Gauge("proctor_spool_backlog_bytes", "Evidence bytes spooled but not yet shipped", registry=REGISTRY)
SHIPPING_LAG = Gauge("proctor_shipping_lag_seconds", "Age of the oldest unshipped evidence", registry=REGISTRY)

# Tallies bound once: looking labels up per statement costs more than counting.
STATEMENTS_OK = STATEMENTS.labels("postgres", "ok")
STATEMENTS_ERROR = STATEMENTS.labels("postgres", "error")
STATEMENTS_SKIPPED = STATEMENTS.labels("postgres", "skipped")
