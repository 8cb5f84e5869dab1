"""Prometheus metrics: what the guard decided, probed and suffered, for dashboards.

Served over HTTP on ``[metrics] listen`` (off when empty). Counters and histograms are
process-wide, as prometheus-client intends; recording one costs well under a
microsecond and never blocks, so the milter records on its hot path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from guard.health import State, TargetHealth

log = logging.getLogger("guard.metrics")

DECISIONS = Counter("mxguard_decisions", "Recipient decisions", ["action", "reason"])
PROBES = Counter("mxguard_probes", "Probe results by class", ["result"])
URGENT_PROBES = Counter("mxguard_urgent_probes", "Out-of-schedule probes a bypass asked for")
TARGETS = Gauge("mxguard_targets", "Targets by aggregated state", ["state"])
STORE_ERRORS = Counter("mxguard_store_errors", "Failed store calls", ["operation"])
STORE_DEGRADED = Gauge(
    "mxguard_store_degraded", "1 while deciding without the shared store (standalone)"
)
CALLBACK_SECONDS = Histogram(
    "mxguard_callback_seconds",
    "Time spent in a milter callback",
    ["callback"],
    # The budget is 250 ms; the interesting part is well below it.
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 1.0),
)
EVIDENCE_LOOKUPS = Counter(
    "mxguard_evidence_lookups", "Bypass evidence lookups (ok, failed, skipped after a fault)",
    ["result"],
)
WITNESS_RECORDS = Counter(
    "mxguard_witness_records", "Client networks a witness wrote or dropped", ["result"]
)
CALLBACK_FAILURES = Counter(
    "mxguard_callback_failures", "Callbacks that raised and let the mail through", ["callback"]
)

LOG_DROPPED = Counter(
    "mxguard_log_dropped", "Log lines lost: the writer fell behind or the sink refused them"
)


def count_targets(healths: Iterable[TargetHealth]) -> None:
    counts = dict.fromkeys(State, 0)
    for h in healths:
        counts[h.state] += 1
    for state, n in counts.items():
        TARGETS.labels(str(state)).set(n)


def serve(listen: str) -> None:
    """Start the HTTP exporter on ``ADDRESS:PORT`` (``[::1]:9901`` for IPv6)."""
    host, _, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    start_http_server(int(port), addr=host)
    log.info("metrics on http://%s/metrics", listen)
