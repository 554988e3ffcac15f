"""The production start command (the Dockerfile's CMD, `b12-cds serve`) really serves the app
under gunicorn, with metrics aggregated across worker processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
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
