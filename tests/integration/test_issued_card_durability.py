"""A worker killed right after answering a hook call loses nothing it answered.

`b12-cds serve` (production: gunicorn, 2 pre-fork workers sharing one SQLite database in WAL mode,
the issued cards committed with `synchronous=NORMAL`, no fsync).  Each round: a hook call on a
keep-alive connection answers a card; the worker holding that connection (found from the
connection's socket in /proc) is killed with SIGKILL the moment the answer is read; the clinician's
feedback (accepting the card's suggestion) is then posted, as an EHR would, on a new connection, so
another worker (the survivor, or the one gunicorn starts in place of the dead) takes it.  The
feedback must be accepted and tied to the card and its suggestion, and the report must count it
under the card's kind.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cds_service.config import Settings
from cds_service.store import Store
from tests.servers import ServerProcess, free_port, http_ok
from tests.test_policy import PV, chart, prefetch

pytestmark = pytest.mark.integration

B12_CDS = str(Path(sys.executable).with_name("b12-cds"))
HOST = "127.0.0.1"
ROUNDS = 3


def _workers(master: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _socket_inode(server_port: int, client_port: int) -> str:
    """The inode of the server side of the TCP connection from `client_port` (IPv4 loopback)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            return inode
    raise AssertionError(f"no server socket for client port {client_port}")


def _owner(pids: list[int], inode: str) -> int:
    """The process among `pids` holding the socket `inode`."""
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except FileNotFoundError:
                continue
    raise AssertionError("no worker holds the connection")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except FileNotFoundError:
        return True
    return state in "ZX"


def _post(port: int, path: str, body: dict) -> tuple[int, dict, http.client.HTTPConnection]:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    return resp.status, payload, conn


def test_feedback_finds_its_card_after_the_answering_worker_is_killed(tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"
    env = {**os.environ, "CDS_DATA_DIR": str(data_dir), "CDS_BIND": f"{HOST}:{port}",
           "CDS_AUTH_DISABLED": "1", "CDS_WORKERS": "2", "CDS_DATABASE_URL": "",
           "CDS_LOG_LEVEL": "ERROR", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
    server = ServerProcess([B12_CDS, "serve"], env=env, log_path=tmp_path / "serve.log")
    cards: list[dict] = []
    with server.start(http_ok(f"http://{HOST}:{port}/healthz"), timeout=60):
        master = server.proc.pid
        for round_ in range(ROUNDS):
            pid = f"crash-{round_}"
            body = {"hook": "patient-view", "hookInstance": f"0f6b0c43-5e49-4d55-9a57-4f1f5b2a7e{round_:02d}",
                    "context": {"userId": "Practitioner/u1", "patientId": pid},
                    "prefetch": prefetch(chart(pid))}
            status, answer, conn = _post(port, f"/cds-services/{PV}", body)
            # The answer is read: kill the worker that sent it, before anything else happens.
            worker = _owner(_workers(master), _socket_inode(port, conn.sock.getsockname()[1]))
            os.kill(worker, signal.SIGKILL)
            conn.close()
            assert status == 200, answer
            (card,) = answer["cards"]
            cards.append(card)
            deadline = time.monotonic() + 10
            while not _gone(worker):
                assert time.monotonic() < deadline, "the killed worker did not die"
                time.sleep(0.01)

            feedback = {"feedback": [{
                "card": card["uuid"], "outcome": "accepted",
                "outcomeTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "acceptedSuggestions": [{"id": card["suggestions"][0]["uuid"]}]}]}
            status, reply, conn = _post(port, f"/cds-services/{PV}/feedback", feedback)
            taker = _owner(_workers(master), _socket_inode(port, conn.sock.getsockname()[1]))
            conn.close()
            assert status == 200, reply
            assert taker != worker

    store = Store.open(Settings(data_dir=str(data_dir)))
    try:
        rows = {r["card_uuid"]: r for r in store.feedback_rows()}
        report = store.feedback_report()
    finally:
        store.close()
    for card in cards:
        row = rows[card["uuid"]]
        assert (row["outcome"], row["unknown_card"], row["unknown_suggestions"]) == ("accepted", False, False)
    (kind,) = report["kinds"]
    assert (kind["kind"], kind["issued"], kind["accepted"]) == ("b12-test", ROUNDS, ROUNDS)
    assert report["unknown_card_feedback"]["entries"] == 0
