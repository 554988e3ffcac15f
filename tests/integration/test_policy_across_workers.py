"""Feedback given through one worker suppresses the card in every worker at once.

`b12-cds serve` (2 pre-fork workers, one SQLite database).  Each worker remembers the suppression
lookups it made (cds_service/store.py, `_SuppressionGeneration`); this checks that the memory
never outlives a suppression written by another process.  Both workers first answer the patient's
card (so both remember "no suppression" for the patient), the clinician overrides it through one
of them, and then every hook call, whichever worker answers it (both must answer at least once),
returns no card.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import ServerProcess, free_port, http_ok
from tests.test_policy import OVERRIDE, PV, chart, prefetch

pytestmark = pytest.mark.integration

B12_CDS = str(Path(sys.executable).with_name("b12-cds"))
HOST = "127.0.0.1"
PATIENT = "across-workers"


def _workers(master: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _worker_of(conn: http.client.HTTPConnection, port: int, workers: set[int]) -> int:
    """The worker holding the server side of `conn` (its socket inode in /proc)."""
    client_port = conn.sock.getsockname()[1]
    inode = next(line.split()[9] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                 if int(line.split()[1].split(":")[1], 16) == port
                 and int(line.split()[2].split(":")[1], 16) == client_port)
    for pid in workers:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except FileNotFoundError:
                continue
    raise AssertionError("no worker holds the connection")


def _post(port: int, path: str, body: dict, workers: set[int]) -> tuple[dict, int]:
    """POST on a new connection; the answer (200 required) and the worker that sent it."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        payload = json.loads(resp.read())
        assert resp.status == 200, payload
        return payload, _worker_of(conn, port, workers)
    finally:
        conn.close()


def _cards_from_every_worker(port: int, workers: set[int]) -> list[list[dict]]:
    """Hook calls until each worker has answered at least twice (its second answer comes from
    what it remembered); the cards of every answer."""
    body = {"hook": "patient-view", "hookInstance": "0f6b0c43-5e49-4d55-9a57-4f1f5b2a7e01",
            "context": {"userId": "Practitioner/u1", "patientId": PATIENT},
            "prefetch": prefetch(chart(PATIENT))}
    answers: list[list[dict]] = []
    seen: dict[int, int] = {}
    deadline = time.monotonic() + 60
    while len(seen) < len(workers) or min(seen.values()) < 2:
        assert time.monotonic() < deadline, f"not every worker answered: {seen}"
        answer, worker = _post(port, f"/cds-services/{PV}", body, workers)
        answers.append(answer["cards"])
        seen[worker] = seen.get(worker, 0) + 1
    return answers


def test_a_suppression_written_by_one_worker_applies_in_every_worker(tmp_path):
    port = free_port()
    env = {**os.environ, "CDS_DATA_DIR": str(tmp_path / "data"), "CDS_BIND": f"{HOST}:{port}",
           "CDS_AUTH_DISABLED": "1", "CDS_WORKERS": "2", "CDS_DATABASE_URL": "",
           "CDS_LOG_LEVEL": "ERROR", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    server = ServerProcess([B12_CDS, "serve"], env=env, log_path=tmp_path / "serve.log")
    with server.start(http_ok(f"http://{HOST}:{port}/healthz"), timeout=60):
        deadline = time.monotonic() + 30
        while len(workers := _workers(server.proc.pid)) < 2:
            assert time.monotonic() < deadline, "gunicorn did not start 2 workers"
            time.sleep(0.05)

        before = _cards_from_every_worker(port, workers)
        assert all(len(cards) == 1 for cards in before), before
        feedback = {"feedback": [{
            "card": before[-1][0]["uuid"], "outcome": "overridden",
            "outcomeTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "overrideReason": {"reason": {"system": OVERRIDE, "code": "tested-elsewhere"}}}]}
        _post(port, f"/cds-services/{PV}/feedback", feedback, workers)

        after = _cards_from_every_worker(port, workers)
        assert all(cards == [] for cards in after), after


def _order_body(hook_name: str, encounter: str) -> dict:
    body = {"hook": hook_name, "hookInstance": "0f6b0c43-5e49-4d55-9a57-4f1f5b2a7e02",
            "context": {"userId": "Practitioner/u1", "patientId": PATIENT, "encounterId": encounter},
            "prefetch": prefetch(chart(PATIENT))}
    if hook_name != "patient-view":
        body["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": []}
    if hook_name == "order-select":
        body["context"]["selections"] = []
    return body


def test_a_card_shown_by_one_worker_locks_out_its_encounter_in_every_worker(tmp_path):
    """The encounter lockout reads what every worker recorded (SQLite: the workers' journals
    before they are folded), at once: right after a card is shown in an encounter, order-select
    in that encounter answers no card, whichever worker takes it."""
    port = free_port()
    env = {**os.environ, "CDS_DATA_DIR": str(tmp_path / "data"), "CDS_BIND": f"{HOST}:{port}",
           "CDS_AUTH_DISABLED": "1", "CDS_WORKERS": "2", "CDS_DATABASE_URL": "",
           "CDS_LOG_LEVEL": "ERROR", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    server = ServerProcess([B12_CDS, "serve"], env=env, log_path=tmp_path / "serve.log")
    with server.start(http_ok(f"http://{HOST}:{port}/healthz"), timeout=60):
        deadline = time.monotonic() + 30
        while len(workers := _workers(server.proc.pid)) < 2:
            assert time.monotonic() < deadline, "gunicorn did not start 2 workers"
            time.sleep(0.05)
        for round_ in range(4):
            encounter = f"enc-{round_}"
            shown, shower = _post(port, f"/cds-services/{PV}", _order_body("patient-view", encounter),
                                  workers)
            assert len(shown["cards"]) == 1, shown
            others = 0
            deadline = time.monotonic() + 60
            while others < 2:  # until another worker than the one that showed it answered twice
                assert time.monotonic() < deadline, "the other worker never answered"
                answer, worker = _post(port, "/cds-services/b12-neck-pain-order-select",
                                       _order_body("order-select", encounter), workers)
                assert answer["cards"] == [], (round_, answer)
                others += worker != shower
