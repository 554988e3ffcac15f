"""The production start command (the Dockerfile's CMD, `b12-cds serve`) really serves the app
under gunicorn, with metrics aggregated across worker processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import orjson
import requests

from tests.servers import ServerProcess, free_port, http_ok

pytestmark = pytest.mark.integration
B12_CDS = str(Path(sys.executable).with_name("b12-cds"))


def dockerfile_cmd() -> list[str]:
    text = (Path(__file__).resolve().parents[2] / "Dockerfile").read_text()
    match = re.search(r'^CMD \[(.*)\]\s*$', text, re.MULTILINE)
    assert match, "Dockerfile has no exec-form CMD"
    return [part.strip().strip('"') for part in match.group(1).split(",")]


@pytest.fixture
def server(tmp_path):
    port = free_port()
    cmd = dockerfile_cmd()
    assert cmd[:2] == ["b12-cds", "serve"]
    env = {**os.environ, "CDS_DATA_DIR": str(tmp_path / "data"), "CDS_BIND": f"127.0.0.1:{port}",
           "CDS_AUTH_DISABLED": "1", "CDS_WORKERS": "2",
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    server = ServerProcess([B12_CDS, *cmd[1:]], env=env, log_path=tmp_path / "serve.log")
    with server.start(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30):
        yield f"http://127.0.0.1:{port}", server.proc


def test_docker_start_command_serves_health_discovery_and_metrics(server):
    base, proc = server
    health = requests.get(f"{base}/healthz", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    disco = requests.get(f"{base}/cds-services", timeout=5).json()
    assert {s["hook"] for s in disco["services"]} == {"patient-view", "order-select", "order-sign"}

    # Spread calls over both workers (a new connection each time); the multi-process collector
    # must sum every worker's counts.  Unknown service ids are not counted (unbounded labels).
    pv = f"{base}/cds-services/b12-neck-pain-patient-view"
    for _ in range(60):
        assert requests.post(pv, json={"hook": "patient-view"}, timeout=5).status_code == 400
    text = requests.get(f"{base}/metrics", timeout=5).text
    match = re.search(r'^cds_requests_total\{service="b12-neck-pain-patient-view",status="400"\} (\S+)$',
                      text, re.MULTILINE)
    assert match and float(match.group(1)) == 60.0
    latency = re.search(r'^cds_request_duration_seconds_count\{service="b12-neck-pain-patient-view",status="400"\} (\S+)$',
                        text, re.MULTILINE)
    assert latency and float(latency.group(1)) == 60.0
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2


def test_dev_mode_serves_the_same_app(tmp_path):
    port = free_port()
    env = {**os.environ, "CDS_DATA_DIR": str(tmp_path / "data"), "CDS_AUTH_DISABLED": "1"}
    server = ServerProcess([B12_CDS, "serve", "--dev", "--bind", f"127.0.0.1:{port}"], env=env,
                           log_path=tmp_path / "dev.log")
    with server.start(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30):
        disco = requests.get(f"http://127.0.0.1:{port}/cds-services", timeout=5).json()
        assert len(disco["services"]) == 3
        assert "gunicorn" not in server.log_tail()


def test_restart_right_after_kill_9_of_the_master_serves_and_leaves_no_orphan(tmp_path):
    """A crashed master (SIGKILL: no chance to stop its workers) is restarted at once on the
    same address: the workers die with their master (PR_SET_PDEATHSIG), so the port is free and
    the new server comes up within a few seconds; nothing of the old one keeps running."""
    import signal
    import time

    port = free_port()
    env = {**os.environ, "CDS_DATA_DIR": str(tmp_path / "data"), "CDS_BIND": f"127.0.0.1:{port}",
           "CDS_AUTH_DISABLED": "1", "CDS_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    cmd = [B12_CDS, *dockerfile_cmd()[1:]]
    first = ServerProcess(cmd, env=env, log_path=tmp_path / "first.log")
    second = ServerProcess(cmd, env=env, log_path=tmp_path / "second.log")
    try:
        first.start(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout=30)
        old_workers = subprocess.run(["pgrep", "-P", str(first.proc.pid)], capture_output=True,
                                     text=True).stdout.split()
        assert len(old_workers) == 2
        def alive(pid: str) -> bool:
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return False
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"

        def served_by_new_server() -> bool:
            return not any(alive(pid) for pid in old_workers) and requests.get(
                f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200

        os.kill(first.proc.pid, signal.SIGKILL)  # the master only, as a crash would
        first.proc.wait(timeout=5)
        killed = time.monotonic()
        second.start(served_by_new_server, timeout=10)  # restarted at once, on the same address
        # "Within a few seconds": most of it is the new server's own start-up (imports, app
        # factory, 2 workers), which a loaded CI machine stretches; the failure this guards
        # against (orphans holding the port) never serves, or logs "Connection in use" below.
        assert time.monotonic() - killed < 8
        assert not [pid for pid in old_workers if alive(pid)], "orphaned workers still running"
        new_workers = subprocess.run(["pgrep", "-P", str(second.proc.pid)], capture_output=True,
                                     text=True).stdout.split()
        assert len(new_workers) == 2 and second.proc.poll() is None
        for _ in range(20):  # and it keeps serving (no gap once the old workers are gone)
            assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        assert "connection in use" not in second.log_tail().lower()  # bound at the first try
    finally:
        second.stop()
        first.kill()


def test_server_level_errors_are_json_outcomes_with_cors(server):
    """What gunicorn answers itself (request too large to hand to the app, malformed request)
    is an OperationOutcome too, with the CORS and security headers."""
    import socket

    base, _ = server
    host, port = base.removeprefix("http://").split(":")

    def raw(request: bytes) -> tuple[bytes, bytes]:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        return head, body

    for request, status in ((b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"a" * 70000 + b"\r\n\r\n", b"431"),
                            (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"414"),
                            (b"GARBAGE\r\n\r\n", b"400")):
        head, body = raw(request)
        assert head.startswith(b"HTTP/1.1 " + status), head[:80]
        lowered = head.lower()
        assert b"content-type: application/json" in lowered
        assert b"access-control-allow-origin: *" in lowered and b"cache-control: no-store" in lowered
        outcome = orjson.loads(body)
        assert outcome["resourceType"] == "OperationOutcome" and b"aaaa" not in body

    # Below gunicorn's hard limit, the app answers with the exact CORS of the request's origin.
    big = requests.get(f"{base}/healthz", headers={"Authorization": "Bearer " + "a" * 20000,
                                                   "Origin": "https://ehr.example.org"}, timeout=5)
    assert big.status_code == 431 and big.json()["resourceType"] == "OperationOutcome"
    assert big.headers["Access-Control-Allow-Origin"] == "*"


def test_chunked_body_over_the_limit_is_413_and_counted(server):
    base, _ = server
    pv = f"{base}/cds-services/b12-neck-pain-patient-view"
    from cds_service.config import Settings

    body = b'{"hook": "patient-view"}' + b" " * (Settings().max_body_bytes + 10)

    def chunks():
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    resp = requests.post(pv, data=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert resp.status_code == 413 and resp.json()["resourceType"] == "OperationOutcome"
    assert resp.headers["Cache-Control"] == "no-store"
    text = requests.get(f"{base}/metrics", timeout=5).text
    assert 'cds_requests_total{service="b12-neck-pain-patient-view",status="413"} 1.0' in text
    assert 'status="500"' not in text
