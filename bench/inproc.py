"""Part 1: in-process service time of patient-view with full prefetch vs. the baseline endpoint.

Both apps live in this process and are driven by Flask's test client with the same request
bytes; calls alternate (baseline, service, baseline, ...) so drift hits both alike.  Before any
timing, the service must answer the expected card, identically on every check call.
"""

from __future__ import annotations

import gc
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import orjson

from bench.baseline_app import create_baseline_app, reading_floor_app
from bench.common import HOOK_PATH, card_problems, normalise_cards, percentile, silence_service_logs
from bench.patients import Patient, hook_body


class BenchError(RuntimeError):
    """The service did not answer what the benchmark expects: nothing is timed."""


@dataclass
class InprocRow:
    size: str
    resources: int
    body_bytes: int
    calls: int
    service_p50_ms: float
    service_p99_ms: float
    baseline_p50_ms: float
    baseline_p99_ms: float
    card_summary: str
    floor_p50_ms: float = float("nan")
    """The reading floor (`bench.baseline_app.reading_floor_app`: no Flask), for reference."""

    @property
    def ratio_p50(self) -> float:
        return self.service_p50_ms / self.baseline_p50_ms

    @property
    def ratio_p99(self) -> float:
        return self.service_p99_ms / self.baseline_p99_ms

    @property
    def floor_ratio_p50(self) -> float:
        return self.service_p50_ms / self.floor_p50_ms

    @property
    def us_per_resource(self) -> float:
        """Service time above the baseline (p50) per resource, in microseconds."""
        return max(0.0, self.service_p50_ms - self.baseline_p50_ms) * 1000 / self.resources


def make_service_app(data_dir: str, **overrides: Any) -> Any:
    from cds_service import create_app

    config: dict[str, Any] = {"data_dir": data_dir, "auth_disabled": True}
    config.update(overrides)
    silence_service_logs()
    app = create_app(config)
    silence_service_logs()
    return app


def check_cards(client: Any, raw: bytes, checks: int = 3) -> tuple[bytes, str]:
    """Call the service `checks` times; raise unless every answer is the same expected card."""
    first: bytes | None = None
    summary = ""
    for i in range(checks):
        resp = client.post(HOOK_PATH, data=raw, content_type="application/json", buffered=True)
        if resp.status_code != 200:
            raise BenchError(f"service answered {resp.status_code}: {resp.get_data(as_text=True)[:300]}")
        payload = resp.get_data()
        problems = card_problems(payload)
        if problems:
            raise BenchError("; ".join(problems))
        norm = normalise_cards(payload)
        if first is None:
            first = norm
            summary = orjson.loads(payload)["cards"][0]["summary"]
        elif norm != first:
            raise BenchError(f"cards differ between call 1 and call {i + 1}")
    return first or b"", summary


def _time_calls(client: Any, raw: bytes, n: int) -> list[float]:
    out = []
    post = client.post
    for _ in range(n):
        t0 = time.perf_counter()
        # buffered: the body is consumed and the response closed, as a WSGI server does
        resp = post(HOOK_PATH, data=raw, content_type="application/json", buffered=True)
        out.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200:
            raise BenchError(f"status {resp.status_code} during timing")
    return out


def run_inprocess(patients: list[Patient], iterations: dict[str, int], *, warmup: int = 20,
                  data_dir: str | None = None, **overrides: Any) -> tuple[list[InprocRow], dict[str, bytes]]:
    """Time every patient; returns the rows and each patient's normalised cards."""
    tmp = tempfile.TemporaryDirectory(prefix="b12-bench-") if data_dir is None else None
    try:
        app = make_service_app(data_dir or tmp.name, **overrides)  # type: ignore[union-attr]
        service = app.test_client()
        baseline = create_baseline_app().test_client()
        from werkzeug.test import Client
        from werkzeug.wrappers import Response

        floor = Client(reading_floor_app, Response)
        rows: list[InprocRow] = []
        cards: dict[str, bytes] = {}
        for patient in patients:
            raw = (hook_body(patient, hook_instance=f"bench-{patient.size}"))
            cards[patient.size], summary = check_cards(service, raw)
            base_check = baseline.post(HOOK_PATH, data=raw, content_type="application/json")
            if base_check.get_json() != {"cards": []}:
                raise BenchError("baseline app did not answer {\"cards\": []}")
            n = iterations[patient.size]
            _time_calls(service, raw, min(warmup, n))
            _time_calls(baseline, raw, min(warmup, n))
            _time_calls(floor, raw, min(warmup, n))
            gc.collect()
            svc_ms: list[float] = []
            base_ms: list[float] = []
            floor_ms: list[float] = []
            chunk = 10
            for start in range(0, n, chunk):  # alternate in small chunks
                k = min(chunk, n - start)
                base_ms += _time_calls(baseline, raw, k)
                svc_ms += _time_calls(service, raw, k)
                floor_ms += _time_calls(floor, raw, k)
            rows.append(InprocRow(
                size=patient.size, resources=patient.resource_count, body_bytes=len(raw), calls=n,
                service_p50_ms=percentile(svc_ms, 0.5), service_p99_ms=percentile(svc_ms, 0.99),
                baseline_p50_ms=percentile(base_ms, 0.5), baseline_p99_ms=percentile(base_ms, 0.99),
                card_summary=summary, floor_p50_ms=percentile(floor_ms, 0.5)))
        app.extensions["cds"].store.close() if hasattr(app.extensions["cds"].store, "close") else None
        return rows, cards
    finally:
        if tmp is not None:
            tmp.cleanup()
