"""Under the production serving command, a FHIR server that drips one byte at a time leaves no
fetch thread and no connection behind in the worker, however many hook calls it gets.

(Before the deadline bounded every read, the worker's thread count grew from 5 to over 100
after 20 such calls, and the connections stayed open.)
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests

from tests.integration.test_slow_clients import start_server
from tests.servers import HOST, hook_body
from tests.test_fhir_deadline import DripServer, settle

pytestmark = pytest.mark.integration
PV = "/cds-services/b12-neck-pain-patient-view"
DEADLINE = 0.5


def worker_of(server) -> psutil.Process:
    workers = psutil.Process(server.proc.pid).children(recursive=True)
    assert len(workers) == 1, workers
    return workers[0]


def connections_to(proc: psutil.Process, port: int) -> int:
    return sum(1 for c in proc.net_connections(kind="tcp")
               if c.raddr and c.raddr.port == port and c.status != psutil.CONN_CLOSE)


def test_dripping_fhir_server_leaves_nothing_behind_in_the_worker(tmp_path) -> None:
    with DripServer("body") as drip:
        server, port = start_server(tmp_path, CDS_WORKERS="1", CDS_FHIR_ALLOWLIST=drip.base,
                                    CDS_FHIR_DEADLINE=str(DEADLINE), CDS_FHIR_READ_TIMEOUT="0.5")
        try:
            url = f"http://{HOST}:{port}{PV}"
            body = hook_body(fhir_server=drip.base + "/fhir", token="t0k3n")

            def call() -> float:
                started = time.monotonic()
                resp = requests.post(url, json=body, timeout=10)
                assert resp.status_code == 412
                return time.monotonic() - started

            # Warm up: concurrent calls bring the server's own app-thread pool (4 per worker) to
            # its full size, so the baseline counts every thread the server keeps.
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda _: call(), range(8)))
            call()
            worker = worker_of(server)
            assert settle(lambda: connections_to(worker, drip.port) == 0)
            baseline = worker.num_threads()

            durations = [call() for _ in range(20)]

            assert max(durations) < DEADLINE + 1.5  # slack for a loaded CI box
            assert drip.accepted >= 29 * 9  # every call tried every key
            assert settle(lambda: worker.num_threads() <= baseline), (worker.num_threads(), baseline)
            assert settle(lambda: connections_to(worker, drip.port) == 0), connections_to(worker, drip.port)
            assert settle(lambda: drip.open_connections == 0), drip.open_connections
        finally:
            server.stop()
