"""Prometheus metrics.

Under gunicorn the `serve` command sets PROMETHEUS_MULTIPROC_DIR before workers start, and
/metrics aggregates every worker's files (prometheus-client's multi-process mode); in a single
process the default registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram,
                               generate_latest, multiprocess)

REQUESTS = Counter("cds_requests_total", "CDS Hooks requests by service and HTTP status",
                   ["service", "status"])
LATENCY = Histogram("cds_request_duration_seconds", "Hook request duration (server side)",
                    ["service", "status"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
CARDS_ISSUED = Counter("cds_cards_issued_total", "Cards returned, by card kind", ["kind"])
CARDS_WITHHELD = Counter("cds_cards_withheld_total",
                         "Cards the rules chose but the alert policy withheld, by kind and delivery"
                         " (silent, suppressed, locked-out)", ["kind", "delivery"])
BUSY_REFUSALS = Counter("cds_busy_refusals_total",
                        "Requests answered 503 because the worker's body budget (CDS_BODY_BUDGET_BYTES)"
                        " stayed full for CDS_BODY_BUDGET_WAIT seconds")
FHIR_CALLS = Counter("cds_fhir_fallback_calls_total", "FHIR server requests made for missing prefetch")
FHIR_FAILURES = Counter("cds_fhir_fallback_failures_total",
                        "Prefetch keys that could not be fetched from the FHIR server")


def render() -> tuple[bytes, str]:
    """The exposition text (all workers' metrics under gunicorn)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
