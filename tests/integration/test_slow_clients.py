"""Slow and idle clients cannot stop the production server (`b12-cds serve`, the Dockerfile's
CMD) from answering `/healthz` and the hooks.

Under the former serving model (gunicorn gthread, 2 workers x 4 threads) 16 connections
sending their headers a byte a second stopped every answer; the asyncio workers keep such
connections in the event loop, where they cost memory, not threads.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import orjson
import pytest
import requests

from bench.patients import all_patients, hook_body
from bench.slow_clients import IdleKeepAliveClients, SlowHeaderClients, probe
from tests.integration.test_serve import dockerfile_cmd
from tests.servers import HOST, ServerProcess, free_port, http_ok

pytestmark = pytest.mark.integration
B12_CDS = str(Path(sys.executable).with_name("b12-cds"))


def start_server(tmp_path: Path, **env_extra: str) -> tuple[ServerProcess, int]:
    port = free_port()
    cmd = dockerfile_cmd()
    env = {**os.environ, "CDS_DATA_DIR": str(tmp_path / "data"), "CDS_BIND": f"{HOST}:{port}",
           "CDS_AUTH_DISABLED": "1", "CDS_WORKERS": "2", "CDS_LOG_LEVEL": "WARNING",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"), **env_extra}
    server = ServerProcess([B12_CDS, *cmd[1:]], env=env, log_path=tmp_path / "serve.log")
    server.start(http_ok(f"http://{HOST}:{port}/healthz"), timeout=30)
    return server, port


def _p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, port = start_server(tmp_path_factory.mktemp("slow"))
    try:
        yield port
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def card_request() -> bytes:
    """A patient-view call that answers 200 with a card (full prefetch, no FHIR server)."""
    return hook_body(next(p for p in all_patients() if p.size == "small"))


def test_64_slow_header_connections_held_30s_do_not_stop_health_or_hooks(server, card_request):
    base = f"http://{HOST}:{server}"
    with SlowHeaderClients(HOST, server, count=64, interval=1.0) as slow:
        time.sleep(1.0)  # every connection is open and has started its headers
        result = probe(base, 30.0, hook_body=card_request, every=0.5, timeout=5.0)
    assert not result.failures, result.failures[:5]
    assert len(result.health_ms) >= 40 and len(result.hook_ms) >= 40
    # Within a second, judged at the 95th percentile with a hard ceiling well below the probe
    # timeout: the 64 dripping clients, the probes and the server share the machine's 2 cores,
    # so one scheduling hiccup must not fail the claim.  The old model failed every probe (5 s
    # timeouts), so the two outcomes stay far apart.
    for samples in (result.health_ms, result.hook_ms):
        assert _p95(samples) < 1000, sorted(samples)[-5:]
        assert max(samples) < 2500, sorted(samples)[-5:]
    # The pressure really was on: 64 connections dripping for the whole 30 s (a connection the
    # server cut at its header timeout was reopened at once).
    assert slow.bytes_sent >= 64 * 28


def test_many_idle_keep_alive_connections_do_not_stop_health_or_hooks(server, card_request):
    base = f"http://{HOST}:{server}"
    with IdleKeepAliveClients(HOST, server, count=400) as idle:
        assert idle.answered == 400  # each one was served, then left open and idle
        result = probe(base, 4.0, hook_body=card_request, every=0.25, timeout=5.0)
    assert not result.failures, result.failures[:5]
    assert result.worst_ms < 2500


def test_a_connection_that_never_finishes_its_headers_gets_408_and_is_closed(tmp_path):
    proc, port = start_server(tmp_path, CDS_REQUEST_HEADER_TIMEOUT="1")
    try:
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(b"POST /cds-services/b12-neck-pain-patient-view HTTP/1.1\r\nHost: x\r\nX-Slow: a")
            started = time.monotonic()
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes the connection
                answer += chunk
            waited = time.monotonic() - started
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert b"Content-Type: application/json" in head and b"Access-Control-Allow-Origin: *" in head
        assert orjson.loads(body)["resourceType"] == "OperationOutcome"
        assert 0.5 < waited < 5
        assert requests.get(f"http://{HOST}:{port}/healthz", timeout=5).status_code == 200
    finally:
        proc.stop()


def test_a_body_sent_too_slowly_gets_408_outcome(tmp_path):
    proc, port = start_server(tmp_path, CDS_REQUEST_BODY_TIMEOUT="1")
    try:
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(b"POST /cds-services/b12-neck-pain-patient-view HTTP/1.1\r\nHost: x\r\n"
                         b"Origin: https://ehr.example.org\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408")
        assert b"access-control-allow-origin: *" in head.lower()
        assert "not received in time" in orjson.loads(body)["issue"][0]["diagnostics"]
        metrics = requests.get(f"http://{HOST}:{port}/metrics", timeout=5).text
        assert 'cds_requests_total{service="b12-neck-pain-patient-view",status="408"} 1.0' in metrics
    finally:
        proc.stop()
