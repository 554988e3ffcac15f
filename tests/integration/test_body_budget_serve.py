"""The body budget under the production server (`b12-cds serve` on 127.0.0.1): requests are
admitted by the bytes of their bodies, wait for room, and are refused with a 503 when none is
made in time; a worker's peak memory under 8 concurrent large requests stays near that of one.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
import requests

from bench.common import card_problems
from bench.memory import _hwm_mib, _reset_hwm, ehr_shaped_body
from bench.patients import all_patients, hook_body
from bench.servers import rss_mib
from tests.servers import HOST, ServerProcess, free_port, http_ok

pytestmark = pytest.mark.integration
B12_CDS = str(Path(sys.executable).with_name("b12-cds"))
PV = "/cds-services/b12-neck-pain-patient-view"
ORIGIN = "https://ehr.example.org"
JSON = {"Content-Type": "application/json"}


def start(tmp_path: Path, **env_extra: str) -> tuple[ServerProcess, str]:
    port = free_port()
    env = {**os.environ, "CDS_DATA_DIR": str(tmp_path / "data"), "CDS_AUTH_DISABLED": "1",
           "CDS_WORKERS": "1", "CDS_LOG_LEVEL": "WARNING", "CDS_CORS_ORIGINS": ORIGIN,
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), **env_extra}
    server = ServerProcess([B12_CDS, "serve", "--bind", f"{HOST}:{port}"], env=env,
                           log_path=tmp_path / "serve.log")
    server.start(http_ok(f"http://{HOST}:{port}/healthz"), timeout=30)
    return server, f"http://{HOST}:{port}"


def worker_pid(server: ServerProcess) -> int:
    import psutil

    (worker,) = psutil.Process(server.proc.pid).children()
    return worker.pid


def padded(body: bytes, size: int) -> bytes:
    """`body` (a JSON object) padded with whitespace to exactly `size` bytes: still valid JSON."""
    return body + b" " * (size - len(body))


class HeldBody:
    """A client that sends its headers and part of its body, then waits: its whole declared
    length is held in the budget meanwhile."""

    def __init__(self, base: str, body: bytes, first: int = 1000) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.body, self.first = body, first
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        head = (f"POST {PV} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.sock.sendall(head + body[:first])

    def finish(self) -> tuple[int, bytes]:
        self.sock.sendall(self.body[self.first:])
        data = b""
        while chunk := self.sock.recv(65536):
            data += chunk
        self.sock.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), payload


def test_budget_admits_waits_and_refuses_on_the_real_server(tmp_path):
    small, typical = (hook_body(p) for p in all_patients() if p.size in ("small", "typical"))
    assert len(typical) > 200_000
    budget = 600_000
    server, base = start(tmp_path, CDS_BODY_BUDGET_BYTES=str(budget), CDS_BODY_BUDGET_WAIT="1.0")
    try:
        pid = worker_pid(server)
        held = HeldBody(base, padded(small, 500_000))
        time.sleep(0.5)  # its headers are in: 500,000 of the 600,000 bytes are held

        # Fits beside it: admitted.  No body: never waits.
        resp = requests.post(base + PV, data=small, headers=JSON, timeout=10)
        assert resp.status_code == 200 and not card_problems(resp.content)
        t0 = time.monotonic()
        assert requests.get(base + "/healthz", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 0.9

        # Does not fit: waits the 1 s, then 503 + Retry-After, JSON, CORS, from the front.
        t0 = time.monotonic()
        busy = requests.post(base + PV, data=typical, headers={**JSON, "Origin": ORIGIN}, timeout=10)
        waited = time.monotonic() - t0
        assert busy.status_code == 503, busy.text[:300]
        assert 0.9 <= waited < 5
        assert int(busy.headers["Retry-After"]) >= 1
        assert busy.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert busy.headers["Cache-Control"] == "no-store"
        outcome = busy.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["code"] == "throttled"

        # Waits, and gets in when the held body is finished and answered.
        result: dict[str, requests.Response] = {}
        waiter = threading.Thread(target=lambda: result.setdefault(
            "r", requests.post(base + PV, data=typical, headers=JSON, timeout=10)))
        t0 = time.monotonic()
        waiter.start()
        time.sleep(0.3)
        status, payload = held.finish()
        assert status == 200 and not card_problems(payload)
        waiter.join(10)
        assert result["r"].status_code == 200 and not card_problems(result["r"].content)
        assert time.monotonic() - t0 >= 0.3

        # Larger than the budget but within the body limit: admitted when it is alone.
        alone = requests.post(base + PV, data=padded(small, 700_000), headers=JSON, timeout=10)
        assert alone.status_code == 200 and not card_problems(alone.content)

        metrics = requests.get(base + "/metrics", timeout=5).text
        assert "cds_busy_refusals_total 1.0" in metrics
        assert worker_pid(server) == pid  # nothing crashed or restarted
    finally:
        server.stop()
    log = (tmp_path / "serve.log").read_text()
    assert '"event":"busy"' in log and "Traceback" not in log


def test_peak_memory_under_8_concurrent_large_requests_stays_near_one_request(tmp_path):
    body, _, count = ehr_shaped_body(3000)
    assert count == 3000 and len(body) > 4 * 1024 * 1024
    # A budget of one such body: the 8 requests are processed one after the other.
    server, base = start(tmp_path, CDS_BODY_BUDGET_BYTES=str(len(body) + 1), CDS_BODY_BUDGET_WAIT="120")
    try:
        pid = worker_pid(server)
        warm = ehr_shaped_body(300)[0]
        for _ in range(3):
            assert requests.post(base + PV, data=warm, headers=JSON, timeout=60).status_code == 200
        rest = rss_mib(pid)
        if not _reset_hwm(pid):
            pytest.fail("cannot reset the worker's VmHWM (/proc/PID/clear_refs)")
        one = requests.post(base + PV, data=body, headers=JSON, timeout=120)
        assert one.status_code == 200 and not card_problems(one.content)
        growth_one = _hwm_mib(pid) - rest

        _reset_hwm(pid)
        statuses: list[int] = []
        problems: list[str] = []

        def client() -> None:
            resp = requests.post(base + PV, data=body, headers=JSON, timeout=180)
            statuses.append(resp.status_code)
            problems.extend(card_problems(resp.content))

        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
        growth_eight = _hwm_mib(pid) - rest
        assert statuses == [200] * 8 and not problems
        # Four threads parsing at once would need about 4x the growth of one request; one body
        # at a time stays close to 1x.  Generous: allocator noise, gunicorn's 256 KiB read-ahead
        # per waiting connection.
        assert growth_eight < 2 * growth_one + 40, (growth_one, growth_eight)
        assert worker_pid(server) == pid
    finally:
        server.stop()
