"""Part 2: throughput and latency over HTTP (127.0.0.1), service vs. baseline under the same server.

Closed-loop load: `concurrency` client threads, each with its own pooled `requests.Session`
(keep-alive), send the same patient-view request back to back for `seconds`, capped at
`max_requests` per round.  Rounds alternate baseline / service so drift hits both alike.
The client runs on the same machine (loopback), so it takes CPU from the servers in both cases.
"""

from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

from bench.common import HOOK_PATH, card_problems, free_port, percentile
from bench.servers import Server, baseline_server, rss_mib, service_server

HEADERS = {"Content-Type": "application/json"}


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def add(self, other: "LoadResult") -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.latencies_ms += other.latencies_ms


@dataclass
class HttpRow:
    model: str
    concurrency: int
    baseline: LoadResult
    service: LoadResult
    service_rss_mib: list[float]
    baseline_rss_mib: list[float]

    @property
    def throughput_ratio(self) -> float:
        return self.service.rps / self.baseline.rps if self.baseline.rps else 0.0


def _session(concurrency: int) -> requests.Session:
    s = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=concurrency)
    s.mount("http://", adapter)
    return s


def load(url: str, raw: bytes, *, concurrency: int, seconds: float, max_requests: int) -> LoadResult:
    """Closed-loop load; a non-200 answer counts as an error."""
    result = LoadResult()
    lock = threading.Lock()
    budget = [max_requests]
    start = time.perf_counter()
    stop_at = start + seconds

    def worker() -> None:
        session = _session(1)
        mine: list[float] = []
        errors = 0
        try:
            while time.perf_counter() < stop_at:
                with lock:
                    if budget[0] <= 0:
                        break
                    budget[0] -= 1
                t0 = time.perf_counter()
                try:
                    resp = session.post(url, data=raw, headers=HEADERS, timeout=30)
                    ok = resp.status_code == 200
                    resp.content  # noqa: B018 - read the whole answer
                except requests.RequestException:
                    ok = False
                mine.append((time.perf_counter() - t0) * 1000)
                errors += not ok
        finally:
            session.close()
            with lock:
                result.latencies_ms += mine
                result.errors += errors

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    result.seconds = time.perf_counter() - start
    result.requests = len(result.latencies_ms)
    return result


def _warm(server: Server, raw: bytes, n: int, check_card: bool) -> None:
    session = _session(1)
    try:
        for _ in range(n):
            resp = session.post(server.url + HOOK_PATH, data=raw, headers=HEADERS, timeout=30)
            if resp.status_code != 200:
                raise RuntimeError(f"{server.name} answered {resp.status_code}: {resp.text[:300]}")
            if check_card and card_problems(resp.content):
                raise RuntimeError(f"{server.name}: {card_problems(resp.content)}")
    finally:
        session.close()


def run_http(raw: bytes, *, workers: int = 2, concurrency: int = 4, seconds: float = 6.0,
             rounds: int = 2, max_requests: int = 20000, log_dir: Path | None = None,
             model: str = "serve") -> HttpRow:
    """Service vs. baseline, both under the serving `model` (bench.servers.MODELS)."""
    with tempfile.TemporaryDirectory(prefix="b12-bench-http-") as tmp:
        logs = log_dir or Path(tmp)
        with service_server(free_port(), workers, str(Path(tmp) / "data"), logs / f"service-{model}.log",
                            model=model) as svc, \
                baseline_server(free_port(), workers, logs / f"baseline-{model}.log", model=model) as base:
            # Warm every worker (requests spread over workers by the kernel's accept queue).
            _warm(svc, raw, 10 * workers, check_card=True)
            _warm(base, raw, 10 * workers, check_card=False)
            load(svc.url + HOOK_PATH, raw, concurrency=concurrency, seconds=1.0, max_requests=200)
            load(base.url + HOOK_PATH, raw, concurrency=concurrency, seconds=1.0, max_requests=200)
            total_base, total_svc = LoadResult(), LoadResult()
            for _ in range(rounds):
                total_base.add(load(base.url + HOOK_PATH, raw, concurrency=concurrency,
                                    seconds=seconds / rounds, max_requests=max_requests))
                total_svc.add(load(svc.url + HOOK_PATH, raw, concurrency=concurrency,
                                   seconds=seconds / rounds, max_requests=max_requests))
            svc_rss = [rss_mib(pid) for pid in svc.worker_pids()]
            base_rss = [rss_mib(pid) for pid in base.worker_pids()]
    return HttpRow(model=model, concurrency=concurrency, baseline=total_base, service=total_svc,
                   service_rss_mib=svc_rss, baseline_rss_mib=base_rss)


def summary(r: LoadResult) -> dict[str, float]:
    return {"rps": r.rps, "p50": percentile(r.latencies_ms, 0.5), "p99": percentile(r.latencies_ms, 0.99),
            "requests": r.requests, "errors": r.errors}
